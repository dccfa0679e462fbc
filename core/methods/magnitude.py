"""``magnitude``: global top-r of |τ|, values unchanged (the trim step of TIES-Merging).

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708.

``magnitude-scaled``: the same mask with the best single global scale on the kept values,
found by a one-number search on the fitness. It explains much of what a rescale buys, so every
searched method must beat it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.methods.base import (
    FitContext,
    Fitted,
    Method,
    check_keep,
    from_mask,
    keep_count,
)
from core.params import DEFAULT_KEEP
from core.taskvector import TensorPlan
from core.tensor_codec import Selection, ValueSpec
from core.topk import Cut, CutApplier, coarse_histogram, top_k_cut
from core.workspace import Workspace


def global_cut(ws: Workspace, keep: float) -> Cut:
    """The exact global top-⌈r·D⌉ cut of |τ| over every delta tensor (two streamed passes)."""

    def scores() -> Any:
        return ws.iter_abs_taus()

    hist = coarse_histogram(scores())
    return top_k_cut(keep_count(keep, int(hist.sum())), hist, scores)


@dataclass
class MaskFitted(Fitted):
    cut: Cut | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        assert self.cut is not None
        self._applier = CutApplier(self.cut)

    streams = True

    def select(self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec) -> Selection:
        return from_mask(tau, self._applier.mask_abs(tau), self.scale)

    def select_slices(
        self, plan: TensorPlan, slices: Iterable[tuple[int, torch.Tensor]], spec: ValueSpec
    ) -> Selection | None:
        equal_left = self._applier.equal_left
        positions: list[np.ndarray] = []
        values: list[torch.Tensor] = []
        nonzero = False
        for offset, part in slices:
            nonzero = nonzero or bool(part.any())
            sel = from_mask(part, self._applier.mask(part.abs()), self.scale)
            positions.append(sel.positions + offset)
            values.append(sel.values)
        if not nonzero:  # `same`: as if never selected (ties at the cut stay for later tensors)
            self._applier.equal_left = equal_left
            return None
        return Selection(np.concatenate(positions), torch.cat(values))


class Magnitude(Method):
    name = "magnitude"
    paper = "https://arxiv.org/abs/2306.01708"

    def __init__(self, keep: float = DEFAULT_KEEP) -> None:
        self.keep = check_keep(keep)

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        cut = global_cut(ws, self.keep)
        return MaskFitted(
            params={"keep": self.keep}, result={"threshold": cut.value, "kept": cut.k}, cut=cut
        )


class MagnitudeScaled(Method):
    """Magnitude mask, values × one global scale chosen on the fitness (log-grid + refine)."""

    name = "magnitude-scaled"
    paper = "https://arxiv.org/abs/2306.01708"
    searches = True

    def __init__(
        self, keep: float = DEFAULT_KEEP, max_scale: float = 64.0, grid: int = 13, refine: int = 6
    ) -> None:
        self.keep = check_keep(keep)
        self.max_scale = max_scale
        self.grid = grid
        self.refine = refine

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        cut = global_cut(ws, self.keep)
        params = {"keep": self.keep, "max_scale": self.max_scale}
        if ctx.evaluator is None:
            return MaskFitted(
                params=params,
                result={"scale": 1.0, "kept": cut.k},
                cut=cut,
                notes=["no model to evaluate: scale left at 1 (plain magnitude)"],
            )
        taus = ctx.on_device(ws.load_taus())
        applier = CutApplier(cut)
        index = {
            p.name: torch.nonzero(applier.mask_abs(taus[p.name])).reshape(-1)
            for p in ws.delta_plans
        }
        kept = {n: taus[n][idx] for n, idx in index.items()}
        specs = {p.name: ValueSpec.from_bits(ctx.value_bits, p.dtype) for p in ws.delta_plans}
        trace: list[dict[str, Any]] = []
        cache: dict[float, float] = {}

        def fitness(log2s: float) -> float:
            log2s = round(log2s, 6)
            if log2s not in cache:
                s = 2.0**log2s
                score = ctx.score(lambda n: (index[n], specs[n].round(kept[n] * s)))
                cache[log2s] = score.fitness
                best = max(cache.values())
                trace.append(
                    {
                        "evaluation": ctx.evaluations,
                        "scale": s,
                        "fitness": score.fitness,
                        "best_fitness": best,
                    }
                )
                ctx.report(
                    phase="search",
                    generation=len(trace),
                    generations=self.grid + self.refine,
                    best_fitness=best,
                    evaluations=ctx.evaluations,
                )
            return cache[log2s]

        top = math.log2(self.max_scale)
        points = [top * i / (self.grid - 1) for i in range(self.grid)]
        before = fitness(0.0)
        for p in points:
            fitness(p)
        # golden-section refinement around the best grid point
        best = max(points, key=fitness)
        step = top / (self.grid - 1)
        a, b = max(0.0, best - step), min(top, best + step)
        g = (math.sqrt(5) - 1) / 2
        for _ in range(self.refine // 2):
            c, d = b - g * (b - a), a + g * (b - a)
            if fitness(c) >= fitness(d):
                b = d
            else:
                a = c
        best_log = max(cache, key=lambda k: cache[k])
        scale = 2.0**best_log
        fitted = MaskFitted(
            params=params, result={"scale": scale, "kept": cut.k}, trace=trace, cut=cut, scale=scale
        )
        fitted.notes.append(
            f"best scale {scale:.3g} (fitness {cache[best_log]:.4g}, unscaled {before:.4g})"
        )
        return fitted

"""``nps``: Neural Parameter Search pruning.

Du et al., "Neural Parameter Search for Slimmer Fine-Tuned Models and Better Transfer",
ACL 2025, https://arxiv.org/abs/2505.18713.

τ is cut into M global magnitude-rank subspaces q_m; τ' = Σ w_m q_m is searched with CMA-ES
(the ``cma`` package) on the fitness of θ_pre + mask_r(τ'), where mask_r keeps the top ⌈r·D⌉
entries of |τ'| — the mask is applied inside the fitness, together with the value rounding or
quantisation that will be stored. Only the kept entries and w are stored.

The paper's form is ``preset="paper"``: equal-count bins, coefficients linear in [0, 3],
starting at w = 1. Our default searches log-scale coefficients over a wide range on bins
graded around the keep threshold: with equal bins every kept entry falls in the top bin at
small r, so the search reduces to one rescale, and a bounded linear rescale hits its bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.errors import InvalidArgument
from core.evaluate import Score
from core.methods.base import Candidate, FitContext, Fitted, Method, check_keep, keep_count
from core.methods.magnitude import MaskFitted, global_cut
from core.methods.prefix import PrefixIndex
from core.methods.subspaces import BINNINGS, MagnitudeSubspaces, magnitude_subspaces
from core.params import DEFAULT_KEEP
from core.taskvector import TensorPlan
from core.tensor_codec import Selection, ValueSpec
from core.topk import Cut, CutApplier, coarse_histogram, count_at_least_np, top_k_cut
from core.workspace import Workspace

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "binning": "equal",
        "parameterisation": "linear",
        "bounds": (0.0, 3.0),
        "sigma0": 0.5,
    },
    "default": {
        "binning": "graded",
        "parameterisation": "log",
        "bounds": (-3.0, 5.0),
        "sigma0": 1.0,
    },
}


def default_popsize(dims: int) -> int:
    """CMA-ES's default population, 4 + ⌊3 ln n⌋ (the paper's ≈ 4 + 3 ln M)."""
    return 4 + int(3 * math.log(dims))


@dataclass
class SearchOutcome:
    x: np.ndarray
    fitness: float
    before: float
    trace: list[dict[str, Any]]
    holdout: dict[str, float]


def run_cma(
    objective: Callable[[np.ndarray], float],
    x0: np.ndarray,
    *,
    sigma0: float,
    bounds: tuple[float, float],
    popsize: int,
    generations: int,
    seed: int,
    ctx: FitContext,
    holdout: Callable[[np.ndarray], float] | None = None,
) -> SearchOutcome:
    """Maximise ``objective`` with CMA-ES from ``x0``; deterministic for a seed.

    The start point is evaluated first, so the result is never worse than it on the objective.
    With ``holdout``, the start, the best-ever and CMA's favourite mean are re-scored on a
    held-out part of the calibration data and the best there wins (guards against over-fitting
    the search set).
    """
    import cma  # here, not at the top: ~100 MB that only processes running searches need

    es = cma.CMAEvolutionStrategy(
        list(x0),
        sigma0,
        {
            "popsize": popsize,
            "bounds": [bounds[0], bounds[1]],
            "seed": seed + 1,
            "verbose": -9,
            "maxiter": generations,
            "tolfun": 0,
            "tolx": 0,
            "tolflatfitness": 10**9,
        },
    )
    best_x, best_f = np.array(x0, dtype=float), objective(np.array(x0, dtype=float))
    before = best_f
    trace: list[dict[str, Any]] = [
        {"generation": 0, "best_fitness": best_f, "evaluations": ctx.evaluations}
    ]
    ctx.report(
        phase="search",
        generation=0,
        generations=generations,
        best_fitness=best_f,
        evaluations=ctx.evaluations,
    )
    for gen in range(1, generations + 1):
        xs = es.ask()
        fs = [objective(np.asarray(x, dtype=float)) for x in xs]
        es.tell(xs, [-f for f in fs])
        i = int(np.argmax(fs))
        if fs[i] > best_f:
            best_f, best_x = fs[i], np.asarray(xs[i], dtype=float)
        trace.append(
            {
                "generation": gen,
                "best_fitness": best_f,
                "generation_best": fs[i],
                "generation_mean": float(np.mean(fs)),
                "evaluations": ctx.evaluations,
            }
        )
        ctx.report(
            phase="search",
            generation=gen,
            generations=generations,
            best_fitness=best_f,
            evaluations=ctx.evaluations,
        )
    chosen, chosen_f = best_x, best_f
    scores: dict[str, float] = {}
    if holdout is not None:
        favourite = np.clip(np.asarray(es.result.xfavorite, dtype=float), bounds[0], bounds[1])
        candidates = {"start": np.array(x0, dtype=float), "best": best_x, "mean": favourite}
        scores = {k: holdout(v) for k, v in candidates.items()}
        pick = max(scores, key=lambda k: (scores[k], k == "best"))
        chosen = candidates[pick]
        chosen_f = objective(chosen) if pick != "best" else best_f
        scores = {f"holdout_{k}": v for k, v in scores.items()} | {
            "picked": float(list(candidates).index(pick))
        }
    return SearchOutcome(chosen, chosen_f, before, trace, scores)


class Nps(Method):
    """NPS-Pruning (see the module docstring)."""

    name = "nps"
    paper = "https://arxiv.org/abs/2505.18713"
    searches = True

    def __init__(
        self,
        keep: float = DEFAULT_KEEP,
        subspaces: int = 8,
        preset: str = "default",
        binning: str | None = None,
        parameterisation: str | None = None,
        bounds: tuple[float, float] | None = None,
        sigma0: float | None = None,
        generations: int = 20,
        popsize: int | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise InvalidArgument(f"preset must be one of {sorted(PRESETS)}")
        p = PRESETS[preset]
        self.keep = check_keep(keep)
        self.m = int(subspaces)
        self.preset = preset
        self.binning = binning or p["binning"]
        self.parameterisation = parameterisation or p["parameterisation"]
        lo, hi = bounds if bounds is not None else p["bounds"]
        self.bounds: tuple[float, float] = (float(lo), float(hi))
        self.sigma0 = float(sigma0 if sigma0 is not None else p["sigma0"])
        self.generations = int(generations)
        self.popsize = popsize
        if self.binning not in BINNINGS or self.parameterisation not in ("log", "linear"):
            raise InvalidArgument("binning must be equal|graded and parameterisation log|linear")
        if not 1 <= self.m <= 64 or self.generations < 0:
            raise InvalidArgument("subspaces must be 1..64 and generations ≥ 0")

    def params(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "subspaces": self.m,
            "preset": self.preset,
            "binning": self.binning,
            "parameterisation": self.parameterisation,
            "bounds": list(self.bounds),
            "sigma0": self.sigma0,
            "generations": self.generations,
        }

    def weights(self, x: np.ndarray) -> np.ndarray:
        return np.exp(x) if self.parameterisation == "log" else np.maximum(x, 0.0)

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        params = self.params()
        if ctx.evaluator is None:
            cut = global_cut(ws, self.keep)
            return MaskFitted(
                params=params,
                result={"w": [1.0] * self.m, "kept": cut.k},
                cut=cut,
                notes=[
                    "weights evaluation: no model to search with, so NPS reduces to magnitude "
                    "pruning (w = 1)"
                ],
            )
        taus = ctx.on_device(ws.load_taus())
        total = sum(t.numel() for t in taus.values())
        k = keep_count(self.keep, total)
        subs = magnitude_subspaces(taus, k, self.m, self.binning)
        specs = {p.name: ValueSpec.from_bits(ctx.value_bits, p.dtype) for p in ws.delta_plans}
        m = subs.m
        x0 = np.zeros(m) if self.parameterisation == "log" else np.ones(m)
        popsize = self.popsize or default_popsize(max(m, 2))

        index = {n: PrefixIndex.build(subs.ids[n], -taus[n].abs(), taus[n]) for n in taus}

        def apply(x: np.ndarray, part: str) -> Score:
            wn = self.weights(x)
            limits = -candidate_thresholds(subs, torch.from_numpy(wn), k).numpy()  # on key = −|τ|

            def delta(name: str) -> Candidate:
                idx, values = index[name].select(limits, wn, inclusive=True)
                return idx, specs[name].round(values)

            return ctx.score(delta, part)

        holdout = (
            (lambda x: apply(x, "holdout").fitness) if "holdout" in ctx.evaluator.parts else None
        )
        outcome = run_cma(
            lambda x: apply(x, "search").fitness,
            x0,
            sigma0=self.sigma0,
            bounds=self.bounds,
            popsize=popsize,
            generations=self.generations,
            seed=ctx.seed,
            ctx=ctx,
            holdout=holdout,
        )
        w = self.weights(outcome.x)
        cut = weighted_cut(taus, subs, torch.tensor(w, dtype=torch.float32, device=ctx.device), k)
        fitted = NpsFitted(
            params=params | {"popsize": popsize},
            result={
                "w": [float(v) for v in w],
                "kept": k,
                "subspace_sizes": subs.sizes.tolist(),
                "subspace_bounds": [float(b) for b in subs.bounds[1:-1]],
                "fitness_start": outcome.before,
                "fitness_best": outcome.fitness,
                **outcome.holdout,
            },
            trace=outcome.trace,
            subs=subs.to_cpu(),
            w=torch.tensor(w, dtype=torch.float32),
            cut=cut,
        )
        return fitted


def candidate_thresholds(subs: MagnitudeSubspaces, w: torch.Tensor, k: int) -> torch.Tensor:
    """Per-subspace |τ| thresholds of the top-k of |τ'| = w_m |τ|, from histogram statistics.

    Finds t with Σ_m count_m(|τ| ≥ t / w_m) = k by bisection on log t, where count_m comes from
    the cumulative coarse histogram restricted to subspace m's value range — no pass over the
    entries. Returns t / w_m (inf where w_m = 0). # (M,) float64
    """
    wn = w.double().numpy()
    lo_b = subs.bounds[1:].numpy()  # (M,) lower |τ| bound of each subspace
    hi_b = subs.bounds[:-1].numpy()  # (M,) upper bound (inf for the top subspace)
    cum = subs.cum.numpy()
    c_hi = np.where(np.isinf(hi_b), 0.0, count_at_least_np(cum, np.minimum(hi_b, 3e38)))
    live = wn > 0

    def count(t: float) -> float:
        x = np.full_like(wn, np.inf)
        x[live] = np.maximum(t / wn[live], lo_b[live])
        c = np.where(np.isinf(x), 0.0, count_at_least_np(cum, np.minimum(x, 3e38)) - c_hi)
        return float(np.clip(c, 0, None).sum())

    lo, hi = math.log(1e-38), math.log(subs.max_abs * float(wn.max()) * 2 + 1e-30)
    for _ in range(64):
        mid = (lo + hi) / 2
        if count(math.exp(mid)) >= k:
            lo = mid
        else:
            hi = mid
    t = math.exp(lo)
    out = np.full_like(wn, np.inf)
    out[live] = t / wn[live]
    return torch.from_numpy(out)


def weighted_cut(
    taus: dict[str, torch.Tensor], subs: MagnitudeSubspaces, w: torch.Tensor, k: int
) -> Cut:
    """The exact top-k cut of |τ'| = w[sub]·|τ| (two passes over the in-memory entries)."""

    def scores() -> Any:
        return (taus[n].abs() * w[subs.ids[n].long()] for n in taus)

    hist = coarse_histogram(scores())
    return top_k_cut(k, hist, scores)


@dataclass
class NpsFitted(Fitted):
    subs: MagnitudeSubspaces | None = None
    w: torch.Tensor | None = None
    cut: Cut | None = None

    def __post_init__(self) -> None:
        assert self.cut is not None
        self._applier = CutApplier(self.cut)

    def select(self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec) -> Selection:
        assert self.subs is not None and self.w is not None
        scale = self.w[self.subs.ids[plan.name].long()]  # (numel,)
        mask = self._applier.mask(tau.abs() * scale)
        idx = torch.nonzero(mask).reshape(-1)
        return Selection(idx.numpy().astype(np.int64), (tau[idx] * scale[idx]).to(torch.float32))

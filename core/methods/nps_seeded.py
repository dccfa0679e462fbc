"""``nps-seeded``: NPS subspaces with searched keep rates and scales; positions from a seed.

Our variant of NPS (Du et al., ACL 2025, https://arxiv.org/abs/2505.18713) that borrows
DARE's free positions (Yu et al., ICML 2024, https://arxiv.org/abs/2311.03099). Each subspace
m gets a keep rate ρ_m and a scale; an entry of subspace m is kept when its seeded draw
u < ρ_m and stored as s_m·τ. The search starts at DARE (ρ_m = r, s_m = 1/r) and holds every
candidate to DARE's expected stored bits (``budget="bits"``): each subspace's kept entries are
weighted by what one more of them costs in its tensors' value sections, measured at the start
(4-bit codes of a token-embedding row compress to ~2.4 bits, of an attention matrix to ~4), so
the search never buys fidelity with storage. ``budget="entries"`` holds the expected count
r·D instead (cheaper entries then get traded for dearer ones: 8–13% more bits than DARE).

Subspaces:
- ``tensor``: tensor groups by role (embed, norm, bias, attn_in, attn_out, mlp_in, mlp_out,
  other). The decoder knows each tensor's rate, so positions cost nothing.
- ``magnitude``: magnitude-rank subspaces as in ``nps``. The decoder does not know an entry's
  subspace; entries whose draw lies between the tensor's smallest and largest rate get one
  coded bit (zstd), the rest are decided by the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core import rng
from core.errors import InvalidArgument
from core.evaluate import Score
from core.methods.base import Candidate, FitContext, Fitted, Method, check_keep, keep_count
from core.methods.dare import DareFitted
from core.methods.nps import default_popsize, run_cma
from core.methods.prefix import PrefixIndex
from core.methods.subspaces import magnitude_subspaces, tensor_group
from core.params import DEFAULT_KEEP
from core.taskvector import TensorPlan
from core.tensor_codec import Seeded, Selection, ValueSpec
from core.values import encode_values
from core.workspace import Workspace

SUBSPACE_KINDS = ("tensor", "magnitude")
BUDGETS = ("bits", "entries")
#: Below this many kept entries a tensor's marginal cost is not measured (its subspaces take the
#: average of the others).
MIN_COSTED = 64


def marginal_bits(values: torch.Tensor, spec: ValueSpec) -> float | None:
    """Bits one more kept value adds to its tensor's value section: the coded size of all the
    values against that of every other one (fixed costs — codebook, frame header — cancel; a
    strided half, since a prefix of a tensor, such as the first rows of an embedding, need not
    look like the rest). None when there are too few values to tell. # values: (n,)"""
    n = values.numel()
    if n < MIN_COSTED:
        return None
    full = len(encode_values(values, spec.coding, spec.bits)[0])
    half = values[::2]
    part = len(encode_values(half, spec.coding, spec.bits)[0])
    return 8.0 * (full - part) / (n - half.numel())


def subspace_costs(
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ids: dict[str, torch.Tensor],
    m: int,
    specs: dict[str, ValueSpec],
) -> np.ndarray:
    """Bits per kept entry of each subspace: the marginal cost of each tensor's values,
    averaged over the subspace's kept entries (tensors too small to measure, and subspaces
    with none measured, take the overall average). # (M,)

    Args:
        kept: per tensor, (kept entry indices, the values that would be stored).
    """
    bits = np.zeros(m)
    count = np.zeros(m)
    for name, (idx, values) in kept.items():
        cost = marginal_bits(values, specs[name])
        if cost is None:
            continue
        per = np.bincount(ids[name][idx].long().cpu().numpy(), minlength=m)[:m]
        bits += cost * per
        count += per
    mean = float(bits.sum() / count.sum()) if count.sum() else 1.0
    return np.where(count > 0, bits / np.maximum(count, 1), mean)


def budget_rates(a: np.ndarray, sizes: np.ndarray, k: float) -> np.ndarray:
    """ρ_m = min(1, c·e^{a_m}) with c chosen so that Σ n_m ρ_m = k (bisection). # (M,)

    With ``sizes`` weighted by a cost per entry, ``k`` is a budget in that unit."""
    e = np.exp(a)
    lo, hi = 0.0, 1.0 / max(float(e[sizes > 0].min(initial=1.0)), 1e-300)
    if float((sizes * np.minimum(1.0, hi * e)).sum()) <= k:
        return np.minimum(1.0, hi * e)
    for _ in range(100):
        mid = (lo + hi) / 2
        if float((sizes * np.minimum(1.0, mid * e)).sum()) < k:
            lo = mid
        else:
            hi = mid
    return np.minimum(1.0, hi * e)


class NpsSeeded(Method):
    name = "nps-seeded"
    paper = "https://arxiv.org/abs/2505.18713"
    searches = True

    def __init__(
        self,
        keep: float = DEFAULT_KEEP,
        subspaces: str = "tensor",
        m: int = 8,
        binning: str = "graded",
        rate_bound: float = math.log(8.0),
        scale_bound: float = math.log(4.0),
        sigma0: float = 0.5,
        generations: int = 12,
        popsize: int | None = None,
        seed_trials: int = 2,
        budget: str = "bits",
        fixed: str = "",
    ) -> None:
        if subspaces not in SUBSPACE_KINDS:
            raise InvalidArgument(f"subspaces must be one of {SUBSPACE_KINDS}")
        if budget not in BUDGETS:
            raise InvalidArgument(f"budget must be one of {BUDGETS}")
        self.budget = budget
        #: comma-separated subspaces left at DARE's rate and scale, e.g. "embed"
        self.fixed = tuple(g for g in fixed.split(",") if g)
        self.keep = check_keep(keep)
        self.kind = subspaces
        self.m = m
        self.binning = binning
        self.rate_bound = rate_bound
        self.scale_bound = scale_bound
        self.sigma0 = sigma0
        self.generations = generations
        self.popsize = popsize
        self.seed_trials = max(1, int(seed_trials))

    def params(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "subspaces": self.kind,
            "m": self.m,
            "binning": self.binning,
            "rate_bound": self.rate_bound,
            "scale_bound": self.scale_bound,
            "sigma0": self.sigma0,
            "generations": self.generations,
            "seed_trials": self.seed_trials,
            "budget": self.budget,
            "fixed": ",".join(self.fixed),
        }

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        params = self.params() | {"seed": ctx.seed}
        if ctx.evaluator is None:
            return DareFitted(
                params=params,
                keep=self.keep,
                seed=ctx.seed,
                notes=["weights evaluation: nothing to search with; this is DARE at the same keep"],
            )
        taus = ctx.on_device(ws.load_taus())
        total = sum(t.numel() for t in taus.values())
        k = float(keep_count(self.keep, total))
        specs = {p.name: ValueSpec.from_bits(ctx.value_bits, p.dtype) for p in ws.delta_plans}
        if self.kind == "tensor":
            names = sorted({tensor_group(p.name, len(p.shape)) for p in ws.delta_plans})
            gid = {p.name: names.index(tensor_group(p.name, len(p.shape))) for p in ws.delta_plans}
            ids = {
                n: torch.full((taus[n].numel(),), gid[n], dtype=torch.uint8, device=ctx.device)
                for n in taus
            }
            sizes = np.zeros(len(names))
            for n in taus:
                sizes[gid[n]] += taus[n].numel()
            labels = names
        else:
            subs = magnitude_subspaces(taus, int(k), self.m, self.binning)
            ids = subs.ids
            sizes = subs.sizes.double().numpy()
            labels = [f"m{i}" for i in range(subs.m)]
        m = len(labels)

        # the budget: expected kept entries, or their expected bits once the costs are known
        cost = np.ones(m)
        target = k

        # subspaces left at DARE's rate and scale (not searched)
        pinned = np.array([label in self.fixed for label in labels], dtype=bool)
        free = np.flatnonzero(~pinned)
        if free.size == 0:
            raise InvalidArgument("every subspace is fixed: nothing left to search")

        def rates_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            w = sizes * cost
            rho = budget_rates(np.zeros(m), w, target)  # the start: r everywhere
            rest = target - float((w * rho)[pinned].sum())  # what the free subspaces share
            rho[free] = budget_rates(x[:m][free], w[free], rest)
            scale = np.exp(np.where(pinned, 0.0, x[m:])) / np.maximum(rho, 1e-12)
            return rho, scale

        def full(y: np.ndarray) -> np.ndarray:
            """The searched vector (free subspaces' log-rates, then log-scales), bounded and
            spread over every subspace (pinned ones at 0). # (2·M,)"""
            x = np.zeros(2 * m)
            x[free] = np.clip(y[: free.size], -self.rate_bound, self.rate_bound)
            x[m + free] = np.clip(y[free.size :], -self.scale_bound, self.scale_bound)
            return x

        def build_index(seed: int) -> dict[str, PrefixIndex]:
            """Each tensor's entries by subspace, sorted by their seeded draw."""
            out = {}
            for n, tau in taus.items():
                u = torch.from_numpy(rng.uniforms(rng.tensor_key(seed, n), tau.numel())).to(
                    ctx.device
                )
                out[n] = PrefixIndex.build(ids[n], u, tau)
            return out

        index: dict[str, PrefixIndex] = {}

        def apply(x: np.ndarray, part: str) -> Score:
            rho, scale = rates_scales(x)

            def delta(name: str) -> Candidate:
                idx, values = index[name].select(rho, scale)
                return idx, specs[name].round(values)

            return ctx.score(delta, part)

        x0 = np.zeros(2 * m)
        # several draws: the seed is free to choose (the decoder only needs it), so the best
        # of a few masks at the start point is kept before the rates and scales are searched
        seed_scores: dict[int, float] = {}
        best_seed = ctx.seed
        for j in range(self.seed_trials):
            trial = ctx.seed + 7919 * j
            index = build_index(trial)
            seed_scores[trial] = apply(x0, "search").fitness
            if seed_scores[trial] >= seed_scores.get(best_seed, -math.inf):
                best_seed, best_index = trial, index
        index = best_index
        if self.budget == "bits":
            # DARE's own selection prices each subspace; at x0 the rates stay r either way
            rho0, scale0 = rates_scales(x0)
            kept = {}
            for n in taus:
                kept[n] = index[n].select(rho0, scale0)
            cost = subspace_costs(kept, ids, m, specs)
            target = float((sizes * cost * rho0).sum())
            del kept
        ctx.report(
            phase="seed",
            generation=0,
            generations=self.generations,
            best_fitness=seed_scores[best_seed],
            evaluations=ctx.evaluations,
        )
        bounds = (-max(self.rate_bound, self.scale_bound), max(self.rate_bound, self.scale_bound))
        holdout = (
            (lambda y: apply(full(y), "holdout").fitness)
            if "holdout" in ctx.evaluator.parts
            else None
        )
        outcome = run_cma(
            lambda y: apply(full(y), "search").fitness,
            np.zeros(2 * free.size),
            sigma0=self.sigma0,
            bounds=bounds,
            popsize=self.popsize or default_popsize(2 * free.size),
            generations=self.generations,
            seed=ctx.seed,
            ctx=ctx,
            holdout=holdout,
        )
        rho, scale = rates_scales(full(outcome.x))
        return SeededFitted(
            params=params,
            result={
                "subspaces": labels,
                "rates": rho.tolist(),
                "scales": scale.tolist(),
                "sizes": sizes.tolist(),
                "bits_per_entry": cost.tolist(),
                "fixed": [label for label, p in zip(labels, pinned, strict=True) if p],
                "fitness_start": outcome.before,
                "fitness_best": outcome.fitness,
                "seed": best_seed,
                "seed_fitness": {str(k): v for k, v in seed_scores.items()},
                **outcome.holdout,
            },
            trace=outcome.trace,
            seed=best_seed,
            ids={n: t.cpu() for n, t in ids.items()},
            rates=rho,
            scales=scale,
        )


@dataclass
class SeededFitted(Fitted):
    seed: int = 0
    ids: dict[str, torch.Tensor] | None = None
    rates: np.ndarray | None = None
    scales: np.ndarray | None = None

    def select(self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec) -> Selection:
        assert self.ids is not None and self.rates is not None and self.scales is not None
        key = rng.tensor_key(self.seed, plan.name)
        sid = self.ids[plan.name].long().numpy()  # (numel,)
        present = np.unique(sid)
        limits = np.array([rng.rate_limit(float(r)) for r in self.rates], dtype=np.uint64)
        lo, hi = int(limits[present].min()), int(limits[present].max())
        sure, amb = rng.seeded_positions(key, tau.numel(), lo, hi)
        amb_keep = None
        if amb.size:
            d = rng.draws53(key, 0, tau.numel())[amb]  # draws of the ambiguous entries
            amb_keep = d < limits[sid[amb]]
            positions = np.sort(np.concatenate([sure, amb[amb_keep]]))
        else:
            positions = sure
        idx = torch.from_numpy(positions)
        scale = torch.tensor(self.scales, dtype=torch.float32)[torch.from_numpy(sid[positions])]
        values = (tau[idx] * scale).to(torch.float32)
        return Selection(positions.astype(np.int64), values, Seeded(key, lo, hi, amb_keep))

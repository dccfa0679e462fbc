"""``hybrid``: low-rank factors plus a DARE residual, both paid from the same budget.

A full fine-tune's τ is neither low-rank nor sparse: a few directions carry a large share of
some matrices' energy (MiniLM, 50 steps: bench/results/hybrid.md) and the rest is spread
thin. ``hybrid`` stores, per 2-D tensor, the leading singular directions as quantised factors
A·Bᵀ (as ``lowrank``, format §5a) and the residual R = τ − A·Bᵀ as DARE does: entries kept at
seeded positions with rate ρ, rescaled by 1/ρ (Yu et al., https://arxiv.org/abs/2311.03099).
Factored, a tensor is the ``hybrid`` kind (format version 5); otherwise plain seeded sparse.

``keep`` is the budget, in DARE's terms: each tensor may store what DARE at that keep stores
there (its values section, measured). Factors of rank r and width w cost their own coded
sections; what is left pays the residual's rate ρ_{r,w}, each value priced at what one of
DARE's costs. The rank (up to ``rank``) and the width (among ``factor_bits``) are chosen
tensor by tensor to minimise the error the tensor is left with: a residual kept at rate ρ and
rescaled by 1/ρ has expected squared error (1/ρ − 1)·‖R‖², so the choice is the argmin of
(1/ρ_{r,w} − 1)·‖τ − A·Bᵀ‖², r = 0 being DARE itself (a plain sparse tensor). The hybrid
thus stores what DARE at the same ``keep`` stores, give or take zstd on the residual.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from core import rng
from core.errors import InvalidArgument
from core.evaluate import Evaluator
from core.methods.base import FitContext, Fitted, Method, check_keep
from core.methods.nps_seeded import NpsSeeded
from core.params import DEFAULT_KEEP
from core.taskvector import TensorPlan
from core.tensor_codec import Hybrid, LowRank, Seeded, Selection, ValueSpec, lowrank_rows
from core.values import encode_values
from core.workspace import Workspace

#: Largest rank tried per tensor, and the factors' bits per value, when nothing is asked: at
#: 0.04–0.06 bits/param a MiniLM matrix affords rank 1–2 at 4 bits (bench/results/hybrid.md).
DEFAULT_RANK = 4
DEFAULT_FACTOR_BITS = (2, 3, 4)
#: The factors' widths one may ask for.
FACTOR_BITS = (2, 3, 4, 8, 16)
#: The randomised decomposition's extra columns and power iterations (exact below 4× its width).
OVERSAMPLE = 10
POWER_ITERATIONS = 4
#: Factored matrices are at least this wide in both dimensions (heads of a few labels stay
#: sparse; the budget rule decides the rest).
MIN_SIDE = 16


def factorise(
    tau: torch.Tensor, rank: int, widths: tuple[int, ...], dtype: str
) -> Iterator[tuple[int, ValueSpec, LowRank, float]]:
    """Rounded factors of each rank 1..``rank`` and width of ``widths`` of a matrix τ, with the
    squared norm of what each leaves (τ − A·Bᵀ as the decoder rebuilds it). A = U·√S rounded,
    B refitted to the rounded A by least squares and rounded (as ``lowrank``).
    # tau: (m, n) float32"""
    t = tau.to(torch.float64)
    q = rank + OVERSAMPLE
    if 4 * q > min(t.shape):
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        v = vh.mT
    else:  # randomised, seeded: the decomposition is the encoder's alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(t, q=q, niter=POWER_ITERATIONS)
    total = float(torch.sum(t**2))
    for r in range(1, min(rank, int(s.numel())) + 1):
        root = s[:r].sqrt()
        for bits in widths:
            spec = ValueSpec.from_bits(bits, dtype)
            a = spec.round((u[:, :r] * root).reshape(-1).float()).reshape(-1, r).double()
            gram = a.mT @ a  # (r, r)
            ta = t.mT @ a  # (n, r)
            # B refitted to the rounded A: the normal equations of argmin ‖A·Bᵀ − τ‖
            b = torch.linalg.solve(gram, ta.mT).mT if bool(gram.diagonal().all()) else v[:, :r]
            if not bool(torch.isfinite(b).all()):
                b = v[:, :r] * root
            b = spec.round(b.reshape(-1).float()).reshape(-1, r).double()
            # ‖τ − A·Bᵀ‖² = ‖τ‖² − 2·⟨τᵀA, B⟩ + ⟨AᵀA, BᵀB⟩, without the m×n product
            left = total - 2 * float(torch.sum(ta * b)) + float(torch.sum(gram * (b.mT @ b)))
            yield r, spec, LowRank(a.float(), b.float()), max(left, 0.0)


def residual_rate(budget: float, factor_bits: float, numel: int, value_bits: float) -> float:
    """The residual's keep rate once ``factor_bits`` of factors are paid from a tensor's
    ``budget`` (stored bits), each kept value costing ``value_bits``."""
    return (budget - factor_bits) / (numel * value_bits)


def section_bits(values: torch.Tensor, spec: ValueSpec) -> int:
    """Stored bits of one values section (codebook and zstd included)."""
    return 8 * len(encode_values(values.reshape(-1), spec.coding, spec.bits)[0])


def dare_selection(seed: int, name: str, tau: torch.Tensor, rate: float) -> Selection:
    """DARE's seeded selection of a flat τ at ``rate``, rescaled by 1/rate."""
    key = rng.tensor_key(seed, name)
    limit = rng.rate_limit(rate)
    positions, _ = rng.seeded_positions(key, tau.numel(), limit, limit)
    idx = torch.from_numpy(positions)
    values = tau.cpu()[idx] * (1.0 / rate)
    return Selection(
        positions.astype(np.int64), values.to(torch.float32), Seeded(key, limit, limit)
    )


@dataclass
class HybridFitted(Fitted):
    keep: float = DEFAULT_KEEP
    rank: int = DEFAULT_RANK
    widths: tuple[int, ...] = DEFAULT_FACTOR_BITS
    seed: int = 0
    #: per tensor, each (rank, width)'s factors, the norm they leave and their coded bits:
    #: they do not depend on the keep, so ``auto`` shares one cache across its candidates
    cache: dict[str, list[tuple[int, ValueSpec, LowRank, float, int]]] | None = None

    def _choices(
        self, plan: TensorPlan, tau: torch.Tensor
    ) -> list[tuple[int, ValueSpec, LowRank, float, int]]:
        if self.cache is not None and plan.name in self.cache:
            return self.cache[plan.name]
        m, n = int(plan.shape[0]), int(plan.shape[1])
        out = [
            (r, fspec, f, left, section_bits(f.a, fspec) + section_bits(f.b, fspec))
            for r, fspec, f, left in factorise(
                tau.reshape(m, n), self.rank, self.widths, plan.dtype
            )
        ]
        if self.cache is not None:
            self.cache[plan.name] = out
        return out

    def plan_factors(
        self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec, dare: Selection
    ) -> tuple[ValueSpec, LowRank, float] | None:
        """The factors worth storing for one tensor and the residual's rate they leave (None:
        DARE's selection ``dare`` at the keep does better). # tau: (numel,)"""
        shape = plan.shape
        if len(shape) != 2 or min(shape) < MIN_SIDE or self.rank < 1 or dare.values.numel() == 0:
            return None
        # the budget is what DARE at this keep stores; a kept value costs what DARE's do
        budget = section_bits(dare.values, spec)
        per_value = budget / dare.values.numel()
        err = (1 / self.keep - 1) * float(torch.sum(tau.double() ** 2))  # DARE's, r = 0
        best: tuple[int, ValueSpec, LowRank, float] | None = None
        m, n = int(shape[0]), int(shape[1])
        for r, fspec, f, left, cost in self._choices(plan, tau):
            rate = residual_rate(budget, cost, m * n, per_value)
            if rate > 0 and (1 / rate - 1) * left < err:
                err, best = (1 / rate - 1) * left, (r, fspec, f, rate)
        if best is None:
            return None
        r, fspec, factors, rate = best
        self.result.setdefault("factored", {})[plan.name] = {
            "rank": r,
            "bits": fspec.bits,
            "rate": round(rate, 6),
        }
        return fspec, factors, rate

    def select(self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec) -> Selection | Hybrid:
        dare = dare_selection(self.seed, plan.name, tau, self.keep)
        planned = self.plan_factors(plan, tau, spec, dare)
        if planned is None:
            return dare
        fspec, factors, rate = planned
        residual = tau - lowrank_rows(factors, 0, plan.shape[0]).reshape(-1)
        return Hybrid(factors, dare_selection(self.seed, plan.name, residual, rate), fspec)


class HybridMethod(Method):
    """τ ≈ A·Bᵀ + DARE(τ − A·Bᵀ) per matrix, the rank chosen by the error it leaves."""

    name = "hybrid"
    paper = "https://arxiv.org/abs/2311.03099"

    def __init__(
        self,
        keep: float = DEFAULT_KEEP,
        rank: int = DEFAULT_RANK,
        factor_bits: tuple[int, ...] | list[int] | int = DEFAULT_FACTOR_BITS,
    ) -> None:
        self.keep = check_keep(keep)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise InvalidArgument(f"`rank` must be a whole number ≥ 0 (got {rank!r})")
        widths = (factor_bits,) if isinstance(factor_bits, int) else tuple(factor_bits)
        if not widths or any(b not in FACTOR_BITS for b in widths):
            raise InvalidArgument(
                f"`factor_bits` must be among {FACTOR_BITS}, one or several (got {factor_bits!r})"
            )
        self.rank = rank
        self.widths = tuple(sorted(set(widths)))

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        params: dict[str, Any] = {
            "keep": self.keep,
            "rank": self.rank,
            "factor_bits": list(self.widths),
            "seed": ctx.seed,
        }
        return HybridFitted(
            params=params,
            result={"factored": {}},
            keep=self.keep,
            rank=self.rank,
            widths=self.widths,
            seed=ctx.seed,
        )


class _Residuals:
    """The workspace as ``nps-seeded`` sees it under the factors: τ − A·Bᵀ where factored."""

    def __init__(self, ws: Workspace, residuals: dict[str, torch.Tensor]) -> None:
        self.delta_plans = ws.delta_plans
        self._residuals = residuals

    def load_taus(self) -> dict[str, torch.Tensor]:
        return self._residuals


class _OnFactors:
    """The evaluator as ``nps-seeded`` sees it under the factors: each delta it applies lands
    on A·Bᵀ (a factored tensor is then written whole, as a dense delta)."""

    def __init__(self, ev: Evaluator, low: dict[str, torch.Tensor]) -> None:
        self._ev = ev
        self._low = low

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ev, name)

    def apply(self, name: str, delta: torch.Tensor | None) -> None:
        low = self._low.get(name)
        if low is None:
            self._ev.apply(name, delta)
        else:
            self._ev.apply(name, low if delta is None else low + delta.to(low))

    def apply_sparse(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        low = self._low.get(name)
        if low is None:
            self._ev.apply_sparse(name, index, values)
            return
        delta = low.clone()
        delta[index.to(delta.device)] += values.to(delta)
        self._ev.apply(name, delta)


@dataclass
class HybridSeededFitted(Fitted):
    planned: dict[str, tuple[ValueSpec, LowRank]] | None = None
    residual: Fitted | None = None

    def select(self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec) -> Selection | Hybrid:
        assert self.planned is not None and self.residual is not None
        got = self.planned.get(plan.name)
        if got is None:
            sel = self.residual.select(plan, tau, spec)
            assert isinstance(sel, Selection)
            return sel
        fspec, factors = got
        residual = tau - lowrank_rows(factors, 0, plan.shape[0]).reshape(-1)
        sel = self.residual.select(plan, residual, spec)
        assert isinstance(sel, Selection)
        return Hybrid(factors, sel, fspec)


class HybridSeeded(Method):
    """``hybrid``'s factors, then ``nps-seeded``'s search on what they leave.

    The factors are chosen tensor by tensor as ``hybrid`` chooses them (at DARE's budget for
    ``keep``); the residual gets the rest of the budget, r' = keep − (factor bits)/(D·value
    bits) overall, and ``nps-seeded`` searches its per-group rates and scales at r' with every
    candidate evaluated on top of the factors. ``options`` go to ``nps-seeded``."""

    name = "hybrid-seeded"
    paper = "https://arxiv.org/abs/2505.18713"
    searches = True

    def __init__(
        self,
        keep: float = DEFAULT_KEEP,
        rank: int = DEFAULT_RANK,
        factor_bits: tuple[int, ...] | list[int] | int = DEFAULT_FACTOR_BITS,
        **options: Any,
    ) -> None:
        self.factors = HybridMethod(keep, rank, factor_bits)
        self.keep = self.factors.keep
        NpsSeeded(keep=self.keep, **options)  # the options are checked now, not after the SVDs
        self.options = options

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        chooser = self.factors.fit(ws, ctx)
        assert isinstance(chooser, HybridFitted)
        taus = ws.load_taus()
        planned: dict[str, tuple[ValueSpec, LowRank]] = {}
        residuals: dict[str, torch.Tensor] = {}
        low: dict[str, torch.Tensor] = {}
        spent = 0.0  # value bits the factors take from the budget
        total = 0
        for plan in ws.delta_plans:
            tau = taus[plan.name]
            total += tau.numel()
            spec = ValueSpec.from_bits(ctx.value_bits, plan.dtype)
            dare = dare_selection(ctx.seed, plan.name, tau, self.keep)
            got = chooser.plan_factors(plan, tau, spec, dare)
            if got is None:
                residuals[plan.name] = tau
                continue
            fspec, factors, rate = got
            planned[plan.name] = (fspec, factors)
            lr = lowrank_rows(factors, 0, plan.shape[0]).reshape(-1)
            residuals[plan.name] = tau - lr
            low[plan.name] = lr.to(ctx.device)
            spent += (self.keep - rate) * tau.numel()  # in kept entries at DARE's value cost
        keep = max((self.keep * total - spent) / total, 1e-6)
        inner = FitContext(
            keep=keep,
            value_bits=ctx.value_bits,
            seed=ctx.seed,
            evaluator=None if ctx.evaluator is None else _OnFactors(ctx.evaluator, low),
            progress=ctx.progress,
        )
        residual = NpsSeeded(keep=keep, **self.options).fit(
            cast(Workspace, _Residuals(ws, residuals)), inner
        )
        ctx.evaluations += inner.evaluations
        return HybridSeededFitted(
            params={**self.factors_params(ctx), "residual": residual.params},
            result={
                "factored": chooser.result.get("factored", {}),
                "residual_keep": keep,
                "residual": residual.result,
            },
            trace=residual.trace,
            notes=residual.notes,
            planned=planned,
            residual=residual,
        )

    def factors_params(self, ctx: FitContext) -> dict[str, Any]:
        f = self.factors
        return {"keep": self.keep, "rank": f.rank, "factor_bits": list(f.widths), "seed": ctx.seed}

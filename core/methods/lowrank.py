"""``lowrank``: each 2-D task vector as two factors, τ ≈ A·Bᵀ, the rank chosen tensor by tensor.

A merged LoRA fine-tune's τ is exactly low-rank in the adapted matrices and zero elsewhere
(plus the rounding of the fine-tune's dtype); a sparse delta is the wrong shape for it. The
delta-compression work on large language models stores singular vectors the same way:

- Ping et al., "Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision for Large
  Language Models", NeurIPS 2024, https://arxiv.org/abs/2406.08903
- Yang et al., "ImPart: Importance-Aware Delta-Sparsification for Improved Model Compression
  and Merging in LLMs", ACL 2025, https://arxiv.org/abs/2504.13237
- Huang et al., "Seeing Delta Parameters as JPEG Images: Data-Free Delta Compression with
  Discrete Cosine Transform" (Delta-DCT), 2025, https://arxiv.org/abs/2503.06676

Per 2-D tensor the rank is, first, the smallest whose residual ‖τ − τ_r‖² is within the
fine-tune's own rounding, Σ ulp(w)²/2 over its weights w (half an ulp of rounding in the
fine-tune's dtype and half in τ's subtraction, squared): an exact-rank τ — a merged LoRA, in
fp32 or rounded to bf16 — then comes back at its own rank, not truncated by ``energy`` (a rank
retaining 99% of a rank-8 LoRA's energy lost up to 40% of its largest entry) nor inflated by
the bf16 rounding noise (full-rank, and often more than 1% of the energy of a small τ, so an
energy rank would run into the cap). Where no rank under the cap gets there (a full fine-tune's
τ), the rank is the smallest that retains ``energy`` of τ's squared Frobenius norm;
``max_rank`` truncates it (a fixed rank where the energy needs more). The factors are stored
only where they cost fewer values than the entries the tensor would otherwise keep,
r·(m + n) < kept; every other tensor (1-D ones,
full-rank ones) falls back to a sparse selection of its top ``keep`` entries of |τ| (with the
default keep of 1, every changed entry). The singular value decomposition runs one tensor at a
time on ``cuda`` when present: exact for small matrices, randomised (seeded) where the rank cap
is far below the matrix's size. The factors are balanced (A = U·√S, B = V·√S, which keeps
both in half precision's range) and B is refitted by least squares to the rounded A, so the
rounding of one factor is not compounded by the other's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.device import pick_device
from core.errors import InvalidArgument
from core.methods.base import FitContext, Fitted, Method, check_keep, from_mask, keep_count
from core.params import DEFAULT_LOWRANK_ENERGY, DEFAULT_LOWRANK_KEEP
from core.taskvector import TensorPlan
from core.tensor_codec import LowRank, Selection, ValueSpec
from core.workspace import Workspace

#: Extra columns of a randomised decomposition beyond the rank cap, and its power iterations.
OVERSAMPLE = 10
POWER_ITERATIONS = 4
#: Below this many columns (or with a cap above a quarter of them) the decomposition is exact.
EXACT_SVD_MAX = 1024


def factor_spec(spec: ValueSpec) -> ValueSpec:
    """How the factors are coded: half precision is always ``f16`` (its 10-bit mantissa, not
    bfloat16's 7: the balanced factors stay well inside its range); other widths as asked."""
    return ValueSpec("f16", 16) if spec.bits == 16 else spec


def rounding_floor(w: torch.Tensor) -> float:
    """Σ ulp(w)²/2 over the weights ``w`` (in their own dtype): the squared error a τ of these
    weights carries from rounding alone (half an ulp from the weights' rounding, half from the
    subtraction of the base), below which a rank-r residual is indistinguishable from it."""
    info = torch.finfo(w.dtype)
    x = w.detach().to(torch.float64).abs().clamp_min(info.tiny).reshape(-1)
    _, exp = torch.frexp(x)  # x = mantissa · 2^exp, mantissa in [0.5, 1)
    ulp = torch.ldexp(torch.full_like(x, info.eps), exp - 1)  # spacing of the dtype at |w|
    return float(torch.sum(ulp**2)) / 2


def rank_cap(shape: tuple[int, ...], kept: int) -> int:
    """The largest rank whose factors store fewer values than ``kept`` (0: none pays)."""
    m, n = shape
    return min(max(math.ceil(kept / (m + n)) - 1, 0), m, n)


def _svd(t: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m, q'), S (q',), V (n, q') of the leading q' ≥ min(q, rank) singular triplets."""
    m, n = t.shape
    if min(m, n) <= EXACT_SVD_MAX or 4 * q > min(m, n):
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        return u, s, vh.mH
    devices = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(t, q=min(q + OVERSAMPLE, min(m, n)), niter=POWER_ITERATIONS)
    return u, s, v


@dataclass
class LowRankFitted(Fitted):
    keep: float = DEFAULT_LOWRANK_KEEP
    energy: float = DEFAULT_LOWRANK_ENERGY
    max_rank: int | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the fine-tune's tensor by name (for :func:`rounding_floor`); None: energy ranks only
    weights: Callable[[str], torch.Tensor] | None = None

    def select(self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec) -> Selection | LowRank:
        nonzero = int(torch.count_nonzero(tau))
        kept = min(keep_count(self.keep, plan.numel), nonzero)
        factors = self._factor(plan, tau, kept, spec) if len(plan.shape) == 2 else None
        ranks: dict[str, int] = self.result.setdefault("ranks", {})
        if factors is not None:
            ranks[plan.name] = int(factors.a.shape[1])
            self.result["factor_values"] = self.result.get("factor_values", 0) + int(
                factors.a.numel() + factors.b.numel()
            )
            return factors
        self.result["sparse_tensors"] = self.result.get("sparse_tensors", 0) + 1
        if kept >= nonzero:
            return from_mask(tau, tau != 0)
        top = torch.topk(tau.abs(), kept, sorted=False).indices
        mask = torch.zeros(plan.numel, dtype=torch.bool)
        mask[top] = True
        return from_mask(tau, mask)

    def _factor(
        self, plan: TensorPlan, tau: torch.Tensor, kept: int, spec: ValueSpec
    ) -> LowRank | None:
        """The factors of one matrix's τ, or None where a sparse selection costs less."""
        cap = rank_cap((plan.shape[0], plan.shape[1]), kept)
        if cap < 1:
            return None
        q = cap if self.max_rank is None else min(cap, self.max_rank)
        # float64: the factors' half-precision rounding then does not depend on the last bits
        # a threaded or blocked LAPACK leaves, so the same τ writes the same bytes
        t = tau.reshape(plan.shape).to(self.device, torch.float64)  # (m, n)
        total = float(torch.sum(t**2))
        u, s, v = _svd(t, q, self.seed)
        kept_energy = torch.cumsum(s[:q] ** 2, 0)  # (q,)
        floor = None if self.weights is None else rounding_floor(self.weights(plan.name))
        exact = (
            torch.nonzero(total - kept_energy <= floor).reshape(-1)
            if floor is not None
            else torch.empty(0, dtype=torch.long)
        )
        reached = torch.nonzero(kept_energy / total >= self.energy - 1e-12).reshape(-1)
        if exact.numel():
            # τ within its own rounding at this rank: an exact-rank τ, kept whole
            r = int(exact[0]) + 1
            self.result["exact_rank_tensors"] = self.result.get("exact_rank_tensors", 0) + 1
        elif reached.numel():
            r = int(reached[0]) + 1
        elif self.max_rank is not None and self.max_rank <= cap:
            r = min(self.max_rank, int(s.numel()))  # truncated at the rank asked for
        else:
            return None  # the energy needs more values than a sparse τ holds
        root = s[:r].sqrt()
        fspec = factor_spec(spec)
        a = fspec.round((u[:, :r] * root).reshape(-1)).reshape(-1, r).to(t)  # (m, r)
        # B refitted to the rounded A: argmin ‖A·Bᵀ − τ‖ (A has full column rank r)
        b = torch.linalg.lstsq(a, t).solution.mT  # (n, r)
        if not bool(torch.isfinite(b).all()):
            b = v[:, :r] * root
        b = fspec.round(b.reshape(-1)).reshape(-1, r)
        return LowRank(a.to("cpu", torch.float32), b.to("cpu", torch.float32))


class LowRankMethod(Method):
    """τ ≈ A·Bᵀ per 2-D tensor (rank by retained energy); the rest sparse, as ``keep`` says."""

    name = "lowrank"
    paper = "https://arxiv.org/abs/2406.08903"

    def __init__(
        self,
        keep: float = DEFAULT_LOWRANK_KEEP,
        energy: float = DEFAULT_LOWRANK_ENERGY,
        max_rank: int | None = None,
        device: str | None = None,
    ) -> None:
        """``device``: where the decompositions run (default: the evaluator's device, else
        ``cuda`` when present); the stored factors can differ in their last bits by device."""
        self.keep = check_keep(keep)
        if not (isinstance(energy, int | float) and 0 < energy <= 1 and math.isfinite(energy)):
            raise InvalidArgument(
                f"`energy` must be in (0, 1] (got {energy!r}); e.g. 0.99 keeps the rank that "
                "retains 99% of each tensor's squared norm"
            )
        if max_rank is not None and (
            isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
        ):
            raise InvalidArgument(f"`max_rank` must be a whole number ≥ 1 (got {max_rank!r})")
        self.energy = float(energy)
        self.max_rank = max_rank
        if device not in (None, "cpu", "cuda"):
            raise InvalidArgument(f"`device` must be cpu or cuda (got {device!r})")
        self.device = None if device is None else torch.device(device)

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        if self.device is not None:
            device = self.device
        elif ctx.evaluator is not None:
            device = ctx.device
        else:
            device = pick_device()
        params: dict[str, Any] = {"keep": self.keep, "energy": self.energy}
        if self.max_rank is not None:
            params["max_rank"] = self.max_rank
        return LowRankFitted(
            params=params,
            result={
                "ranks": {},
                "factor_values": 0,
                "sparse_tensors": 0,
                "exact_rank_tensors": 0,
            },
            keep=self.keep,
            energy=self.energy,
            max_rank=self.max_rank,
            seed=ctx.seed,
            device=device,
            weights=ws.ft.get,
        )

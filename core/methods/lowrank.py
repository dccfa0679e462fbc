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

Per 2-D tensor the rank is, first, that of τ's signal above its own rounding noise: the count
of singular values above ``NOISE_EDGE`` times the largest one rounding noise alone would reach
(:func:`noise_edge` of the variances ulp(w)²/12 of the fine-tune's weights w in their dtype),
where the residual beyond that rank is no more than ``NOISE_RESIDUAL`` times the noise's energy. An
exact-rank τ — a merged LoRA, in fp32 or rounded to bf16 — then comes back at its own rank:
``energy`` would truncate it in fp32 (retaining 99% of a rank-4 LoRA's energy lost up to 40% of
its largest entry) and inflate it in bf16 wherever the full-rank rounding noise holds more than
1 − ``energy`` of τ's energy, and a residual test cannot see a weak 8th component that still decides
a third of the weights' last bits (on a real rank-8 MiniLM LoRA merged in bf16, its weakest σ₈
stood at 2.0× σ·(√m + √n), while the rounding noise of the 384×1536 ``output.dense`` reached
2.8× that: a few outlier columns of large weights round coarsely; against
:func:`noise_edge`, which accounts for them, the noise reached 0.81× and the weakest signal
1.56×). Scaling τ's rows and columns by the noise's first (rank does not change) separated
them further in bf16 (0.96× / 1.97×) but found up to 54 "signal" ranks in a rank-32 LoRA
merged in fp32, whose τ carries the merge's own float32 arithmetic error beside the weights'
rounding; not used. Where that fails (a full fine-tune's
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
#: A singular value is signal above this multiple of rounding noise's reach (:func:`noise_edge`):
#: a real rank-8 MiniLM LoRA merged in bf16 had its rounding noise's largest at ≤ 0.81× and
#: its weakest signal at 1.56× (fp32: ≤ 0.81× and ≥ 99×).
NOISE_EDGE = 1.1
#: ... where the energy beyond the signal is no more than this multiple of the noise's.
NOISE_RESIDUAL = 1.5
#: Below this many columns (or with a cap above a quarter of them) the decomposition is exact.
EXACT_SVD_MAX = 1024


def factor_spec(spec: ValueSpec) -> ValueSpec:
    """How the factors are coded: half precision is always ``f16`` (its 10-bit mantissa, not
    bfloat16's 7: the balanced factors stay well inside its range); other widths as asked."""
    return ValueSpec("f16", 16) if spec.bits == 16 else spec


def rounding_variance(w: torch.Tensor) -> torch.Tensor:
    """ulp(w)²/12 for each weight of ``w`` (in its own dtype), float64 of w's shape: the variance
    of rounding a value to it (uniform within half an ulp), which a τ of these weights carries."""
    info = torch.finfo(w.dtype)
    wide = torch.float64 if w.dtype == torch.float64 else torch.float32  # exact for w's values
    x = w.detach().to(wide).abs().clamp_min(info.tiny)
    _, exp = torch.frexp(x)  # x = mantissa · 2^exp, mantissa in [0.5, 1)
    # ulp = eps · 2^(exp-1), the spacing of the dtype at |w|; ulp²/12 as (eps²/12) · 4^(exp-1),
    # the same float64 values as squaring ulp (scaling by a power of two does not round)
    return torch.exp2((2 * (exp - 1)).to(torch.float64)) * (info.eps**2 / 12)


def noise_edge(var: torch.Tensor) -> float:
    """The reach of the largest singular value of independent noise with entry variances
    ``var`` (m, n): the largest row's and the largest column's root energy, added (σ·(√m + √n)
    for identically distributed noise; Bandeira & van Handel, "Sharp nonasymptotic bounds on
    the norm of random matrices with independent entries", Ann. Probab. 2016). A column of
    large weights — BERT's outlier dimensions — rounds coarsely and lifts it."""
    return math.sqrt(float(var.sum(1).max())) + math.sqrt(float(var.sum(0).max()))


def signal_rank(s: torch.Tensor, total: float, var: torch.Tensor) -> int:
    """The rank of τ's signal above its rounding noise (entry variances ``var``): the count of
    singular values ``s`` (descending, τ's leading ones) above ``NOISE_EDGE``·:func:`noise_edge`,
    when the energy left beyond them (of ``total``) is no more than ``NOISE_RESIDUAL`` times the
    noise's; else 0."""
    m, n = var.shape
    r = int(torch.count_nonzero(s > NOISE_EDGE * noise_edge(var)))
    if r == 0 or (r >= s.numel() and r < min(m, n)):
        return 0  # no signal, or more than was computed: not an exact rank
    left = total - float(torch.sum(s[:r] ** 2))
    return r if left <= NOISE_RESIDUAL * float(var.sum()) else 0


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
    return _svd_randomised(t, q, seed)


def _svd_randomised(
    t: torch.Tensor, q: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_svd`'s randomised decomposition (seeded; ``OVERSAMPLE`` extra columns)."""
    devices = [t.device] if t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch.svd_lowrank(t, q=min(q + OVERSAMPLE, *t.shape), niter=POWER_ITERATIONS)


#: ``auto`` judges ``lowrank`` only where τ looks exactly low-rank (:func:`looks_low_rank`): of the
#: ``PROBE_TENSORS`` matrices holding most of τ's energy, at least half have a signal rank above
#: rounding noise (:func:`signal_rank`) of at most ``PROBE_RANK``. A full fine-tune's τ has none
#: (its singular values decay smoothly into the rounding noise, far past 64 on MiniLM's 384×384
#: matrices); a merged LoRA's adapted matrices all have one (the adapter's rank).
PROBE_RANK = 64
PROBE_TENSORS = 8
#: ... each decomposition randomised above this many entries (an exact one of MiniLM's
#: 30522×384 word embeddings took seconds; its 384×1536 matrices, a tenth of one)
PROBE_EXACT_MAX = 1 << 22


def probe_ranks(
    ws: Workspace, *, seed: int = 0, device: torch.device | None = None
) -> dict[str, int]:
    """Signal ranks (:func:`signal_rank`; 0: none found up to ``PROBE_RANK``) of the
    ``PROBE_TENSORS`` 2-D delta tensors with the largest ‖τ‖, one decomposition each of
    ``PROBE_RANK`` leading triplets (randomised where the matrix is large): a cheap look, tensor
    at a time, before any factor is fitted."""
    energy = {}
    plans = [p for p in ws.delta_plans if len(p.shape) == 2]
    for plan in plans:
        energy[plan.name] = sum(float(torch.sum(t.double() ** 2)) for _, t in ws.tau_slices(plan))
    top = sorted((p for p in plans if energy[p.name] > 0), key=lambda p: -energy[p.name])
    ranks: dict[str, int] = {}
    for plan in top[:PROBE_TENSORS]:
        t = ws.tau(plan).reshape(plan.shape).to(device or "cpu", torch.float64)  # (m, n)
        q = min(PROBE_RANK, *plan.shape)
        large = t.numel() > PROBE_EXACT_MAX and 4 * (q + OVERSAMPLE) <= min(plan.shape)
        _, s, _ = _svd_randomised(t, q, seed) if large else _svd(t, q, seed)
        var = rounding_variance(ws.ft.get(plan.name).reshape(plan.shape))  # (m, n)
        r = signal_rank(s.to(torch.float64).cpu(), energy[plan.name], var)
        ranks[plan.name] = r if r <= PROBE_RANK and r < min(plan.shape) else 0
    return ranks


def looks_low_rank(ranks: dict[str, int]) -> bool:
    """Whether :func:`probe_ranks`' answer says τ is a low-rank update (a merged LoRA)."""
    return bool(ranks) and 2 * sum(1 for r in ranks.values() if r > 0) >= len(ranks)


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
        exact = 0
        if self.weights is not None:
            var = rounding_variance(self.weights(plan.name).reshape(plan.shape))  # (m, n)
            exact = signal_rank(s.to(torch.float64).cpu(), total, var)
        energy = torch.cumsum(s[:q] ** 2, 0) / total  # (q,)
        reached = torch.nonzero(energy >= self.energy - 1e-12).reshape(-1)
        if 0 < exact <= q:
            # an exact-rank τ (signal, then rounding noise): kept whole, the noise left out
            r = exact
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

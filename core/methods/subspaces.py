"""Magnitude-rank subspaces of τ (NPS step 2) and tensor-group subspaces.

Magnitude subspaces cut the global ranking of |τ| into rank intervals. ``equal`` bins have
equal counts (the paper's default reading); ``graded`` bins are finer near the keep threshold
k = ⌈r·D⌉: boundaries at k·g^j for j = −(M/2−1) … M/2−1, so M − 1 boundaries straddle k.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from core.errors import InvalidArgument
from core.topk import coarse_histogram, cumulative_above, score_bits, top_k_cut

BINNINGS = ("equal", "graded")


def boundary_ranks(total: int, k: int, m: int, binning: str, ratio: float = 2.0) -> list[int]:
    """Ranks (exclusive ends of the top subspaces) of M magnitude subspaces, ascending.

    Returns M − 1 or fewer distinct ranks in (0, total); the last subspace ends at ``total``.
    """
    if m < 1:
        raise InvalidArgument("the number of subspaces must be at least 1")
    if binning == "equal":
        ranks = [round(total * j / m) for j in range(1, m)]
    elif binning == "graded":
        half = m // 2
        ranks = [round(k * ratio ** (j - half + 1)) for j in range(m - 1)]
    else:
        raise InvalidArgument(f"binning must be one of {BINNINGS} (got {binning!r})")
    return sorted({r for r in ranks if 0 < r < total})


@dataclass
class MagnitudeSubspaces:
    """Subspace ids of every entry plus the statistics a candidate's threshold needs."""

    ids: dict[str, torch.Tensor]  # name -> (numel,) uint8 subspace id, 0 = largest |τ|
    bounds: (
        torch.Tensor
    )  # (M + 1,) float64 |τ| value bounds: subspace m is [bounds[m+1], bounds[m])
    sizes: torch.Tensor  # (M,) int64 entries per subspace
    cum: torch.Tensor  # cumulative coarse histogram of |τ| (see topk.count_at_least)
    max_abs: float  # the largest |τ|

    @property
    def m(self) -> int:
        return int(self.sizes.numel())

    def to_cpu(self) -> MagnitudeSubspaces:
        return MagnitudeSubspaces(
            {n: t.cpu() for n, t in self.ids.items()},
            self.bounds,
            self.sizes,
            self.cum,
            self.max_abs,
        )


def magnitude_subspaces(
    taus: dict[str, torch.Tensor], k: int, m: int, binning: str
) -> MagnitudeSubspaces:
    """Assign every entry of the in-memory task vectors to a magnitude subspace."""

    def scores() -> Iterable[torch.Tensor]:
        return (t.abs() for t in taus.values())

    hist = coarse_histogram(scores()).cpu()
    total = int(hist.sum())
    ranks = boundary_ranks(total, k, m, binning)
    cut_bits = [top_k_cut(r, hist, scores).bits for r in ranks]  # descending values
    thresholds = torch.tensor(sorted(set(cut_bits)), dtype=torch.int32)  # ascending bits
    on = {t.device for t in taus.values()}
    dev_thresholds = thresholds.to(next(iter(on))) if on else thresholds
    n_sub = thresholds.numel() + 1
    ids = {}
    sizes = torch.zeros(n_sub, dtype=torch.int64)
    for name, t in taus.items():
        # entries with bits ≥ the highest threshold are subspace 0
        sid = (n_sub - 1 - torch.bucketize(score_bits(t.abs()), dev_thresholds, right=True)).to(
            torch.uint8
        )
        ids[name] = sid
        sizes += torch.bincount(sid.long(), minlength=n_sub).cpu()
    values = thresholds.view(torch.float32).double().flip(0)  # descending |τ| values
    bounds = torch.cat(
        [
            torch.tensor([float("inf")], dtype=torch.float64),
            values,
            torch.zeros(1, dtype=torch.float64),
        ]
    )
    max_abs = max((float(t.abs().max()) for t in taus.values() if t.numel()), default=0.0)
    return MagnitudeSubspaces(ids, bounds, sizes, cumulative_above(hist), max_abs)


_GROUPS: list[tuple[str, str]] = [
    ("embed", r"embed|wte|wpe|word_embeddings|position_embeddings|token_type"),
    ("norm", r"norm|ln_|\.ln\d|layernorm"),
    ("attn_in", r"query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|Wqkv"),
    ("attn_out", r"attention\.output|o_proj|out_proj|attn\.c_proj|self_attn\.dense"),
    ("mlp_in", r"intermediate|up_proj|gate_proj|fc1|c_fc|w1|w3|gate_up"),
    ("mlp_out", r"output\.dense|down_proj|fc2|mlp\.c_proj|w2"),
]


def tensor_group(name: str, ndim: int) -> str:
    """The role of a tensor, from its name: embed, norm, bias, attn_in, attn_out, mlp_in,
    mlp_out or other. The decoder never needs it: it only picks a tensor's keep rate."""
    lowered = name.lower()
    for group, pattern in _GROUPS[:2]:
        if re.search(pattern, lowered):
            return group
    if ndim <= 1:
        return "bias"
    for group, pattern in _GROUPS[2:]:
        if re.search(pattern, lowered):
            return group
    return "other"

"""Cheap candidates: per-tensor groups of entries sorted once, selected by prefix.

Every search here keeps, inside each (tensor, subspace) group, the entries whose sort key is
below a per-subspace threshold — the largest |τ| for NPS (key = −|τ|), the smallest seeded
draws for ``nps-seeded`` (key = u). Sorting each group once turns a candidate into a few
binary searches and one gather of the kept entries, instead of several passes over every
entry of τ per evaluation; with τ carried in the same order, a candidate's kept values are
slices too, not a gather.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch


@dataclass
class PrefixIndex:
    """One tensor's entries grouped by subspace and sorted by key within each group."""

    perm: torch.Tensor  # (numel,) int64: entry indices, group by group, key ascending
    keys: torch.Tensor  # (numel,) float32: the keys in that order
    starts: torch.Tensor  # (G + 1,) int64: group g occupies perm[starts[g]:starts[g+1]]
    groups: torch.Tensor  # (G,) int64: the subspace id of each group
    values: torch.Tensor  # (numel,) float32: the entries' values (τ) in perm's order
    _keys_np: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._keys_np = self.keys.cpu().numpy()  # binary searches run on the host: M tiny ones
        self._bounds = [
            (int(self.starts[g]), int(self.starts[g + 1]), int(self.groups[g]))
            for g in range(self.groups.numel())
        ]

    @classmethod
    def build(cls, sid: torch.Tensor, key: torch.Tensor, values: torch.Tensor) -> PrefixIndex:
        """Index a tensor from its entries' subspace ids, keys and values (τ, carried in the
        same order so that kept values are slices). # sid, key, values: (numel,)"""
        # sort by (sid, key): key order first, then a stable sort by sid
        order = torch.argsort(key, stable=True)
        if sid.numel() and bool(sid.min() != sid.max()):  # one subspace: already in order
            order = order[torch.argsort(sid[order].long(), stable=True)]
        sorted_sid = sid[order].long()
        groups, counts = torch.unique_consecutive(sorted_sid, return_counts=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts.cpu(), 0)])
        return cls(order, key[order].contiguous(), starts, groups.cpu(), values[order].contiguous())

    def _spans(self, limits: np.ndarray, inclusive: bool) -> list[tuple[int, int, int]]:
        """(start, count, subspace id) of each group's kept prefix (groups keeping none left
        out)."""
        side: Literal["left", "right"] = "right" if inclusive else "left"
        spans = []
        for a, b, gid in self._bounds:
            n = int(np.searchsorted(self._keys_np[a:b], np.float32(limits[gid]), side=side))
            if n:
                spans.append((a, n, gid))
        return spans

    def select(
        self, limits: np.ndarray, scales: np.ndarray, *, inclusive: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries whose key is < ``limits[subspace]`` (≤ if inclusive), group by group, with
        their values times their subspace's scale (float32 products, as ``τ[idx] · scale``).
        A tensor kept from one group is handed back as views, not copies.

        Args:
            limits: one threshold per subspace id. # (M,)
            scales: the factor of each subspace's kept values. # (M,)

        Returns:
            (kept entry indices # (kept,) int64, scaled values # (kept,) float32)
        """
        spans = self._spans(limits, inclusive)
        dev = self.perm.device
        if not spans:
            return torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, device=dev)
        parts = [
            self.values[a : a + n] * torch.tensor(float(scales[g]), dtype=torch.float32, device=dev)
            for a, n, g in spans
        ]
        if len(spans) == 1:
            a, n, _ = spans[0]
            return self.perm[a : a + n], parts[0]
        return torch.cat([self.perm[a : a + n] for a, n, _ in spans]), torch.cat(parts)

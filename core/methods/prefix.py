"""Cheap candidates: per-tensor groups of entries sorted once, selected by prefix.

Every search here keeps, inside each (tensor, subspace) group, the entries whose sort key is
below a per-subspace threshold — the largest |τ| for NPS (key = −|τ|), the smallest seeded
draws for ``nps-seeded`` (key = u). Sorting each group once turns a candidate into a few
binary searches and one gather of the kept entries, instead of several passes over every
entry of τ per evaluation.
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
    _keys_np: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._keys_np = self.keys.cpu().numpy()  # binary searches run on the host: M tiny ones
        self._bounds = [
            (int(self.starts[g]), int(self.starts[g + 1]), int(self.groups[g]))
            for g in range(self.groups.numel())
        ]

    @classmethod
    def build(cls, sid: torch.Tensor, key: torch.Tensor) -> PrefixIndex:
        """Index a tensor from its entries' subspace ids and keys. # sid, key: (numel,)"""
        # sort by (sid, key): key order first, then a stable sort by sid
        order = torch.argsort(key, stable=True)
        if sid.numel() and bool(sid.min() != sid.max()):  # one subspace: already in order
            order = order[torch.argsort(sid[order].long(), stable=True)]
        sorted_sid = sid[order].long()
        groups, counts = torch.unique_consecutive(sorted_sid, return_counts=True)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts.cpu(), 0)])
        return cls(order, key[order].contiguous(), starts, groups.cpu())

    def select(
        self, limits: np.ndarray, scales: np.ndarray | None = None, *, inclusive: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Entries whose key is < ``limits[subspace]`` (≤ if inclusive), group by group.

        Args:
            limits: one threshold per subspace id. # (M,)
            scales: optional per-subspace factor to hand back per kept entry. # (M,)

        Returns:
            (kept entry indices # (kept,) int64, their subspace's scale # (kept,) or None)
        """
        side: Literal["left", "right"] = "right" if inclusive else "left"
        parts: list[torch.Tensor] = []
        factors: list[float] = []
        counts: list[int] = []
        for a, b, gid in self._bounds:
            n = int(np.searchsorted(self._keys_np[a:b], np.float32(limits[gid]), side=side))
            if n:
                parts.append(self.perm[a : a + n])
                counts.append(n)
                factors.append(float(scales[gid]) if scales is not None else 1.0)
        dev = self.perm.device
        if not parts:
            empty = torch.zeros(0, dtype=torch.int64, device=dev)
            return empty, (torch.zeros(0, device=dev) if scales is not None else None)
        idx = torch.cat(parts)
        if scales is None:
            return idx, None
        per_entry = torch.repeat_interleave(
            torch.tensor(factors, dtype=torch.float32, device=dev), torch.tensor(counts, device=dev)
        )
        return idx, per_entry

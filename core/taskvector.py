"""Task vectors, one tensor at a time: match fine-tune tensors to base tensors and plan kinds.

A task model often wraps the base under a prefix (``bert.`` in BertForSequenceClassification
over a BertModel base, ``model.`` for causal LMs); the prefix pair that matches the most
tensors wins. Tensors are then planned as:

- ``delta``: float tensor with a base twin of the same shape; its task vector τ = ft − base is
  computed in float32 (it becomes ``sparse``, ``same`` or ``lossless`` in the delta);
- ``dense``: anything else (only in the fine-tune, a changed shape, not floating point); stored
  verbatim.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from core.checkpoint import CheckpointDir
from core.constants import DTYPES, FLOAT_DTYPES
from core.errors import BaseMismatch
from core.safetensors_io import bytes_to_tensor
from core.topk import SLICE

Kind = Literal["delta", "dense"]


@dataclass(frozen=True)
class TensorPlan:
    name: str  # fine-tune tensor name
    kind: Kind
    dtype: str  # the fine-tune's dtype (reconstruction writes this)
    shape: tuple[int, ...]
    base_name: str | None = None
    reason: str = ""  # why a tensor is dense

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _prefixes(names: list[str]) -> list[str]:
    firsts = Counter(n.split(".", 1)[0] + "." for n in names if "." in n)
    return [""] + [p for p, _ in firsts.most_common(8)]


def match_prefix(ft: CheckpointDir, base: CheckpointDir) -> tuple[str, str]:
    """The (fine-tune prefix, base prefix) pair under which most tensors match by shape."""
    ft_names = list(ft.tensors)
    base_names = list(base.tensors)
    best = ("", "")
    best_count = -1
    for fp in _prefixes(ft_names):
        for bp in _prefixes(base_names):
            if fp and bp:
                continue  # one side carries the wrapper, not both
            count = 0
            for n in ft_names:
                if not n.startswith(fp):
                    continue
                ref = base.tensors.get(bp + n[len(fp) :])
                if ref is not None and ref.info.shape == ft.tensors[n].info.shape:
                    count += 1
            if count > best_count:
                best, best_count = (fp, bp), count
    return best


def plan_tensors(ft: CheckpointDir, base: CheckpointDir) -> list[TensorPlan]:
    """Plan every fine-tune tensor (file order) against the base.

    Raises:
        BaseMismatch: fewer than half of the fine-tune's parameters have a base twin.
    """
    fp, bp = match_prefix(ft, base)
    plans: list[TensorPlan] = []
    for name, ref in ft.tensors.items():
        info = ref.info
        base_ref = base.tensors.get(bp + name[len(fp) :]) if name.startswith(fp) else None
        if base_ref is None:
            plans.append(TensorPlan(name, "dense", info.dtype, info.shape, reason="not in base"))
        elif base_ref.info.shape != info.shape:
            plans.append(
                TensorPlan(name, "dense", info.dtype, info.shape, reason="shape differs from base")
            )
        elif info.dtype not in FLOAT_DTYPES or base_ref.info.dtype not in FLOAT_DTYPES:
            plans.append(
                TensorPlan(name, "dense", info.dtype, info.shape, reason="not floating point")
            )
        else:
            plans.append(TensorPlan(name, "delta", info.dtype, info.shape, base_ref.info.name))
    matched = sum(p.numel for p in plans if p.kind == "delta")
    total = sum(p.numel for p in plans)
    if total == 0 or matched * 2 < total:
        raise BaseMismatch(
            f"only {matched:,} of the fine-tune's {total:,} parameters have a tensor of the same "
            "name and shape in the base; check that the fine-tune was made from this base"
        )
    return plans


def task_vector(ft: CheckpointDir, base: CheckpointDir, plan: TensorPlan) -> torch.Tensor:
    """τ = ft − base for one ``delta`` tensor, float32, flat. # (numel,)

    Both tensors are read and widened a slice at a time into τ, so nothing but τ is held
    (reading each whole first held 2 + 2 bytes per entry beside τ's 4)."""
    tau = torch.empty(ft.tensors[plan.name].info.numel, dtype=torch.float32)
    for i, part in task_vector_slices(ft, base, plan):
        tau[i : i + part.numel()] = part
    return tau


def task_vector_slices(
    ft: CheckpointDir, base: CheckpointDir, plan: TensorPlan
) -> Iterator[tuple[int, torch.Tensor]]:
    """τ of one ``delta`` tensor as ``(offset, float32 slice)`` pairs of :data:`SLICE`
    entries, in order, each computed from slices read from both files (τ is never whole)."""
    assert plan.kind == "delta" and plan.base_name is not None
    f_info, b_info = ft.tensors[plan.name].info, base.tensors[plan.base_name].info
    f_item, b_item = DTYPES[f_info.dtype][0], DTYPES[b_info.dtype][0]
    n = f_info.numel
    for i in range(0, n, SLICE):
        k = min(SLICE, n - i)
        f = bytes_to_tensor(ft.read_bytes(plan.name, i * f_item, k * f_item), f_info.dtype, (k,))
        b = bytes_to_tensor(
            base.read_bytes(plan.base_name, i * b_item, k * b_item), b_info.dtype, (k,)
        )
        part = f.to(torch.float32)  # F32: f itself, a fresh buffer of ours
        part -= b.to(torch.float32)
        yield i, part


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, checked a slice at a time (no tensor-sized mask)."""
    flat = t.reshape(-1)
    return all(
        bool(torch.isfinite(flat[i : i + SLICE]).all()) for i in range(0, flat.numel(), SLICE)
    )

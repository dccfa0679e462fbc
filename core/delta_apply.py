"""The float arithmetic of a rebuild (torch): base pieces plus decoded deltas.

:mod:`core.reconstruct` rebuilds bytes (``same`` tensors of the base's dtype, ``dense``
tensors, ``lossless`` XOR planes at scale 1) without torch, and imports this module only for
a tensor that needs arithmetic: a sparse or lowrank delta added to the base, a dtype
conversion, or a scale λ ≠ 1. Every piece is computed elementwise in float32 and rounded once
to the stored dtype, so a rebuild is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from core.constants import DTYPES
from core.delta_format import FrameSource, TensorEntry
from core.safetensors_io import TensorInfo, bytes_to_tensor, tensor_view
from core.tensor_codec import (
    decode_hybrid,
    decode_lowrank,
    decode_sparse,
    hybrid_rows,
    lowrank_rows,
)

#: Raw bytes of elements ``[a, b)`` of a base tensor, in a fresh writable buffer.
BaseBytes = Callable[[int, int], memoryview]


def _tensor(raw: memoryview, dtype: str) -> torch.Tensor:
    return bytes_to_tensor(raw, dtype, (len(raw) // DTYPES[dtype][0],))


def converted(
    info: TensorInfo, entry: TensorEntry, base: BaseBytes
) -> Callable[[int, int], memoryview]:
    """Elements ``[a, b)`` of a ``same`` tensor stored in another dtype than the base's."""
    dtype = DTYPES[entry.dtype][1]
    return lambda a, b: tensor_view(_tensor(base(a, b), info.dtype).to(dtype))


def blend(
    before: memoryview, ft: memoryview, dtype: str, scale: float, before_dtype: str | None = None
) -> memoryview:
    """θ_pre + λ·(θ_ft − θ_pre) of one piece in ``dtype``; ``before`` is given as bytes of
    ``before_dtype`` (the base's, default ``dtype``), ``ft`` as bytes of ``dtype``."""
    b32 = _tensor(before, before_dtype or dtype).to(torch.float32)
    f32 = _tensor(ft, dtype).to(torch.float32)
    return tensor_view((b32 + scale * (f32 - b32)).to(DTYPES[dtype][1]))


def sparse_maker(
    entry: TensorEntry,
    reader: FrameSource,
    info: TensorInfo,
    base: BaseBytes,
    scale: float,
    first: int,
) -> Callable[[int, int], memoryview]:
    """Elements ``[a, b)`` of a sparse tensor, called with increasing adjacent ranges from
    element ``first`` on: the kept entries falling in the range added to the base."""
    dtype = DTYPES[entry.dtype][1]
    positions, values = decode_sparse(entry, reader)
    scaled = values if scale == 1.0 else scale * values
    at = int(np.searchsorted(positions, first))

    def sparse(a: int, b: int) -> memoryview:
        nonlocal at
        i0, at = at, at + int(np.searchsorted(positions[at:], b))
        t = _tensor(base(a, b), info.dtype)
        idx = torch.from_numpy(positions[i0:at] - a)
        if info.dtype == entry.dtype:
            t[idx] = (t[idx].to(torch.float32) + scaled[i0:at]).to(dtype)
            return tensor_view(t)
        full = t.to(torch.float32)
        full[idx] += scaled[i0:at]
        return tensor_view(full.to(dtype))

    return sparse


def lowrank_maker(
    entry: TensorEntry, reader: FrameSource, info: TensorInfo, base: BaseBytes, scale: float
) -> Callable[[int, int], memoryview]:
    """Elements ``[a, b)`` of a ``lowrank`` tensor: the rows of A·Bᵀ covering them (a piece
    and at most two partial rows in memory, never the whole product) added to the base; of a
    ``hybrid`` tensor, those rows plus its residual's entries there."""
    n = entry.shape[1]
    dtype = DTYPES[entry.dtype][1]
    rows: Callable[[int, int], torch.Tensor]
    if entry.kind == "hybrid":
        factors, positions, values = decode_hybrid(entry, reader)
        rows = lambda r0, r1: hybrid_rows(factors, positions, values, r0, r1)  # noqa: E731
    else:
        low = decode_lowrank(entry, reader)
        rows = lambda r0, r1: lowrank_rows(low, r0, r1)  # noqa: E731

    def lowrank(a: int, b: int) -> memoryview:
        r0, r1 = a // n, -(-b // n)
        delta = rows(r0, r1).reshape(-1)[a - r0 * n : b - r0 * n]
        if scale != 1.0:
            delta = scale * delta
        return tensor_view((_tensor(base(a, b), info.dtype).to(torch.float32) + delta).to(dtype))

    return lowrank

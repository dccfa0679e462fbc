"""Encode one tensor's selection into frames of a delta, and decode it back.

A sparse tensor is a set of kept positions and their values. Positions are either explicit
(gap or bitmap coded) or seeded: drawn from the counter-based generator of :mod:`core.rng`,
with one coded bit for each entry whose draw falls between the two rates ``lo`` and ``hi``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core import rng
from core.delta_format import DeltaWriter, FrameSource, TensorEntry
from core.errors import InvalidDelta
from core.frames import zstd_compress, zstd_decompress
from core.positions import decode_positions, encode_positions, pack_bitmap, unpack_bitmap
from core.values import decode_values, encode_values, round_values, value_coding_for


@dataclass
class Seeded:
    """A seeded position rule: kept iff draw < lo, or lo ≤ draw < hi and its coded bit is set."""

    key: int
    lo: int  # integer draw limits, see rng.rate_limit
    hi: int
    ambiguous_keep: np.ndarray | None = None  # (n_ambiguous,) bool, in position order


@dataclass
class Selection:
    """The kept entries of one tensor: sorted positions and the values to store there."""

    positions: np.ndarray  # (nnz,) int64, strictly increasing
    values: torch.Tensor  # (nnz,) float32
    seeded: Seeded | None = None


@dataclass(frozen=True)
class ValueSpec:
    coding: str  # f32 | f16 | bf16 | q
    bits: int  # 32, 16, or 8/4/3/2 for q

    @classmethod
    def from_bits(cls, bits: int, dtype: str) -> ValueSpec:
        return cls(value_coding_for(bits, prefer_bf16=dtype == "BF16"), bits)

    def round(self, values: torch.Tensor) -> torch.Tensor:
        return round_values(values, self.coding, self.bits)


def encode_sparse(
    entry: TensorEntry,
    prefix: str,
    sel: Selection,
    spec: ValueSpec,
    writer: DeltaWriter,
    level: int,
) -> None:
    """Write a sparse tensor's one frame and fill ``entry``'s positions/values/nnz.

    The frame is the concatenation of independently zstd-compressed sections, in order:
    explicit positions, or the ambiguous-entry bitmap of seeded positions (when there is
    one), then the values. Each section's size is recorded with its parameters.
    """
    entry.kind = "sparse"
    entry.frame = writer.add(prefix, b"".join(_sparse_sections(entry, sel, spec, level)))


def _sparse_sections(
    entry: TensorEntry, sel: Selection, spec: ValueSpec, level: int
) -> list[bytes]:
    """The sections of a selection (positions or ambiguous bitmap, values); fills ``entry``'s
    nnz, positions and values."""
    entry.nnz = int(sel.positions.size)
    sections: list[bytes] = []
    if sel.seeded is None:
        coding, section, params = encode_positions(sel.positions, entry.numel, level)
        entry.positions = {"mode": "explicit", "coding": coding, "size": len(section), **params}
        sections.append(section)
    else:
        s = sel.seeded
        pos: dict[str, object] = {
            "mode": "seeded",
            "key": str(s.key),
            "lo": str(s.lo),
            "hi": str(s.hi),
        }
        if s.hi > s.lo:
            amb = s.ambiguous_keep if s.ambiguous_keep is not None else np.zeros(0, dtype=bool)
            section = zstd_compress(pack_bitmap(amb), level)
            pos["ambiguous"] = int(amb.size)
            pos["size"] = len(section)
            sections.append(section)
        entry.positions = pos
    section, vparams = encode_values(sel.values, spec.coding, spec.bits, level)
    entry.values = {"coding": spec.coding, "size": len(section), **vparams}
    sections.append(section)
    return sections


def _sections(entry: TensorEntry, frame: bytes) -> tuple[bytes, bytes]:
    """(positions or ambiguous section, values section) of a sparse tensor's frame."""
    pos, vals = entry.positions or {}, entry.values or {}
    try:
        p_size = int(pos.get("size", 0))
        v_size = int(vals["size"])
    except (KeyError, TypeError, ValueError):
        raise InvalidDelta(f"sparse tensor {entry.name!r} lacks its section sizes") from None
    if p_size < 0 or v_size < 0 or p_size + v_size != len(frame):
        raise InvalidDelta(f"the sections of {entry.name!r} do not add up to its frame")
    return frame[:p_size], frame[p_size:]


def decode_sparse(entry: TensorEntry, reader: FrameSource) -> tuple[np.ndarray, torch.Tensor]:
    """Positions (int64, sorted) and float32 values of a sparse tensor."""
    pos, vals = entry.positions, entry.values
    if pos is None or vals is None or entry.frame is None:
        raise InvalidDelta(f"sparse tensor {entry.name!r} lacks positions, values or its frame")
    if entry.nnz < 0 or entry.nnz > entry.numel:
        raise InvalidDelta(f"sparse tensor {entry.name!r} keeps more entries than it has")
    return _decode_sparse_frame(entry, reader.frame(entry.frame))


def _decode_sparse_frame(entry: TensorEntry, frame: bytes) -> tuple[np.ndarray, torch.Tensor]:
    """Positions and values from a sparse frame's bytes (checked against ``entry``)."""
    pos, vals = entry.positions or {}, entry.values or {}
    first, values_section = _sections(entry, frame)
    numel = entry.numel
    if pos.get("mode") == "explicit":
        positions = decode_positions(str(pos.get("coding")), first, pos, entry.nnz, numel)
    elif pos.get("mode") == "seeded":
        try:
            key, lo, hi = int(pos["key"]), int(pos["lo"]), int(pos["hi"])
        except (KeyError, ValueError):
            raise InvalidDelta(f"seeded positions of {entry.name!r} are malformed") from None
        if not (0 <= lo <= hi <= 1 << 53 and 0 <= key < 1 << 64):
            raise InvalidDelta(f"seeded positions of {entry.name!r} are out of range")
        sure, amb = rng.seeded_positions(key, numel, lo, hi)
        if amb.size:
            if int(pos.get("ambiguous", -1)) != amb.size:
                raise InvalidDelta(f"ambiguous count of {entry.name!r} does not match its draw")
            raw = zstd_decompress(first, (amb.size + 7) // 8)
            keep = unpack_bitmap(raw, amb.size)
            positions = np.sort(np.concatenate([sure, amb[keep]]))
        else:
            positions = sure
        if positions.size != entry.nnz:
            raise InvalidDelta(f"seeded positions of {entry.name!r} do not match its count")
    else:
        raise InvalidDelta(f"unknown position mode of {entry.name!r}")
    values = decode_values(str(vals.get("coding")), values_section, vals, entry.nnz)
    return positions, values


def dense_delta(entry: TensorEntry, reader: FrameSource) -> torch.Tensor:
    """A sparse tensor's decoded delta as a dense float32 tensor. # (numel,)"""
    positions, values = decode_sparse(entry, reader)
    out = torch.zeros(entry.numel, dtype=torch.float32)
    out[torch.from_numpy(positions)] = values
    return out


@dataclass
class LowRank:
    """A 2-D tensor's τ as two factors: τ ≈ A·Bᵀ with A ``(m, r)`` and B ``(n, r)``."""

    a: torch.Tensor  # (m, r) float32
    b: torch.Tensor  # (n, r) float32


@dataclass
class Hybrid:
    """A 2-D tensor's τ as low-rank factors plus a sparse selection of what they leave:
    τ ≈ A·Bᵀ + R, R kept at the selection's positions (format version 5)."""

    factors: LowRank
    residual: Selection
    factor_spec: ValueSpec  # how A and B are coded (the residual: the method's value spec)


def encode_lowrank(
    entry: TensorEntry,
    prefix: str,
    factors: LowRank,
    spec: ValueSpec,
    writer: DeltaWriter,
    level: int,
) -> None:
    """Write a low-rank tensor's one frame (A's values, then B's, each a values section as in
    :func:`encode_sparse`, row-major) and fill ``entry``'s ``rank`` and ``factors``."""
    entry.kind = "lowrank"
    entry.frame = writer.add(prefix, b"".join(_factor_sections(entry, factors, spec, level)))


def encode_hybrid(
    entry: TensorEntry,
    prefix: str,
    hybrid: Hybrid,
    spec: ValueSpec,
    writer: DeltaWriter,
    level: int,
) -> None:
    """Write a hybrid tensor's one frame: the factor sections of :func:`encode_lowrank` (coded
    as ``hybrid.factor_spec``), then the residual's sections of :func:`encode_sparse`
    (coded as ``spec``)."""
    entry.kind = "hybrid"
    sections = _factor_sections(entry, hybrid.factors, hybrid.factor_spec, level)
    sections += _sparse_sections(entry, hybrid.residual, spec, level)
    entry.frame = writer.add(prefix, b"".join(sections))


def _factor_sections(
    entry: TensorEntry, factors: LowRank, spec: ValueSpec, level: int
) -> list[bytes]:
    """A's and B's values sections; fills ``entry``'s ``rank`` and ``factors``."""
    m, n = entry.shape
    r = int(factors.a.shape[1])
    if tuple(factors.a.shape) != (m, r) or tuple(factors.b.shape) != (n, r):
        raise ValueError(f"factors of {entry.name!r} do not match its shape {entry.shape}")
    entry.rank = r
    sections: list[bytes] = []
    coded: dict[str, dict[str, object]] = {}
    for key, t in (("a", factors.a), ("b", factors.b)):
        section, params = encode_values(t.reshape(-1), spec.coding, spec.bits, level)
        coded[key] = {"coding": spec.coding, "size": len(section), **params}
        sections.append(section)
    entry.factors = coded
    return sections


def decode_lowrank(entry: TensorEntry, reader: FrameSource) -> LowRank:
    """The float32 factors of a ``lowrank`` tensor (checked against its shape and frame)."""
    if entry.frame is None:
        raise InvalidDelta(f"lowrank tensor {entry.name!r} lacks its rank, factors or frame")
    frame = reader.frame(entry.frame)
    factors, at = _decode_factors(entry, frame)
    if at != len(frame):
        raise InvalidDelta(f"the factor sections of {entry.name!r} do not add up to its frame")
    return factors


def decode_hybrid(
    entry: TensorEntry, reader: FrameSource
) -> tuple[LowRank, np.ndarray, torch.Tensor]:
    """The float32 factors of a ``hybrid`` tensor, and its residual's positions (int64, sorted)
    and float32 values."""
    if entry.frame is None or entry.positions is None or entry.values is None:
        raise InvalidDelta(f"hybrid tensor {entry.name!r} lacks its residual or its frame")
    if entry.nnz < 0 or entry.nnz > entry.numel:
        raise InvalidDelta(f"hybrid tensor {entry.name!r} keeps more entries than it has")
    frame = reader.frame(entry.frame)
    factors, at = _decode_factors(entry, frame)
    positions, values = _decode_sparse_frame(entry, frame[at:])
    return factors, positions, values


def _decode_factors(entry: TensorEntry, frame: bytes) -> tuple[LowRank, int]:
    """The factors coded at the start of ``frame``, and where their sections end."""
    f, r = entry.factors, entry.rank
    if (
        f is None
        or len(entry.shape) != 2
        or not isinstance(r, int)
        or isinstance(r, bool)
        or not 0 < r <= min(entry.shape)
    ):
        raise InvalidDelta(f"lowrank tensor {entry.name!r} lacks its rank, factors or frame")
    m, n = entry.shape
    out: list[torch.Tensor] = []
    at = 0
    for key, rows in (("a", m), ("b", n)):
        part = f.get(key)
        try:
            size = int(part["size"]) if isinstance(part, dict) else -1
        except (KeyError, TypeError, ValueError):
            size = -1
        if size < 0 or at + size > len(frame):
            raise InvalidDelta(f"the factor sections of {entry.name!r} do not fit its frame")
        assert isinstance(part, dict)
        values = decode_values(str(part.get("coding")), frame[at : at + size], part, rows * r)
        out.append(values.reshape(rows, r))
        at += size
    return LowRank(out[0], out[1]), at


def lowrank_rows(factors: LowRank, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of A·Bᵀ in float32. # (hi - lo, n)

    Summed over the rank in order, each product and each sum rounded to float32 on its own
    (no fused multiply-add, no blocked matrix product): the result does not depend on the
    rows asked for, the machine or the library, so a tensor rebuilt in pieces or from an
    offset hashes like the whole.
    """
    a = factors.a[lo:hi]  # (rows, r)
    b = factors.b  # (n, r)
    out = torch.zeros(hi - lo, b.shape[0], dtype=torch.float32)
    for k in range(a.shape[1]):
        out += a[:, k : k + 1] * b[:, k]
    return out


def hybrid_rows(
    factors: LowRank, positions: np.ndarray, values: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Rows ``[lo, hi)`` of a hybrid tensor's delta: A·Bᵀ (as :func:`lowrank_rows`) plus the
    residual's kept entries there. # (hi - lo, n)"""
    out = lowrank_rows(factors, lo, hi)
    n = factors.b.shape[0]
    i0, i1 = np.searchsorted(positions, [lo * n, hi * n])
    flat = out.reshape(-1)
    flat[torch.from_numpy(positions[i0:i1] - lo * n)] += values[i0:i1]
    return out

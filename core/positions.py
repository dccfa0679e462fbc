"""Positions of the kept entries of a sparse tensor: gap or bitmap coded, whichever is smaller.

Pure: sorted flat int64 positions in, one zstd frame out (and back). Specified in
``docs/format.md``.
"""

from __future__ import annotations

import numpy as np

from core.constants import ZSTD_LEVEL
from core.errors import InvalidArgument, InvalidDelta
from core.frames import from_planes, to_planes, zstd_compress, zstd_decompress


def _gap_width(max_gap: int) -> int:
    for w in (1, 2, 4, 8):
        if max_gap < 1 << (8 * w):
            return w
    raise InvalidArgument("gap does not fit in 64 bits")


def encode_positions(
    positions: np.ndarray, numel: int, level: int = ZSTD_LEVEL
) -> tuple[str, bytes, dict[str, int]]:
    """Code sorted flat positions of kept entries, as gaps or as a bitmap, whichever is smaller.

    Args:
        positions: strictly increasing int64 indices in ``[0, numel)``. # (n,)
        numel: number of entries in the tensor.

    Returns:
        (coding, zstd frame, params) with coding ``"gaps"`` (params: ``width``) or ``"bitmap"``.
    """
    positions = np.asarray(positions, dtype=np.int64)
    n = positions.size
    gaps = np.diff(positions, prepend=-1) - 1  # (n,)  # ≥ 0
    width = _gap_width(int(gaps.max()) if n else 0)
    gap_frame = zstd_compress(to_planes(gaps.astype(f"<u{width}")), level)
    mask = np.zeros(numel, dtype=np.uint8)  # (numel,)
    mask[positions] = 1
    bitmap_frame = zstd_compress(np.packbits(mask, bitorder="little").tobytes(), level)
    if len(bitmap_frame) < len(gap_frame):
        return "bitmap", bitmap_frame, {}
    return "gaps", gap_frame, {"width": width}


def decode_positions(
    coding: str, frame: bytes, params: dict[str, int], nnz: int, numel: int
) -> np.ndarray:
    """Inverse of :func:`encode_positions`. # (nnz,) int64"""
    if coding == "gaps":
        width = int(params.get("width", 0))
        if width not in (1, 2, 4, 8):
            raise InvalidDelta(f"unknown gap width {width}")
        gaps = from_planes(zstd_decompress(frame, nnz * width), np.dtype(f"<u{width}"), nnz)
        positions = np.cumsum(gaps.astype(np.int64) + 1) - 1  # (nnz,)
    elif coding == "bitmap":
        bits = zstd_decompress(frame, (numel + 7) // 8)
        mask = np.unpackbits(
            np.frombuffer(bits, dtype=np.uint8), count=numel, bitorder="little"
        )  # (numel,)
        positions = np.flatnonzero(mask).astype(np.int64)
    else:
        raise InvalidDelta(f"unknown position coding {coding!r}")
    if positions.size != nnz or (nnz and (positions[-1] >= numel or positions[0] < 0)):
        raise InvalidDelta("decoded positions do not match the recorded count or shape")
    return positions


def pack_bitmap(mask: np.ndarray) -> bytes:
    return np.packbits(np.asarray(mask, dtype=np.uint8), bitorder="little").tobytes()


def unpack_bitmap(buf: bytes, n: int) -> np.ndarray:
    if len(buf) != (n + 7) // 8:
        raise InvalidDelta("bitmap has the wrong length")
    return np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=n, bitorder="little").astype(
        bool
    )

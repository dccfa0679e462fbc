"""A counter-based generator for seeded masks: SplitMix64 of (key, index).

Every entry's draw depends only on (seed, tensor name, flat index), so any slice of a tensor
can be drawn independently (streaming, GPU, another language) and the positions of a seeded
mask cost no storage. ``docs/format.md`` specifies it.
"""

from __future__ import annotations

import hashlib

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
#: Draws made per step (each step holds a few uint64 arrays of this length: 8 MiB each).
CHUNK = 1 << 20


def tensor_key(seed: int, name: str) -> int:
    """64-bit key of one tensor: the first 8 bytes (little-endian) of sha256("{seed}:{name}")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def draws53(key: int, start: int, n: int) -> np.ndarray:
    """53-bit integer draws for indices ``start .. start+n-1``. # (n,) uint64 in [0, 2**53)"""
    i = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + i * GOLDEN
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        z ^= z >> np.uint64(31)
    return z >> np.uint64(11)


def rate_limit(rate: float) -> int:
    """Integer threshold of a keep rate: an entry is kept when its draw is below it."""
    return int(min(max(rate, 0.0), 1.0) * float(1 << 53))


def uniforms(key: int, numel: int) -> np.ndarray:
    """All draws of a tensor as float32 uniforms in [0, 1) (for searches). # (numel,)"""
    out = np.empty(numel, dtype=np.float32)
    for s in range(0, numel, CHUNK):
        n = min(CHUNK, numel - s)
        out[s : s + n] = draws53(key, s, n).astype(np.float64) * 2.0**-53
    return out


def seeded_positions(key: int, numel: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions decided by the draw alone and positions left to a coded bit.

    Returns:
        (sure # positions with draw < lo, ambiguous # positions with lo ≤ draw < hi), int64.
    """
    sure: list[np.ndarray] = []
    amb: list[np.ndarray] = []
    for s in range(0, numel, CHUNK):
        n = min(CHUNK, numel - s)
        d = draws53(key, s, n)
        sure.append(np.flatnonzero(d < np.uint64(lo)) + s)
        if hi > lo:
            amb.append(np.flatnonzero((d >= np.uint64(lo)) & (d < np.uint64(hi))) + s)
    cat = np.concatenate
    empty = np.zeros(0, dtype=np.int64)
    return (
        cat(sure).astype(np.int64) if sure else empty,
        cat(amb).astype(np.int64) if amb else empty,
    )

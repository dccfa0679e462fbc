"""Values of the kept entries of a sparse tensor: float codings (f32, f16, bf16) as byte
planes, or sign + magnitude-level codes with a Lloyd-Max codebook (``q``).

Pure: a float tensor in, one zstd frame out (and back). Specified in ``docs/format.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from core.constants import QUANT_BITS, ZSTD_LEVEL
from core.errors import InvalidArgument, InvalidDelta
from core.frames import from_planes, to_planes, zstd_compress, zstd_decompress


def fit_codebook(mags: torch.Tensor, levels: int, iters: int = 8) -> torch.Tensor:
    """Magnitude levels for scalar quantisation (Lloyd-Max on the sorted magnitudes).

    Lloyd's iterations run from two starts, equal-count levels (good at few levels) and
    uniform levels over the range (good in heavy tails at many levels); the codebook with the
    smaller squared error wins. Deterministic. (numpy inside: small searches are far cheaper
    there than in a threaded torch op.)

    Args:
        mags: non-negative magnitudes. # (n,)
        levels: number of levels L.

    Returns:
        ascending float32 levels. # (L,)
    """
    s = np.sort(mags.detach().to(torch.float32).reshape(-1).cpu().numpy())  # (n,)
    n = s.size
    if n == 0:
        return torch.zeros(levels, dtype=torch.float32)
    csum = np.concatenate([[0.0], np.cumsum(s, dtype=np.float64)])  # (n+1,) prefix sums
    csq = np.concatenate([[0.0], np.cumsum(s.astype(np.float64) ** 2)])  # (n+1,)
    edges = np.linspace(0, n, levels + 1).astype(np.int64)  # (L+1,)
    counts0 = edges[1:] - edges[:-1]
    equal = np.where(
        counts0 > 0,
        (csum[edges[1:]] - csum[edges[:-1]]) / np.maximum(counts0, 1),
        s[np.minimum(edges[:-1], n - 1)],
    )
    uniform = s[0] + (s[-1] - s[0]) * (np.arange(levels) + 0.5) / levels  # (L,)
    best, best_err = equal, np.inf
    for cb in (np.sort(equal), np.sort(uniform)):
        for _ in range(iters):
            cb = _lloyd_step(s, cb, csum)
        starts, ends = _runs(s, cb)
        counts = ends - starts
        # Σ (x − c_j)² over each level's contiguous run of sorted values
        err = float(
            (
                (csq[ends] - csq[starts]) - 2 * cb * (csum[ends] - csum[starts]) + counts * cb * cb
            ).sum()
        )
        if err < best_err:
            best, best_err = cb, err
    return torch.from_numpy(best.astype(np.float32))  # (L,)


def _runs(s: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each level's run in the sorted values (a value on a midpoint goes to
    the lower level, as in :func:`quantise`)."""
    mids = (cb[1:] + cb[:-1]) / 2
    ends = np.concatenate([np.searchsorted(s, mids, side="right"), [s.size]])  # (L,)
    starts = np.concatenate([[0], ends[:-1]])
    return starts, ends


def _lloyd_step(s: np.ndarray, cb: np.ndarray, csum: np.ndarray) -> np.ndarray:
    starts, ends = _runs(s, cb)
    counts = ends - starts
    new = np.where(counts > 0, (csum[ends] - csum[starts]) / np.maximum(counts, 1), cb)
    return np.sort(new)


def quantise(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign + magnitude-level codes with a fitted codebook.

    Args:
        values: float values to store. # (n,)
        bits: total bits per value (1, 2, 3, 4 or 8): one sign bit, ``bits - 1`` level bits
            (1 bit = sign only, one magnitude per tensor).

    Returns:
        (codes uint8 # (n,), codebook float32 # (2**(bits-1),))
    """
    levels = 1 << (bits - 1)
    v = values.detach().to(torch.float32).reshape(-1).cpu().numpy()  # (n,)
    cb = fit_codebook(torch.from_numpy(np.abs(v)), levels)  # (L,)
    c = cb.numpy().astype(np.float64)
    mids = (c[1:] + c[:-1]) / 2
    # (n,) level index of each magnitude
    level = np.searchsorted(mids, np.abs(v).astype(np.float64), side="left").astype(np.uint8)
    sign = (v < 0).astype(np.uint8) << (bits - 1)  # (n,)
    return torch.from_numpy(sign | level), cb


def dequantise(codes: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantise` (up to the rounding it did). # (n,) float32"""
    levels = 1 << (bits - 1)
    level = (codes & (levels - 1)).long()  # (n,)
    if codebook.numel() != levels:
        raise InvalidDelta("codebook has the wrong number of levels")
    mag = codebook[level]  # (n,)
    neg = (codes >> (bits - 1)) & 1  # (n,)
    return torch.where(neg.bool(), -mag, mag)


def round_values(values: torch.Tensor, coding: str, bits: int) -> torch.Tensor:
    """What the decoder will see for ``values`` under a value coding. # (n,) float32

    The search applies this inside its fitness so it optimises what will be stored.
    """
    if coding == "q":
        if values.device.type != "cpu":
            return _round_q_on_device(values, bits)
        codes, cb = quantise(values, bits)
        return dequantise(codes, cb, bits)
    return values.to(_FLOAT_CODINGS[coding]).to(torch.float32)


def _round_q_on_device(values: torch.Tensor, bits: int, iters: int = 8) -> torch.Tensor:
    """:func:`quantise` + :func:`dequantise` on an accelerator, without a host round trip.

    The same Lloyd-Max fit (two starts, lower squared error wins) in float64 torch ops; it can
    differ from the CPU fit in the last bits of a level, which a search's fitness tolerates.
    The stored codebook is always fitted on the CPU by the encoder.
    """
    levels = 1 << (bits - 1)
    v = values.to(torch.float64).reshape(-1)  # (n,)
    if v.numel() == 0:
        return values.to(torch.float32)
    s, _ = torch.sort(v.abs())  # (n,)
    n = s.numel()
    zero = torch.zeros(1, dtype=torch.float64, device=v.device)
    csum = torch.cat([zero, torch.cumsum(s, 0)])  # (n+1,)
    csq = torch.cat([zero, torch.cumsum(s * s, 0)])  # (n+1,)
    edges = torch.linspace(0, n, levels + 1, device=v.device).long()  # (L+1,)
    counts0 = edges[1:] - edges[:-1]
    equal = torch.where(
        counts0 > 0,
        (csum[edges[1:]] - csum[edges[:-1]]) / counts0.clamp(min=1),
        s[edges[:-1].clamp(max=n - 1)],
    )
    uniform = (
        s[0]
        + (s[-1] - s[0])
        * (torch.arange(levels, device=v.device, dtype=torch.float64) + 0.5)
        / levels
    )

    def runs(cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mids = (cb[1:] + cb[:-1]) / 2
        ends = torch.cat(
            [torch.searchsorted(s, mids, right=True), torch.tensor([n], device=v.device)]
        )
        return torch.cat([torch.zeros(1, dtype=torch.long, device=v.device), ends[:-1]]), ends

    best, best_err = equal, None
    for cb in (torch.sort(equal).values, torch.sort(uniform).values):
        for _ in range(iters):
            a, b = runs(cb)
            cnt = b - a
            cb = torch.sort(torch.where(cnt > 0, (csum[b] - csum[a]) / cnt.clamp(min=1), cb)).values
        a, b = runs(cb)
        cnt = b - a
        err = ((csq[b] - csq[a]) - 2 * cb * (csum[b] - csum[a]) + cnt * cb * cb).sum()
        if best_err is None or bool(err < best_err):
            best, best_err = cb, err
    cb32 = best.to(torch.float32)  # (L,)
    mids = (cb32[1:].double() + cb32[:-1].double()) / 2
    level = torch.searchsorted(mids, v.abs().contiguous(), right=False)  # (n,)
    mag = cb32[level]
    return torch.where(v < 0, -mag, mag)


_FLOAT_CODINGS = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def value_coding_for(bits: int, prefer_bf16: bool) -> str:
    """The value coding for a bit width: 32 → f32, 16 → f16 or bf16, else quantised ``q``."""
    if bits == 32:
        return "f32"
    if bits == 16:
        return "bf16" if prefer_bf16 else "f16"
    if bits in QUANT_BITS:
        return "q"
    raise InvalidArgument(f"value bits must be one of 32, 16, 8, 4, 3, 2, 1 (got {bits})")


def encode_values(
    values: torch.Tensor, coding: str, bits: int, level: int = ZSTD_LEVEL
) -> tuple[bytes, dict[str, object]]:
    """Code kept values. Returns (zstd section, params for the document).

    Quantised sections start with the codebook (2**(bits-1) float32, little-endian), then the
    codes as bit planes.
    """
    v = values.to(torch.float32).reshape(-1).cpu()  # (n,)
    if coding == "q":
        codes, cb = quantise(v, bits)
        raw = cb.numpy().astype("<f4").tobytes() + pack_codes(codes.numpy(), bits)
        return zstd_compress(raw, level), {"bits": bits}
    t = v.to(_FLOAT_CODINGS[coding])
    arr = t.view(
        {2: torch.int16, 4: torch.int32}[t.element_size()]
    ).numpy()  # (n,) int16/int32 bits
    return zstd_compress(to_planes(arr), level), {}


def decode_values(coding: str, frame: bytes, params: dict[str, object], n: int) -> torch.Tensor:
    """Inverse of :func:`encode_values`. # (n,) float32"""
    if coding == "q":
        bits = params.get("bits")
        if not isinstance(bits, int) or bits not in QUANT_BITS:
            raise InvalidDelta(f"unknown quantisation width {bits}")
        levels = 1 << (bits - 1)
        raw = zstd_decompress(frame, 4 * levels + packed_size(n, bits))
        cb = torch.from_numpy(
            np.frombuffer(raw[: 4 * levels], dtype="<f4").astype(np.float32)
        )  # (L,)
        codes = unpack_codes(raw[4 * levels :], n, bits)
        return dequantise(torch.from_numpy(codes), cb, bits)
    if coding not in _FLOAT_CODINGS:
        raise InvalidDelta(f"unknown value coding {coding!r}")
    tdtype = _FLOAT_CODINGS[coding]
    width = torch.empty(0, dtype=tdtype).element_size()
    np_int = {2: np.int16, 4: np.int32}[width]
    arr = from_planes(zstd_decompress(frame, n * width), np.dtype(np_int), n)  # (n,)
    return torch.from_numpy(arr.copy()).view(tdtype).to(torch.float32)


def packed_size(n: int, bits: int) -> int:
    return bits * ((n + 7) // 8)


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Bit planes of b-bit codes: plane j holds bit j of every code, packed little-endian."""
    codes = np.asarray(codes, dtype=np.uint8)
    return b"".join(np.packbits((codes >> j) & 1, bitorder="little").tobytes() for j in range(bits))


def unpack_codes(buf: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`. # (n,) uint8"""
    plane = (n + 7) // 8
    if len(buf) != plane * bits:
        raise InvalidDelta("packed codes have the wrong length")
    out = np.zeros(n, dtype=np.uint8)  # (n,)
    for j in range(bits):
        chunk = np.frombuffer(buf[j * plane : (j + 1) * plane], dtype=np.uint8)
        out |= np.unpackbits(chunk, count=n, bitorder="little") << j
    return out

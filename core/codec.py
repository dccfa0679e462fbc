"""Frame codecs: zstd with size guards, byte planes, positions, values and quantisation.

Every function here is pure: bytes or tensors in, bytes or tensors out. The formats are
specified in ``docs/format.md``; golden-byte tests pin them.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from core.constants import (
    MAX_FRAME_BYTES,
    QUANT_BITS,
    ZSTD_BULK_BYTES,
    ZSTD_BULK_LEVEL,
    ZSTD_LEVEL,
)
from core.errors import InvalidArgument, InvalidDelta

# --------------------------------------------------------------------------- zstd


def zstd_compress(data: bytes | bytearray | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame with its content size recorded (readers check it before inflating).

    Bulk frames (over :data:`ZSTD_BULK_BYTES`) use at most :data:`ZSTD_BULK_LEVEL` and all
    cores; the output is the same whatever the number of cores."""
    return _compressor(len(data), level).compress(data)


def _compressor(size: int, level: int) -> zstandard.ZstdCompressor:
    """The compressor for ``size`` bytes of input: over :data:`ZSTD_BULK_BYTES`, at most
    :data:`ZSTD_BULK_LEVEL` on all cores (the output does not depend on the core count)."""
    threads = 0
    if size > ZSTD_BULK_BYTES:
        level, threads = min(level, ZSTD_BULK_LEVEL), -1
    return zstandard.ZstdCompressor(level=level, write_content_size=True, threads=threads)


def check_frame_size(frame: bytes | memoryview, expected_size: int) -> None:
    """Refuse a frame over the size limit or declaring another size than expected (no zstd
    bombs: checked before anything is inflated)."""
    if expected_size > MAX_FRAME_BYTES:
        raise InvalidDelta(f"a frame claims {expected_size} bytes, over the limit")
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        raise InvalidDelta("a frame is not a zstd frame") from None
    if declared != expected_size:
        raise InvalidDelta(f"a frame declares {declared} bytes where {expected_size} were expected")


def zstd_decompress(frame: bytes | memoryview, expected_size: int) -> bytes:
    """Inflate one frame whose declared size must equal ``expected_size``."""
    check_frame_size(frame, expected_size)
    if expected_size == 0:
        return b""
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise InvalidDelta(f"a frame does not decompress ({exc})") from None
    if len(out) != expected_size:
        raise InvalidDelta("a frame inflated to the wrong size")
    return out


# --------------------------------------------------------------------------- byte planes


def to_planes(arr: np.ndarray) -> bytes:
    """Little-endian bytes of an array, grouped by byte significance (plane 0 first).

    Values that are small or share exponents leave whole planes nearly constant, which zstd
    then squeezes.
    """
    width = arr.dtype.itemsize
    raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
    return raw.view(np.uint8).reshape(-1, width).T.tobytes()


def from_planes(buf: bytes, dtype: np.dtype, n: int) -> np.ndarray:
    """Inverse of :func:`to_planes`. # (n,)"""
    dtype = np.dtype(dtype).newbyteorder("<")
    width = dtype.itemsize
    if len(buf) != n * width:
        raise InvalidDelta(f"plane data has {len(buf)} bytes, expected {n * width}")
    planes = np.frombuffer(buf, dtype=np.uint8).reshape(width, n)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(n)


# --------------------------------------------------------------------------- positions


@dataclass(frozen=True)
class Coded:
    """A coded frame before zstd: its coding name, raw bytes and parameters."""

    coding: str
    raw: bytes
    params: dict[str, int]


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
    gaps = np.diff(positions, prepend=-1) - 1  # ≥ 0
    width = _gap_width(int(gaps.max()) if n else 0)
    gap_frame = zstd_compress(to_planes(gaps.astype(f"<u{width}")), level)
    mask = np.zeros(numel, dtype=np.uint8)
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
        positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    elif coding == "bitmap":
        bits = zstd_decompress(frame, (numel + 7) // 8)
        mask = np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=numel, bitorder="little")
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


# --------------------------------------------------------------------------- values


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
    csum = np.concatenate([[0.0], np.cumsum(s, dtype=np.float64)])
    csq = np.concatenate([[0.0], np.cumsum(s.astype(np.float64) ** 2)])
    edges = np.linspace(0, n, levels + 1).astype(np.int64)
    counts0 = edges[1:] - edges[:-1]
    equal = np.where(
        counts0 > 0,
        (csum[edges[1:]] - csum[edges[:-1]]) / np.maximum(counts0, 1),
        s[np.minimum(edges[:-1], n - 1)],
    )
    uniform = s[0] + (s[-1] - s[0]) * (np.arange(levels) + 0.5) / levels
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
    return torch.from_numpy(best.astype(np.float32))


def _runs(s: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each level's run in the sorted values (a value on a midpoint goes to
    the lower level, as in :func:`quantise`)."""
    mids = (cb[1:] + cb[:-1]) / 2
    ends = np.concatenate([np.searchsorted(s, mids, side="right"), [s.size]])
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
    v = values.detach().to(torch.float32).reshape(-1).cpu().numpy()
    cb = fit_codebook(torch.from_numpy(np.abs(v)), levels)
    c = cb.numpy().astype(np.float64)
    mids = (c[1:] + c[:-1]) / 2
    level = np.searchsorted(mids, np.abs(v).astype(np.float64), side="left").astype(np.uint8)
    sign = (v < 0).astype(np.uint8) << (bits - 1)
    return torch.from_numpy(sign | level), cb


def dequantise(codes: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantise` (up to the rounding it did). # (n,) float32"""
    levels = 1 << (bits - 1)
    level = (codes & (levels - 1)).long()
    if codebook.numel() != levels:
        raise InvalidDelta("codebook has the wrong number of levels")
    mag = codebook[level]
    neg = (codes >> (bits - 1)) & 1
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
    v = values.to(torch.float64).reshape(-1)
    if v.numel() == 0:
        return values.to(torch.float32)
    s, _ = torch.sort(v.abs())
    n = s.numel()
    zero = torch.zeros(1, dtype=torch.float64, device=v.device)
    csum = torch.cat([zero, torch.cumsum(s, 0)])
    csq = torch.cat([zero, torch.cumsum(s * s, 0)])
    edges = torch.linspace(0, n, levels + 1, device=v.device).long()
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
    cb32 = best.to(torch.float32)
    mids = (cb32[1:].double() + cb32[:-1].double()) / 2
    level = torch.searchsorted(mids, v.abs().contiguous(), right=False)
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
    v = values.to(torch.float32).reshape(-1).cpu()
    if coding == "q":
        codes, cb = quantise(v, bits)
        raw = cb.numpy().astype("<f4").tobytes() + pack_codes(codes.numpy(), bits)
        return zstd_compress(raw, level), {"bits": bits}
    t = v.to(_FLOAT_CODINGS[coding])
    arr = t.view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()
    return zstd_compress(to_planes(arr), level), {}


def decode_values(coding: str, frame: bytes, params: dict[str, object], n: int) -> torch.Tensor:
    """Inverse of :func:`encode_values`. # (n,) float32"""
    if coding == "q":
        bits = params.get("bits")
        if not isinstance(bits, int) or bits not in QUANT_BITS:
            raise InvalidDelta(f"unknown quantisation width {bits}")
        levels = 1 << (bits - 1)
        raw = zstd_decompress(frame, 4 * levels + packed_size(n, bits))
        cb = torch.from_numpy(np.frombuffer(raw[: 4 * levels], dtype="<f4").astype(np.float32))
        codes = unpack_codes(raw[4 * levels :], n, bits)
        return dequantise(torch.from_numpy(codes), cb, bits)
    if coding not in _FLOAT_CODINGS:
        raise InvalidDelta(f"unknown value coding {coding!r}")
    tdtype = _FLOAT_CODINGS[coding]
    width = torch.empty(0, dtype=tdtype).element_size()
    np_int = {2: np.int16, 4: np.int32}[width]
    arr = from_planes(zstd_decompress(frame, n * width), np.dtype(np_int), n)
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
    out = np.zeros(n, dtype=np.uint8)
    for j in range(bits):
        chunk = np.frombuffer(buf[j * plane : (j + 1) * plane], dtype=np.uint8)
        out |= np.unpackbits(chunk, count=n, bitorder="little") << j
    return out


# --------------------------------------------------------------------------- lossless


class FrameStream:
    """One zstd frame inflated a piece at a time: its declared size is checked before anything
    is inflated, and a frame that inflates to more or fewer bytes raises."""

    def __init__(self, frame: bytes | memoryview, size: int) -> None:
        check_frame_size(frame, size)
        self.left = size
        self._reader = zstandard.ZstdDecompressor().stream_reader(frame, read_across_frames=False)

    def readinto(self, buf: memoryview) -> None:
        """Fill all of ``buf`` with the next bytes."""
        if len(buf) > self.left:
            raise InvalidDelta("a frame inflated to the wrong size")
        i = 0
        try:
            while i < len(buf):
                got = self._reader.readinto(buf[i:])
                if got == 0:
                    raise InvalidDelta("a frame inflated to the wrong size")
                i += got
        except zstandard.ZstdError as exc:
            raise InvalidDelta(f"a frame does not decompress ({exc})") from None
        self.left -= i

    def skip(self, n: int) -> None:
        """Pass over the next ``n`` bytes (inflated and dropped, a step at a time)."""
        scratch = memoryview(bytearray(min(n, XOR_STEP)))
        while n:
            m = min(n, len(scratch))
            self.readinto(scratch[:m])
            n -= m

    def finish(self) -> None:
        """Check that the frame ends where its size says (nothing left, nothing more)."""
        try:
            extra = self._reader.read(1)
        except zstandard.ZstdError as exc:
            raise InvalidDelta(f"a frame does not decompress ({exc})") from None
        finally:
            self._reader.close()
        if self.left or extra:
            raise InvalidDelta("a frame inflated to the wrong size")


class XorEncoder:
    """The lossless planes of one tensor of ``n`` elements, fed a piece at a time (so neither
    tensor is ever whole in memory): each byte plane streams into its own zstd frame of
    ``n`` bytes, with the level and threads :func:`zstd_compress` would choose for the whole
    tensor's bytes (a bulk tensor's planes at the bulk level: deeper levels compress these
    noise-like planes worse, not better)."""

    def __init__(self, width: int, n: int, level: int = ZSTD_LEVEL) -> None:
        self.width, self.n, self.done = width, n, 0
        self._objs = [_compressor(n * width, level).compressobj(size=n) for _ in range(width)]
        self._out: list[list[bytes]] = [[] for _ in range(width)]
        self.equal = True  # whether every byte fed so far was equal in both buffers

    def add(
        self, ft_raw: bytes | bytearray | memoryview, base_raw: bytes | bytearray | memoryview
    ) -> None:
        """XOR the next elements of the fine-tune and the base (equal sizes) into the planes."""
        if len(ft_raw) != len(base_raw) or len(ft_raw) % self.width:
            raise InvalidArgument("xor coding needs two buffers of equal size")
        k = len(ft_raw) // self.width
        if self.done + k > self.n:
            raise InvalidArgument("more elements than the tensor has")
        a = np.frombuffer(ft_raw, dtype=np.uint8).reshape(k, self.width)
        b = np.frombuffer(base_raw, dtype=np.uint8).reshape(k, self.width)
        plane = np.empty(k, dtype=np.uint8)
        for j in range(self.width):
            np.bitwise_xor(a[:, j], b[:, j], out=plane)
            if self.equal and plane.any():
                self.equal = False
            if k:
                self._out[j].append(self._objs[j].compress(plane.data))
        self.done += k

    def finish(self) -> tuple[bytes, list[int]]:
        """The plane frames back to back, and the size of each."""
        if self.done != self.n:
            raise InvalidArgument(f"{self.done} of {self.n} elements were given")
        frames = []
        for j in range(self.width):
            self._out[j].append(self._objs[j].flush())
            frames.append(b"".join(self._out[j]))
            self._out[j].clear()
        return b"".join(frames), [len(f) for f in frames]


def encode_xor(
    ft_raw: bytes | bytearray | memoryview,
    base_raw: bytes | bytearray | memoryview,
    width: int,
    level: int = ZSTD_LEVEL,
) -> tuple[bytes, list[int]]:
    """Exact delta: fine-tune bytes XOR base bytes, as byte planes, each its own zstd frame.

    Returns the frames back to back and the size of each (so that a reader can inflate all
    planes side by side, a piece at a time). See :class:`XorEncoder` to feed it in pieces."""
    if len(ft_raw) != len(base_raw) or len(ft_raw) % width:
        raise InvalidArgument("xor coding needs two buffers of equal size")
    enc = XorEncoder(width, len(ft_raw) // width, level)
    enc.add(ft_raw, base_raw)
    return enc.finish()


#: Plane bytes inflated per step of :class:`XorPlanes` (fits in L2 with its slice of elements).
XOR_STEP = 1 << 18

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _plane_pool() -> ThreadPoolExecutor:
    """Threads that inflate lossless planes, shared by the process (one per core)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="slim-planes")
        return _pool


@dataclass
class Inflating:
    """Planes being inflated by :meth:`XorPlanes.inflate`."""

    planes: list[tuple[np.ndarray, Future[None]]]

    def result(self) -> list[np.ndarray]:
        """The inflated planes, once all are done (the first error is raised after every
        thread has stopped using its buffer and stream)."""
        for _, fut in self.planes:
            fut.exception()
        for _, fut in self.planes:
            fut.result()
        return [buf for buf, _ in self.planes]


class XorPlanes:
    """The XOR planes of one lossless tensor of ``n`` elements, applied a piece at a time.

    With ``plane_sizes`` (format version 3) each plane is its own zstd frame and all of them
    are inflated side by side, so any run of elements is rebuilt from a few steps of memory.
    Without (versions 1–2) the planes are one frame, plane after plane, and only the whole
    tensor can be rebuilt (one :meth:`apply` over all ``n`` elements)."""

    def __init__(
        self, frame: bytes | memoryview, width: int, n: int, plane_sizes: list[int] | None
    ) -> None:
        if width not in (1, 2, 4, 8):
            raise InvalidDelta(f"lossless planes of {width}-byte elements are not a known dtype")
        self.width, self.n, self.done = width, n, 0
        #: Whether pieces can be rebuilt one after another (planes stored side by side).
        self.streamable = plane_sizes is not None or width == 1
        if plane_sizes is None:
            self._streams = [FrameStream(frame, n * width)]
        else:
            if len(plane_sizes) != width or sum(plane_sizes) != len(frame) or min(plane_sizes) < 0:
                raise InvalidDelta(
                    "the plane sizes of a lossless tensor do not add up to its frame"
                )
            view, at, self._streams = memoryview(frame), 0, []
            for size in plane_sizes:
                self._streams.append(FrameStream(view[at : at + size], n))
                at += size
        step = min(XOR_STEP, max(n, 1))
        self._step = np.empty(step, dtype=np.uint8)
        self._wide = np.empty(step, dtype=f"<u{width}")

    def _plane(self, j: int) -> FrameStream:
        return self._streams[j] if len(self._streams) > 1 else self._streams[0]

    def apply(self, items: np.ndarray) -> None:
        """XOR the next ``len(items)`` elements' planes into ``items`` (unsigned, the dtype's
        width; little-endian byte j of an element is plane j)."""
        k = len(items)
        self._check_piece(k)
        self._xor_inflated(items)
        self.done += k

    def _check_piece(self, k: int) -> None:
        if not self.streamable and k != self.n:
            raise InvalidDelta("a lossless tensor of this format version rebuilds only whole")
        if self.done + k > self.n:
            raise InvalidDelta("a lossless tensor was asked for more elements than it has")

    def inflate(self, k: int) -> Inflating:
        """Start inflating the next ``k`` elements' planes, each in a thread of its own (zstd
        releases the GIL; plane 0 of a float tensor, the noisy low byte, takes as long as the
        rest), while the caller does something else — e.g. reads the base. Hand the result to
        :meth:`xor_into`. Needs the planes stored side by side."""
        self._check_piece(k)
        self.done += k
        pool = _plane_pool()
        bufs = [np.empty(k, dtype=np.uint8) for _ in range(self.width)]
        return Inflating(
            [(b, pool.submit(self._plane(j).readinto, b.data)) for j, b in enumerate(bufs)]
        )

    def xor_into(self, items: np.ndarray, planes: Inflating) -> None:
        """XOR planes started by :meth:`inflate` into ``items`` (waits for them)."""
        got = planes.result()
        if any(len(b) != len(items) for b in got):
            raise InvalidDelta("inflated planes do not match the elements they are XORed into")
        for j, buf in enumerate(got):
            self._xor_plane(items, j, buf)

    def _xor_inflated(self, items: np.ndarray) -> None:
        """Inflate the planes a step at a time and XOR them in while in cache."""
        view, k = self._step.data, len(items)
        for j in range(self.width):
            stream = self._plane(j)
            for i in range(0, k, self._step.size):
                got = min(self._step.size, k - i)
                stream.readinto(view[:got])
                self._xor_plane(items[i : i + got], j, self._step[:got])

    def _xor_plane(self, items: np.ndarray, j: int, plane: np.ndarray) -> None:
        """``items ^= plane << 8j``, a step at a time through the widening buffer."""
        for i in range(0, len(items), self._wide.size):
            got = min(self._wide.size, len(items) - i)
            w = self._wide[:got]
            np.copyto(w, plane[i : i + got], casting="unsafe")
            if j:
                np.left_shift(w, 8 * j, out=w)
            items[i : i + got] ^= w

    def skip(self, k: int) -> None:
        """Pass over the next ``k`` elements (their planes are inflated and dropped)."""
        self._check_piece(k)
        for stream in self._streams:
            stream.skip(k)
        self.done += k

    def finish(self) -> None:
        """Check that every plane ended exactly after its ``n`` bytes."""
        for s in self._streams:
            s.finish()


def decode_xor(
    frame: bytes | memoryview,
    base_raw: bytes | bytearray | memoryview,
    width: int,
    *,
    in_place: bool = False,
    plane_sizes: list[int] | None = None,
) -> memoryview:
    """Inverse of :func:`encode_xor`: the fine-tune's exact bytes.

    The planes are XORed into a copy of the base, or into ``base_raw`` itself with
    ``in_place`` (a writable buffer the caller owns and no longer needs as the base), a step
    of :data:`XOR_STEP` bytes at a time (no plane-sized buffer is held). ``plane_sizes`` as
    recorded with the tensor (version 3); None reads the single-frame planes of versions 1–2."""
    if width not in (1, 2, 4, 8):
        raise InvalidDelta(f"lossless planes of {width}-byte elements are not a known dtype")
    if len(base_raw) % width:
        raise InvalidDelta("a lossless tensor's base is not a whole number of elements")
    out = np.frombuffer(base_raw, dtype=np.uint8)
    if not in_place:
        out = out.copy()
    planes = XorPlanes(frame, width, len(base_raw) // width, plane_sizes)
    planes.apply(out.view(f"<u{width}"))
    planes.finish()
    return out.data

"""Exact (lossless) tensors: a residual of the fine-tune against the base (their bytes' XOR,
or for floats the zigzagged distance in ulps), one zstd frame per byte plane.

The encoder is fed a piece at a time and the decoder rebuilds any run of elements from a few
steps of memory, so neither tensor is ever whole. Specified in ``docs/format.md``.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.constants import ZSTD_LEVEL
from core.errors import InvalidArgument, InvalidDelta
from core.frames import STEP_BYTES, FrameStream, compressor

#: (base dtype, fine-tune dtype) pairs whose lossless planes XOR the base converted to the
#: fine-tune's dtype by :func:`cast_base` (format version 5, ``base_cast``). Other pairs of
#: different dtypes are stored ``dense``.
CASTS = frozenset({("F32", "BF16"), ("F32", "F16"), ("BF16", "F32"), ("F16", "F32")})


def cast_base(raw: bytes | bytearray | memoryview, base_dtype: str, dtype: str) -> np.ndarray:
    """The base's little-endian elements converted to ``dtype`` (``docs/format.md`` §5b), as
    little-endian unsigned integers of ``dtype``'s width: float32 to bf16 or f16 rounds to
    nearest even (what ``torch``'s ``.to`` gives every finite value; overflow gives ±inf, f16
    keeps subnormals), a NaN becomes a quiet NaN of the same sign; bf16 or f16 to float32 is
    exact. Converted a cache-sized step at a time."""
    pair = (base_dtype, dtype)
    if pair not in CASTS:
        raise InvalidArgument(f"no lossless cast from {base_dtype} to {dtype}")
    if base_dtype != "F32":  # widening: exact
        h = np.frombuffer(raw, dtype="<u2")  # (n,) 16-bit float bits
        if base_dtype == "BF16":
            out = h.astype("<u4")
            out <<= 16
            return out
        return h.view("<f2").astype("<f4").view("<u4")
    x = np.frombuffer(raw, dtype="<u4")  # (n,) float32 bits
    out = np.empty(len(x), dtype="<u2")
    step = min(ULP_STEP, len(x))
    t = np.empty(step, dtype="<u4")
    for i in range(0, len(x), step):
        xs, ts, os_ = x[i : i + step], t[: min(step, len(x) - i)], out[i : i + step]
        if dtype == "BF16":  # round to nearest even on the bits: + 0x7FFF + the kept lsb
            np.right_shift(xs, 16, out=ts)
            np.bitwise_and(ts, 1, out=ts)
            ts += 0x7FFF
            ts += xs
            ts >>= 16
            np.copyto(os_, ts, casting="unsafe")
        else:
            with np.errstate(over="ignore"):
                np.copyto(os_.view("<f2"), xs.view("<f4"), casting="same_kind")
        np.bitwise_and(xs, 0x7FFFFFFF, out=ts)
        nan = ts > 0x7F800000
        if nan.any():  # a quiet NaN of the same sign (bf16: sign and payload kept)
            hi = xs[nan] >> 16
            os_[nan] = hi | 0x0040 if dtype == "BF16" else (hi & 0x8000) | 0x7E00
    return out


#: How a lossless tensor's elements are turned into plane bytes: ``xor`` (fine-tune XOR base)
#: or, format version 5, ``ulp`` (the zigzagged difference of the two floats' order keys).
RESIDUALS = ("xor", "ulp")
#: Elements whose ulp residual is undone at a time (a few arrays of them stay in L2).
ULP_STEP = 1 << 16


def _order_key(a: np.ndarray) -> np.ndarray:
    """Sign-magnitude float bits, viewed as signed integers, as signed integers in the floats'
    order: the magnitude bits of a negative float flipped (an involution)."""
    k = a >> (8 * a.itemsize - 1)  # 0, or -1 where the sign bit is set
    k &= a.dtype.type((1 << (8 * a.itemsize - 1)) - 1)
    k ^= a
    return k


def ulp_residual(ft: np.ndarray, base: np.ndarray) -> np.ndarray:
    """``zigzag(key(ft) - key(base))`` over unsigned float bits of one width: how many
    representable values apart the two are, small for a small change (a change that carries
    into the exponent or across zero stays small, where the XOR of the bits does not)."""
    signed = np.dtype(f"<i{ft.itemsize}")
    d = _order_key(ft.view(signed))
    d -= _order_key(base.view(signed))  # wraps: the difference modulo 2^bits
    z = d << 1
    d >>= 8 * d.itemsize - 1
    z ^= d
    return z.view(ft.dtype)


def undo_ulp_residual(base: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The fine-tune's float bits from the base's and :func:`ulp_residual`."""
    out = base.copy()
    _undo_ulp_into(out, z.copy(), np.empty_like(z), np.empty_like(z))
    return out


def _undo_ulp_into(items: np.ndarray, z: np.ndarray, d: np.ndarray, k: np.ndarray) -> None:
    """``items = undo_ulp_residual(items, z)`` in place, in a dozen numpy passes that
    allocate nothing; ``z`` is overwritten, ``d`` and ``k`` are scratch of its size."""
    signed, top = np.dtype(f"<i{items.itemsize}"), 8 * items.itemsize - 1
    mag = signed.type((1 << top) - 1)
    zs, ds, ks, b = z.view(signed), d.view(signed), k.view(signed), items.view(signed)
    np.left_shift(zs, top, out=ds)
    np.right_shift(ds, top, out=ds)  # -1 where z is odd (a negative difference), else 0
    np.right_shift(z, 1, out=z)  # unsigned: a logical shift
    np.bitwise_xor(ds, zs, out=ds)  # d, the difference of the keys
    np.right_shift(b, top, out=ks)
    np.bitwise_and(ks, mag, out=ks)
    np.bitwise_xor(ks, b, out=ks)  # key(base)
    np.add(ks, ds, out=ks)  # key(fine-tune), modulo 2^bits
    np.right_shift(ks, top, out=ds)
    np.bitwise_and(ds, mag, out=ds)
    np.bitwise_xor(ks, ds, out=b)  # key is its own inverse


def _check_residual(residual: str, width: int) -> None:
    if residual not in RESIDUALS:
        raise InvalidDelta(f"unknown lossless residual {residual!r}")
    if residual == "ulp" and width not in (2, 4, 8):
        raise InvalidDelta(f"ulp residuals of {width}-byte elements are not defined")


class XorEncoder:
    """The lossless planes of one tensor of ``n`` elements, fed a piece at a time (so neither
    tensor is ever whole in memory): each byte plane streams into its own zstd frame of
    ``n`` bytes, with the level and threads :func:`core.frames.zstd_compress` would choose for the whole
    tensor's bytes (a bulk tensor's planes at the bulk level: deeper levels compress these
    noise-like planes worse, not better)."""

    def __init__(self, width: int, n: int, level: int = ZSTD_LEVEL, residual: str = "xor") -> None:
        _check_residual(residual, width)
        self.width, self.n, self.done, self.residual = width, n, 0, residual
        self._objs = [compressor(n * width, level).compressobj(size=n) for _ in range(width)]
        self._out: list[list[bytes]] = [[] for _ in range(width)]
        self.equal = True  # whether every byte fed so far was equal in both buffers

    def add(
        self, ft_raw: bytes | bytearray | memoryview, base_raw: bytes | bytearray | memoryview
    ) -> None:
        """Code the next elements of the fine-tune against the base's (equal sizes) into the
        planes."""
        if len(ft_raw) != len(base_raw) or len(ft_raw) % self.width:
            raise InvalidArgument("xor coding needs two buffers of equal size")
        k = len(ft_raw) // self.width
        if self.done + k > self.n:
            raise InvalidArgument("more elements than the tensor has")
        a = np.frombuffer(ft_raw, dtype=np.uint8).reshape(k, self.width)  # (k, width)
        b = np.frombuffer(base_raw, dtype=np.uint8).reshape(k, self.width)  # (k, width)
        if self.residual == "ulp":  # the residual's bytes, XORed with zeros below
            wide = f"<u{self.width}"
            z = ulp_residual(np.frombuffer(ft_raw, wide), np.frombuffer(base_raw, wide))
            a, b = z.view(np.uint8).reshape(k, self.width), np.zeros_like(a)
        plane = np.empty(k, dtype=np.uint8)  # (k,) byte j of each element
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
    """The planes of one lossless tensor of ``n`` elements, applied a piece at a time to the
    base's elements: XORed in, or with ``residual="ulp"`` (format version 5) their residual
    undone (:func:`undo_ulp_residual`).

    With ``plane_sizes`` (format version 3) each plane is its own zstd frame and all of them
    are inflated side by side, so any run of elements is rebuilt from a few steps of memory.
    Without (versions 1–2) the planes are one frame, plane after plane, and only the whole
    tensor can be rebuilt (one :meth:`apply` over all ``n`` elements)."""

    def __init__(
        self,
        frame: bytes | memoryview,
        width: int,
        n: int,
        plane_sizes: list[int] | None,
        residual: str = "xor",
    ) -> None:
        if width not in (1, 2, 4, 8):
            raise InvalidDelta(f"lossless planes of {width}-byte elements are not a known dtype")
        _check_residual(residual, width)
        if residual != "xor" and plane_sizes is None:
            raise InvalidDelta("a lossless tensor with a residual must list its plane sizes")
        self.width, self.n, self.done, self.residual = width, n, 0, residual
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
        step = min(STEP_BYTES, max(n, 1))
        self._step = np.empty(step, dtype=np.uint8)
        self._wide = np.empty(step, dtype=f"<u{width}")

    def _plane(self, j: int) -> FrameStream:
        return self._streams[j] if len(self._streams) > 1 else self._streams[0]

    def apply(self, items: np.ndarray) -> None:
        """XOR the next ``len(items)`` elements' planes into ``items`` (unsigned, the dtype's
        width; little-endian byte j of an element is plane j)."""
        k = len(items)
        self._check_piece(k)
        if self.residual == "xor":
            self._xor_inflated(items)
        else:
            z = np.zeros_like(items)
            self._xor_inflated(z)
            items[:] = undo_ulp_residual(items, z)
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
        bufs = [np.empty(k, dtype=np.uint8) for _ in range(self.width)]  # width x (k,)
        return Inflating(
            [(b, pool.submit(self._plane(j).readinto, b.data)) for j, b in enumerate(bufs)]
        )

    def xor_into(self, items: np.ndarray, planes: Inflating) -> None:
        """Apply planes started by :meth:`inflate` to ``items`` (waits for them)."""
        got = planes.result()
        if any(len(b) != len(items) for b in got):
            raise InvalidDelta("inflated planes do not match the elements they are XORed into")
        if self.residual == "ulp":
            self._undo_ulp(items, got)
            return
        for j, buf in enumerate(got):
            self._xor_plane(items, j, buf)

    def _undo_ulp(self, items: np.ndarray, planes: list[np.ndarray]) -> None:
        """``items = undo_ulp_residual(items, residual)``, the residual interleaved from its
        planes a cache-sized step at a time (its dozen passes then stay in cache)."""
        step = min(ULP_STEP, self._wide.size)
        z, d, k = (
            self._wide[:step],
            np.empty_like(self._wide[:step]),
            np.empty_like(self._wide[:step]),
        )
        zb = z.view(np.uint8).reshape(step, self.width)  # (step, width) bytes of z
        for i in range(0, len(items), step):
            got = min(step, len(items) - i)
            for j, buf in enumerate(planes):
                zb[:got, j] = buf[i : i + got]
            _undo_ulp_into(items[i : i + got], z[:got], d[:got], k[:got])

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

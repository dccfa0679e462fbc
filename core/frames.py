"""zstd frames: one-shot coding with size guards, a frame streamed a piece at a time, and the
byte-plane layout that the position and value codings put inside frames.

Pure: bytes in, bytes out. The formats are specified in ``docs/format.md``; golden-byte tests
pin them.
"""

from __future__ import annotations

import numpy as np
import zstandard

from core.constants import MAX_FRAME_BYTES, ZSTD_BULK_BYTES, ZSTD_BULK_LEVEL, ZSTD_LEVEL
from core.errors import InvalidDelta

#: Bytes inflated per step when a frame is streamed (fits in L2 with its slice of elements).
STEP_BYTES = 1 << 18


def zstd_compress(data: bytes | bytearray | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame with its content size recorded (readers check it before inflating).

    Bulk frames (over :data:`ZSTD_BULK_BYTES`) use at most :data:`ZSTD_BULK_LEVEL` and all
    cores; the output is the same whatever the number of cores."""
    return compressor(len(data), level).compress(data)


def compressor(size: int, level: int) -> zstandard.ZstdCompressor:
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
        scratch = memoryview(bytearray(min(n, STEP_BYTES)))
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

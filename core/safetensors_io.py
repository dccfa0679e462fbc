"""Safetensors I/O: cheap header validation, lazy per-tensor reads, a streaming writer.

Nothing here unpickles anything. A header is validated completely (length, size cap, JSON,
names, dtypes, shapes, offsets) before a single tensor byte is read, so a hostile file costs
at most one bounded read.
"""

from __future__ import annotations

import functools
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from io import BufferedReader
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.constants import ITEMSIZES, MAX_HEADER_BYTES, MAX_TENSORS
from core.errors import HeaderTooLarge, InvalidSafetensors

if TYPE_CHECKING:  # torch is imported where a tensor is made: headers and bytes need none
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # offset relative to the start of the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        from core.constants import DTYPES

        return DTYPES[self.dtype][1]


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    header_len: int  # N, the JSON length stored in the first 8 bytes
    tensors: dict[str, TensorInfo]  # in data order (sorted by offset)
    metadata: dict[str, str] | None
    raw: bytes  # the 8 length bytes + the JSON bytes exactly as in the file

    @property
    def data_offset(self) -> int:
        return 8 + self.header_len

    @functools.cached_property
    def data_size(self) -> int:
        # computed once: an upload checks the body it receives against it at every chunk
        return max((t.end for t in self.tensors.values()), default=0)

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidSafetensors(f"duplicate tensor name {key!r} in the header")
        out[key] = value
    return out


def parse_header(
    head: bytes, *, file_size: int | None = None, max_header: int = MAX_HEADER_BYTES
) -> Header:
    """Validate a safetensors header from its first bytes.

    Args:
        head: at least the first ``8 + N`` bytes of the file (more is fine).
        file_size: the whole file's size, when known; offsets are checked against it.
        max_header: the largest JSON header accepted.

    Returns:
        The validated header, tensors ordered by offset.

    Raises:
        InvalidSafetensors: any violation, with a message naming it.
        HeaderTooLarge: the declared JSON length exceeds ``max_header``.
    """
    if len(head) < 8:
        raise InvalidSafetensors("file is shorter than the 8-byte header length; not safetensors")
    n = int.from_bytes(head[:8], "little")
    if n > max_header:
        raise HeaderTooLarge(
            f"header declares {n} bytes, more than the {max_header}-byte limit; "
            "this is not a safetensors file or it is hostile"
        )
    if n < 2:
        raise InvalidSafetensors("header length is smaller than an empty JSON object")
    if file_size is not None and 8 + n > file_size:
        raise InvalidSafetensors(
            f"header declares {n} bytes but the file has only {file_size - 8} after the length; "
            "the file is truncated or not safetensors"
        )
    if len(head) < 8 + n:
        raise InvalidSafetensors("file is truncated inside the header")
    raw_json = head[8 : 8 + n]
    try:
        text = raw_json.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSafetensors(f"header is not valid UTF-8 ({exc.reason})") from None
    if not text.lstrip().startswith("{"):
        raise InvalidSafetensors("header is not a JSON object; not a safetensors file")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise InvalidSafetensors(f"header is not valid JSON ({exc.msg} at {exc.pos})") from None
    except RecursionError:  # a hostile header nesting thousands of arrays
        raise InvalidSafetensors("header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidSafetensors("header is not a JSON object")
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise InvalidSafetensors("__metadata__ must map strings to strings")
    if len(doc) > MAX_TENSORS:
        raise InvalidSafetensors(f"header lists {len(doc)} tensors, more than {MAX_TENSORS}")
    infos = [_tensor_info(name, entry) for name, entry in doc.items()]
    infos.sort(key=lambda t: (t.start, t.end))
    cursor = 0
    for info in infos:
        if info.start != cursor:
            what = "overlaps the previous one" if info.start < cursor else "leaves a hole before it"
            raise InvalidSafetensors(
                f"tensor {info.name!r} starts at {info.start}, which {what} (expected {cursor})"
            )
        cursor = info.end
    if file_size is not None and 8 + n + cursor != file_size:
        raise InvalidSafetensors(
            f"tensors cover {cursor} data bytes but the file holds {file_size - 8 - n}; "
            "the file is truncated or has trailing bytes"
        )
    return Header(
        header_len=n,
        tensors={t.name: t for t in infos},
        metadata=metadata,
        raw=bytes(head[: 8 + n]),
    )


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not name or "\x00" in name:
        raise InvalidSafetensors(f"invalid tensor name {name!r}")
    if not isinstance(entry, dict):
        raise InvalidSafetensors(f"entry of tensor {name!r} is not an object")
    dtype = entry.get("dtype")
    if dtype not in ITEMSIZES:
        raise InvalidSafetensors(f"tensor {name!r} has unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape
    ):
        raise InvalidSafetensors(f"tensor {name!r} has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise InvalidSafetensors(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end:
        raise InvalidSafetensors(f"tensor {name!r} has offsets out of order ({start} > {end})")
    itemsize = ITEMSIZES[dtype]
    numel = math.prod(shape)
    if numel * itemsize != end - start:
        raise InvalidSafetensors(
            f"tensor {name!r}: shape {shape} × {itemsize} bytes = {numel * itemsize}, "
            f"but its offsets span {end - start} bytes"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


#: Headers already parsed, by the file's identity (device, inode, size, modification time):
#: a server opens the same base and delta files for every download, and sixteen pulls
#: starting together parsed the same headers dozens of times on one GIL. A file rewritten
#: in place gets a new modification time, so it is parsed again. At most this many headers
#: and bytes of them are kept, the least recently read dropped first.
HEADER_CACHE_SIZE = 256
HEADER_CACHE_BYTES = 64 << 20
_headers: OrderedDict[tuple[object, ...], Header] = OrderedDict()
_headers_bytes = 0
_headers_lock = threading.Lock()


def read_header(path: str | os.PathLike[str], *, max_header: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of a safetensors file on disk (one bounded read; a file
    whose identity is unchanged since it was last read here is not read again)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, max_header)
    with _headers_lock:
        hit = _headers.get(key)
        if hit is not None:
            _headers.move_to_end(key)
            return hit
    size = st.st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) == 8:
            n = int.from_bytes(first, "little")
            if n <= max_header:
                first += f.read(min(n, max(size - 8, 0)))
    header = parse_header(first, file_size=size, max_header=max_header)
    global _headers_bytes
    with _headers_lock:
        if key not in _headers and len(header.raw) <= HEADER_CACHE_BYTES:
            _headers[key] = header
            _headers_bytes += len(header.raw)
            while len(_headers) > HEADER_CACHE_SIZE or _headers_bytes > HEADER_CACHE_BYTES:
                _headers_bytes -= len(_headers.popitem(last=False)[1].raw)
    return header


class SafetensorsFile:
    """Lazy reader: the header is validated on open, tensors are read one at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        self._f: BufferedReader | None = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.header.tensors[name]

    def read_bytes(self, name: str, start: int = 0, size: int | None = None) -> memoryview:
        """The raw bytes of one tensor, or ``size`` of them from byte ``start`` (one read,
        bounded by that tensor's size) in a fresh, writable buffer that is not zero-filled
        first."""
        info = self.header.tensors[name]
        if size is None:
            size = info.nbytes - start
        if not 0 <= start <= start + size <= info.nbytes:
            raise ValueError(f"bytes {start}+{size} lie outside tensor {name!r}")
        if self._f is None:
            self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._f.seek(self.header.data_offset + info.start + start)
        buf = np.empty(size, dtype=np.uint8).data
        got = self._f.readinto(buf)
        if got != size:
            raise InvalidSafetensors(f"{self.path.name}: truncated while reading {name!r}")
        return buf

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype and shape (CPU, owns its memory)."""
        info = self.header.tensors[name]
        return bytes_to_tensor(self.read_bytes(name), info.dtype, info.shape)


def bytes_to_tensor(
    buf: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """View little-endian bytes as a tensor of the given safetensors dtype and shape."""
    import torch

    from core.constants import DTYPES

    torch_dtype = DTYPES[dtype][1]
    if len(buf) == 0:
        return torch.empty(shape, dtype=torch_dtype)
    if isinstance(buf, bytes) or (isinstance(buf, memoryview) and buf.readonly):
        buf = bytearray(buf)  # torch wants a writable buffer
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)


def tensor_view(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor without copying them when it is a contiguous CPU tensor."""
    import torch

    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of a CPU tensor, in its own dtype."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def build_header(
    entries: Sequence[tuple[str, str, tuple[int, ...]]],
    metadata: dict[str, str] | None = None,
    min_size: int = 0,
) -> bytes:
    """Header bytes (length + JSON, space-padded to 8 bytes) for tensors laid out in order;
    padded with more spaces to ``min_size`` bytes (length included) where that is longer."""
    doc: dict[str, object] = {}
    if metadata is not None:
        doc["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * ITEMSIZES[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    body += b" " * max(0, min_size - 8 - len(body))
    return len(body).to_bytes(8, "little") + body


def iter_tensor_chunks(
    path: str | os.PathLike[str], header: Header, chunk_size: int
) -> Iterator[tuple[TensorInfo, bytes]]:
    """Raw bytes of every tensor, in file order, in chunks of at most ``chunk_size``."""
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        for info in header.tensors.values():
            left = info.nbytes
            while left:
                chunk = f.read(min(chunk_size, left))
                if not chunk:
                    raise InvalidSafetensors(f"{Path(path).name}: truncated in {info.name!r}")
                left -= len(chunk)
                yield info, chunk


def save_file(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors as a safetensors file (small helper for tests and fixtures)."""
    entries = [(n, _st_dtype(t), tuple(t.shape)) for n, t in tensors.items()]
    with open(path, "wb") as f:
        f.write(build_header(entries, metadata))
        for t in tensors.values():
            f.write(tensor_to_bytes(t))


def _st_dtype(t: torch.Tensor) -> str:
    from core.constants import TORCH_TO_ST

    return TORCH_TO_ST[t.dtype]

"""Reconstruction: base + decoded delta (× λ), streamed a piece of a tensor at a time.

Every tensor is rebuilt :data:`~core.constants.PIECE_BYTES` at a time from slices of the base
and its stored entries (:func:`tensor_pieces`), so memory does not grow with the size of the
largest tensor, and any byte range is rebuilt without the bytes before it.

Each weight file is rebuilt with its original header bytes, so names, dtypes, shapes, offsets
and shard layout are the fine-tune's own. Reconstruction is deterministic (elementwise float32
arithmetic, one rounding to the stored dtype), so the sha256 of every file at scale 1 is
recorded when the delta is written and checked on every later reconstruction.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import xxhash

from core import codec
from core.checkpoint import CheckpointDir, check_relpath
from core.constants import CHUNK_SIZE, DTYPES, MAX_HEADER_BYTES, PIECE_BYTES
from core.delta_format import DeltaReader, FileEntry, FrameSource, TensorEntry
from core.errors import BaseMismatch, IntegrityError, InvalidDelta, InvalidSafetensors
from core.safetensors_io import Header, TensorInfo, bytes_to_tensor, parse_header, tensor_view
from core.tensor_codec import decode_sparse


def _base_info(base: CheckpointDir, entry: TensorEntry) -> TensorInfo:
    """The base tensor ``entry`` is a delta of (raises BaseMismatch if the base lacks it)."""
    if entry.base_name is None or entry.base_name not in base.tensors:
        raise BaseMismatch(
            f"the base has no tensor {entry.base_name!r} that the delta needs; "
            "reconstruct against the base the delta was made from"
        )
    info = base.tensors[entry.base_name].info
    if list(info.shape) != list(entry.shape):
        raise BaseMismatch(
            f"base tensor {entry.base_name!r} has another shape than the delta expects"
        )
    return info


def _base_tensor(base: CheckpointDir, entry: TensorEntry) -> torch.Tensor:
    _base_info(base, entry)
    return base.get(entry.base_name or "").reshape(-1)


class RebuildHasher:
    """Both digests recorded for a rebuilt weight file: sha256 (the ETag, what clients check
    end to end) and xxh3-128 (what the server checks as it streams: ~9 GB/s on one core
    against sha256's ~1.1, so the check does not cap a download)."""

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._sha = hashlib.sha256(data)
        self._xxh = xxhash.xxh3_128(data)

    def update(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._xxh.update(data)

    def record(self, entry: FileEntry) -> str:
        """Write both digests into ``entry``; returns the sha256."""
        entry.recon_sha256 = self._sha.hexdigest()
        entry.recon_xxh3 = self._xxh.hexdigest()
        return entry.recon_sha256


class StreamCheck:
    """A digest (``sha256`` or ``xxh3``, i.e. xxh3-128) that bytes passing by must match."""

    def __init__(self, kind: str, want: str) -> None:
        self.kind, self.want = kind, want
        self._h: Any = xxhash.xxh3_128() if kind == "xxh3" else hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    @property
    def got(self) -> str:
        return str(self._h.hexdigest())

    def ok(self) -> bool:
        return self.got == self.want


def rebuild_check(file: FileEntry, scale: float) -> StreamCheck | None:
    """The check a rebuilt file's bytes must pass: xxh3-128 where the delta records it,
    sha256 for files of version-1 deltas and for aux files; None where nothing is recorded
    (scale ≠ 1)."""
    if scale == 1.0 and file.recon_xxh3:
        return StreamCheck("xxh3", file.recon_xxh3)
    want = expected_sha256(file, scale)
    return None if want is None else StreamCheck("sha256", want)


def tensor_bytes(
    entry: TensorEntry, reader: FrameSource, base: CheckpointDir, scale: float = 1.0
) -> bytes | memoryview:
    """The bytes of one reconstructed tensor in the fine-tune's dtype (a view, not a copy,
    where the tensor was built in memory)."""
    if entry.dtype not in DTYPES:
        raise InvalidDelta(f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}")
    itemsize, dtype = DTYPES[entry.dtype]
    nbytes = entry.numel * itemsize
    if entry.kind == "dense":
        if entry.frame is None:
            raise InvalidDelta(f"dense tensor {entry.name!r} has no frame")
        return codec.zstd_decompress(reader.frame(entry.frame), nbytes)
    base_t = _base_tensor(base, entry)  # (numel,) in the base's dtype
    if entry.kind == "same":
        return tensor_view(base_t.to(dtype))
    if entry.kind == "lossless":
        if entry.frame is None or base_t.dtype != dtype:
            raise InvalidDelta(f"lossless tensor {entry.name!r} is malformed")
        frame = reader.frame(entry.frame)
        if scale == 1.0:  # base_t is a fresh buffer of ours: the planes are XORed into it
            return codec.decode_xor(
                frame, tensor_view(base_t), itemsize, in_place=True, plane_sizes=entry.planes
            )
        exact = codec.decode_xor(frame, tensor_view(base_t), itemsize, plane_sizes=entry.planes)
        ft = bytes_to_tensor(exact, entry.dtype, (entry.numel,)).to(torch.float32)
        b = base_t.to(torch.float32)
        return tensor_view((b + scale * (ft - b)).to(dtype))
    if entry.kind != "sparse":
        raise InvalidDelta(f"tensor {entry.name!r} has unknown kind {entry.kind!r}")
    positions, values = decode_sparse(entry, reader)
    idx = torch.from_numpy(positions)
    if base_t.dtype == dtype:
        out = base_t.clone() if not base_t.is_contiguous() else base_t
        out[idx] = (base_t[idx].to(torch.float32) + scale * values).to(dtype)
    else:
        full = base_t.to(torch.float32)
        full[idx] += scale * values
        out = full.to(dtype)
    return tensor_view(out)


def iter_file(
    reader: DeltaReader, base: CheckpointDir, file: FileEntry, scale: float = 1.0
) -> Iterator[bytes | memoryview]:
    """Stream one reconstructed file: header bytes, then each tensor's bytes in file order."""
    if file.role == "aux":
        if file.base_path is not None:
            path = base.root / check_relpath(file.base_path)
            if not path.is_file():
                raise BaseMismatch(
                    f"the base lacks {file.base_path}, which the delta shares with it"
                )
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    yield chunk
            return
        if file.frame is None:
            raise InvalidDelta(f"file {file.path!r} has no frame")
        yield codec.zstd_decompress(reader.frame(file.frame), file.size)
        return
    raw_header, header = weight_header(reader, file)
    yield raw_header
    entries = reader.doc.tensor_map()
    todo = []
    for name in header.tensors:
        entry = entries.get(name)
        if entry is None:
            raise InvalidDelta(
                f"weight file {file.path!r} names a tensor the delta lacks: {name!r}"
            )
        todo.append((entry, 0, None))
    yield from rebuilt_ahead(todo, reader, base, scale)


T = TypeVar("T")


def run_ahead(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """``items``, produced in a helper thread up to ``depth`` items ahead of the caller (so
    rebuilding the next piece overlaps hashing, writing or sending this one: torch, zstd, file
    reads and hashes release the GIL). Closing the returned iterator stops the helper; an
    error in it is raised here, in order."""
    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((False, item)):
                    return
            put((True, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((True, exc))

    helper = threading.Thread(target=produce, name="slim-rebuild", daemon=True)
    helper.start()
    try:
        while True:
            done, item = q.get()
            if done:
                if item is not None:
                    raise item
                return
            yield item
            del item
    finally:
        stop.set()
        helper.join()


def rebuilt_ahead(
    parts: Sequence[tuple[TensorEntry, int, int | None]],
    reader: FrameSource,
    base: CheckpointDir,
    scale: float = 1.0,
) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of each ``(entry, start, end)`` in order (``end`` None: to the
    tensor's end), as :func:`tensor_pieces` rebuilt ahead in a helper thread. Memory holds a
    few pieces, not tensors; the reader and the base are only used by the helper."""
    return run_ahead(
        chain.from_iterable(
            tensor_pieces(entry, reader, base, scale, start, end) for entry, start, end in parts
        )
    )


def tensor_pieces(
    entry: TensorEntry,
    reader: FrameSource,
    base: CheckpointDir,
    scale: float = 1.0,
    start: int = 0,
    end: int | None = None,
    piece: int = PIECE_BYTES,
) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of one reconstructed tensor, rebuilt about ``piece`` bytes at a
    time: memory holds one piece and the tensor's stored entries, not the tensor. The bytes
    are those of :func:`tensor_bytes` (the same arithmetic, element by element)."""
    if entry.dtype not in DTYPES:
        raise InvalidDelta(f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}")
    itemsize = DTYPES[entry.dtype][0]
    nbytes = entry.numel * itemsize
    end = nbytes if end is None else end
    if not 0 <= start <= end <= nbytes:
        raise ValueError(f"bytes {start}:{end} lie outside tensor {entry.name!r}")
    if start == end:
        return
    first, last = start // itemsize, -(-end // itemsize)  # elements covering the bytes
    make = _piece_maker(entry, reader, base, scale, first)
    if make is None:  # only rebuilt whole (lossless planes of format versions 1–2)
        whole = memoryview(tensor_bytes(entry, reader, base, scale))
        for i in range(start, end, piece):
            yield whole[i : min(i + piece, end)]
        return
    step = max(piece // itemsize, 1)
    for a in range(first, last, step):
        b = min(a + step, last)
        data = make(a, b)
        lo, hi = max(start, a * itemsize) - a * itemsize, min(end, b * itemsize) - a * itemsize
        yield data if (lo, hi) == (0, len(data)) else memoryview(data)[lo:hi]
    if last == entry.numel:
        make(last, last)  # lets a stream check that it ended where it should


def _piece_maker(
    entry: TensorEntry, reader: FrameSource, base: CheckpointDir, scale: float, first: int
) -> Callable[[int, int], bytes | memoryview] | None:
    """A function rebuilding elements ``[a, b)`` of the tensor, called with increasing,
    adjacent ranges from element ``first`` on; called with ``a == b == numel`` after the last
    piece, it checks that a streamed frame ended where it should. None: the tensor can only be
    rebuilt whole (lossless planes of format versions 1–2)."""
    itemsize, dtype = DTYPES[entry.dtype]
    numel = entry.numel
    if entry.kind == "dense":
        if entry.frame is None:
            raise InvalidDelta(f"dense tensor {entry.name!r} has no frame")
        stream = codec.FrameStream(reader.frame(entry.frame), numel * itemsize)
        _skip_stream(stream, first * itemsize)

        def dense(a: int, b: int) -> bytes | memoryview:
            if a == b:
                stream.finish()
                return b""
            buf = np.empty((b - a) * itemsize, dtype=np.uint8).data
            stream.readinto(buf)
            return buf

        return dense
    if entry.kind not in ("same", "sparse", "lossless"):
        raise InvalidDelta(f"tensor {entry.name!r} has unknown kind {entry.kind!r}")
    info = _base_info(base, entry)
    bitem = DTYPES[info.dtype][0]

    def base_piece(a: int, b: int) -> torch.Tensor:
        raw = base.read_bytes(info.name, a * bitem, (b - a) * bitem)
        return bytes_to_tensor(raw, info.dtype, (b - a,))

    if entry.kind == "same":
        return lambda a, b: tensor_view(base_piece(a, b).to(dtype))
    if entry.kind == "lossless":
        if entry.frame is None or info.dtype != entry.dtype:
            raise InvalidDelta(f"lossless tensor {entry.name!r} is malformed")
        planes = codec.XorPlanes(reader.frame(entry.frame), itemsize, numel, entry.planes)
        if not planes.streamable:
            return None
        planes.skip(first)

        def lossless(a: int, b: int) -> bytes | memoryview:
            if a == b:
                planes.finish()
                return b""
            inflating = planes.inflate(b - a)  # in other threads, while the base is read
            t = base_piece(a, b)
            b_f32 = t.to(torch.float32, copy=True) if scale != 1.0 else None
            raw = tensor_view(t)
            planes.xor_into(np.frombuffer(raw, dtype=f"<u{itemsize}"), inflating)
            if b_f32 is None:
                return raw
            return tensor_view((b_f32 + scale * (t.to(torch.float32) - b_f32)).to(dtype))

        return lossless
    positions, values = decode_sparse(entry, reader)
    scaled = values if scale == 1.0 else scale * values
    at = [int(np.searchsorted(positions, first))]

    def sparse(a: int, b: int) -> bytes | memoryview:
        if a == b:
            return b""
        i0 = at[0]
        i1 = i0 + int(np.searchsorted(positions[i0:], b))
        at[0] = i1
        t = base_piece(a, b)
        idx = torch.from_numpy(positions[i0:i1] - a)
        if info.dtype == entry.dtype:
            t[idx] = (t[idx].to(torch.float32) + scaled[i0:i1]).to(dtype)
            return tensor_view(t)
        full = t.to(torch.float32)
        full[idx] += scaled[i0:i1]
        return tensor_view(full.to(dtype))

    return sparse


def _skip_stream(stream: codec.FrameStream, n: int) -> None:
    scratch = np.empty(min(n, CHUNK_SIZE), dtype=np.uint8).data
    while n:
        m = min(n, len(scratch))
        stream.readinto(scratch[:m])
        n -= m


def weight_header(reader: FrameSource, file: FileEntry) -> tuple[bytes, Header]:
    """The original header bytes of a weight file, and the header parsed from them."""
    size = file.header_size
    if file.header_frame is None or size is None or not 8 < size <= 8 + MAX_HEADER_BYTES:
        raise InvalidDelta(f"weight file {file.path!r} has no valid header frame")
    raw = codec.zstd_decompress(reader.frame(file.header_frame), size)
    try:
        header = parse_header(raw, file_size=file.size)
    except InvalidSafetensors as exc:
        raise InvalidDelta(
            f"weight file {file.path!r}: stored header is invalid ({exc.detail})"
        ) from None
    return raw, header


def file_sha256(
    reader: DeltaReader, base: CheckpointDir, file: FileEntry, scale: float = 1.0
) -> str:
    """sha256 of a reconstructed file, computed from the stream (nothing written)."""
    h = hashlib.sha256()
    for chunk in iter_file(reader, base, file, scale):
        h.update(chunk)
    return h.hexdigest()


def expected_sha256(file: FileEntry, scale: float) -> str | None:
    """The hash a reconstruction must have: recorded at write time, for scale 1 only."""
    if scale != 1.0:
        return None
    return file.sha256 if file.role == "aux" else file.recon_sha256


def reconstruct(
    base_dir: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scale: float = 1.0,
) -> list[Path]:
    """Rebuild the fine-tune's directory from a base and a delta.

    Each file is written to ``<name>.incomplete``, checked against its recorded digest (at
    scale 1: xxh3-128 where recorded, else sha256) and moved into place; a mismatch raises
    and leaves no file at the final name.

    Args:
        base_dir: directory of the base model the delta was made from.
        delta_path: the delta file.
        out_dir: where to write; created if missing.
        scale: λ of θ_pre + λ·δ (1.0 rebuilds the compressed fine-tune).

    Returns:
        Paths of the written files.

    Raises:
        BaseMismatch, InvalidDelta, UnsupportedFormatVersion, IntegrityError.
    """
    out = Path(out_dir)
    base = CheckpointDir.open(base_dir)
    written: list[Path] = []
    with DeltaReader(delta_path) as reader, base:
        check_base(reader, base)
        for file in reader.doc.files:
            target = out / check_relpath(file.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".incomplete")
            check = rebuild_check(file, scale)
            with open(tmp, "wb") as f:
                for chunk in iter_file(reader, base, file, scale):
                    if check is not None:
                        check.update(chunk)
                    f.write(chunk)
            if check is not None and not check.ok():
                tmp.unlink()
                raise IntegrityError(
                    f"reconstructed {file.path} does not match the file recorded when the delta "
                    f"was written (sha256 {file.recon_sha256 or file.sha256}, checked by its "
                    f"{check.kind}); the base or the delta is not the one it was made with"
                )
            os.replace(tmp, target)
            written.append(target)
    return written


def check_base(reader: DeltaReader, base: CheckpointDir) -> None:
    """Cheap check that ``base`` is the delta's base: its weight files' names and sizes."""
    recorded = {f["path"]: f["size"] for f in reader.doc.base.get("files", [])}
    actual = {rel: h.file_size for rel, h in base.headers.items()}
    if recorded and recorded != actual:
        raise BaseMismatch(
            "the base directory's weight files differ from the base this delta was made from "
            f"(delta expects {sorted(recorded)}); pass the right base"
        )


def load_state(
    base_dir: str | os.PathLike[str], delta_path: str | os.PathLike[str], *, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """All reconstructed tensors in memory (for tests and small models)."""
    base = CheckpointDir.open(base_dir)
    out: dict[str, torch.Tensor] = {}
    with DeltaReader(delta_path) as reader, base:
        for entry in reader.doc.tensors:
            raw = tensor_bytes(entry, reader, base, scale)
            out[entry.name] = bytes_to_tensor(raw, entry.dtype, tuple(entry.shape)).clone()
    return out

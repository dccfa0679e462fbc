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
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import xxhash

from core.checkpoint import CheckpointDir
from core.constants import ITEMSIZES, MAX_HEADER_BYTES, PIECE_BYTES
from core.delta_format import Arriving, DeltaReader, FileEntry, FrameSource, TensorEntry
from core.errors import BaseMismatch, IntegrityError, InvalidDelta, InvalidSafetensors
from core.files import CHUNK_SIZE, check_path, write_all
from core.frames import FrameStream, zstd_decompress
from core.safetensors_io import Header, TensorInfo, parse_header
from core.xor import CASTS, XorPlanes, cast_base

if TYPE_CHECKING:
    import torch


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
    """The bytes of one reconstructed tensor in the fine-tune's dtype: its
    :func:`tensor_pieces` in one buffer (the piece itself, not a copy, when there is one)."""
    pieces = tensor_pieces(entry, reader, base, scale)
    first = next(pieces, b"")
    second = next(pieces, None)
    if second is None:
        return first
    out = np.empty(entry.numel * ITEMSIZES[entry.dtype], dtype=np.uint8)
    at = 0
    for part in chain((first, second), pieces):
        out[at : at + len(part)] = np.frombuffer(part, dtype=np.uint8)
        at += len(part)
    return out.data


def iter_file(
    reader: DeltaReader, base: CheckpointDir, file: FileEntry, scale: float = 1.0
) -> Iterator[bytes | memoryview]:
    """Stream one reconstructed file: header bytes, then each tensor's bytes in file order."""
    if file.role == "aux":
        if file.base_path is not None:
            path = base.root / check_path(file.base_path)
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
        yield zstd_decompress(reader.frame(file.frame), file.size)
        return
    raw_header, header = weight_header(reader, file)
    yield raw_header
    yield from rebuilt_ahead(weight_parts(reader, file, header), reader, base, scale)


def weight_parts(
    reader: DeltaReader, file: FileEntry, header: Header, start: int = 0, end: int | None = None
) -> list[tuple[TensorEntry, int, int]]:
    """``(entry, start, end)`` of each tensor holding bytes ``[start, end)`` of a weight file
    (``end`` None: to the end), the byte range within that tensor, in file order."""
    end = header.file_size if end is None else end
    entries = reader.doc.tensor_map()
    parts = []
    for name, info in header.tensors.items():
        lo, hi = header.data_offset + info.start, header.data_offset + info.end
        if hi <= start or lo == hi:
            continue
        if lo >= end:
            break
        entry = entries.get(name)
        if entry is None:
            raise InvalidDelta(
                f"weight file {file.path!r} names a tensor the delta lacks: {name!r}"
            )
        if entry.dtype in ITEMSIZES and entry.numel * ITEMSIZES[entry.dtype] != hi - lo:
            raise InvalidDelta(f"tensor {name!r} rebuilds to another size than its header says")
        parts.append((entry, max(start - lo, 0), min(end, hi) - lo))
    return parts


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
    *,
    piece: int = PIECE_BYTES,
    depth: int = 2,
    gate: Callable[[Iterator[bytes | memoryview]], Iterator[bytes | memoryview]] | None = None,
) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of each ``(entry, start, end)`` in order (``end`` None: to the
    tensor's end), as :func:`tensor_pieces` rebuilt about ``piece`` bytes at a time, ``depth``
    pieces ahead in a helper thread. Memory holds a few pieces, not tensors; the reader and the
    base are only used by the helper. ``gate`` wraps the pieces as they are made (a server
    limits how many are rebuilt at once across its streams)."""
    pieces = chain.from_iterable(
        tensor_pieces(entry, reader, base, scale, start, end, piece) for entry, start, end in parts
    )
    return run_ahead(gate(pieces) if gate is not None else pieces, depth)


def tensor_pieces(
    entry: TensorEntry,
    reader: FrameSource,
    base: CheckpointDir,
    scale: float = 1.0,
    start: int = 0,
    end: int | None = None,
    piece: int = PIECE_BYTES,
) -> Iterator[bytes | memoryview]:
    """Bytes ``[start, end)`` of one reconstructed tensor in the fine-tune's dtype, rebuilt
    about ``piece`` bytes at a time: memory holds one piece and the tensor's stored entries
    (a lowrank tensor's factors), not the tensor (except a lossless tensor of format versions
    1–2, inflated whole once)."""
    if entry.dtype not in ITEMSIZES:
        raise InvalidDelta(f"tensor {entry.name!r} has unknown dtype {entry.dtype!r}")
    itemsize = ITEMSIZES[entry.dtype]
    nbytes = entry.numel * itemsize
    end = nbytes if end is None else end
    if not 0 <= start <= end <= nbytes:
        raise ValueError(f"bytes {start}:{end} lie outside tensor {entry.name!r}")
    if start == end:
        return
    first, last = start // itemsize, -(-end // itemsize)  # elements covering the bytes
    make, finish = _piece_maker(entry, reader, base, scale, first)
    step = max(piece // itemsize, 1)
    for a in range(first, last, step):
        b = min(a + step, last)
        data = make(a, b)
        lo, hi = max(start, a * itemsize) - a * itemsize, min(end, b * itemsize) - a * itemsize
        yield data if (lo, hi) == (0, len(data)) else memoryview(data)[lo:hi]
    if last == entry.numel:
        finish()


def _nothing() -> None:
    pass


def _items(raw: memoryview, itemsize: int) -> np.ndarray:
    """Bytes as unsigned integers of the element width (a view, for XORing)."""
    return np.frombuffer(raw, dtype=f"<u{itemsize}")


def _piece_maker(
    entry: TensorEntry, reader: FrameSource, base: CheckpointDir, scale: float, first: int
) -> tuple[Callable[[int, int], bytes | memoryview], Callable[[], None]]:
    """A function rebuilding elements ``[a, b)`` of the tensor, to be called with increasing,
    adjacent ranges from element ``first`` on, and one to call after the last element (it
    checks that a streamed frame ended where it should).

    Bytes are rebuilt here without torch (``dense``, ``same`` in the base's dtype,
    ``lossless`` XOR planes); :mod:`core.delta_apply`, which imports torch, is imported only
    for a tensor needing float arithmetic (sparse, lowrank, a dtype conversion, λ ≠ 1)."""
    itemsize = ITEMSIZES[entry.dtype]
    numel = entry.numel
    if entry.kind == "dense":
        if entry.frame is None:
            raise InvalidDelta(f"dense tensor {entry.name!r} has no frame")
        stream = FrameStream(reader.frame(entry.frame), numel * itemsize)
        stream.skip(first * itemsize)

        def dense(a: int, b: int) -> memoryview:
            buf = np.empty((b - a) * itemsize, dtype=np.uint8).data
            stream.readinto(buf)
            return buf

        return dense, stream.finish
    if entry.kind not in ("same", "sparse", "lossless", "lowrank", "hybrid"):
        raise InvalidDelta(f"tensor {entry.name!r} has unknown kind {entry.kind!r}")
    info = _base_info(base, entry)
    bitem = ITEMSIZES[info.dtype]

    def base_piece(a: int, b: int) -> memoryview:
        return base.read_bytes(info.name, a * bitem, (b - a) * bitem)

    if entry.kind == "same" and info.dtype == entry.dtype:
        return base_piece, _nothing
    if entry.kind == "lossless":
        return _lossless_maker(entry, reader, info, base_piece, scale, first)
    from core import delta_apply  # torch: only for arithmetic

    if entry.kind == "same":
        return delta_apply.converted(info, entry, base_piece), _nothing
    if entry.kind in ("lowrank", "hybrid"):
        return delta_apply.lowrank_maker(entry, reader, info, base_piece, scale), _nothing
    return delta_apply.sparse_maker(entry, reader, info, base_piece, scale, first), _nothing


def _lossless_maker(
    entry: TensorEntry,
    reader: FrameSource,
    info: TensorInfo,
    base_piece: Callable[[int, int], memoryview],
    scale: float,
    first: int,
) -> tuple[Callable[[int, int], memoryview], Callable[[], None]]:
    """Elements ``[a, b)`` of a ``lossless`` tensor: the base's bytes (converted to the
    fine-tune's dtype where ``base_cast`` says so, version 5, §5b) undone by the stored planes
    (XOR or ulp residual; numpy and zstd, no torch), blended with the base by
    :func:`core.delta_apply.blend` where λ ≠ 1."""
    cast = bool(entry.base_cast)
    if entry.frame is None or (info.dtype != entry.dtype) != cast:
        raise InvalidDelta(f"lossless tensor {entry.name!r} is malformed")
    if cast and (info.dtype, entry.dtype) not in CASTS:
        raise InvalidDelta(f"lossless tensor {entry.name!r} casts {info.dtype} to {entry.dtype}")
    itemsize, numel = ITEMSIZES[entry.dtype], entry.numel

    def own_piece(a: int, b: int) -> memoryview:
        raw = base_piece(a, b)
        return cast_base(raw, info.dtype, entry.dtype).data.cast("B") if cast else raw

    planes = XorPlanes(
        reader.frame(entry.frame), itemsize, numel, entry.planes, entry.residual or "xor"
    )
    whole: memoryview | None = None
    if planes.streamable:
        planes.skip(first)
    else:  # versions 1–2: all planes in one frame, one after another: inflated whole, once
        whole = own_piece(0, numel)
        planes.apply(_items(whole, itemsize))
        planes.finish()
    blend: Callable[..., memoryview] | None = None
    if scale != 1.0:
        from core import delta_apply  # torch: only for arithmetic

        blend = delta_apply.blend

    def lossless(a: int, b: int) -> memoryview:
        before: memoryview | None = None
        if whole is not None:
            ft = whole[a * itemsize : b * itemsize]
            if blend is not None:
                before = base_piece(a, b)
        else:
            inflating = planes.inflate(b - a)  # in other threads, while the base is read
            ft = own_piece(a, b)
            if blend is not None:  # interpolation starts from the base as stored
                before = base_piece(a, b) if cast else memoryview(bytearray(ft))
            planes.xor_into(_items(ft, itemsize), inflating)
        if blend is None or before is None:
            return ft
        return blend(before, ft, entry.dtype, scale, before_dtype=info.dtype)

    return lossless, (_nothing if whole is not None else planes.finish)


def weight_header(reader: FrameSource, file: FileEntry) -> tuple[bytes, Header]:
    """The original header bytes of a weight file, and the header parsed from them."""
    size = file.header_size
    if file.header_frame is None or size is None or not 8 < size <= 8 + MAX_HEADER_BYTES:
        raise InvalidDelta(f"weight file {file.path!r} has no valid header frame")
    raw = zstd_decompress(reader.frame(file.header_frame), size)
    try:
        header = parse_header(raw, file_size=file.size)
    except InvalidSafetensors as exc:
        raise InvalidDelta(
            f"weight file {file.path!r}: stored header is invalid ({exc.detail})"
        ) from None
    return raw, header


def expected_sha256(file: FileEntry, scale: float) -> str | None:
    """The hash a reconstruction must have: recorded at write time, for scale 1 only."""
    if scale != 1.0:
        return None
    return file.sha256 if file.role == "aux" else file.recon_sha256


#: Bytes of rebuilt tensors an offline rebuild holds ahead of the one being written.
AHEAD_BYTES = 256 << 20
#: ... and at most this many tensors (norms and biases are small tasks).
AHEAD_TENSORS = 64


def default_workers() -> int:
    """Threads an offline rebuild uses: one per core, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


def reconstruct(
    base_dir: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    scale: float = 1.0,
    workers: int | None = None,
    digests: dict[str, str] | None = None,
    arriving: Arriving | None = None,
) -> list[Path]:
    """Rebuild the fine-tune's directory from a base and a delta.

    Each file is written to ``<name>.incomplete``, checked against its recorded digest (at
    scale 1: xxh3-128 where recorded, else sha256) and moved into place; a mismatch raises
    and leaves no file at the final name. Tensors are rebuilt by ``workers`` threads, several
    at once (up to :data:`AHEAD_BYTES` ahead), and written and checked in file order. Files
    are rebuilt in the order of the frames they read, so a rebuild following a download
    (``arriving``) waits only for the frames it needs next.

    Args:
        base_dir: directory of the base model the delta was made from.
        delta_path: the delta file.
        out_dir: where to write; created if missing.
        scale: λ of θ_pre + λ·δ (1.0 rebuilds the compressed fine-tune).
        workers: threads rebuilding tensors (default :func:`default_workers`).
        digests: filled with each written file's sha256 by its path: the recorded one where
            the file was checked against the delta's record, else hashed while writing.
        arriving: the delta at ``delta_path`` is still being written (a download): frames
            are read as they arrive, and no file is moved into place before the whole delta
            has arrived and passed its check (:meth:`~core.delta_format.Arriving.wait`).

    Returns:
        Paths of the written files.

    Raises:
        BaseMismatch, InvalidDelta, UnsupportedFormatVersion, IntegrityError.
    """
    out = Path(out_dir)
    workers = workers or default_workers()
    base = CheckpointDir.open(base_dir)
    written: list[Path] = []
    with (
        DeltaReader(delta_path, arriving=arriving) as reader,
        base,
        _Rebuilders(base_dir, delta_path, arriving) as pool,
    ):
        check_base(reader, base)
        for file in sorted(reader.doc.files, key=lambda f: _first_frame(reader, f)):
            target = out / check_path(file.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".incomplete")
            check = rebuild_check(file, scale)
            sha = hashlib.sha256() if digests is not None and check is None else None
            if file.role == "aux" or workers == 1:
                chunks = iter_file(reader, base, file, scale)
            else:
                raw_header, header = weight_header(reader, file)
                parts = weight_parts(reader, file, header)
                chunks = chain((raw_header,), pool.rebuilt(parts, scale, workers))
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    if check is not None:
                        check.update(chunk)
                    if sha is not None:
                        sha.update(chunk)
                    write_all(f.fileno(), chunk)
            if check is not None and not check.ok():
                tmp.unlink()
                raise IntegrityError(
                    f"reconstructed {file.path} does not match the file recorded when the delta "
                    f"was written (sha256 {file.recon_sha256 or file.sha256}, checked by its "
                    f"{check.kind}); the base or the delta is not the one it was made with"
                )
            if arriving is not None:
                try:
                    arriving.wait(arriving.size)  # the delta itself checked, before any move
                except BaseException:
                    tmp.unlink()
                    raise
            os.replace(tmp, target)
            written.append(target)
            if digests is not None:
                recorded = expected_sha256(file, scale) if check is not None else None
                digests[file.path] = recorded or (sha.hexdigest() if sha is not None else "")
    return written


class _Rebuilders:
    """Threads rebuilding whole tensors, each with its own delta reader and base (their file
    handles seek), for :func:`reconstruct`."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        delta_path: str | os.PathLike[str],
        arriving: Arriving | None = None,
    ) -> None:
        self._base_dir, self._delta_path, self._arriving = base_dir, delta_path, arriving
        self._local = threading.local()
        self._opened: list[tuple[DeltaReader, CheckpointDir]] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> _Rebuilders:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for reader, base in self._opened:
            reader.close()
            base.close()

    def _tensor(self, entry: TensorEntry, scale: float) -> list[bytes | memoryview]:
        opened = getattr(self._local, "opened", None)
        if opened is None:
            opened = self._local.opened = (
                DeltaReader(self._delta_path, arriving=self._arriving),
                CheckpointDir.open(self._base_dir),
            )
            with self._lock:
                self._opened.append(opened)
        reader, base = opened
        return list(tensor_pieces(entry, reader, base, scale))

    def rebuilt(
        self, parts: Sequence[tuple[TensorEntry, int, int]], scale: float, workers: int
    ) -> Iterator[bytes | memoryview]:
        """The bytes of each whole tensor of ``parts``, in order, rebuilt by ``workers``
        threads while fewer than :data:`AHEAD_BYTES` wait to be taken (at least one tensor)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="slim-rebuild")
        pending: deque[tuple[Future[list[bytes | memoryview]], int]] = deque()
        ahead = 0
        todo = iter(parts)
        try:
            while True:
                for entry, _, nbytes in todo:  # whole tensors: (entry, 0, its size)
                    pending.append((self._pool.submit(self._tensor, entry, scale), nbytes))
                    ahead += nbytes
                    if ahead >= AHEAD_BYTES or len(pending) >= AHEAD_TENSORS:
                        break
                if not pending:
                    return
                future, nbytes = pending.popleft()
                yield from future.result()
                ahead -= nbytes
        finally:
            for future, _ in pending:
                future.cancel()
            for future, _ in pending:
                if not future.cancelled():
                    future.exception()  # wait: its reader and base close after it


def _first_frame(reader: DeltaReader, file: FileEntry) -> int:
    """Where the first frame a file's rebuild reads lies in the delta (0: it reads none)."""
    name = file.header_frame if file.role == "weights" else file.frame
    info = reader.header.tensors.get(name) if name is not None else None
    return 0 if info is None else info.start


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
    from core.safetensors_io import bytes_to_tensor

    base = CheckpointDir.open(base_dir)
    out: dict[str, torch.Tensor] = {}
    with DeltaReader(delta_path) as reader, base:
        for entry in reader.doc.tensors:
            raw = tensor_bytes(entry, reader, base, scale)
            out[entry.name] = bytes_to_tensor(raw, entry.dtype, tuple(entry.shape)).clone()
    return out

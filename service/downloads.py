"""Streamed downloads: reconstructed checkpoint files, stored blobs, with ``Range`` support.

A reconstructed weight file is its original header followed by each tensor rebuilt from the
base and the delta a piece at a time (:func:`core.reconstruct.tensor_pieces`), so every byte
offset is known from the recorded header without rebuilding anything and memory holds a few
pieces whatever the tensor sizes: a ``Range: bytes=a-b`` request rebuilds only the elements
that hold bytes ``a`` to ``b``.

At scale 1 a full download is hashed as it streams and checked against the digest recorded
when the delta was written (:func:`core.reconstruct.rebuild_check`: xxh3-128, fast enough not
to cap the stream; sha256 for version-1 deltas — the sha256 stays the ETag that clients check
end to end); the last chunk is held back until the hash is known (:func:`verified`, shared
with stored blobs), and on a mismatch the stream is aborted (the client sees a short body,
never a silently wrong file) and ``integrity_error`` is logged. Range responses cannot be checked as a whole; every delta
frame they read is still checked against its own hash.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from core.checkpoint import CheckpointDir
from core.delta_format import DeltaReader, FileEntry
from core.errors import IntegrityError, InvalidDelta
from core.files import CHUNK_SIZE, HEADER_XXH3
from core.reconstruct import (
    StreamCheck,
    check_base,
    iter_file,
    rebuild_check,
    rebuilt_ahead,
    weight_header,
    weight_parts,
)
from service.errors import RangeNotSatisfiable
from storage.blobstore import BlobStore, sha256_of_key
from storage.cache import BlobCache, FileSpec
from storage.errors import BlobNotFound
from storage.models import Checkpoint
from storage.repo import list_files

log = logging.getLogger("slim.service")

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of a file of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks for, or None to send the whole file.

    Malformed headers and multi-range requests are ignored (RFC 9110 allows that): the whole
    file is sent. Raises :class:`RangeNotSatisfiable` (416) for a range outside the file.
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable("an empty suffix range selects nothing", size)
        return ByteRange(max(size - n, 0), size, size)
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(
            f"range starts at byte {start} but the file has {size} bytes; "
            "resume from an offset below the size",
            size,
        )
    return ByteRange(start, end, size)


#: Bytes handed to the server per send. A bare Starlette stream on loopback sent 1.2 GB/s in
#: 4 MiB pieces against 0.8 in 1 MiB ones, but the server copies each piece with the GIL held
#: (h11 joins it into one bytes): with 16 streams those 4 MiB copies kept the event loop on the
#: GIL and new requests waited seconds for their first byte (bench/results/load.md).
SEND_SIZE = CHUNK_SIZE
#: A download's tensors are rebuilt this many bytes at a time, each piece a little ahead of the
#: send (:data:`AHEAD`): what a stream holds is a few pieces, so 16 streams add 16 x that.
PIECE_SIZE = 4 << 20
AHEAD = 1
#: Pieces this process rebuilds at once, whatever the number of downloads: one per core. More
#: only queue for the cores and the GIL while each holds a piece's working memory (16 lossless
#: pulls spent 1.6x the CPU per byte of one, and the API's peak RSS grew 2.9x).
REBUILD_AT_ONCE = os.cpu_count() or 1
REBUILD_SLOTS = threading.BoundedSemaphore(REBUILD_AT_ONCE)


def in_turn(pieces: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """``pieces``, each one made while holding one of :data:`REBUILD_SLOTS` (released before
    it is handed on, so a slow client never holds a slot; waiters are served in turn)."""
    while True:
        with REBUILD_SLOTS:
            piece = next(pieces, None)
        if piece is None:
            return
        yield piece


def _slices(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """SEND_SIZE views of ``data`` (no copies: the server writes memoryviews as they are)."""
    view = memoryview(data)
    for i in range(0, len(view), SEND_SIZE):
        yield view[i : i + SEND_SIZE]


@dataclass
class Reconstruction:
    """One reconstructed file, ready to stream; owns the open delta and base (closed at the end).

    Build with :func:`open_reconstruction` (in a worker thread: it may download the delta and
    the base into the cache), then iterate :meth:`chunks`.
    """

    reader: DeltaReader
    base: CheckpointDir
    file: FileEntry
    scale: float
    size: int
    _closed: bool = field(default=False, init=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.reader.close()
            self.base.close()

    def chunks(self, byte_range: ByteRange | None) -> Iterator[bytes | memoryview]:
        """The file's bytes (or one range of them), closing the files when done."""
        try:
            if byte_range is None:
                yield from self._verified(self._iter(0, self.size))
            else:
                yield from self._iter(byte_range.start, byte_range.end)
        finally:
            self.close()

    def _iter(self, start: int, end: int) -> Iterator[bytes | memoryview]:
        if self.file.role == "aux":
            yield from _skip(iter_file(self.reader, self.base, self.file, self.scale), start, end)
            return
        raw, header = weight_header(self.reader, self.file)
        if start < len(raw):
            yield from _slices(raw[start : min(end, len(raw))])
        parts = weight_parts(self.reader, self.file, header, start, end)
        rebuilt = rebuilt_ahead(
            parts, self.reader, self.base, self.scale, piece=PIECE_SIZE, depth=AHEAD, gate=in_turn
        )
        for data in rebuilt:
            yield from _slices(data)
            del data

    def _verified(self, chunks: Iterator[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        check = rebuild_check(self.file, self.scale)
        if check is None:
            return chunks
        return verified(
            chunks,
            check,
            size=self.size,
            what=self.file.path,
            cause="the base or the delta is corrupted — the download was aborted; restore the "
            "blob (see `slim scrub`) and retry",
        )


def _skip(
    chunks: Iterator[bytes | memoryview], start: int, end: int
) -> Iterator[bytes | memoryview]:
    pos = 0
    for chunk in chunks:
        lo, hi = pos, pos + len(chunk)
        pos = hi
        if hi <= start:
            continue
        if lo >= end:
            break
        yield chunk[max(start - lo, 0) : min(end, hi) - lo]


def open_reconstruction(
    delta_path: Path, base_dir: Path, path: str, scale: float
) -> Reconstruction:
    """Open the delta and the base and find ``path`` in the delta (raises before streaming)."""
    reader = DeltaReader(delta_path)
    try:
        base = CheckpointDir.open(base_dir)
        try:
            check_base(reader, base)
            file = next((f for f in reader.doc.files if f.path == path), None)
            if file is None:
                raise InvalidDelta(f"the stored delta has no file {path!r}")
        except BaseException:
            base.close()
            raise
    except BaseException:
        reader.close()
        raise
    return Reconstruction(reader, base, file, scale, file.size)


@dataclass(frozen=True)
class Rebuild:
    """What rebuilding the files of a stored checkpoint needs, read while the session is open
    (a stream then runs without a database connection): its delta and its base's files."""

    delta_key: str
    base_id: str
    base_files: list[FileSpec]

    @classmethod
    def of(cls, session: Session, checkpoint: Checkpoint) -> Rebuild:
        if checkpoint.delta_blob_key is None:
            raise InvalidDelta(f"checkpoint {checkpoint.name!r} has no stored delta")
        rows = list_files(session, base_id=checkpoint.base_id)
        specs = [FileSpec(r.path, r.blob_key) for r in rows if r.blob_key is not None]
        return cls(checkpoint.delta_blob_key, checkpoint.base_id, specs)

    def headers(
        self, cache: BlobCache, path: str, scale: float = 1.0
    ) -> tuple[int, dict[str, str]]:
        """The rebuilt file's size, and the headers that say what it is before its first
        byte: at scale 1, :data:`HEADER_XXH3` — the xxh3-128 recorded when the delta was
        written, which a client can check the whole body against at a fraction of sha256's
        cost (the ETag stays the sha256)."""
        file = reconstructed_file(cache.path(self.delta_key), path)
        fast = file.recon_xxh3 if scale == 1.0 else None
        return file.size, ({HEADER_XXH3: fast} if fast else {})

    def open(self, cache: BlobCache, path: str, scale: float = 1.0) -> Reconstruction:
        """:func:`open_reconstruction` of ``path`` (the delta and base fetched into the cache)."""
        delta = cache.path(self.delta_key)
        base_dir = cache.shared_dir(f"base-{self.base_id}", self.base_files)
        return open_reconstruction(delta, base_dir, path, scale)


def reconstructed_file(delta_path: Path, path: str) -> FileEntry:
    """The delta's record of the rebuilt file ``path``: the bytes it streams are ``.size``
    (the same at every scale — a rebuilt tensor keeps its dtype and shape), read from the
    delta's document, never from a database row.

    Raises:
        InvalidDelta: the delta has no such file.
    """
    with DeltaReader(delta_path) as reader:
        file = next((f for f in reader.doc.files if f.path == path), None)
    if file is None:
        raise InvalidDelta(
            f"the stored delta has no file {path!r}; list what it rebuilds with "
            "GET /v1/checkpoints/{id}/files"
        )
    return file


def blob_size(store: BlobStore, key: str, what: str) -> int:
    """The size of the stored blob ``key`` as the store holds it (the bytes a download of it
    streams).

    Raises:
        BlobNotFound: the store holds nothing under ``key``.
    """
    size = store.head(key)
    if size is None:
        raise BlobNotFound(
            f"the bytes of {what} are missing from the blob store (key {key}); restore the blob "
            "(see `slim scrub`) or push it again"
        )
    return size


def blob_chunks(
    store: BlobStore, key: str, byte_range: ByteRange | None
) -> Iterator[bytes | memoryview]:
    """A stored blob's bytes, or one range of them.

    A whole blob is checked against the sha256 its content key names as it streams: the last
    chunk is held back, and on a mismatch the stream is cut (``integrity_error`` logged).
    """
    if byte_range is None:
        want = sha256_of_key(key)
        chunks = store.open_range(key)
        if want is None:
            return chunks
        return verified(
            chunks,
            StreamCheck("sha256", want),
            what=f"blob {key}",
            cause="the stored bytes are corrupted — the download was aborted; restore the blob "
            "(see `slim scrub`) and retry",
        )
    return store.open_range(key, byte_range.start, byte_range.end)


def verified(
    chunks: Iterator[bytes | memoryview],
    check: StreamCheck,
    *,
    what: str,
    cause: str,
    size: int | None = None,
) -> Iterator[bytes | memoryview]:
    """Pass chunks through ``check``; hold the last one back until the digest is known.

    With the stream's ``size`` known, a chunk that ends before it goes on at once (only the
    one that reaches ``size`` is held: the header of a rebuilt file is sent before its first
    piece is rebuilt); without it, each chunk waits for the next.

    Raises:
        IntegrityError: the bytes do not match (after all but the last chunk went); the
            message names ``what`` and ends with ``cause``.
    """
    held: bytes | memoryview | None = None
    pos = 0
    try:
        for chunk in chunks:
            check.update(chunk)
            if held is not None:
                yield held
                held = None
            pos += len(chunk)
            if size is not None and pos < size:
                yield chunk
            else:
                held = chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if not check.ok():
        log.error(
            "integrity_error: %s reads back with %s %s, recorded %s; stream aborted",
            what,
            check.kind,
            check.got,
            check.want,
        )
        raise IntegrityError(f"{what} does not match its recorded {check.kind}; {cause}")
    if held is not None:
        yield held

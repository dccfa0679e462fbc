"""``LocalBlobStore``: content-addressed blobs in a local directory.

Layout under ``root``: ``sha256/<first2>/<hex>`` for blobs (read-only files) and
``tmp/<uuid>.part`` for uploads in progress. Every write goes to a temporary file, is fsynced,
and is moved into place with :func:`os.replace`, so a key either holds its complete bytes or
does not exist.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from core.files import CHUNK_SIZE
from storage.blob_common import (
    TMP_PREFIX,
    BlobEntry,
    BlobInfo,
    CappedHasher,
    check_key,
    check_range,
    check_sha256,
    download_to_file,
    iter_file,
)
from storage.errors import BlobNotFound, StorageFull


class LocalBlobStore:
    """Blob store over a directory; :meth:`local_path` gives real paths callers can mmap."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / TMP_PREFIX).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def put_stream(
        self,
        chunks: Iterable[bytes],
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
    ) -> BlobInfo:
        """Store a stream under its content key; see :meth:`BlobStore.put_stream`."""
        check_sha256(expected_sha256)
        tmp = self.root / TMP_PREFIX / f"{uuid.uuid4().hex}.part"
        hasher = CappedHasher(max_bytes)
        try:
            with _space_errors(), tmp.open("xb") as f:
                for chunk in chunks:
                    hasher.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            info = hasher.finish(expected_sha256)
            final = self._path(info.key)
            if _file_size(final) == info.size:
                # Dedup: keep the existing copy, but refresh its mtime so a garbage collection
                # that listed it as old and unreferenced skips it (see storage.gc).
                os.utime(final)
            else:
                with _space_errors():
                    final.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            return info
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(
        self, path: str | os.PathLike[str], *, expected_sha256: str | None = None
    ) -> BlobInfo:
        """Store a local file under its content key."""
        return self.put_stream(iter_file(Path(path)), expected_sha256=expected_sha256)

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of a blob; see :meth:`BlobStore.open_range`."""
        check_range(start, end)
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return _read_range(path, key, start, end)

    def get_to_file(self, key: str, path: str | os.PathLike[str]) -> BlobInfo:
        """Copy a blob to ``path`` atomically, verifying its sha256 (see BlobStore)."""
        return download_to_file(self.open_range(key), key, Path(path))

    def head(self, key: str) -> int | None:
        """Size in bytes of the blob under ``key``, or None if there is none."""
        return _file_size(self._path(key))

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def delete(self, key: str) -> None:
        """Remove a blob; deleting a missing key is not an error."""
        self._path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str = "") -> Iterator[BlobEntry]:
        """Every object whose key starts with ``prefix`` (temporary uploads included)."""
        directory = prefix.rpartition("/")[0]
        top = self._path(directory) if directory else self.root
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(dirpath, name)
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:  # deleted while we walked
                    continue
                yield BlobEntry(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def local_path(self, key: str) -> Path | None:
        """The file holding the blob (open it read-only, e.g. to mmap).

        Raises:
            BlobNotFound: nothing is stored under ``key``.
        """
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path

    def last_modified(self, key: str) -> datetime | None:
        """When the object was written or last refreshed by a dedup hit (UTC), or None."""
        try:
            return datetime.fromtimestamp(self._path(key).stat().st_mtime, UTC)
        except FileNotFoundError:
            return None

    def cleanup_incomplete(self, older_than: datetime) -> int:
        """Nothing to do: unfinished uploads are files under ``tmp/`` that GC lists itself."""
        return 0


@contextmanager
def _space_errors() -> Iterator[None]:
    """Turn "no space left" (ENOSPC, EDQUOT) into :class:`StorageFull`."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(
                "the blob store's disk is full; nothing was stored — free space (e.g. "
                "`slim gc`) or grow the volume, then send the file again"
            ) from exc
        raise


def _read_range(path: Path, key: str, start: int, end: int | None) -> Iterator[bytes]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise BlobNotFound(key) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        stop = size if end is None else min(end, size)
        f.seek(start)
        remaining = stop - start
        while remaining > 0:
            chunk = f.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk


def _file_size(path: Path) -> int | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size if path.is_file() else None


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

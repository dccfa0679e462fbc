"""Blobs as local files, for core functions that take paths.

``core`` reads checkpoints and deltas from directories on disk. The local blob store already
has real files, so a checkpoint directory is a folder of symlinks into it (zero copy). An S3
blob is downloaded once into a cache keyed by its content key (so its sha256), atomically and
verified, and shared by every job and request of this process (and by other processes that use
the same cache directory). The reconstruct endpoint and the worker both use this module.

Several processes (``slim serve --workers N``, or a worker beside the API) share one cache
directory: a download or a directory build holds an exclusive ``flock`` on a lock file under
``<cache_dir>/locks`` as well as a thread lock, so one process fetches a blob while the others
wait and then find it in place, and a materialised directory is never replaced while it is
whole (only a tree with a dead link is, and it is moved aside before a new one is renamed in).
Every file is first written under a temporary name and renamed, so a reader never sees a
partial one whatever the locks.

The cache is never evicted automatically; remove ``<cache_dir>/blobs`` to reclaim the space
(everything in it can be fetched again).

Integrity: every local file handed out (a local store's blob, or a cached copy) is hashed
against the sha256 its content key names the first time this process uses it, and again
whenever its size or modification time changes; a mismatch raises ``integrity_error``, so a
job or a download never works from silently corrupted bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.files import CHUNK_SIZE, check_path
from storage.blobstore import BlobStore, sha256_of_key
from storage.errors import IntegrityError

log = logging.getLogger("slim.storage")


@dataclass(frozen=True, slots=True)
class FileSpec:
    """What a directory entry needs: its relative path and the blob holding its bytes."""

    path: str
    blob_key: str


class BlobCache:
    """Local file paths for blobs: the store's own files, or verified downloaded copies."""

    def __init__(self, store: BlobStore, cache_dir: str | os.PathLike[str]) -> None:
        self.store = store
        self.root = Path(cache_dir)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._verified: dict[str, tuple[int, int]] = {}  # key -> (size, mtime_ns) checked

    def path(self, key: str) -> Path:
        """A local file holding the blob under ``key`` (downloaded on first use), its bytes
        checked against the key's sha256 (once per process while the file is unchanged).

        Raises:
            BlobNotFound: the store holds nothing under ``key``.
            IntegrityError: the stored bytes do not match the key's sha256.
        """
        local = self.store.local_path(key)
        if local is not None:
            self._verify(key, local)
            return local
        target = self.root / "blobs" / key
        if target.is_file():
            self._verify(key, target)
            return target
        with self._exclusive(key):
            if not target.is_file():
                self.store.get_to_file(key, target)  # verified while downloading
                self._remember(key, target)
        self._verify(key, target)
        return target

    def _verify(self, key: str, path: Path) -> None:
        want = sha256_of_key(key)
        if want is None:
            return
        st = path.stat()
        if self._verified.get(key) == (st.st_size, st.st_mtime_ns):
            return
        with self._lock_for(key):
            st = path.stat()
            if self._verified.get(key) == (st.st_size, st.st_mtime_ns):
                return
            h = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    h.update(chunk)
            if h.hexdigest() != want:
                log.error("integrity_error: blob %s hashes to %s on disk", key, h.hexdigest())
                raise IntegrityError(
                    f"blob {key} is corrupted on disk (it hashes to {h.hexdigest()}); restore it "
                    "from a replica or re-upload the file (`slim scrub` lists what is affected)"
                )
            self._verified[key] = (st.st_size, st.st_mtime_ns)

    def _remember(self, key: str, path: Path) -> None:
        st = path.stat()
        self._verified[key] = (st.st_size, st.st_mtime_ns)

    def materialize(self, files: Iterable[FileSpec], directory: Path) -> Path:
        """Build ``directory`` as a tree of symlinks to the files' blobs; returns it."""
        directory.mkdir(parents=True, exist_ok=True)
        for spec in files:
            link = directory / check_path(spec.path)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.path(spec.blob_key).resolve())
        return directory

    def shared_dir(self, name: str, files: list[FileSpec]) -> Path:
        """A materialised directory kept under the cache and reused while its files are the same.

        ``name`` identifies the owner (e.g. a base id); the directory is named after a digest of
        the file list, built under a temporary name and renamed into place, so concurrent
        builders never see a partial tree.
        """
        digest = hashlib.sha256(
            "".join(
                f"{f.path}\0{f.blob_key}\n" for f in sorted(files, key=lambda f: f.path)
            ).encode()
        ).hexdigest()[:16]
        final = self.root / "dirs" / f"{name}-{digest}"
        if final.is_dir() and _links_alive(final):
            for spec in files:  # checked once per process (a no-op after the first time)
                self.path(spec.blob_key)
            return final
        with self._exclusive(str(final)):
            if final.is_dir() and _links_alive(final):
                return final
            tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.incomplete")
            try:
                self.materialize(files, tmp)
                if final.exists():  # a dead tree (a blob it linked is gone): move it aside
                    stale = final.with_name(f".{final.name}.{uuid.uuid4().hex}.stale")
                    os.rename(final, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    @contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        """Hold ``name`` against this process's other threads and against every process that
        shares the cache directory (an ``flock`` on ``<cache_dir>/locks/<digest>.lock``,
        released when the file is closed, so also when a process dies holding it)."""
        with self._lock_for(name):
            locks = self.root / "locks"
            locks.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(name.encode()).hexdigest()[:32]
            fd = os.open(locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


def _links_alive(directory: Path) -> bool:
    """Whether every symlink in a materialised tree still points at a file (a blob may have
    been garbage-collected, or the cache cleared, since it was built)."""
    for dirpath, _dirnames, filenames in os.walk(directory):
        for name in filenames:
            if not Path(dirpath, name).is_file():
                return False
    return True

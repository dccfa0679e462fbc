"""Streaming transfers with resume and hashing.

A push (:func:`upload`) re-sends only the files whose sha256 differs from what the server lists
(``GET …/files``), hashing each file as it streams and checking the server stored the same
digest. A pull (:func:`download`) continues each ``<file>.incomplete`` with ``Range`` +
``If-Range`` and moves it into place only once its sha256 matches the ETag (the sha256 the
server recorded when the delta was written). :func:`download_all` reads two files at a time,
each hashed in a thread of its own; :class:`FollowedDownload` lets a reader (the rebuild of
``pull --local``) use a file's bytes as they land, and learn at the end whether it matched.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import xxhash

from client.errors import BadRequest, IntegrityError, ServerError
from client.files import INCOMPLETE
from client.http import Body, Connection
from client.models import FileInfo, NoProgress, Progress, PulledFile, PushReport, build
from core.files import CHUNK_SIZE, HEADER_XXH3, manifest_sha256, sha256_file, write_all

__all__ = [
    "CHUNK_SIZE",
    "Wanted",
    "download",
    "download_all",
    "inside",
    "manifest_sha256",
    "quote_path",
    "sha256_file",
    "upload",
]


#: Buffers of :data:`CHUNK_SIZE` bytes in flight in a download (read, written, hashed).
BUFFERS = 4
#: Files a pull reads at once.
STREAMS = 2


def quote_path(path: str) -> str:
    """A relative file path as URL path segments (each percent-encoded)."""
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


def inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing paths that would leave ``root`` (a hostile listing)."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise BadRequest(f"refusing the unsafe file path {rel!r}", code="invalid_path")
    return root.joinpath(*parts)


def _read_chunks(path: Path, h: Any, advance: Callable[[int], None]) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
            advance(len(chunk))
            yield chunk


def upload(
    conn: Connection,
    owner: str,
    files: list[tuple[str, Path]],
    progress: Progress | None,
    digests: dict[str, str] | None = None,
) -> PushReport:
    """PUT every file whose sha256 the server does not already list under ``owner``
    (``digests``: sha256 by path already computed by the caller, not read again)."""
    bar = progress or NoProgress()
    t0 = time.perf_counter()
    remote = {
        f.path: f for f in (build(FileInfo, d) for d in conn.json("GET", f"{owner}/files")["data"])
    }
    report = PushReport()
    todo: list[tuple[str, Path, int]] = []
    for rel, path in files:
        size = path.stat().st_size
        have = remote.get(rel)
        unchanged = have is not None and have.stored and have.size == size
        known = (digests or {}).get(rel)
        if unchanged and have is not None and (known or sha256_file(path)) == have.sha256:
            report.skipped.append(rel)
            continue
        todo.append((rel, path, size))
    bar.start(f"uploading {len(todo)} file(s)", sum(size for _, _, size in todo))
    try:
        for rel, path, size in todo:
            h = hashlib.sha256()
            answer = conn.json(
                "PUT",
                f"{owner}/files/{quote_path(rel)}",
                content=_read_chunks(path, h, bar.advance),
                headers={"Content-Length": str(size)},
            )
            if answer.get("sha256") != h.hexdigest():
                raise IntegrityError(
                    f"the server stored {rel} with sha256 {answer.get('sha256')}, but "
                    f"{h.hexdigest()} was sent (did the file change during the upload?); "
                    "push again"
                )
            report.sent.append(rel)
            report.bytes_sent += size
    finally:
        bar.finish()
    report.seconds = time.perf_counter() - t0
    return report


class _Hasher:
    """Hashes buffers in a thread of its own, so the sha256 (~1.3 GB/s on one core) runs while
    the next buffer is read and written instead of after; hands each buffer back when done."""

    def __init__(self, h: Any, buffers: int, size: int) -> None:
        self._h = h
        self._todo: queue.SimpleQueue[tuple[memoryview, int] | None] = queue.SimpleQueue()
        self.free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(buffers):
            self.free.put(memoryview(bytearray(size)))
        self._thread = threading.Thread(target=self._run, name="slim-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            view, n = item
            self._h.update(view[:n])
            self.free.put(view)

    def hash(self, view: memoryview, n: int) -> None:
        """Hash the first ``n`` bytes of ``view``, then hand it back through :attr:`free`."""
        self._todo.put((view, n))

    def close(self) -> None:
        """Wait until every buffer handed over is hashed."""
        self._todo.put(None)
        self._thread.join()


def receive(
    body: Body,
    part: Path,
    h: Any,
    *,
    append: bool,
    progress: Progress,
    landed: Callable[[int], None] | None = None,
) -> None:
    """Write ``body`` to ``part`` (appended, or from scratch) and hash it into ``h``.

    The body is read straight into a few reused buffers of :data:`CHUNK_SIZE` bytes; each is
    written with ``os.write`` and hashed in a second thread while the next one is read. What
    reached the file is always a prefix of the body, so an interrupted transfer resumes from
    the file's size. ``landed(n)`` is told after each write that the file holds ``n`` bytes.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(part, flags | getattr(os, "O_BINARY", 0), 0o666)
    at = os.fstat(fd).st_size if append else 0
    hasher = _Hasher(h, BUFFERS, CHUNK_SIZE)
    try:
        while True:
            view = hasher.free.get()
            n = body.readinto(view)
            if not n:
                break
            write_all(fd, view[:n])
            hasher.hash(view, n)
            progress.advance(n)
            at += n
            if landed is not None:
                landed(at)
            if n < len(view):
                break
    finally:
        hasher.close()
        os.close(fd)


def partial(target: Path) -> Path:
    """Where a download of ``target`` lies until it is whole and checked."""
    return target.with_name(target.name + INCOMPLETE)


def download(
    conn: Connection,
    url: str,
    target: Path,
    *,
    rel: str | None = None,
    size: int,
    sha256: str | None,
    params: dict[str, str] | None = None,
    progress: Progress,
) -> PulledFile:
    """Fetch ``url`` into ``target`` through ``target.incomplete`` (resumed with Range),
    checked against ``sha256`` (or the answer's ETag) before the atomic move; a ``target``
    already there with that size and sha256 is kept."""
    rel = rel or target.name
    complete = target.is_file() and target.stat().st_size == size
    if complete and sha256 is not None and sha256_file(target) == sha256:
        progress.advance(size)
        return PulledFile(rel, size, sha256, skipped=True)
    got = fetch(
        conn, url, target, rel=rel, size=size, sha256=sha256, params=params, progress=progress
    )
    os.replace(partial(target), target)
    return got


class _Stopped(Exception):
    """Whoever waits on a download gave up on it: it stops at its next buffer, and its part is
    kept for a later resume."""


@dataclass(frozen=True)
class Wanted:
    """One file of a :func:`download_all`: where it comes from and goes, and what it must be."""

    url: str
    target: Path
    rel: str
    size: int
    sha256: str | None
    params: dict[str, str] | None = None


class _Shared:
    """The progress of files read at once: calls serialised, and once one file failed, every
    other stops at its next buffer (its part kept to resume from)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.failed = False

    def start(self, description: str, total: int) -> None:
        with self._lock:
            self._progress.start(description, total)

    def advance(self, nbytes: int) -> None:
        if self.failed:
            raise _Stopped
        with self._lock:
            self._progress.advance(nbytes)

    def finish(self) -> None:
        with self._lock:
            self._progress.finish()


def download_all(
    conn: Connection, files: Sequence[Wanted], progress: Progress, *, streams: int = STREAMS
) -> list[PulledFile]:
    """:func:`download` every file, ``streams`` at a time (largest first; each on a connection
    and with a sha256 thread of its own), so that small files come in beside a large one and
    several shards are hashed on several cores. Returns the results in the order given; the
    first error stops the other files at their next buffer (their parts kept) and is raised."""
    shared = _Shared(progress)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in sorted(range(len(files)), key=lambda i: -files[i].size):
        todo.put(i)
    got: list[PulledFile | None] = [None] * len(files)
    errors: list[BaseException] = []

    def lane() -> None:
        try:
            while not shared.failed:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                f = files[i]
                got[i] = download(
                    conn, f.url, f.target, rel=f.rel, size=f.size, sha256=f.sha256,
                    params=f.params, progress=shared,
                )  # fmt: skip
        except BaseException as exc:  # raised by the caller's thread, below
            if not isinstance(exc, _Stopped):
                errors.append(exc)
            shared.failed = True

    def helper() -> None:
        try:
            lane()
        finally:
            conn.release()  # this thread's connection: the thread ends here

    helpers = [
        threading.Thread(target=helper, name="slim-pull", daemon=True)
        for _ in range(min(streams, len(files)) - 1)
    ]
    for t in helpers:
        t.start()
    try:
        lane()
    finally:
        shared.failed = shared.failed or todo.qsize() > 0 or bool(errors)
        for t in helpers:
            t.join()
    if errors:
        raise errors[0]
    return [g for g in got if g is not None]


def fetch(
    conn: Connection,
    url: str,
    target: Path,
    *,
    rel: str | None = None,
    size: int,
    sha256: str | None,
    params: dict[str, str] | None = None,
    progress: Progress,
    landed: Callable[[int], None] | None = None,
    _retry: bool = True,
) -> PulledFile:
    """Bring :func:`partial` of ``target`` to the whole body of ``url`` (continuing what is
    there with Range + If-Range), checked against ``sha256`` (or the answer's ETag), and leave
    it there; on a mismatch nothing is kept. ``landed(n)``: told as the file grows that it
    holds ``n`` bytes (what a reader following the download waits for)."""
    rel = rel or target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    part = partial(target)
    h: Any = hashlib.sha256()
    offset = part.stat().st_size if part.is_file() else 0
    if offset > size:
        offset = 0
    if offset and landed is not None:
        landed(offset)
    resumed_from = offset
    etag = sha256
    fast: str | None = None  # the xxh3-128 the server recorded for the whole body
    if offset < size or size == 0:
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if sha256 is not None:
                headers["If-Range"] = f'"{sha256}"'
        with conn.body(url, headers=headers, params=params) as r:
            if r.status_code == 416 and offset and _retry:  # the file is shorter now
                part.unlink(missing_ok=True)
                return fetch(
                    conn, url, target, rel=rel, size=size, sha256=sha256, params=params,
                    progress=progress, landed=landed, _retry=False,
                )  # fmt: skip
            if r.status_code >= 400:
                raise conn.error(r)
            if r.status_code == 206 and not r.headers.get("content-range", "").startswith(
                f"bytes {offset}-"
            ):
                raise ServerError(
                    f"asked for {rel} from byte {offset}, the server answered "
                    f"{r.headers.get('content-range')!r}; pull again"
                )
            if r.status_code == 200 and offset:
                progress.advance(-offset)
                offset = resumed_from = 0  # the server sent it whole
            elif offset:
                progress.advance(offset)
            etag = (r.headers.get("etag") or "").strip('"') or sha256
            if (sha256 or etag) and (fast := r.headers.get(HEADER_XXH3, "").strip('"') or None):
                h = xxhash.xxh3_128()  # checked by the digest the server recorded beside
            _hash_part(part, offset, h)
            receive(r, part, h, append=bool(offset), progress=progress, landed=landed)
    else:
        _hash_part(part, offset, h)
        progress.advance(offset)
    got_size = part.stat().st_size
    digest = h.hexdigest()
    want = sha256 or etag
    kind = "sha256"
    if fast is not None:
        kind, want = "xxh3-128", fast
    if got_size != size or (want is not None and digest != want):
        part.unlink(missing_ok=True)
        if resumed_from and _retry:  # the kept part may be stale: fetch it whole, once
            progress.advance(-got_size)
            return fetch(
                conn, url, target, rel=rel, size=size, sha256=sha256, params=params,
                progress=progress, landed=landed, _retry=False,
            )  # fmt: skip
        raise IntegrityError(
            f"{target.name}: got {got_size} bytes with {kind} {digest}, expected {size} "
            f"bytes with {kind} {want}; nothing was kept — pull again"
        )
    if fast is not None:  # the body is the one whose sha256 the server recorded
        digest = sha256 or etag or ""
    return PulledFile(rel, size, digest, resumed_from=resumed_from)


def _hash_part(part: Path, offset: int, h: Any) -> None:
    """Hash the first ``offset`` bytes already in ``part`` (what a resumed download kept)."""
    if not offset:
        return
    with part.open("rb") as f:
        left = offset
        while left and (chunk := f.read(min(CHUNK_SIZE, left))):
            h.update(chunk)
            left -= len(chunk)


class FollowedDownload:
    """:func:`fetch` in a thread of its own, which a reader follows as the file grows (what
    ``pull --local`` rebuilds from while the delta still downloads).

    :meth:`wait` is the ``core.delta_format.Arriving`` protocol: it returns once the first
    bytes asked for are written, and for the whole file only once it is complete and its
    sha256 matched; it raises the download's own error if that stopped it.
    """

    def __init__(self, start: Callable[[Callable[[int], None]], PulledFile], size: int) -> None:
        self.size = size
        self._have = 0
        self._done: PulledFile | None = None
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(
            target=self._run, args=(start,), name="slim-download", daemon=True
        )
        self._thread.start()

    def _run(self, start: Callable[[Callable[[int], None]], PulledFile]) -> None:
        try:
            got = start(self._landed)
        except BaseException as exc:  # handed to the reader
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        else:
            with self._cond:
                self._done = got
                self._have = self.size
                self._cond.notify_all()

    def _landed(self, n: int) -> None:
        with self._cond:
            if self._stop:
                raise _Stopped
            self._have = n
            self._cond.notify_all()

    def wait(self, end: int) -> None:
        with self._cond:
            while (
                self._error is None
                and self._done is None
                and (end >= self.size or self._have < end)
            ):
                self._cond.wait()
            if self._done is None and self._error is not None:
                raise self._error

    def result(self) -> PulledFile:
        """The checked download (waits for it); raises its error."""
        self.wait(self.size)
        self._thread.join()
        assert self._done is not None
        return self._done

    def stop(self) -> BaseException | None:
        """Stop the download at its next write (its part is kept for a later resume) and
        wait for it; returns the error that ended it, if any other than being stopped."""
        with self._cond:
            self._stop = True
        self._thread.join()
        return None if isinstance(self._error, _Stopped) else self._error

"""The blob cache shared by several processes (``slim serve --workers N`` and a worker beside
them): one download per blob and one build per shared directory, whoever asks at once."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from storage.blobstore import BlobStore
from storage.cache import BlobCache, FileSpec
from storage.local_store import LocalBlobStore

PROCESSES = 4


class RemoteLike(LocalBlobStore):
    """A local store that, like S3, has no file to hand out: the cache must download. Each
    download takes a moment and leaves a line in ``log`` (shared by every process)."""

    def __init__(self, root: Path, log: Path) -> None:
        super().__init__(root)
        self.log = log

    def local_path(self, key: str) -> Path | None:
        return None

    def get_to_file(self, key: str, path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        with self.log.open("a") as f:
            f.write(f"{os.getpid()} {key}\n")
        time.sleep(0.5)  # wide enough for every process to ask while the first downloads
        return super().get_to_file(key, path)


def _ask(store: BlobStore, cache_dir: Path, files: list[FileSpec], start, out) -> None:  # type: ignore[no-untyped-def]
    cache = BlobCache(store, cache_dir)  # a fresh process knows nothing of the others
    start.wait()
    built = cache.shared_dir("base-x", files)
    # Every file of the tree this process was handed is whole, after every process returned.
    time.sleep(0.3)
    out.put({p.name: p.read_bytes() for p in sorted(built.iterdir())})


def test_processes_share_downloads_and_directories(tmp_path: Path) -> None:
    log = tmp_path / "downloads.log"
    store = RemoteLike(tmp_path / "blobs", log)
    payloads = {f"w{i}.bin": os.urandom(1000 + i) for i in range(3)}
    files = [FileSpec(name, store.put_stream([data]).key) for name, data in payloads.items()]
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_ask, args=(store, tmp_path / "cache", files, start, out))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    trees = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(tree == payloads for tree in trees)
    downloads = log.read_text().splitlines()
    assert sorted(line.split()[1] for line in downloads) == sorted(f.blob_key for f in files)
    dirs = list((tmp_path / "cache" / "dirs").iterdir())
    assert [d.name.startswith("base-x-") for d in dirs] == [True]  # no partial or stale tree

"""LocalBlobStore specifics: atomic writes, read-only blobs, local paths, dedup refresh."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.blobstore import LocalBlobStore
from storage.errors import BlobNotFound, BlobTooLarge


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_layout_is_content_addressed_and_read_only(local_store: LocalBlobStore) -> None:
    info = local_store.put_stream([b"weights"])
    path = local_store.root / "sha256" / info.sha256[:2] / info.sha256
    assert files_under(local_store.root) == [path.relative_to(local_store.root).as_posix()]
    assert path.read_bytes() == b"weights"
    assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def test_local_path_gives_the_real_file(local_store: LocalBlobStore) -> None:
    info = local_store.put_stream([b"mmap me"])
    path = local_store.local_path(info.key)
    assert path is not None
    assert path.read_bytes() == b"mmap me"
    local_store.delete(info.key)
    with pytest.raises(BlobNotFound):
        local_store.local_path(info.key)


def test_failed_uploads_leave_no_files(local_store: LocalBlobStore) -> None:
    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        local_store.put_stream(broken())
    with pytest.raises(BlobTooLarge):
        local_store.put_stream([b"x" * 10], max_bytes=5)
    assert files_under(local_store.root) == []


def test_a_blob_being_written_is_visible_only_under_tmp(local_store: LocalBlobStore) -> None:
    seen: list[list[str]] = []

    def body() -> Iterator[bytes]:
        yield b"first half "
        seen.append([entry.key for entry in local_store.list_keys("")])
        yield b"second half"

    info = local_store.put_stream(body())
    assert len(seen[0]) == 1 and seen[0][0].startswith("tmp/")
    assert [entry.key for entry in local_store.list_keys("")] == [info.key]


def test_dedup_refreshes_the_modification_time(local_store: LocalBlobStore) -> None:
    info = local_store.put_stream([b"old blob"])
    path = local_store.local_path(info.key)
    assert path is not None
    long_ago = time.time() - 86_400
    os.utime(path, (long_ago, long_ago))

    assert local_store.put_stream([b"old blob"]) == info
    assert path.stat().st_mtime > long_ago + 3600


def test_dedup_replaces_a_truncated_copy(local_store: LocalBlobStore) -> None:
    info = local_store.put_stream([b"complete bytes"])
    path = local_store.local_path(info.key)
    assert path is not None
    path.chmod(0o644)
    path.write_bytes(b"compl")
    local_store.put_stream([b"complete bytes"])
    assert path.read_bytes() == b"complete bytes"


def test_list_keys_of_an_empty_store(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "fresh")
    assert list(store.list_keys("")) == []
    assert list(store.list_keys("sha256/ab/")) == []

"""Behaviour every BlobStore shares; each test runs on the local store and on S3 (moto)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.files import CHUNK_SIZE
from storage.blobstore import BlobStore, LocalBlobStore, S3BlobStore, blob_key
from storage.errors import BlobNotFound, BlobTooLarge, IntegrityError, InvalidKey


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def read_all(store: BlobStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join(store.open_range(key, start, end))


def content_keys(store: BlobStore) -> list[str]:
    return [entry.key for entry in store.list_keys("sha256/")]


def test_put_stream_stores_under_the_content_key(store: BlobStore) -> None:
    data = os.urandom(3 * CHUNK_SIZE + 17)
    info = store.put_stream(chunked(data, 100_000))

    digest = hashlib.sha256(data).hexdigest()
    assert info.sha256 == digest
    assert info.key == f"sha256/{digest[:2]}/{digest}" == blob_key(digest)
    assert info.size == len(data)
    assert store.head(info.key) == len(data)
    assert store.exists(info.key)
    assert read_all(store, info.key) == data
    assert all(len(chunk) <= CHUNK_SIZE for chunk in store.open_range(info.key))


def test_empty_blob(store: BlobStore) -> None:
    info = store.put_stream([])
    assert info.size == 0
    assert store.head(info.key) == 0
    assert read_all(store, info.key) == b""


def test_put_file_and_get_to_file_round_trip(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(CHUNK_SIZE + 5))
    info = store.put_file(src)

    dest = tmp_path / "out" / "copy.safetensors"
    got = store.get_to_file(info.key, dest)
    assert got == info
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.safetensors"]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.binary(max_size=3000),
    chunk=st.integers(min_value=1, max_value=700),
    start=st.integers(min_value=0, max_value=3500),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=3500)),
)
def test_ranges_match_python_slices(
    store: BlobStore, data: bytes, chunk: int, start: int, length: int | None
) -> None:
    info = store.put_stream(chunked(data, chunk))
    end = None if length is None else start + length
    assert read_all(store, info.key, start, end) == data[start:end]


def test_invalid_ranges_are_rejected(store: BlobStore) -> None:
    info = store.put_stream([b"abc"])
    with pytest.raises(ValueError):
        store.open_range(info.key, -1)
    with pytest.raises(ValueError):
        store.open_range(info.key, 2, 1)


def test_identical_uploads_share_one_object(store: BlobStore) -> None:
    data = b"same bytes" * 1000
    first = store.put_stream(chunked(data, 333))
    second = store.put_stream(chunked(data, 1000))
    assert first == second
    assert content_keys(store) == [first.key]
    assert not list(store.list_keys("tmp/"))


def test_size_cap_stops_reading_and_stores_nothing(store: BlobStore) -> None:
    pulled = []

    def body() -> Iterator[bytes]:
        for i in range(100):
            pulled.append(i)
            yield b"x" * 1000

    with pytest.raises(BlobTooLarge) as excinfo:
        store.put_stream(body(), max_bytes=10_500)
    assert excinfo.value.limit == 10_500
    assert len(pulled) == 11
    assert not list(store.list_keys(""))


def test_size_cap_is_inclusive(store: BlobStore) -> None:
    info = store.put_stream([b"x" * 500, b"y" * 500], max_bytes=1000)
    assert info.size == 1000


def test_expected_sha256_mismatch_stores_nothing(store: BlobStore) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(IntegrityError):
        store.put_stream([b"payload"], expected_sha256=wrong)
    assert not list(store.list_keys(""))
    right = hashlib.sha256(b"payload").hexdigest()
    assert store.put_stream([b"payload"], expected_sha256=right).sha256 == right


def test_missing_blob_raises_before_streaming(store: BlobStore, tmp_path: Path) -> None:
    key = blob_key(hashlib.sha256(b"never stored").hexdigest())
    with pytest.raises(BlobNotFound):
        store.open_range(key)
    with pytest.raises(BlobNotFound):
        store.get_to_file(key, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    assert store.head(key) is None
    assert not store.exists(key)
    assert store.last_modified(key) is None


def test_delete_is_idempotent(store: BlobStore) -> None:
    info = store.put_stream([b"to delete"])
    store.delete(info.key)
    assert store.head(info.key) is None
    store.delete(info.key)
    with pytest.raises(BlobNotFound):
        store.open_range(info.key)


def test_list_keys_filters_by_prefix(store: BlobStore) -> None:
    infos = [store.put_stream([f"blob {i}".encode()]) for i in range(12)]
    listed = {entry.key: entry for entry in store.list_keys("")}
    assert set(listed) == {info.key for info in infos}
    for info in infos:
        assert listed[info.key].size == info.size
        age = datetime.now(UTC) - listed[info.key].last_modified
        assert timedelta(seconds=-5) < age < timedelta(minutes=5)

    some = infos[0].key[: len("sha256/") + 1]  # "sha256/<first hex digit>"
    expected = {info.key for info in infos if info.key.startswith(some)}
    assert {entry.key for entry in store.list_keys(some)} == expected
    assert not list(store.list_keys("sha256/zz"))


def test_last_modified_is_recent(store: BlobStore) -> None:
    info = store.put_stream([b"now"])
    modified = store.last_modified(info.key)
    assert modified is not None
    assert abs(datetime.now(UTC) - modified) < timedelta(minutes=5)


@pytest.mark.parametrize("key", ["../escape", "/abs/key", "a//b", "a/./b", "a/../b", "", "a b"])
def test_unsafe_keys_are_rejected(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidKey):
        store.head(key)
    with pytest.raises(InvalidKey):
        store.delete(key)


def test_tampered_blob_fails_integrity_check(
    store: BlobStore, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    info = store.put_stream([b"original weights" * 100])
    if isinstance(store, LocalBlobStore):
        path = store.local_path(info.key)
        assert path is not None
        path.chmod(0o644)
        path.write_bytes(b"tampered weights" * 100)
    else:
        assert isinstance(store, S3BlobStore)
        client = request.getfixturevalue("s3_client")
        client.put_object(Bucket=store.bucket, Key=info.key, Body=b"tampered weights" * 100)

    dest = tmp_path / "out" / "restored.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"previous contents")
    with pytest.raises(IntegrityError):
        store.get_to_file(info.key, dest)
    assert dest.read_bytes() == b"previous contents"
    assert [p.name for p in dest.parent.iterdir()] == ["restored.bin"]

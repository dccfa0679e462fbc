"""S3BlobStore against moto's standalone server: multipart, aborts, copies, retries."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from moto.server import ThreadedMotoServer
from storage_helpers import free_port, make_s3_store

from storage.blobstore import S3BlobStore
from storage.errors import BlobTooLarge, StorageUnavailable
from storage.s3_store import MIN_PART_SIZE

MIB = 1 << 20


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def count_calls(store: S3BlobStore, operation: str) -> list[dict[str, Any]]:
    """Record the parameters of every ``operation`` call the store's client makes."""
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(dict(params))  # a copy: botocore later swaps Body for a file object

    store._client.meta.events.register(f"provide-client-params.s3.{operation}", record)
    return calls


def assert_bucket_clean(store: S3BlobStore, s3_client: Any) -> None:
    """No objects and no unfinished multipart uploads are left in the store's bucket."""
    assert list(store.list_keys("")) == []
    uploads = s3_client.list_multipart_uploads(Bucket=store.bucket)
    assert uploads.get("Uploads", []) == []


def test_stream_larger_than_two_parts_goes_up_in_parts(
    s3_store: S3BlobStore, s3_client: Any
) -> None:
    data = os.urandom(2 * MIN_PART_SIZE + 3 * MIB + 11)
    parts = count_calls(s3_store, "UploadPart")

    info = s3_store.put_stream(chunks_of(data, 700_001))

    assert [p["PartNumber"] for p in parts] == [1, 2, 3]
    assert [len(p["Body"]) for p in parts] == [MIN_PART_SIZE, MIN_PART_SIZE, 3 * MIB + 11]
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert [entry.key for entry in s3_store.list_keys("")] == [info.key]  # tmp/ object gone
    assert b"".join(s3_store.open_range(info.key)) == data
    assert (
        b"".join(s3_store.open_range(info.key, MIN_PART_SIZE - 5, MIN_PART_SIZE + 5))
        == (data[MIN_PART_SIZE - 5 : MIN_PART_SIZE + 5])
    )
    assert s3_client.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", []) == []


def test_small_stream_is_a_single_put(s3_store: S3BlobStore) -> None:
    parts = count_calls(s3_store, "UploadPart")
    puts = count_calls(s3_store, "PutObject")
    info = s3_store.put_stream([b"small"] * 10)
    assert parts == []
    assert [p["Key"] for p in puts] == [info.key]


def test_failing_stream_aborts_the_upload(s3_store: S3BlobStore, s3_client: Any) -> None:
    aborts = count_calls(s3_store, "AbortMultipartUpload")

    def body() -> Iterator[bytes]:
        yield os.urandom(MIN_PART_SIZE + MIB)
        yield os.urandom(MIB)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        s3_store.put_stream(body())
    assert len(aborts) == 1
    assert_bucket_clean(s3_store, s3_client)


def test_size_cap_during_multipart_aborts(s3_store: S3BlobStore, s3_client: Any) -> None:
    data = os.urandom(3 * MIN_PART_SIZE)
    with pytest.raises(BlobTooLarge):
        s3_store.put_stream(chunks_of(data, MIB), max_bytes=2 * MIN_PART_SIZE + 1)
    assert_bucket_clean(s3_store, s3_client)


def test_dedup_skips_the_copy_of_a_fresh_object(s3_store: S3BlobStore) -> None:
    data = os.urandom(MIN_PART_SIZE + 1)
    copies = count_calls(s3_store, "CopyObject")
    first = s3_store.put_stream(chunks_of(data, MIB))
    second = s3_store.put_stream(chunks_of(data, MIB))
    assert first == second
    assert len(copies) == 1
    assert [entry.key for entry in s3_store.list_keys("")] == [first.key]


def test_dedup_refreshes_an_old_object(s3_endpoint: str) -> None:
    store = make_s3_store(s3_endpoint, dedup_refresh_seconds=0)
    puts = count_calls(store, "PutObject")
    store.put_stream([b"weights"])
    store.put_stream([b"weights"])
    assert len(puts) == 2  # rewritten to refresh LastModified for garbage collection


def test_large_objects_use_multipart_copy(s3_endpoint: str) -> None:
    store = make_s3_store(s3_endpoint, copy_threshold=MIN_PART_SIZE, copy_part_size=MIN_PART_SIZE)
    part_copies = count_calls(store, "UploadPartCopy")
    data = os.urandom(2 * MIN_PART_SIZE + 123)

    info = store.put_stream(chunks_of(data, MIB))

    assert [p["CopySourceRange"] for p in part_copies] == [
        f"bytes=0-{MIN_PART_SIZE - 1}",
        f"bytes={MIN_PART_SIZE}-{2 * MIN_PART_SIZE - 1}",
        f"bytes={2 * MIN_PART_SIZE}-{2 * MIN_PART_SIZE + 122}",
    ]
    assert b"".join(store.open_range(info.key)) == data
    assert [entry.key for entry in store.list_keys("")] == [info.key]


def test_listing_pages_through_small_pages(s3_endpoint: str) -> None:
    store = make_s3_store(s3_endpoint, list_page_size=3)
    pages = count_calls(store, "ListObjectsV2")
    keys = {store.put_stream([f"blob {i}".encode()]).key for i in range(10)}
    pages.clear()
    assert {entry.key for entry in store.list_keys("")} == keys
    assert len(pages) == 4
    assert all(page["MaxKeys"] == 3 for page in pages)


def test_prefix_keeps_keys_inside_it(s3_endpoint: str, s3_client: Any) -> None:
    store = make_s3_store(s3_endpoint, prefix="team-a")
    info = store.put_stream([b"prefixed"])
    raw = s3_client.list_objects_v2(Bucket=store.bucket)["Contents"]
    assert [obj["Key"] for obj in raw] == [f"team-a/{info.key}"]
    assert [entry.key for entry in store.list_keys("")] == [info.key]
    assert store.head(info.key) == len(b"prefixed")


def test_cleanup_incomplete_aborts_stale_uploads(s3_store: S3BlobStore, s3_client: Any) -> None:
    # moto reports a fixed Initiated time (2010), so only the "stale" side can be checked.
    s3_client.create_multipart_upload(Bucket=s3_store.bucket, Key="tmp/abandoned")
    assert s3_store.cleanup_incomplete(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert s3_store.cleanup_incomplete(datetime.now(UTC) + timedelta(minutes=1)) == 1
    assert_bucket_clean(s3_store, s3_client)


def test_part_size_below_the_s3_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="part_size"):
        S3BlobStore("bucket", "http://127.0.0.1:1", part_size=MIN_PART_SIZE - 1)


def test_unreachable_endpoint_raises_storage_unavailable() -> None:
    store = S3BlobStore(
        "bucket",
        f"http://127.0.0.1:{free_port()}",
        "us-east-1",
        "testing",
        "testing",
        retry_seconds=0.5,
        connect_timeout=0.5,
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="check that it is running"):
        store.head("sha256/00/" + "0" * 64)
    assert time.monotonic() - started < 10


def test_operations_survive_a_server_outage() -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    restarted = threading.Event()
    try:
        store = make_s3_store(f"http://127.0.0.1:{server._port}", retry_seconds=30.0)
        info = store.put_stream([b"survives"])
        server.stop()

        def restart_later() -> None:
            time.sleep(1.5)
            server.start()
            restarted.set()

        restarter = threading.Thread(target=restart_later)
        restarter.start()
        started = time.monotonic()
        assert store.head(info.key) == len(b"survives")  # retried until the server came back
        assert time.monotonic() - started >= 1.0
        restarter.join()
        assert b"".join(store.open_range(info.key)) == b"survives"
    finally:
        if restarted.is_set():
            server.stop()


def test_ranged_read_resumes_after_a_dropped_connection(s3_endpoint: str) -> None:
    data = os.urandom(6 * MIB + 7)
    with CuttingProxy(s3_endpoint) as proxy:
        store = make_s3_store(proxy.url)
        info = store.put_stream(chunks_of(data, MIB))
        gets = count_calls(store, "GetObject")

        proxy.cut_next_response_after(2 * MIB)
        assert b"".join(store.open_range(info.key, 10)) == data[10:]

        assert proxy.cuts == 1
        ranges = [str(call["Range"]) for call in gets]
        assert ranges[0] == "bytes=10-"
        assert len(ranges) == 2
        resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
        assert 10 < resumed_at < len(data)


class CuttingProxy:
    """A TCP proxy to the S3 server that can drop a connection mid-response."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        self._cut_after: int | None = None
        self._lock = threading.Lock()
        self._closing = False

    def cut_next_response_after(self, nbytes: int) -> None:
        with self._lock:
            self._cut_after = nbytes

    def __enter__(self) -> CuttingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, is_response: bool) -> None:
        budget: int | None = None  # response bytes still to pass before cutting
        try:
            while data := src.recv(65536):
                if is_response and budget is None:
                    with self._lock:  # the first response bytes after arming take the cut
                        budget, self._cut_after = self._cut_after, None
                if budget is not None and len(data) > budget:
                    dst.sendall(data[:budget])
                    self.cuts += 1
                    return
                if budget is not None:
                    budget -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

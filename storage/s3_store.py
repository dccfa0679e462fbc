"""``S3BlobStore``: content-addressed blobs in an S3-compatible bucket (AWS, MinIO, moto).

Writes stream with bounded memory: a body smaller than one part is buffered and written with a
single PUT straight to its content key; anything larger goes up as a multipart upload to
``tmp/<uuid>`` (at most one part in memory), and once the sha256 is known it is copied
server-side to ``sha256/<first2>/<hex>`` and the temporary object deleted. A failed upload is
aborted, so a content key only ever holds complete bytes.

Every call retries transient failures (connection refused or reset, timeouts, 5xx, throttling)
with exponential backoff for up to ``retry_seconds``; ranged reads resume from the last byte
received. After that :class:`~storage.errors.StorageUnavailable` is raised.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

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
from storage.errors import BlobNotFound, StorageUnavailable

MIN_PART_SIZE = 5 << 20
"""S3's smallest allowed multipart part (every part but the last)."""
MAX_COPY_SIZE = 5 << 30
"""Largest object a single CopyObject may copy; larger ones use multipart copy."""

_T = TypeVar("_T")
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded"}
)
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_STREAM_ERRORS = (
    BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


class S3BlobStore:
    """Blob store over an S3 bucket; keys live under ``prefix`` inside the bucket.

    Args:
        bucket: bucket name (see :meth:`ensure_bucket` to create it).
        endpoint_url: e.g. ``http://127.0.0.1:9000`` for MinIO; None for AWS.
        region, access_key, secret_key: credentials; None falls back to boto3's usual chain.
        prefix: key prefix inside the bucket ("" or e.g. "slim/"; a missing "/" is added).
        part_size: multipart part size in bytes (>= 5 MiB); peak memory per upload is about
            one part plus one incoming chunk.
        list_page_size: MaxKeys per ListObjectsV2 page.
        copy_threshold: objects larger than this are copied with multipart copy (S3 caps a
            single CopyObject at 5 GiB).
        copy_part_size: part size of multipart copies.
        retry_seconds: how long to keep retrying a transient failure before giving up.
        dedup_refresh_seconds: on a dedup hit, an existing object older than this is rewritten
            (server-side) to refresh its LastModified, so garbage collection, whose grace period
            must be longer, cannot delete it just as a new row starts to reference it.
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
        *,
        part_size: int = 8 << 20,
        list_page_size: int = 1000,
        copy_threshold: int = MAX_COPY_SIZE,
        copy_part_size: int = 1 << 30,
        retry_seconds: float = 120.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        dedup_refresh_seconds: float = 900.0,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if not MIN_PART_SIZE <= copy_part_size <= MAX_COPY_SIZE:
            raise ValueError(f"copy_part_size must be within [{MIN_PART_SIZE}, {MAX_COPY_SIZE}]")
        if not 1 <= list_page_size <= 1000:
            raise ValueError("list_page_size must be within [1, 1000]")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if prefix:
            check_key(prefix.rstrip("/"))
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.prefix = prefix
        self.part_size = part_size
        self.list_page_size = list_page_size
        self.copy_threshold = min(copy_threshold, MAX_COPY_SIZE)
        self.copy_part_size = copy_part_size
        self.retry_seconds = retry_seconds
        self.dedup_refresh_seconds = dedup_refresh_seconds
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            # Flexible checksums are not implemented by every S3-compatible server.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = _make_client(
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r}, prefix={self.prefix!r})"

    # -- setup -------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (for MinIO / test setups)."""
        try:
            self._retry(self._client.head_bucket, Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in _MISSING_CODES and _code(exc) != "NoSuchBucket":
                raise
            region = self._client.meta.region_name
            kwargs: dict[str, Any] = {"Bucket": self.bucket}
            if region and region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
            self._retry(self._client.create_bucket, **kwargs)

    # -- writes ------------------------------------------------------------------------------

    def put_stream(
        self,
        chunks: Iterable[bytes],
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
    ) -> BlobInfo:
        """Store a stream under its content key; see :meth:`BlobStore.put_stream`."""
        check_sha256(expected_sha256)
        hasher = CappedHasher(max_bytes)
        tmp_key = self.prefix + TMP_PREFIX + uuid.uuid4().hex
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        tmp_written = False
        try:
            for chunk in chunks:
                hasher.update(chunk)
                buf += chunk
                while len(buf) >= self.part_size:
                    if upload_id is None:
                        upload_id = self._create_upload(tmp_key)
                    with memoryview(buf) as view:
                        part = bytes(view[: self.part_size])
                    del buf[: self.part_size]
                    parts.append(self._upload_part(tmp_key, upload_id, len(parts) + 1, part))
                    del part
            info = hasher.finish(expected_sha256)
            key = self.prefix + info.key
            if upload_id is None:
                if not self._fresh_copy_exists(key):
                    self._retry(
                        self._client.put_object, Bucket=self.bucket, Key=key, Body=bytes(buf)
                    )
                return info
            if buf:
                parts.append(self._upload_part(tmp_key, upload_id, len(parts) + 1, bytes(buf)))
            buf.clear()
            self._complete_upload(tmp_key, upload_id, parts, info.size)
            upload_id, tmp_written = None, True
            if not self._fresh_copy_exists(key):
                self._copy(tmp_key, key, info.size)
            return info
        finally:
            if upload_id is not None:
                self._quietly(self._client.abort_multipart_upload, Key=tmp_key, UploadId=upload_id)
            if tmp_written:
                self._quietly(self._client.delete_object, Key=tmp_key)

    def put_file(
        self, path: str | os.PathLike[str], *, expected_sha256: str | None = None
    ) -> BlobInfo:
        """Store a local file under its content key."""
        return self.put_stream(iter_file(Path(path)), expected_sha256=expected_sha256)

    def delete(self, key: str) -> None:
        """Remove a blob; deleting a missing key is not an error."""
        self._retry(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    # -- reads -------------------------------------------------------------------------------

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of a blob; see :meth:`BlobStore.open_range`."""
        check_range(start, end)
        full_key = self._key(key)
        if end == start:
            if self.head(key) is None:
                raise BlobNotFound(key)
            return iter(())
        body = self._get_body(full_key, key, start, end)
        return self._stream(full_key, key, body, start, end)

    def get_to_file(self, key: str, path: str | os.PathLike[str]) -> BlobInfo:
        """Download a blob to ``path`` atomically, verifying its sha256 (see BlobStore)."""
        return download_to_file(self.open_range(key), key, Path(path))

    def head(self, key: str) -> int | None:
        """Size in bytes of the blob under ``key``, or None if there is none."""
        meta = self._head(self._key(key))
        return None if meta is None else int(meta["ContentLength"])

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def last_modified(self, key: str) -> datetime | None:
        """The object's LastModified (UTC), or None if there is none."""
        meta = self._head(self._key(key))
        return None if meta is None else _utc(meta["LastModified"])

    def list_keys(self, prefix: str = "") -> Iterator[BlobEntry]:
        """Every object whose key starts with ``prefix``, one ListObjectsV2 page at a time."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": self.prefix + prefix,
                "MaxKeys": self.list_page_size,
            }
            if token is not None:
                kwargs["ContinuationToken"] = token
            page = self._retry(self._client.list_objects_v2, **kwargs)
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) :]
                yield BlobEntry(key, int(obj["Size"]), _utc(obj["LastModified"]))
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def local_path(self, key: str) -> Path | None:
        """Always None: S3 objects have no local path; stream them with :meth:`open_range`."""
        return None

    def cleanup_incomplete(self, older_than: datetime) -> int:
        """Abort multipart uploads under our prefix started before ``older_than``; count them."""
        aborted = 0
        markers: dict[str, str] = {}
        while True:
            page = self._retry(
                self._client.list_multipart_uploads,
                Bucket=self.bucket,
                Prefix=self.prefix,
                **markers,
            )
            for upload in page.get("Uploads", []):
                if _utc(upload["Initiated"]) >= older_than:
                    continue
                try:
                    self._retry(
                        self._client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
                    aborted += 1
                except ClientError as exc:
                    if _code(exc) != "NoSuchUpload":  # finished or aborted meanwhile
                        raise
            if not page.get("IsTruncated"):
                return aborted
            markers = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    # -- helpers -----------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _retry(self, fn: Callable[..., _T], **kwargs: Any) -> _T:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        while True:
            try:
                return fn(**kwargs)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise self._unavailable(exc) from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        return StorageUnavailable(
            f"object store {self.endpoint_url or 'AWS S3'} (bucket {self.bucket}) did not answer "
            f"within {self.retry_seconds:.0f}s ({exc}); check that it is running, then retry"
        )

    def _quietly(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        """Best-effort cleanup: one call (botocore's own retries only), errors swallowed, so
        that it neither masks the error being raised nor stalls it through an outage. What it
        misses, ``storage.gc`` removes later (old ``tmp/`` objects, stale multipart uploads)."""
        with contextlib.suppress(Exception):
            fn(Bucket=self.bucket, **kwargs)

    def _head(self, full_key: str) -> dict[str, Any] | None:
        try:
            return self._retry(self._client.head_object, Bucket=self.bucket, Key=full_key)
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                return None
            raise

    def _fresh_copy_exists(self, full_key: str) -> bool:
        meta = self._head(full_key)
        if meta is None:
            return False
        age = (datetime.now(UTC) - _utc(meta["LastModified"])).total_seconds()
        return age < self.dedup_refresh_seconds

    def _create_upload(self, full_key: str) -> str:
        resp = self._retry(self._client.create_multipart_upload, Bucket=self.bucket, Key=full_key)
        return str(resp["UploadId"])

    def _upload_part(
        self, full_key: str, upload_id: str, number: int, data: bytes
    ) -> dict[str, Any]:
        resp = self._retry(
            self._client.upload_part,
            Bucket=self.bucket,
            Key=full_key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def _complete_upload(
        self, full_key: str, upload_id: str, parts: list[dict[str, Any]], size: int
    ) -> None:
        try:
            self._retry(
                self._client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except ClientError as exc:
            # A retried Complete whose first attempt succeeded finds the upload gone.
            if _code(exc) != "NoSuchUpload" or self.head(full_key[len(self.prefix) :]) != size:
                raise

    def _copy(self, src: str, dst: str, size: int) -> None:
        source = {"Bucket": self.bucket, "Key": src}
        if size <= self.copy_threshold:
            self._retry(self._client.copy_object, Bucket=self.bucket, Key=dst, CopySource=source)
            return
        upload_id: str | None = self._create_upload(dst)
        try:
            parts = []
            for number, first in enumerate(range(0, size, self.copy_part_size), start=1):
                last = min(first + self.copy_part_size, size) - 1
                resp = self._retry(
                    self._client.upload_part_copy,
                    Bucket=self.bucket,
                    Key=dst,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource=source,
                    CopySourceRange=f"bytes={first}-{last}",
                )
                parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
            assert upload_id is not None
            self._complete_upload(dst, upload_id, parts, size)
            upload_id = None
        finally:
            if upload_id is not None:
                self._quietly(self._client.abort_multipart_upload, Key=dst, UploadId=upload_id)

    def _get_body(self, full_key: str, key: str, start: int, end: int | None) -> Any | None:
        """The streaming body of a ranged GET, or None if ``start`` is past the end."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key}
        if start > 0 or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            return self._retry(self._client.get_object, **kwargs)["Body"]
        except ClientError as exc:
            if _code(exc) in _MISSING_CODES:
                raise BlobNotFound(key) from None
            if _code(exc) == "InvalidRange":  # start at or past the end: nothing to send
                return None
            raise

    def _stream(
        self, full_key: str, key: str, body: Any | None, start: int, end: int | None
    ) -> Iterator[bytes]:
        pos = start
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.1
        try:
            while body is not None:
                try:
                    for chunk in body.iter_chunks(CHUNK_SIZE):
                        pos += len(chunk)
                        yield chunk
                    return
                except _STREAM_ERRORS as exc:
                    body.close()
                    body = None
                    if time.monotonic() + delay > deadline:
                        raise self._unavailable(exc) from exc
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    if end is not None and pos >= end:
                        return
                    body = self._get_body(full_key, key, pos, end)
        finally:
            if body is not None:
                body.close()


_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _make_client(**kwargs: Any) -> Any:
    """An S3 client from one shared boto3 session (loading the service model once; sessions
    are not thread-safe, hence the lock; the clients themselves are)."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            _SESSION = boto3.session.Session()
        return _SESSION.client("s3", **kwargs)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or _code(exc) in _THROTTLE_CODES
    return False


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

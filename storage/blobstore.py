"""Content-addressed blob storage: the ``BlobStore`` protocol and its two implementations.

A blob is stored under ``sha256/<first2>/<hex>`` where ``<hex>`` is the sha256 of its bytes,
so identical uploads share one object (dedup) and every read can be verified. Writes stream:
bytes go to a temporary name and reach the content key only once complete, so no reader ever
sees a partial blob.

Implementations:
    :class:`LocalBlobStore` (a directory; embedded mode) and :class:`S3BlobStore` (boto3;
    distributed mode). Both take explicit arguments; settings live in ``service``/``worker``.

Example:
    >>> store = LocalBlobStore("/var/lib/slim/blobs")
    >>> info = store.put_stream(request_chunks, max_bytes=50 << 30)
    >>> for chunk in store.open_range(info.key, start=1024):
    ...     send(chunk)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from storage.blob_common import (
    TMP_PREFIX,
    BlobEntry,
    BlobInfo,
    blob_key,
    sha256_of_key,
)
from storage.local_store import LocalBlobStore
from storage.s3_store import S3BlobStore

__all__ = [
    "TMP_PREFIX",
    "BlobEntry",
    "BlobInfo",
    "BlobStore",
    "LocalBlobStore",
    "S3BlobStore",
    "blob_key",
    "sha256_of_key",
]


@runtime_checkable
class BlobStore(Protocol):
    """Where blob bytes live. All methods are synchronous and safe to call from threads."""

    def put_stream(
        self,
        chunks: Iterable[bytes],
        *,
        max_bytes: int | None = None,
        expected_sha256: str | None = None,
    ) -> BlobInfo:
        """Store a stream of chunks under its content key and describe it.

        The bytes are hashed as they arrive and written to a temporary name; only a complete
        upload reaches the content key. If that key already holds the blob, the new copy is
        discarded (dedup).

        Args:
            chunks: the body, e.g. ``request.stream()`` adapted to sync, or a file's chunks.
            max_bytes: cap on the total size; None for no cap.
            expected_sha256: hex digest the body must hash to (e.g. a client-sent checksum).

        Raises:
            BlobTooLarge: the stream passed ``max_bytes`` (nothing stored; reading stops there).
            IntegrityError: the bytes do not hash to ``expected_sha256`` (nothing stored).
            StorageUnavailable: the backend stayed unreachable through the retries.
        """
        ...

    def put_file(
        self, path: str | os.PathLike[str], *, expected_sha256: str | None = None
    ) -> BlobInfo:
        """Store a local file (streamed, never read whole) under its content key."""
        ...

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of a blob in chunks of at most ``CHUNK_SIZE``.

        ``end`` is exclusive (Python slice semantics; an HTTP ``Range: bytes=a-b`` is
        ``start=a, end=b + 1``) and is clamped to the blob's size; a ``start`` at or past the
        end yields nothing. Close the iterator if you stop early.

        Raises:
            BlobNotFound: immediately, before the first chunk, if the key holds nothing.
            ValueError: negative or reversed range.
        """
        ...

    def get_to_file(self, key: str, path: str | os.PathLike[str]) -> BlobInfo:
        """Copy a blob to a local file atomically (temp file + rename) and verify its sha256.

        Raises:
            BlobNotFound: nothing under ``key``.
            IntegrityError: the bytes do not hash to the sha256 in the key; ``path`` untouched.
        """
        ...

    def head(self, key: str) -> int | None:
        """The blob's size in bytes, or None if the key holds nothing."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the key holds a blob."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; a missing key is not an error."""
        ...

    def list_keys(self, prefix: str = "") -> Iterator[BlobEntry]:
        """Every object whose key starts with ``prefix``, including temporary uploads under
        ``tmp/``, as ``(key, size, last_modified)``; fetched page by page, order unspecified."""
        ...

    def last_modified(self, key: str) -> datetime | None:
        """When the object was written, or refreshed by a dedup hit (UTC); None if missing."""
        ...

    def local_path(self, key: str) -> Path | None:
        """A real file path for the blob (local store), or None where there is none (S3)."""
        ...

    def cleanup_incomplete(self, older_than: datetime) -> int:
        """Discard unfinished uploads started before ``older_than`` that ``list_keys`` cannot
        see (S3 multipart uploads); returns how many were discarded."""
        ...


if TYPE_CHECKING:  # mypy checks both implementations against the protocol
    _LOCAL: type[BlobStore] = LocalBlobStore
    _S3: type[BlobStore] = S3BlobStore

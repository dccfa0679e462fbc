"""Primitives shared by the blob stores: key scheme, result types, hashing.

Import these from :mod:`storage.blobstore`; this module exists so the two implementations can
share them without importing each other.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from core.files import CHUNK_SIZE
from storage.errors import BlobTooLarge, IntegrityError, InvalidKey

TMP_PREFIX = "tmp/"
"""Keys under this prefix are uploads in progress (or left by a killed one; GC removes them)."""

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob: its content key, the sha256 of its bytes (hex) and its size in bytes."""

    key: str
    sha256: str
    size: int


class BlobEntry(NamedTuple):
    """One object from :meth:`BlobStore.list_keys`; ``last_modified`` is timezone-aware UTC."""

    key: str
    size: int
    last_modified: datetime


def blob_key(sha256: str) -> str:
    """The content key for a sha256 hex digest: ``sha256/<first two hex>/<hex>``.

    Raises:
        InvalidKey: ``sha256`` is not 64 lowercase hex characters.
    """
    if not _SHA256_RE.match(sha256):
        raise InvalidKey(f"not a sha256 hex digest: {sha256!r}; expected 64 lowercase hex chars")
    return f"sha256/{sha256[:2]}/{sha256}"


def sha256_of_key(key: str) -> str | None:
    """The sha256 a content key promises, or None for keys outside the ``sha256/`` scheme."""
    parts = key.split("/")
    valid = len(parts) == 3 and parts[0] == "sha256" and _SHA256_RE.match(parts[2])
    return parts[2] if valid and parts[1] == parts[2][:2] else None


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`InvalidKey`."""
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise InvalidKey(
            f"invalid blob key {key!r}; keys are relative, '/'-separated, [A-Za-z0-9._-] only"
        )
    return key


def check_sha256(sha256: str | None) -> None:
    """Raise :class:`IntegrityError` early if an expected digest is not even well-formed."""
    if sha256 is not None and not _SHA256_RE.match(sha256):
        raise IntegrityError(f"expected sha256 {sha256!r} is not 64 lowercase hex characters")


class CappedHasher:
    """Running sha256 and byte count over a stream, raising when a size cap is passed."""

    def __init__(self, max_bytes: int | None) -> None:
        self._hash = hashlib.sha256()
        self._max_bytes = max_bytes
        self.size = 0

    def update(self, chunk: bytes) -> None:
        """Account for ``chunk``; raises :class:`BlobTooLarge` once the total passes the cap."""
        self.size += len(chunk)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise BlobTooLarge(self._max_bytes)
        self._hash.update(chunk)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def finish(self, expected_sha256: str | None) -> BlobInfo:
        """The :class:`BlobInfo` of what was hashed; checks it against ``expected_sha256``."""
        digest = self.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntegrityError(
                f"upload hashed to sha256 {digest}, not the expected {expected_sha256}; "
                "the body was altered or truncated in transit, send it again"
            )
        return BlobInfo(key=blob_key(digest), sha256=digest, size=self.size)


def iter_file(path: Path, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield a file's bytes in chunks of ``chunk_size``."""
    with path.open("rb") as f:
        while chunk := f.read(chunk_size):
            yield chunk


def check_range(start: int, end: int | None) -> None:
    """Reject negative or reversed ranges (``end`` is exclusive)."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range start={start} end={end}; need 0 <= start <= end")


def download_to_file(chunks: Iterator[bytes], key: str, path: Path) -> BlobInfo:
    """Write ``chunks`` (the blob under ``key``) to ``path`` atomically and verify its hash.

    Bytes go to a ``.<name>.<uuid>.incomplete`` file beside ``path``, are fsynced, checked
    against the sha256 the key promises (content keys only), and only then renamed over
    ``path``. On any error the partial file is removed and ``path`` is left untouched.

    Raises:
        IntegrityError: the bytes do not hash to the key's sha256 (the stored object is
            corrupt; restore it from a replica or re-upload the file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.incomplete")
    hasher = CappedHasher(None)
    try:
        with tmp.open("xb") as f:
            for chunk in chunks:
                hasher.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        digest = hasher.hexdigest()
        promised = sha256_of_key(key)
        if promised is not None and digest != promised:
            raise IntegrityError(
                f"blob {key} reads back with sha256 {digest}: the stored object is corrupt; "
                "restore it from a replica or upload the original file again"
            )
        os.replace(tmp, path)
        return BlobInfo(key=key, sha256=digest, size=hasher.size)
    finally:
        if isinstance(chunks, Generator):
            chunks.close()
        tmp.unlink(missing_ok=True)

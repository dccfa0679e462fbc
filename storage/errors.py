"""The storage layer's error tree.

Every error carries a stable ``code`` (a short snake_case string) that the service maps to an
HTTP status and puts in its ``{"code", "detail"}`` body; the message says what to do next.

    StorageError                 code            suggested HTTP status
    ├── NotFound                 not_found       404
    │   └── BlobNotFound         blob_not_found  404
    ├── Conflict                 conflict        409
    │   └── AlreadyExists        already_exists  409
    ├── BlobTooLarge             blob_too_large  413
    ├── TooManyFiles             too_many_files  400
    ├── InvalidKey               invalid_key     400
    ├── InvalidPath              invalid_path    400
    ├── IntegrityError           integrity_error 500 (stored bytes do not match their hash)
    └── StorageUnavailable       storage_unavailable 503 (object store unreachable; retry later)
        └── StorageFull          storage_full    507 (no space left on the blob store's disk)
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error raised by ``storage``."""

    code = "storage_error"


class NotFound(StorageError):
    """A row (base, checkpoint, job, file) does not exist, or not in the caller's namespace."""

    code = "not_found"


class BlobNotFound(NotFound):
    """No object is stored under the requested blob key."""

    code = "blob_not_found"

    def __init__(self, key: str) -> None:
        super().__init__(f"no blob is stored under key {key!r}; re-upload the file it came from")
        self.key = key


class Conflict(StorageError):
    """The operation contradicts the current state (e.g. deleting a base checkpoints use)."""

    code = "conflict"


class AlreadyExists(Conflict):
    """A row with the same unique name already exists in the namespace."""

    code = "already_exists"


class BlobTooLarge(StorageError):
    """A streamed upload went past its size cap; nothing was stored under a content key."""

    code = "blob_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"upload exceeds the limit of {limit} bytes; split the file or raise the limit"
        )
        self.limit = limit


class TooManyFiles(StorageError):
    """An upload would give a checkpoint more files than the server accepts."""

    code = "too_many_files"


class InvalidKey(StorageError):
    """A blob key is malformed (absolute, contains '..', or characters outside [A-Za-z0-9._-/])."""

    code = "invalid_key"


class InvalidPath(StorageError):
    """A file path is not a plain relative POSIX path (absolute, '..', backslash, empty part)."""

    code = "invalid_path"


class IntegrityError(StorageError):
    """Bytes read back (or uploaded) do not hash to the sha256 they were recorded under."""

    code = "integrity_error"


class StorageUnavailable(StorageError):
    """The object store could not be reached after retrying; try again later."""

    code = "storage_unavailable"


class StorageFull(StorageUnavailable):
    """The blob store's disk is full: nothing was stored; free space (or GC), then retry.

    A subclass of :class:`StorageUnavailable`, so workers treat it as transient (the job is
    given back and retried)."""

    code = "storage_full"

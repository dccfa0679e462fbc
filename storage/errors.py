"""The storage layer's error tree, a branch of the core's :class:`core.errors.SlimError`.

Every error carries a stable ``code`` (a short snake_case string) that the service maps to an
HTTP status (``service.errors.STATUS_BY_CODE``) and puts in its ``{"code", "detail"}`` body;
the message says what to do next. A condition the core already names keeps the core's code:
a bad file path is :class:`core.errors.InvalidPath` (raised by ``core.files.check_path``), and
bytes that do not match their hash are an :class:`IntegrityError` here that is also the core's.

    StorageError                 code
    ├── NotFound                 not_found
    │   └── BlobNotFound         blob_not_found
    ├── Conflict                 conflict
    │   └── AlreadyExists        already_exists
    ├── BlobTooLarge             blob_too_large
    ├── TooManyFiles             too_many_files
    ├── InvalidKey               invalid_key
    ├── IntegrityError           integrity_error (also a core.errors.IntegrityError)
    └── StorageUnavailable       storage_unavailable (object store unreachable; retry later)
        └── StorageFull          storage_full (no space left on the blob store's disk)
"""

from __future__ import annotations

from core.errors import IntegrityError as CoreIntegrityError
from core.errors import SlimError


class StorageError(SlimError):
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


class IntegrityError(CoreIntegrityError, StorageError):
    """Bytes read back (or uploaded) do not hash to the sha256 they were recorded under (the
    core's code, ``integrity_error``)."""


class StorageUnavailable(StorageError):
    """The object store could not be reached after retrying; try again later."""

    code = "storage_unavailable"


class StorageFull(StorageUnavailable):
    """The blob store's disk is full: nothing was stored; free space (or GC), then retry.

    A subclass of :class:`StorageUnavailable`, so workers treat it as transient (the job is
    given back and retried)."""

    code = "storage_full"

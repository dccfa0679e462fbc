"""A small typed Python SDK for the Slimstore API (v1), built on httpx.

Example:
    >>> from client import SlimClient
    >>> with SlimClient("http://127.0.0.1:8000", api_key=None) as slim:  # doctest: +SKIP
    ...     base, _ = slim.push_base("all-MiniLM-L6-v2/", name="minilm")
    ...     ckpt, job, _ = slim.push("sst2-ft/", base="minilm", method="magnitude", keep=0.05)
    ...     slim.wait(job.id)
    ...     slim.pull(ckpt.id, "sst2-pulled/")

Transfers resume (:mod:`client.transfer`). A push re-sends only the files whose sha256 differs
from what the server lists; a pull continues each ``<file>.incomplete`` with ``Range`` and moves
it into place only once its sha256 matches the ETag. :meth:`SlimClient.pull_local` downloads
only the delta and rebuilds the checkpoint against a base cached once per base manifest.

Every request sends ``Authorization: Bearer <api_key>`` when a key is configured. Server errors
``{"code", "detail"}`` become :class:`ApiError` subclasses that keep both (:mod:`client.errors`;
the ``slim`` command prints them as one line and exits 2).

Checkpoints and bases can be named by id, by name, or by a unique id prefix (``slim ls`` shows
the first 8 characters).

The package imports neither torch nor any server package; only
:meth:`SlimClient.pull_local` and :meth:`SlimClient.pull_merged` import the core's torch
modules (lazily) to rebuild a checkpoint, or merge a PEFT adapter into its base, here.

PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors``) are stored as they are
through the Hub protocol's routes (:mod:`client.adapters`): :meth:`SlimClient.push_adapter`,
:meth:`SlimClient.list_adapters`, :meth:`SlimClient.pull_adapter`,
:meth:`SlimClient.pull_merged`.

Modules: :mod:`client.errors` (the error tree), :mod:`client.models` (typed answers and
reports), :mod:`client.files` (the local side: model directories, calibration files, the
cache), :mod:`client.http` (the connection), :mod:`client.transfer` (streaming, hashing,
resume), :mod:`client.adapters` (PEFT adapters over the Hub routes), :mod:`client.client`
(:class:`SlimClient`).
"""

from client.client import SlimClient
from client.errors import (
    AlreadyExists,
    ApiError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    IntegrityError,
    JobFailed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from client.files import read_calibration
from client.models import (
    Adapter,
    Base,
    Checkpoint,
    FileInfo,
    Job,
    JobProgress,
    Progress,
    PulledFile,
    PullReport,
    PushReport,
    Repo,
    Revision,
    Stats,
)

__all__ = [
    "Adapter",
    "AlreadyExists",
    "ApiError",
    "BadRequest",
    "Base",
    "Checkpoint",
    "Conflict",
    "ConnectionFailed",
    "FileInfo",
    "Forbidden",
    "IntegrityError",
    "Job",
    "JobFailed",
    "JobProgress",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "Progress",
    "PullReport",
    "PulledFile",
    "PushReport",
    "Repo",
    "Revision",
    "ServerError",
    "SlimClient",
    "Stats",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "read_calibration",
]

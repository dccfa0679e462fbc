"""Deployment settings, read from ``SLIM_*`` environment variables (pydantic-settings).

One :class:`Settings` object configures the API, the worker and the server verbs of the CLI.
Embedded defaults need nothing set: a SQLite file and a blob directory under the data
directory, ``$SLIM_DATA_DIR`` or else :func:`default_data_dir` (one per user, whatever the
current directory — so ``slim serve`` and ``slim keys`` run from different directories find
the same database).
Distributed mode sets ``SLIM_DATABASE_URL=postgresql+psycopg://...`` and
``SLIM_BLOB_BACKEND=s3`` with ``SLIM_S3_ENDPOINT_URL``, ``SLIM_S3_BUCKET`` and credentials.

This module imports neither FastAPI nor the worker, so every edge can use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30
MIB = 1 << 20
#: What one API process may take while it streams: ~300 MB of Python and torch plus ~100-130 MB
#: of download buffers, rounded up (docs/scaling.md, "peak RSS of an API process").
API_PROCESS_BYTES = 512 * MIB
#: Hosts that only this machine can reach: the only ones open mode may bind to.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


#: Where an older default kept the embedded state: ``./slim-data`` under the current directory.
LEGACY_DATA_DIR = Path("slim-data")


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/slimstore``, else ``~/.local/share/slimstore``.

    Not relative to the current directory: that default (``./slim-data``) made ``slim keys
    create`` run elsewhere create a second database whose keys the server rejected."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "slimstore"


def default_api_workers() -> int:
    """How many API processes ``slim serve`` runs when ``SLIM_API_WORKERS`` is unset: one per
    two cores this process may use, and no more than fit in half the memory at
    :data:`API_PROCESS_BYTES` each; at least one.

    Two cores per process, not one: a download already runs a rebuild thread two pieces ahead
    and hashes in another, and a lossless rebuild inflates its byte planes on several threads,
    so one process keeps about two cores busy (docs/scaling.md). A 2-core machine therefore
    stays at one process, a 16-core node runs 8 (~4 GB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        memory = 0
    by_memory = memory // 2 // API_PROCESS_BYTES if memory > 0 else 1
    return max(1, min((cores or 1) // 2, by_memory))


class Settings(BaseSettings):
    """Everything a Slimstore process needs to know about its deployment."""

    model_config = SettingsConfigDict(env_prefix="SLIM_", extra="ignore")

    # -- where things live ---------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Root of local state (embedded); default $XDG_DATA_HOME/slimstore or "
        "~/.local/share/slimstore.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/slim.db."
    )
    auto_migrate: bool | None = Field(
        default=None,
        description="Apply migrations when the API starts; default: only for SQLite "
        "(distributed deployments run `slim migrate` once).",
    )
    blob_backend: Literal["local", "s3"] = "local"
    blob_dir: Path | None = Field(
        default=None, description="Local blob store; default <data_dir>/blobs."
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Local copies of S3 blobs (bases, deltas) keyed by sha256, and materialised "
        "base directories; default <data_dir>/cache.",
    )
    work_dir: Path | None = Field(
        default=None, description="Per-job scratch; default <data_dir>/work."
    )

    # -- S3 ------------------------------------------------------------------------------------
    s3_endpoint_url: str | None = None
    s3_bucket: str = "slimstore"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_prefix: str = ""
    s3_create_bucket: bool = Field(
        default=False, description="Create the bucket at start if missing."
    )
    s3_retry_seconds: float = 120.0

    # -- limits --------------------------------------------------------------------------------
    max_file_bytes: int = Field(
        default=100 * GIB, gt=0, description="Largest single uploaded file."
    )
    max_header_bytes: int = Field(
        default=100 * MIB, gt=0, description="Largest safetensors header."
    )
    max_files_per_checkpoint: int = Field(default=1000, gt=0)
    hub_part_bytes: int = Field(
        default=64 * MIB,
        ge=5 * MIB,
        description="Hub uploads (Git LFS): a file larger than this is uploaded in parts of "
        "this size (the multipart transfer), each part a PUT.",
    )
    max_calibration_examples: int = Field(default=10_000, gt=0)
    max_tensors_per_file: int = Field(
        default=200_000, gt=0, description="Most tensors one safetensors header may list."
    )
    max_json_body_bytes: int = Field(
        default=32 * MIB,
        gt=0,
        description="Largest JSON request body (a checkpoint's calibration examples travel in "
        "its create request, so this caps the calibration size).",
    )
    request_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A request must start its answer within this many seconds of the last "
        "body bytes it received (an upload whose body stalls this long gets 408; a handler "
        "that takes longer gets 504). Streamed answers are not cut once they have started.",
    )

    # -- behaviour -----------------------------------------------------------------------------
    retain_originals: bool = Field(
        default=False,
        description="Keep the uploaded files after a successful compression (default: delete "
        "them; the checkpoint is then served from its delta, verified by sha256).",
    )
    worker_lease_seconds: float = Field(default=60.0, gt=0)
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)
    worker_poll_seconds: float = Field(default=1.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    device: str | None = Field(default=None, description="cuda or cpu; default cuda when present.")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="Threads for torch's own parallel loops. Default: 1 in an API-only process "
        "(`slim serve --no-worker`: downloads already run several threads each, and torch "
        "spreading a small elementwise op over busy cores made it ~30x slower), all cores "
        "where searches run (`slim worker`, embedded `slim serve`).",
    )
    gc_grace_seconds: float = Field(default=3600.0, ge=0)
    revision_retention_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Garbage collection deletes revisions older than this that no ref (main, "
        "a branch) points at (default: keep every revision).",
    )
    gc_interval_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Run garbage collection this often in `slim serve` and `slim worker` "
        "(0: never; run `slim gc` from cron instead).",
    )

    # -- access --------------------------------------------------------------------------------
    bootstrap_key: SecretStr | None = Field(
        default=None,
        description="Becomes the first admin key (namespace default) at start if no key with "
        "its prefix exists; without it, a fresh install prints a generated admin key once.",
    )
    open: bool = Field(
        default=False,
        description="No keys at all: every request acts as admin of the default namespace. "
        "Only allowed while the server listens on 127.0.0.1 (a single-user laptop).",
    )
    cookie_secure: bool | None = Field(
        default=None,
        description="Mark the dashboard sign-in cookie Secure (default: when the request "
        "came over https).",
    )

    # -- server --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_workers: int | None = Field(
        default=None,
        ge=1,
        description="API processes `slim serve` runs on its one port (`--workers`); default "
        "one per two cores, capped by memory (runtime.settings.default_api_workers). Beyond "
        "one, a supervisor process migrates, prints the first key and runs the embedded job "
        "worker and garbage collection once; the API processes only answer requests.",
    )

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> Settings:
        if self.open and self.host not in LOOPBACK_HOSTS:
            raise ValueError(
                f"SLIM_OPEN=true serves without keys and is only allowed with host 127.0.0.1, "
                f"not {self.host!r}; drop SLIM_OPEN and use API keys (`slim keys create`)"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'slim.db').resolve()}"

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None for another database."""
        from sqlalchemy.engine import make_url

        url = make_url(self.resolved_database_url)
        if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
            return None
        return Path(url.database).resolve()

    @property
    def resolved_api_workers(self) -> int:
        return self.api_workers or default_api_workers()

    @property
    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.data_dir / "work"

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")

    @property
    def should_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

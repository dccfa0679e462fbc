"""SQLAlchemy models: the rows that say which blobs make up which base and checkpoint.

Tables: ``blobs`` (:class:`Blob`), ``bases`` (:class:`Base`, a base model), ``checkpoints``
(:class:`Checkpoint`), ``files`` (:class:`File`), ``jobs`` (:class:`Job`), ``api_keys``
(:class:`ApiKey`), ``repos`` (:class:`Repo`), ``revisions`` (:class:`Revision`) and ``refs``
(:class:`Ref`); :class:`Model` is the declarative base holding :data:`Model.metadata`.

A repository (``namespace/name``) owns the name users see; each of its revisions is immutable
and points at exactly one stored object, a base or a checkpoint, that holds its files. Several
checkpoints share their repository's name (one per revision, plus at most one push still in
flight); :mod:`storage.revisions` says which one a name means.

Types are portable (SQLite and PostgreSQL): ids are uuid4 strings (``String(36)``), JSON
columns use :class:`sqlalchemy.JSON`, states are ``StrEnum`` values stored as short strings
with a CHECK constraint, and timestamps are timezone-aware UTC (:class:`UTCDateTime`). All
constraints and indexes get stable names from :data:`NAMING_CONVENTION`, so migrations can
refer to them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DEFAULT_NAMESPACE = "default"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the application clock; see storage.db.db_now)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh row id: a uuid4 in its 36-character string form."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as naive
    UTC and tagged with UTC when read. Naive datetimes are rejected on write.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value!r}; use timezone-aware UTC (storage.models.utcnow)"
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class BaseState(StrEnum):
    UPLOADING = "uploading"
    READY = "ready"


class CheckpointState(StrEnum):
    UPLOADING = "uploading"
    QUEUED = "queued"
    COMPRESSING = "compressing"
    READY = "ready"
    FAILED = "failed"


class FileRole(StrEnum):
    WEIGHTS = "weights"
    AUX = "aux"


class JobKind(StrEnum):
    COMPRESS = "compress"
    MERGE = "merge"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ApiKeyRole(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


def _state_enum(enum_cls: type[StrEnum], name: str) -> Enum:
    """A string column limited to the enum's values by a named CHECK constraint."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda cls: [member.value for member in cls],
        validate_strings=True,
    )


class Model(DeclarativeBase):
    """Declarative base of every table (``Base`` is the row of a base model)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        int: BigInteger(),
    }


class Blob(Model):
    """A stored object under its content key; rows pointing at it keep it from GC."""

    __tablename__ = "blobs"

    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Base(Model):
    """A base model (θ_pre) that checkpoints are stored as deltas against."""

    __tablename__ = "bases"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    namespace: Mapped[str] = mapped_column(String(64), default=DEFAULT_NAMESPACE, index=True)
    name: Mapped[str] = mapped_column(String(255))
    state: Mapped[BaseState] = mapped_column(
        _state_enum(BaseState, "base_state"), default=BaseState.UPLOADING
    )
    num_params: Mapped[int | None]
    total_bytes: Mapped[int] = mapped_column(default=0)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Checkpoint(Model):
    """A fine-tune, stored (once ``ready``) as a compressed delta against its base.

    ``name`` is its repository's name: every revision of a repository has its own checkpoint
    row, so names are not unique here (see :mod:`storage.revisions`).
    """

    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_namespace_name", "namespace", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    namespace: Mapped[str] = mapped_column(String(64), default=DEFAULT_NAMESPACE, index=True)
    name: Mapped[str] = mapped_column(String(255))
    base_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("bases.id", ondelete="RESTRICT"), index=True
    )
    state: Mapped[CheckpointState] = mapped_column(
        _state_enum(CheckpointState, "checkpoint_state"), default=CheckpointState.UPLOADING
    )
    method: Mapped[str] = mapped_column(String(32))
    # keep, value_bits, min_fidelity, evaluation, seed, generations, ...
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    delta_blob_key: Mapped[str | None] = mapped_column(
        String(160), ForeignKey("blobs.key", ondelete="RESTRICT"), index=True
    )
    original_bytes: Mapped[int] = mapped_column(default=0)
    stored_bytes: Mapped[int | None]
    num_params: Mapped[int | None]
    bits_per_param: Mapped[float | None] = mapped_column(Float)
    ratio: Mapped[float | None] = mapped_column(Float)
    fitness: Mapped[dict[str, Any] | None]
    # The search trail (per generation / per candidate); a JSON list or object.
    trace: Mapped[Any] = mapped_column(JSON, nullable=True)
    search_seconds: Mapped[float | None] = mapped_column(Float)
    # {"method": "ties", "parents": [{"id": ..., "weight": ...}, ...]} for merged checkpoints.
    derived_from: Mapped[Any] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    #: The revision this checkpoint holds the files of; None while its push is in flight.
    revision: Mapped[Revision | None] = relationship(
        "Revision", primaryjoin="Checkpoint.id == Revision.checkpoint_id", viewonly=True
    )


class File(Model):
    """One file of a base or of a checkpoint (exactly one of the two owns it)."""

    __tablename__ = "files"
    __table_args__ = (
        UniqueConstraint("base_id", "path"),
        UniqueConstraint("checkpoint_id", "path"),
        CheckConstraint(
            "(base_id IS NULL AND checkpoint_id IS NOT NULL)"
            " OR (base_id IS NOT NULL AND checkpoint_id IS NULL)",
            name="one_owner",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    base_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("bases.id", ondelete="CASCADE")
    )
    checkpoint_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("checkpoints.id", ondelete="CASCADE")
    )
    path: Mapped[str] = mapped_column(String(1024))  # relative POSIX path
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    # None once the original upload is dropped after lossy compression.
    blob_key: Mapped[str | None] = mapped_column(
        String(160), ForeignKey("blobs.key", ondelete="RESTRICT"), index=True
    )
    role: Mapped[FileRole] = mapped_column(_state_enum(FileRole, "file_role"))
    # sha256 of the file rebuilt from the delta, recorded when the delta is written.
    recon_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Model):
    """A unit of work for a worker; claimed under a lease (see storage.queue)."""

    __tablename__ = "jobs"
    __table_args__ = (
        # The queue claims on these: queued jobs oldest first, running jobs with expired leases.
        Index("ix_jobs_state_lease_expires_at", "state", "lease_expires_at"),
        Index("ix_jobs_state_created_at", "state", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[JobKind] = mapped_column(_state_enum(JobKind, "job_kind"))
    checkpoint_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[JobState] = mapped_column(
        _state_enum(JobState, "job_state"), default=JobState.QUEUED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    # generation, best_fitness, phase, ...
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiKey(Model):
    """An API key: ``key_prefix`` is shown in listings, only a hash of the secret is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    key_prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(255))
    namespace: Mapped[str] = mapped_column(String(64), default=DEFAULT_NAMESPACE)
    role: Mapped[ApiKeyRole] = mapped_column(_state_enum(ApiKeyRole, "api_key_role"))
    name: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Repo(Model):
    """A repository ``namespace/name``: the history of one model under one name.

    ``base_id`` is the base its revisions are stored against (None: a repository stored whole,
    a base, which other repositories can be stored against). ``policy`` is kept for the
    repository's storage policy.
    """

    __tablename__ = "repos"
    __table_args__ = (UniqueConstraint("namespace", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    namespace: Mapped[str] = mapped_column(String(64), default=DEFAULT_NAMESPACE)
    name: Mapped[str] = mapped_column(String(255))
    base_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("bases.id", ondelete="RESTRICT"), index=True
    )
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Revision(Model):
    """An immutable revision of a repository: its files are those of exactly one stored object
    (a base or a checkpoint), fixed from the moment the revision exists.

    ``commit_id`` is 40 hex (:func:`storage.revisions.commit_id`); ``parent_commit`` the commit
    that was ``main`` when it was added (None for the first; it may name a deleted revision).
    ``manifest_sha256`` is :func:`core.files.manifest_sha256` of its files.
    """

    __tablename__ = "revisions"
    __table_args__ = (
        UniqueConstraint("commit_id"),
        CheckConstraint(
            "(base_id IS NULL AND checkpoint_id IS NOT NULL)"
            " OR (base_id IS NOT NULL AND checkpoint_id IS NULL)",
            name="one_object",
        ),
        CheckConstraint("length(commit_id) = 40", name="commit_id_length"),
        UniqueConstraint("repo_id", "number"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    repo_id: Mapped[str] = mapped_column(String(36), ForeignKey("repos.id", ondelete="CASCADE"))
    #: 1, 2, 3, ... in the order revisions were added to the repository (gaps where deleted).
    number: Mapped[int] = mapped_column(Integer)
    commit_id: Mapped[str] = mapped_column(String(40))
    parent_commit: Mapped[str | None] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text, default="")
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    base_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("bases.id", ondelete="CASCADE"), unique=True
    )
    checkpoint_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("checkpoints.id", ondelete="CASCADE"), unique=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Ref(Model):
    """A named pointer into a repository's history (``main``: its newest revision)."""

    __tablename__ = "refs"
    __table_args__ = (UniqueConstraint("repo_id", "name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    repo_id: Mapped[str] = mapped_column(String(36), ForeignKey("repos.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    revision_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("revisions.id", ondelete="CASCADE"), index=True
    )

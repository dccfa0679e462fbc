"""Repository functions over bases, checkpoints, files and blobs.

Thin, typed helpers for the API and the worker. They add, change and delete rows and flush,
but never commit: the caller owns the transaction (``with Session.begin(): ...``). Lookups by
id take an optional ``namespace``; a row in another namespace is reported as not found.

Bases and checkpoints are looked up by reference (:func:`get_base`, :func:`get_checkpoint`,
the one rule every route uses through them): the id, else — within the caller's namespace —
the name. An id wins over a name that happens to look like another row's id. Without a
namespace (the worker's internal lookups) only ids are accepted. A checkpoint name is its
repository's name and means the checkpoint of the repository's ``main`` revision (else its
push in flight): :func:`storage.revisions.checkpoint_for_name`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, TypeVar

from sqlalchemy import String, case, exists, func, literal, select, union, union_all
from sqlalchemy.exc import IntegrityError as DbIntegrityError
from sqlalchemy.orm import Session, aliased

from core.files import check_path
from storage import revisions
from storage.blob_common import BlobInfo
from storage.errors import AlreadyExists, Conflict, NotFound
from storage.models import (
    DEFAULT_NAMESPACE,
    Base,
    BaseState,
    Blob,
    Checkpoint,
    CheckpointState,
    File,
    FileRole,
    Job,
    JobState,
    Revision,
)

_Row = TypeVar("_Row", Base, Checkpoint)


# -- bases -----------------------------------------------------------------------------------


def create_base(session: Session, *, name: str, namespace: str = DEFAULT_NAMESPACE) -> Base:
    """A new base in state ``uploading``, in a new repository of its name (stored whole).

    Raises:
        AlreadyExists: the namespace already has a base (or another repository) of this name.
    """
    revisions.claim_repo(session, name=name, namespace=namespace, base_id=None, lock=False)
    base = Base(namespace=namespace, name=name, state=BaseState.UPLOADING, total_bytes=0)
    _insert_unique(session, base, f"a base named {name!r} already exists in {namespace!r}")
    return base


def get_base(session: Session, base_id: str, *, namespace: str | None = None) -> Base:
    """The base ``base_id`` names: its id, or (with ``namespace``) its name there.

    Raises:
        NotFound: no such base (in ``namespace``, if given).
    """
    return _get(session, Base, base_id, namespace, "base", "GET /v1/bases")


def find_base(session: Session, *, name: str, namespace: str = DEFAULT_NAMESPACE) -> Base | None:
    """The base of this name in the namespace, or None."""
    return session.scalars(
        select(Base).where(Base.namespace == namespace, Base.name == name)
    ).first()


#: The owner :func:`stored_bytes_by_base` files the blobs of unlisted bases under (revisions
#: stored whole without weights: a README or tokenizer pushed through the Hub).
UNLISTED: Final = ""


def listed_base() -> Any:
    """The condition on a base row that lists it as a base (:func:`list_bases`, the count in
    :func:`stats`): it holds weights, or is still uploading."""
    weights = aliased(File)
    has_weights = exists().where(weights.base_id == Base.id, weights.role == FileRole.WEIGHTS)
    return has_weights | (Base.state != BaseState.READY)


def unlisted_bases(session: Session, *, namespace: str) -> tuple[int, int]:
    """How many base rows of a namespace are not listed as bases, and their bytes as uploaded."""
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(Base.total_bytes), 0)).where(
            Base.namespace == namespace, ~listed_base()
        )
    ).one()
    return int(count), int(size)


def list_bases(
    session: Session, *, namespace: str = DEFAULT_NAMESPACE, limit: int = 100, offset: int = 0
) -> list[Base]:
    """Bases of a namespace, oldest first: those that hold weights, or are still uploading (a
    revision without weights — a README pushed through the Hub — is stored whole as a base row
    but is no base anything can be stored against)."""
    stmt = (
        select(Base)
        .where(Base.namespace == namespace, listed_base())
        .order_by(Base.created_at, Base.id)
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt))


def delete_base(session: Session, base_id: str, *, namespace: str | None = None) -> None:
    """Delete a base and its file rows (their blobs are left to garbage collection).

    Raises:
        NotFound: no such base.
        Conflict: checkpoints still depend on it (HTTP 409).
    """
    base = get_base(session, base_id, namespace=namespace)
    revision = session.scalars(select(Revision).where(Revision.base_id == base.id)).first()
    dependents = session.scalar(
        select(func.count()).select_from(Checkpoint).where(Checkpoint.base_id == base.id)
    )
    if dependents:
        raise Conflict(
            f"base {base.name!r} has {dependents} checkpoint(s) stored against it; "
            "delete those checkpoints first"
        )
    try:
        with session.begin_nested():
            if revision is not None:
                revisions.delete_revision(session, revision)
            else:
                holder = revisions.repo_of_base(session, base)
                session.delete(base)
                session.flush()
                if holder is not None:
                    revisions.delete_repo_if_empty(session, holder)
    except DbIntegrityError as exc:  # a checkpoint was created meanwhile
        raise Conflict(
            f"base {base.name!r} gained a checkpoint while being deleted; "
            "delete the checkpoints first"
        ) from exc


# -- checkpoints -----------------------------------------------------------------------------


def create_checkpoint(
    session: Session,
    *,
    name: str,
    base_id: str,
    method: str,
    params: Mapping[str, Any] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    derived_from: Any = None,
) -> Checkpoint:
    """A new checkpoint in state ``uploading`` against a ready base of the same namespace: the
    next revision of the repository ``name`` (created on its first push) once it is ready.

    Raises:
        NotFound: no such base in the namespace.
        Conflict: the base is still uploading.
        AlreadyExists: a push of this name is in flight (not ready yet), or the name is a base's.
    """
    base = get_base(session, base_id, namespace=namespace)
    if base.state != BaseState.READY:
        raise Conflict(
            f"base {base.name!r} is still {base.state.value}; commit it "
            f"(POST /v1/bases/{base.id}/commit) before adding checkpoints"
        )
    holder = revisions.claim_repo(session, name=name, namespace=namespace, base_id=base.id)
    pending = revisions.in_flight(session, name=name, namespace=namespace)
    if pending is not None:
        raise AlreadyExists(
            f"a push of {name!r} is in flight ({pending.state.value}, checkpoint {pending.id}); "
            "resume it with the same options, wait until it is ready, or delete it"
        )
    holder.base_id = base.id  # the next revision's base
    checkpoint = Checkpoint(
        namespace=namespace,
        name=name,
        base_id=base.id,
        method=method,
        params=dict(params or {}),
        derived_from=derived_from,
        state=CheckpointState.UPLOADING,
        original_bytes=0,
    )
    _insert_unique(
        session, checkpoint, f"a checkpoint named {name!r} already exists in {namespace!r}"
    )
    return checkpoint


def get_checkpoint(
    session: Session, checkpoint_id: str, *, namespace: str | None = None
) -> Checkpoint:
    """The checkpoint ``checkpoint_id`` names: its id, or (with ``namespace``) its name there.

    Raises:
        NotFound: no such checkpoint (in ``namespace``, if given).
    """
    return _get(session, Checkpoint, checkpoint_id, namespace, "checkpoint", "GET /v1/checkpoints")


def find_checkpoint(
    session: Session, *, name: str, namespace: str = DEFAULT_NAMESPACE
) -> Checkpoint | None:
    """The checkpoint this name means in the namespace (``main``'s, else its push in flight),
    or None."""
    return revisions.checkpoint_for_name(session, name=name, namespace=namespace)


def list_checkpoints(
    session: Session,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    base_id: str | None = None,
    state: CheckpointState | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Checkpoint]:
    """Checkpoints of a namespace, oldest first, optionally of one base or in one state."""
    stmt = select(Checkpoint).where(Checkpoint.namespace == namespace)
    if base_id is not None:
        stmt = stmt.where(Checkpoint.base_id == base_id)
    if state is not None:
        stmt = stmt.where(Checkpoint.state == CheckpointState(state))
    stmt = stmt.order_by(Checkpoint.created_at, Checkpoint.id).limit(limit).offset(offset)
    return list(session.scalars(stmt))


def delete_checkpoint(
    session: Session, checkpoint_id: str, *, namespace: str | None = None
) -> None:
    """Delete a checkpoint with its file rows and jobs (blobs are left to garbage collection):
    the revision it holds goes with it (:func:`storage.revisions.delete_revision`: ``main``
    moves back to its parent), and a repository left empty goes too.

    A worker still running its job finds its lease gone at the next heartbeat and stops.

    Raises:
        NotFound: no such checkpoint.
    """
    checkpoint = get_checkpoint(session, checkpoint_id, namespace=namespace)
    revision = checkpoint.revision
    if revision is not None:
        revisions.delete_revision(session, revision)
        return
    holder = revisions.find_repo(session, name=checkpoint.name, namespace=checkpoint.namespace)
    session.delete(checkpoint)
    session.flush()
    if holder is not None:
        revisions.delete_repo_if_empty(session, holder)


#: Checkpoint states in which files may still change (and a commit may be tried again).
OPEN_CHECKPOINT_STATES = (CheckpointState.UPLOADING, CheckpointState.FAILED)


def replaceable(checkpoint: Checkpoint) -> bool:
    """Whether a new checkpoint may take this one's name: it failed and was never stored (no
    delta) and is not a merge result. Its rows go; its blobs are left to garbage collection."""
    return (
        checkpoint.state == CheckpointState.FAILED
        and checkpoint.delta_blob_key is None
        and checkpoint.derived_from is None
    )


# -- blobs and files -------------------------------------------------------------------------


def record_blob(session: Session, info: BlobInfo) -> Blob:
    """The ``blobs`` row for a stored blob, inserted if missing (safe under concurrency).

    Call it after ``BlobStore.put_*`` returned and before adding rows that point at the key.
    """
    blob = session.get(Blob, info.key)
    if blob is not None:
        return blob
    try:
        with session.begin_nested():
            blob = Blob(key=info.key, sha256=info.sha256, size=info.size)
            session.add(blob)
    except DbIntegrityError:  # inserted concurrently
        blob = session.get(Blob, info.key, populate_existing=True)
        if blob is None:
            raise
    return blob


def put_file(
    session: Session,
    *,
    path: str,
    size: int,
    sha256: str,
    blob_key: str | None,
    role: FileRole,
    base_id: str | None = None,
    checkpoint_id: str | None = None,
) -> File:
    """Add the file row of a base or a checkpoint (exactly one), replacing one at the same path.

    Raises:
        InvalidPath: ``path`` is not a plain relative path.
        ValueError: not exactly one of ``base_id`` and ``checkpoint_id`` given.
    """
    check_path(path)
    row = _find_file(session, path=path, base_id=base_id, checkpoint_id=checkpoint_id)
    if row is None:
        row = File(base_id=base_id, checkpoint_id=checkpoint_id, path=path)
        session.add(row)
    row.size = size
    row.sha256 = sha256
    row.blob_key = blob_key
    row.role = FileRole(role)
    row.recon_sha256 = None
    session.flush()
    return row


def get_file(
    session: Session, *, path: str, base_id: str | None = None, checkpoint_id: str | None = None
) -> File:
    """The file row at ``path`` of a base or a checkpoint.

    Raises:
        NotFound: no such file.
    """
    row = _find_file(session, path=path, base_id=base_id, checkpoint_id=checkpoint_id)
    if row is None:
        raise NotFound(f"no file {path!r} here; list the files with GET on the base or checkpoint")
    return row


def list_files(
    session: Session, *, base_id: str | None = None, checkpoint_id: str | None = None
) -> list[File]:
    """File rows of a base or a checkpoint, by path."""
    stmt = select(File).where(_owner(base_id, checkpoint_id)).order_by(File.path)
    return list(session.scalars(stmt))


def referenced_blob_keys(session: Session, among: Collection[str] | None = None) -> set[str]:
    """Blob keys that rows point at (file originals and checkpoint deltas).

    With ``among``, only those of the given keys (one query per call; batch large sets).
    """
    file_keys = select(File.blob_key).where(File.blob_key.is_not(None))
    delta_keys = select(Checkpoint.delta_blob_key).where(Checkpoint.delta_blob_key.is_not(None))
    if among is not None:
        if not among:
            return set()
        file_keys = file_keys.where(File.blob_key.in_(among))
        delta_keys = delta_keys.where(Checkpoint.delta_blob_key.in_(among))
    return {key for key in session.scalars(union(file_keys, delta_keys)) if key is not None}


def unreferenced_blob_condition() -> Any:
    """SQL condition on ``Blob``: no file or checkpoint row points at it."""
    return ~exists().where(File.blob_key == Blob.key) & ~exists().where(
        Checkpoint.delta_blob_key == Blob.key
    )


# -- stats -----------------------------------------------------------------------------------
#
# Stored bytes, defined once: the bytes of the blobs that rows point at (base files, checkpoint
# files, checkpoint deltas), each distinct blob counted once in any total. Every figure — the
# checkpoint record's ``stored_bytes`` (its delta blob, written by the worker from the blob it
# stored), ``GET /v1/stats``, the dashboard and ``slim stats`` — is a sum of these, split into
# the parts below so a total always says what it counts.


class StoredPart(StrEnum):
    """What a stored blob is kept for, in the order a blob with several uses is counted under
    (a tokenizer file shared by a base and its checkpoints counts once, as a base file)."""

    BASES = "bases"
    DELTAS = "deltas"
    RETAINED = "retained"
    PENDING = "pending"
    FAILED = "failed"


#: What each part counts, as the dashboard and ``slim stats`` print it.
STORED_PART_LABELS: dict[str, str] = {
    StoredPart.BASES: "base files",
    StoredPart.DELTAS: "checkpoint deltas",
    StoredPart.RETAINED: "originals retained beside a delta",
    StoredPart.PENDING: "uploads not compressed yet",
    StoredPart.FAILED: "uploads of failed jobs (kept for a retry; freed when deleted)",
}


@dataclass(slots=True)
class StoredBytes:
    """Stored bytes split by :class:`StoredPart` (each blob in one part); ``total`` is their sum."""

    parts: dict[str, int] = field(default_factory=lambda: {p.value: 0 for p in StoredPart})
    num_blobs: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def add(self, part: int | str, size: int, blobs: int = 1) -> None:
        name = _PART_ORDER[part] if isinstance(part, int) else StoredPart(part).value
        self.parts[name] += int(size)
        self.num_blobs += int(blobs)


_PART_ORDER = [p.value for p in StoredPart]


@dataclass(slots=True)
class Stats:
    """Storage totals of ``GET /v1/stats``, the dashboard and ``slim stats``.

    ``logical_bytes``: what the stored models would take as plain files (base files plus
    original checkpoint files). ``stored_bytes``: the stored bytes as defined above (distinct
    referenced blobs), ``stored_parts`` the same total split by :class:`StoredPart`.
    """

    logical_bytes: int = 0
    stored_bytes: int = 0
    num_bases: int = 0
    num_checkpoints: int = 0
    num_blobs: int = 0
    checkpoints_by_state: dict[str, int] = field(default_factory=dict)
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    stored_parts: dict[str, int] = field(default_factory=lambda: StoredBytes().parts)

    @property
    def ratio(self) -> float | None:
        """logical / stored, or None while nothing is stored."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else None


def stats(session: Session, *, namespace: str | None = None) -> Stats:
    """Totals over one namespace, or over everything when ``namespace`` is None."""
    bases = select(Base.id, Base.total_bytes, listed_base().label("listed"))
    checkpoints = select(Checkpoint.id, Checkpoint.original_bytes, Checkpoint.state)
    if namespace is not None:
        bases = bases.where(Base.namespace == namespace)
        checkpoints = checkpoints.where(Checkpoint.namespace == namespace)
    base_q, ckpt_q = bases.subquery(), checkpoints.subquery()

    out = Stats()
    out.num_bases, base_bytes = session.execute(
        select(
            func.coalesce(func.sum(case((base_q.c.listed, 1), else_=0)), 0),
            func.coalesce(func.sum(base_q.c.total_bytes), 0),
        )
    ).one()
    out.num_checkpoints, ckpt_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(ckpt_q.c.original_bytes), 0))
    ).one()
    out.logical_bytes = int(base_bytes) + int(ckpt_bytes)
    for state, count in session.execute(
        select(ckpt_q.c.state, func.count()).group_by(ckpt_q.c.state)
    ):
        out.checkpoints_by_state[CheckpointState(state).value] = count
    job_rows = session.execute(
        select(Job.state, func.count())
        .where(Job.checkpoint_id.in_(select(ckpt_q.c.id)))
        .group_by(Job.state)
    )
    for state, count in job_rows:
        out.jobs_by_state[JobState(state).value] = count

    stored = stored_bytes(session, namespace=namespace)
    out.stored_bytes, out.stored_parts, out.num_blobs = stored.total, stored.parts, stored.num_blobs
    return out


def stored_bytes(session: Session, *, namespace: str | None = None) -> StoredBytes:
    """The stored bytes of a namespace (of everything when None), each blob counted once."""
    return _stored_by(session, _blob_refs(namespace), None).get(None, StoredBytes())


def stored_bytes_by_base(
    session: Session, *, namespace: str | None = None
) -> dict[str, StoredBytes]:
    """Stored bytes per base: its files plus its checkpoints' blobs, each blob once per base;
    the files of bases that are not listed (:func:`listed_base`) under :data:`UNLISTED`."""
    refs = _blob_refs(namespace)
    return _stored_by(session, refs, refs.c.base_id)


def stored_bytes_by_checkpoint(
    session: Session, checkpoint_ids: Collection[str]
) -> dict[str, StoredBytes]:
    """Stored bytes per checkpoint: its delta and the uploaded files it still keeps."""
    if not checkpoint_ids:
        return {}
    refs = _blob_refs(None, checkpoint_ids=checkpoint_ids)
    return _stored_by(session, refs, refs.c.checkpoint_id)


def _blob_refs(namespace: str | None, checkpoint_ids: Collection[str] | None = None) -> Any:
    """(key, part, base_id, checkpoint_id) of every row pointing at a blob."""
    ckpt_part = case(
        (Checkpoint.state == CheckpointState.READY, _PART_ORDER.index(StoredPart.RETAINED)),
        (Checkpoint.state == CheckpointState.FAILED, _PART_ORDER.index(StoredPart.FAILED)),
        else_=_PART_ORDER.index(StoredPart.PENDING),
    )
    base_files = (
        select(
            File.blob_key.label("key"),
            literal(_PART_ORDER.index(StoredPart.BASES)).label("part"),
            case((listed_base(), File.base_id), else_=literal(UNLISTED)).label("base_id"),
            literal(None, String).label("checkpoint_id"),
        )
        .join(Base, File.base_id == Base.id)
        .where(File.blob_key.is_not(None))
    )
    ckpt_files = (
        select(
            File.blob_key.label("key"),
            ckpt_part.label("part"),
            Checkpoint.base_id.label("base_id"),
            Checkpoint.id.label("checkpoint_id"),
        )
        .join(Checkpoint, File.checkpoint_id == Checkpoint.id)
        .where(File.blob_key.is_not(None))
    )
    deltas = select(
        Checkpoint.delta_blob_key,
        literal(_PART_ORDER.index(StoredPart.DELTAS)),
        Checkpoint.base_id,
        Checkpoint.id,
    ).where(Checkpoint.delta_blob_key.is_not(None))
    if namespace is not None:
        base_files = base_files.where(Base.namespace == namespace)
        ckpt_files = ckpt_files.where(Checkpoint.namespace == namespace)
        deltas = deltas.where(Checkpoint.namespace == namespace)
    if checkpoint_ids is not None:
        ckpt_files = ckpt_files.where(Checkpoint.id.in_(checkpoint_ids))
        deltas = deltas.where(Checkpoint.id.in_(checkpoint_ids))
        return union_all(ckpt_files, deltas).subquery()
    return union_all(base_files, ckpt_files, deltas).subquery()


def _stored_by(session: Session, refs: Any, owner: Any) -> dict[Any, StoredBytes]:
    """Sum distinct blobs by part (a blob used twice counts once, under its first part),
    separately for each ``owner`` value (one total when None)."""
    group = [refs.c.key] if owner is None else [owner, refs.c.key]
    first = select(*group, func.min(refs.c.part).label("part")).group_by(*group).subquery()
    by = [] if owner is None else [first.c[owner.name]]
    rows = session.execute(
        select(*by, first.c.part, func.count(), func.coalesce(func.sum(Blob.size), 0))
        .join(Blob, Blob.key == first.c.key)
        .group_by(*by, first.c.part)
    )
    out: dict[Any, StoredBytes] = {}
    for row in rows:
        who = None if owner is None else row[0]
        part, count, size = row[-3:]
        out.setdefault(who, StoredBytes()).add(int(part), size, count)
    return out


# -- helpers ---------------------------------------------------------------------------------


def _get(
    session: Session, model: type[_Row], ref: str, namespace: str | None, what: str, hint: str
) -> _Row:
    """The row ``ref`` names: by id, else by name in ``namespace`` (the module's lookup rule).

    Raises:
        NotFound: neither (a row of another namespace counts as absent).
    """
    row = session.get(model, ref)
    if row is not None and (namespace is None or row.namespace == namespace):
        return row
    if namespace is None:
        raise NotFound(f"{what} {ref} does not exist; list them with {hint}")
    named: Base | Checkpoint | None
    if model is Checkpoint:
        named = revisions.checkpoint_for_name(session, name=ref, namespace=namespace)
    else:  # base names are unique per namespace (a constraint)
        named = session.scalars(
            select(model).where(model.namespace == namespace, model.name == ref)
        ).first()
    if isinstance(named, model):
        return named
    raise NotFound(
        f"no {what} has the id or name {ref!r} in namespace {namespace!r}; list them with {hint}"
    )


def _insert_unique(session: Session, row: Base | Checkpoint, message: str) -> None:
    try:
        with session.begin_nested():
            session.add(row)
    except DbIntegrityError as exc:
        raise AlreadyExists(f"{message}; pick another name or delete the existing one") from exc


def _find_file(
    session: Session, *, path: str, base_id: str | None, checkpoint_id: str | None
) -> File | None:
    stmt = select(File).where(_owner(base_id, checkpoint_id), File.path == path)
    return session.scalars(stmt).first()


def _owner(base_id: str | None, checkpoint_id: str | None) -> Any:
    if (base_id is None) == (checkpoint_id is None):
        raise ValueError("a file belongs to exactly one of base_id and checkpoint_id")
    return File.base_id == base_id if base_id is not None else File.checkpoint_id == checkpoint_id

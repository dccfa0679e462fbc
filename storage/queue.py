"""The job queue, kept in the ``jobs`` table, and every job and checkpoint state change.

Where does a job (or its checkpoint) change state? Here, and only here:

- :func:`queue_compression`: checkpoint uploading|failed → queued; a ``compress`` job queued.
- :func:`queue_merge`: a new derived checkpoint → queued; a ``merge`` job queued.
- :func:`enqueue`: a job → queued (the two above use it).
- :func:`claim`: job queued (or running with an expired lease) → running, under a lease.
- :func:`mark_compressing`: checkpoint → compressing (the worker, once it claimed the job).
- :func:`heartbeat`: running job's lease renewed and progress merged (reports a cancel).
- :func:`publish`: job running → succeeded and checkpoint → ready, with the delta's rows; the
  checkpoint becomes the newest revision of its repository (``main`` moves to it).
- :func:`finish`: job running → failed | cancelled (checkpoint → failed), or → queued for
  a retry (checkpoint → queued; both failed once no attempts are left).
- :func:`request_cancel`: job queued → cancelled (a queued checkpoint → failed); a running job
  gets the cancel flag its next heartbeat reports.
- :func:`fail_expired_exhausted` (the reaper): running job whose lease expired with no
  attempts left → failed (cancelled if a cancel was asked); its checkpoint → failed.
- :func:`fail_upload`: checkpoint uploading|failed → failed, its uploaded files let go.
- :func:`ready_base`: base uploading → ready, with its size, parameter count and manifest; the
  base becomes its repository's revision.

(A checkpoint is created ``uploading`` by :func:`storage.repo.create_checkpoint`, a base by
:func:`storage.repo.create_base`.)

Life of a job::

    enqueue ──▶ queued ──claim──▶ running ──publish──▶ succeeded
                  ▲                 │  ▲     └─finish──▶ failed | cancelled
                  └─ finish(QUEUED) ┘  └─ claim again once the lease expires (worker lost),
                     (retry)              while attempts < max_attempts

A worker holds a job under a lease (``lease_owner``, ``lease_expires_at``) and renews it with
:func:`heartbeat`. If the worker dies the lease runs out and another worker's :func:`claim`
takes the job over (``attempts`` counts claims). A job whose lease expired on its last attempt
is failed by :func:`fail_expired_exhausted`, which something (the worker loop, a cron) calls
now and then. Cancelling a running job sets a flag the next heartbeat reports. Only the
lease holder may :func:`publish` or :func:`finish` a job.

Claims use ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, so concurrent workers never get
the same job, and ``BEGIN IMMEDIATE`` on SQLite (one writer at a time). Every time is the
database clock (:func:`storage.db.db_now`).

Transactions: :func:`enqueue`, :func:`queue_merge`, :func:`mark_compressing` and
:func:`fail_upload` only change rows in the caller's transaction; :func:`queue_compression`
commits the caller's transaction. Every other function here runs in a write transaction of its
own (:func:`storage.db.write_transaction`) and commits it; a transaction already open on the
session is committed first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session, object_session

from core.files import manifest_sha256 as files_manifest
from core.params import CompressOutcome
from storage import revisions
from storage.blob_common import BlobInfo
from storage.db import db_now, for_update, is_sqlite, write_transaction
from storage.errors import Conflict, NotFound
from storage.models import (
    Base,
    BaseState,
    Checkpoint,
    CheckpointState,
    File,
    FileRole,
    Job,
    JobKind,
    JobState,
)
from storage.repo import OPEN_CHECKPOINT_STATES, list_files, put_file, record_blob

FINISH_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
)


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """What a heartbeat found. Truthy only when the worker should carry on.

    ``lease_held`` False: another worker took the job over, or it was finished or deleted;
    stop without writing anything. ``cancel_requested`` True: stop, clean up, and call
    ``finish(..., JobState.CANCELLED)`` (the lease is still yours and was renewed).
    """

    lease_held: bool
    cancel_requested: bool

    @property
    def ok(self) -> bool:
        return self.lease_held and not self.cancel_requested

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True, slots=True)
class ReapResult:
    """Jobs :func:`fail_expired_exhausted` closed: ids of those failed and of those cancelled."""

    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What :func:`publish` did. Truthy only when the checkpoint was published.

    ``lease_held`` False: the job was taken over, finished or deleted, or its checkpoint was
    deleted; nothing was written. ``cancel_requested`` True: a cancel came first; nothing was
    written (the lease is still yours: ``finish(..., JobState.CANCELLED)``). ``drop``: original
    blobs the checkpoint no longer references (to delete once nothing else does).
    """

    lease_held: bool
    cancel_requested: bool
    drop: frozenset[str] = frozenset()

    @property
    def published(self) -> bool:
        return self.lease_held and not self.cancel_requested

    def __bool__(self) -> bool:
        return self.published


def enqueue(
    session: Session,
    kind: JobKind,
    checkpoint_id: str,
    payload: Mapping[str, Any] | None = None,
    max_attempts: int = 3,
) -> Job:
    """Add a queued job to the session's transaction (flushed, not committed)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    job = Job(
        kind=JobKind(kind),
        checkpoint_id=checkpoint_id,
        state=JobState.QUEUED,
        attempts=0,
        max_attempts=max_attempts,
        payload=dict(payload or {}),
        progress={},
    )
    session.add(job)
    session.flush()
    return job


def queue_compression(
    session: Session,
    checkpoint: Checkpoint,
    *,
    original_bytes: int,
    num_params: int,
    max_attempts: int,
) -> Job:
    """A committed upload: the checkpoint (still uploading or failed) becomes ``queued`` with
    its sizes, and its ``compress`` job is queued. Commits the caller's transaction.

    Raises:
        Conflict: the checkpoint was committed meanwhile (nothing changed; rolled back).
    """
    checkpoint_id, name = checkpoint.id, checkpoint.name
    claimed = session.execute(
        update(Checkpoint)
        .where(Checkpoint.id == checkpoint_id, Checkpoint.state.in_(OPEN_CHECKPOINT_STATES))
        .values(
            state=CheckpointState.QUEUED,
            original_bytes=original_bytes,
            num_params=num_params,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 1) != 1:
        session.rollback()
        raise Conflict(f"checkpoint {name!r} was committed meanwhile")
    job = enqueue(session, JobKind.COMPRESS, checkpoint_id, max_attempts=max_attempts)
    session.commit()
    return job


def queue_merge(
    session: Session, checkpoint: Checkpoint, payload: Mapping[str, Any], *, max_attempts: int
) -> Job:
    """A new derived checkpoint becomes ``queued`` and its ``merge`` job is queued (in the
    caller's transaction, flushed, not committed)."""
    checkpoint.state = CheckpointState.QUEUED
    return enqueue(
        session, JobKind.MERGE, checkpoint.id, payload=payload, max_attempts=max_attempts
    )


def claim(
    session: Session,
    worker_id: str,
    lease_seconds: float,
    *,
    kinds: Sequence[JobKind] | None = None,
) -> Job | None:
    """Take the oldest claimable job, or return None if there is none.

    Claimable: ``queued``, or ``running`` with an expired lease, fewer than ``max_attempts``
    claims so far and no cancel requested (its worker was lost). The job becomes ``running``
    under a lease of ``lease_seconds`` held by ``worker_id``; ``attempts`` goes up by one.
    Commits.
    """
    with write_transaction(session):
        now = db_now(session)
        lost = and_(
            Job.state == JobState.RUNNING,
            Job.lease_expires_at < now,
            Job.attempts < Job.max_attempts,
            Job.cancel_requested.is_(False),
        )
        stmt = (
            select(Job)
            .where(or_(Job.state == JobState.QUEUED, lost))
            .order_by(Job.created_at, Job.id)
            .limit(1)
            .execution_options(populate_existing=True)
        )
        if kinds:
            stmt = stmt.where(Job.kind.in_([JobKind(kind) for kind in kinds]))
        if not is_sqlite(session):
            stmt = stmt.with_for_update(skip_locked=True)
        job = session.scalars(stmt).first()
        if job is None:
            return None
        job.state = JobState.RUNNING
        job.attempts += 1
        job.lease_owner = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.heartbeat_at = now
        job.started_at = now
        return job


def heartbeat(
    session: Session,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    progress: Mapping[str, Any] | None = None,
) -> HeartbeatResult:
    """Renew the lease and merge ``progress`` into the job's progress, if ``worker_id`` still
    holds the job. See :class:`HeartbeatResult` for what to do with the answer. Commits."""
    with write_transaction(session):
        job = _lock(session, job_id)
        if job is None or job.state != JobState.RUNNING or job.lease_owner != worker_id:
            return HeartbeatResult(
                lease_held=False, cancel_requested=bool(job and job.cancel_requested)
            )
        now = db_now(session)
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        job.heartbeat_at = now
        if progress:
            job.progress = {**(job.progress or {}), **progress}
        return HeartbeatResult(lease_held=True, cancel_requested=job.cancel_requested)


def mark_compressing(checkpoint: Checkpoint) -> Checkpoint:
    """A claimed job's checkpoint is being built (in the caller's transaction)."""
    checkpoint.state = CheckpointState.COMPRESSING
    checkpoint.error = None
    return checkpoint


def publish(
    session: Session,
    job_id: str,
    worker_id: str,
    info: BlobInfo,
    outcome: Mapping[str, Any],
    files: Mapping[str, Any],
    *,
    new_files: bool,
    drop_originals: bool,
    progress: Mapping[str, Any],
) -> PublishResult:
    """Make a job's checkpoint ready and the job ``succeeded``, in one transaction, if
    ``worker_id`` still holds the job and no cancel was requested. Commits.

    Args:
        info: the stored delta blob (a blobs row is recorded for it).
        outcome: what the job produced, as checkpoint columns
            (:meth:`core.params.CompressOutcome.to_row`, or a merge's summary).
        files: the delta's file entries by path (``path``, ``size``, ``sha256``, ``role``,
            ``recon_sha256``): each file row gets the sha256 its rebuild must match.
        new_files: write file rows from ``files`` (a merge) instead of updating the uploaded
            ones (a compression).
        drop_originals: let the uploaded blobs go (their keys come back in ``drop``).
        progress: merged into the job's progress, with ``phase`` ``done``.

    ``stored_bytes`` is the size of the delta blob as stored (``info.size``, the bytes a pull
    of ``/delta`` streams — see :mod:`storage.repo` for the one definition of stored bytes)
    and ``ratio`` is ``original_bytes / stored_bytes``: whatever ``outcome`` said (a method's own
    accounting; ``auto`` rewrites its document after compressing) is replaced here.
    """
    drop: set[str] = set()
    with write_transaction(session):
        job = _lock(session, job_id)
        if job is None or job.state != JobState.RUNNING or job.lease_owner != worker_id:
            return PublishResult(lease_held=False, cancel_requested=False)
        if job.cancel_requested:
            return PublishResult(lease_held=True, cancel_requested=True)
        checkpoint = session.get(Checkpoint, job.checkpoint_id, populate_existing=True)
        if checkpoint is None:
            return PublishResult(lease_held=False, cancel_requested=False)
        # a revision already served from the uploaded blobs (a Hub push, stored exact at once):
        # readers may be streaming them, so they go to garbage collection after its grace
        # period rather than now
        served = checkpoint.revision is not None
        record_blob(session, info)
        checkpoint.delta_blob_key = info.key
        _record_outcome(checkpoint, outcome)
        checkpoint.stored_bytes = info.size
        checkpoint.ratio = checkpoint.original_bytes / info.size if info.size else None
        checkpoint.state = CheckpointState.READY
        checkpoint.error = None
        if new_files:
            for entry in files.values():
                row = put_file(
                    session,
                    path=entry.path,
                    size=entry.size,
                    sha256=entry.sha256,
                    blob_key=None,
                    role=FileRole(entry.role),
                    checkpoint_id=checkpoint.id,
                )
                row.recon_sha256 = entry.recon_sha256 or entry.sha256
        else:
            for row in list_files(session, checkpoint_id=checkpoint.id):
                entry = files.get(row.path)
                if entry is None:  # not part of the model directory (should not happen)
                    continue
                row.recon_sha256 = entry.recon_sha256 or entry.sha256
                if drop_originals and row.blob_key is not None:
                    drop.add(row.blob_key)
                    row.blob_key = None
        lands_on = (job.payload or {}).get(LANDS_ON)
        if lands_on is None:
            _add_checkpoint_revision(session, checkpoint)
        elif not _land_compression(session, checkpoint, str(lands_on)):
            for row in list_files(session, checkpoint_id=checkpoint.id):
                if row.blob_key is not None:
                    drop.add(row.blob_key)
                    row.blob_key = None
        job.state = JobState.SUCCEEDED
        job.finished_at = db_now(session)
        job.lease_expires_at = None
        job.error = None
        job.progress = {**(job.progress or {}), **progress, "phase": "done"}
    if served:
        drop = set()
    return PublishResult(lease_held=True, cancel_requested=False, drop=frozenset(drop))


def finish(
    session: Session,
    job_id: str,
    worker_id: str,
    state: JobState,
    error: str | None = None,
) -> bool:
    """End the worker's hold on a job and set its checkpoint's state, in one transaction;
    False (and no change) if ``worker_id`` no longer holds the lease.

    ``state`` is ``failed`` or ``cancelled`` (the checkpoint becomes ``failed`` with
    ``error``), or ``queued`` to give the job back for another attempt after a transient error
    (the checkpoint goes back to ``queued``; both become ``failed`` instead when no attempts
    are left). ``succeeded`` leaves the checkpoint as it is (:func:`publish` is what makes one
    ready). A ready checkpoint is never changed. Commits.
    """
    state = JobState(state)
    if state not in FINISH_STATES:
        raise ValueError(f"cannot finish a job as {state!r}; use one of {sorted(FINISH_STATES)}")
    with write_transaction(session):
        job = _lock(session, job_id)
        if job is None or job.state != JobState.RUNNING or job.lease_owner != worker_id:
            return False
        job.error = error
        job.lease_expires_at = None
        if state == JobState.QUEUED and job.attempts < job.max_attempts:
            job.state = JobState.QUEUED
            ckpt_state, ckpt_error = CheckpointState.QUEUED, None
        else:
            job.state = JobState.FAILED if state == JobState.QUEUED else state
            job.finished_at = db_now(session)
            ckpt_state, ckpt_error = CheckpointState.FAILED, error
        if job.state == JobState.SUCCEEDED:
            return True
        checkpoint = session.get(Checkpoint, job.checkpoint_id, populate_existing=True)
        if checkpoint is not None and checkpoint.state != CheckpointState.READY:
            checkpoint.state = ckpt_state
            checkpoint.error = ckpt_error
        return True


def request_cancel(session: Session, job_id: str) -> Job:
    """Cancel a job: a queued one at once (its queued checkpoint becomes ``failed``), a running
    one at its worker's next heartbeat.

    Finished jobs are left as they are. Returns the job. Commits.

    Raises:
        NotFound: no job has this id.
    """
    with write_transaction(session):
        job = _lock(session, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist; list jobs with GET /v1/jobs")
        if job.state == JobState.QUEUED:
            job.state = JobState.CANCELLED
            job.cancel_requested = True
            job.finished_at = db_now(session)
            checkpoint = session.get(Checkpoint, job.checkpoint_id)
            if checkpoint is not None and checkpoint.state == CheckpointState.QUEUED:
                checkpoint.state = CheckpointState.FAILED
                checkpoint.error = "cancelled: the job was cancelled before it started"
        elif job.state == JobState.RUNNING:
            job.cancel_requested = True
        return job


def fail_expired_exhausted(session: Session) -> ReapResult:
    """Close running jobs whose lease expired and that nobody will claim again.

    A job that used its last attempt becomes ``failed``; one with a cancel request becomes
    ``cancelled``. As no worker is left to do it, the job's checkpoint, if still queued or
    compressing, is marked ``failed`` with the same error. Commits.
    """
    result = ReapResult()
    with write_transaction(session):
        now = db_now(session)
        stmt = (
            select(Job)
            .where(
                Job.state == JobState.RUNNING,
                Job.lease_expires_at < now,
                or_(Job.attempts >= Job.max_attempts, Job.cancel_requested.is_(True)),
            )
            .execution_options(populate_existing=True)
        )
        if not is_sqlite(session):
            stmt = stmt.with_for_update(skip_locked=True)
        for job in session.scalars(stmt):
            if job.cancel_requested:
                job.state = JobState.CANCELLED
                job.error = "cancelled; the worker stopped before acknowledging the cancel"
                result.cancelled.append(job.id)
            else:
                job.state = JobState.FAILED
                job.error = (
                    f"worker {job.lease_owner} stopped renewing its lease on attempt "
                    f"{job.attempts} of {job.max_attempts}; no attempts left. Check the worker "
                    "logs (out of memory?), then commit the checkpoint again"
                )
                result.failed.append(job.id)
            job.finished_at = now
            job.lease_expires_at = None
            checkpoint = session.get(Checkpoint, job.checkpoint_id)
            if checkpoint is not None and checkpoint.state in (
                CheckpointState.QUEUED,
                CheckpointState.COMPRESSING,
            ):
                checkpoint.state = CheckpointState.FAILED
                checkpoint.error = job.error
    return result


def list_jobs(
    session: Session,
    *,
    state: JobState | None = None,
    checkpoint_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Job]:
    """Jobs, newest first, optionally filtered by state and checkpoint."""
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    if state is not None:
        stmt = stmt.where(Job.state == JobState(state))
    if checkpoint_id is not None:
        stmt = stmt.where(Job.checkpoint_id == checkpoint_id)
    return list(session.scalars(stmt))


def ready_base(base: Base, *, total_bytes: int, num_params: int, manifest_sha256: str) -> Base:
    """A base whose weights were checked becomes ``ready``: its files are fixed from now on,
    and it becomes the newest revision of its repository (in the caller's transaction)."""
    base.total_bytes = total_bytes
    base.num_params = num_params
    base.manifest_sha256 = manifest_sha256
    base.state = BaseState.READY
    session = object_session(base)
    if session is not None:
        holder = revisions.repo_of_base(session, base) or revisions.claim_repo(
            session, name=base.name, namespace=base.namespace, base_id=None
        )
        revisions.add_revision(
            session,
            holder,
            manifest_sha256=manifest_sha256,
            message=f"base {base.name}: {total_bytes} bytes stored whole",
            base_id=base.id,
        )
    return base


def revision_message(checkpoint: Checkpoint) -> str:
    """The commit message of a checkpoint's revision: method, stored size, measured fidelity."""
    outcome = CompressOutcome.from_row(checkpoint)
    text = f"{checkpoint.name}: {checkpoint.method}, {checkpoint.stored_bytes} bytes stored"
    if checkpoint.ratio:
        text += f" ({checkpoint.ratio:.2f}x)"
    if outcome.fidelity is not None:
        text += f", fidelity {outcome.fidelity:.4f}"
    return text


def _add_checkpoint_revision(session: Session, checkpoint: Checkpoint) -> None:
    """A checkpoint that became ready is the newest revision of its repository."""
    if checkpoint.revision is not None:
        return
    holder = revisions.claim_repo(
        session, name=checkpoint.name, namespace=checkpoint.namespace, base_id=checkpoint.base_id
    )
    rows = list_files(session, checkpoint_id=checkpoint.id)
    revisions.add_revision(
        session,
        holder,
        manifest_sha256=files_manifest((row.path, row.sha256) for row in rows),
        message=revision_message(checkpoint),
        checkpoint_id=checkpoint.id,
    )


#: The job payload key of a compression queued after a Hub push (:mod:`storage.commits`): the
#: commit id of the exact revision it compresses.
LANDS_ON = "lands_on"
#: The error of a compression after a Hub push that found nothing smaller than the exact copy.
NOTHING_SMALLER = (
    "no lossy encoding met the repository's policy (every file rebuilds bit-identically): "
    "the exact revision stays as main; no new revision was added"
)


def _land_compression(session: Session, checkpoint: Checkpoint, lands_on: str) -> bool:
    """A compression queued after a Hub push (:mod:`storage.commits`) becomes a new revision:
    on ``main`` if ``main`` is still at the exact revision ``lands_on``, else on the ref
    ``compressed-<lands_on[:12]>`` (a newer push is never overwritten). A result that rebuilds
    every file bit-identically adds nothing to the exact revision: the checkpoint is marked
    ``failed`` with :data:`NOTHING_SMALLER` instead. Returns whether a revision was added."""
    rows = list_files(session, checkpoint_id=checkpoint.id)
    if all(row.recon_sha256 == row.sha256 for row in rows):
        checkpoint.state = CheckpointState.FAILED
        checkpoint.error = NOTHING_SMALLER
        checkpoint.delta_blob_key = None
        return False
    holder = revisions.claim_repo(
        session, name=checkpoint.name, namespace=checkpoint.namespace, base_id=checkpoint.base_id
    )
    main = revisions.head(session, holder)
    ref = revisions.MAIN
    if main is None or main.commit_id != lands_on:
        ref = f"compressed-{lands_on[:12]}"
    revisions.add_revision(
        session,
        holder,
        manifest_sha256=files_manifest((row.path, row.recon_sha256 or row.sha256) for row in rows),
        message=f"{revision_message(checkpoint)}\n\nCompressed from {lands_on}.",
        checkpoint_id=checkpoint.id,
        ref=ref,
    )
    return True


def fail_upload(session: Session, checkpoint_id: str, error: str) -> bool:
    """Mark an uploaded checkpoint whose files failed validation ``failed`` and let its files go.

    The checkpoint keeps its name and ``error`` (so ``GET`` says what went wrong) but holds no
    file any more: its file rows are deleted, so the uploaded blobs are unreferenced and garbage
    collection removes them after its grace period; ``original_bytes`` goes back to 0. A new
    push of the same name resumes it with the same options or replaces it with other ones
    (:func:`storage.repo.replaceable`). Only a checkpoint still open (uploading or failed)
    changes; returns whether this one did (False: it was committed meanwhile). In the caller's
    transaction.
    """
    changed = session.execute(
        update(Checkpoint)
        .where(Checkpoint.id == checkpoint_id, Checkpoint.state.in_(OPEN_CHECKPOINT_STATES))
        .values(state=CheckpointState.FAILED, error=error, original_bytes=0, num_params=None)
        .execution_options(synchronize_session=False)
    )
    if getattr(changed, "rowcount", 1) != 1:
        return False
    session.execute(
        delete(File)
        .where(File.checkpoint_id == checkpoint_id)
        .execution_options(synchronize_session=False)
    )
    session.flush()
    return True


def _record_outcome(checkpoint: Checkpoint, row: Mapping[str, Any]) -> None:
    """Write what a job produced to its checkpoint's columns."""
    checkpoint.original_bytes = row["original_bytes"]
    checkpoint.bits_per_param = row["bits_per_param"]
    checkpoint.num_params = row["num_params"]
    checkpoint.fitness = row["fitness"]
    checkpoint.trace = row["trace"]
    checkpoint.search_seconds = row["search_seconds"]


def _lock(session: Session, job_id: str) -> Job | None:
    """The job row, locked against concurrent claims (FOR UPDATE on PostgreSQL)."""
    stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    return session.scalars(for_update(session, stmt)).first()

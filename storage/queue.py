"""The job queue, kept in the ``jobs`` table (no broker, no threads here).

Life of a job::

    enqueue ──▶ queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
                  ▲                 │  ▲
                  └─ finish(QUEUED) ┘  └─ claim again once the lease expires (worker lost),
                     (retry)              while attempts < max_attempts

A worker holds a job under a lease (``lease_owner``, ``lease_expires_at``) and renews it with
:func:`heartbeat`. If the worker dies the lease runs out and another worker's :func:`claim`
takes the job over (``attempts`` counts claims). A job whose lease expired on its last attempt
is failed by :func:`fail_expired_exhausted`, which something (the worker loop, a cron) calls
now and then. Cancelling a running job sets a flag the next heartbeat reports.

Claims use ``SELECT … FOR UPDATE SKIP LOCKED`` on PostgreSQL, so concurrent workers never get
the same job, and ``BEGIN IMMEDIATE`` on SQLite (one writer at a time). Every time is the
database clock (:func:`storage.db.db_now`).

Transactions: :func:`enqueue` only adds the row to the caller's transaction (commit it together
with the checkpoint's state change). Every other function here runs in a transaction of its
own and commits it; a transaction already open on the session is committed first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from storage.db import SQLITE_BEGIN, db_now, is_sqlite
from storage.errors import NotFound
from storage.models import Checkpoint, CheckpointState, Job, JobKind, JobState

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
    with _write_transaction(session):
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
    with _write_transaction(session):
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


def finish(
    session: Session,
    job_id: str,
    worker_id: str,
    state: JobState,
    error: str | None = None,
) -> bool:
    """End the worker's hold on a job; False (and no change) if it no longer holds the lease.

    ``state`` is ``succeeded``, ``failed`` or ``cancelled``, or ``queued`` to give the job back
    for another attempt after a transient error (it becomes ``failed`` instead when no
    attempts are left). Commits.
    """
    state = JobState(state)
    if state not in FINISH_STATES:
        raise ValueError(f"cannot finish a job as {state!r}; use one of {sorted(FINISH_STATES)}")
    with _write_transaction(session):
        job = _lock(session, job_id)
        if job is None or job.state != JobState.RUNNING or job.lease_owner != worker_id:
            return False
        job.error = error
        job.lease_expires_at = None
        if state == JobState.QUEUED and job.attempts < job.max_attempts:
            job.state = JobState.QUEUED
            return True
        job.state = JobState.FAILED if state == JobState.QUEUED else state
        job.finished_at = db_now(session)
        return True


def request_cancel(session: Session, job_id: str) -> Job:
    """Cancel a job: a queued one at once, a running one at its worker's next heartbeat.

    Finished jobs are left as they are. Returns the job. Commits.

    Raises:
        NotFound: no job has this id.
    """
    with _write_transaction(session):
        job = _lock(session, job_id)
        if job is None:
            raise NotFound(f"job {job_id} does not exist; list jobs with GET /v1/jobs")
        if job.state == JobState.QUEUED:
            job.state = JobState.CANCELLED
            job.cancel_requested = True
            job.finished_at = db_now(session)
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
    with _write_transaction(session):
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


def get_job(session: Session, job_id: str) -> Job:
    """The job with this id.

    Raises:
        NotFound: no job has this id.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist; list jobs with GET /v1/jobs")
    return job


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


@contextmanager
def _write_transaction(session: Session) -> Iterator[None]:
    """A fresh transaction that may write: BEGIN IMMEDIATE on SQLite; commit on success."""
    if session.in_transaction():
        session.commit()
    if is_sqlite(session):
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
    try:
        yield
    except BaseException:
        session.rollback()
        raise
    session.commit()


def _lock(session: Session, job_id: str) -> Job | None:
    """The job row, locked against concurrent claims (FOR UPDATE on PostgreSQL)."""
    stmt = select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    if not is_sqlite(session):
        stmt = stmt.with_for_update()
    return session.scalars(stmt).first()

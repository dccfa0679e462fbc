"""The job queue on SQLite and PostgreSQL: claims, leases, retries, cancels, concurrency."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select, update
from storage_helpers import Database

from storage import queue
from storage.blobstore import BlobInfo
from storage.errors import NotFound
from storage.models import (
    Base,
    BaseState,
    Checkpoint,
    CheckpointState,
    Job,
    JobKind,
    JobState,
)

LEASE = 60.0


def make_checkpoint(db: Database, name: str = "ft") -> str:
    with db.sessions.begin() as session:
        base = Base(name=f"base-{name}", state=BaseState.READY)
        session.add(base)
        session.flush()
        checkpoint = Checkpoint(
            name=name, base_id=base.id, method="nps", state=CheckpointState.QUEUED
        )
        session.add(checkpoint)
        session.flush()
        return checkpoint.id


def enqueue_jobs(db: Database, count: int, max_attempts: int = 3) -> list[str]:
    checkpoint_id = make_checkpoint(db)
    with db.sessions.begin() as session:
        jobs = [
            queue.enqueue(session, JobKind.COMPRESS, checkpoint_id, {"n": i}, max_attempts)
            for i in range(count)
        ]
        return [job.id for job in jobs]


def expire_lease(db: Database, job_id: str) -> None:
    with db.sessions.begin() as session:
        past = datetime.now(UTC) - timedelta(minutes=5)
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=past))


def load(db: Database, job_id: str) -> Job:
    with db.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_claim_takes_the_oldest_queued_job_once(database: Database) -> None:
    first, second = enqueue_jobs(database, 2)
    with database.sessions() as session:
        job = queue.claim(session, "worker-a", LEASE)
        assert job is not None and job.id == first
        assert job.state == JobState.RUNNING
        assert job.attempts == 1
        assert job.lease_owner == "worker-a"
        assert job.lease_expires_at is not None and job.started_at is not None
        assert job.lease_expires_at - job.started_at == timedelta(seconds=LEASE)
        assert job.payload == {"n": 0}

        other = queue.claim(session, "worker-b", LEASE)
        assert other is not None and other.id == second
        assert queue.claim(session, "worker-c", LEASE) is None


def test_claim_can_filter_by_kind(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        assert queue.claim(session, "w", LEASE, kinds=[JobKind.MERGE]) is None
        job = queue.claim(session, "w", LEASE, kinds=[JobKind.COMPRESS])
        assert job is not None and job.id == job_id


def test_enqueue_joins_the_callers_transaction(database: Database) -> None:
    checkpoint_id = make_checkpoint(database)
    with database.sessions() as session:
        queue.enqueue(session, JobKind.COMPRESS, checkpoint_id)
        session.rollback()
    with database.sessions() as session:
        assert queue.list_jobs(session) == []


def test_finish_only_by_the_lease_holder(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        assert queue.claim(session, "worker-a", LEASE) is not None
        assert not queue.finish(session, job_id, "worker-b", JobState.SUCCEEDED)
        assert queue.finish(session, job_id, "worker-a", JobState.SUCCEEDED)
        assert not queue.finish(session, job_id, "worker-a", JobState.FAILED)
    job = load(database, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.finished_at is not None
    assert job.lease_expires_at is None


def test_finish_rejects_non_final_states(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session, pytest.raises(ValueError):
        queue.finish(session, job_id, "w", JobState.RUNNING)


def test_expired_lease_is_reclaimed_by_another_worker(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        assert queue.claim(session, "worker-a", LEASE) is not None
        assert queue.claim(session, "worker-b", LEASE) is None  # lease still valid
    expire_lease(database, job_id)

    with database.sessions() as session:
        job = queue.claim(session, "worker-b", LEASE)
        assert job is not None and job.id == job_id
        assert job.attempts == 2
        assert job.lease_owner == "worker-b"

        beat = queue.heartbeat(session, job_id, "worker-a", LEASE)
        assert not beat and not beat.lease_held
        assert not queue.finish(session, job_id, "worker-a", JobState.SUCCEEDED)
        assert queue.heartbeat(session, job_id, "worker-b", LEASE)
        assert queue.finish(session, job_id, "worker-b", JobState.SUCCEEDED)


def test_attempts_are_capped(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1, max_attempts=2)
    with database.sessions() as session:
        for worker in ("worker-a", "worker-b"):
            job = queue.claim(session, worker, LEASE)
            assert job is not None and job.id == job_id
            expire_lease(database, job_id)
        assert queue.claim(session, "worker-c", LEASE) is None

        reaped = queue.fail_expired_exhausted(session)
        assert reaped.failed == [job_id] and reaped.cancelled == []
        assert queue.fail_expired_exhausted(session).failed == []

    job = load(database, job_id)
    assert job.state == JobState.FAILED
    assert job.attempts == 2
    assert job.error is not None and "no attempts left" in job.error
    with database.sessions() as session:
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        assert checkpoint is not None and checkpoint.state == CheckpointState.FAILED


def test_reaper_leaves_live_and_retryable_jobs_alone(database: Database) -> None:
    live, retryable = enqueue_jobs(database, 2, max_attempts=3)
    with database.sessions() as session:
        assert queue.claim(session, "worker-a", LEASE) is not None
        assert queue.claim(session, "worker-b", LEASE) is not None
        expire_lease(database, retryable)
        assert queue.fail_expired_exhausted(session) == queue.ReapResult()
    assert load(database, live).state == JobState.RUNNING
    assert load(database, retryable).state == JobState.RUNNING


def test_heartbeat_extends_the_lease_and_merges_progress(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        claimed = queue.claim(session, "w", 5.0)
        assert claimed is not None and claimed.lease_expires_at is not None
        first_expiry = claimed.lease_expires_at
        assert queue.heartbeat(session, job_id, "w", LEASE, {"phase": "search", "generation": 1})
        assert queue.heartbeat(session, job_id, "w", LEASE, {"generation": 2, "best_fitness": 0.9})
    job = load(database, job_id)
    assert job.progress == {"phase": "search", "generation": 2, "best_fitness": 0.9}
    assert job.lease_expires_at is not None and job.lease_expires_at > first_expiry


def test_heartbeat_loses_to_cancel(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        assert queue.claim(session, "w", LEASE) is not None
        assert queue.request_cancel(session, job_id).state == JobState.RUNNING

        beat = queue.heartbeat(session, job_id, "w", LEASE)
        assert not beat
        assert beat.lease_held and beat.cancel_requested

        assert queue.finish(session, job_id, "w", JobState.CANCELLED)
    assert load(database, job_id).state == JobState.CANCELLED


def test_cancelling_a_queued_job_is_immediate(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        job = queue.request_cancel(session, job_id)
        assert job.state == JobState.CANCELLED and job.finished_at is not None
        assert queue.claim(session, "w", LEASE) is None
        with pytest.raises(NotFound):
            queue.request_cancel(session, "no-such-job")


def test_cancelled_job_of_a_lost_worker_is_not_reclaimed(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        assert queue.claim(session, "worker-a", LEASE) is not None
        queue.request_cancel(session, job_id)
        expire_lease(database, job_id)
        assert queue.claim(session, "worker-b", LEASE) is None
        assert queue.fail_expired_exhausted(session).cancelled == [job_id]
    assert load(database, job_id).state == JobState.CANCELLED


def test_finish_queued_retries_until_attempts_run_out(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1, max_attempts=2)
    with database.sessions() as session:
        assert queue.claim(session, "w", LEASE) is not None
        assert queue.finish(session, job_id, "w", JobState.QUEUED, error="S3 timed out")
        assert load(database, job_id).state == JobState.QUEUED

        job = queue.claim(session, "w", LEASE)
        assert job is not None and job.attempts == 2
        assert queue.finish(session, job_id, "w", JobState.QUEUED, error="S3 timed out again")
    job = load(database, job_id)
    assert job.state == JobState.FAILED
    assert job.error == "S3 timed out again"


def test_queue_calls_commit_pending_work_first(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        job = queue.claim(session, "w", LEASE)
        assert job is not None
        session.get(Checkpoint, job.checkpoint_id)  # opens a read transaction
        assert queue.heartbeat(session, job_id, "w", LEASE)


def test_concurrent_claimers_never_share_a_job(database: Database) -> None:
    job_ids = enqueue_jobs(database, 50)
    claims: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(name: str) -> None:
        try:
            start.wait()
            with database.sessions() as session:
                while (job := queue.claim(session, name, LEASE)) is not None:
                    with lock:
                        claims.append((job.id, name))
                    assert queue.finish(session, job.id, name, JobState.SUCCEEDED)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"worker-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    per_job = Counter(job_id for job_id, _ in claims)
    assert set(per_job) == set(job_ids)
    assert set(per_job.values()) == {1}
    with database.sessions() as session:
        states = Counter(job.state for job in queue.list_jobs(session, limit=100))
    assert states == {JobState.SUCCEEDED: 50}


def test_sqlite_claims_in_an_immediate_transaction(sqlite_database: Database) -> None:
    enqueue_jobs(sqlite_database, 1)
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(sqlite_database.engine, "before_cursor_execute", record)
    with sqlite_database.sessions() as session:
        assert queue.claim(session, "w", LEASE) is not None
    assert statements[0] == "BEGIN IMMEDIATE"


def test_postgres_claim_skips_locked_rows(pg_database: Database) -> None:
    first, second = enqueue_jobs(pg_database, 2)
    with pg_database.engine.connect() as other:
        with other.begin():
            other.execute(select(Job).where(Job.id == first).with_for_update())
            with pg_database.sessions() as session:
                job = queue.claim(session, "w", LEASE)  # does not wait for the lock
                assert job is not None and job.id == second
        with pg_database.sessions() as session:
            job = queue.claim(session, "w", LEASE)
            assert job is not None and job.id == first


def checkpoint_state(db: Database, job_id: str) -> tuple[CheckpointState, str | None]:
    with db.sessions() as session:
        checkpoint = session.get(Checkpoint, load(db, job_id).checkpoint_id)
        assert checkpoint is not None
        return checkpoint.state, checkpoint.error


def test_finish_sets_the_checkpoint_state_with_the_job(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1, max_attempts=2)
    with database.sessions() as session:
        assert queue.claim(session, "w", LEASE) is not None
        assert queue.finish(session, job_id, "w", JobState.QUEUED, error="S3 timed out")
    assert checkpoint_state(database, job_id) == (CheckpointState.QUEUED, None)
    with database.sessions() as session:
        assert queue.claim(session, "w", LEASE) is not None
        assert queue.finish(session, job_id, "w", JobState.FAILED, error="bad_input: x")
    assert checkpoint_state(database, job_id) == (CheckpointState.FAILED, "bad_input: x")


def test_cancelling_a_queued_job_fails_its_checkpoint(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    with database.sessions() as session:
        assert queue.request_cancel(session, job_id).state == JobState.CANCELLED
    state, error = checkpoint_state(database, job_id)
    assert state == CheckpointState.FAILED and error is not None and "cancelled" in error


#: What a finished job writes to its checkpoint (``CompressOutcome.to_row``'s columns).
OUTCOME = {
    "original_bytes": 40,
    "bits_per_param": 3.2,
    "num_params": 10,
    "fitness": {"fidelity": 0.995},
    "trace": [],
    "search_seconds": 1.5,
}


def test_publish_only_by_the_lease_holder_and_not_after_a_cancel(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    info = BlobInfo(key="sha256/ab/" + "ab" * 32, size=10, sha256="ab" * 32)
    args = (OUTCOME, {})
    kwargs = {"new_files": True, "drop_originals": False, "progress": {"phase": "store"}}
    with database.sessions() as session:
        assert queue.claim(session, "worker-a", LEASE) is not None
        assert not queue.publish(session, job_id, "worker-b", info, *args, **kwargs).lease_held
        queue.request_cancel(session, job_id)
        refused = queue.publish(session, job_id, "worker-a", info, *args, **kwargs)
        assert refused.lease_held and refused.cancel_requested and not refused
    assert load(database, job_id).state == JobState.RUNNING
    assert checkpoint_state(database, job_id)[0] == CheckpointState.QUEUED


def test_publish_makes_the_checkpoint_ready(database: Database) -> None:
    (job_id,) = enqueue_jobs(database, 1)
    info = BlobInfo(key="sha256/ab/" + "ab" * 32, size=10, sha256="ab" * 32)
    with database.sessions() as session:
        assert queue.claim(session, "w", LEASE) is not None
        done = queue.publish(
            session,
            job_id,
            "w",
            info,
            OUTCOME,
            {},
            new_files=True,
            drop_originals=False,
            progress={"phase": "store"},
        )
        assert done.published and done.drop == frozenset()
    job = load(database, job_id)
    assert job.state == JobState.SUCCEEDED and job.progress["phase"] == "done"
    with database.sessions() as session:
        checkpoint = session.get(Checkpoint, job.checkpoint_id)
        assert checkpoint is not None and checkpoint.state == CheckpointState.READY
        assert checkpoint.delta_blob_key == info.key and checkpoint.ratio == 4.0
        assert checkpoint.bits_per_param == 3.2 and checkpoint.fitness == {"fidelity": 0.995}

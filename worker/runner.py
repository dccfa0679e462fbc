"""The job runner: claims jobs from the database queue and runs the core pipelines.

One :class:`Worker` runs one job at a time. ``slim worker`` runs one per process (one per GPU);
``slim serve`` runs one in a thread next to the API (embedded mode).

Life of a job here::

    claim (lease) ──▶ materialise base + upload as local dirs ──▶ core.compress / core.merge
          │                (symlinks into the local store,       │  progress → in-memory;
          │                 or verified S3 copies in the cache)   │  a heartbeat thread renews
          │                                                       ▼  the lease every few seconds
          │                                      upload the delta blob (content-addressed)
          │                                                       ▼
          │                    ONE transaction, only while we still hold the lease: blobs row,
          │                    checkpoint row (sizes, ratio, fitness, trace), file rows
          │                    (recon_sha256), job succeeded
          ▼                                                       ▼
    errors: SlimError and permanent storage errors     drop the original upload's blobs
    fail the job; anything else gives it back for a    (unless retain_originals)
    retry (up to max_attempts); a cancel request stops
    the search at its next progress report.

A crash at any point leaves at most an orphan blob (garbage collection removes it) and a job
whose lease runs out; another worker re-claims it. Nobody ever sees a half-written checkpoint,
because the row pointing at the delta is committed last, and only by the lease holder.

Decision: the originals are dropped after *any* successful compression, lossless included
(a lossless delta rebuilds them bit for bit, verified by sha256), unless retention is set.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.compress import compress_request
from core.delta_format import DeltaReader
from core.errors import Cancelled, SlimError
from core.merge import merge
from core.params import CompressOutcome, CompressParams, MergeParams, finite
from core.summary import describe
from storage import queue
from storage.blobstore import BlobInfo, BlobStore
from storage.cache import BlobCache, FileSpec
from storage.db import begin_write, db_now
from storage.errors import StorageUnavailable
from storage.gc import drop_blobs
from storage.models import Base, Checkpoint, File, Job, JobKind, JobState
from storage.repo import list_files

log = logging.getLogger("slim.worker")

#: Storage errors worth another attempt (everything else from storage is permanent).
TRANSIENT_STORAGE = (StorageUnavailable,)


class LeaseLost(Cancelled):
    """Another worker took the job over, or it was deleted: stop without writing anything."""

    code = "lease_lost"


class WorkerStopping(Cancelled):
    """The worker is shutting down: give the job back to the queue."""

    code = "worker_stopping"


class OriginalsGone(SlimError):
    """The uploaded files a job needs are no longer stored."""

    code = "originals_deleted"


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker behaves; built from :class:`runtime.settings.Settings` by its callers."""

    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 1.0
    device: str | None = None
    retain_originals: bool = False
    reap_seconds: float = 15.0


class Worker:
    """Claims and runs jobs until stopped.

    Args:
        sessions: session factory of the metadata database.
        store: the blob store (deltas are written here; originals read from here).
        cache: local paths for blobs (see :mod:`storage.cache`).
        work_dir: scratch space; one sub-directory per job, removed afterwards.
        options: lease, heartbeat and polling periods, device, retention.
        worker_id: the lease owner name (default: host, pid and a random suffix).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        store: BlobStore,
        cache: BlobCache,
        work_dir: str | os.PathLike[str],
        options: WorkerOptions | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.store = store
        self.cache = cache
        self.work_dir = Path(work_dir)
        self.options = options or WorkerOptions()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()

    # -- loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Claim and run jobs until ``stop`` (or :attr:`stopping`) is set."""
        if stop is not None:
            self.stopping = stop
        log.info("worker %s started", self.worker_id)
        last_reap = 0.0
        while not self.stopping.is_set():
            ran = False
            try:
                if time.monotonic() - last_reap >= self.options.reap_seconds:
                    last_reap = time.monotonic()
                    self.reap()
                ran = self.run_once() is not None
            except SQLAlchemyError as exc:  # database down: wait and try again
                log.warning("worker %s: database error, retrying: %s", self.worker_id, exc)
            if not ran:
                self.stopping.wait(self.options.poll_seconds)
        log.info("worker %s stopped", self.worker_id)

    def reap(self) -> None:
        """Close jobs whose worker died on their last attempt (see queue.fail_expired_exhausted)."""
        with self.sessions() as session:
            result = queue.fail_expired_exhausted(session)
        for job_id in result.failed:
            log.warning("job %s failed: its worker stopped renewing the lease", job_id)

    def run_once(self) -> str | None:
        """Claim one job and run it to the end; its id, or None when the queue was empty."""
        with self.sessions() as session:
            job = queue.claim(session, self.worker_id, self.options.lease_seconds)
            if job is None:
                return None
            job_id, kind, claimed_at = job.id, job.kind, job.started_at or db_now(session)
        log.info("worker %s: job %s (%s) claimed", self.worker_id, job_id, kind.value)
        self._execute(job_id, kind, claimed_at)
        return job_id

    # -- one job -------------------------------------------------------------------------------

    def _execute(self, job_id: str, kind: JobKind, claimed_at: datetime) -> None:
        lease = Lease(self, job_id)
        job_dir = self.work_dir / f"{job_id}-{uuid.uuid4().hex[:8]}"
        lease.start()
        try:
            if kind == JobKind.COMPRESS:
                self._compress(job_id, job_dir, lease, claimed_at)
            else:
                self._merge(job_id, job_dir, lease)
            log.info("worker %s: job %s succeeded", self.worker_id, job_id)
        except LeaseLost:
            log.warning("worker %s: lost the lease on job %s; dropped it", self.worker_id, job_id)
        except WorkerStopping:
            self._finish(
                job_id, JobState.QUEUED, "the worker shut down mid-job; it will be retried"
            )
        except Cancelled as exc:
            self._finish(job_id, JobState.CANCELLED, f"cancelled: {exc.detail}")
        except SlimError as exc:  # storage errors are SlimErrors too
            if isinstance(exc, TRANSIENT_STORAGE):
                self._finish(job_id, JobState.QUEUED, f"{exc.code}: {exc}")
            else:
                log.warning("job %s failed: [%s] %s", job_id, exc.code, exc.detail)
                self._finish(job_id, JobState.FAILED, f"{exc.code}: {exc.detail}")
        except Exception as exc:  # unexpected: retry, with the traceback in the log
            log.exception("job %s: unexpected error (will retry if attempts remain)", job_id)
            self._finish(job_id, JobState.QUEUED, f"internal_error: {type(exc).__name__}: {exc}")
        finally:
            lease.stop()
            shutil.rmtree(job_dir, ignore_errors=True)

    def _compress(self, job_id: str, job_dir: Path, lease: Lease, claimed_at: datetime) -> None:
        with self.sessions() as session:
            begin_write(session)
            job = _job(session, job_id)
            checkpoint = _mark_compressing(session, job.checkpoint_id)
            base_files = _specs(list_files(session, base_id=checkpoint.base_id), "base")
            ft_files = _specs(list_files(session, checkpoint_id=checkpoint.id), "upload")
            params = CompressParams.from_row(checkpoint.params, method=checkpoint.method)
            base_id = checkpoint.base_id
            session.commit()
        lease.update({"phase": "prepare"})
        base_dir = self.cache.shared_dir(f"base-{base_id}", base_files)
        ft_dir = self.cache.materialize(ft_files, job_dir / "upload")
        out = job_dir / "delta.slim"
        outcome = self._run_compress(params, base_dir, ft_dir, out, lease)
        lease.check()
        lease.update({"phase": "store"})
        info = self.store.put_file(out)
        with DeltaReader(out) as reader:
            files = {f.path: f for f in reader.doc.files}
        drop = self._publish(job_id, info, lease, outcome.to_row(), files, new_files=False)
        self._drop_originals(drop, claimed_at)

    def _run_compress(
        self,
        params: CompressParams,
        base_dir: Path,
        ft_dir: Path,
        out: Path,
        lease: Lease,
    ) -> CompressOutcome:
        """The compression the checkpoint's parameters ask for, through the same core entry
        point and defaults as ``slim compress`` (:func:`core.compress.compress_request`)."""
        return compress_request(
            base_dir, ft_dir, out, params, device=self.options.device, progress=lease.progress
        )

    def _merge(self, job_id: str, job_dir: Path, lease: Lease) -> None:
        with self.sessions() as session:
            begin_write(session)
            job = _job(session, job_id)
            checkpoint = _mark_compressing(session, job.checkpoint_id)
            params = MergeParams.from_row(job.payload)
            parents = [session.get(Checkpoint, pid) for pid in params.checkpoint_ids]
            delta_keys: list[str] = []
            for pid, parent in zip(params.checkpoint_ids, parents, strict=True):
                if parent is None or parent.delta_blob_key is None:
                    raise OriginalsGone(
                        f"checkpoint {pid} was deleted or is not stored any more; "
                        "merge checkpoints that are ready"
                    )
                delta_keys.append(parent.delta_blob_key)
            base_files = _specs(list_files(session, base_id=checkpoint.base_id), "base")
            base_id = checkpoint.base_id
            session.commit()
        lease.update({"phase": "prepare"})
        base_dir = self.cache.shared_dir(f"base-{base_id}", base_files)
        deltas: list[str | os.PathLike[str]] = [self.cache.path(key) for key in delta_keys]
        out = job_dir / "merged.slim"
        job_dir.mkdir(parents=True, exist_ok=True)
        lease.update({"phase": "merge"})
        merge(
            base_dir,
            deltas,
            out,
            method=params.method,
            lam=params.lam,
            density=params.density,
            heads_from=params.heads_from,
        )
        lease.check()
        lease.update({"phase": "store"})
        info = self.store.put_file(out)
        summary = describe(out)
        with DeltaReader(out) as reader:
            files = {f.path: f for f in reader.doc.files}
        fields = {
            "original_bytes": summary["original_bytes"],
            "bits_per_param": summary["bits_per_param"],
            "num_params": summary["num_params"],
            "fitness": finite(
                {"evaluation": "weights", "kept": summary["kept"], "notes": summary["notes"]}
            ),
            "trace": None,
            "search_seconds": None,
        }
        self._publish(job_id, info, lease, fields, files, new_files=True)

    # -- publishing ----------------------------------------------------------------------------

    def _publish(
        self,
        job_id: str,
        info: BlobInfo,
        lease: Lease,
        fields: dict[str, Any],
        files: dict[str, Any],
        *,
        new_files: bool,
    ) -> set[str]:
        """Commit the rows that make a checkpoint ready (:func:`storage.queue.publish`), if we
        still hold the lease. Returns the original blobs to drop."""
        with self.sessions() as session:
            result = queue.publish(
                session,
                job_id,
                self.worker_id,
                info,
                fields,
                files,
                new_files=new_files,
                drop_originals=not self.options.retain_originals,
                progress=lease.snapshot(),
            )
        if not result.lease_held:
            raise LeaseLost("the job was taken over or deleted before it could be published")
        if result.cancel_requested:
            raise Cancelled("cancel requested before the result was stored")
        return set(result.drop)

    def _drop_originals(self, keys: set[str], claimed_at: datetime) -> None:
        """Delete original blobs nothing references any more (:func:`storage.gc.drop_blobs`)."""
        drop_blobs(self.sessions, self.store, keys, unchanged_since=claimed_at)

    # -- ending a job --------------------------------------------------------------------------

    def _finish(self, job_id: str, state: JobState, error: str) -> None:
        """End our hold on a job and set its checkpoint's state (:func:`storage.queue.finish`:
        ``queued`` gives it back for a retry); nothing changes if we no longer hold the lease."""
        with self.sessions() as session:
            queue.finish(session, job_id, self.worker_id, state, error)


class Lease:
    """Keeps a job's lease alive from a background thread and relays progress and cancels.

    ``progress`` is the callback core calls: it records the report and raises
    :class:`Cancelled` (or a subclass) once a cancel was requested, the lease was lost, or the
    worker is stopping. Heartbeats are throttled to one per ``heartbeat_seconds``, plus one
    soon after each phase change.
    """

    def __init__(self, worker: Worker, job_id: str) -> None:
        self.worker = worker
        self.job_id = job_id
        self._progress: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._wake = threading.Event()
        self.lost = False
        self.cancel_requested = False
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress)

    def update(self, info: dict[str, Any]) -> None:
        clean = finite(info)
        with self._lock:
            phase_changed = clean.get("phase") not in (None, self._progress.get("phase"))
            self._progress.update(clean)
        if phase_changed:
            self._wake.set()

    def progress(self, info: dict[str, Any]) -> None:
        """The progress callback handed to core."""
        self.update(info)
        self.check()

    def check(self) -> None:
        if self.lost:
            raise LeaseLost("another worker holds this job now")
        if self.cancel_requested:
            raise Cancelled("a cancel was requested (POST /v1/jobs/{id}/cancel)")
        if self.worker.stopping.is_set():
            raise WorkerStopping("the worker is shutting down")

    def _loop(self) -> None:
        interval = self.worker.options.heartbeat_seconds
        while not self._done.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._done.is_set():
                return
            self.beat()

    def beat(self) -> None:
        try:
            with self.worker.sessions() as session:
                result = queue.heartbeat(
                    session,
                    self.job_id,
                    self.worker.worker_id,
                    self.worker.options.lease_seconds,
                    progress=self.snapshot(),
                )
        except SQLAlchemyError as exc:  # the lease may run out; the next beat tries again
            log.warning("heartbeat of job %s failed: %s", self.job_id, exc)
            return
        self.lost = not result.lease_held
        self.cancel_requested = result.cancel_requested


# -- helpers ---------------------------------------------------------------------------------


def _job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise LeaseLost("the job was deleted")
    return job


def _mark_compressing(session: Session, checkpoint_id: str) -> Checkpoint:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise LeaseLost("the checkpoint was deleted")
    if session.get(Base, checkpoint.base_id) is None:
        raise OriginalsGone("the checkpoint's base no longer exists")
    return queue.mark_compressing(checkpoint)


def _specs(rows: list[File], what: str) -> list[FileSpec]:
    specs: list[FileSpec] = []
    for row in rows:
        if row.blob_key is None:
            raise OriginalsGone(
                f"the {what} file {row.path!r} is no longer stored (dropped after an earlier "
                "compression); upload the files again to a new checkpoint"
            )
        specs.append(FileSpec(row.path, row.blob_key))
    return specs

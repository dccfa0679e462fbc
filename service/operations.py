"""What the routes do, one function per action: validate cheaply, change rows, commit.

Every function takes the session, the blob store and the settings it needs explicitly, runs
one transaction, and raises the error tree ``service.errors`` maps to HTTP. Bad input is
refused here, before any job is queued.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.compress import VALUE_BITS
from core.errors import InvalidArgument, InvalidCalibration
from core.methods import REGISTRY
from service.schemas import CheckpointCreate, MergeCreate
from service.settings import Settings
from service.uploads import OPEN_CHECKPOINT_STATES, manifest_sha256
from service.validation import check_fits_base, stored_checkpoint
from storage import queue, repo
from storage.blobstore import BlobStore
from storage.errors import Conflict, NotFound
from storage.models import (
    Base,
    BaseState,
    Checkpoint,
    CheckpointState,
    Job,
    JobKind,
    JobState,
)
from worker.txn import begin_write

# -- bases -----------------------------------------------------------------------------------


def commit_base(
    session: Session, store: BlobStore, settings: Settings, base_id: str, namespace: str
) -> Base:
    """Validate every weight header of a base and mark it ready (idempotent)."""
    base = repo.get_base(session, base_id, namespace=namespace)
    if base.state == BaseState.READY:
        return base
    rows = repo.list_files(session, base_id=base.id)
    ckpt = stored_checkpoint(store, rows, max_header=settings.max_header_bytes, what="base")
    base.num_params = ckpt.num_params
    base.total_bytes = sum(row.size for row in rows)
    base.manifest_sha256 = manifest_sha256(rows)
    base.state = BaseState.READY
    session.commit()
    return base


# -- checkpoints -----------------------------------------------------------------------------


def available_methods() -> list[str]:
    """Method names a checkpoint may ask for: the registry's, plus ``auto``."""
    return [*REGISTRY, "auto"]


def create_checkpoint(
    session: Session, settings: Settings, body: CheckpointCreate, namespace: str
) -> Checkpoint:
    """A new checkpoint in state ``uploading``; its parameters are checked now, not later."""
    method = body.method or ("auto" if body.min_fidelity is not None else "nps")
    methods = available_methods()
    if method not in methods:
        raise InvalidArgument(f"unknown method {method!r}; choose one of {', '.join(methods)}")
    if body.min_fidelity is not None and method != "auto":
        raise InvalidArgument("min_fidelity goes with method 'auto'; drop one of the two")
    if body.value_bits is not None and body.value_bits not in VALUE_BITS:
        raise InvalidArgument(f"value_bits must be one of {VALUE_BITS}")
    calibration = [e.model_dump() for e in body.calibration or []]
    if len(calibration) > settings.max_calibration_examples:
        raise InvalidCalibration(
            f"{len(calibration)} calibration examples; at most "
            f"{settings.max_calibration_examples} are accepted"
        )
    evaluation = body.evaluation or ("fidelity" if calibration else "weights")
    if evaluation != "weights" and not calibration:
        raise InvalidCalibration(
            f"evaluation {evaluation!r} needs calibration examples "
            '([{"text": ..., "label": ...}, ...]); or use evaluation "weights"'
        )
    if method == "auto" and evaluation == "weights":
        raise InvalidCalibration(
            "method 'auto' measures fidelity on calibration examples; send some "
            '("calibration": [{"text": ...}, ...])'
        )
    if evaluation == "accuracy" and any(e["label"] is None for e in calibration):
        raise InvalidCalibration('evaluation "accuracy" needs a label on every calibration example')
    auto = method == "auto"  # auto searches keep and value bits unless pinned
    params = {
        "keep": body.keep if body.keep is not None or auto else 0.01,
        "value_bits": body.value_bits if body.value_bits is not None or auto else 16,
        "evaluation": evaluation,
        "min_fidelity": body.min_fidelity,
        "seed": body.seed,
        "options": body.options,
        "calibration": calibration or None,
    }
    ckpt = repo.create_checkpoint(
        session,
        name=body.name,
        base_id=body.base_id,
        method=method,
        params=params,
        namespace=namespace,
    )
    session.commit()
    return ckpt


def commit_checkpoint(
    session: Session, store: BlobStore, settings: Settings, checkpoint_id: str, namespace: str
) -> Job:
    """Validate the uploaded files against the base, then queue the compression job."""
    ckpt = repo.get_checkpoint(session, checkpoint_id, namespace=namespace)
    if ckpt.state not in OPEN_CHECKPOINT_STATES or ckpt.derived_from is not None:
        raise Conflict(
            f"checkpoint {ckpt.name!r} is {ckpt.state.value}; only an uploading (or failed) "
            "checkpoint can be committed — follow its job with GET /v1/jobs?checkpoint_id="
        )
    base = repo.get_base(session, ckpt.base_id)
    rows = repo.list_files(session, checkpoint_id=ckpt.id)
    max_header = settings.max_header_bytes
    ft = stored_checkpoint(store, rows, max_header=max_header, what="checkpoint")
    base_ckpt = stored_checkpoint(
        store, repo.list_files(session, base_id=base.id), max_header=max_header, what="base"
    )
    check_fits_base(ft, base_ckpt)
    claimed = session.execute(
        update(Checkpoint)
        .where(Checkpoint.id == ckpt.id, Checkpoint.state.in_(OPEN_CHECKPOINT_STATES))
        .values(
            state=CheckpointState.QUEUED,
            original_bytes=sum(row.size for row in rows),
            num_params=ft.num_params,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 1) != 1:
        session.rollback()
        raise Conflict(f"checkpoint {ckpt.name!r} was committed meanwhile")
    job = queue.enqueue(session, JobKind.COMPRESS, ckpt.id, max_attempts=settings.job_max_attempts)
    session.commit()
    return job


# -- merges ----------------------------------------------------------------------------------


def create_merge(session: Session, settings: Settings, body: MergeCreate, namespace: str) -> Job:
    """A derived checkpoint (state ``queued``) and the ``merge`` job that will build it."""
    if len(set(body.checkpoint_ids)) != len(body.checkpoint_ids):
        raise InvalidArgument("checkpoint_ids lists a checkpoint twice")
    parents = [
        repo.get_checkpoint(session, cid, namespace=namespace) for cid in body.checkpoint_ids
    ]
    not_ready = [p.name for p in parents if p.state != CheckpointState.READY]
    if not_ready:
        raise Conflict(
            f"checkpoints {', '.join(map(repr, not_ready))} are not ready; merge once their "
            "jobs have succeeded"
        )
    if len({p.base_id for p in parents}) != 1:
        raise InvalidArgument("the checkpoints belong to different bases; merge those of one base")
    derived = {
        "method": body.method,
        "lambda": body.lambda_,
        "density": body.density,
        "parents": [{"id": p.id, "name": p.name} for p in parents],
    }
    ckpt = repo.create_checkpoint(
        session,
        name=body.name,
        base_id=parents[0].base_id,
        method="merge",
        params={"merge_method": body.method, "lambda": body.lambda_, "density": body.density},
        namespace=namespace,
        derived_from=derived,
    )
    ckpt.state = CheckpointState.QUEUED
    payload = {
        "checkpoint_ids": [p.id for p in parents],
        "method": body.method,
        "lambda": body.lambda_,
        "density": body.density,
    }
    job = queue.enqueue(
        session, JobKind.MERGE, ckpt.id, payload=payload, max_attempts=settings.job_max_attempts
    )
    session.commit()
    return job


# -- jobs ------------------------------------------------------------------------------------


def get_job(session: Session, job_id: str, namespace: str) -> Job:
    """A job whose checkpoint is in the caller's namespace."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist; list jobs with GET /v1/jobs")
    repo.get_checkpoint(session, job.checkpoint_id, namespace=namespace)
    return job


def list_jobs(
    session: Session,
    namespace: str,
    *,
    state: JobState | None,
    checkpoint_id: str | None,
    limit: int,
    offset: int,
) -> Sequence[Job]:
    """Jobs of the namespace's checkpoints, newest first."""
    stmt = (
        select(Job)
        .join(Checkpoint, Checkpoint.id == Job.checkpoint_id)
        .where(Checkpoint.namespace == namespace)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    )
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if checkpoint_id is not None:
        stmt = stmt.where(Job.checkpoint_id == checkpoint_id)
    return session.scalars(stmt).all()


def cancel_job(session: Session, job_id: str, namespace: str) -> Job:
    """Cancel a job; a queued one stops at once (its checkpoint becomes ``failed``)."""
    get_job(session, job_id, namespace)
    session.rollback()
    job = queue.request_cancel(session, job_id)
    if job.state == JobState.CANCELLED:
        begin_write(session)
        ckpt = session.get(Checkpoint, job.checkpoint_id)
        if ckpt is not None and ckpt.state == CheckpointState.QUEUED:
            ckpt.state = CheckpointState.FAILED
            ckpt.error = "cancelled: the job was cancelled before it started"
            session.commit()
    return job


# -- deletes ---------------------------------------------------------------------------------


def delete_base(session: Session, base_id: str, namespace: str) -> None:
    repo.delete_base(session, base_id, namespace=namespace)
    session.commit()


def delete_checkpoint(session: Session, checkpoint_id: str, namespace: str) -> None:
    repo.delete_checkpoint(session, checkpoint_id, namespace=namespace)
    session.commit()


def checkpoint_base(session: Session, ckpt: Checkpoint) -> Base:
    base = session.get(Base, ckpt.base_id)
    if base is None:  # guarded by a RESTRICT foreign key; here for the type checker
        raise NotFound(f"base {ckpt.base_id} of checkpoint {ckpt.name!r} is gone")
    return base

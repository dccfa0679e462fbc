"""``/v1/jobs`` and ``/v1/merges``: follow and cancel work; merge checkpoints."""

from __future__ import annotations

from fastapi import APIRouter, Query

from service import operations
from service.deps import NamespaceDep, SessionDep, SettingsDep
from service.errors import errors
from service.schemas import MAX_OFFSET, JobPublic, JobsPublic, MergeCreate
from storage import repo
from storage.models import JobState

router = APIRouter(tags=["jobs"])


@router.get("/v1/jobs", responses=errors(404))
def list_jobs(
    session: SessionDep,
    namespace: NamespaceDep,
    state: JobState | None = None,
    checkpoint_id: str | None = Query(None, description="Only this checkpoint's (its id or name)."),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> JobsPublic:
    """Jobs, newest first, optionally of one state or checkpoint."""
    if checkpoint_id is not None:
        checkpoint_id = repo.get_checkpoint(session, checkpoint_id, namespace=namespace).id
    rows = operations.list_jobs(
        session, namespace, state=state, checkpoint_id=checkpoint_id, limit=limit, offset=offset
    )
    return JobsPublic(data=[JobPublic.from_row(r) for r in rows], count=len(rows))


@router.get("/v1/jobs/{job_id}", responses=errors(404))
def get_job(job_id: str, session: SessionDep, namespace: NamespaceDep) -> JobPublic:
    """One job: state, progress (phase, generation, best fitness), error."""
    return JobPublic.from_row(operations.get_job(session, job_id, namespace))


@router.post("/v1/jobs/{job_id}/cancel", status_code=202, responses=errors(404))
def cancel_job(job_id: str, session: SessionDep, namespace: NamespaceDep) -> JobPublic:
    """Cancel a job: a queued one at once, a running one at its next progress report."""
    return JobPublic.from_row(operations.cancel_job(session, job_id, namespace))


@router.post("/v1/merges", status_code=202, responses=errors(400, 404, 409))
def create_merge(
    body: MergeCreate, session: SessionDep, settings: SettingsDep, namespace: NamespaceDep
) -> JobPublic:
    """Merge ready checkpoints of one base into a new checkpoint; answers with the job
    (its ``checkpoint_id`` is the derived checkpoint). ``checkpoint_ids`` may hold names."""
    # Names become ids first, so one checkpoint named twice (by id and by name) is refused.
    ids = [repo.get_checkpoint(session, ref, namespace=namespace).id for ref in body.checkpoint_ids]
    body = body.model_copy(update={"checkpoint_ids": ids})
    return JobPublic.from_row(operations.create_merge(session, settings, body, namespace))

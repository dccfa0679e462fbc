"""``/v1/stats``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from migrations.api import schema_is_current
from runtime.process import Runtime
from service.auth import require
from service.deps import NamespaceDep, RuntimeDep, SessionDep
from service.errors import errors
from service.schemas import HealthPublic, ReadyPublic, StatsPublic
from storage.models import ApiKeyRole
from storage.repo import STORED_PART_LABELS, stats

router = APIRouter(tags=["system"])

#: How long /readyz waits for each dependency.
READY_TIMEOUT_S = 5.0


@router.get("/v1/stats", responses=errors())
def get_stats(session: SessionDep, namespace: NamespaceDep) -> StatsPublic:
    """Storage totals of the namespace: logical vs stored bytes, counts by state.

    Stored bytes are the blobs the namespace's rows reference, each counted once (a file
    shared by a base and its checkpoints once); ``stored_parts`` says what they keep.
    """
    s = stats(session, namespace=namespace)
    return StatsPublic(
        stored_parts=s.stored_parts,
        stored_part_labels=STORED_PART_LABELS,
        logical_bytes=s.logical_bytes,
        stored_bytes=s.stored_bytes,
        ratio=s.ratio,
        num_bases=s.num_bases,
        num_checkpoints=s.num_checkpoints,
        num_blobs=s.num_blobs,
        checkpoints_by_state=s.checkpoints_by_state,
        jobs_by_state=s.jobs_by_state,
    )


@router.get("/healthz")
def healthz() -> HealthPublic:
    """The process is alive (no dependency is checked)."""
    return HealthPublic(status="ok")


@router.get("/readyz", responses={503: {"model": ReadyPublic, "description": "Not ready"}})
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready to serve: database reachable, schema current, blob store reachable (else 503)."""
    checks = {
        "database": await _check(lambda: _database(runtime)),
        "blob_store": await _check(lambda: _blob_store(runtime)),
    }
    ready = all(v == "ok" for v in checks.values())
    body = ReadyPublic(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **errors()},
    dependencies=[Depends(require(ApiKeyRole.ADMIN))],
)
def metrics(request: Request) -> Response:
    """Prometheus metrics (server-wide totals: an admin key is needed)."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _check(probe: Callable[[], str]) -> str:
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            return str(await anyio.to_thread.run_sync(probe, abandon_on_cancel=True))
    except TimeoutError:
        return f"timed out after {READY_TIMEOUT_S:g}s"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"[:300]


def _database(runtime: Runtime) -> str:
    with runtime.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    if not schema_is_current(runtime.engine):
        return "schema is not at the newest migration; run `slim migrate`"
    return "ok"


def _blob_store(runtime: Runtime) -> str:
    runtime.store.head("sha256/00/" + "0" * 64)
    return "ok"

"""``/v1/checkpoints``: create, upload, commit (→ job), describe, pull files and delta, delete."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy.orm import Session

from core.files import check_path
from service import operations
from service.deps import CheckpointRef, NamespaceDep, RuntimeDep, SessionDep, SettingsDep, StoreDep
from service.downloads import (
    ByteRange,
    Rebuild,
    blob_chunks,
    blob_size,
)
from service.errors import NotReady, errors
from service.file_answers import (
    FILE_ANSWER,
    FILE_REQUEST,
    HEAD_ANSWER,
    RAW_BODY,
    file_response,
    upload,
)
from service.schemas import (
    MAX_OFFSET,
    CheckpointCreate,
    CheckpointCreated,
    CheckpointPublic,
    CheckpointsPublic,
    FilePublic,
    FilesPublic,
    JobPublic,
)
from storage import repo
from storage.blob_common import sha256_of_key
from storage.models import Checkpoint, CheckpointState

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])


@router.post(
    "",
    status_code=201,
    responses={
        200: {"description": "The name's checkpoint, same options: resume it."},
        **errors(400, 404, 409),
    },
)
def create_checkpoint(
    body: CheckpointCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    namespace: NamespaceDep,
) -> CheckpointCreated:
    """Create a checkpoint of a ready base (state ``uploading``); upload files, then commit.

    A name in use: the same base and options answer 200 with that checkpoint (resume); other
    options are 409 ``options_differ``, unless it failed unstored, which the new one replaces.
    """
    made = operations.create_checkpoint(session, settings, body, namespace)
    if not made.created:
        response.status_code = 200
    public = CheckpointPublic.from_row(made.checkpoint)
    return CheckpointCreated(**public.model_dump(), warnings=made.warnings)


@router.get("", responses=errors(404))
def list_checkpoints(
    session: SessionDep,
    namespace: NamespaceDep,
    base_id: str | None = Query(None, description="Only this base's (its id or name)."),
    state: CheckpointState | None = None,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> CheckpointsPublic:
    """Checkpoints of the namespace, oldest first (without search traces)."""
    if base_id is not None:
        base_id = repo.get_base(session, base_id, namespace=namespace).id
    rows = repo.list_checkpoints(
        session, namespace=namespace, base_id=base_id, state=state, limit=limit, offset=offset
    )
    return CheckpointsPublic(data=[CheckpointPublic.from_row(r) for r in rows], count=len(rows))


@router.get("/{checkpoint_id}", responses=errors(404))
def get_checkpoint(
    checkpoint_id: CheckpointRef, session: SessionDep, namespace: NamespaceDep
) -> CheckpointPublic:
    """One checkpoint: sizes, ratio, bits/param, fitness and the search trace."""
    row = repo.get_checkpoint(session, checkpoint_id, namespace=namespace)
    return CheckpointPublic.from_row(row, with_trace=True)


@router.delete("/{checkpoint_id}", status_code=204, responses=errors(404))
def delete_checkpoint(
    checkpoint_id: CheckpointRef, session: SessionDep, namespace: NamespaceDep
) -> Response:
    """Delete a checkpoint and its jobs (a running job stops); its blobs go to GC."""
    operations.delete_checkpoint(session, checkpoint_id, namespace)
    return Response(status_code=204)


@router.get("/{checkpoint_id}/files", responses=errors(404))
def list_checkpoint_files(
    checkpoint_id: CheckpointRef, session: SessionDep, namespace: NamespaceDep
) -> FilesPublic:
    """The checkpoint's files with sizes and sha256 (what a resumed push can skip)."""
    ckpt = repo.get_checkpoint(session, checkpoint_id, namespace=namespace)
    rows = repo.list_files(session, checkpoint_id=ckpt.id)
    return FilesPublic(data=[FilePublic.from_row(r) for r in rows], count=len(rows))


@router.put(
    "/{checkpoint_id}/files/{path:path}",
    openapi_extra=RAW_BODY,
    responses=errors(400, 404, 409, 413, 415),
)
async def upload_checkpoint_file(
    checkpoint_id: CheckpointRef,
    path: str,
    request: Request,
    runtime: RuntimeDep,
    namespace: NamespaceDep,
) -> FilePublic:
    """Store one file of the checkpoint from the raw streamed body (replaces one at that path).

    ``*.safetensors`` bodies are validated as they stream; send ``X-Slim-Sha256`` to have the
    body checked against the digest you expect.
    """
    return await upload(request, runtime, namespace, path, checkpoint_id=checkpoint_id)


@router.post("/{checkpoint_id}/commit", status_code=202, responses=errors(400, 404, 409))
def commit_checkpoint(
    checkpoint_id: CheckpointRef,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    namespace: NamespaceDep,
) -> JobPublic:
    """Validate the files against the base and queue the compression; answers with the job."""
    job = operations.commit_checkpoint(session, store, settings, checkpoint_id, namespace)
    return JobPublic.from_row(job)


@router.head(
    "/{checkpoint_id}/files/{path:path}",
    name="head_checkpoint_file",
    response_class=Response,
    responses={**errors(400, 404, 409), **HEAD_ANSWER},
    openapi_extra=FILE_REQUEST,
    summary="Size and ETag of a checkpoint file",
)
@router.get(
    "/{checkpoint_id}/files/{path:path}",
    response_class=Response,
    responses={**errors(400, 404, 409), **FILE_ANSWER},
    openapi_extra=FILE_REQUEST,
)
def download_checkpoint_file(
    checkpoint_id: CheckpointRef,
    path: str,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    namespace: NamespaceDep,
    scale: float = Query(
        1.0,
        ge=-10,
        le=10,
        description="Stream θ_pre + scale·δ instead of the fine-tune (1: the fine-tune itself, "
        "0: the base, between: an interpolation). With a scale other than 1 there is no ETag.",
    ),
) -> Response:
    """One file of the checkpoint, rebuilt from the base and the delta and streamed.

    ETag = the sha256 recorded when the delta was written (scale 1 only); Range honoured.
    """
    rel = check_path(path)
    ckpt = _ready(session, checkpoint_id, namespace)
    row = repo.get_file(session, path=rel, checkpoint_id=ckpt.id)
    digest = row.recon_sha256 or row.sha256
    etag = f'"{digest}"' if scale == 1.0 else None
    rebuild = Rebuild.of(session, ckpt)
    session.close()  # release the connection before a long stream
    # Content-Length is what the rebuild streams: the size the delta records for the file
    size, digests = rebuild.headers(runtime.cache, rel, scale)

    def open_chunks(byte_range: ByteRange | None) -> Iterator[bytes | memoryview]:
        return rebuild.open(runtime.cache, rel, scale).chunks(byte_range)

    response = file_response(request, size=size, etag=etag, open_chunks=open_chunks)
    response.headers.update(digests)
    return response


@router.head(
    "/{checkpoint_id}/delta",
    name="head_delta",
    response_class=Response,
    responses={**errors(404, 409), **HEAD_ANSWER},
    openapi_extra=FILE_REQUEST,
    summary="Size and ETag of the stored delta",
)
@router.get(
    "/{checkpoint_id}/delta",
    response_class=Response,
    responses={**errors(404, 409), **FILE_ANSWER},
    openapi_extra=FILE_REQUEST,
)
def download_delta(
    checkpoint_id: CheckpointRef,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    namespace: NamespaceDep,
) -> Response:
    """The stored delta (a safetensors container; rebuild client-side with ``slim reconstruct``)."""
    ckpt = _ready(session, checkpoint_id, namespace)
    key, name = ckpt.delta_blob_key, ckpt.name
    assert key is not None
    session.close()
    # the blob's own size, never the stored_bytes accounting field
    size = blob_size(runtime.store, key, f"the delta of checkpoint {name!r}")
    return file_response(
        request,
        size=size,
        etag=f'"{sha256_of_key(key)}"',
        open_chunks=lambda byte_range: blob_chunks(runtime.store, key, byte_range),
    )


def _ready(session: Session, checkpoint_id: CheckpointRef, namespace: str) -> Checkpoint:
    ckpt = repo.get_checkpoint(session, checkpoint_id, namespace=namespace)
    if ckpt.state != CheckpointState.READY or ckpt.delta_blob_key is None:
        raise NotReady(
            f"checkpoint {ckpt.name!r} is {ckpt.state.value}; files can be pulled once its "
            "job has succeeded (GET /v1/jobs?checkpoint_id=...)"
        )
    return ckpt

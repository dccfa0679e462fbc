"""``/v1/bases``: create, upload files, commit, list, describe, download files, delete."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, Response

from core.files import check_path
from service import operations
from service.deps import BaseRef, NamespaceDep, RuntimeDep, SessionDep, SettingsDep, StoreDep
from service.downloads import blob_chunks
from service.errors import errors
from service.file_answers import (
    FILE_ANSWER,
    FILE_REQUEST,
    HEAD_ANSWER,
    RAW_BODY,
    file_response,
    upload,
)
from service.schemas import MAX_OFFSET, BaseCreate, BasePublic, BasesPublic, FilePublic, FilesPublic
from storage import repo
from storage.blob_common import sha256_of_key
from storage.errors import NotFound

router = APIRouter(prefix="/v1/bases", tags=["bases"])


@router.post("", status_code=201, responses=errors(400, 409))
def create_base(body: BaseCreate, session: SessionDep, namespace: NamespaceDep) -> BasePublic:
    """Create a base (state ``uploading``); upload its files, then commit it."""
    base = repo.create_base(session, name=body.name, namespace=namespace)
    session.commit()
    return BasePublic.from_row(base)


@router.get("", responses=errors())
def list_bases(
    session: SessionDep,
    namespace: NamespaceDep,
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> BasesPublic:
    """Bases of the namespace, oldest first."""
    rows = repo.list_bases(session, namespace=namespace, limit=limit, offset=offset)
    return BasesPublic(data=[BasePublic.from_row(r) for r in rows], count=len(rows))


@router.get("/{base_id}", responses=errors(404))
def get_base(base_id: BaseRef, session: SessionDep, namespace: NamespaceDep) -> BasePublic:
    """One base."""
    return BasePublic.from_row(repo.get_base(session, base_id, namespace=namespace))


@router.delete("/{base_id}", status_code=204, responses=errors(404, 409))
def delete_base(base_id: BaseRef, session: SessionDep, namespace: NamespaceDep) -> Response:
    """Delete a base (409 ``conflict`` while checkpoints depend on it); blobs go to GC."""
    operations.delete_base(session, base_id, namespace)
    return Response(status_code=204)


@router.get("/{base_id}/files", responses=errors(404))
def list_base_files(base_id: BaseRef, session: SessionDep, namespace: NamespaceDep) -> FilesPublic:
    """The base's files with their sizes and sha256 (to resume an interrupted push)."""
    base = repo.get_base(session, base_id, namespace=namespace)
    rows = repo.list_files(session, base_id=base.id)
    return FilesPublic(data=[FilePublic.from_row(r) for r in rows], count=len(rows))


@router.put(
    "/{base_id}/files/{path:path}",
    openapi_extra=RAW_BODY,
    responses=errors(400, 404, 409, 413, 415),
)
async def upload_base_file(
    base_id: BaseRef, path: str, request: Request, runtime: RuntimeDep, namespace: NamespaceDep
) -> FilePublic:
    """Store one file of the base from the raw streamed body (replaces one at that path)."""
    return await upload(request, runtime, namespace, path, base_id=base_id)


@router.post("/{base_id}/commit", responses=errors(400, 404))
def commit_base(
    base_id: BaseRef,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    namespace: NamespaceDep,
) -> BasePublic:
    """Validate every weight file's header and mark the base ``ready``."""
    return BasePublic.from_row(operations.commit_base(session, store, settings, base_id, namespace))


@router.head(
    "/{base_id}/files/{path:path}",
    name="head_base_file",
    response_class=Response,
    responses={**errors(400, 404), **HEAD_ANSWER},
    openapi_extra=FILE_REQUEST,
    summary="Size and ETag of a base file",
)
@router.get(
    "/{base_id}/files/{path:path}",
    response_class=Response,
    responses={**errors(400, 404), **FILE_ANSWER},
    openapi_extra=FILE_REQUEST,
)
def download_base_file(
    base_id: BaseRef,
    path: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    namespace: NamespaceDep,
) -> Response:
    """One file of the base, as uploaded (ETag = its sha256; Range honoured)."""
    base = repo.get_base(session, base_id, namespace=namespace)
    row = repo.get_file(session, path=check_path(path), base_id=base.id)
    key, size, etag = row.blob_key, row.size, f'"{row.sha256}"'
    session.close()
    if key is None or sha256_of_key(key) is None:
        raise NotFound(f"the bytes of {path!r} are no longer stored")
    return file_response(
        request,
        size=size,
        etag=etag,
        open_chunks=lambda byte_range: blob_chunks(store, key, byte_range),
    )

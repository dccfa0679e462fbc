"""The Hugging Face Hub's write routes: create a repository, check a model card, preupload,
Git LFS uploads, commits, branches. What a push means is in :mod:`service.hub_write`; the state
changes are :mod:`storage.commits`'; ``docs/hub.md`` is the user's page.

Errors are answered in the Hub's shape by :class:`service.routes.hub.HubRoute`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path as FsPath
from typing import Annotated, Any
from urllib.parse import unquote, urlencode

import anyio
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from core.files import check_path, is_unread
from core.rewrite import with_aux_files
from runtime.process import Runtime
from service import hub, hub_write
from service.auth import Caller, CallerDep
from service.deps import RuntimeDep
from service.downloads import Rebuild
from service.errors import ApiError, ChecksumMismatch, errors
from service.hub_write import (
    BadCommit,
    CommitPayload,
    LfsObjectMissing,
    PreconditionFailed,
    RepoExists,
    UploadGrant,
)
from service.routes.hub import HubRoute
from service.streaming import body_in_thread
from service.uploads import UnsupportedFile, check_readable
from storage import commits, keys, revisions
from storage.blob_common import BlobInfo, blob_key
from storage.db import begin_write
from storage.errors import IntegrityError, NotFound, TooManyFiles
from storage.models import (
    Base,
    Blob,
    Checkpoint,
    CheckpointState,
    File,
    FileRole,
    Repo,
    Revision,
)
from storage.repo import record_blob

router = APIRouter(tags=["hub"], route_class=HubRoute)

Namespace = Annotated[str, Path(description="The namespace (must be your key's).")]
Name = Annotated[str, Path(description="The repository's name.")]
Rev = Annotated[str, Path(description="The branch to commit to (`main`).")]
_ERRORS = errors(400, 403, 404, 409, 412, 413, 422)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _raw_rev(request: Request, rev: str) -> str:
    """The revision as sent (``refs%2Fpr%2F1`` stays one segment): the last raw path segment."""
    raw = request.scope.get("raw_path")
    return unquote(raw.decode("latin-1").rstrip("/").rsplit("/", 1)[-1]) if raw else rev


# -- repositories ------------------------------------------------------------------------------


class RepoCreate(BaseModel):
    """``HfApi().create_repo``'s body."""

    name: str = Field(max_length=200)
    organization: str | None = Field(default=None, max_length=200)
    type: str | None = Field(default=None, max_length=20)
    private: bool | None = None
    visibility: str | None = Field(default=None, max_length=20)


class RepoCreated(BaseModel):
    url: str
    name: str
    id: str


@router.post("/api/repos/create", responses=_ERRORS)
def create_repo(body: RepoCreate, request: Request, runtime: RuntimeDep, caller: CallerDep) -> Any:
    """``HfApi().create_repo``: a model repository in your namespace, with a first commit
    holding ``.gitattributes`` (as on the Hub). 409 if the name is taken."""
    if body.type not in (None, "model"):
        raise BadCommit(f"this server keeps model repositories only, not {body.type!r}")
    namespace = body.organization or caller.namespace
    if namespace != caller.namespace:
        raise hub.NotAHubRepo(
            f"you can create repositories in {caller.namespace!r} (your key's namespace) only"
        )
    name = hub_write.check_repo_name(body.name)
    repo_id = f"{namespace}/{name}"
    url = f"{_base_url(request)}/{repo_id}"
    try:
        hub_write.new_repo(runtime, namespace, name)
    except hub_write.RepoExists as exc:
        # the Hub's 409 names the repository: create_repo(exist_ok=True) reads its url
        answer = hub.hub_error(exc.code, exc.detail, 409)
        headers = {k: v for k, v in answer.headers.items() if k.lower().startswith("x-error")}
        return JSONResponse({**json.loads(bytes(answer.body)), "url": url}, 409, headers=headers)
    return RepoCreated(url=url, name=repo_id, id=repo_id)


class RepoDelete(BaseModel):
    name: str = Field(max_length=200)
    organization: str | None = Field(default=None, max_length=200)
    type: str | None = Field(default=None, max_length=20)


@router.delete("/api/repos/delete", responses=_ERRORS)
def delete_repo(body: RepoDelete, runtime: RuntimeDep, caller: CallerDep) -> Response:
    """``HfApi().delete_repo``: every revision of the repository (409 while it holds a base
    that other repositories are stored against)."""
    namespace, name = hub.split_repo_id(hub.repo_id(body.organization, body.name), caller.namespace)
    with runtime.sessions() as session:
        begin_write(session)
        revisions.delete_repo(session, revisions.get_repo(session, name=name, namespace=namespace))
        session.commit()
    return Response(status_code=200)


class YamlCheck(BaseModel):
    content: str = Field(max_length=10 * hub_write.MIB)
    repoType: str | None = None


@router.post("/api/validate-yaml", responses=errors(400))
def validate_yaml(body: YamlCheck, caller: CallerDep) -> JSONResponse:
    """The model card's metadata, checked before a push (``create_commit`` of a README.md)."""
    problems, warnings = hub_write.validate_card(body.content)
    status = 400 if problems else 200
    return JSONResponse({"errors": problems, "warnings": warnings}, status_code=status)


# -- preupload ---------------------------------------------------------------------------------


class PreuploadFile(BaseModel):
    path: str = Field(max_length=1024)
    sample: str = Field(default="", max_length=4096)
    size: int = Field(ge=0)


class Preupload(BaseModel):
    files: list[PreuploadFile] = Field(max_length=10_000)
    gitIgnore: str | None = Field(default=None, max_length=1_000_000)


def _preupload(
    runtime: Runtime, caller: Caller, repo_id: str, rev: str, body: Preupload
) -> dict[str, Any]:
    namespace, name = hub.split_repo_id(repo_id, caller.namespace)
    with runtime.sessions() as session:
        repo = revisions.get_repo(session, name=name, namespace=namespace)
        head = revisions.head(session, repo, rev)
        there = {}
        if head is not None:
            there = {
                path: row.recon_sha256 or row.sha256
                for path, row in commits.files_of(session, head).items()
            }
    out = []
    for f in body.files:
        check_path(f.path)
        try:
            sample = base64.b64decode(f.sample, validate=True)
        except binascii.Error:
            raise BadCommit(f"{f.path}: 'sample' is not base64") from None
        mode = hub_write.upload_mode(f.path, f.size, sample)
        entry: dict[str, Any] = {
            "path": f.path,
            "uploadMode": mode,
            # pickled files are never stored (as `slim push` skips them): the client leaves them
            # out of the commit
            "shouldIgnore": is_unread(f.path),
        }
        if mode == "lfs" and f.path in there:
            entry["oid"] = there[f.path]
        out.append(entry)
    return {"files": out, "commitOid": head.commit_id if head is not None else None}


@router.post("/api/models/{namespace}/{name}/preupload/{rev}", responses=_ERRORS)
def preupload(
    namespace: Namespace,
    name: Name,
    rev: Rev,
    body: Preupload,
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
) -> Any:
    """Per file: ``regular`` (sent inside the commit) or ``lfs`` (uploaded first), and the
    sha256 of the file already at that path (so an unchanged file is not sent again)."""
    return _preupload(runtime, caller, hub.repo_id(namespace, name), _raw_rev(request, rev), body)


@router.post("/api/models/{name}/preupload/{rev}", responses=_ERRORS)
def preupload_short(
    name: Name, rev: Rev, body: Preupload, request: Request, runtime: RuntimeDep, caller: CallerDep
) -> Any:
    """:func:`preupload` for a repository of your namespace named without it."""
    return _preupload(runtime, caller, name, _raw_rev(request, rev), body)


# -- Git LFS -----------------------------------------------------------------------------------


class LfsObject(BaseModel):
    oid: str = Field(max_length=64)
    size: int = Field(ge=0)


class LfsBatch(BaseModel):
    operation: str = Field(max_length=20)
    transfers: list[str] = Field(default_factory=lambda: ["basic"], max_length=10)
    objects: list[LfsObject] = Field(max_length=10_000)
    hash_algo: str = "sha256"
    ref: dict[str, Any] | None = None


def _secret(runtime: Runtime, key_prefix: str) -> bytes:
    """The signing secret of upload URLs for a key: its stored hash (never sent anywhere)."""
    if runtime.settings.open:
        return b"open:" + str(runtime.settings.data_dir).encode()
    with runtime.sessions() as session:
        row = keys.live_key(session, key_prefix)
        if row is None:
            raise hub_write.BadUploadUrl("the key this upload URL was made for was revoked")
        if not keys.role_allows(row.role, "write"):
            raise hub_write.BadUploadUrl("the key this upload URL was made for cannot write")
        return row.key_hash.encode()


def _batch(
    request: Request, runtime: Runtime, caller: Caller, repo_id: str, body: LfsBatch
) -> JSONResponse:
    namespace, name = hub.split_repo_id(repo_id, caller.namespace)
    with runtime.sessions() as session:
        revisions.get_repo(session, name=name, namespace=namespace)
    if body.operation != "upload":
        raise BadCommit("this server takes LFS uploads only; download files through /resolve")
    if body.hash_algo != "sha256":
        raise BadCommit("LFS objects are named by sha256 here")
    secret = _secret(runtime, caller.key_prefix or "")
    part = runtime.settings.hub_part_bytes
    base = _base_url(request)
    multipart_ok = "multipart" in body.transfers
    answers, any_multipart = [], False
    for obj in body.objects:
        oid = obj.oid.lower()
        try:
            hub_write.check_oid(oid)
        except BadCommit as exc:
            answers.append({"oid": obj.oid, "size": obj.size, "error": _lfs_error(422, exc.detail)})
            continue
        if obj.size > runtime.settings.max_file_bytes:
            limit = runtime.settings.max_file_bytes
            error = _lfs_error(413, f"the file is over {limit} bytes (SLIM_MAX_FILE_BYTES)")
            answers.append({"oid": oid, "size": obj.size, "error": error})
            continue
        grant = hub_write.new_grant(oid, obj.size, caller.key_prefix)
        query = urlencode(grant.query(secret))
        verify = {"href": f"{base}/api/lfs/{oid}/verify"}
        if multipart_ok and obj.size > part:
            any_multipart = True
            header = {"chunk_size": str(part)}
            for n in range(1, hub_write.part_count(obj.size, part) + 1):
                header[f"{n:05d}"] = f"{base}/api/lfs/{oid}/part/{n}?{query}"
            upload = {"href": f"{base}/api/lfs/{oid}/complete?{query}", "header": header}
        else:
            upload = {"href": f"{base}/api/lfs/{oid}?{query}"}
        answers.append(
            {
                "oid": oid,
                "size": obj.size,
                "authenticated": True,
                "actions": {"upload": upload, "verify": verify},
            }
        )
    return JSONResponse(
        {
            "transfer": "multipart" if any_multipart else "basic",
            "objects": answers,
            "hash_algo": "sha256",
        },
        media_type="application/vnd.git-lfs+json",
    )


def _lfs_error(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "message": message}


@router.post("/{namespace}/{name}.git/info/lfs/objects/batch", responses=_ERRORS)
def lfs_batch(
    namespace: Namespace,
    name: Name,
    body: LfsBatch,
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
) -> Any:
    """Git LFS's batch API (uploads): where to ``PUT`` each object (one URL, or one per part
    for a file larger than ``SLIM_HUB_PART_BYTES``) and where to verify it."""
    return _batch(request, runtime, caller, hub.repo_id(namespace, name), body)


@router.post("/{name}.git/info/lfs/objects/batch", responses=_ERRORS)
def lfs_batch_short(
    name: Name, body: LfsBatch, request: Request, runtime: RuntimeDep, caller: CallerDep
) -> Any:
    """:func:`lfs_batch` for a repository of your namespace named without it."""
    return _batch(request, runtime, caller, name, body)


_Size = Query(ge=0, description="The object's size in bytes (signed).")
_Exp = Query(description="When the URL expires (Unix seconds, signed).")
_Key = Query("", max_length=32, description="The key prefix the URL was made for (signed).")
_Sig = Query(max_length=64, description="HMAC-SHA256 of the above.")


def _grant(runtime: Runtime, oid: str, size: int, exp: int, key: str, sig: str) -> UploadGrant:
    grant = UploadGrant(hub_write.check_oid(oid), size, exp, key)
    hub_write.check_grant(_secret(runtime, key), grant, sig)
    return grant


def _record(runtime: Runtime, info: BlobInfo) -> None:
    with runtime.sessions() as session:
        begin_write(session)
        record_blob(session, info)
        session.commit()


async def _store_body(
    runtime: Runtime, stream: AsyncIterator[bytes], *, max_bytes: int, sha256: str | None
) -> BlobInfo:
    async with body_in_thread(stream) as body:
        try:
            return await anyio.to_thread.run_sync(
                lambda: runtime.store.put_stream(body, max_bytes=max_bytes, expected_sha256=sha256)
            )
        except IntegrityError as exc:
            raise ChecksumMismatch(exc.detail) from None


@router.put("/api/lfs/{oid}", responses=_ERRORS)
async def lfs_upload(
    oid: str,
    request: Request,
    runtime: RuntimeDep,
    size: int = _Size,
    exp: int = _Exp,
    key: str = _Key,
    sig: str = _Sig,
) -> Response:
    """One object's bytes (the basic transfer), stored once they hash to the oid."""
    grant = await anyio.to_thread.run_sync(lambda: _grant(runtime, oid, size, exp, key, sig))
    info = await _store_body(runtime, request.stream(), max_bytes=grant.size, sha256=grant.oid)
    if info.size != grant.size:
        raise ChecksumMismatch(f"the body is {info.size} bytes; the batch request said {size}")
    await anyio.to_thread.run_sync(lambda: _record(runtime, info))
    return Response(status_code=200)


def _parts_dir(runtime: Runtime, grant: UploadGrant, sig: str) -> FsPath:
    return FsPath(runtime.cache.root) / "lfs-parts" / f"{grant.oid}-{sig[:16]}"


@router.put("/api/lfs/{oid}/part/{number}", responses=_ERRORS)
async def lfs_upload_part(
    oid: str,
    number: int,
    request: Request,
    runtime: RuntimeDep,
    size: int = _Size,
    exp: int = _Exp,
    key: str = _Key,
    sig: str = _Sig,
) -> Response:
    """One part of a multipart upload (kept on the server's disk until the completion)."""
    grant = await anyio.to_thread.run_sync(lambda: _grant(runtime, oid, size, exp, key, sig))
    part = runtime.settings.hub_part_bytes
    count = hub_write.part_count(grant.size, part)
    if not 1 <= number <= count:
        raise BadCommit(f"part {number} is not one of the object's parts (1 to {count})")
    expected = min(part, grant.size - (number - 1) * part)
    folder = _parts_dir(runtime, grant, sig)
    target = folder / f"{number:05d}"

    def write(body: Iterator[bytes]) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        written = 0
        with partial.open("wb") as out:
            for chunk in body:
                written += len(chunk)
                if written > expected:
                    break
                out.write(chunk)
        if written != expected:
            partial.unlink(missing_ok=True)
            return written
        partial.replace(target)
        return written

    async with body_in_thread(request.stream()) as body:
        written = await anyio.to_thread.run_sync(lambda: write(body))
    if written != expected:
        raise ChecksumMismatch(f"part {number} is {expected} bytes; the body was not")
    return Response(status_code=200, headers={"ETag": f'"{number}-{expected}"'})


class PartDone(BaseModel):
    partNumber: int
    etag: str = Field(max_length=200)


class Completion(BaseModel):
    oid: str = Field(max_length=64)
    parts: list[PartDone] = Field(max_length=100_000)


@router.post("/api/lfs/{oid}/complete", responses=_ERRORS)
def lfs_complete(
    oid: str,
    body: Completion,
    runtime: RuntimeDep,
    size: int = _Size,
    exp: int = _Exp,
    key: str = _Key,
    sig: str = _Sig,
) -> Response:
    """The end of a multipart upload: the parts, joined, must hash to the oid."""
    grant = _grant(runtime, oid, size, exp, key, sig)
    count = hub_write.part_count(grant.size, runtime.settings.hub_part_bytes)
    folder = _parts_dir(runtime, grant, sig)
    paths = [folder / f"{n:05d}" for n in range(1, count + 1)]
    if body.oid.lower() != grant.oid or len(body.parts) != count:
        raise BadCommit(f"the completion lists {len(body.parts)} parts of {count}")
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise LfsObjectMissing(f"parts {', '.join(missing[:5])} were not uploaded")

    def chunks() -> Iterator[bytes]:
        for p in paths:
            with p.open("rb") as f:
                while block := f.read(1 << 20):
                    yield block

    try:
        info = runtime.store.put_stream(chunks(), max_bytes=grant.size, expected_sha256=grant.oid)
    except IntegrityError as exc:
        raise ChecksumMismatch(exc.detail) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    _record(runtime, info)
    return Response(status_code=200)


@router.post("/api/lfs/{oid}/verify", responses=_ERRORS)
def lfs_verify(oid: str, body: LfsObject, runtime: RuntimeDep, caller: CallerDep) -> Response:
    """Whether the object arrived whole (404 if not)."""
    oid = hub_write.check_oid(oid.lower())
    with runtime.sessions() as session:
        row = session.get(Blob, blob_key(oid))
    if row is None or row.size != body.size or not runtime.store.exists(row.key):
        raise LfsObjectMissing(f"object {oid} of {body.size} bytes was not uploaded")
    return Response(status_code=200)


@router.get("/api/models/{namespace}/{name}/xet-write-token/{rev}", responses=_ERRORS)
@router.get("/api/models/{name}/xet-write-token/{rev}", name="xet_token_short", responses=_ERRORS)
def xet_write_token(caller: CallerDep, name: str, rev: str, namespace: str | None = None) -> Any:
    """Xet storage is not offered: uploads go through Git LFS (``HF_HUB_DISABLE_XET=1``)."""
    raise XetUnsupported(
        "this server stores uploads through Git LFS, not Xet: set HF_HUB_DISABLE_XET=1 "
        "(see docs/hub.md)"
    )


class XetUnsupported(ApiError):
    """The client asked for Xet storage, which this server does not offer."""

    code = "xet_unsupported"


# -- branches --------------------------------------------------------------------------------


class BranchCreate(BaseModel):
    startingPoint: str | None = Field(default=None, max_length=255)
    emptyBranch: bool | None = None


def _create_branch(
    runtime: Runtime, caller: Caller, repo_id: str, branch: str, body: BranchCreate | None
) -> Response:
    namespace, name = hub.split_repo_id(repo_id, caller.namespace)
    if body is not None and body.emptyBranch:
        raise BadCommit("empty branches are not kept here; start a branch at a commit")
    with runtime.sessions() as session:
        begin_write(session)
        repo = revisions.get_repo(session, name=name, namespace=namespace)
        revisions.lock_repo(session, repo)
        if revisions.head(session, repo, branch) is not None:
            raise RepoExists(f"Reference already exists: refs/heads/{branch}")
        start = (body.startingPoint if body is not None else None) or revisions.MAIN
        try:
            revisions.move_ref(session, repo, branch, start)
        except ValueError as exc:
            raise BadCommit(str(exc)) from None
        session.commit()
    return Response(status_code=200)


@router.post("/api/models/{namespace}/{name}/branch/{branch}", responses=_ERRORS)
def create_branch(
    namespace: Namespace,
    name: Name,
    branch: str,
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
    body: BranchCreate | None = None,
) -> Response:
    """``create_branch``: a branch at ``startingPoint`` (default ``main``); 409 if it exists.
    Commits to it are stored like any (exact); only ``main`` gets the policy's compression."""
    return _create_branch(
        runtime, caller, hub.repo_id(namespace, name), _raw_rev(request, branch), body
    )


@router.post("/api/models/{name}/branch/{branch}", responses=_ERRORS)
def create_branch_short(
    name: Name,
    branch: str,
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
    body: BranchCreate | None = None,
) -> Response:
    """:func:`create_branch` for a repository of your namespace named without it."""
    return _create_branch(runtime, caller, name, _raw_rev(request, branch), body)


def _delete_branch(runtime: Runtime, caller: Caller, repo_id: str, branch: str) -> Response:
    namespace, name = hub.split_repo_id(repo_id, caller.namespace)
    if branch == revisions.MAIN:
        raise BadCommit("main cannot be deleted; delete the repository instead")
    with runtime.sessions() as session:
        begin_write(session)
        repo = revisions.get_repo(session, name=name, namespace=namespace)
        revisions.delete_ref(session, repo, branch)
        session.commit()
    return Response(status_code=200)


@router.delete("/api/models/{namespace}/{name}/branch/{branch}", responses=_ERRORS)
def delete_branch(
    namespace: Namespace,
    name: Name,
    branch: str,
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
) -> Response:
    """``delete_branch``: the ref goes; its revisions stay until retention expires them."""
    return _delete_branch(runtime, caller, hub.repo_id(namespace, name), _raw_rev(request, branch))


@router.delete("/api/models/{name}/branch/{branch}", responses=_ERRORS)
def delete_branch_short(
    name: Name, branch: str, request: Request, runtime: RuntimeDep, caller: CallerDep
) -> Response:
    """:func:`delete_branch` for a repository of your namespace named without it."""
    return _delete_branch(runtime, caller, name, _raw_rev(request, branch))


# -- commits -----------------------------------------------------------------------------------


async def _lines(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The NDJSON lines of a body, each at most ``limit`` bytes."""
    pending = bytearray()
    async for chunk in stream:
        pending += chunk
        while (cut := pending.find(b"\n")) >= 0:
            yield bytes(pending[:cut])
            del pending[: cut + 1]
        if len(pending) > limit:
            raise BadCommit(
                f"a commit line is over {limit} bytes; send files over "
                f"{hub_write.REGULAR_MAX_BYTES} bytes through LFS (the preupload says which)"
            )
    if pending.strip():
        yield bytes(pending)


async def _commit(
    request: Request, runtime: Runtime, caller: Caller, repo_id: str, rev: str
) -> JSONResponse:
    namespace, name = hub.split_repo_id(repo_id, caller.namespace)
    if request.query_params.get("create_pr") in ("1", "true", "True"):
        raise BadCommit("pull requests are not supported here; commit to a branch")
    await anyio.to_thread.run_sync(lambda: _existing_repo(runtime, namespace, name))
    payload = CommitPayload()
    stored: dict[str, BlobInfo] = {}
    limit = runtime.settings.max_files_per_checkpoint
    async for line in _lines(request.stream(), hub_write.MAX_COMMIT_LINE):
        inline = hub_write.parse_commit_line(line, payload)
        if payload.operations > limit:
            raise TooManyFiles(
                f"a commit holds at most {limit} operations (SLIM_MAX_FILES_PER_CHECKPOINT)"
            )
        if inline is not None:
            if is_unread(inline.path):
                check_readable(inline.path)
            stored[inline.path] = await anyio.to_thread.run_sync(
                runtime.store.put_stream, [inline.content]
            )
    if not payload.seen_header:
        raise BadCommit("the commit has no header line")
    for path in payload.added:
        if is_unread(path):
            raise UnsupportedFile(f"{path}: pickled files are not stored; leave it out")
    commit_id = await anyio.to_thread.run_sync(
        lambda: _land(runtime, namespace, name, rev, payload, stored)
    )
    url = f"{_base_url(request)}/{namespace}/{name}/commit/{commit_id}"
    return JSONResponse(
        {"commitUrl": url, "commitOid": commit_id, "pullRequestUrl": None, "success": True}
    )


def _existing_repo(runtime: Runtime, namespace: str, name: str) -> None:
    with runtime.sessions() as session:
        revisions.get_repo(session, name=name, namespace=namespace)


def _land(
    runtime: Runtime,
    namespace: str,
    name: str,
    rev: str,
    payload: CommitPayload,
    stored: dict[str, BlobInfo],
) -> str:
    """Make the commit a revision (retrying when the head moves and no parent was pinned).

    A commit that keeps the weights of a parent stored as a ready delta (a README or tokenizer
    pushed after the model) is stored as that delta with its new small files
    (:func:`core.rewrite.with_aux_files`): no job, no second compression of the weights."""
    force_rebuild = False
    prepared: tuple[tuple[str, str], BlobInfo] | None = None
    for _ in range(8):
        with runtime.sessions() as session:
            begin_write(session)
            repo = revisions.get_repo(session, name=name, namespace=namespace)
            revisions.lock_repo(session, repo)  # the head read here stays the head
            head = revisions.head(session, repo, rev)
            if head is None and rev != revisions.MAIN:
                raise revisions.RevisionNotFound(
                    f"{namespace}/{name} has no branch {rev!r}; create it first (create_branch)"
                )
            head_commit = head.commit_id if head is not None else None
            if payload.parent_commit is not None and not (head_commit or "").startswith(
                payload.parent_commit
            ):
                raise PreconditionFailed(
                    "A commit has happened since. Please refresh and try again: "
                    f"{rev} is at {head_commit}, not at {payload.parent_commit}"
                )
            parent = commits.files_of(session, head) if head is not None else {}
            reusable = None if force_rebuild or head is None else _ready_delta(session, head)
            entries, missing = _carried(session, parent, in_delta=reusable is not None)
            if missing:
                assert head is not None
                rebuild, shas = _rebuild_source(session, head, missing)
                session.rollback()
                _rebuild(runtime, rebuild, shas)
                continue
            files = hub_write.apply_operations(entries, payload, commit=head_commit)
            commit_files = _commit_files(session, files, payload, stored)
            if any(f.path == "adapter_config.json" for f in commit_files):
                # a PEFT adapter is stored as it is: its weights are no base of anything
                commit_files = [replace(f, role=FileRole.AUX) for f in commit_files]
            if head is not None and head.manifest_sha256 == commits.manifest(commit_files):
                return head.commit_id
            base = _base_for(runtime, session, repo, commit_files)
            in_delta = [f for f in commit_files if f.blob_key == IN_DELTA]
            if in_delta:
                assert reusable is not None
                served = {p: r.recon_sha256 or r.sha256 for p, r in parent.items()}
                weights = {f.path for f in commit_files if f.role == FileRole.WEIGHTS}
                same_weights = weights == {
                    p for p, r in parent.items() if r.role == FileRole.WEIGHTS
                }
                if (
                    not same_weights
                    or len(in_delta) != len(weights)
                    or base is None
                    or (reusable.base_id != base.id)
                ):
                    force_rebuild = True  # other weights, or another base: store them anew
                    session.rollback()
                    continue
                aux = {f.path: f.blob_key for f in commit_files if f.blob_key != IN_DELTA}
                wanted = (str(reusable.delta_blob_key), repr(sorted(aux.items())))
                if prepared is None or prepared[0] != wanted:
                    delta_key = str(reusable.delta_blob_key)
                    session.rollback()
                    prepared = (wanted, _rewrite(runtime, delta_key, aux))
                    continue
            # a queued compression of the parent's weights is handed to this revision
            pending = None
            if head is not None and base is not None and rev == revisions.MAIN:
                pending = commits.queued_compression(
                    session, repo, of_commit=head.commit_id, files=commit_files
                )
            try:
                if in_delta:
                    assert prepared is not None and reusable is not None
                    revision = commits.commit_reusing(
                        session,
                        repo,
                        commit_files,
                        served=served,
                        parent=reusable,
                        delta=prepared[1],
                        message=payload.message,
                        expected_parent=head_commit,
                        ref=rev,
                    )
                else:
                    policy = None
                    if base is not None and rev == revisions.MAIN and pending is None:
                        policy = _policy(runtime, repo, commit_files)
                    revision = commits.commit(
                        session,
                        repo,
                        commit_files,
                        message=payload.message,
                        expected_parent=head_commit,
                        base=base,
                        policy=policy,
                        ref=rev,
                    )
            except revisions.ParentMismatch:
                session.rollback()
                continue  # the head moved between our read and our lock
            if pending is not None:
                commits.retarget_compression(
                    session, pending, to_commit=revision.commit_id, files=commit_files
                )
            commit_id = revision.commit_id
            session.commit()
            return commit_id
    raise hub_write.PreconditionFailed(f"{rev} kept moving; try the commit again")


#: The blob key of a carried file whose bytes the parent's delta holds (:func:`_land`).
IN_DELTA = ""


def _ready_delta(session: Session, head: Revision) -> Checkpoint | None:
    """The parent revision's checkpoint, when it is stored as a ready delta."""
    if head.checkpoint_id is None:
        return None
    ckpt = session.get(Checkpoint, head.checkpoint_id)
    if ckpt is None or ckpt.delta_blob_key is None or ckpt.state != CheckpointState.READY:
        return None
    return ckpt


def _rewrite(runtime: Runtime, delta_key: str, aux: dict[str, str]) -> BlobInfo:
    """The parent's delta with the commit's small files, stored (see :func:`_land`)."""
    delta = runtime.cache.path(delta_key)
    local = {path: runtime.cache.path(key) for path, key in aux.items()}
    work = FsPath(runtime.cache.root) / "rewrites"
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{os.getpid()}-{threading.get_ident()}.slim"
    try:
        with_aux_files(delta, out, local)
        info = runtime.store.put_file(out)
    finally:
        out.unlink(missing_ok=True)
    _record(runtime, info)
    return info


def _carried(
    session: Session, parent: dict[str, File], *, in_delta: bool
) -> tuple[dict[str, tuple[str, int, str | None]], dict[str, File]]:
    """The parent revision's files as (sha256, size, blob key) of the bytes it serves, and
    those whose bytes only a delta holds (to rebuild into blobs first). With ``in_delta``
    (the parent is a ready delta), its weights are marked :data:`IN_DELTA` instead."""
    entries: dict[str, tuple[str, int, str | None]] = {}
    missing: dict[str, File] = {}
    for path, row in parent.items():
        sha256 = row.recon_sha256 or row.sha256
        exact = hub.exact_blob(row)
        if in_delta and row.role == FileRole.WEIGHTS:
            entries[path] = (sha256, row.size, IN_DELTA)
        elif exact is not None:
            entries[path] = (sha256, row.size, exact)
        elif session.get(Blob, blob_key(sha256)) is not None:
            entries[path] = (sha256, row.size, blob_key(sha256))
        else:
            missing[path] = row
    return entries, missing


def _rebuild_source(session: Session, head: Revision, rows: dict[str, File]) -> Any:
    """The parent checkpoint's delta and base, and the sha256 each of ``rows`` rebuilds to."""
    checkpoint = session.get(Checkpoint, head.checkpoint_id)
    if checkpoint is None or checkpoint.delta_blob_key is None:
        raise NotFound(f"the files of {head.commit_id[:12]} are not stored any more")
    return Rebuild.of(session, checkpoint), {p: r.recon_sha256 or r.sha256 for p, r in rows.items()}


def _rebuild(runtime: Runtime, rebuild: Rebuild, files: dict[str, str]) -> None:
    """Rebuild files that only a delta holds into blobs of their own (a commit keeps them)."""
    for path, sha256 in files.items():
        chunks = rebuild.open(runtime.cache, path).chunks(None)
        info = runtime.store.put_stream((bytes(c) for c in chunks), expected_sha256=sha256)
        _record(runtime, info)


def _commit_files(
    session: Session,
    files: dict[str, tuple[str, int, str | None]],
    payload: CommitPayload,
    stored: dict[str, BlobInfo],
) -> list[commits.CommitFile]:
    out = []
    for path, (sha256, size, key) in sorted(files.items()):
        if path in stored:
            info = stored[path]
            record_blob(session, info)
            sha256, size, key = info.sha256, info.size, info.key
        elif key is None:  # an LFS object named by the commit
            key = blob_key(sha256)
            row = session.get(Blob, key)
            if row is None or (size >= 0 and row.size != size):
                raise LfsObjectMissing(
                    f"{path}: LFS object {sha256} was not uploaded (or not whole); upload it "
                    "through the batch API first"
                )
            size = row.size
        out.append(commits.CommitFile(path, size, sha256, key, hub_write.role_of(path)))
    return out


def _blob_bytes(runtime: Runtime, key: str, limit: int) -> bytes:
    return b"".join(runtime.store.open_range(key, 0, limit))


def _base_for(
    runtime: Runtime, session: Session, repo: Repo, files: list[commits.CommitFile]
) -> Base | None:
    """The base the files are stored against (module docstring of :mod:`service.hub_write`)."""
    by_path = {f.path: f for f in files}
    if "adapter_config.json" in by_path or not any(f.role.value == "weights" for f in files):
        return None  # an adapter is stored as it is; so is a repository with no weights
    named = None
    readme = by_path.get("README.md")
    if readme is not None:
        named = hub_write.card_base_model(_blob_bytes(runtime, readme.blob_key, 1 << 20))
    if named:
        ns, _, base_name = named.rpartition("/")
        if (ns or repo.namespace) != repo.namespace or base_name == repo.name:
            return None
        try:
            return commits.base_of_repo(session, namespace=repo.namespace, name=base_name)
        except NotFound:
            return None
    if repo.base_id is not None:
        return session.get(Base, repo.base_id)
    return None


def _policy(runtime: Runtime, repo: Repo, files: list[commits.CommitFile]) -> Any:
    policy = hub_write.Policy.from_row(repo.policy)
    calib = next((f for f in files if f.path == policy.calibration_file), None)
    examples: tuple[Any, ...] = ()
    if calib is not None:
        data = _blob_bytes(runtime, calib.blob_key, 64 * hub_write.MIB)
        examples = hub_write.read_calibration(data)[: runtime.settings.max_calibration_examples]
    return hub_write.policy_params(policy, examples)


_NDJSON: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
    }
}


@router.post(
    "/api/models/{namespace}/{name}/commit/{rev}", responses=_ERRORS, openapi_extra=_NDJSON
)
async def commit(
    namespace: Namespace,
    name: Name,
    rev: Rev,
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
) -> Any:
    """``create_commit``: NDJSON lines — a header (``summary``, ``description``,
    ``parentCommit``: 412 if the branch moved past it), then ``file`` (base64),
    ``lfsFile`` (an uploaded object by sha256), ``deletedFile``, ``deletedFolder``."""
    return await _commit(
        request, runtime, caller, hub.repo_id(namespace, name), _raw_rev(request, rev)
    )


@router.post("/api/models/{name}/commit/{rev}", responses=_ERRORS, openapi_extra=_NDJSON)
async def commit_short(
    name: Name,
    rev: Rev,
    request: Request,
    runtime: RuntimeDep,
    caller: CallerDep,
) -> Any:
    """:func:`commit` for a repository of your namespace named without it."""
    return await _commit(request, runtime, caller, name, _raw_rev(request, rev))

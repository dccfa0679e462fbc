"""The Hugging Face Hub's read routes (``HF_ENDPOINT``): model info, trees, commits, refs,
whoami, and ``/{repo}/resolve/{rev}/{path}`` file downloads. What they decide is in
:mod:`service.hub`; ``docs/hub.md`` is the user's page.

Every route exists twice, for the two spellings of a Hub repo id: ``namespace/name`` and a bare
``name`` (the caller's namespace). Errors are answered in the Hub's shape (``X-Error-Code``,
``X-Error-Message``, ``{"error"}``) by :class:`HubRoute`, for whatever raised them (the key check
included), so the Hub's clients raise ``RepositoryNotFoundError``, ``RevisionNotFoundError`` and
``EntryNotFoundError`` as they do against the Hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote

import anyio
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import SlimError
from core.files import check_path
from service import hub
from service.auth import CallerDep, ReadCallerDep
from service.deps import NamespaceDep, RuntimeDep, SessionDep
from service.downloads import ByteRange, Rebuild, blob_chunks
from service.errors import HTTP_ERROR, STATUS_BY_CODE, RangeNotSatisfiable, errors
from service.file_answers import FILE_ANSWER, FILE_REQUEST, HEAD_ANSWER, file_response
from storage.blob_common import sha256_of_key
from storage.models import Base

#: Hub error headers on the JSON routes' error answers.
_HUB_ERROR_HEADERS = {
    "X-Error-Code": {
        "description": "`RepoNotFound`, `RevisionNotFound` or `EntryNotFound` (the Hub's codes).",
        "schema": {"type": "string"},
    },
    "X-Error-Message": {"description": "What went wrong.", "schema": {"type": "string"}},
}


class HubRoute(APIRoute):
    """An API route whose errors are answered the Hub's way (:func:`service.hub.hub_error`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except hub.EntryNotFound as exc:
                headers = {hub.HEADER_COMMIT: exc.commit} if exc.commit else None
                return hub.hub_error(exc.code, exc.detail, 404, headers)
            except RangeNotSatisfiable as exc:
                headers = {"Content-Range": f"bytes */{exc.size}"}
                return hub.hub_error(exc.code, exc.detail, 416, headers)
            except SlimError as exc:
                status = STATUS_BY_CODE.get(exc.code, 500)
                detail = exc.detail
                headers = dict(getattr(exc, "headers", None) or {})
                if exc.code == "unauthorized" and "authorization" in request.headers:
                    detail = f"{hub.INVALID_CREDENTIALS}: {exc.detail}"
                    headers[hub.HEADER_ERROR_MESSAGE] = hub.INVALID_CREDENTIALS
                if status >= 500:
                    raise  # the app's handlers log it and answer
                response = hub.hub_error(exc.code, detail, status)
                response.headers.update(headers)
                return response
            except RequestValidationError as exc:
                detail = "; ".join(str(e.get("msg")) for e in exc.errors()) or "invalid request"
                return hub.hub_error("validation_error", detail, 422)
            except StarletteHTTPException as exc:
                code = {404: "not_found", 405: "method_not_allowed"}.get(
                    exc.status_code, HTTP_ERROR
                )
                return hub.hub_error(code, str(exc.detail), exc.status_code)

        return route


router = APIRouter(tags=["hub"], route_class=HubRoute)

Namespace = Annotated[str, Path(description="The namespace (must be your key's).")]
Name = Annotated[str, Path(description="The repository's name.")]
Rev = Annotated[
    str,
    Path(description="A ref (`main`), a full commit id, or a unique prefix of ≥ 7 hex digits."),
]
FilePath = Annotated[str, Path(description="A file's path in the repository.")]
_JSON_ERRORS = {
    status: {**entry, "headers": _HUB_ERROR_HEADERS} for status, entry in errors(400, 404).items()
}


def _rev_and_path(request: Request, index: int, rev: str, path: str) -> tuple[str, str]:
    """The revision and file path of a ``…/{rev}/{path}`` URL, read from the raw (undecoded)
    path: the Hub's clients send a revision with ``/`` as ``%2F`` (``refs%2Fpr%2F1``), which the
    decoded path cannot tell from a folder. ``index``: the raw segment that holds the revision."""
    raw = request.scope.get("raw_path")
    if not raw:
        return rev, path
    segments = raw.decode("latin-1").split("/")
    if len(segments) <= index:
        return rev, path
    return unquote(segments[index]), unquote("/".join(segments[index + 1 :]))


# -- whoami ----------------------------------------------------------------------------------


@router.get("/api/whoami-v2", responses=errors())
def whoami(caller: CallerDep) -> hub.WhoamiPublic:
    """The key's namespace as the Hub's user (``HfApi().whoami()``)."""
    role = caller.role.value
    return hub.WhoamiPublic(
        name=caller.namespace,
        fullname=caller.namespace,
        auth={
            "type": "access_token",
            "accessToken": {
                "displayName": caller.key_prefix or "open",
                "role": "write" if role != "read" else "read",
            },
        },
    )


# -- model info ------------------------------------------------------------------------------


def _model_info(
    session: SessionDep, namespace: str, repo_id: str, rev: str | None
) -> hub.ModelInfoPublic:
    return hub.model_info(hub.resolve(session, repo_id, rev, namespace))


@router.get("/api/models/{namespace}/{name}/revision/{rev:path}", responses=_JSON_ERRORS)
def model_info_at(
    namespace: Namespace, name: Name, rev: Rev, session: SessionDep, caller_ns: NamespaceDep
) -> hub.ModelInfoPublic:
    """``HfApi().model_info(repo, revision=rev)``: the commit (`sha`) and files (`siblings`)."""
    return _model_info(session, caller_ns, hub.repo_id(namespace, name), rev)


@router.get("/api/models/{name}/revision/{rev:path}", responses=_JSON_ERRORS)
def model_info_at_short(
    name: Name, rev: Rev, session: SessionDep, caller_ns: NamespaceDep
) -> hub.ModelInfoPublic:
    """:func:`model_info_at` for a repository of your namespace named without it."""
    return _model_info(session, caller_ns, name, rev)


# -- trees -----------------------------------------------------------------------------------


def _tree(
    request: Request,
    session: SessionDep,
    namespace: str,
    repo_id: str,
    rev_index: int,
    rev: str,
    path: str,
    recursive: bool,
    cursor: int,
) -> list[hub.TreeEntryPublic] | Response:
    rev, path = _rev_and_path(request, rev_index, rev, path)
    if path:
        check_path(path)
    found = hub.resolve(session, repo_id, rev, namespace)
    entries = hub.tree(found, path, recursive=recursive)
    page = entries[cursor : cursor + hub.PAGE_SIZE]
    body = [e.model_dump(exclude_none=True) for e in page]
    headers = {hub.HEADER_COMMIT: found.commit}
    if cursor + hub.PAGE_SIZE < len(entries):
        nxt = request.url.include_query_params(cursor=cursor + hub.PAGE_SIZE)
        headers["Link"] = f'<{nxt}>; rel="next"'
    return JSONResponse(body, headers=headers)


_Recursive = Query(False, description="List every file and folder below, not only children.")
_Cursor = Query(0, ge=0, le=10**9, description="Where the page starts (from the `Link` header).")
_TREE_DOC: dict[str, Any] = {
    "responses": {
        **_JSON_ERRORS,
        200: {
            "description": f'Up to {hub.PAGE_SIZE} entries; a `Link: <…>; rel="next"` header '
            "names the next page.",
        },
    },
    "response_model": list[hub.TreeEntryPublic],
}


@router.get("/api/models/{namespace}/{name}/tree/{rev}", **_TREE_DOC)
@router.get(
    "/api/models/{namespace}/{name}/tree/{rev}/{path:path}", name="list_tree_path", **_TREE_DOC
)
def list_tree(
    namespace: Namespace,
    name: Name,
    rev: Rev,
    request: Request,
    session: SessionDep,
    caller_ns: NamespaceDep,
    path: str = "",
    recursive: bool = _Recursive,
    cursor: int = _Cursor,
) -> Any:
    """``HfApi().list_repo_tree``: the files (size, `lfs.oid` = sha256) and folders at ``path``."""
    repo_id = hub.repo_id(namespace, name)
    return _tree(request, session, caller_ns, repo_id, 6, rev, path, recursive, cursor)


@router.get("/api/models/{name}/tree/{rev}", **_TREE_DOC)
@router.get("/api/models/{name}/tree/{rev}/{path:path}", name="list_tree_path_short", **_TREE_DOC)
def list_tree_short(
    name: Name,
    rev: Rev,
    request: Request,
    session: SessionDep,
    caller_ns: NamespaceDep,
    path: str = "",
    recursive: bool = _Recursive,
    cursor: int = _Cursor,
) -> Any:
    """:func:`list_tree` for a repository of your namespace named without it."""
    return _tree(request, session, caller_ns, name, 5, rev, path, recursive, cursor)


# -- paths info ------------------------------------------------------------------------------


async def _paths_info(
    request: Request, session: SessionDep, namespace: str, repo_id: str, rev: str
) -> Response:
    raw = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        wanted = body.get("paths") if isinstance(body, dict) else None
    else:
        wanted = parse_qs(raw.decode("utf-8", errors="replace")).get("paths")
    if isinstance(wanted, str):
        wanted = [wanted]
    if not isinstance(wanted, list) or not all(isinstance(p, str) for p in wanted):
        return hub.hub_error("validation_error", "send 'paths': the file or folder paths", 422)
    if len(wanted) > hub.PAGE_SIZE:
        return hub.hub_error("validation_error", f"at most {hub.PAGE_SIZE} paths", 422)

    def lookup() -> tuple[hub.HubRevision, dict[str, hub.TreeEntryPublic]]:
        found = hub.resolve(session, repo_id, rev, namespace)
        return found, {e.path: e for e in hub.tree(found, "", recursive=True)}

    found, entries = await anyio.to_thread.run_sync(lookup)
    body = [
        entries[p.strip("/")].model_dump(exclude_none=True)
        for p in wanted
        if p.strip("/") in entries
    ]
    return JSONResponse(body, headers={hub.HEADER_COMMIT: found.commit})


@router.post("/api/models/{namespace}/{name}/paths-info/{rev}", responses=_JSON_ERRORS)
async def paths_info(
    namespace: Namespace,
    name: Name,
    rev: Rev,
    request: Request,
    session: SessionDep,
    caller: ReadCallerDep,
) -> Any:
    """``HfApi().get_paths_info``: the tree entries of the paths asked for (form field or JSON
    ``paths``); paths that do not exist are left out, as on the Hub. A read key is enough."""
    rev, _ = _rev_and_path(request, 6, rev, "")
    return await _paths_info(request, session, caller.namespace, hub.repo_id(namespace, name), rev)


@router.post("/api/models/{name}/paths-info/{rev}", responses=_JSON_ERRORS)
async def paths_info_short(
    name: Name, rev: Rev, request: Request, session: SessionDep, caller: ReadCallerDep
) -> Any:
    """:func:`paths_info` for a repository of your namespace named without it."""
    rev, _ = _rev_and_path(request, 5, rev, "")
    return await _paths_info(request, session, caller.namespace, name, rev)


# -- commits and refs ------------------------------------------------------------------------


def _commits(
    request: Request, session: SessionDep, namespace: str, repo_id: str, rev: str, cursor: int
) -> Response:
    found = hub.resolve(session, repo_id, rev, namespace)
    commits = hub.history(session, found)
    page = commits[cursor : cursor + hub.PAGE_SIZE]
    headers = {hub.HEADER_COMMIT: found.commit}
    if cursor + hub.PAGE_SIZE < len(commits):
        nxt = request.url.include_query_params(cursor=cursor + hub.PAGE_SIZE)
        headers["Link"] = f'<{nxt}>; rel="next"'
    return JSONResponse([c.model_dump() for c in page], headers=headers)


_COMMITS_DOC: dict[str, Any] = {"responses": _JSON_ERRORS, "response_model": list[hub.CommitPublic]}


@router.get("/api/models/{namespace}/{name}/commits/{rev:path}", **_COMMITS_DOC)
def list_commits(
    namespace: Namespace,
    name: Name,
    rev: Rev,
    request: Request,
    session: SessionDep,
    caller_ns: NamespaceDep,
    cursor: int = _Cursor,
) -> Any:
    """``HfApi().list_repo_commits``: the commits reachable from ``rev``, newest first."""
    return _commits(request, session, caller_ns, hub.repo_id(namespace, name), rev, cursor)


@router.get("/api/models/{name}/commits/{rev:path}", **_COMMITS_DOC)
def list_commits_short(
    name: Name,
    rev: Rev,
    request: Request,
    session: SessionDep,
    caller_ns: NamespaceDep,
    cursor: int = _Cursor,
) -> Any:
    """:func:`list_commits` for a repository of your namespace named without it."""
    return _commits(request, session, caller_ns, name, rev, cursor)


@router.get("/api/models/{namespace}/{name}/refs", responses=_JSON_ERRORS)
def list_refs(
    namespace: Namespace, name: Name, session: SessionDep, caller_ns: NamespaceDep
) -> hub.RefsPublic:
    """``HfApi().list_repo_refs``: every ref, as a branch."""
    return hub.refs(session, hub.repo_id(namespace, name), caller_ns)


@router.get("/api/models/{name}/refs", responses=_JSON_ERRORS)
def list_refs_short(name: Name, session: SessionDep, caller_ns: NamespaceDep) -> hub.RefsPublic:
    """:func:`list_refs` for a repository of your namespace named without it."""
    return hub.refs(session, name, caller_ns)


# model info at main last: `/api/models/{namespace}/{name}` would also match `{name}/refs`
@router.get("/api/models/{namespace}/{name}", responses=_JSON_ERRORS)
def model_info(
    namespace: Namespace, name: Name, session: SessionDep, caller_ns: NamespaceDep
) -> hub.ModelInfoPublic:
    """``HfApi().model_info(repo)``: ``main``'s commit (`sha`) and files (`siblings`)."""
    return _model_info(session, caller_ns, hub.repo_id(namespace, name), None)


@router.get("/api/models/{name}", responses=_JSON_ERRORS)
def model_info_short(
    name: Name, session: SessionDep, caller_ns: NamespaceDep
) -> hub.ModelInfoPublic:
    """:func:`model_info` for a repository of your namespace named without it."""
    return _model_info(session, caller_ns, name, None)


# -- file downloads --------------------------------------------------------------------------


def _resolve_file(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    namespace: str,
    repo_id: str,
    rev_index: int,
    rev: str,
    path: str,
) -> Response:
    rev, path = _rev_and_path(request, rev_index, rev, path)
    rel = check_path(path)
    found = hub.resolve(session, repo_id, rev, namespace)
    entry = found.file(rel)
    headers = {
        hub.HEADER_COMMIT: found.commit,
        hub.HEADER_LINKED_ETAG: entry.etag,
        hub.HEADER_LINKED_SIZE: str(entry.size),
    }
    stored = found.stored
    if isinstance(stored, Base) or hub.exact_blob(entry.row) is not None:
        key = entry.row.blob_key
        session.close()
        if key is None or sha256_of_key(key) is None:
            raise hub.EntryNotFound(f"the bytes of {rel!r} are no longer stored", found.commit)
        size = entry.size

        def open_chunks(byte_range: ByteRange | None) -> Iterator[bytes | memoryview]:
            return blob_chunks(runtime.store, key, byte_range)

    else:
        rebuild = Rebuild.of(session, stored)
        session.close()  # release the connection before a long stream
        size, digests = rebuild.headers(runtime.cache, rel)  # known before the first byte
        headers.update(digests)

        def open_chunks(byte_range: ByteRange | None) -> Iterator[bytes | memoryview]:
            return rebuild.open(runtime.cache, rel).chunks(byte_range)

    headers[hub.HEADER_LINKED_SIZE] = str(size)
    response = file_response(request, size=size, etag=entry.etag, open_chunks=open_chunks)
    response.headers.update(headers)
    return response


_FILE_GET: dict[str, Any] = {
    "response_class": Response,
    "responses": {**errors(400, 404), **FILE_ANSWER},
    "openapi_extra": FILE_REQUEST,
}
_FILE_HEAD: dict[str, Any] = {
    "response_class": Response,
    "responses": {**errors(400, 404), **HEAD_ANSWER},
    "openapi_extra": FILE_REQUEST,
}


@router.head("/{namespace}/{name}/resolve/{rev}/{path:path}", name="hub_head_file", **_FILE_HEAD)
@router.get("/{namespace}/{name}/resolve/{rev}/{path:path}", **_FILE_GET)
def resolve_file(
    namespace: Namespace,
    name: Name,
    rev: Rev,
    path: FilePath,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    caller_ns: NamespaceDep,
) -> Response:
    """``hf_hub_download``: one file of the revision (a checkpoint's rebuilt as it streams).

    `X-Repo-Commit` = the commit; `ETag` = `X-Linked-Etag` = the file's sha256 (quoted);
    `X-Linked-Size` = its size; `Range` honoured (206)."""
    repo_id = hub.repo_id(namespace, name)
    return _resolve_file(request, session, runtime, caller_ns, repo_id, 4, rev, path)


@router.head("/{name}/resolve/{rev}/{path:path}", name="hub_head_file_short", **_FILE_HEAD)
@router.get("/{name}/resolve/{rev}/{path:path}", **_FILE_GET)
def resolve_file_short(
    name: Name,
    rev: Rev,
    path: FilePath,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    caller_ns: NamespaceDep,
) -> Response:
    """:func:`resolve_file` for a repository of your namespace named without it."""
    return _resolve_file(request, session, runtime, caller_ns, name, 3, rev, path)

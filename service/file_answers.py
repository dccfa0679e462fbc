"""Shared by the base and checkpoint routes: streamed uploads, ranged file answers and the
OpenAPI descriptions of the file routes (the routers live in :mod:`service.routes`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio.to_thread
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from core.files import check_path
from runtime.process import Runtime
from service.downloads import ByteRange, parse_range
from service.schemas import FilePublic
from service.streaming import produced_in_thread
from service.uploads import receive_file, role_of
from storage import repo
from storage.uploads import check_base_open, check_checkpoint_open, record_upload

#: What a file answer streams: bytes, or views of a rebuilt piece (no copy).
Chunk = bytes | memoryview

SHA256_HEADER = "x-slim-sha256"

# -- OpenAPI descriptions of the file routes (docs/api.md says the same in prose) ---------------

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorPublic"}}}


def _header(name: str, description: str, **schema: object) -> dict[str, object]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", **schema},
    }


#: OpenAPI of an upload (PUT): a raw streamed request body and the optional checksum header.
RAW_BODY: dict[str, object] = {
    "requestBody": {
        "required": True,
        "description": "The file's bytes, streamed (any size up to the server's limit).",
        "content": _BINARY,
    },
    "parameters": [
        _header(
            "X-Slim-Sha256",
            "The sha256 (hex) you expect the body to hash to; a body that does not is "
            "refused with 400 `checksum_mismatch` and nothing is kept.",
            pattern="^[0-9a-fA-F]{64}$",
        ),
    ],
}

#: OpenAPI of the request headers a download (GET or HEAD) honours.
FILE_REQUEST: dict[str, object] = {
    "parameters": [
        _header(
            "Range",
            "One byte range, `bytes=a-b`, `bytes=a-` or `bytes=-n`: answered 206 with those "
            "bytes only (a checkpoint file rebuilds only the tensors the range touches). A "
            "malformed or multi-range value is ignored (the whole file, 200); a range starting "
            "past the end is 416.",
            example="bytes=0-1023",
        ),
        _header(
            "If-Range",
            "An ETag: the Range is honoured only if it is still the file's ETag (else the whole "
            "file is sent, 200) — how a resumed download avoids mixing two versions.",
        ),
        _header(
            "If-None-Match",
            "An ETag (or `*`): 304 with no body when it matches the file's ETag.",
        ),
    ]
}

_ETAG = {
    "description": "The sha256 of the file's bytes, quoted (for a checkpoint file: of the "
    "rebuilt file, as recorded when the delta was written; absent with `scale` ≠ 1).",
    "schema": {"type": "string"},
}
_ACCEPT_RANGES = {"description": "Always `bytes`.", "schema": {"type": "string"}}
_LENGTH = {"description": "Bytes of the answer's body.", "schema": {"type": "integer"}}
_CONTENT_RANGE = {
    "description": "`bytes a-b/size`: which bytes of the file the body holds.",
    "schema": {"type": "string"},
}


def _file_answer(*, body: bool) -> dict[int | str, dict[str, object]]:
    whole: dict[str, object] = {
        "description": "The file's bytes." if body else "The file's size and ETag (no body).",
        "headers": {"ETag": _ETAG, "Accept-Ranges": _ACCEPT_RANGES, "Content-Length": _LENGTH},
    }
    part: dict[str, object] = {
        "description": "The requested byte range." if body else "The range's size (no body).",
        "headers": {
            "Content-Range": _CONTENT_RANGE,
            "ETag": _ETAG,
            "Accept-Ranges": _ACCEPT_RANGES,
            "Content-Length": _LENGTH,
        },
    }
    if body:
        whole["content"] = _BINARY
        part["content"] = _BINARY
    return {
        200: whole,
        206: part,
        304: {
            "description": "Not modified: If-None-Match matched the ETag (no body).",
            "headers": {"ETag": _ETAG},
        },
        416: {
            "description": "Range not satisfiable (`range_not_satisfiable`): the range starts "
            "past the end of the file.",
            "headers": {
                "Content-Range": {
                    "description": "`bytes */size`: the file's size.",
                    "schema": {"type": "string"},
                }
            },
            **({"content": _ERROR} if body else {}),
        },
    }


#: OpenAPI ``responses=`` of a streamed file answer (GET) and of its HEAD.
FILE_ANSWER = _file_answer(body=True)
HEAD_ANSWER = _file_answer(body=False)


async def upload(
    request: Request,
    runtime: Runtime,
    namespace: str,
    path: str,
    *,
    base_id: str | None = None,
    checkpoint_id: str | None = None,
) -> FilePublic:
    """Check the owner takes files, stream the body into the store, then record the row.

    ``base_id`` / ``checkpoint_id`` may be a name (:func:`storage.repo.get_base`'s rule); it is
    resolved to the id once, before the body is read, and the row is recorded under that id.
    """
    rel = check_path(path)
    settings = runtime.settings

    def precheck() -> tuple[str | None, str | None]:
        with runtime.sessions() as session:
            if base_id is not None:
                owner = repo.get_base(session, base_id, namespace=namespace).id
                check_base_open(session, owner, namespace)
                return owner, None
            assert checkpoint_id is not None
            owner = repo.get_checkpoint(session, checkpoint_id, namespace=namespace).id
            check_checkpoint_open(session, owner, namespace, rel, settings.max_files_per_checkpoint)
            return None, owner

    base_id, checkpoint_id = await anyio.to_thread.run_sync(precheck)
    length = request.headers.get("content-length")
    info = await receive_file(
        request.stream(),
        runtime.store,
        path=rel,
        max_bytes=settings.max_file_bytes,
        max_header=settings.max_header_bytes,
        declared_size=int(length) if length and length.isdigit() else None,
        expected_sha256=request.headers.get(SHA256_HEADER),
        max_tensors=settings.max_tensors_per_file,
    )
    row = await anyio.to_thread.run_sync(
        lambda: record_upload(
            runtime.sessions,
            info,
            path=rel,
            role=role_of(rel),
            namespace=namespace,
            base_id=base_id,
            checkpoint_id=checkpoint_id,
            max_files=settings.max_files_per_checkpoint,
        )
    )
    return FilePublic.from_row(row)


def file_response(
    request: Request,
    *,
    size: int,
    etag: str | None,
    open_chunks: Callable[[ByteRange | None], Iterator[Chunk]],
) -> Response:
    """A streamed file answer honouring HEAD, If-None-Match, If-Range and Range.

    ``open_chunks`` is called only when bytes are actually sent.
    """
    headers = {"Accept-Ranges": "bytes"}
    if etag is not None:
        headers["ETag"] = etag
        if request.headers.get("if-none-match") in (etag, "*"):
            return Response(status_code=304, headers=headers)
    byte_range = parse_range(request.headers.get("range"), size)
    if_range = request.headers.get("if-range")
    if byte_range is not None and if_range is not None and if_range != etag:
        byte_range = None  # the client's partial copy is of another version: send it whole
    status = 200
    length = size
    if byte_range is not None:
        status = 206
        length = byte_range.length
        headers["Content-Range"] = byte_range.content_range
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type="application/octet-stream")
    return StreamingResponse(
        produced_in_thread(_started(open_chunks(byte_range))),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


def _started(chunks: Iterator[Chunk]) -> Iterator[Chunk]:
    """Read the first chunk now (in the route's thread), so that a problem found at once — a
    missing blob, a corrupted header frame (``integrity_error``) — is a JSON error answer
    instead of a cut stream; then stream the rest, closing the source when done."""
    try:
        first = next(chunks, None)
    except BaseException:
        _close(chunks)
        raise
    return _chain(first, chunks)


def _chain(first: Chunk | None, rest: Iterator[Chunk]) -> Iterator[Chunk]:
    try:
        if first is not None:
            yield first
            yield from rest
    finally:
        _close(rest)


def _close(chunks: Iterator[Chunk]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()

"""Shared by the base and checkpoint routes: streamed uploads and ranged file answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio.to_thread
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from service.downloads import ByteRange, parse_range
from service.runtime import Runtime
from service.schemas import FilePublic
from service.streaming import produced_in_thread
from service.uploads import (
    check_base_open,
    check_checkpoint_open,
    clean_path,
    receive_file,
    record_upload,
)

#: OpenAPI description of a raw streamed request body.
RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "The file's bytes, streamed (any size up to the server's limit).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}

#: OpenAPI description of a streamed file answer.
FILE_ANSWER: dict[int | str, dict[str, object]] = {
    200: {
        "description": "The file's bytes (ETag = its sha256; Range honoured).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {"description": "The requested byte range (Content-Range says which)."},
    304: {"description": "Not modified (If-None-Match matched the ETag)."},
}

SHA256_HEADER = "x-slim-sha256"


async def upload(
    request: Request,
    runtime: Runtime,
    namespace: str,
    path: str,
    *,
    base_id: str | None = None,
    checkpoint_id: str | None = None,
) -> FilePublic:
    """Check the owner takes files, stream the body into the store, then record the row."""
    rel = clean_path(path)
    settings = runtime.settings

    def precheck() -> None:
        with runtime.sessions() as session:
            if base_id is not None:
                check_base_open(session, base_id, namespace)
            else:
                assert checkpoint_id is not None
                check_checkpoint_open(
                    session, checkpoint_id, namespace, rel, settings.max_files_per_checkpoint
                )

    await anyio.to_thread.run_sync(precheck)
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
    open_chunks: Callable[[ByteRange | None], Iterator[bytes]],
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


def _started(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Read the first chunk now (in the route's thread), so that a problem found at once — a
    missing blob, a corrupted header frame (``integrity_error``) — is a JSON error answer
    instead of a cut stream; then stream the rest, closing the source when done."""
    try:
        first = next(chunks, None)
    except BaseException:
        _close(chunks)
        raise
    return _chain(first, chunks)


def _chain(first: bytes | None, rest: Iterator[bytes]) -> Iterator[bytes]:
    try:
        if first is not None:
            yield first
            yield from rest
    finally:
        _close(rest)


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()

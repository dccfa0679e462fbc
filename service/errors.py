"""One place that turns exceptions into HTTP answers ``{"code": ..., "detail": ...}``.

Codes are stable; clients branch on them. Every error the project raises on purpose is a
:class:`core.errors.SlimError` (the core's, the storage layer's and the service's own
:class:`ApiError`), each class with one code; :data:`STATUS_BY_CODE` is the one table from
code to HTTP status, for those and for the answers the handlers below build themselves.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from core.errors import SlimError

log = logging.getLogger("slim.service")


class ErrorPublic(BaseModel):
    """Every error answer: a stable code and a message that says what to do next."""

    code: str
    detail: str


class ApiError(SlimError):
    """An error raised by the service itself (not by core or storage); its HTTP status is
    :data:`STATUS_BY_CODE` of its code."""

    code = "api_error"
    headers: ClassVar[dict[str, str] | None] = None


class Truncated(ApiError):
    code = "truncated"


class ChecksumMismatch(ApiError):
    """The body does not hash to the ``X-Slim-Sha256`` it was sent with."""

    code = "checksum_mismatch"


class TooManyTensors(ApiError):
    code = "too_many_tensors"


class NoWeights(ApiError):
    code = "no_weights"


class NotReady(ApiError):
    code = "not_ready"


class OptionsDiffer(ApiError):
    """A checkpoint of that name exists with other compression options."""

    code = "options_differ"


class RangeNotSatisfiable(ApiError):
    code = "range_not_satisfiable"

    def __init__(self, detail: str, size: int) -> None:
        super().__init__(detail)
        self.size = size


#: Sent with 503 answers: the outage is expected to be short.
RETRY_AFTER = {"Retry-After": "2"}

#: Every error code the API answers with, and its HTTP status: the one table.
STATUS_BY_CODE: dict[str, int] = {
    # -- core (core.errors) --
    "slim_error": 400,
    "invalid_safetensors": 400,  # a *.safetensors upload is not a valid safetensors file
    "header_too_large": 400,  # its header is over the configured limit
    "invalid_checkpoint": 400,  # the uploaded directory is unusable (e.g. a bad shard index)
    "invalid_path": 400,  # a file path breaks core.files.check_path
    "invalid_adapter": 400,  # a PEFT adapter that cannot be read or merged (core.peft_config)
    "base_mismatch": 400,  # the fine-tune's tensors do not fit the base
    "invalid_calibration": 400,  # calibration examples unusable for the chosen evaluation
    "invalid_argument": 400,  # a parameter is out of range or contradicts another one
    "evaluation_unavailable": 400,  # the requested evaluation cannot run for this model
    "cancelled": 409,
    "integrity_error": 500,  # stored bytes do not match their recorded hash
    "invalid_delta": 500,  # a stored delta is malformed
    "unsupported_format_version": 500,
    # -- storage (storage.errors) --
    "storage_error": 500,
    "invalid_key": 400,
    "not_found": 404,  # no such base, checkpoint, job, file or route (or another namespace's)
    "blob_not_found": 404,  # a row's bytes are missing from the blob store
    "conflict": 409,  # the operation contradicts the current state
    "already_exists": 409,  # the name is taken in the namespace
    "blob_too_large": 413,  # the body is over the file size limit
    "too_many_files": 400,  # a checkpoint would hold more files than the limit
    "storage_unavailable": 503,  # the object store is unreachable; retry later
    "storage_full": 507,  # the blob store's disk is full; nothing was stored
    "repo_not_found": 404,  # no repository of that name in the namespace
    "revision_not_found": 404,  # the repository has no such ref, commit id or prefix
    "entry_not_found": 404,  # Hub routes: the revision has no such file or folder
    "ambiguous_revision": 400,  # a commit id prefix that starts several commit ids
    "parent_mismatch": 409,  # the ref moved since the parent the writer built on
    # -- service (ApiError and the handlers below) --
    "api_error": 400,
    "bad_commit": 400,  # Hub: a commit payload (NDJSON) that cannot be read
    "bad_repo_name": 400,  # Hub: a repository name the Hub's rules refuse
    "bad_upload_url": 403,  # Hub: an LFS upload URL with a bad or expired signature
    "repo_exists": 409,  # Hub: create_repo of a name already taken
    "parent_commit_mismatch": 412,  # Hub: the commit's parentCommit is not the head any more
    "lfs_object_missing": 422,
    "xet_unsupported": 404,  # Hub: Xet storage asked for; uploads go through Git LFS  # Hub: a commit names an LFS object that was not uploaded
    "truncated": 400,  # the body ended before the header or the data it declares
    "checksum_mismatch": 400,
    "client_disconnected": 400,  # the client closed the connection mid-upload (nothing stored)
    "too_many_tensors": 400,  # a safetensors header lists more tensors than the limit
    "no_weights": 400,  # commit with no *.safetensors file
    "unauthorized": 401,  # no API key, or an unknown or revoked one
    "forbidden": 403,  # the key's role is too low for the request
    "method_not_allowed": 405,
    "request_timeout": 408,  # the request body stalled for SLIM_REQUEST_TIMEOUT_SECONDS
    "not_ready": 409,  # the checkpoint has no stored delta yet
    "options_differ": 409,  # the name is taken by a checkpoint with other options
    "body_too_large": 413,  # a JSON body is over SLIM_MAX_JSON_BODY_BYTES
    "unsupported_file": 415,  # a file the service does not read (pickled weights)
    "range_not_satisfiable": 416,  # a Range outside the file
    "validation_error": 422,  # the request does not match its schema
    "internal_error": 500,  # a bug; the log has the traceback
    "unavailable": 503,  # the database is unreachable; retry later
    "timeout": 504,  # the answer did not start within SLIM_REQUEST_TIMEOUT_SECONDS
}
#: Other statuses Starlette raises (its own HTTPException) are answered as ``http_error``.
HTTP_ERROR = "http_error"

#: OpenAPI ``responses=`` entries for the error statuses a route can answer.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorPublic, "description": text}
    for status, text in (
        (400, "Bad input (see the code)"),
        (401, "No API key, or an unknown or revoked one"),
        (403, "The key's role is too low"),
        (404, "Not found"),
        (409, "Conflict with the current state"),
        (412, "The branch moved past the commit's parentCommit (Hub commits)"),
        (413, "Body over the size limit"),
        (415, "A file the service does not read (pickled weights: unsupported_file)"),
        (416, "Range not satisfiable"),
        (422, "Request does not match its schema"),
        (500, "Server error"),
        (503, "Database or object store unavailable"),
    )
}


def errors(*statuses: int) -> dict[int | str, dict[str, object]]:
    """The OpenAPI error responses of a route (always 401, 403, 422, 500 and 503)."""
    wanted = {*statuses, 401, 403, 422, 500, 503}
    return {s: ERROR_RESPONSES[s] for s in sorted(wanted)}


def error_response(
    code: str, detail: str, headers: dict[str, str] | None = None, *, status: int | None = None
) -> JSONResponse:
    """The JSON error answer every handler sends (status: :data:`STATUS_BY_CODE` of the code)."""
    if status is None:
        status = STATUS_BY_CODE[code]
    return JSONResponse({"code": code, "detail": detail}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the exception handlers of the whole app."""

    @app.exception_handler(SlimError)
    async def _slim(_: Request, exc: SlimError) -> JSONResponse:
        status = STATUS_BY_CODE.get(exc.code)
        if status is None:  # a code missing from the table is a bug
            log.error("error code %r has no HTTP status; answering 500", exc.code)
            status = 500
        elif status >= 500:
            log.error("%s: %s", exc.code, exc.detail)
        headers = dict(exc.headers) if isinstance(exc, ApiError) and exc.headers else None
        if isinstance(exc, RangeNotSatisfiable):
            headers = {"Content-Range": f"bytes */{exc.size}"}
        elif status in (503, 507):
            headers = RETRY_AFTER
        return error_response(exc.code, exc.detail, headers, status=status)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        log.info("client disconnected mid-request; nothing was stored")
        return error_response(
            "client_disconnected", "the body ended early: the connection was closed"
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        detail = "; ".join(parts) or "invalid request"
        return error_response("validation_error", f"{detail}; see /docs for the schema")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, HTTP_ERROR)
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = "no such route; the API is described at /docs"
        headers = getattr(exc, "headers", None)
        return error_response(code, detail, headers, status=exc.status_code)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return error_response(
            "unavailable",
            "the database is unreachable; retry in a few seconds",
            RETRY_AFTER,
        )

    @app.exception_handler(DataError)
    async def _db_data(_: Request, exc: DataError) -> JSONResponse:
        log.info("database refused a value: %s", exc.orig)
        return error_response(
            "invalid_argument",
            "a value in the request cannot be stored or looked up (a NUL character, or a "
            "number or string out of range); correct it and retry",
        )

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(
                "unavailable",
                "the database connection dropped; retry in a few seconds",
                RETRY_AFTER,
            )
        log.exception("database error", exc_info=exc)
        return error_response("internal_error", "unexpected database error; see the log")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            "internal_error", f"unexpected {type(exc).__name__}; the server log has details"
        )

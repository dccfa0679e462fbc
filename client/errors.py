"""The SDK's error tree: every server answer ``{"code", "detail"}`` (and every mistake the client
finds itself) becomes an :class:`ApiError` subclass that keeps both; ``code`` is stable."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from client.models import Job

__all__ = [
    "AlreadyExists",
    "ApiError",
    "BadRequest",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "IntegrityError",
    "JobFailed",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
    "error_from_response",
]


class ApiError(Exception):
    """An error the server answered with (or the client found); ``code`` is stable."""

    code = "api_error"

    def __init__(self, detail: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.status = status

    def __str__(self) -> str:
        return f"[{self.code}] {self.detail}"


class BadRequest(ApiError):
    code = "bad_request"


class Unauthorized(ApiError):
    code = "unauthorized"


class Forbidden(ApiError):
    code = "forbidden"


class NotFound(ApiError):
    code = "not_found"


class Conflict(ApiError):
    code = "conflict"


class AlreadyExists(Conflict):
    code = "already_exists"


class NotReady(Conflict):
    code = "not_ready"


class PayloadTooLarge(ApiError):
    code = "blob_too_large"


class ValidationFailed(ApiError):
    code = "validation_error"


class ServerError(ApiError):
    code = "internal_error"


class IntegrityError(ServerError):
    """Bytes do not hash to what was recorded (on the server, or checked by this client)."""

    code = "integrity_error"


class Unavailable(ServerError):
    code = "unavailable"


class ConnectionFailed(ApiError):
    """The server could not be reached at all."""

    code = "connection_error"


class JobFailed(ApiError):
    """A job that was waited for ended failed or cancelled; ``code`` is the job's error code."""

    code = "job_failed"

    def __init__(self, job: Job) -> None:
        code = job.error_code or ("cancelled" if job.state == "cancelled" else self.code)
        detail = job.error_detail or f"job {job.id} ended {job.state}"
        super().__init__(f"job {job.id} {job.state}: {detail}", code=code)
        self.job = job


_BY_CODE: dict[str, type[ApiError]] = {
    "not_found": NotFound,
    "blob_not_found": NotFound,
    "already_exists": AlreadyExists,
    "not_ready": NotReady,
    "conflict": Conflict,
    "blob_too_large": PayloadTooLarge,
    "validation_error": ValidationFailed,
    "integrity_error": IntegrityError,
    "unavailable": Unavailable,
    "storage_unavailable": Unavailable,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
}
_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    503: Unavailable,
}


def error_from_response(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` for an error answer: the class from the server's ``code`` (else
    from the status), the code and detail as sent (``http_<status>`` and the body's start when
    the answer is not Slimstore's JSON, e.g. from a proxy). The body must have been read."""
    status = response.status_code
    code: str | None = None
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            code = body.get("code") if isinstance(body.get("code"), str) else None
            detail = str(body.get("detail") or "")
    except (ValueError, UnicodeDecodeError):
        pass
    if not detail:
        text = response.text.strip() if response.content else ""
        detail = text[:300] or f"HTTP {status} from {response.request.url}"
    cls = _BY_CODE.get(code or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else BadRequest
    return cls(detail, code=code or f"http_{status}", status=status)

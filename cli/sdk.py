"""A small typed Python SDK for the Slimstore API (v1), built on httpx.

Example:
    >>> from cli.sdk import SlimClient
    >>> with SlimClient("http://127.0.0.1:8000", api_key=None) as slim:  # doctest: +SKIP
    ...     base, _ = slim.push_base("all-MiniLM-L6-v2/", name="minilm")
    ...     ckpt, job, _ = slim.push("sst2-ft/", base="minilm", method="magnitude", keep=0.05)
    ...     slim.wait(job.id)
    ...     slim.pull(ckpt.id, "sst2-pulled/")

Transfers resume. A push re-sends only the files whose sha256 differs from what the server
lists (``GET …/files``); a pull continues each ``<file>.incomplete`` with ``Range`` +
``If-Range`` and moves it into place only once its sha256 matches the ETag (the sha256 the
server recorded when the delta was written). :meth:`SlimClient.pull_local` downloads only the
delta and rebuilds the checkpoint against a base cached once per base manifest.

Every request sends ``Authorization: Bearer <api_key>`` when a key is configured. Server errors
``{"code", "detail"}`` become :class:`ApiError` subclasses that keep both (the ``slim`` command
prints them as one line and exits 2).

Checkpoints and bases can be named by id, by name, or by a unique id prefix (``slim ls`` shows
the first 8 characters).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx

__all__ = [
    "AlreadyExists",
    "ApiError",
    "BadRequest",
    "Base",
    "Checkpoint",
    "Conflict",
    "ConnectionFailed",
    "FileInfo",
    "Forbidden",
    "IntegrityError",
    "Job",
    "JobFailed",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "PullReport",
    "PushReport",
    "ServerError",
    "SlimClient",
    "Stats",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Bytes per read/write of a transfer.
CHUNK_SIZE = 1 << 20
#: Suffix of a partly downloaded file (resumed with Range by the next pull).
INCOMPLETE = ".incomplete"
#: Directory names a push never uploads (VCS and download caches).
SKIP_DIRS = frozenset({".git", ".cache", ".huggingface", "__pycache__"})
#: File name endings a push leaves out: formats the server never reads and refuses (415
#: ``unsupported_file``) — pickled weights and other pickles. The server's list
#: (``service.uploads.UNREAD_SUFFIXES``) is the rule; this copy only spares the upload of
#: bytes that would be refused (the SDK imports no server package).
UNREAD_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".dill")
#: Marker that says a cached base directory is complete and verified.
BASE_MARKER = ".slim-base.json"

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_MIN_PREFIX = 4
_PAGE = 1000


# -- the error tree ------------------------------------------------------------------------------


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


# -- typed answers -------------------------------------------------------------------------------

T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], **extra: Any) -> T:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in data.items() if k in names}
    values.update(extra)
    if "raw" in names:
        values["raw"] = data
    return cls(**values)


@dataclass(frozen=True)
class FileInfo:
    """One stored file of a base or checkpoint."""

    path: str
    size: int
    sha256: str
    role: str = "aux"
    stored: bool = True
    recon_sha256: str | None = None

    @property
    def pull_sha256(self) -> str:
        """The sha256 a pulled copy has (the rebuilt file's, for a compressed weight file)."""
        return self.recon_sha256 or self.sha256


@dataclass(frozen=True)
class Base:
    id: str
    name: str
    state: str
    total_bytes: int = 0
    num_params: int | None = None
    manifest_sha256: str | None = None
    namespace: str = "default"
    created_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Checkpoint:
    id: str
    name: str
    base_id: str
    state: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    original_bytes: int = 0
    stored_bytes: int | None = None
    ratio: float | None = None
    bits_per_param: float | None = None
    num_params: int | None = None
    fitness: dict[str, Any] | None = None
    search_seconds: float | None = None
    trace: Any = None
    derived_from: Any = None
    error: str | None = None
    namespace: str = "default"
    created_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def fidelity(self) -> float | None:
        value = (self.fitness or {}).get("fidelity")
        return float(value) if isinstance(value, int | float) else None

    @property
    def keep(self) -> float | None:
        return self.params.get("keep")


@dataclass(frozen=True)
class JobProgress:
    phase: str | None = None
    generation: int | None = None
    generations: int | None = None
    best_fitness: float | None = None
    evaluations: int | None = None


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    checkpoint_id: str
    state: str
    attempts: int = 0
    max_attempts: int = 0
    progress: JobProgress = field(default_factory=JobProgress)
    error_code: str | None = None
    error_detail: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.state not in ("queued", "running")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        error = data.get("error") or {}
        return _build(
            cls,
            data,
            progress=_build(JobProgress, data.get("progress") or {}),
            error_code=error.get("code"),
            error_detail=error.get("detail"),
        )


@dataclass(frozen=True)
class Stats:
    logical_bytes: int
    stored_bytes: int
    ratio: float | None
    num_bases: int
    num_checkpoints: int
    num_blobs: int = 0
    checkpoints_by_state: dict[str, int] = field(default_factory=dict)
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class PushReport:
    """What a push did: files sent, files skipped (already stored with the same sha256),
    files left out (formats the server does not read, e.g. ``pytorch_model.bin``) and the
    server's warnings about the checkpoint (e.g. stored exact, or a loss not measured)."""

    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    seconds: float = 0.0
    left_out: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PulledFile:
    path: str
    size: int
    sha256: str
    resumed_from: int = 0  # bytes already there from an interrupted pull (Range used when > 0)
    skipped: bool = False  # already complete and verified


@dataclass
class PullReport:
    files: list[PulledFile] = field(default_factory=list)
    bytes_received: int = 0
    seconds: float = 0.0
    local: bool = False
    delta_bytes: int = 0  # --local: size of the delta fetched (0 when cached)
    base_bytes: int = 0  # --local: bytes of the base downloaded into the cache (0 when cached)


class Progress(Protocol):
    """Transfer progress: one task at a time, in bytes."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class _NoProgress:
    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


# -- local files ---------------------------------------------------------------------------------


def local_files(directory: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """Files of a model directory as (posix relative path, path), sorted; skips VCS and cache
    directories and leftovers of interrupted pulls."""
    root = Path(directory)
    if not root.is_dir():
        raise BadRequest(f"{root} is not a directory; pass a model directory", code="invalid_path")
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or not path.is_file():
            continue
        if path.name.endswith(INCOMPLETE):
            continue
        out.append((rel.as_posix(), path))
    if not out:
        raise BadRequest(f"{root} holds no files", code="invalid_checkpoint")
    return out


def split_unread(
    files: list[tuple[str, Path]],
) -> tuple[list[tuple[str, Path]], list[str]]:
    """``files`` without those the server does not read (:data:`UNREAD_SUFFIXES`), and the
    relative paths of those left out."""
    keep = [(rel, p) for rel, p in files if not rel.lower().endswith(UNREAD_SUFFIXES)]
    return keep, [rel for rel, _ in files if rel.lower().endswith(UNREAD_SUFFIXES)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(entries: Iterable[tuple[str, str]]) -> str:
    """The server's identity of a file set: sha256 over sorted ``path\\0sha256\\n`` lines."""
    h = hashlib.sha256()
    for path, digest in sorted(entries):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()


def read_calibration(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``{"text": ..., "label": ...}`` JSON lines as the API's calibration list."""
    examples = []
    try:
        # JSON lines end at "\n" only: str.splitlines() also splits at U+0085/U+2028, which
        # real texts (tweets) contain inside their JSON strings
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as exc:
        raise BadRequest(
            f"cannot read calibration file {path}: {exc.strerror}", code="invalid_calibration"
        ) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise BadRequest(
                f'{path}:{number} is not JSON; write one {{"text": ..., "label": ...}} per line',
                code="invalid_calibration",
            ) from exc
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise BadRequest(
                f'{path}:{number} needs a "text" string (and optionally a "label")',
                code="invalid_calibration",
            )
        examples.append({"text": item["text"], "label": item.get("label")})
    if not examples:
        raise BadRequest(f"{path} holds no examples", code="invalid_calibration")
    return examples


def default_cache_dir() -> Path:
    """``$SLIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/slimstore``, else ``~/.cache/slimstore``."""
    if env := os.environ.get("SLIM_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slimstore"


def _quote(path: str) -> str:
    """A relative file path as URL path segments (each percent-encoded)."""
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


# -- the client ----------------------------------------------------------------------------------


class SlimClient:
    """A Slimstore server: push, pull, list, describe, delete, follow jobs, merge.

    Args:
        url: the server (default ``$SLIM_URL`` or http://127.0.0.1:8000).
        api_key: sent as ``Authorization: Bearer`` (default ``$SLIM_API_KEY``; none if unset).
        timeout: seconds to wait for a connection or for the next bytes of an answer.
    """

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("SLIM_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("SLIM_API_KEY") or None
        headers = {"User-Agent": "slimstore-client/1"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport or httpx.HTTPTransport(retries=2),
            follow_redirects=False,
        )

    def __enter__(self) -> SlimClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise self._error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _unreachable(self, exc: Exception) -> ConnectionFailed:
        if isinstance(exc, httpx.TimeoutException):
            return ConnectionFailed(
                f"the Slimstore server at {self.url} stopped answering ({type(exc).__name__}); "
                "run the command again — transfers resume where they stopped"
            )
        if isinstance(exc, httpx.ConnectError):
            return ConnectionFailed(
                f"cannot reach the Slimstore server at {self.url} ({exc}); start one with "
                "`slim serve` or point --url / SLIM_URL at it"
            )
        return ConnectionFailed(
            f"the connection to {self.url} broke ({type(exc).__name__}: {exc}); run the "
            "command again — transfers resume where they stopped"
        )

    def _error(self, response: httpx.Response) -> ApiError:
        response.read()
        error = error_from_response(response)
        if isinstance(error, Unauthorized) and not self.api_key:
            error.detail += " (no API key was sent: pass --api-key or set SLIM_API_KEY)"
        return error

    def _pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self._json("GET", path, params={**params, "limit": _PAGE, "offset": offset})
            yield from page["data"]
            if len(page["data"]) < _PAGE:
                return
            offset += _PAGE

    # -- bases ---------------------------------------------------------------------------------

    def list_bases(self) -> list[Base]:
        return [_build(Base, b) for b in self._pages("/v1/bases")]

    def get_base(self, ref: str) -> Base:
        """A base by id, name or unique id prefix."""
        if _UUID.match(ref):
            return _build(Base, self._json("GET", f"/v1/bases/{ref}"))
        return _pick(self.list_bases(), ref, "base", "slim base ls")

    def base_files(self, base_id: str) -> list[FileInfo]:
        data = self._json("GET", f"/v1/bases/{base_id}/files")["data"]
        return [_build(FileInfo, f) for f in data]

    def push_base(
        self, directory: str | os.PathLike[str], name: str, *, progress: Progress | None = None
    ) -> tuple[Base, PushReport]:
        """Upload a base model directory and commit it (resumes an interrupted push of the same
        name; a no-op when a ready base of that name holds the same files).

        Raises:
            AlreadyExists: a ready base of that name holds other files.
        """
        files, left_out = split_unread(local_files(directory))
        existing = next((b for b in self.list_bases() if b.name == name), None)
        if existing is not None and existing.state == "ready":
            local = manifest_sha256((rel, sha256_file(p)) for rel, p in files)
            if local != existing.manifest_sha256:
                raise AlreadyExists(
                    f"base {name!r} already exists with other files; pick another --name "
                    "(or delete it with `slim base rm` once no checkpoint depends on it)"
                )
            return existing, PushReport(skipped=[rel for rel, _ in files], left_out=left_out)
        base = existing or _build(Base, self._json("POST", "/v1/bases", json={"name": name}))
        report = self._upload(f"/v1/bases/{base.id}", files, progress)
        report.left_out = left_out
        committed = _build(Base, self._json("POST", f"/v1/bases/{base.id}/commit"))
        return committed, report

    def delete_base(self, ref: str) -> Base:
        """Delete a base (409 ``conflict`` while checkpoints are stored against it)."""
        base = self.get_base(ref)
        self._request("DELETE", f"/v1/bases/{base.id}")
        return base

    # -- checkpoints ---------------------------------------------------------------------------

    def list_checkpoints(
        self, base: str | None = None, state: str | None = None
    ) -> list[Checkpoint]:
        params: dict[str, Any] = {}
        if base is not None:
            params["base_id"] = self.get_base(base).id
        if state is not None:
            params["state"] = state
        return [_build(Checkpoint, c) for c in self._pages("/v1/checkpoints", **params)]

    def get_checkpoint(self, ref: str) -> Checkpoint:
        """A checkpoint (with its search trace) by id, name or unique id prefix."""
        if not _UUID.match(ref):
            ref = _pick(self.list_checkpoints(), ref, "checkpoint", "slim ls").id
        return _build(Checkpoint, self._json("GET", f"/v1/checkpoints/{ref}"))

    def checkpoint_files(self, checkpoint_id: str) -> list[FileInfo]:
        data = self._json("GET", f"/v1/checkpoints/{checkpoint_id}/files")["data"]
        return [_build(FileInfo, f) for f in data]

    def delete_checkpoint(self, ref: str) -> Checkpoint:
        ckpt = self.get_checkpoint(ref)
        self._request("DELETE", f"/v1/checkpoints/{ckpt.id}")
        return ckpt

    def create_checkpoint(self, **body: Any) -> Checkpoint:
        return _build(Checkpoint, self._json("POST", "/v1/checkpoints", json=body))

    def commit(self, checkpoint_id: str) -> Job:
        """Queue the compression of an uploaded checkpoint."""
        return Job.from_json(self._json("POST", f"/v1/checkpoints/{checkpoint_id}/commit"))

    def push(
        self,
        directory: str | os.PathLike[str],
        base: str,
        *,
        name: str | None = None,
        method: str | None = None,
        keep: float | None = None,
        min_fidelity: float | None = None,
        value_bits: int | None = None,
        evaluation: str | None = None,
        calibration: str | os.PathLike[str] | list[dict[str, Any]] | None = None,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> tuple[Checkpoint, Job, PushReport]:
        """Upload a fine-tune of ``base`` and queue its compression.

        The server decides what a name in use means: the same base and options (after its
        defaults) resume that checkpoint — only the files it does not hold with the same sha256
        are sent, and once committed, pushing the same files again answers with the existing
        checkpoint and its latest job; other options are a 409 ``options_differ`` naming them,
        unless that checkpoint failed unstored, which the new one replaces. Files the server
        does not read (``*.bin``, ``*.pt``, pickles: :data:`UNREAD_SUFFIXES`) are left out and
        listed in the report's ``left_out``; the server's ``warnings`` land in ``warnings``.

        Args:
            directory: the fine-tune's model directory.
            base: the base's name or id (ready).
            name: the checkpoint's name (default: the directory's name).
            method, keep, min_fidelity, value_bits, evaluation, options, seed: see the API's
                ``POST /v1/checkpoints`` (without calibration and without a lossy choice the
                server stores the checkpoint exact).
            calibration: a JSONL file (or list) of ``{"text", "label"}`` examples.

        Raises:
            AlreadyExists: a committed checkpoint of that name holds other files.
            Conflict: (``options_differ``) the name is taken with other options.
        """
        files, left_out = split_unread(local_files(directory))
        name = name or Path(directory).resolve().name
        the_base = self.get_base(base)
        if the_base.state != "ready":
            raise NotReady(
                f"base {the_base.name!r} is {the_base.state}; finish it with "
                f"`slim base push DIR --name {the_base.name}`"
            )
        body: dict[str, Any] = {"name": name, "base_id": the_base.id, "seed": seed}
        optional = {
            "method": method,
            "keep": keep,
            "min_fidelity": min_fidelity,
            "value_bits": value_bits,
            "evaluation": evaluation,
            "options": options,
        }
        body |= {k: v for k, v in optional.items() if v is not None}
        if calibration is not None:
            body["calibration"] = (
                calibration if isinstance(calibration, list) else read_calibration(calibration)
            )
        answer = self._json("POST", "/v1/checkpoints", json=body)
        ckpt = _build(Checkpoint, answer)
        warnings = [str(w) for w in answer.get("warnings") or []]
        if ckpt.state not in ("uploading", "failed"):
            ckpt, job, report = self._same_push(ckpt, files)
        else:
            report = self._upload(f"/v1/checkpoints/{ckpt.id}", files, progress)
            job = self.commit(ckpt.id)
            ckpt = self.get_checkpoint(ckpt.id)
        report.left_out, report.warnings = left_out, warnings
        return ckpt, job, report

    def _same_push(
        self, ckpt: Checkpoint, files: list[tuple[str, Path]]
    ) -> tuple[Checkpoint, Job, PushReport]:
        remote = {f.path: f.sha256 for f in self.checkpoint_files(ckpt.id)}
        local = {rel: sha256_file(p) for rel, p in files}
        if remote != local:
            raise AlreadyExists(
                f"checkpoint {ckpt.name!r} already exists ({ckpt.state}) with other files; pick "
                f"another --name, or delete it with `slim rm {ckpt.name}`"
            )
        jobs = self.list_jobs(checkpoint_id=ckpt.id)
        if not jobs:
            raise NotFound(f"checkpoint {ckpt.name!r} has no job; push it under a new name")
        return ckpt, jobs[0], PushReport(skipped=sorted(local))

    def _upload(
        self, owner: str, files: list[tuple[str, Path]], progress: Progress | None
    ) -> PushReport:
        """PUT every file whose sha256 the server does not already list under ``owner``."""
        bar = progress or _NoProgress()
        t0 = time.perf_counter()
        remote = {
            f.path: f
            for f in (_build(FileInfo, d) for d in self._json("GET", f"{owner}/files")["data"])
        }
        report = PushReport()
        todo: list[tuple[str, Path, int]] = []
        for rel, path in files:
            size = path.stat().st_size
            have = remote.get(rel)
            unchanged = have is not None and have.stored and have.size == size
            if unchanged and have is not None and sha256_file(path) == have.sha256:
                report.skipped.append(rel)
                continue
            todo.append((rel, path, size))
        bar.start(f"uploading {len(todo)} file(s)", sum(size for _, _, size in todo))
        try:
            for rel, path, size in todo:
                h = hashlib.sha256()
                answer = self._json(
                    "PUT",
                    f"{owner}/files/{_quote(rel)}",
                    content=_read_chunks(path, h, bar.advance),
                    headers={"Content-Length": str(size)},
                )
                if answer.get("sha256") != h.hexdigest():
                    raise IntegrityError(
                        f"the server stored {rel} with sha256 {answer.get('sha256')}, but "
                        f"{h.hexdigest()} was sent (did the file change during the upload?); "
                        "push again"
                    )
                report.sent.append(rel)
                report.bytes_sent += size
        finally:
            bar.finish()
        report.seconds = time.perf_counter() - t0
        return report

    # -- pulls ---------------------------------------------------------------------------------

    def pull(
        self,
        ref: str,
        out_dir: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        progress: Progress | None = None,
    ) -> PullReport:
        """Download every file of a ready checkpoint, rebuilt by the server, into ``out_dir``.

        Files already there with the right sha256 are kept; ``<file>.incomplete`` leftovers
        of an interrupted pull are continued with ``Range``. Each file is moved into place only
        after its sha256 matched the ETag (at ``scale`` 1; other scales have no recorded hash).
        """
        ckpt = self._ready(ref)
        out = Path(out_dir)
        t0 = time.perf_counter()
        files = self.checkpoint_files(ckpt.id)
        params = {} if scale == 1.0 else {"scale": repr(float(scale))}
        report = PullReport()
        bar = progress or _NoProgress()
        bar.start(f"pulling {ckpt.name}", sum(f.size for f in files))
        try:
            for f in files:
                target = _inside(out, f.path)
                want = f.pull_sha256 if scale == 1.0 else None
                got = self._download(
                    f"/v1/checkpoints/{ckpt.id}/files/{_quote(f.path)}",
                    target,
                    rel=f.path,
                    size=f.size,
                    sha256=want,
                    params=params,
                    progress=bar,
                )
                report.files.append(got)
                if not got.skipped:
                    report.bytes_received += f.size - got.resumed_from
        finally:
            bar.finish()
        report.seconds = time.perf_counter() - t0
        return report

    def pull_local(
        self,
        ref: str,
        out_dir: str | os.PathLike[str],
        *,
        scale: float = 1.0,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: Progress | None = None,
    ) -> PullReport:
        """Download only the checkpoint's delta and rebuild it here against a cached base.

        The base is downloaded once into ``<cache>/bases/<manifest sha256>/`` (each file
        verified by sha256) and reused by every later pull of any checkpoint of that base; the
        delta is kept under ``<cache>/deltas/<sha256>.slim``. The rebuilt files are the same
        bytes a server-side pull gives (at scale 1 each is checked against the sha256 recorded
        when the delta was written).
        """
        from core.reconstruct import reconstruct  # torch: only for local rebuilds

        ckpt = self._ready(ref)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        t0 = time.perf_counter()
        report = PullReport(local=True)
        bar = progress or _NoProgress()
        base_dir, report.base_bytes = self._cached_base(self.get_base(ckpt.base_id), cache, bar)
        delta, report.delta_bytes = self._cached_delta(ckpt, cache, bar)
        bar.start(f"rebuilding {ckpt.name}", 0)
        try:
            written = reconstruct(base_dir, delta, out_dir, scale=scale)
        finally:
            bar.finish()
        out = Path(out_dir)
        for path in written:
            rel = path.relative_to(out).as_posix()
            report.files.append(PulledFile(rel, path.stat().st_size, sha256_file(path)))
        report.bytes_received = report.base_bytes + report.delta_bytes
        report.seconds = time.perf_counter() - t0
        return report

    def _ready(self, ref: str) -> Checkpoint:
        ckpt = self.get_checkpoint(ref)
        if ckpt.state != "ready":
            raise NotReady(
                f"checkpoint {ckpt.name!r} is {ckpt.state}; pull it once its job has succeeded "
                f"(follow it with `slim status {ckpt.name} --follow`)"
            )
        return ckpt

    def _cached_base(self, base: Base, cache: Path, bar: Progress) -> tuple[Path, int]:
        """The base's directory in the cache, downloaded (and verified) on first use."""
        if not base.manifest_sha256:
            raise NotReady(f"base {base.name!r} is {base.state}; it has no files to pull yet")
        directory = cache / "bases" / base.manifest_sha256
        marker = directory / BASE_MARKER
        files = self.base_files(base.id)
        if marker.is_file():
            recorded = json.loads(marker.read_text(encoding="utf-8"))["files"]
            if all(
                (directory / f.path).is_file() and (directory / f.path).stat().st_size == f.size
                for f in files
            ) and {f["path"] for f in recorded} == {f.path for f in files}:
                return directory, 0
        if manifest_sha256((f.path, f.sha256) for f in files) != base.manifest_sha256:
            raise IntegrityError(
                f"the files of base {base.name!r} do not match its manifest; report this"
            )
        received = 0
        bar.start(f"caching base {base.name}", sum(f.size for f in files))
        try:
            for f in files:
                got = self._download(
                    f"/v1/bases/{base.id}/files/{_quote(f.path)}",
                    _inside(directory, f.path),
                    rel=f.path,
                    size=f.size,
                    sha256=f.sha256,
                    progress=bar,
                )
                if not got.skipped:
                    received += f.size - got.resumed_from
        finally:
            bar.finish()
        doc = {
            "base_id": base.id,
            "name": base.name,
            "server": self.url,
            "manifest_sha256": base.manifest_sha256,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in files],
        }
        tmp = marker.with_name(marker.name + INCOMPLETE)
        tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
        os.replace(tmp, marker)
        return directory, received

    def _cached_delta(self, ckpt: Checkpoint, cache: Path, bar: Progress) -> tuple[Path, int]:
        url = f"/v1/checkpoints/{ckpt.id}/delta"
        head = self._request("HEAD", url)
        etag = head.headers.get("etag", "").strip('"')
        size = int(head.headers.get("content-length", ckpt.stored_bytes or 0))
        if not re.fullmatch(r"[0-9a-f]{64}", etag):
            raise ServerError(f"the delta of {ckpt.name!r} came without a sha256 ETag")
        target = cache / "deltas" / f"{etag}.slim"
        bar.start(f"fetching delta of {ckpt.name}", size)
        try:
            got = self._download(url, target, size=size, sha256=etag, progress=bar)
        finally:
            bar.finish()
        return target, 0 if got.skipped else size - got.resumed_from

    def _download(
        self,
        url: str,
        target: Path,
        *,
        rel: str | None = None,
        size: int,
        sha256: str | None,
        params: dict[str, str] | None = None,
        progress: Progress,
        _retry: bool = True,
    ) -> PulledFile:
        """Fetch ``url`` into ``target`` through ``target.incomplete`` (resumed with Range),
        checked against ``sha256`` (or the answer's ETag) before the atomic move."""
        rel = rel or target.name
        complete = target.is_file() and target.stat().st_size == size
        if complete and sha256 is not None and sha256_file(target) == sha256:
            progress.advance(size)
            return PulledFile(rel, size, sha256, skipped=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + INCOMPLETE)
        h = hashlib.sha256()
        offset = part.stat().st_size if part.is_file() else 0
        if offset > size:
            offset = 0
        if offset:
            with part.open("rb") as f:
                while chunk := f.read(CHUNK_SIZE):
                    h.update(chunk)
        resumed_from = offset
        etag = sha256
        if offset < size or size == 0:
            headers = {}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                if sha256 is not None:
                    headers["If-Range"] = f'"{sha256}"'
            try:
                with self._http.stream("GET", url, headers=headers, params=params) as r:
                    if r.status_code == 416 and offset and _retry:  # the file is shorter now
                        part.unlink(missing_ok=True)
                        return self._download(
                            url, target, rel=rel, size=size, sha256=sha256, params=params,
                            progress=progress, _retry=False,
                        )  # fmt: skip
                    if r.status_code >= 400:
                        raise self._error(r)
                    if r.status_code == 206 and not r.headers.get("content-range", "").startswith(
                        f"bytes {offset}-"
                    ):
                        raise ServerError(
                            f"asked for {rel} from byte {offset}, the server answered "
                            f"{r.headers.get('content-range')!r}; pull again"
                        )
                    if r.status_code == 200 and offset:
                        progress.advance(-offset)
                        offset = resumed_from = 0  # the server sent it whole
                        h = hashlib.sha256()
                    elif offset:
                        progress.advance(offset)
                    etag = (r.headers.get("etag") or "").strip('"') or sha256
                    with part.open("ab" if offset else "wb") as out:
                        for chunk in r.iter_bytes(CHUNK_SIZE):
                            out.write(chunk)
                            h.update(chunk)
                            progress.advance(len(chunk))
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc
        else:
            progress.advance(offset)
        got_size = part.stat().st_size
        digest = h.hexdigest()
        want = sha256 or etag
        if got_size != size or (want is not None and digest != want):
            part.unlink(missing_ok=True)
            if resumed_from and _retry:  # the kept part may be stale: fetch it whole, once
                progress.advance(-got_size)
                return self._download(
                    url,
                    target,
                    rel=rel,
                    size=size,
                    sha256=sha256,
                    params=params,
                    progress=progress,
                    _retry=False,
                )
            raise IntegrityError(
                f"{target.name}: got {got_size} bytes with sha256 {digest}, expected {size} "
                f"bytes with sha256 {want}; nothing was kept — pull again"
            )
        os.replace(part, target)
        return PulledFile(rel, size, digest, resumed_from=resumed_from)

    # -- jobs ----------------------------------------------------------------------------------

    def list_jobs(self, *, state: str | None = None, checkpoint_id: str | None = None) -> list[Job]:
        """Jobs, newest first."""
        params = {k: v for k, v in (("state", state), ("checkpoint_id", checkpoint_id)) if v}
        return [Job.from_json(j) for j in self._pages("/v1/jobs", **params)]

    def get_job(self, ref: str) -> Job:
        """A job by id; a checkpoint's id or name gives that checkpoint's latest job."""
        if _UUID.match(ref):
            try:
                return Job.from_json(self._json("GET", f"/v1/jobs/{ref}"))
            except NotFound:
                pass
        try:
            ckpt = self.get_checkpoint(ref)
        except NotFound:
            raise NotFound(
                f"no job or checkpoint {ref!r}; list checkpoints with `slim ls`"
            ) from None
        jobs = self.list_jobs(checkpoint_id=ckpt.id)
        if not jobs:
            raise NotFound(f"checkpoint {ckpt.name!r} has no job yet (it is {ckpt.state})")
        return jobs[0]

    def cancel_job(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(
        self,
        job_id: str,
        *,
        on_update: Callable[[Job], None] | None = None,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
        check: bool = True,
    ) -> Job:
        """Poll a job until it is done; ``on_update`` sees every answer.

        Raises:
            JobFailed: the job failed or was cancelled (unless ``check`` is false).
            TimeoutError: still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = Job.from_json(self._json("GET", f"/v1/jobs/{job_id}"))
            if on_update is not None:
                on_update(job)
            if job.done:
                if check and job.state != "succeeded":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout}s")
            time.sleep(poll_seconds)

    # -- merges and totals ---------------------------------------------------------------------

    def merge(
        self,
        refs: list[str],
        name: str,
        *,
        method: str = "task_arithmetic",
        lam: float = 1.0,
        density: float | None = None,
        heads_from: str | None = None,
    ) -> Job:
        """Merge ready checkpoints of one base into a new checkpoint; answers with the job.

        ``heads_from`` (one of ``refs``) names the parent whose own tensors (heads), config and
        tokenizer the merge keeps; needed when the parents' heads differ (never averaged)."""
        ids = [self.get_checkpoint(r).id for r in refs]
        body: dict[str, Any] = {"name": name, "checkpoint_ids": ids, "method": method}
        body["lambda"] = lam
        if density is not None:
            body["density"] = density
        if heads_from is not None:
            body["heads_from"] = self.get_checkpoint(heads_from).id
        return Job.from_json(self._json("POST", "/v1/merges", json=body))

    def stats(self) -> Stats:
        return _build(Stats, self._json("GET", "/v1/stats"))


# -- helpers -------------------------------------------------------------------------------------

_Named = TypeVar("_Named", Base, Checkpoint)


def _pick(rows: list[_Named], ref: str, what: str, hint: str) -> _Named:
    """The row named ``ref``, else the one whose id starts with ``ref``."""
    for row in rows:
        if row.name == ref:
            return row
    if len(ref) >= _MIN_PREFIX:
        hits = [row for row in rows if row.id.startswith(ref.lower())]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BadRequest(
                f"{ref!r} is the start of {len(hits)} {what} ids; give more characters",
                code="ambiguous_reference",
            )
    raise NotFound(f"no {what} named or with id {ref!r}; list them with `{hint}`")


def _inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing paths that would leave ``root`` (a hostile listing)."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise BadRequest(f"refusing the unsafe file path {rel!r}", code="invalid_path")
    return root.joinpath(*parts)


def _read_chunks(path: Path, h: Any, advance: Callable[[int], None]) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
            advance(len(chunk))
            yield chunk

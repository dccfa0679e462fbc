"""The write side of the Hugging Face Hub protocol: what a push means (the routes are
:mod:`service.routes.hub_write`; the state changes :mod:`storage.commits`).

``HfApi().create_repo``, ``upload_file``, ``upload_folder``, ``create_commit`` and
``push_to_hub`` talk to these, in this order:

1. ``POST /api/repos/create`` — a repository, with a first commit holding ``.gitattributes``
   (as on the Hub, so ``main`` exists at once).
2. ``POST /api/validate-yaml`` — the model card's metadata (a README with YAML front matter).
3. ``POST /api/models/{repo}/preupload/{rev}`` — per file, ``regular`` (small text: sent inside
   the commit, base64) or ``lfs`` (uploaded first) by :func:`upload_mode`; the sha256 (``oid``) of
   a file already there, so unchanged files are skipped.
4. ``POST /{repo}.git/info/lfs/objects/batch`` — Git LFS's batch API with the ``basic`` transfer
   (one ``PUT``) or, for files over a part, ``multipart`` (a ``PUT`` per part, then a completion
   ``POST``), then ``verify``. Upload URLs are signed (:func:`sign`): the Hub's clients send no
   ``Authorization`` header with them, as with presigned object-store URLs.
5. ``POST /api/models/{repo}/commit/{rev}`` — NDJSON: a header (summary, description,
   ``parentCommit``), regular files, LFS files by oid, deletions (:func:`parse_commit_line`).

What a commit becomes (:func:`storage.commits.commit`): the base its weights are stored against
is the one the model card names — ``base_model:`` in README.md's front matter
(:func:`card_base_model`), the Hub's convention — else the repository's own setting (``slim
repo create --base``), when that names a repository here holding a base. A PEFT adapter
(``adapter_config.json``) is stored as it is (it is already small). The revision is visible at
once with exactly the pushed bytes; with a base, the compression the repository's policy asks
for (:func:`policy_params`) then runs as a job and lands as a new revision.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml

from core.errors import InvalidCalibration
from core.files import check_path
from core.params import (
    DEFAULT_MIN_FIDELITY,
    CompressParams,
    Example,
    Method,
)
from runtime.process import Runtime
from service.errors import ApiError
from storage import commits, revisions
from storage.db import begin_write
from storage.errors import AlreadyExists
from storage.models import FileRole
from storage.repo import record_blob

MIB: Final = 1024 * 1024
#: Files at most this large and without NUL bytes in their first 512 are ``regular``: sent
#: inside the commit (the Hub's own rule keeps them under 10 MB).
REGULAR_MAX_BYTES: Final = 10 * MIB
#: Suffixes always uploaded through LFS, whatever their size.
LFS_SUFFIXES: Final = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
#: One NDJSON line of a commit holds at most this many bytes (a regular file, base64).
MAX_COMMIT_LINE: Final = REGULAR_MAX_BYTES * 4 // 3 + 64 * 1024
#: How long a signed LFS upload URL stays valid.
UPLOAD_URL_SECONDS: Final = 24 * 3600
#: The calibration file a pushed revision may carry for its policy compression.
CALIBRATION_FILE: Final = "calibration.jsonl"
#: Calibration examples read from a pushed revision's calibration file at most.
MAX_CALIBRATION_LINES: Final = 100_000
#: The Hub's ``.gitattributes`` of a new repository (which files git keeps in LFS).
GITATTRIBUTES: Final = b"".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for suffix in (
        ".7z",
        ".arrow",
        ".bin",
        ".bz2",
        ".ckpt",
        ".ftz",
        ".gz",
        ".h5",
        ".joblib",
        ".mlmodel",
        ".model",
        ".msgpack",
        ".npy",
        ".npz",
        ".onnx",
        ".ot",
        ".parquet",
        ".pb",
        ".pickle",
        ".pkl",
        ".pt",
        ".pth",
        ".rar",
        ".safetensors",
        ".tar",
        ".tflite",
        ".tgz",
        ".wasm",
        ".xz",
        ".zip",
        ".zst",
    )
)
#: Repository names a route's first path segment already means.
RESERVED_NAMES: Final = frozenset(
    {"api", "v1", "lfs", "static", "docs", "redoc", "metrics", "healthz", "readyz", "signin",
     "signout", "dashboard", "openapi.json", "favicon.ico", "robots.txt", "repos", "models",
     "datasets", "spaces", "resolve", "tree", "blob", "commit", "commits", "refs", "revision",
     "preupload", "paths-info", "new"}
)  # fmt: skip
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class BadCommit(ApiError):
    """A commit payload (NDJSON) the server cannot read: bad JSON, an unknown operation, a
    missing field."""

    code = "bad_commit"


class LfsObjectMissing(ApiError):
    """A commit names an LFS object that was not uploaded (or not completely)."""

    code = "lfs_object_missing"


class BadUploadUrl(ApiError):
    """An LFS upload URL whose signature is wrong or expired, or whose key was revoked."""

    code = "bad_upload_url"


class PreconditionFailed(ApiError):
    """A commit built on a ``parentCommit`` that is no longer the head (the Hub's 412)."""

    code = "parent_commit_mismatch"


class RepoExists(ApiError):
    """``create_repo`` of a name already taken (the Hub's 409)."""

    code = "repo_exists"


class BadRepoName(ApiError):
    code = "bad_repo_name"


def check_repo_name(name: str) -> str:
    """``name`` if it can name a repository: 1–96 of letters, digits, ``-``, ``_``, ``.``,
    starting and ending with a letter or digit, no ``--`` or ``..``, and not a name a route's
    first path segment already means (:data:`RESERVED_NAMES`).

    Raises:
        BadRepoName: otherwise.
    """
    ok = (
        0 < len(name) <= 96
        and set(name) <= _NAME_CHARS
        and name[0].isalnum()
        and name[-1].isalnum()
        and "--" not in name
        and ".." not in name
        and name.lower() not in RESERVED_NAMES
        and not name.endswith(".git")
    )
    if not ok:
        raise BadRepoName(
            f"{name!r} cannot name a repository: use 1-96 letters, digits, '-', '_', '.', "
            "starting and ending with a letter or digit, no '--' or '..'"
            + (" (it is reserved for a route)" if name.lower() in RESERVED_NAMES else "")
        )
    return name


def new_repo(
    runtime: Runtime,
    namespace: str,
    name: str,
    *,
    base_id: str | None = None,
    policy: Mapping[str, Any] | None = None,
) -> str:
    """Create the repository ``namespace/name`` with its first commit (``.gitattributes``, as
    the Hub does) and the given base and policy; returns that commit's id.

    Raises:
        RepoExists: the name is taken.
    """
    info = runtime.store.put_stream([GITATTRIBUTES])
    with runtime.sessions() as session:
        begin_write(session)
        if revisions.find_repo(session, name=name, namespace=namespace) is not None:
            raise RepoExists(f"You already created this model repo: {namespace}/{name}")
        record_blob(session, info)
        first = commits.CommitFile(".gitattributes", info.size, info.sha256, info.key, FileRole.AUX)
        try:
            revision = commits.create_repo(session, namespace=namespace, name=name, first=first)
        except AlreadyExists:
            raise RepoExists(f"You already created this model repo: {namespace}/{name}") from None
        repo = revisions.get_repo(session, name=name, namespace=namespace)
        repo.base_id = base_id
        repo.policy = dict(policy or {})
        commit_id = revision.commit_id
        session.commit()
    return commit_id


# -- upload modes ------------------------------------------------------------------------------


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """``regular`` for a small text file (sent inside the commit), else ``lfs``."""
    if path.lower().endswith(LFS_SUFFIXES) or size > REGULAR_MAX_BYTES or b"\0" in sample:
        return "lfs"
    return "regular"


def role_of(path: str) -> FileRole:
    """Weights (``*.safetensors``) are what a delta stores; everything else is kept as it is."""
    return FileRole.WEIGHTS if path.endswith(".safetensors") else FileRole.AUX


# -- LFS upload URLs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadGrant:
    """What a signed LFS upload URL allows: storing ``size`` bytes hashing to ``oid``."""

    oid: str
    size: int
    expires: int
    key_prefix: str  # "" on an open server

    def message(self) -> bytes:
        return f"{self.oid}\n{self.size}\n{self.expires}\n{self.key_prefix}".encode()

    def query(self, secret: bytes) -> dict[str, str]:
        return {
            "size": str(self.size),
            "exp": str(self.expires),
            "key": self.key_prefix,
            "sig": sign(secret, self),
        }


def sign(secret: bytes, grant: UploadGrant) -> str:
    """The signature of an upload URL: HMAC-SHA256 with a secret only the server knows (the
    stored hash of the caller's key)."""
    return hmac.new(secret, grant.message(), hashlib.sha256).hexdigest()


def check_grant(
    secret: bytes, grant: UploadGrant, signature: str, now: float | None = None
) -> None:
    """Raises :class:`BadUploadUrl` unless ``signature`` signs ``grant`` and it has not expired."""
    if not hmac.compare_digest(sign(secret, grant), signature):
        raise BadUploadUrl("the upload URL's signature does not match; ask the batch API again")
    if grant.expires < (now if now is not None else time.time()):
        raise BadUploadUrl("the upload URL has expired; ask the batch API again")


def new_grant(oid: str, size: int, key_prefix: str | None) -> UploadGrant:
    return UploadGrant(oid, size, int(time.time()) + UPLOAD_URL_SECONDS, key_prefix or "")


def part_count(size: int, part_size: int) -> int:
    """How many parts a multipart upload of ``size`` bytes has (the client checks the same)."""
    return max(1, math.ceil(size / part_size))


def check_oid(oid: str) -> str:
    """``oid`` if it is a sha256 in lowercase hex (LFS's object id)."""
    if len(oid) != 64 or any(c not in "0123456789abcdef" for c in oid):
        raise BadCommit(f"{oid[:80]!r} is not an LFS object id (64 lowercase hex digits, a sha256)")
    return oid


# -- commit payloads ---------------------------------------------------------------------------


@dataclass
class CommitPayload:
    """A commit as read from its NDJSON lines."""

    summary: str = ""
    description: str = ""
    parent_commit: str | None = None
    #: path → (sha256, size, blob key or None for an LFS object still to find)
    added: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)
    deleted_files: list[str] = field(default_factory=list)
    deleted_folders: list[str] = field(default_factory=list)
    seen_header: bool = False

    @property
    def message(self) -> str:
        text = self.summary.strip() or "Upload files"
        return f"{text}\n\n{self.description.strip()}" if self.description.strip() else text

    @property
    def operations(self) -> int:
        return len(self.added) + len(self.deleted_files) + len(self.deleted_folders)


@dataclass(frozen=True, slots=True)
class InlineFile:
    """A regular file of a commit: its bytes came inside the commit."""

    path: str
    content: bytes


def parse_commit_line(line: bytes, payload: CommitPayload) -> InlineFile | None:
    """Read one NDJSON line of a commit into ``payload``; a regular file's bytes are returned
    for the caller to store.

    Raises:
        BadCommit: not a JSON object of a known ``key`` with the fields it needs.
        InvalidPath: a path that is not a plain relative path.
    """
    if not line.strip():
        return None
    try:
        item = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadCommit(f"a commit line is not JSON: {exc}") from None
    if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
        raise BadCommit('each commit line is {"key": ..., "value": {...}}')
    key, value = item.get("key"), item["value"]
    if key == "header":
        payload.seen_header = True
        payload.summary = _text(value, "summary", required=False)
        payload.description = _text(value, "description", required=False)
        parent = value.get("parentCommit")
        if parent is not None:
            if not isinstance(parent, str) or not 7 <= len(parent) <= 40:
                raise BadCommit("parentCommit is a commit id (7 to 40 hex digits)")
            payload.parent_commit = parent.lower()
        return None
    if not payload.seen_header:
        raise BadCommit('a commit starts with its header line ({"key": "header", ...})')
    raw_path = _text(value, "path")
    path = check_path(raw_path.rstrip("/") if key == "deletedFolder" else raw_path)
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise BadCommit(f"{path}: a regular file's encoding is 'base64'")
        try:
            content = base64.b64decode(_text(value, "content", required=False), validate=True)
        except binascii.Error as exc:
            raise BadCommit(f"{path}: content is not base64 ({exc})") from None
        _claim(payload, path)
        payload.added[path] = (hashlib.sha256(content).hexdigest(), len(content), None)
        return InlineFile(path, content)
    if key == "lfsFile":
        if value.get("algo", "sha256") != "sha256":
            raise BadCommit(f"{path}: LFS objects are named by sha256 ('algo': 'sha256')")
        oid = check_oid(_text(value, "oid"))
        size = value.get("size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise BadCommit(f"{path}: size is a whole number of bytes")
        _claim(payload, path)
        payload.added[path] = (oid, -1 if size is None else size, None)
        return None
    if key == "deletedFile":
        payload.deleted_files.append(path)
        return None
    if key == "deletedFolder":
        payload.deleted_folders.append(path)
        return None
    raise BadCommit(
        f"unknown commit operation {key!r}; this server takes header, file, lfsFile, "
        "deletedFile and deletedFolder"
    )


def _claim(payload: CommitPayload, path: str) -> None:
    if path in payload.added:
        raise BadCommit(f"{path} is added twice in one commit")


def _text(value: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    got = value.get(name)
    if got is None and not required:
        return ""
    if not isinstance(got, str):
        raise BadCommit(f"the commit operation needs {name!r} as a string")
    return got


def apply_operations(
    parent: Mapping[str, Any], payload: CommitPayload, *, commit: str | None
) -> dict[str, Any]:
    """The files of the new revision: ``parent``'s (by path) minus the deletions, plus the
    additions (``payload.added``'s entries). A deleted path that is not there is an error, as
    on the Hub.

    Raises:
        EntryNotFound (via :func:`service.hub`): a deleted file or folder that does not exist.
    """
    from service.hub import EntryNotFound

    files = dict(parent)
    for path in payload.deleted_files:
        if files.pop(path, None) is None:
            raise EntryNotFound(f"A file with this name doesn't exist: {path}", commit)
    for folder in payload.deleted_folders:
        gone = [p for p in files if p.startswith(f"{folder}/")]
        if not gone:
            raise EntryNotFound(f"A folder with this name doesn't exist: {folder}", commit)
        for p in gone:
            del files[p]
    files.update(payload.added)
    return files


# -- what the pushed files say -----------------------------------------------------------------


def front_matter(readme: bytes) -> dict[str, Any]:
    """The YAML metadata at the top of a model card (``---`` … ``---``), or {}.

    Raises:
        ValueError: front matter that is not a YAML mapping.
    """
    text = readme.decode("utf-8", errors="replace").lstrip("\ufeff")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        raise ValueError("the metadata block opened by '---' is never closed by '---'")
    data = yaml.safe_load(text[3:end]) or {}
    if not isinstance(data, dict):
        raise ValueError("the metadata block is not a YAML mapping (key: value lines)")
    return data


def card_base_model(readme: bytes | None) -> str | None:
    """The ``base_model`` a model card names (the first, if a list), or None."""
    if readme is None:
        return None
    try:
        value = front_matter(readme).get("base_model")
    except (ValueError, yaml.YAMLError):
        return None
    if isinstance(value, list):
        value = value[0] if value else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def adapter_base_model(config: bytes | None) -> str | None:
    """PEFT's ``base_model_name_or_path`` in ``adapter_config.json``, or None."""
    if config is None:
        return None
    try:
        value = json.loads(config).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def validate_card(content: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(errors, warnings) of a model card's metadata, in the Hub's ``validate-yaml`` shape."""
    try:
        data = front_matter(content.encode())
    except (ValueError, yaml.YAMLError) as exc:
        return [{"message": f"invalid YAML metadata: {exc}"}], []
    warnings = []
    if not data:
        warnings.append({"message": "empty or missing yaml metadata in repo card"})
    base = data.get("base_model")
    if base is not None and not isinstance(base, str | list):
        return [{"message": "base_model must be a repository id or a list of them"}], warnings
    return [], warnings


@dataclass(frozen=True, slots=True)
class Policy:
    """A repository's storage policy (``Repo.policy``): what a push is compressed to after its
    exact copy.

    The default is ``auto`` at a fidelity floor of :data:`~core.params.DEFAULT_MIN_FIDELITY`
    on the revision's ``calibration.jsonl``; **without calibration examples nothing lossy is
    queued** — fidelity cannot be measured, so the exact revision stays (the default a user can
    trust). Another ``method`` (with ``keep`` / ``value_bits``) is the user's explicit choice and
    runs with or without calibration, as ``slim push --method`` does.
    """

    method: str = str(Method.AUTO)
    min_fidelity: float = DEFAULT_MIN_FIDELITY
    keep: float | None = None
    value_bits: int | None = None
    calibration_file: str = CALIBRATION_FILE

    @classmethod
    def from_row(cls, row: Mapping[str, Any] | None) -> Policy:
        row = dict(row or {})
        return cls(
            method=str(row.get("method") or Method.AUTO),
            min_fidelity=float(row.get("min_fidelity") or DEFAULT_MIN_FIDELITY),
            keep=None if row.get("keep") is None else float(row["keep"]),
            value_bits=None if row.get("value_bits") is None else int(row["value_bits"]),
            calibration_file=str(row.get("calibration_file") or CALIBRATION_FILE),
        )

    def to_row(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "min_fidelity": self.min_fidelity,
            "keep": self.keep,
            "value_bits": self.value_bits,
            "calibration_file": self.calibration_file,
        }


def read_calibration(data: bytes) -> tuple[Example, ...]:
    """Calibration examples of a JSONL file: one ``{"text": ..., "label": ...}`` per line
    (``label`` optional; a bare JSON string is a text).

    Raises:
        InvalidCalibration: a line that is neither.
    """
    examples: list[Example] = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if len(examples) >= MAX_CALIBRATION_LINES:
            break
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise InvalidCalibration(
                f'line {number} of the calibration file is not {{"text": ...}}'
            )
        label = item.get("label")
        examples.append(Example(item["text"], label if isinstance(label, int) else None))
    return tuple(examples)


def policy_params(policy: Policy, calibration: tuple[Example, ...]) -> CompressParams | None:
    """The compression a push is queued for after its exact copy (see :class:`Policy`); None
    when there is none (``auto`` without calibration examples, or ``lossless``)."""
    method = Method(policy.method)
    if method == Method.LOSSLESS or (method == Method.AUTO and not calibration):
        return None
    if method == Method.AUTO:
        return CompressParams(
            method=method, min_fidelity=policy.min_fidelity, calibration=calibration
        )
    return CompressParams(
        method=method,
        keep=policy.keep,
        value_bits=policy.value_bits,
        calibration=calibration or None,
    )

"""Typed answers of the API (bases, checkpoints, files, jobs, totals) and the reports of pushes
and pulls. Each answer keeps the JSON it was built from in ``raw``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

from core.params import CompressOutcome, CompressParams

__all__ = [
    "Adapter",
    "Base",
    "Checkpoint",
    "FileInfo",
    "Job",
    "JobProgress",
    "NoProgress",
    "Progress",
    "PullReport",
    "PulledFile",
    "PushReport",
    "Stats",
    "build",
]

T = TypeVar("T")


def build(cls: type[T], data: dict[str, Any], **extra: Any) -> T:
    """``cls`` from an API answer: the fields it names, ``extra`` on top, the answer in ``raw``."""
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
class Adapter:
    """A PEFT LoRA adapter stored as it is in a repository (``slim adapters``): what its
    ``adapter_config.json`` says, its files and the base recorded for merging it."""

    name: str
    namespace: str
    commit_id: str
    r: int
    lora_alpha: float
    target_modules: list[str] | str  # names, or one regular expression
    modules_to_save: list[str] = field(default_factory=list)
    task_type: str | None = None
    base_model: str | None = None  # adapter_config.json's base_model_name_or_path
    base_id: str | None = None  # the stored base recorded with the repository (merges use it)
    files: list[FileInfo] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes of the revision's files."""
        return sum(f.size for f in self.files)

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


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
    repo: str | None = None
    commit_id: str | None = None
    revision: int | None = None
    parent_commit: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def request(self) -> CompressParams:
        """What was asked, as the one typed definition (:class:`core.params.CompressParams`)."""
        return CompressParams.from_row(self.params)

    @property
    def outcome(self) -> CompressOutcome:
        """What the compression produced (:class:`core.params.CompressOutcome`): sizes,
        fidelity, the search trace."""
        return CompressOutcome.from_row(self)

    @property
    def fidelity(self) -> float | None:
        return self.outcome.fidelity

    @property
    def keep(self) -> float | None:
        return self.request.keep


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
        return build(
            cls,
            data,
            progress=build(JobProgress, data.get("progress") or {}),
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


class NoProgress:
    """Progress that shows nothing (what a transfer reports to when given none)."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class Repo:
    """A repository: one model's history under one name (``kind`` base: stored whole)."""

    id: str
    name: str
    kind: str
    base_id: str | None = None
    main: str | None = None
    revisions: int = 0
    namespace: str = "default"
    policy: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Revision:
    """One immutable revision of a repository; ``checkpoint_id`` (or ``base_id``) holds its
    files."""

    commit_id: str
    revision: int
    parent_commit: str | None
    message: str
    created_at: str
    refs: list[str] = field(default_factory=list)
    checkpoint_id: str | None = None
    base_id: str | None = None
    method: str | None = None
    original_bytes: int = 0
    stored_bytes: int | None = None
    fidelity: float | None = None
    manifest_sha256: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

"""Request and response bodies of the v1 API (schema families ``XCreate``/``XPublic``/``XsPublic``).

Every route declares one of these, so the OpenAPI document at ``/openapi.json`` spells out each
request and answer. Public schemas are built from rows with :meth:`from_row`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.methods import REGISTRY
from core.params import (
    AUTO_CALIBRATION_LIMIT,
    DEFAULT_CALIBRATION_LIMIT,
    DEFAULT_KEEP,
    DEFAULT_LAMBDA,
    DEFAULT_MERGE_METHOD,
    DEFAULT_VALUE_BITS,
    EVAL_KINDS,
    MERGE_METHODS,
    VALUE_BITS,
    CompressOutcome,
    CompressParams,
    Method,
)
from storage.models import (
    Base,
    BaseState,
    Checkpoint,
    CheckpointState,
    File,
    FileRole,
    Job,
    JobKind,
    JobState,
    Repo,
    Revision,
)

Name = Field(
    min_length=1,
    max_length=255,
    pattern=r"^[^\x00-\x1f\x7f]+$",
    description="Unique within the namespace; no control characters.",
)

# -- choices ---------------------------------------------------------------------------------
# The schema's enums are made from the lists core validates against (never a copy), so the
# OpenAPI document, /docs and the validation of a request follow core when a method is added.

#: Method names a checkpoint may ask for: core's registry, plus ``auto`` (the service's search).
METHODS: tuple[str, ...] = (*(str(name) for name in REGISTRY), str(Method.AUTO))
MethodChoice = Literal[METHODS]  # type: ignore[valid-type]
#: Evaluation kinds (``core.params.Evaluation``).
EvaluationChoice = Literal[EVAL_KINDS]  # type: ignore[valid-type]
#: Stored value bit widths (``core.params.VALUE_BITS``).
ValueBitsChoice = Literal[VALUE_BITS]  # type: ignore[valid-type]
#: Merge methods (``core.params.MergeMethod``).
MergeMethodChoice = Literal[MERGE_METHODS]  # type: ignore[valid-type]

# -- files -----------------------------------------------------------------------------------

#: The largest page offset a list route takes (a bound every database column can hold).
MAX_OFFSET = 1_000_000_000


class FilePublic(BaseModel):
    """One file of a base or checkpoint as uploaded (its sha256 lets a client resume a push)."""

    path: str
    size: int
    sha256: str
    role: FileRole
    stored: bool = Field(description="Whether the uploaded bytes are still kept as a blob.")
    recon_sha256: str | None = Field(
        None, description="sha256 of the file rebuilt from the delta (its ETag when pulled)."
    )

    @classmethod
    def from_row(cls, row: File) -> FilePublic:
        return cls(
            path=row.path,
            size=row.size,
            sha256=row.sha256,
            role=row.role,
            stored=row.blob_key is not None,
            recon_sha256=row.recon_sha256,
        )


class FilesPublic(BaseModel):
    data: list[FilePublic]
    count: int


# -- bases -----------------------------------------------------------------------------------


class BaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Name


class BasePublic(BaseModel):
    id: str
    namespace: str
    name: str
    state: BaseState
    num_params: int | None
    total_bytes: int
    manifest_sha256: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Base) -> BasePublic:
        return cls(
            id=row.id,
            namespace=row.namespace,
            name=row.name,
            state=row.state,
            num_params=row.num_params,
            total_bytes=row.total_bytes,
            manifest_sha256=row.manifest_sha256,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class BasesPublic(BaseModel):
    data: list[BasePublic]
    count: int


# -- checkpoints -----------------------------------------------------------------------------


class CalibrationExample(BaseModel):
    """One calibration input; ``label`` is needed by the ``accuracy`` evaluation only."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=100_000)
    label: int | str | None = None


class CheckpointCreate(BaseModel):
    """A new checkpoint: upload its files next, then commit it.

    ``method`` defaults to ``nps`` (or ``auto`` when ``min_fidelity`` is given). ``evaluation``
    defaults to ``fidelity`` when calibration examples are given, else ``weights`` (data-free;
    NPS then degenerates to magnitude pruning and the checkpoint's notes say so).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Name
    base_id: str = Field(description="The base's id or name (it must be ready).")
    method: MethodChoice | None = Field(
        None, description="The compression method (default nps; auto with min_fidelity)."
    )
    keep: float | None = Field(
        None, gt=0, le=1, description=f"Keep ratio r (default {DEFAULT_KEEP:g}; auto searches it)."
    )
    min_fidelity: float | None = Field(
        None, gt=0, le=1, description="auto: the quality floor relative to the fine-tune."
    )
    evaluation: EvaluationChoice | None = Field(
        None,
        description="How a candidate is scored: fidelity (agreement with the fine-tune on the "
        "calibration texts), accuracy (on their labels), weights (data-free).",
    )
    value_bits: ValueBitsChoice | None = Field(
        None,
        description=f"Bits per stored value: {DEFAULT_VALUE_BITS} (default), 32, or fewer (quantised); "
        "auto searches it.",
    )
    seed: int = Field(0, ge=0, lt=2**63)
    options: dict[str, Any] = Field(
        default_factory=dict, description='Method options, e.g. {"generations": 30}.'
    )
    calibration: list[CalibrationExample] | None = Field(
        None, description="Calibration inputs for the fidelity/accuracy evaluations."
    )
    manifest_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="The files about to be pushed (core.files.manifest_sha256 of their paths "
        "and sha256). When the repository's main revision holds exactly these files with the "
        "same options, the push is a no-op: the answer is that revision's checkpoint (200).",
    )
    calibration_limit: int | None = Field(
        None,
        gt=0,
        le=1_000_000,
        description="Evaluate on at most this many calibration examples; more are subsampled "
        f"by `seed` (default {DEFAULT_CALIBRATION_LIMIT}; auto {AUTO_CALIBRATION_LIMIT}).",
    )


class CheckpointParams(BaseModel):
    keep: float | None = None
    value_bits: int | None = None
    evaluation: str | None = None
    min_fidelity: float | None = None
    seed: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    calibration_examples: int = 0  # stored with the request
    calibration_limit: int | None = None  # of them, evaluated on at most


class CheckpointPublic(BaseModel):
    id: str
    namespace: str
    name: str
    base_id: str
    state: CheckpointState
    method: str
    params: CheckpointParams
    original_bytes: int = Field(description="Bytes of the fine-tune's files as uploaded.")
    stored_bytes: int | None = Field(description="Bytes of the stored delta.")
    ratio: float | None = Field(description="original_bytes / stored_bytes.")
    bits_per_param: float | None
    num_params: int | None
    fitness: dict[str, Any] | None = Field(
        description="Evaluation summary: fitness before/after, fidelity, metrics, notes."
    )
    search_seconds: float | None
    trace: Any = Field(None, description="The search trail (single-checkpoint answers only).")
    derived_from: Any = None
    error: str | None
    created_at: datetime
    updated_at: datetime
    repo: str = Field(description="The repository (its name) this checkpoint is a revision of.")
    commit_id: str | None = Field(
        None, description="The revision it holds (40 hex); null while its push is in flight."
    )
    revision: int | None = Field(None, description="The revision's number in its repository.")
    parent_commit: str | None = Field(None, description="The revision's parent commit.")

    @classmethod
    def from_row(cls, row: Checkpoint, *, with_trace: bool = False) -> CheckpointPublic:
        p = CompressParams.from_row(row.params)
        params = CheckpointParams(
            keep=p.keep,
            value_bits=p.value_bits,
            evaluation=None if p.evaluation is None else str(p.evaluation),
            min_fidelity=p.min_fidelity,
            seed=p.seed,
            options=dict(p.options),
            calibration_examples=len(p.calibration or ()),
            calibration_limit=p.calibration_limit,
        )
        return cls(
            id=row.id,
            namespace=row.namespace,
            name=row.name,
            base_id=row.base_id,
            state=row.state,
            method=row.method,
            params=params,
            original_bytes=row.original_bytes,
            stored_bytes=row.stored_bytes,
            ratio=row.ratio,
            bits_per_param=row.bits_per_param,
            num_params=row.num_params,
            fitness=row.fitness,
            search_seconds=row.search_seconds,
            trace=row.trace if with_trace else None,
            derived_from=row.derived_from,
            error=row.error,
            created_at=row.created_at,
            updated_at=row.updated_at,
            repo=row.name,
            commit_id=None if row.revision is None else row.revision.commit_id,
            revision=None if row.revision is None else row.revision.number,
            parent_commit=None if row.revision is None else row.revision.parent_commit,
        )


class CheckpointCreated(CheckpointPublic):
    """The create answer: the checkpoint, and what the push should tell its user."""

    warnings: list[str] = Field(
        default_factory=list,
        description="E.g. that the checkpoint is stored exact because no calibration was sent "
        "(and how to get a smaller delta), or that a lossy choice's loss is not measured.",
    )


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    count: int


# -- repositories ----------------------------------------------------------------------------


class PolicyBody(BaseModel):
    """What a push to the repository through the Hub protocol is compressed to after its exact
    copy (``service.hub_write.Policy``): ``auto`` at ``min_fidelity`` on the revision's
    calibration file by default — nothing lossy without one; another method as asked."""

    method: str | None = Field(default=None, max_length=32)
    min_fidelity: float | None = Field(default=None, gt=0, le=1)
    keep: float | None = Field(default=None, gt=0, le=1)
    value_bits: int | None = None
    calibration_file: str | None = Field(default=None, max_length=1024)


class RepoCreate(BaseModel):
    name: str = Field(max_length=96, description="The repository's name (the Hub's rules).")
    base: str | None = Field(
        default=None,
        max_length=255,
        description="A repository of your namespace holding a base: what pushes are stored "
        "against when their model card names no base.",
    )
    policy: PolicyBody | None = None


class RepoUpdate(BaseModel):
    base: str | None = Field(default=None, max_length=255)
    policy: PolicyBody | None = None


class RepoPublic(BaseModel):
    id: str
    namespace: str
    name: str
    kind: Literal["base", "model"] = Field(
        description="base: stored whole (others are stored against it); model: stored against "
        "the base ``base_id``."
    )
    base_id: str | None
    main: str | None = Field(description="The commit id ``main`` points at (null: none yet).")
    revisions: int = Field(description="How many revisions it holds.")
    policy: dict[str, Any] = Field(
        default_factory=dict, description="Its storage policy for Hub pushes (see PolicyBody)."
    )
    created_at: datetime

    @classmethod
    def from_row(cls, row: Repo, *, main: str | None, revisions: int) -> RepoPublic:
        return cls(
            id=row.id,
            namespace=row.namespace,
            name=row.name,
            kind="base" if row.base_id is None else "model",
            base_id=row.base_id,
            main=main,
            revisions=revisions,
            policy=dict(row.policy or {}),
            created_at=row.created_at,
        )


class ReposPublic(BaseModel):
    data: list[RepoPublic]
    count: int


class RevisionPublic(BaseModel):
    """One immutable revision and a summary of the stored object that holds its files."""

    commit_id: str
    revision: int = Field(description="1, 2, 3, ... in the order revisions were added.")
    parent_commit: str | None
    message: str
    manifest_sha256: str
    created_at: datetime
    refs: list[str] = Field(description="The refs pointing at it (e.g. main).")
    checkpoint_id: str | None
    base_id: str | None
    method: str | None = Field(description="How it is stored (a base: whole).")
    original_bytes: int
    stored_bytes: int | None
    fidelity: float | None = Field(description="Measured fidelity, when it was measured.")

    @classmethod
    def from_row(
        cls, row: Revision, stored: Checkpoint | Base | None, refs: list[str]
    ) -> RevisionPublic:
        method: str | None = None
        original, size, fidelity = 0, None, None
        if isinstance(stored, Checkpoint):
            method, original, size = stored.method, stored.original_bytes, stored.stored_bytes
            fidelity = CompressOutcome.from_row(stored).fidelity
        elif isinstance(stored, Base):
            method, original, size = "whole", stored.total_bytes, stored.total_bytes
        return cls(
            commit_id=row.commit_id,
            revision=row.number,
            parent_commit=row.parent_commit,
            message=row.message,
            manifest_sha256=row.manifest_sha256,
            created_at=row.created_at,
            refs=refs,
            checkpoint_id=row.checkpoint_id,
            base_id=row.base_id,
            method=method,
            original_bytes=original,
            stored_bytes=size,
            fidelity=fidelity,
        )


class RevisionsPublic(BaseModel):
    data: list[RevisionPublic]
    count: int


# -- jobs ------------------------------------------------------------------------------------


class JobProgress(BaseModel):
    """What the worker last reported (fields appear as the job reaches them)."""

    model_config = ConfigDict(extra="allow")

    phase: str | None = None
    generation: int | None = None
    generations: int | None = None
    best_fitness: float | None = None
    evaluations: int | None = None


class JobError(BaseModel):
    code: str
    detail: str


class JobPublic(BaseModel):
    id: str
    kind: JobKind
    checkpoint_id: str
    state: JobState
    attempts: int
    max_attempts: int
    progress: JobProgress
    error: JobError | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Job) -> JobPublic:
        return cls(
            id=row.id,
            kind=row.kind,
            checkpoint_id=row.checkpoint_id,
            state=row.state,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            progress=JobProgress.model_validate(row.progress or {}),
            error=split_error(row.error),
            cancel_requested=row.cancel_requested,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


_CODED = re.compile(r"^([a-z][a-z0-9_]*): (.*)$", re.DOTALL)


def split_error(error: str | None) -> JobError | None:
    """``"code: detail"`` (how workers record errors) as a :class:`JobError`."""
    if error is None:
        return None
    match = _CODED.match(error)
    if match is None:
        return JobError(code="job_failed", detail=error)
    return JobError(code=match.group(1), detail=match.group(2))


# -- merges ----------------------------------------------------------------------------------


class MergeCreate(BaseModel):
    """Merge ready checkpoints of one base into a new, derived checkpoint (a ``merge`` job)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Name
    checkpoint_ids: list[str] = Field(
        min_length=2, max_length=64, description="Ids or names of ready checkpoints of one base."
    )
    method: MergeMethodChoice = str(DEFAULT_MERGE_METHOD)
    lambda_: float = Field(
        DEFAULT_LAMBDA, alias="lambda", gt=0, le=100, description="Scale λ of the merge."
    )
    density: float | None = Field(None, gt=0, le=1, description="ties: trim density per tensor.")
    heads_from: str | None = Field(
        None,
        description="Id or name of the parent (one of checkpoint_ids) whose own tensors that "
        "are not in the base (classifier heads), config and tokenizer the merge keeps. Needed "
        "when the parents' heads differ: heads are never averaged, and without it such a merge "
        "fails with invalid_argument.",
    )


# -- system ----------------------------------------------------------------------------------


class StatsPublic(BaseModel):
    """Storage totals: what the models would take as plain files vs what is stored."""

    logical_bytes: int
    stored_bytes: int
    stored_parts: dict[str, int] = Field(
        description="stored_bytes split by what the blobs keep: bases, deltas, retained, "
        "pending, failed (each blob counted once, under its first part; they add up)."
    )
    stored_part_labels: dict[str, str] = Field(description="What each part of stored_parts counts.")
    ratio: float | None
    num_bases: int
    num_checkpoints: int
    num_blobs: int
    checkpoints_by_state: dict[str, int]
    jobs_by_state: dict[str, int]


class HealthPublic(BaseModel):
    status: Literal["ok"]


class ReadyPublic(BaseModel):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]

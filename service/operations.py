"""What the routes do, one function per action: validate cheaply, change rows, commit.

Every function takes the session, the blob store and the settings it needs explicitly, runs
one transaction, and raises the error tree ``service.errors`` maps to HTTP. Bad input is
refused here, before any job is queued.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InvalidArgument, InvalidCalibration, SlimError
from core.files import manifest_sha256
from core.methods import REGISTRY
from core.params import (
    VALUE_BITS,
    CompressParams,
    Evaluation,
    Example,
    MergeMethod,
    MergeParams,
    Method,
)
from runtime.settings import Settings
from service.errors import OptionsDiffer
from service.schemas import CheckpointCreate, MergeCreate
from service.validation import check_fits_base, stored_checkpoint
from storage import queue, repo, revisions
from storage.blobstore import BlobStore
from storage.db import begin_write, write_transaction
from storage.errors import Conflict, NotFound, StorageError
from storage.models import (
    Base,
    BaseState,
    Checkpoint,
    CheckpointState,
    Job,
    JobState,
)
from storage.repo import OPEN_CHECKPOINT_STATES

# -- bases -----------------------------------------------------------------------------------


def commit_base(
    session: Session, store: BlobStore, settings: Settings, base_id: str, namespace: str
) -> Base:
    """Validate every weight header of a base and mark it ready (idempotent)."""
    base = repo.get_base(session, base_id, namespace=namespace)
    if base.state == BaseState.READY:
        return base
    rows = repo.list_files(session, base_id=base.id)
    ckpt = stored_checkpoint(store, rows, max_header=settings.max_header_bytes, what="base")
    queue.ready_base(
        base,
        total_bytes=sum(row.size for row in rows),
        num_params=ckpt.num_params,
        manifest_sha256=manifest_sha256((row.path, row.sha256) for row in rows),
    )
    session.commit()
    return base


# -- checkpoints -----------------------------------------------------------------------------


def available_methods() -> list[str]:
    """Method names a checkpoint may ask for: the registry's, plus ``auto``."""
    return [*REGISTRY, Method.AUTO]


#: What every checkpoint stored exact by default is told (``warnings`` of the create answer).
EXACT_BY_DEFAULT = (
    "stored exact (method lossless, bit-identical): no calibration examples were sent, so no "
    "lossy encoding could be measured. For a smaller delta, push under a new name with "
    '--min-fidelity 0.99 --calibration FILE (API: "min_fidelity": 0.99 and '
    '"calibration": [{"text": ...}, ...]); auto then keeps the smallest encoding that stays '
    "above the floor"
)


@dataclass(frozen=True, slots=True)
class CheckpointRequest:
    """A create request with every default applied: what a checkpoint stores as its options
    (``params.to_dict()`` in its ``params`` column, ``params.method`` in ``method``)."""

    params: CompressParams
    warnings: list[str]

    @property
    def method(self) -> str:
        return str(self.params.method)


@dataclass(frozen=True, slots=True)
class CheckpointCreation:
    """The checkpoint a create request answers with, whether it is new, and what to tell."""

    checkpoint: Checkpoint
    created: bool
    warnings: list[str]


def resolve_request(settings: Settings, body: CheckpointCreate) -> CheckpointRequest:
    """Check a create request and apply the defaults (:meth:`core.params.CompressParams.resolve`,
    the one place they are decided).

    Defaults: ``auto`` when ``min_fidelity`` is given; else, with calibration examples, ``nps``
    measured by ``fidelity`` on them; else — no data to measure a loss with — ``lossless``,
    unless a lossy choice was made explicitly (a method, ``keep`` or ``value_bits``). A lossy
    choice without calibration is stored as asked (``evaluation`` "weights", data-free), with
    a warning that its loss is unmeasured. ``keep`` and ``value_bits`` take core's defaults
    (:data:`core.params.DEFAULT_KEEP`, :data:`~core.params.DEFAULT_VALUE_BITS`) unless given
    (``auto`` searches both unless pinned; ``lossless`` records neither).
    """
    calibration = tuple(Example(e.text, e.label) for e in body.calibration or [])
    params = CompressParams(
        method=None if body.method is None else Method(body.method),
        keep=body.keep,
        value_bits=body.value_bits,
        evaluation=None if body.evaluation is None else Evaluation(body.evaluation),
        min_fidelity=body.min_fidelity,
        seed=body.seed,
        options=body.options,
        calibration=calibration or None,
        calibration_limit=body.calibration_limit,
    ).resolve()
    method, evaluation = params.method, params.evaluation
    methods = available_methods()
    if method not in methods:
        raise InvalidArgument(f"unknown method {method!r}; choose one of {', '.join(methods)}")
    if body.min_fidelity is not None and method != Method.AUTO:
        raise InvalidArgument("min_fidelity goes with method 'auto'; drop one of the two")
    if body.value_bits is not None and body.value_bits not in VALUE_BITS:
        raise InvalidArgument(f"value_bits must be one of {VALUE_BITS}")
    if len(calibration) > settings.max_calibration_examples:
        raise InvalidCalibration(
            f"{len(calibration)} calibration examples; at most "
            f"{settings.max_calibration_examples} are accepted"
        )
    if evaluation != Evaluation.WEIGHTS and not calibration:
        raise InvalidCalibration(
            f"evaluation {str(evaluation)!r} needs calibration examples "
            '([{"text": ..., "label": ...}, ...]); or use evaluation "weights"'
        )
    if method == Method.AUTO and evaluation == Evaluation.WEIGHTS:
        raise InvalidCalibration(
            "method 'auto' measures fidelity on calibration examples; send some "
            '("calibration": [{"text": ...}, ...])'
        )
    if evaluation == Evaluation.ACCURACY and any(e.label is None for e in calibration):
        raise InvalidCalibration('evaluation "accuracy" needs a label on every calibration example')
    warnings: list[str] = []
    if method == Method.LOSSLESS and body.method is None:
        warnings.append(EXACT_BY_DEFAULT)
    elif method != Method.LOSSLESS and evaluation == Evaluation.WEIGHTS:
        searches = REGISTRY[str(method)].searches
        warnings.append(
            f"method {method} keeps {params.keep:g} of the task vector at "
            f"{params.value_bits} bits without calibration examples, so its loss is not "
            "measured"
            + (" (data-free, its search reduces to magnitude pruning)" if searches else "")
            + ". Send calibration examples to measure it (--calibration FILE), add "
            "min_fidelity (--min-fidelity 0.99 --calibration FILE) for the smallest delta "
            "that keeps 99% fidelity, or leave method and keep unset to store it exact"
        )
    return CheckpointRequest(params, warnings)


def create_checkpoint(
    session: Session, settings: Settings, body: CheckpointCreate, namespace: str
) -> CheckpointCreation:
    """A new checkpoint in state ``uploading``, the next revision of the repository ``name``
    once it is ready; its parameters are checked now, not later.

    A push of the name still in flight (not ready yet) answers according to that checkpoint:
    the same base and options (after defaults) give it back, so an interrupted push resumes;
    other options are a 409 ``options_differ`` naming them — unless it failed and was never
    stored (:func:`storage.repo.replaceable`), which the new checkpoint then replaces (its
    files go to garbage collection). With none in flight, a repository whose ``main`` holds
    exactly the files of ``manifest_sha256`` with the same base and options answers with
    that checkpoint (a no-op); anything else starts a new revision (parent: ``main``).
    """
    request = resolve_request(settings, body)
    base_id = repo.get_base(session, body.base_id, namespace=namespace).id
    begin_write(session)  # one push at a time decides what a name means
    existing = revisions.in_flight(session, name=body.name, namespace=namespace)
    if existing is None and body.manifest_sha256 is not None:
        holder = revisions.find_repo(session, name=body.name, namespace=namespace)
        main = None if holder is None else revisions.head(session, holder)
        if main is not None and main.manifest_sha256 == body.manifest_sha256:
            same = session.get(Checkpoint, main.checkpoint_id) if main.checkpoint_id else None
            if same is not None and not _differences(same, base_id, request):
                session.commit()
                return CheckpointCreation(same, False, request.warnings)
    if existing is not None:
        differ = _differences(existing, base_id, request)
        if not differ:
            return CheckpointCreation(existing, False, request.warnings)
        if not repo.replaceable(existing):
            raise _options_differ(existing, differ)
        repo.delete_checkpoint(session, existing.id, namespace=namespace)
    ckpt = repo.create_checkpoint(
        session,
        name=body.name,
        base_id=base_id,
        method=request.method,
        params=request.params.to_dict(),
        namespace=namespace,
    )
    session.commit()
    return CheckpointCreation(ckpt, True, request.warnings)


def _options_differ(existing: Checkpoint, differ: list[str]) -> OptionsDiffer:
    return OptionsDiffer(
        f"checkpoint {existing.name!r} already exists ({existing.state.value}) with other "
        f"options — {'; '.join(differ)}. Push under another name, or delete it first "
        f"(`slim rm {existing.name}`, DELETE /v1/checkpoints/{existing.id}); pushing with "
        "its own options resumes it"
    )


def _differences(existing: Checkpoint, base_id: str, request: CheckpointRequest) -> list[str]:
    """``"what: asked X, stored Y"`` for each option a request sets differently."""
    out = []
    if existing.base_id != base_id:
        out.append(f"base: asked {base_id}, stored {existing.base_id}")
    if existing.method != request.method:
        out.append(f"method: asked {request.method}, stored {existing.method}")
    stored = CompressParams.from_row(existing.params).to_dict()
    for key, asked in request.params.to_dict().items():
        have = stored[key]
        if asked == have:
            continue
        if key == "calibration":
            n_asked, n_have = len(asked or []), len(have or [])
            what = "other examples" if n_asked == n_have else f"{n_asked} examples"
            out.append(f"calibration: asked {what}, stored {n_have} examples")
        else:
            out.append(f"{key}: asked {_show(asked)}, stored {_show(have)}")
    return out


def _show(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, dict) else str(value)


#: Appended to the error of a commit that failed validation.
FAILED_COMMIT = (
    " — the checkpoint is now failed and its uploaded files were dropped; fix the files and "
    "push again under the same name"
)


def commit_checkpoint(
    session: Session, store: BlobStore, settings: Settings, checkpoint_id: str, namespace: str
) -> Job:
    """Validate the uploaded files against the base, then queue the compression job."""
    ckpt = repo.get_checkpoint(session, checkpoint_id, namespace=namespace)
    if ckpt.state not in OPEN_CHECKPOINT_STATES or ckpt.derived_from is not None:
        raise Conflict(
            f"checkpoint {ckpt.name!r} is {ckpt.state.value}; only an uploading (or failed) "
            "checkpoint can be committed — follow its job with GET /v1/jobs?checkpoint_id="
        )
    base = repo.get_base(session, ckpt.base_id)
    rows = repo.list_files(session, checkpoint_id=ckpt.id)
    max_header = settings.max_header_bytes
    try:
        ft = stored_checkpoint(store, rows, max_header=max_header, what="checkpoint")
        base_ckpt = stored_checkpoint(
            store, repo.list_files(session, base_id=base.id), max_header=max_header, what="base"
        )
        check_fits_base(ft, base_ckpt)
    except SlimError as exc:
        if isinstance(exc, StorageError):  # an outage or a lost blob, not a bad upload
            raise
        ckpt_id = ckpt.id  # the upload is unusable: clean up
        session.rollback()
        with write_transaction(session):
            failed = queue.fail_upload(session, ckpt_id, f"{exc.code}: {exc.detail}")
        if failed:
            exc.detail += FAILED_COMMIT
            exc.args = (exc.detail,)
        raise
    return queue.queue_compression(
        session,
        ckpt,
        original_bytes=sum(row.size for row in rows),
        num_params=ft.num_params,
        max_attempts=settings.job_max_attempts,
    )


# -- merges ----------------------------------------------------------------------------------


def create_merge(session: Session, settings: Settings, body: MergeCreate, namespace: str) -> Job:
    """A derived checkpoint (state ``queued``) and the ``merge`` job that will build it."""
    if len(set(body.checkpoint_ids)) != len(body.checkpoint_ids):
        raise InvalidArgument("checkpoint_ids lists a checkpoint twice")
    parents = [
        repo.get_checkpoint(session, cid, namespace=namespace) for cid in body.checkpoint_ids
    ]
    not_ready = [p.name for p in parents if p.state != CheckpointState.READY]
    if not_ready:
        raise Conflict(
            f"checkpoints {', '.join(map(repr, not_ready))} are not ready; merge once their "
            "jobs have succeeded"
        )
    if len({p.base_id for p in parents}) != 1:
        raise InvalidArgument("the checkpoints belong to different bases; merge those of one base")
    heads_from = None
    if body.heads_from is not None:
        named = repo.get_checkpoint(session, body.heads_from, namespace=namespace)
        ids = [p.id for p in parents]
        if named.id not in ids:
            raise InvalidArgument(
                f"heads_from {body.heads_from!r} is not one of the merged checkpoints; name one "
                "of checkpoint_ids"
            )
        heads_from = ids.index(named.id)
    params = MergeParams(
        checkpoint_ids=tuple(p.id for p in parents),
        method=MergeMethod(body.method),
        lam=body.lambda_,
        density=body.density,
        heads_from=heads_from,
    )
    derived = {
        "method": str(params.method),
        "lambda": params.lam,
        "density": params.density,
        "parents": [{"id": p.id, "name": p.name} for p in parents],
        "heads_from": None if heads_from is None else parents[heads_from].name,
    }
    ckpt = repo.create_checkpoint(
        session,
        name=body.name,
        base_id=parents[0].base_id,
        method="merge",
        params=params.checkpoint_params(),
        namespace=namespace,
        derived_from=derived,
    )
    job = queue.queue_merge(session, ckpt, params.to_dict(), max_attempts=settings.job_max_attempts)
    session.commit()
    return job


# -- jobs ------------------------------------------------------------------------------------


def get_job(session: Session, job_id: str, namespace: str) -> Job:
    """A job whose checkpoint is in the caller's namespace."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist; list jobs with GET /v1/jobs")
    repo.get_checkpoint(session, job.checkpoint_id, namespace=namespace)
    return job


def list_jobs(
    session: Session,
    namespace: str,
    *,
    state: JobState | None,
    checkpoint_id: str | None,
    limit: int,
    offset: int,
) -> Sequence[Job]:
    """Jobs of the namespace's checkpoints, newest first."""
    stmt = (
        select(Job)
        .join(Checkpoint, Checkpoint.id == Job.checkpoint_id)
        .where(Checkpoint.namespace == namespace)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    )
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if checkpoint_id is not None:
        stmt = stmt.where(Job.checkpoint_id == checkpoint_id)
    return session.scalars(stmt).all()


def cancel_job(session: Session, job_id: str, namespace: str) -> Job:
    """Cancel a job; a queued one stops at once (its checkpoint becomes ``failed``)."""
    get_job(session, job_id, namespace)
    session.rollback()
    return queue.request_cancel(session, job_id)


# -- deletes ---------------------------------------------------------------------------------


def delete_base(session: Session, base_id: str, namespace: str) -> None:
    repo.delete_base(session, base_id, namespace=namespace)
    session.commit()


def delete_checkpoint(session: Session, checkpoint_id: str, namespace: str) -> None:
    repo.delete_checkpoint(session, checkpoint_id, namespace=namespace)
    session.commit()


def checkpoint_base(session: Session, ckpt: Checkpoint) -> Base:
    base = session.get(Base, ckpt.base_id)
    if base is None:  # guarded by a RESTRICT foreign key; here for the type checker
        raise NotFound(f"base {ckpt.base_id} of checkpoint {ckpt.name!r} is gone")
    return base

"""What the dashboard shows, read from the database in one pass: :func:`build`.

Every byte figure follows the one definition of stored bytes (:mod:`storage.repo`): the blobs
the rows reference, each counted once where shared, split into parts — base files, checkpoint
deltas, originals retained, uploads not compressed yet, uploads of failed jobs — and each
total on the page says which parts it holds. The tile is the namespace's total (``GET
/v1/stats``); a base's bar is its files plus its checkpoints' blobs (the bars add up to the
tile unless bases share a file); a checkpoint's "stored" is the blobs it references (its delta
once compressed). *Logical* bytes are what the models would take as plain files.

``auto`` checkpoints show their trail (every candidate judged, its fidelity against the floor)
instead of a search trace, the encoding auto chose, and auto's whole run as their search time
(``search_seconds`` of records written before auto reported it counted only the final
encoding's own search).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from core.params import AutoStep, CompressOutcome, CompressParams, Method
from service import operations
from service.dashboard import charts
from service.schemas import split_error
from storage import repo, revisions
from storage.models import Base, Checkpoint, Job, JobState

#: How many rows the page lists at most (the JSON API pages through everything).
MAX_ROWS = 1000
#: Failed jobs listed (newest first).
MAX_FAILED = 20


def human_bytes(n: int | None) -> str:
    """Decimal units, like the CLI: ``91.6 MB``."""
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(value) < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def ratio_text(logical: int, stored: int) -> str:
    return f"{logical / stored:.1f}×" if stored > 0 else "–"


@dataclass
class CheckpointRow:
    id: str
    name: str
    base_id: str
    base_name: str
    state: str
    method: str
    keep: float | None
    value_bits: int | None
    evaluation: str | None
    original_bytes: int
    stored_bytes: int | None
    stored_parts: dict[str, int]
    ratio: float | None
    bits_per_param: float | None
    fidelity: float | None
    search_seconds: float | None
    error: str | None
    trace_points: int
    encoded: str | None = None  # the encoding ``auto`` chose

    @property
    def method_text(self) -> str:
        return f"{self.method} → {self.encoded}" if self.encoded else self.method

    @property
    def stored_title(self) -> str:
        """What the stored figure holds, part by part (a tooltip)."""
        return parts_text(self.stored_parts) or "nothing stored"


@dataclass
class BaseRow:
    id: str
    name: str
    state: str
    total_bytes: int
    num_params: int | None
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    stored: repo.StoredBytes = field(default_factory=repo.StoredBytes)

    @property
    def checkpoints_logical(self) -> int:
        return sum(c.original_bytes for c in self.checkpoints)

    @property
    def base_stored(self) -> int:
        """The base's own files."""
        return self.stored.parts[repo.StoredPart.BASES]

    @property
    def checkpoint_parts(self) -> dict[str, int]:
        """Its checkpoints' blobs by part (a file shared with the base counts as the base's)."""
        return {k: v for k, v in self.stored.parts.items() if k != repo.StoredPart.BASES}

    @property
    def checkpoints_stored(self) -> int:
        return sum(self.checkpoint_parts.values())


@dataclass
class JobRow:
    id: str
    kind: str
    checkpoint_id: str
    checkpoint_name: str
    state: str
    phase: str | None
    generation: int | None
    generations: int | None
    best_fitness: float | None
    evaluations: int | None
    error_code: str | None
    error_detail: str | None
    attempts: int
    max_attempts: int
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def is_auto(self) -> bool:
        return self.progress.get("phase") == "auto" and "candidate" in self.progress

    @property
    def steps(self) -> tuple[int, int] | None:
        """(done, planned) for the progress bar, or None when unknown (an indefinite bar)."""
        p = self.progress
        if self.is_auto:
            k, n = _int(p.get("candidate_index")), _int(p.get("candidates_total"))
        else:
            k, n = self.generation, self.generations
        return (k or 0, n) if n else None

    @property
    def progress_text(self) -> str:
        if self.state == JobState.QUEUED.value:
            text = "waiting for a worker"
            return f"{text} (retry after: {self.error_detail})" if self.error_detail else text
        if self.is_auto:
            return auto_progress_text(self.progress)
        parts = [self.phase or self.state]
        if self.generation is not None:
            parts.append(f"generation {self.generation}/{self.generations or '?'}")
        if self.best_fitness is not None:
            parts.append(f"best fitness {self.best_fitness:.6g}")
        if self.evaluations:
            parts.append(f"{self.evaluations} evaluations")
        return " · ".join(parts)


def auto_progress_text(p: dict[str, Any]) -> str:
    """``auto``'s progress (CONTRACT: candidate k of N, the candidate, its score against the
    floor, elapsed time and an estimate of what is left)."""
    k, n = _int(p.get("candidate_index")), _int(p.get("candidates_total"))
    parts = [f"auto · candidate {k or '?'}/{n or '?'}"]
    cand = p.get("candidate")
    if isinstance(cand, dict):
        parts.append(candidate_text(cand))
    fid, floor = _float(p.get("fidelity")), _float(p.get("floor"))
    if fid is None:
        parts.append("judging" + (f" against floor {floor:.4g}" if floor is not None else ""))
    else:
        passed = p.get("passed")
        verdict = (
            {True: "passed", False: "rejected"}.get(passed, "") if isinstance(passed, bool) else ""
        )
        against = f" vs floor {floor:.4g}" if floor is not None else ""
        parts.append(f"fidelity {fid:.4f}{against}{' ' + verdict if verdict else ''}")
    elapsed, eta = _float(p.get("elapsed_seconds")), _float(p.get("eta_seconds"))
    if elapsed is not None:
        parts.append(f"{elapsed:.0f} s elapsed")
    parts.append(f"about {eta:.0f} s left" if eta is not None else "time left unknown")
    return " · ".join(parts)


def candidate_text(c: dict[str, Any]) -> str:
    """``dare keep 0.03 3-bit`` of a progress report's candidate (lossless: just the method)."""
    return _candidate(str(c.get("method") or "?"), _float(c.get("keep")), _int(c.get("value_bits")))


def _step_text(step: AutoStep) -> str:
    return _candidate(step.method, step.keep, step.value_bits)


def _candidate(method: str, keep: float | None, bits: int | None) -> str:
    """``dare keep 0.03 3-bit`` (lossless: just the method)."""
    out = method
    if keep is not None and method != "lossless":
        out += f" keep {keep:g}"
    if bits is not None and method != "lossless":
        out += f" {bits}-bit"
    return out


def parts_text(parts: dict[str, int]) -> str:
    """``checkpoint deltas 2.1 MB, uploads of failed jobs 8.2 MB`` (non-zero parts)."""
    return ", ".join(
        f"{repo.STORED_PART_LABELS[k]} {human_bytes(v)}" for k, v in parts.items() if v
    )


@dataclass
class Totals:
    logical_bytes: int
    stored_bytes: int
    num_bases: int
    num_checkpoints: int
    num_blobs: int
    checkpoints_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    stored_parts: dict[str, int] = field(default_factory=lambda: repo.StoredBytes().parts)

    @property
    def saved_bytes(self) -> int:
        return max(0, self.logical_bytes - self.stored_bytes)

    @property
    def parts(self) -> list[tuple[str, str]]:
        """(part, label) of the stored tile's lines: bases and deltas always, others when
        something is in them."""
        return [
            (k, repo.STORED_PART_LABELS[k])
            for k, v in self.stored_parts.items()
            if v or k in (repo.StoredPart.BASES, repo.StoredPart.DELTAS)
        ]

    def text(self) -> dict[str, str]:
        """The figures as the page prints them (also sent to the live refresh)."""
        out = {
            "logical": human_bytes(self.logical_bytes),
            "stored": human_bytes(self.stored_bytes),
            "saved": human_bytes(self.saved_bytes),
            "factor": ratio_text(self.logical_bytes, self.stored_bytes),
            "bases": str(self.num_bases),
            "checkpoints": str(self.num_checkpoints),
        }
        for part, size in self.stored_parts.items():
            out[f"stored-{part}"] = human_bytes(size)
        for state in JobState:
            out[f"jobs-{state.value}"] = str(self.jobs_by_state.get(state.value, 0))
        return out


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One revision of the selected checkpoint's repository."""

    number: int
    commit_id: str
    created_at: str
    method: str
    stored_bytes: int | None
    fidelity: float | None
    refs: list[str]
    checkpoint_id: str | None
    message: str


@dataclass
class Dashboard:
    totals: Totals
    bases: list[BaseRow]
    checkpoints: list[CheckpointRow]
    active_jobs: list[JobRow]
    failed_jobs: list[JobRow]
    selected: CheckpointRow | None
    savings_chart: Any
    scatter_chart: Any
    trace_chart: Any
    fingerprint: str
    trail: AutoTrail | None = None
    history: list[HistoryRow] = field(default_factory=list)


def build(session: Session, namespace: str, selected_id: str | None = None) -> Dashboard:
    """Everything the page shows for one namespace."""
    totals = live_totals(session, namespace)
    stored_by_base = repo.stored_bytes_by_base(session, namespace=namespace)
    bases = [
        BaseRow(
            b.id,
            b.name,
            b.state.value,
            b.total_bytes,
            b.num_params,
            stored=stored_by_base.get(b.id, repo.StoredBytes()),
        )
        for b in repo.list_bases(session, namespace=namespace, limit=MAX_ROWS)
    ]
    count, size = repo.unlisted_bases(session, namespace=namespace)
    if count:  # revisions stored whole without weights (a README, a tokenizer pushed alone)
        name = f"{count} without weights"  # short: it labels a bar of the chart
        stored_other = stored_by_base.get(repo.UNLISTED, repo.StoredBytes())
        bases.append(BaseRow(repo.UNLISTED, name, "ready", size, None, stored=stored_other))
    by_id = {b.id: b for b in bases}
    rows = repo.list_checkpoints(session, namespace=namespace, limit=MAX_ROWS)
    stored = repo.stored_bytes_by_checkpoint(session, [c.id for c in rows])
    outcomes = {c.id: CompressOutcome.from_row(c) for c in rows}  # each trace read once
    trails = {c.id: auto_trail(c, outcomes[c.id]) for c in rows}
    checkpoints = [_row(c, by_id, stored.get(c.id), trails[c.id], outcomes[c.id]) for c in rows]
    for c in checkpoints:
        if c.base_id in by_id:
            by_id[c.base_id].checkpoints.append(c)
    active, failed = jobs(session, namespace, {c.id: c.name for c in checkpoints})
    selected = _select(checkpoints, selected_id)
    trail = trails.get(selected.id) if selected else None
    return Dashboard(
        totals=totals,
        bases=bases,
        checkpoints=checkpoints,
        active_jobs=active,
        failed_jobs=failed,
        selected=selected,
        savings_chart=charts.savings(
            [_bar(b) for b in bases], "Logical vs stored bytes by base", human_bytes
        ),
        scatter_chart=charts.scatter(
            [
                charts.Point(
                    c.bits_per_param,
                    c.fidelity,
                    c.name,
                    f"{c.name} ({c.method_text}): {c.bits_per_param:.3f} bits/param, "
                    f"fidelity {c.fidelity:.4f}",
                    c.method,
                    c.id,
                )
                for c in checkpoints
                if c.bits_per_param is not None and c.fidelity is not None
            ],
            "stored bits per parameter",
            "fidelity",
            "Bits per parameter against fidelity",
        ),
        trace_chart=_trace_chart(selected, trail, outcomes),
        fingerprint=fingerprint(rows),
        trail=trail,
        history=[] if selected is None else history(session, namespace, selected.name),
    )


def history(session: Session, namespace: str, name: str) -> list[HistoryRow]:
    """The revisions of the repository ``name``, newest first (at most :data:`MAX_ROWS`)."""
    holder = revisions.find_repo(session, name=name, namespace=namespace)
    if holder is None:
        return []
    out = []
    for info in revisions.describe(
        session, revisions.list_revisions(session, holder, limit=MAX_ROWS)
    ):
        r, stored = info.revision, info.stored
        ckpt = stored if isinstance(stored, Checkpoint) else None
        out.append(
            HistoryRow(
                number=r.number,
                commit_id=r.commit_id,
                created_at=r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                method="whole" if ckpt is None else ckpt.method,
                stored_bytes=ckpt.stored_bytes
                if ckpt is not None
                else (stored.total_bytes if isinstance(stored, Base) else None),
                fidelity=None if ckpt is None else CompressOutcome.from_row(ckpt).fidelity,
                refs=info.refs,
                checkpoint_id=r.checkpoint_id,
                message=r.message,
            )
        )
    return out


def live_totals(session: Session, namespace: str) -> Totals:
    s = repo.stats(session, namespace=namespace)
    return Totals(
        s.logical_bytes,
        s.stored_bytes,
        s.num_bases,
        s.num_checkpoints,
        s.num_blobs,
        dict(s.checkpoints_by_state),
        dict(s.jobs_by_state),
        dict(s.stored_parts),
    )


def jobs(
    session: Session, namespace: str, names: dict[str, str] | None = None
) -> tuple[list[JobRow], list[JobRow]]:
    """(queued and running jobs, the most recent failed ones)."""

    def rows(state: JobState, limit: int) -> list[Job]:
        return list(
            operations.list_jobs(
                session, namespace, state=state, checkpoint_id=None, limit=limit, offset=0
            )
        )

    names = names if names is not None else _names(session, namespace)
    active = rows(JobState.RUNNING, MAX_ROWS) + rows(JobState.QUEUED, MAX_ROWS)
    failed = rows(JobState.FAILED, MAX_FAILED)
    return [_job(j, names) for j in active], [_job(j, names) for j in failed]


def fingerprint(rows: list[Checkpoint]) -> str:
    """Changes whenever a checkpoint appears, goes, or changes state (the page then reloads
    its static sections)."""
    h = hashlib.sha256()
    for c in rows:
        h.update(f"{c.id}:{c.state.value}:{c.updated_at.isoformat()}\n".encode())
    return h.hexdigest()[:16]


def checkpoints_fingerprint(session: Session, namespace: str) -> str:
    return fingerprint(repo.list_checkpoints(session, namespace=namespace, limit=MAX_ROWS))


@dataclass
class AutoTrail:
    """``auto``'s trail as the page draws it: the judged candidates, the floor, the choice."""

    steps: list[charts.TrailStep]
    floor: float | None
    encoded: str | None
    chosen: str | None  # "dare keep 0.03 3-bit"
    fidelity: float | None
    reason: str | None
    seconds: float | None


def auto_trail(c: Checkpoint, outcome: CompressOutcome | None = None) -> AutoTrail | None:
    """The trail of an ``auto`` checkpoint (None for other methods).

    Reads the steps of CONTRACT.md (``fidelity``, ``floor``, ``passed``, ``part``,
    ``examples``, ``seconds``; final ``encoded``, ``reason``) and the older records too
    (``fidelity_holdout``, ``evaluations``, ``fidelity_search``; floor from the checkpoint's
    ``min_fidelity``) — :class:`core.params.SearchTrace` reads both."""
    if c.method != Method.AUTO:
        return None
    outcome = outcome or CompressOutcome.from_row(c)
    search = outcome.search
    floor = CompressParams.from_row(c.params).min_fidelity
    final = search.choice
    steps: list[charts.TrailStep] = []
    for i, step in enumerate(search.steps, 1):
        fid = step.fidelity
        if fid is None:
            continue
        floor = step.floor if step.floor is not None else floor
        passed = step.passed if step.passed is not None else floor is not None and fid >= floor
        detail = [
            f"{i}. {_step_text(step)}",
            f"fidelity {fid:.4f}" + (f" vs floor {floor:.4g}" if floor is not None else ""),
            "passed" if passed else "rejected",
        ]
        if step.part or step.examples:
            detail.append(
                f"on {step.examples or '?'} {step.part or ''} examples".replace("  ", " ")
            )
        if step.estimated_bits is not None:
            detail.append(f"≈{step.estimated_bits:.3g} bits/param")
        if step.seconds is not None:
            detail.append(f"{step.seconds:.1f} s")
        chosen = final is not None and final.is_step(step)
        steps.append(charts.TrailStep(i, fid, passed, _step_text(step), " · ".join(detail), chosen))
    return AutoTrail(
        steps=steps,
        floor=floor,
        encoded=final.encoded if final else outcome.encoded,
        chosen=_candidate(final.encoded, final.keep, final.value_bits) if final else None,
        fidelity=final.fidelity if final else outcome.fidelity,
        reason=final.reason if final else None,
        seconds=_auto_seconds(c, outcome, search.steps),
    )


# -- helpers -------------------------------------------------------------------------------------


def _trace_chart(
    selected: CheckpointRow | None, trail: AutoTrail | None, outcomes: dict[str, CompressOutcome]
) -> Any:
    if selected is None:
        return charts.empty("trace", "no checkpoint with a search trace or an auto trail yet")
    if trail is not None:
        return charts.trail(
            trail.steps,
            trail.floor,
            f"Auto's trail of {selected.name}",
            empty_message="auto judged no candidate"
            + (f"; it stored {trail.encoded}" if trail.encoded else ""),
        )
    outcome = outcomes.get(selected.id)
    search = outcome.search if outcome is not None else None
    if search is None or not search.points:
        return charts.empty("trace", f"no search trace ({selected.method} does not search)")
    return charts.line(
        list(search.points),
        search.step_name,
        "best fitness",
        f"Search trace of {selected.name}",
    )


def _auto_seconds(
    c: Checkpoint, outcome: CompressOutcome, judged: tuple[AutoStep, ...]
) -> float | None:
    """Auto's search time: ``search_seconds`` as recorded (the figure every other view shows).
    Records from before auto reported it hold 0 or the final encoding's own search there; their
    run's length is then the longer of ``fitness.total_seconds`` and the judged steps."""
    if c.search_seconds:  # auto's own figure, the one `slim show` and the API report
        return c.search_seconds
    steps = sum(s.seconds or 0.0 for s in judged)
    found = [v for v in (outcome.total_seconds, steps or None) if v]
    return max(found) if found else c.search_seconds


def _row(
    c: Checkpoint,
    bases: dict[str, BaseRow],
    stored: repo.StoredBytes | None,
    trail: AutoTrail | None,
    outcome: CompressOutcome,
) -> CheckpointRow:
    params = CompressParams.from_row(c.params)
    base = bases.get(c.base_id)
    keep, bits = params.keep, params.value_bits
    encoded = trail.encoded if trail else None
    if encoded:  # auto: what it chose
        keep, bits = outcome.keep, outcome.value_bits
    stored = stored or repo.StoredBytes()
    return CheckpointRow(
        id=c.id,
        name=c.name,
        base_id=c.base_id,
        base_name=base.name if base else c.base_id[:8],
        state=c.state.value,
        method=c.method,
        keep=keep if (encoded or c.method) != "lossless" else None,
        value_bits=bits if (encoded or c.method) != "lossless" else None,
        evaluation=None if params.evaluation is None else str(params.evaluation),
        original_bytes=c.original_bytes,
        stored_bytes=stored.total if stored.num_blobs else None,
        stored_parts=stored.parts,
        ratio=c.ratio,
        bits_per_param=c.bits_per_param,
        fidelity=outcome.fidelity,
        search_seconds=trail.seconds if trail else c.search_seconds,
        error=c.error,
        trace_points=len(trail.steps) if trail else len(outcome.search.points),
        encoded=encoded,
    )


def _bar(b: BaseRow) -> charts.Bar:
    logical = b.total_bytes + b.checkpoints_logical
    stored = b.stored.total
    n = len(b.checkpoints)
    note = (
        f"base files {human_bytes(b.base_stored)} + {n} checkpoint{'s' if n != 1 else ''} "
        f"{human_bytes(b.checkpoints_stored)} · saved {human_bytes(max(0, logical - stored))} "
        f"({ratio_text(logical, stored)})"
    )
    return charts.Bar(b.name, logical, stored, note)


def _select(checkpoints: list[CheckpointRow], selected_id: str | None) -> CheckpointRow | None:
    """The checkpoint asked for, else the newest one with a search trace or an auto trail."""
    for c in checkpoints:
        if c.id == selected_id:
            return c
    with_trace = [c for c in checkpoints if c.trace_points]
    return with_trace[-1] if with_trace else None


def _names(session: Session, namespace: str) -> dict[str, str]:
    return {
        c.id: c.name for c in repo.list_checkpoints(session, namespace=namespace, limit=MAX_ROWS)
    }


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _job(j: Job, names: dict[str, str]) -> JobRow:
    p = j.progress or {}
    error = split_error(j.error)
    return JobRow(
        id=j.id,
        kind=j.kind.value,
        checkpoint_id=j.checkpoint_id,
        checkpoint_name=names.get(j.checkpoint_id, j.checkpoint_id[:8]),
        state=j.state.value,
        phase=p.get("phase") if isinstance(p.get("phase"), str) else None,
        generation=_int(p.get("generation")),
        generations=_int(p.get("generations")),
        best_fitness=_float(p.get("best_fitness")),
        evaluations=_int(p.get("evaluations")),
        error_code=error.code if error else None,
        error_detail=error.detail if error else None,
        attempts=j.attempts,
        max_attempts=j.max_attempts,
        progress=dict(p),
    )

"""What the dashboard shows, read from the database in one pass: :func:`build`.

Numbers follow ``GET /v1/stats``: *logical* bytes are what the models would take as plain
files (base files plus every checkpoint's files as uploaded); *stored* bytes are the distinct
blobs actually kept. Per base, the savings chart compares the base plus its checkpoints'
original files against the base plus their stored deltas (a checkpoint not compressed yet
counts its uploaded files as stored).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from service import operations
from service.dashboard import charts
from service.schemas import split_error
from storage import repo
from storage.models import Checkpoint, CheckpointState, Job, JobState

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
    ratio: float | None
    bits_per_param: float | None
    fidelity: float | None
    search_seconds: float | None
    error: str | None
    trace_points: int


@dataclass
class BaseRow:
    id: str
    name: str
    state: str
    total_bytes: int
    num_params: int | None
    checkpoints: list[CheckpointRow] = field(default_factory=list)

    @property
    def checkpoints_logical(self) -> int:
        return sum(c.original_bytes for c in self.checkpoints)

    @property
    def checkpoints_stored(self) -> int:
        return sum(_stored(c) for c in self.checkpoints)


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

    @property
    def progress_text(self) -> str:
        parts = [self.phase or self.state]
        if self.generation is not None:
            parts.append(f"generation {self.generation}/{self.generations or '?'}")
        if self.best_fitness is not None:
            parts.append(f"best fitness {self.best_fitness:.6g}")
        if self.evaluations:
            parts.append(f"{self.evaluations} evaluations")
        return " · ".join(parts)


@dataclass
class Totals:
    logical_bytes: int
    stored_bytes: int
    num_bases: int
    num_checkpoints: int
    num_blobs: int
    checkpoints_by_state: dict[str, int]
    jobs_by_state: dict[str, int]

    @property
    def saved_bytes(self) -> int:
        return max(0, self.logical_bytes - self.stored_bytes)

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
        for state in JobState:
            out[f"jobs-{state.value}"] = str(self.jobs_by_state.get(state.value, 0))
        return out


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


def build(session: Session, namespace: str, selected_id: str | None = None) -> Dashboard:
    """Everything the page shows for one namespace."""
    totals = live_totals(session, namespace)
    bases = [
        BaseRow(b.id, b.name, b.state.value, b.total_bytes, b.num_params)
        for b in repo.list_bases(session, namespace=namespace, limit=MAX_ROWS)
    ]
    by_id = {b.id: b for b in bases}
    rows = repo.list_checkpoints(session, namespace=namespace, limit=MAX_ROWS)
    traces = {c.id: trace_points(c.trace) for c in rows}
    checkpoints = [_row(c, by_id, len(traces[c.id])) for c in rows]
    for c in checkpoints:
        if c.base_id in by_id:
            by_id[c.base_id].checkpoints.append(c)
    active, failed = jobs(session, namespace, {c.id: c.name for c in checkpoints})
    selected = _select(checkpoints, selected_id, traces)
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
                    f"{c.name} ({c.method}): {c.bits_per_param:.3f} bits/param, "
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
        trace_chart=charts.line(
            traces.get(selected.id, []) if selected else [],
            _step_name(next((c.trace for c in rows if selected and c.id == selected.id), None)),
            "best fitness",
            f"Search trace of {selected.name}" if selected else "Search trace",
        ),
        fingerprint=fingerprint(rows),
    )


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


def trace_points(trace: Any) -> list[tuple[float, float]]:
    """(step, best fitness) of a search trace: nps records generations, ``magnitude-scaled``
    evaluations; ``auto`` prefixes its trail (skipped here)."""
    out: list[tuple[float, float]] = []
    for i, entry in enumerate(trace if isinstance(trace, list) else []):
        if not isinstance(entry, dict) or not isinstance(entry.get("best_fitness"), int | float):
            continue
        step = entry.get("generation", entry.get("evaluation", i))
        if isinstance(step, int | float):
            out.append((float(step), float(entry["best_fitness"])))
    return out


# -- helpers -------------------------------------------------------------------------------------


def _step_name(trace: Any) -> str:
    """What a trace counts: CMA-ES generations (nps), else single evaluations (scale search)."""
    entries = trace if isinstance(trace, list) else []
    if any(isinstance(e, dict) and "generation" in e for e in entries):
        return "generation"
    return "evaluation"


def _row(c: Checkpoint, bases: dict[str, BaseRow], trace_len: int) -> CheckpointRow:
    params = c.params or {}
    fitness = c.fitness or {}
    fidelity = fitness.get("fidelity")
    base = bases.get(c.base_id)
    return CheckpointRow(
        id=c.id,
        name=c.name,
        base_id=c.base_id,
        base_name=base.name if base else c.base_id[:8],
        state=c.state.value,
        method=c.method,
        keep=params.get("keep") if c.method != "lossless" else None,
        value_bits=params.get("value_bits"),
        evaluation=params.get("evaluation"),
        original_bytes=c.original_bytes,
        stored_bytes=c.stored_bytes,
        ratio=c.ratio,
        bits_per_param=c.bits_per_param,
        fidelity=float(fidelity) if isinstance(fidelity, int | float) else None,
        search_seconds=c.search_seconds,
        error=c.error,
        trace_points=trace_len,
    )


def _stored(c: CheckpointRow) -> int:
    if c.state == CheckpointState.READY.value and c.stored_bytes is not None:
        return c.stored_bytes
    return c.original_bytes if c.state != CheckpointState.FAILED.value else 0


def _bar(b: BaseRow) -> charts.Bar:
    logical = b.total_bytes + b.checkpoints_logical
    stored = b.total_bytes + b.checkpoints_stored
    n = len(b.checkpoints)
    note = f"{n} checkpoint{'s' if n != 1 else ''}, saved {human_bytes(max(0, logical - stored))}"
    return charts.Bar(b.name, logical, stored, f"{note} ({ratio_text(logical, stored)})")


def _select(
    checkpoints: list[CheckpointRow], selected_id: str | None, traces: dict[str, Any]
) -> CheckpointRow | None:
    """The checkpoint asked for, else the newest one with a search trace."""
    for c in checkpoints:
        if c.id == selected_id:
            return c
    with_trace = [c for c in checkpoints if traces.get(c.id)]
    return with_trace[-1] if with_trace else None


def _names(session: Session, namespace: str) -> dict[str, str]:
    return {
        c.id: c.name for c in repo.list_checkpoints(session, namespace=namespace, limit=MAX_ROWS)
    }


def _job(j: Job, names: dict[str, str]) -> JobRow:
    p = j.progress or {}
    error = split_error(j.error)

    def num(key: str) -> Any:
        v = p.get(key)
        return v if isinstance(v, int | float) and not isinstance(v, bool) else None

    return JobRow(
        id=j.id,
        kind=j.kind.value,
        checkpoint_id=j.checkpoint_id,
        checkpoint_name=names.get(j.checkpoint_id, j.checkpoint_id[:8]),
        state=j.state.value,
        phase=p.get("phase") if isinstance(p.get("phase"), str) else None,
        generation=num("generation"),
        generations=num("generations"),
        best_fitness=num("best_fitness"),
        evaluations=num("evaluations"),
        error_code=error.code if error else None,
        error_detail=error.detail if error else None,
        attempts=j.attempts,
        max_attempts=j.max_attempts,
    )

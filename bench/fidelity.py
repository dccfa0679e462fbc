"""Fidelity benchmark: NPS, its seeded variant and the baselines at equal stored bits.

Real base (all-MiniLM-L6-v2), real fine-tunes on two real tasks (bench/finetune.py), the
validation split for calibration (the searches' fitness), the full test split for every
reported number. Each grid point compresses the fine-tune for real, rebuilds every tensor from
the written delta and measures test accuracy; bits per parameter count everything stored for
the weights (positions, values, codebooks, the new head, headers, the document).

Run: ``python -m bench fidelity`` (``--quick`` for one task, fewer points, one seed).
Outputs ``bench/results/fidelity.{json,md,png}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.data import MULTICLASS_TASKS, SHARED_TASKS, Example, load_task
from bench.finetune import (
    Recipe,
    base_bf16,
    base_model_dir,
    bf16_cast,
    cached_dir,
    full_recipe,
    load_finetune,
    make_finetune,
    read_marker,
)
from core.auto import auto_compress
from core.compress import build_evaluator, compress
from core.constants import FORMAT_VERSION
from core.evaluate import Example as CalExample
from core.evaluate import ModelEvaluator
from core.reconstruct import load_state
from core.summary import describe
from core.workspace import Workspace

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Series:
    """One curve of the benchmark: a method (with options) across keep ratios and bit widths."""

    label: str
    method: str
    keeps: tuple[float, ...]
    bits: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    evaluation: str = "weights"
    options: dict[str, Any] = field(default_factory=dict)


KEEPS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
#: Validation examples for the fitness (96 drive the search, 32 pick its winner): the ranking
#: of candidates on 96 examples matched the ranking on 768 as well as 192 did
#: (``results/calibration_size.md``), at half the cost of an evaluation.
DEFAULT_CALIBRATION = 128
SEEDS = (0, 1, 2)


def full_grid() -> list[Series]:
    """The committed grid, most telling rows first (a cut-short run still answers the main
    question: does the NPS family reach the goal at ≤ 0.1 bits/param, and against what).
    Three seeds for every random or searched series; one for the deterministic ones
    (``lossless``, ``magnitude``, ``magnitude-scaled``: a fixed grid and golden-section search
    on a fixed calibration set) and for ``auto``, whose row checks one choice on the test split."""
    ends = (0.002, 0.1)
    return [
        Series("lossless", "lossless", (1.0,), (16,)),
        Series("nps-seeded", "nps-seeded", (0.02,), (4,), SEEDS, "fidelity"),
        Series("dare", "dare", (0.02, 0.01), (4, 16), SEEDS),
        Series("dare", "dare", (0.025,), (3,), SEEDS),
        # token embeddings left at DARE's rate: calibration texts exercise few of their rows
        Series(
            "nps-seeded (embeddings fixed)",
            "nps-seeded",
            (0.025,),
            (3,),
            SEEDS,
            "fidelity",
            {"fixed": "embed"},
        ),
        Series("nps-seeded", "nps-seeded", (0.025,), (3,), SEEDS, "fidelity"),
        Series("auto (floor 0.99)", "auto", (1.0,), (0,), (0,), "fidelity", {"min_fidelity": 0.99}),
        # the search under the earlier entry-count budget (see NOTES.md, "bits budget")
        Series(
            "nps-seeded (entry budget)",
            "nps-seeded",
            (0.02,),
            (4,),
            SEEDS,
            "fidelity",
            {"budget": "entries"},
        ),
        Series("magnitude", "magnitude", KEEPS, (16,)),
        Series("magnitude-scaled", "magnitude-scaled", KEEPS, (16,), evaluation="fidelity"),
        Series("nps", "nps", (0.01,), (16,), SEEDS, "fidelity"),
        Series("nps-paper", "nps", (0.01,), (16,), SEEDS, "accuracy", {"preset": "paper"}),
        Series("nps-seeded", "nps-seeded", (0.01, 0.005), (4,), SEEDS, "fidelity"),
        Series("dare", "dare", (0.005, 0.05), (16, 4), SEEDS),
        Series("nps", "nps", (0.05,), (16,), SEEDS, "fidelity"),
        Series("nps-paper", "nps", (0.05,), (16,), SEEDS, "accuracy", {"preset": "paper"}),
        Series("dare", "dare", ends, (16, 4), SEEDS),
        Series("dare", "dare", (0.01, 0.02, 0.05), (2,), SEEDS),
        Series("nps-seeded", "nps-seeded", (0.02, 0.01), (2,), SEEDS, "fidelity"),
        Series("nps-seeded", "nps-seeded", (0.05, 0.1), (4,), SEEDS, "fidelity"),
        Series("nps", "nps", (0.01,), (4,), SEEDS, "fidelity"),
        Series("magnitude", "magnitude", (0.01, 0.05), (4,)),
        Series("nps-seeded (accuracy)", "nps-seeded", (0.01,), (4,), SEEDS, "accuracy"),
    ]


def tasks_grid() -> list[Series]:
    """Every method of the registry (and ``auto``) at 0.04–0.1 bits/param, plus one DARE point
    above: the grid run on the multi-class tasks, which were kept apart from the settings'
    tuning (the full grid's sweep of keep ratios and presets stays on the shared tasks).
    Most telling rows first, three seeds for every random or searched series but plain ``nps``."""
    return [
        Series("lossless", "lossless", (1.0,), (16,)),
        Series("nps-seeded", "nps-seeded", (0.02,), (2, 4), SEEDS, "fidelity"),
        Series("dare", "dare", (0.015, 0.02), (2,), SEEDS),
        Series("dare", "dare", (0.02,), (4,), SEEDS),
        Series("hybrid", "hybrid", (0.015, 0.02), (2,), SEEDS),
        Series("auto (floor 0.99)", "auto", (1.0,), (0,), (0,), "fidelity", {"min_fidelity": 0.99}),
        Series("lowrank", "lowrank", (0.02,), (4,)),
        Series("hybrid-seeded", "hybrid-seeded", (0.02,), (2,), SEEDS, "fidelity"),
        Series("dare", "dare", (0.025,), (3,), SEEDS),
        # ~0.08-0.09 bits/param in format 6: the most DARE's seeded mask keeps under 0.1
        Series("dare", "dare", (0.04,), (2,), SEEDS),
        Series("magnitude", "magnitude", (0.02,), (4,)),
        Series("magnitude-scaled", "magnitude-scaled", (0.02,), (4,), evaluation="fidelity"),
        Series("dare", "dare", (0.05,), (4,), SEEDS),
        # explicit positions put plain nps at ~0.14 bits/param for 1% (above the range asked
        # about), and nps-seeded dominated it on both shared tasks: one seed, as a reference
        Series("nps", "nps", (0.01,), (4,), (0,), "fidelity"),
    ]


def quick_grid() -> list[Series]:
    keeps = (0.005, 0.01, 0.02, 0.05)
    return [
        Series("lossless", "lossless", (1.0,), (16,)),
        Series("magnitude", "magnitude", keeps, (16,)),
        Series("magnitude-scaled", "magnitude-scaled", keeps, (16,), evaluation="fidelity"),
        Series("dare", "dare", keeps, (16, 4)),
        Series(
            "nps-paper",
            "nps",
            (0.01,),
            (16,),
            (0,),
            "accuracy",
            {"preset": "paper", "generations": 10},
        ),
        Series("nps", "nps", (0.01,), (16,), (0,), "fidelity", {"generations": 10}),
        Series(
            "nps-seeded", "nps-seeded", (0.01, 0.02), (4,), (0,), "fidelity", {"generations": 10}
        ),
    ]


@dataclass
class Row:
    task: str
    series: str
    method: str
    keep: float | None
    value_bits: int | None
    seed: int
    evaluation: str
    stored_bytes: int
    bits_per_param: float
    test_accuracy: float
    normalised_accuracy: float
    gain_kept: float
    calibration_fidelity: float | None
    search_seconds: float
    evaluations: int
    notes: list[str] = field(default_factory=list)
    grid_point: str = ""
    #: the delta format the row's delta was written in (its size depends on it; rows from
    #: before this field were written in versions up to 5)
    format_version: int = FORMAT_VERSION


def grid_point(series: Series, keep: float, bits: int, seed: int) -> str:
    """The key of one grid point (what was asked, not what auto chose), for resuming runs."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(series.options.items()))
    return f"{series.label}|{series.method}|{series.evaluation}|{opts}|{keep}|{bits}|{seed}"


def reusable_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run of the same fine-tune a run keeps, by grid point: those
    written in today's delta format (an older format's stored size is not today's, so its
    point is measured again)."""
    return {
        r["grid_point"]: r
        for r in rows
        if r.get("grid_point") and r.get("format_version") == FORMAT_VERSION
    }


def same_finetune(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two fine-tune markers describe the same weights: the recipe's key and outcome agree
    (the fine-tune is deterministic; when it was made, and how fast, does not matter)."""
    when = {"created", "train_seconds", "seconds_per_step"}
    return {k: v for k, v in a.items() if k not in when} == {
        k: v for k, v in b.items() if k not in when
    }


class TestHarness:
    """The fine-tune's model, kept in memory; scores a delta on the full test split."""

    def __init__(self, ft_dir: Path, test: list[Example]) -> None:
        from bench.finetune import _load_tokenizer, predict

        self.ft_dir = ft_dir
        # computed in float32 whatever the weights' dtype: a bf16 checkpoint's values are exact
        # in it, and the figures do not depend on whether the CPU has bf16 instructions
        self.model = load_finetune(ft_dir).float()
        self.original = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.tokenizer = _load_tokenizer(ft_dir)
        self.test = test
        self._predict = predict

    def accuracy(self, state: dict[str, torch.Tensor] | None = None) -> float:
        self.model.load_state_dict(state if state is not None else self.original, strict=True)
        preds = self._predict(self.model, self.test, tokenizer=self.tokenizer)
        return sum(p == e.label for p, e in zip(preds, self.test, strict=True)) / len(self.test)

    def removed_accuracy(self, base_dir: Path) -> float:
        from bench.finetune import remove_task_vector

        self.model.load_state_dict(self.original, strict=True)
        remove_task_vector(self.model, base_dir)
        preds = self._predict(self.model, self.test, tokenizer=self.tokenizer)
        return sum(p == e.label for p, e in zip(preds, self.test, strict=True)) / len(self.test)


def calibration(task_name: str, n: int, labels: bool) -> list[CalExample]:
    """The first ``n`` validation examples (a seeded shuffle) as calibration examples."""
    import random

    val = list(load_task(task_name).validation)
    random.Random(f"calibration-{task_name}").shuffle(val)
    return [CalExample(e.text, e.label if labels else None) for e in val[:n]]


def run_task(
    task_name: str,
    grid: list[Series],
    *,
    n_cal: int,
    workdir: Path,
    log: Any,
    save: Any = None,
    earlier: dict[str, Any] | None = None,
    measure: set[str] | None = None,
    recipe: Recipe | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Run the grid on one task (torch's thread count as the caller set it). ``earlier`` is
    this task's result from an interrupted run: its rows are reused when the fine-tune recipe
    and the calibration size are the same. ``measure``: labels of the series to measure now
    (None: all); the others only keep their reused rows. ``recipe``: the fine-tune to measure
    (default :func:`bench.finetune.full_recipe`). ``precision`` ``bf16``: the fine-tune and
    the base cast to bf16 (what a user holding bf16 checkpoints uploads); ``bf16-trained``:
    the default recipe trained with bf16 autocast (where the CPU has bf16 instructions, else in
    float32: the recipe's record says which), then cast. The result is keyed :func:`task_key`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    task = load_task(task_name)
    if recipe is None:
        recipe = full_recipe(task_name)
        if precision == "bf16-trained":
            recipe = replace(recipe, bf16=True)
    ft_dir = made = make_finetune(recipe)
    base = base_model_dir()
    if precision != "fp32":
        ft_dir, base = bf16_finetune(ft_dir), base_bf16()
    harness = TestHarness(ft_dir, list(task.test))
    acc_ft = harness.accuracy()
    acc_removed = harness.removed_accuracy(base)
    log(
        f"[{task_key(task_name, precision)}] fine-tuned {acc_ft:.4f}, τ removed {acc_removed:.4f}, test n={len(task.test)}"
    )
    evaluators: dict[str, ModelEvaluator] = {}
    rows: list[Row] = []
    summary: dict[str, Any] = {
        "task": task_key(task_name, precision),
        "precision": precision,
        "fine_tuned_accuracy": acc_ft,
        "removed_accuracy": acc_removed,
        "test_examples": len(task.test),
        "calibration_examples": n_cal,
        "recipe": read_marker(made),
        "rows": [],
    }
    reusable: dict[str, dict[str, Any]] = {}
    measured_before: dict[str, dict[str, Any]] = {}
    if (
        earlier
        and same_finetune(earlier.get("recipe") or {}, summary["recipe"])
        and earlier.get("calibration_examples") == n_cal
    ):
        reusable = reusable_rows(earlier.get("rows", []))
        measured_before = {
            r["grid_point"]: r for r in earlier.get("rows", []) if r.get("grid_point")
        }
    # Rows measured before go in first, so a run cut short never loses them; an older
    # format's row stays (marked by its format) only where this run does not measure its series.
    points = [
        (series.label, grid_point(series, keep, bits, seed))
        for series in grid
        for keep in series.keeps
        for bits in series.bits
        for seed in series.seeds
    ]
    summary["rows"] = [
        reusable.get(p) or measured_before[p]
        for label, p in points
        if p in reusable or (p in measured_before and measure is not None and label not in measure)
    ]
    if summary["rows"]:
        log(f"[{summary['task']}] {len(summary['rows'])} rows reused from the earlier run")
    for series in grid:
        for keep in series.keeps:
            for bits in series.bits:
                for seed in series.seeds:
                    point = grid_point(series, keep, bits, seed)
                    if point in reusable or (measure is not None and series.label not in measure):
                        continue
                    ev = None
                    if series.evaluation != "weights":
                        if series.evaluation not in evaluators:
                            with Workspace(base, ft_dir) as ws:
                                built = build_evaluator(
                                    series.evaluation,
                                    ws,
                                    ft_dir,
                                    calibration(task_name, n_cal, series.evaluation == "accuracy"),
                                    calibration_limit=n_cal,
                                )
                                assert built is not None
                                evaluators[series.evaluation] = built
                        ev = evaluators[series.evaluation]
                    out = workdir / f"{task_name}-{len(rows)}.slim"
                    if series.method == "auto":
                        opts = dict(series.options)
                        res = auto_compress(
                            base,
                            ft_dir,
                            out,
                            min_fidelity=opts.pop("min_fidelity"),
                            evaluation=series.evaluation,
                            seed=seed,
                            options=opts,
                            evaluator=ev,
                        )
                        info = describe(out)
                        keep, bits = info["keep"] or 1.0, info["value_bits"] or 16
                    else:
                        res = compress(
                            base,
                            ft_dir,
                            out,
                            method=series.method,
                            keep=keep,
                            value_bits=bits,
                            evaluation=series.evaluation,
                            seed=seed,
                            options=series.options,
                            evaluator=ev,
                        )
                    acc = harness.accuracy(load_state(base, out))
                    gain = (acc - acc_removed) / (acc_ft - acc_removed)
                    row = Row(
                        task=task_name,
                        series=series.label,
                        method=res.method,
                        keep=None if res.method == "lossless" else keep,
                        value_bits=None if res.method == "lossless" else bits,
                        seed=seed,
                        evaluation=series.evaluation,
                        stored_bytes=res.stored_bytes,
                        bits_per_param=res.bits_per_param,
                        test_accuracy=acc,
                        normalised_accuracy=acc / acc_ft,
                        gain_kept=gain,
                        calibration_fidelity=res.fidelity,
                        search_seconds=res.search_seconds,
                        evaluations=res.evaluations,
                        notes=res.notes,
                        grid_point=point,
                    )
                    rows.append(row)
                    log(
                        f"[{summary['task']}] {series.label:<22} keep={keep:<6} bits={bits:<2} seed={seed} "
                        f"bpp={res.bits_per_param:.4f} acc={acc:.4f} norm={acc / acc_ft:.4f} "
                        f"gain={gain:.3f} search={res.search_seconds:.0f}s"
                    )
                    out.unlink()
                    summary["rows"].append(asdict(row))
                    if save is not None:
                        save(summary)
    return summary


#: The precisions ``--precision`` names, and how the results' task names mark them.
PRECISIONS = {
    "fp32": "",
    "bf16": " (bf16 cast)",
    "bf16-trained": " (trained with bf16 autocast, bf16 cast)",
}


def task_key(task: str, precision: str) -> str:
    """How the results name ``task`` measured at ``precision`` (``"tweets (bf16 cast)"``)."""
    return task + PRECISIONS[precision]


def bf16_finetune(ft_dir: Path) -> Path:
    """The bf16 cast of the fine-tune ``ft_dir`` (cached beside it)."""
    return cached_dir(ft_dir.with_name(ft_dir.name + "-bf16"), lambda tmp: bf16_cast(ft_dir, tmp))


def machine_note() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cuda": torch.cuda.is_available(),
        # search seconds depend on it; sizes and accuracies do not
        "load_1min_at_start": round(os.getloadavg()[0], 1),
    }


#: The grids ``--grid`` names, and the tasks each runs on unless ``--tasks`` says.
GRIDS = {"full": full_grid, "tasks": tasks_grid, "quick": quick_grid}
GRID_TASKS: dict[str, tuple[str, ...]] = {
    "full": SHARED_TASKS,
    "tasks": MULTICLASS_TASKS,
    "quick": ("rotten_tomatoes",),
}


def run(
    quick: bool,
    tasks: list[str] | None,
    out_dir: Path = RESULTS,
    n_cal: int = DEFAULT_CALIBRATION,
    fresh: bool = False,
    series: list[str] | None = None,
    threads: int = 2,
    grid_name: str | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Run the grid ``grid_name`` (one of :data:`GRIDS`; default ``quick`` when ``quick``, else
    ``full``); the quick grid writes ``fidelity-quick.*``, the others ``fidelity.*``.
    ``precision`` ``bf16`` measures the bf16 casts of the fine-tunes against the base's
    (:func:`run_task`), results keyed apart from the fp32 ones. Rows an interrupted earlier run already measured are reused unless
    ``fresh``. ``series`` measures only the series with these labels (rows of the others
    already measured are kept; the rest are left for a later run). Runs of different tasks
    may go on at the same time (each with ``threads`` torch threads): each save merges the
    other tasks' latest results from disk under a lock."""
    torch.set_num_threads(threads)
    grid_name = grid_name or ("quick" if quick else "full")
    quick = grid_name == "quick"
    grid = GRIDS[grid_name]()
    if series:
        unknown = set(series) - {s.label for s in grid}
        if unknown:
            raise SystemExit(f"unknown series {sorted(unknown)}; known: {[s.label for s in grid]}")
    tasks = tasks or list(GRID_TASKS[grid_name])
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results: dict[str, Any] = {
        "command": "python -m bench fidelity"
        + (" --quick" if quick else "")
        + (f" --grid {grid_name}" if grid_name not in ("full", "quick") else "")
        + (f" --precision {precision}" if precision != "fp32" else "")
        + (f" --tasks {' '.join(tasks)}" if tasks else "")
        + (" --series " + " ".join(f"'{label}'" for label in series) if series else "")
        + (f" --calibration {n_cal}" if n_cal != DEFAULT_CALIBRATION else "")
        + (f" --threads {threads}" if threads != 2 else "")
        + (f" --out {_shown(out_dir)}" if out_dir != RESULTS else ""),
        "machine": machine_note(),
        "quick": quick,
        "grid_name": grid_name,
        "grid": [asdict(s) for s in grid],
        "tasks": [],
    }
    keys = [task_key(t, precision) for t in tasks]
    log_path = out_dir / (
        ("fidelity-quick" if quick else "fidelity")
        + f"-{'-'.join(tasks)}{'' if precision == 'fp32' else '-' + precision}.log"
    )
    with open(log_path, "a") as logf, tempfile.TemporaryDirectory() as tmp:

        def log(msg: str) -> None:
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        def publish(mine: list[dict[str, Any]]) -> None:
            """Write this run's tasks next to the other tasks' latest results on disk."""
            results["seconds"] = time.time() - t0
            for t in mine:
                t["command"], t["machine"] = results["command"], results["machine"]
            with _locked(out_dir):
                others = _previous(out_dir, quick, keys)
                write_outputs(dict(results, tasks=[*others, *mine]), out_dir, quick)

        earlier = {} if fresh else _earlier(out_dir, quick)
        for task, key in zip(tasks, keys, strict=True):
            results["tasks"].append(
                run_task(
                    task,
                    grid,
                    n_cal=n_cal,
                    workdir=Path(tmp),
                    log=log,
                    save=lambda partial: publish([*results["tasks"], partial]),
                    earlier=earlier.get(key),
                    measure=set(series) if series else None,
                    precision=precision,
                )
            )
            publish(results["tasks"])
    return results


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """Exclusive use of the output files while one run merges and writes them."""
    with open(out_dir / ".fidelity.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _earlier(out_dir: Path, quick: bool) -> dict[str, dict[str, Any]]:
    """Each task's result in the committed output, keyed by task."""
    path = out_dir / ("fidelity-quick.json" if quick else "fidelity.json")
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {t["task"]: t for t in old.get("tasks", []) if "task" in t}


def _previous(out_dir: Path, quick: bool, tasks: list[str]) -> list[dict[str, Any]]:
    """Results of other tasks from an earlier run (a run of some tasks keeps the others)."""
    path = out_dir / ("fidelity-quick.json" if quick else "fidelity.json")
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return [t for t in old.get("tasks", []) if t.get("task") not in tasks]


def _group(rows: list[dict[str, Any]]) -> Iterator[tuple[tuple[Any, ...], list[dict[str, Any]]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["series"], r["keep"], r["value_bits"]), []).append(r)
    yield from groups.items()


def _stat(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.median(values):.4f} [{min(values):.4f}–{max(values):.4f}]"


#: The baselines the NPS and low-rank families have to beat at equal bits (the Pareto front).
BASELINES = ("magnitude", "magnitude-scaled", "dare")
#: The methods judged against them: the NPS family and the low-rank codecs.
CANDIDATES = ("nps", "nps-seeded", "lowrank", "hybrid", "hybrid-seeded")
#: The fidelity goal of a full fine-tune: median normalised accuracy and gain kept.
GOAL_NORMALISED, GOAL_GAIN = 0.99, 0.95
#: The range of bits per parameter where the front is compared.
FRONT_RANGE = (0.03, 1.0)


@dataclass(frozen=True)
class Point:
    """One grid point over its seeds: median bits/param and its seeds' test accuracies."""

    label: str
    bpp: float
    accs: tuple[float, ...]
    #: the delta format its sizes are of (None: rows from before rows recorded it, :func:`format_name`)
    format_version: int | None = None

    @property
    def acc(self) -> float:
        return statistics.median(self.accs)

    @property
    def lo(self) -> float:
        return min(self.accs)

    @property
    def hi(self) -> float:
        return max(self.accs)

    @classmethod
    def of(cls, key: tuple[Any, ...], rows: list[dict[str, Any]]) -> Point:
        series, keep, bits = key
        name = f"{series} {keep:g}/{bits}" if keep is not None else series
        return cls(
            f"{name} ×{len(rows)}",
            statistics.median(r["bits_per_param"] for r in rows),
            tuple(r["test_accuracy"] for r in rows),
            max(r.get("format_version") or 0 for r in rows) or None,
        )


def verdict(mine: Point, other: Point) -> str:
    """``better`` / ``worse`` only outside both seed spreads, else ``within spread``."""
    if mine.lo > other.hi:
        return "better"
    if mine.hi < other.lo:
        return "worse"
    return "within spread"


def front_comparison(rows: list[dict[str, Any]]) -> list[tuple[Point, Point | None, str]]:
    """Each point of one family against the other family's best point that stores no more
    (candidates: series whose method is one of :data:`CANDIDATES`; baselines: :data:`BASELINES`),
    inside :data:`FRONT_RANGE`. Returns (point, best rival at ≤ its bits, verdict of the
    candidates against it), candidates first. Sizes are compared within one delta format only:
    where a section holds rows of several formats (a partial re-measure), each point meets the
    rivals of its own format, and points of older formats say which they are."""
    formats = {r.get("format_version") for r in rows}
    mixed, newest = len(formats) > 1, max(f or 0 for f in formats) or None
    nps: list[Point] = []
    base: list[Point] = []
    for key, rs in _group(rows):
        method = rs[0]["method"]
        pt = Point.of(key, rs)
        if pt.format_version != newest:
            pt = replace(pt, label=f"{pt.label} ({format_name(pt.format_version)})")
        if not FRONT_RANGE[0] <= pt.bpp <= FRONT_RANGE[1]:
            continue
        if method in CANDIDATES and not key[0].startswith("auto"):
            nps.append(pt)
        elif key[0] in BASELINES:
            base.append(pt)

    def best(pts: list[Point], mine: Point) -> Point | None:
        fit = [p for p in pts if p.bpp <= mine.bpp and p.format_version == mine.format_version]
        return max(fit, key=lambda p: p.acc) if fit else None

    out: list[tuple[Point, Point | None, str]] = []
    for mine, rivals, flip in ((nps, base, False), (base, nps, True)):
        for p in sorted(mine, key=lambda p: p.bpp):
            rival = best(rivals, p)
            if rival is None:
                alone = "no rival of its format" if mixed else "no rival"
                out.append((p, None, f"{alone} stores as little"))
            else:
                out.append((p, rival, verdict(rival, p) if flip else verdict(p, rival)))
    return out


def first_at_goal(rows: list[dict[str, Any]], methods: Sequence[str]) -> Point | None:
    """The point of ``methods`` (``auto`` rows excluded) storing the fewest bits whose median
    normalised accuracy and gain kept reach :data:`GOAL_NORMALISED` and :data:`GOAL_GAIN`."""
    best: Point | None = None
    for key, rs in _group(rows):
        if rs[0]["method"] not in methods or key[0].startswith("auto"):
            continue
        norm = statistics.median(r["normalised_accuracy"] for r in rs)
        gain = statistics.median(r["gain_kept"] for r in rs)
        pt = Point.of(key, rs)
        if norm >= GOAL_NORMALISED and gain >= GOAL_GAIN and (best is None or pt.bpp < best.bpp):
            best = pt
    return best


def _front_lines(rows: list[dict[str, Any]]) -> list[str]:
    lo, hi = FRONT_RANGE
    goal = []
    for name, methods in (("candidates", CANDIDATES), ("baselines", BASELINES)):
        pt = first_at_goal(rows, methods)
        goal.append(f"{name}: " + (f"{pt.label} at {pt.bpp:.4f}" if pt else "none in this grid"))
    lines = [
        f"Fewest bits/param at ≥ {GOAL_NORMALISED} normalised and ≥ {GOAL_GAIN} gain kept "
        f"(medians) — {'; '.join(goal)}.",
        "",
        f"### NPS and low-rank families against the baselines' front ({lo}–{hi} bits/param)",
        "",
        "Each point against the best point of the other family that stores no more bits in "
        "the same delta format "
        f"(candidates: {', '.join(CANDIDATES)}; baselines: {', '.join(BASELINES)}). The "
        "verdict is the candidates': better/worse only when the seed spreads do not overlap "
        "(single-seed points: their one value).",
        "",
        "| point | bits/param | test acc | best rival at ≤ bits | its bits/param | its test acc | candidates are |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, rival, v in front_comparison(rows):
        r = (
            "— | — | —"
            if rival is None
            else f"{rival.label} | {rival.bpp:.4f} | {_stat(rival.accs)}"
        )
        lines.append(f"| {p.label} | {p.bpp:.4f} | {_stat(p.accs)} | {r} | {v} |")
    return [*lines, ""]


def write_outputs(results: dict[str, Any], out_dir: Path, quick: bool) -> None:
    stem = "fidelity-quick" if quick else "fidelity"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = [
        f"# Fidelity benchmark{' (quick)' if quick else ''}",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Wall time: {results.get('seconds', 0) / 60:.1f} min",
        "",
    ]
    for t in results["tasks"]:
        lines += [
            f"## {t['task']}",
            "",
            f"Fine-tuned accuracy {t['fine_tuned_accuracy']:.4f}; with τ removed "
            f"{t['removed_accuracy']:.4f}; test n = {t['test_examples']}; calibration "
            f"n = {t['calibration_examples']} (validation split). Median over seeds "
            "[min–max].",
            "",
            *([f"Last run on this task: `{t['command']}`", ""] if t.get("command") else []),
            f"Deltas written in {_formats(t['rows'])}.",
            "",
            "| series | fitness | keep | value bits | seeds | bits/param | test acc | norm. acc | gain kept | search s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (series, keep, bits), rs in sorted(
            _group(t["rows"]), key=lambda kv: (kv[0][0], kv[1][0]["bits_per_param"])
        ):
            lines.append(
                f"| {series} | {rs[0]['evaluation']} | {keep if keep is not None else '—'} | "
                f"{bits if bits is not None else 'exact'} | {len(rs)} | "
                f"{statistics.median(r['bits_per_param'] for r in rs):.4f} | "
                f"{_stat([r['test_accuracy'] for r in rs])} | {_stat([r['normalised_accuracy'] for r in rs])} | "
                f"{_stat([r['gain_kept'] for r in rs])} | "
                f"{statistics.median(r['search_seconds'] for r in rs):.0f} |"
            )
        lines += ["", *_front_lines(t["rows"])]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(results, out_dir / f"{stem}.png")


def _shown(path: Path) -> str:
    """A path as a command line would name it from the repository root."""
    try:
        return path.resolve().relative_to(Path(__file__).resolve().parent.parent).as_posix()
    except ValueError:
        return str(path)


def format_name(version: int | None) -> str:
    """How the report names a row's delta format (rows from before rows recorded it: ≤ 5)."""
    return f"format {version}" if version else "format 5 or earlier"


def _formats(rows: list[dict[str, Any]]) -> str:
    """Which delta formats a section's sizes are of (``docs/format.md``)."""
    counts: dict[str, int] = {}
    for r in rows:
        name = format_name(r.get("format_version"))
        counts[name] = counts.get(name, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k} ({n} rows)" for k, n in sorted(counts.items()))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    if not tasks:
        return
    fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 4.8 * len(tasks)), squeeze=False)
    for ti, t in enumerate(tasks):
        for ci, (metric, title) in enumerate(
            (("test_accuracy", "test accuracy"), ("gain_kept", "gain kept"))
        ):
            ax = axes[ti][ci]
            by_series: dict[str, list[tuple[float, float, float, float]]] = {}
            for (series, _keep, _bits), rs in _group(t["rows"]):
                vals = [r[metric] for r in rs]
                x = statistics.median(r["bits_per_param"] for r in rs)
                by_series.setdefault(series, []).append(
                    (x, statistics.median(vals), min(vals), max(vals))
                )
            for series, pts in sorted(by_series.items()):
                pts.sort()
                xs = [p[0] for p in pts]
                ys = [p[1] for p in pts]
                err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=series, lw=1)
            if metric == "test_accuracy":
                ax.axhline(t["fine_tuned_accuracy"], color="k", ls="--", lw=0.8, label="fine-tuned")
                ax.axhline(
                    0.99 * t["fine_tuned_accuracy"],
                    color="k",
                    ls=":",
                    lw=0.8,
                    label="99% of fine-tuned",
                )
            else:
                ax.axhline(0.95, color="k", ls=":", lw=0.8, label="95% gain kept")
            ax.axvline(0.1, color="grey", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("stored bits per parameter")
            ax.set_title(f"{t['task']}: {title}")
            lo = t["removed_accuracy"] if metric == "test_accuracy" else 0.0
            ax.set_ylim(bottom=max(lo - 0.02, 0) if metric == "test_accuracy" else -0.1)
            ax.grid(alpha=0.3)
        axes[ti][1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""What a compression or merge is asked, and what a compression produced: one definition each.

Every name a request may choose from (:class:`Method`, :class:`Evaluation`,
:class:`MergeMethod`, :data:`VALUE_BITS`) and every default (:data:`DEFAULT_KEEP`,
:data:`DEFAULT_VALUE_BITS`, :data:`DEFAULT_MIN_FIDELITY`, ...) is written here once, with the
rule that decides the method of a request that names none (:func:`default_method`).

- :class:`CompressParams`: a compression job's parameters. ``slim compress`` builds them from
  its flags, the service from a create request; :meth:`CompressParams.resolve` applies the
  defaults (once), :meth:`~CompressParams.to_dict` is what a checkpoint's ``params`` column
  stores and :meth:`~CompressParams.from_row` reads it back (rows written by older versions
  included) for the worker.
- :class:`MergeParams`: a merge job's parameters (the job's payload).
- :class:`CompressOutcome`: what a compression produced (sizes, bits per parameter, fidelity
  before/after, the search trace); :meth:`~CompressOutcome.to_row` gives the checkpoint's
  columns and :meth:`~CompressOutcome.from_row` reads them back for the views.

This module imports no torch (nor any core module that does): the CLI's parser, the client
and the service's schemas take their choices from here without loading it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from typing import Any

from core.errors import InvalidArgument


class Method(StrEnum):
    """The compression methods a request may name (``auto`` searches among the others)."""

    NPS = "nps"
    NPS_SEEDED = "nps-seeded"
    MAGNITUDE = "magnitude"
    MAGNITUDE_SCALED = "magnitude-scaled"
    DARE = "dare"
    LOSSLESS = "lossless"
    LOWRANK = "lowrank"
    HYBRID = "hybrid"
    HYBRID_SEEDED = "hybrid-seeded"
    AUTO = "auto"


class Evaluation(StrEnum):
    """How a candidate encoding is scored."""

    FIDELITY = "fidelity"  # agreement with the fine-tune on calibration texts
    ACCURACY = "accuracy"  # accuracy on the calibration labels
    WEIGHTS = "weights"  # data-free


class MergeMethod(StrEnum):
    TASK_ARITHMETIC = "task_arithmetic"
    TIES = "ties"


#: The methods core implements (every :class:`Method` but ``auto``, which searches them).
METHODS: tuple[str, ...] = tuple(str(m) for m in Method if m is not Method.AUTO)
#: Methods whose CMA-ES search takes a ``generations`` option (``magnitude-scaled`` searches a
#: single scale by golden section: no generations; which methods search at all is
#: :attr:`core.methods.base.Method.searches`).
GENERATIONS_METHODS = frozenset({Method.NPS, Method.NPS_SEEDED, Method.HYBRID_SEEDED, Method.AUTO})
#: Evaluation kinds, as plain strings.
EVAL_KINDS: tuple[str, ...] = tuple(str(e) for e in Evaluation)
#: Merge methods, as plain strings.
MERGE_METHODS: tuple[str, ...] = tuple(str(m) for m in MergeMethod)
#: Stored value bit widths: 32, 16 (the checkpoint's float width) or quantised (sign + levels).
VALUE_BITS = (32, 16, 8, 4, 3, 2, 1)

# -- defaults (each written once) ------------------------------------------------------------

#: What a fixed-budget method keeps when nothing is asked (``auto`` searches it instead).
DEFAULT_KEEP = 0.01
#: ``lowrank``'s keep when nothing is asked: the tensors it does not factor (1-D ones, and those
#: whose factors would cost more) keep every changed entry, so the fallback loses nothing
#: beyond value rounding. A smaller keep keeps each such tensor's top-r entries of |τ|.
DEFAULT_LOWRANK_KEEP = 1.0
#: ``lowrank``'s rank rule when nothing is asked: the smallest rank that retains this fraction
#: of τ's squared Frobenius norm (its energy), tensor by tensor.
DEFAULT_LOWRANK_ENERGY = 0.99
#: Bits per stored value when nothing is asked (``auto`` searches it instead); merges too.
DEFAULT_VALUE_BITS = 16
#: ``auto``'s fidelity floor when none is given.
DEFAULT_MIN_FIDELITY = 0.99
#: Seed of searches and seeded masks.
DEFAULT_SEED = 0
#: Calibration examples a search evaluates on at most: a longer file is subsampled
#: (:func:`calibration_sample`), so a search's cost does not grow with the file. 128 rank
#: candidates as well as 768 (Spearman ρ ≥ 0.958, ``bench/results/calibration_size.md``) and
#: are what the fidelity grid searches with; an evaluation's cost grows linearly with them.
DEFAULT_CALIBRATION_LIMIT = 128
#: ``auto``'s cap: it judges a fidelity floor on its held-out quarter, not only a ranking, and
#: 512 examples resolve agreement to 0.002.
AUTO_CALIBRATION_LIMIT = 512
#: A merge's method and scale λ.
DEFAULT_MERGE_METHOD = MergeMethod.TASK_ARITHMETIC
DEFAULT_LAMBDA = 1.0


def default_method(*, min_fidelity: float | None, calibrated: bool, lossy_asked: bool) -> Method:
    """The method of a request that names none — the one rule, for the CLI and the service.

    ``auto`` with a fidelity floor; ``nps`` with calibration data to measure its loss, or when
    a lossy choice (a keep ratio or value bits) was made explicitly; otherwise ``lossless``: with
    nothing to measure a loss on, the default never stores an unmeasured one.
    """
    if min_fidelity is not None:
        return Method.AUTO
    if calibrated or lossy_asked:
        return Method.NPS
    return Method.LOSSLESS


def default_keep(method: str | None) -> float | None:
    """The keep ratio of a request with ``method`` that names none: None for ``auto`` (it
    searches one) and ``lossless`` (it keeps everything), :data:`DEFAULT_LOWRANK_KEEP` for
    ``lowrank``, else :data:`DEFAULT_KEEP`."""
    if method in (Method.AUTO, Method.LOSSLESS):
        return None
    return DEFAULT_LOWRANK_KEEP if method == Method.LOWRANK else DEFAULT_KEEP


def default_evaluation(*, calibrated: bool) -> Evaluation:
    """The fitness of a request that names none: ``fidelity`` on calibration data, else the
    data-free ``weights``."""
    return Evaluation.FIDELITY if calibrated else Evaluation.WEIGHTS


def default_calibration_limit(method: str | None) -> int:
    """How many calibration examples a compression with ``method`` evaluates on at most."""
    return AUTO_CALIBRATION_LIMIT if method == Method.AUTO else DEFAULT_CALIBRATION_LIMIT


# -- compression parameters ------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One calibration input; ``label`` is needed by the ``accuracy`` evaluation only."""

    text: str
    label: int | str | None = None


def calibration_sample(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """The calibration examples a compression evaluates on: every one when there are at most
    ``limit``, else ``limit`` of them drawn without replacement by ``seed`` (in file order).

    The one subsample rule, for the CLI, the service's worker and ``auto``: the same file,
    limit and seed give the same examples.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidArgument(
            f"`calibration_limit` must be a whole number ≥ 1 (got {limit!r}), e.g. 128"
        )
    if len(examples) <= limit:
        return list(examples)
    picked = random.Random(f"calibration-{seed}").sample(range(len(examples)), limit)
    return [examples[i] for i in sorted(picked)]


@dataclass(frozen=True)
class CompressParams:
    """A compression job's parameters; None is "not asked" until :meth:`resolve`.

    Attributes:
        method: the method (None: :func:`default_method` decides).
        keep: keep ratio r (``auto`` searches it unless given; ``lossless`` has none).
        value_bits: bits per stored value (as ``keep``).
        evaluation: how candidates are scored (None: :func:`default_evaluation`).
        min_fidelity: ``auto``'s floor (None: :data:`DEFAULT_MIN_FIDELITY`, see
            :attr:`floor`).
        seed: seed of searches and seeded masks.
        options: extra method options (e.g. ``{"generations": 30}``).
        calibration: the calibration examples, or None.
        calibration_limit: how many of them are evaluated on at most (None:
            :func:`default_calibration_limit`); more are subsampled by
            :func:`calibration_sample`.
    """

    method: Method | None = None
    keep: float | None = None
    value_bits: int | None = None
    evaluation: Evaluation | None = None
    min_fidelity: float | None = None
    seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    calibration: tuple[Example, ...] | None = None
    calibration_limit: int | None = None

    def resolve(self) -> CompressParams:
        """These parameters with every default applied — the one place they are decided.

        - ``method``: :func:`default_method` (``auto`` with a floor; ``nps`` with calibration,
          an evaluation that needs it, or an explicit keep / value bits; else ``lossless``);
        - ``evaluation``: ``fidelity`` with calibration examples, else ``weights``;
        - ``keep`` / ``value_bits``: :func:`default_keep` / :data:`DEFAULT_VALUE_BITS` unless
          given, except that ``auto`` searches them and ``lossless`` records neither;
        - ``seed``: :data:`DEFAULT_SEED`;
        - ``calibration_limit``: with calibration examples, :func:`default_calibration_limit`
          of the method.

        ``auto``'s floor stays as asked (it is recorded so); :attr:`floor` defaults it.
        Resolving resolved parameters changes nothing, so rows stored by older versions (which
        left some of these unset) are resolved when they are read.
        """
        calibrated = bool(self.calibration)
        method = (
            Method(self.method)
            if self.method is not None
            else default_method(
                min_fidelity=self.min_fidelity,
                calibrated=calibrated or self.evaluation not in (None, Evaluation.WEIGHTS),
                lossy_asked=self.keep is not None or self.value_bits is not None,
            )
        )
        searched = method in (Method.AUTO, Method.LOSSLESS)
        return replace(
            self,
            method=method,
            keep=self.keep if self.keep is not None else default_keep(method),
            value_bits=self.value_bits
            if self.value_bits is not None or searched
            else DEFAULT_VALUE_BITS,
            evaluation=Evaluation(self.evaluation)
            if self.evaluation is not None
            else default_evaluation(calibrated=calibrated),
            seed=DEFAULT_SEED if self.seed is None else self.seed,
            options=dict(self.options or {}),
            calibration_limit=default_calibration_limit(method)
            if self.calibration_limit is None and calibrated
            else self.calibration_limit,
        )

    @property
    def floor(self) -> float:
        """``auto``'s fidelity floor: as asked, else :data:`DEFAULT_MIN_FIDELITY`."""
        return DEFAULT_MIN_FIDELITY if self.min_fidelity is None else self.min_fidelity

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``params`` column (the method has a column of its own)."""
        return {
            "keep": self.keep,
            "value_bits": self.value_bits,
            "evaluation": None if self.evaluation is None else str(self.evaluation),
            "min_fidelity": self.min_fidelity,
            "seed": self.seed,
            "options": dict(self.options),
            "calibration": [{"text": e.text, "label": e.label} for e in self.calibration]
            if self.calibration
            else None,
            "calibration_limit": self.calibration_limit,
        }

    @classmethod
    def from_row(
        cls, row: Mapping[str, Any] | None, *, method: str | None = None
    ) -> CompressParams:
        """Parameters from a ``params`` column (and the checkpoint's ``method``).

        Reads every row written so far, and tolerates what a hand-edited or partial row may
        lack: missing keys are "not asked", ``options`` may be None. (Rows from before
        ``lossless`` recorded no keep stored ``keep`` 0.01 and ``value_bits`` 16 for it; they
        are read as stored.)
        """
        row = dict(row or {})
        options = dict(row.get("options") or {})
        calibration = row.get("calibration")
        return cls(
            method=None if method is None else Method(method),
            keep=row.get("keep"),
            value_bits=row.get("value_bits"),
            evaluation=None if row.get("evaluation") is None else Evaluation(row["evaluation"]),
            min_fidelity=row.get("min_fidelity"),
            seed=row.get("seed"),
            options=options,
            calibration=tuple(Example(e["text"], e.get("label")) for e in calibration)
            if calibration
            else None,
            calibration_limit=_int(row.get("calibration_limit")),
        )


@dataclass(frozen=True)
class MergeParams:
    """A merge job's parameters (its payload)."""

    checkpoint_ids: tuple[str, ...] = ()
    method: MergeMethod = DEFAULT_MERGE_METHOD
    lam: float = DEFAULT_LAMBDA
    density: float | None = None
    heads_from: int | None = None  # index into checkpoint_ids

    def to_dict(self) -> dict[str, Any]:
        """The merge job's payload."""
        return {
            "checkpoint_ids": list(self.checkpoint_ids),
            "method": str(self.method),
            "lambda": self.lam,
            "density": self.density,
            "heads_from": self.heads_from,
        }

    def checkpoint_params(self) -> dict[str, Any]:
        """The derived checkpoint's ``params`` column."""
        return {"merge_method": str(self.method), "lambda": self.lam, "density": self.density}

    @classmethod
    def from_row(cls, payload: Mapping[str, Any]) -> MergeParams:
        method = payload.get("method")
        lam = payload.get("lambda")
        return cls(
            checkpoint_ids=tuple(payload.get("checkpoint_ids") or ()),
            method=DEFAULT_MERGE_METHOD if method is None else MergeMethod(method),
            lam=DEFAULT_LAMBDA if lam is None else float(lam),
            density=payload.get("density"),
            heads_from=payload.get("heads_from"),
        )


# -- what a compression produced -------------------------------------------------------------


def finite(value: Any) -> Any:
    """A copy of a JSON-like value with NaN/inf floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return finite(value.item())
    return str(value)


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _nan(value: Any) -> float:
    number = _float(value)
    return math.nan if number is None else number


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class AutoStep:
    """One candidate ``auto`` judged (older records: ``fidelity_holdout``, ``evaluations``)."""

    method: str
    keep: float | None
    value_bits: int | None
    fidelity: float | None
    floor: float | None
    passed: bool | None
    part: str | None
    examples: int | None
    seconds: float | None
    estimated_bits: float | None

    @classmethod
    def from_dict(cls, s: Mapping[str, Any]) -> AutoStep:
        passed = s.get("passed")
        return cls(
            method=str(s.get("method") or "?"),
            keep=_float(s.get("keep")),
            value_bits=_int(s.get("value_bits")),
            fidelity=_float(s.get("fidelity", s.get("fidelity_holdout"))),
            floor=_float(s.get("floor")),
            passed=passed if isinstance(passed, bool) else None,
            part=_str(s.get("part")),
            examples=_int(s.get("examples", s.get("evaluations"))),
            seconds=_float(s.get("seconds")),
            estimated_bits=_float(s.get("estimated_bits")),
        )


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` encoded and why (older records: ``fidelity_search``)."""

    encoded: str
    keep: float | None
    value_bits: int | None
    fidelity: float | None
    bits_per_param: float | None
    reason: str | None

    @classmethod
    def from_dict(cls, s: Mapping[str, Any]) -> AutoChoice:
        return cls(
            encoded=str(s["encoded"]),
            keep=_float(s.get("keep")),
            value_bits=_int(s.get("value_bits")),
            fidelity=_float(s.get("fidelity", s.get("fidelity_search"))),
            bits_per_param=_float(s.get("bits_per_param")),
            reason=_str(s.get("reason")) or None,
        )

    def is_step(self, step: AutoStep) -> bool:
        """Whether this choice is that judged candidate."""
        return (self.encoded, self.keep, self.value_bits) == (
            step.method,
            step.keep,
            step.value_bits,
        )


@dataclass(frozen=True)
class SearchTrace:
    """A trace read once: ``auto``'s trail (its first element, when auto ran), and the
    search's (step, best fitness) points — nps records generations, ``magnitude-scaled``
    evaluations."""

    auto: bool
    steps: tuple[AutoStep, ...]
    choice: AutoChoice | None
    points: tuple[tuple[float, float], ...]
    step_name: str  # "generation" or "evaluation"

    @classmethod
    def parse(cls, trace: Any) -> SearchTrace:
        entries = [e for e in (trace if isinstance(trace, list) else []) if isinstance(e, dict)]
        trail = next((e["auto"] for e in entries if isinstance(e.get("auto"), list)), None)
        raw = [s for s in trail or [] if isinstance(s, dict)]
        final = next((s for s in reversed(raw) if "encoded" in s), None)
        points: list[tuple[float, float]] = []
        for i, entry in enumerate(trace if isinstance(trace, list) else []):
            if not isinstance(entry, dict) or _float(entry.get("best_fitness")) is None:
                continue
            step = entry.get("generation", entry.get("evaluation", i))
            if isinstance(step, int | float):
                points.append((float(step), float(entry["best_fitness"])))
        return cls(
            auto=trail is not None,
            steps=tuple(AutoStep.from_dict(s) for s in raw if "encoded" not in s),
            choice=AutoChoice.from_dict(final) if final is not None else None,
            points=tuple(points),
            step_name="generation" if any("generation" in e for e in entries) else "evaluation",
        )


#: The ``fitness`` column's keys, in the order they are stored.
_FITNESS_KEYS = (
    "method",
    "evaluation",
    "keep",
    "value_bits",
    "kept",
    "fitness_before",
    "fitness_after",
    "fidelity",
    "fidelity_part",
    "fidelity_examples",
    "calibration_used",
    "calibration_given",
    "fitness_objective",
    "metrics_after",
    "metrics_reference",
    "metrics_removed",
    "evaluations",
    "total_seconds",
    "notes",
)


@dataclass(frozen=True)
class CompressOutcome:
    """What a compression produced (the CLI's ``--json`` object; a checkpoint's columns)."""

    path: str
    method: str
    keep: float | None
    value_bits: int | None
    evaluation: str
    stored_bytes: int
    original_bytes: int
    weight_bytes: int  # stored bytes that count against the weights (all but embedded aux files)
    ratio: float
    bits_per_param: float
    num_params: int
    kept: int
    fitness_before: float | None
    fitness_after: float | None
    fidelity: float | None  # relative to the fine-tune (1.0 = as good)
    fidelity_part: str | None = None  # the calibration examples it was measured on
    fidelity_examples: int | None = None
    # calibration examples evaluated on, of how many given (more than the limit: a subsample)
    calibration_used: int | None = None
    calibration_given: int | None = None
    fitness_objective: str | None = None  # what fitness_before/after measure (not 0–1)
    metrics_after: dict[str, float] = field(default_factory=dict)
    metrics_removed: dict[str, float] = field(default_factory=dict)
    metrics_reference: dict[str, float] = field(default_factory=dict)
    search_seconds: float = 0.0
    total_seconds: float = 0.0
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)
    trace: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_row(self) -> dict[str, Any]:
        """The checkpoint's columns (JSON-safe: NaN and inf are None)."""
        fitness = {key: getattr(self, key) for key in _FITNESS_KEYS}
        return {
            "original_bytes": self.original_bytes,
            "stored_bytes": self.stored_bytes,
            "ratio": finite(self.ratio),
            "bits_per_param": finite(self.bits_per_param),
            "num_params": self.num_params,
            "fitness": finite(fitness),
            "trace": finite(self.trace),
            "search_seconds": finite(self.search_seconds),
        }

    @classmethod
    def from_row(cls, row: Any) -> CompressOutcome:
        """From a checkpoint's columns: a mapping (an API answer, :meth:`to_row`) or an object
        with those attributes (a database row). Unset columns (a checkpoint not stored yet, a
        merge, an older row) read as None, 0 or empty."""

        def col(key: str) -> Any:
            return row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)

        fit = col("fitness")
        fit = fit if isinstance(fit, Mapping) else {}
        trace = col("trace")
        return cls(
            path="",
            method=str(fit.get("method") or ""),
            keep=_float(fit.get("keep")),
            value_bits=_int(fit.get("value_bits")),
            evaluation=str(fit.get("evaluation") or ""),
            stored_bytes=col("stored_bytes") or 0,
            original_bytes=col("original_bytes") or 0,
            weight_bytes=0,
            ratio=_nan(col("ratio")),
            bits_per_param=_nan(col("bits_per_param")),
            num_params=col("num_params") or 0,
            kept=_int(fit.get("kept")) or 0,
            fitness_before=_float(fit.get("fitness_before")),
            fitness_after=_float(fit.get("fitness_after")),
            fidelity=_float(fit.get("fidelity")),
            fidelity_part=_str(fit.get("fidelity_part")),
            fidelity_examples=_int(fit.get("fidelity_examples")),
            calibration_used=_int(fit.get("calibration_used")),
            calibration_given=_int(fit.get("calibration_given")),
            fitness_objective=_str(fit.get("fitness_objective")),
            metrics_after=dict(fit.get("metrics_after") or {}),
            metrics_removed=dict(fit.get("metrics_removed") or {}),
            metrics_reference=dict(fit.get("metrics_reference") or {}),
            search_seconds=_float(col("search_seconds")) or 0.0,
            total_seconds=_float(fit.get("total_seconds")) or 0.0,
            evaluations=_int(fit.get("evaluations")) or 0,
            notes=[str(n) for n in fit.get("notes") or []],
            trace=list(trace) if isinstance(trace, list) else [],
        )

    @cached_property
    def search(self) -> SearchTrace:
        """The trace, read once."""
        return SearchTrace.parse(self.trace)

    @property
    def auto(self) -> bool:
        """Whether ``auto`` chose the encoding (method ``auto:<encoding>``)."""
        return self.method.startswith("auto:")

    @property
    def encoded(self) -> str | None:
        """The encoding behind ``auto:dare``; None for other methods."""
        return self.method.split(":", 1)[1] if self.auto else None

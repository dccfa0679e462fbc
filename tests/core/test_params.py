"""core.params: the one definition of a job's parameters, their defaults and its outcome."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from core.errors import InvalidArgument
from core.params import (
    AUTO_CALIBRATION_LIMIT,
    DEFAULT_CALIBRATION_LIMIT,
    DEFAULT_KEEP,
    DEFAULT_MIN_FIDELITY,
    DEFAULT_SEED,
    DEFAULT_VALUE_BITS,
    CompressOutcome,
    CompressParams,
    Evaluation,
    Example,
    MergeMethod,
    MergeParams,
    Method,
    calibration_sample,
)


def test_importing_params_loads_no_torch() -> None:
    code = "import sys, core.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_defaults() -> None:
    assert (DEFAULT_KEEP, DEFAULT_VALUE_BITS, DEFAULT_MIN_FIDELITY, DEFAULT_SEED) == (
        0.01,
        16,
        0.99,
        0,
    )
    assert CompressParams().resolve() == CompressParams(
        method=Method.LOSSLESS, evaluation=Evaluation.WEIGHTS, seed=0, options={}
    )
    cal = (Example("a"), Example("b"))
    p = CompressParams(calibration=cal).resolve()
    assert (p.method, p.evaluation, p.keep, p.value_bits) == (
        Method.NPS,
        Evaluation.FIDELITY,
        DEFAULT_KEEP,
        DEFAULT_VALUE_BITS,
    )
    auto = CompressParams(min_fidelity=0.95, calibration=cal).resolve()
    assert auto.method == Method.AUTO and auto.keep is None and auto.value_bits is None
    assert auto.floor == 0.95
    assert CompressParams(method=Method.AUTO).resolve().floor == DEFAULT_MIN_FIDELITY


def test_resolve() -> None:
    # a lossy choice without data is stored as asked, measured by weights
    p = CompressParams(keep=0.05).resolve()
    assert (p.method, p.keep, p.value_bits, p.evaluation) == (
        Method.NPS,
        0.05,
        DEFAULT_VALUE_BITS,
        Evaluation.WEIGHTS,
    )
    # an evaluation that needs data counts as calibrated for the method rule
    assert CompressParams(evaluation=Evaluation.FIDELITY).resolve().method == Method.NPS
    # pinned auto dimensions stay pinned; lossless records neither
    auto = CompressParams(method=Method.AUTO, value_bits=4).resolve()
    assert (auto.keep, auto.value_bits) == (None, 4)
    exact = CompressParams(method=Method.LOSSLESS).resolve()
    assert (exact.keep, exact.value_bits) == (None, None)
    # resolving twice changes nothing
    once = CompressParams(method=Method.DARE, seed=3, options={"x": 1}).resolve()
    assert once.resolve() == once


def test_round_trip_and_old_rows() -> None:
    p = CompressParams(
        method=Method.NPS_SEEDED,
        keep=0.02,
        value_bits=2,
        evaluation=Evaluation.ACCURACY,
        seed=0,
        options={"generations": 3},
        calibration=(Example("x", 1), Example("y", "neg")),
    ).resolve()
    row = p.to_dict()
    # the stored JSON: the keys and order rows have always had, then the calibration limit
    assert list(row) == [
        "keep",
        "value_bits",
        "evaluation",
        "min_fidelity",
        "seed",
        "options",
        "calibration",
        "calibration_limit",
    ]
    assert row["calibration"] == [{"text": "x", "label": 1}, {"text": "y", "label": "neg"}]
    assert row["evaluation"] == "accuracy" and type(row["evaluation"]) is str
    assert CompressParams.from_row(row, method="nps-seeded") == p
    # rows written before lossless recorded no keep, or with keys missing, still read
    old = {"keep": 0.01, "value_bits": 16, "evaluation": "weights", "seed": 0, "options": None}
    q = CompressParams.from_row(old, method="lossless").resolve()
    assert (q.method, q.keep, q.value_bits, q.options, q.calibration) == (
        Method.LOSSLESS,
        0.01,
        16,
        {},
        None,
    )
    assert CompressParams.from_row(None).to_dict()["options"] == {}


def test_merge_params_round_trip() -> None:
    m = MergeParams(("a", "b"), MergeMethod.TIES, 0.5, 0.2, 1)
    assert m.to_dict() == {
        "checkpoint_ids": ["a", "b"],
        "method": "ties",
        "lambda": 0.5,
        "density": 0.2,
        "heads_from": 1,
    }
    assert MergeParams.from_row(m.to_dict()) == m
    assert MergeParams.from_row({"checkpoint_ids": ["a"]}) == MergeParams(("a",))
    assert m.checkpoint_params() == {"merge_method": "ties", "lambda": 0.5, "density": 0.2}


def test_outcome_row_round_trip_and_trace() -> None:
    trail = [
        {"method": "dare", "keep": 0.03, "value_bits": 3, "fidelity": 0.991, "floor": 0.99,
         "passed": True, "part": "all", "examples": 10, "seconds": 1.0, "estimated_bits": 0.1},
        {"encoded": "dare", "keep": 0.03, "value_bits": 3, "fidelity": 0.992,
         "bits_per_param": 0.2, "reason": "smallest"},
    ]  # fmt: skip
    o = CompressOutcome(
        path="x.slim",
        method="auto:dare",
        keep=0.03,
        value_bits=3,
        evaluation="fidelity",
        stored_bytes=100,
        original_bytes=1000,
        weight_bytes=90,
        ratio=10.0,
        bits_per_param=0.2,
        num_params=4000,
        kept=12,
        fitness_before=math.nan,
        fitness_after=0.5,
        fidelity=0.992,
        notes=["n"],
        trace=[{"auto": trail}, {"generation": 1, "best_fitness": 0.4}],
        search_seconds=2.0,
    )
    row = o.to_row()
    assert row["fitness"]["fitness_before"] is None  # JSON has no NaN
    back = CompressOutcome.from_row(row)
    assert (back.method, back.keep, back.value_bits, back.fidelity, back.notes) == (
        "auto:dare",
        0.03,
        3,
        0.992,
        ["n"],
    )
    assert back.encoded == "dare" and back.auto
    search = back.search
    assert search.auto and len(search.steps) == 1 and search.choice is not None
    assert search.choice.is_step(search.steps[0]) and search.choice.reason == "smallest"
    assert search.points == ((1.0, 0.4),) and search.step_name == "generation"
    # a checkpoint not stored yet (no columns) reads as empty
    empty = CompressOutcome.from_row({})
    assert empty.method == "" and empty.fidelity is None and empty.search.points == ()


def test_calibration_sample_is_seeded_and_capped() -> None:
    examples = [Example(f"text {i}", i % 2) for i in range(1000)]
    a = calibration_sample(examples, 128, seed=0)
    assert len(a) == 128 and len(set(a)) == 128
    assert a == calibration_sample(examples, 128, seed=0)  # deterministic by seed
    assert a != calibration_sample(examples, 128, seed=1)
    positions = [examples.index(e) for e in a]
    assert positions == sorted(positions)  # in file order
    assert a[:10] != examples[:10]  # drawn over the whole file, not its head
    # at or under the limit every example is used, in order: the limit does not bite
    assert calibration_sample(examples[:128], 128, seed=5) == examples[:128]
    for bad in (0, -3, 1.5, True):
        with pytest.raises(InvalidArgument, match="calibration_limit"):
            calibration_sample(examples, bad, seed=0)  # type: ignore[arg-type]


def test_calibration_limit_defaults_by_method_and_round_trips() -> None:
    cal = (Example("a"), Example("b"))
    assert CompressParams(calibration=cal).resolve().calibration_limit == DEFAULT_CALIBRATION_LIMIT
    auto = CompressParams(min_fidelity=0.9, calibration=cal).resolve()
    assert auto.calibration_limit == AUTO_CALIBRATION_LIMIT
    assert DEFAULT_CALIBRATION_LIMIT == 128  # the fidelity grid's calibration size
    asked = CompressParams(calibration=cal, calibration_limit=40).resolve()
    assert asked.calibration_limit == 40
    row = asked.to_dict()
    assert row["calibration_limit"] == 40
    assert CompressParams.from_row(row, method="nps").resolve() == asked
    # rows from before the limit existed take the default when resolved
    del row["calibration_limit"]
    assert CompressParams.from_row(row, method="nps").resolve().calibration_limit == 128
    # nothing to evaluate on: no limit recorded
    assert CompressParams(keep=0.05).resolve().calibration_limit is None

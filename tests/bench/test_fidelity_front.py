"""The fidelity report compares the NPS family with the baselines' front at equal bits."""

from __future__ import annotations

from typing import Any

from bench.fidelity import (
    BASELINES,
    CANDIDATES,
    GRID_TASKS,
    first_at_goal,
    front_comparison,
    tasks_grid,
)


def row(
    series: str, method: str, keep: float, bpp: float, acc: float, seed: int = 0
) -> dict[str, Any]:
    return {
        "series": series,
        "method": method,
        "keep": keep,
        "value_bits": 4,
        "seed": seed,
        "bits_per_param": bpp,
        "test_accuracy": acc,
    }


def test_each_point_meets_the_best_rival_that_stores_no_more() -> None:
    rows = [
        # DARE at two budgets, three seeds each
        *(row("dare", "dare", 0.01, 0.056, a, s) for s, a in enumerate((0.76, 0.78, 0.79))),
        *(row("dare", "dare", 0.02, 0.088, a, s) for s, a in enumerate((0.814, 0.817, 0.821))),
        # the NPS family: clearly above DARE 1% at the same bits; inside DARE 2%'s spread
        *(
            row("nps-seeded", "nps-seeded", 0.01, 0.060, a, s)
            for s, a in enumerate((0.80, 0.81, 0.805))
        ),
        *(
            row("nps-seeded", "nps-seeded", 0.02, 0.090, a, s)
            for s, a in enumerate((0.816, 0.82, 0.818))
        ),
        row("nps", "nps", 0.005, 0.045, 0.70),  # no baseline stores as little
        row("magnitude", "magnitude", 0.1, 1.6, 0.79),  # outside the compared range
        row("auto (floor 0.99)", "nps-seeded", 0.05, 0.15, 0.826),  # auto is not a family point
    ]
    got = {(p.label, None if r is None else r.label): v for p, r, v in front_comparison(rows)}
    assert got == {
        ("nps-seeded 0.01/4 ×3", "dare 0.01/4 ×3"): "better",
        ("nps-seeded 0.02/4 ×3", "dare 0.02/4 ×3"): "within spread",
        ("nps 0.005/4 ×1", None): "no rival stores as little",
        # baseline points against the NPS family's best at no more bits: the family's verdict
        ("dare 0.01/4 ×3", "nps 0.005/4 ×1"): "worse",
        ("dare 0.02/4 ×3", "nps-seeded 0.01/4 ×3"): "worse",
    }


def test_worse_needs_the_spreads_apart() -> None:
    rows = [
        *(row("dare", "dare", 0.02, 0.088, a, s) for s, a in enumerate((0.82, 0.83, 0.825))),
        *(row("nps", "nps", 0.02, 0.2, a, s) for s, a in enumerate((0.70, 0.71, 0.72))),
    ]
    (nps, rival, verdict), (dare, none, _) = front_comparison(rows)
    assert (nps.label, rival and rival.label, verdict) == (
        "nps 0.02/4 ×3",
        "dare 0.02/4 ×3",
        "worse",
    )
    assert (dare.label, none) == ("dare 0.02/4 ×3", None)


def test_low_rank_codecs_are_candidates() -> None:
    rows = [
        *(row("dare", "dare", 0.02, 0.060, a, s) for s, a in enumerate((0.80, 0.81, 0.805))),
        *(row("hybrid", "hybrid", 0.02, 0.061, a, s) for s, a in enumerate((0.82, 0.83, 0.825))),
        row("lowrank", "lowrank", 0.02, 0.09, 0.70),
    ]
    got = {(p.label, None if r is None else r.label): v for p, r, v in front_comparison(rows)}
    assert got[("hybrid 0.02/4 ×3", "dare 0.02/4 ×3")] == "better"
    assert got[("lowrank 0.02/4 ×1", "dare 0.02/4 ×3")] == "worse"


def test_first_point_at_goal_needs_both_medians() -> None:
    def goal_row(series, method, bpp, norm, gain, seed=0):
        return {
            **row(series, method, 0.02, bpp, 0.8, seed),
            "normalised_accuracy": norm,
            "gain_kept": gain,
        }

    rows = [
        goal_row("dare", "dare", 0.05, 0.995, 0.94),  # gain short
        goal_row("dare", "dare", 0.09, 0.991, 0.96),
        goal_row("nps-seeded", "nps-seeded", 0.06, 0.992, 0.97, 0),
        goal_row("nps-seeded", "nps-seeded", 0.06, 0.985, 0.93, 1),  # median of two: short
        goal_row("hybrid", "hybrid", 0.07, 0.99, 0.95),
        goal_row("auto (floor 0.99)", "dare", 0.01, 1.0, 1.0),  # auto rows never count
    ]
    rows[1]["keep"] = 0.05  # a second dare point
    assert first_at_goal(rows, CANDIDATES).label == "hybrid 0.02/4 ×1"
    assert first_at_goal(rows, BASELINES).label == "dare 0.05/4 ×1"
    assert first_at_goal(rows[:1], BASELINES) is None


def test_tasks_grid_judges_every_method_on_the_multiclass_tasks() -> None:
    from bench.data import MULTICLASS_TASKS
    from core.methods import REGISTRY

    methods = {s.method for s in tasks_grid()}
    assert set(REGISTRY) | {"auto"} <= methods
    assert GRID_TASKS["tasks"] == MULTICLASS_TASKS
    seeded = [
        s
        for s in tasks_grid()
        if s.method not in ("lossless", "magnitude", "magnitude-scaled", "lowrank", "auto")
    ]
    assert all(len(s.seeds) == 3 for s in seeded if s.method != "nps")


def test_sizes_of_different_formats_are_not_compared() -> None:
    """A partial re-measure leaves rows of an older format beside today's: a point meets only
    rivals whose sizes are of its own format, and older points say which format they are."""

    def fmt(r: dict[str, Any], version: int | None) -> dict[str, Any]:
        return {**r, "format_version": version} if version else r

    rows = [
        # today's DARE re-measured: 0.016 bits/param smaller than its old self
        *(
            fmt(row("dare", "dare", 0.02, 0.057, a, s), 6)
            for s, a in enumerate((0.79, 0.80, 0.795))
        ),
        # format 5 rows of both families, as they were measured
        *(
            fmt(row("hybrid", "hybrid", 0.015, 0.063, a, s), None)
            for s, a in enumerate((0.77, 0.78, 0.775))
        ),
        *(
            fmt(row("dare", "dare", 0.015, 0.063, a, s), None)
            for s, a in enumerate((0.77, 0.78, 0.776))
        ),
    ]
    got = {(p.label, None if r is None else r.label): v for p, r, v in front_comparison(rows)}
    assert got == {
        # not against the cheaper format-6 DARE point, which it would "lose" to by format alone
        (
            "hybrid 0.015/4 ×3 (format 5 or earlier)",
            "dare 0.015/4 ×3 (format 5 or earlier)",
        ): "within spread",
        ("dare 0.02/4 ×3", None): "no rival of its format stores as little",
        (
            "dare 0.015/4 ×3 (format 5 or earlier)",
            "hybrid 0.015/4 ×3 (format 5 or earlier)",
        ): "within spread",
    }
    # one format throughout: labels and wording as before
    same = [fmt(r, 6) for r in rows]
    assert {p.label for p, _, _ in front_comparison(same)} == {
        "dare 0.02/4 ×3",
        "hybrid 0.015/4 ×3",
        "dare 0.015/4 ×3",
    }

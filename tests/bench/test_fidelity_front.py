"""The fidelity report compares the NPS family with the baselines' front at equal bits."""

from __future__ import annotations

from typing import Any

from bench.fidelity import front_comparison


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

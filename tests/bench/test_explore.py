"""``python -m bench.explore points``: a point off the grids, spelled as the grids' series."""

from __future__ import annotations

import pytest

from bench.explore import point_rows, point_series
from bench.fidelity import tasks_grid


def test_a_point_is_a_one_point_series_evaluated_as_the_grid_evaluates_its_method() -> None:
    s = point_series("nps-seeded 0.04 2 1")
    assert (s.method, s.keeps, s.bits, s.seeds) == ("nps-seeded", (0.04,), (2,), (1,))
    grid = {g.method: g.evaluation for g in tasks_grid()}
    assert s.evaluation == grid["nps-seeded"] == "fidelity"
    assert point_series("dare 0.04 2 0").evaluation == grid["dare"] == "weights"


@pytest.mark.parametrize(
    ("spec", "says"),
    [("dare 0.04 2", "method keep bits seed"), ("zip 0.04 2 0", "unknown method 'zip'")],
)
def test_a_malformed_point_is_refused_with_what_it_should_be(spec: str, says: str) -> None:
    with pytest.raises(SystemExit, match=says):
        point_series(spec)


def test_points_are_recorded_under_the_task_and_its_precision() -> None:
    result = {
        "task": "wordnet_nouns (bf16 cast)",
        "rows": [{"task": "wordnet_nouns", "series": "dare 0.04/2", "seed": 0}],
    }
    (row,) = point_rows(result)
    assert row == {"task": "wordnet_nouns (bf16 cast)", "series": "dare 0.04/2", "seed": 0}

"""The fidelity benchmark resumes from rows measured on the same fine-tune."""

from __future__ import annotations

from dataclasses import asdict

from bench.fidelity import Row, _formats, reusable_rows, same_finetune
from core.constants import FORMAT_VERSION


def test_a_remade_fine_tune_is_the_same_one() -> None:
    made = {
        "key": "bb0e9834576e",
        "final_loss": 0.210695,
        "created": "2026-11-29T05:30:23+0000",
        "train_seconds": 1692.2,
    }
    again = dict(made, created="2026-11-29T08:54:57+0000", train_seconds=582.2)
    assert same_finetune(made, again)
    assert not same_finetune(made, dict(again, final_loss=0.25))
    assert not same_finetune(made, dict(again, key="0123456789ab"))
    assert not same_finetune({}, made)


def test_bf16_casts_are_measured_apart(tmp_path) -> None:
    """``--precision bf16`` compresses the fine-tune's bf16 cast against the base's: lossless
    then stores under 16 bits/param (against a float32 base it stores ~20) and rebuilds the
    cast exactly; the result is keyed apart from the float32 one."""
    from bench.fidelity import Series, run_task
    from tests.fixtures import TINY_RECIPE, tiny_finetune_dir

    tiny_finetune_dir()
    grid = [Series("lossless", "lossless", (1.0,), (16,)), Series("dare", "dare", (0.1,), (16,))]
    out = run_task(
        TINY_RECIPE.task,
        grid,
        n_cal=32,
        workdir=tmp_path,
        log=lambda msg: None,
        recipe=TINY_RECIPE,
        precision="bf16",
    )
    assert (out["task"], out["precision"]) == (f"{TINY_RECIPE.task} (bf16 cast)", "bf16")
    lossless, dare = out["rows"]
    assert lossless["normalised_accuracy"] == 1.0 and lossless["gain_kept"] == 1.0
    assert 0 < lossless["bits_per_param"] < 16, lossless["bits_per_param"]
    assert dare["bits_per_param"] < lossless["bits_per_param"]
    assert out["recipe"]["key"] == TINY_RECIPE.key()  # resumes against the fine-tune made


def test_each_precision_is_keyed_apart() -> None:
    import pytest

    from bench.fidelity import PRECISIONS, run_task, task_key

    keys = {task_key("tweets", p) for p in PRECISIONS}
    assert len(keys) == len(PRECISIONS) and task_key("tweets", "fp32") == "tweets"
    with pytest.raises(ValueError, match="precision must be one of"):
        run_task("tweets", [], n_cal=8, workdir=None, log=print, precision="fp8")  # type: ignore[arg-type]


def test_rows_of_an_older_delta_format_are_measured_again() -> None:
    """A row's size depends on the format its delta was written in: a resumed run keeps only
    today's rows, and a section names the formats of its rows."""
    today = asdict(
        Row(
            "t",
            "dare",
            "dare",
            0.02,
            2,
            0,
            "weights",
            10,
            0.05,
            0.8,
            0.99,
            0.95,
            None,
            0.0,
            0,
            grid_point="dare|a",
        )
    )
    old = {k: v for k, v in today.items() if k != "format_version"} | {"grid_point": "dare|b"}
    assert today["format_version"] == FORMAT_VERSION
    assert reusable_rows([today, old, {**today, "grid_point": ""}]) == {"dare|a": today}
    assert _formats([today]) == f"format {FORMAT_VERSION}"
    assert _formats([today, old]) == (
        f"format 5 or earlier (1 rows), format {FORMAT_VERSION} (1 rows)"
    )

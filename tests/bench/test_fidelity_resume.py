"""The fidelity benchmark resumes from rows measured on the same fine-tune."""

from __future__ import annotations

from bench.fidelity import same_finetune


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

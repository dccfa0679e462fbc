"""The causal-LM benchmark's pieces (``bench/causal_lm.py``) on a tiny model built here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.causal_lm import (
    EOS,
    CausalRecipe,
    HeldOut,
    _config,
    _gain,
    _save,
    _stream,
    train,
    train_tokenizer,
)
from core.auto import auto_compress
from core.compress import compress
from core.params import Example
from core.reconstruct import reconstruct

TINY = CausalRecipe(vocab=320, hidden=32, layers=1, heads=2, intermediate=64, seq=16, batch=8)
TEXTS = [
    f"The {a} {b} walked to the {c} and saw {n} birds."
    for n, (a, b, c) in enumerate(
        [
            ("old", "man", "river"),
            ("young", "woman", "market"),
            ("tired", "horse", "barn"),
            ("small", "child", "garden"),
        ]
        * 12
    )
]


def _tiny(tmp_path: Path, steps: int = 25) -> tuple[Any, Any, Path]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, TINY.vocab)
    model = LlamaForCausalLM(_config(TINY))
    train(model, _stream(tok, TEXTS), TINY, steps, 3e-3, "tiny")
    out = tmp_path / "base"
    _save(model, tok, out)
    return model, tok, out


def test_tokenizer_starts_every_text_with_eos() -> None:
    tok = train_tokenizer(TEXTS, TINY.vocab)
    ids = tok(["The old man.", "A horse"])["input_ids"]
    assert all(seq[0] == tok.convert_tokens_to_ids(EOS) == 0 for seq in ids)
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == "The old man."
    assert len(_stream(tok, TEXTS[:2])) == sum(len(s) for s in tok(TEXTS[:2])["input_ids"])


def test_training_lowers_the_loss() -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer(TEXTS, TINY.vocab)
    model = LlamaForCausalLM(_config(TINY))
    losses = train(model, _stream(tok, TEXTS), TINY, 25, 3e-3, "tiny")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_held_out_measures_against_the_reference(tmp_path: Path) -> None:
    model, tok, base = _tiny(tmp_path)
    held = HeldOut(base, TEXTS[:10], batch=4)
    same = held.measure(base)
    assert same["agreement"] == 1.0
    assert abs(same["kl"]) < 1e-5
    assert 1.0 < same["perplexity"] < TINY.vocab
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _save(model, tok, tmp_path / "noisy")
    noisy = held.measure(tmp_path / "noisy")
    assert noisy["agreement"] < 1.0
    assert noisy["kl"] > 1e-3
    assert noisy["perplexity"] > same["perplexity"]


def test_gain_kept_is_the_share_of_the_perplexity_gap() -> None:
    assert _gain(40.0, 40.0, 20.0) == 0.0
    assert _gain(40.0, 20.0, 20.0) == 1.0
    assert math.isclose(_gain(40.0, 21.0, 20.0), 0.95)


@pytest.mark.slow
def test_lossless_and_auto_on_a_tiny_causal_fine_tune(tmp_path: Path) -> None:
    """A real fine-tune of the tiny model: lossless rebuilds it exactly, and auto's floor (on
    the fidelity path of core/evaluate.py for causal LMs) holds on the texts it judged."""
    from transformers import AutoModelForCausalLM

    _, tok, base = _tiny(tmp_path)
    ft_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    other = [t.replace("birds", "ships").replace("walked", "sailed") for t in TEXTS]
    train(ft_model, _stream(tok, other), TINY, 30, 3e-3, "ft")
    ft = tmp_path / "ft"
    _save(ft_model, tok, ft)
    held = HeldOut(ft, other[:16], batch=8)
    compress(base, ft, tmp_path / "l.slim", method="lossless")
    reconstruct(base, tmp_path / "l.slim", tmp_path / "l")
    assert held.measure(tmp_path / "l")["agreement"] == 1.0
    cal = [Example(t) for t in other]
    out = auto_compress(
        base, ft, tmp_path / "a.slim", min_fidelity=0.99, evaluation="fidelity", calibration=cal
    )
    reconstruct(base, tmp_path / "a.slim", tmp_path / "a")
    assert held.measure(tmp_path / "a")["agreement"] >= 0.99
    assert out.bits_per_param > 0


def test_the_subcommand_is_registered() -> None:
    import argparse

    from bench import causal_lm
    from bench.__main__ import MODULES

    assert MODULES["causal-lm"] == "causal_lm"
    p = argparse.ArgumentParser()
    causal_lm.add_arguments(p)
    args = p.parse_args(["--methods", "dare", "auto", "--fixtures", "full", "--test", "8"])
    assert (args.methods, args.fixtures, args.test) == (["dare", "auto"], ["full"], 8)
    with pytest.raises(SystemExit):
        p.parse_args(["--methods", "zip"])

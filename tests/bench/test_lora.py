"""LoRA recipes and fixtures of ``bench/finetune.py`` and ``bench/lora.py``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench import finetune
from bench.finetune import LORA_TARGETS, LoraRecipe, Recipe, full_recipe, lora_recipe


def test_full_recipe_keys_survive_the_bf16_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipes that do not ask for bf16 keep their keys whatever the CPU (the cached
    fine-tunes stay valid); one that asks for it on a CPU without bf16 instructions trains in
    fp32, under another key, and its record says so."""
    keys = {
        (r.task, r.steps): r.key()
        for r in (full_recipe("rotten_tomatoes"), Recipe("rotten_tomatoes", steps=50))
    }
    asked = Recipe("rotten_tomatoes", bf16=True)
    lora = lora_recipe("rotten_tomatoes", 8)
    for has in (True, False):
        monkeypatch.setattr(finetune, "cpu_has_bf16", lambda has=has: has)
        again = {
            (r.task, r.steps): r.key()
            for r in (full_recipe("rotten_tomatoes"), Recipe("rotten_tomatoes", steps=50))
        }
        assert again == keys
        assert finetune.training_precision(False) == "fp32"
        want = "bf16 autocast" if has else "fp32 (bf16 autocast asked; this CPU has no bf16"
        assert finetune.training_precision(True).startswith(want)
    monkeypatch.setattr(finetune, "cpu_has_bf16", lambda: True)
    native = (asked.key(), lora.key())
    monkeypatch.setattr(finetune, "cpu_has_bf16", lambda: False)
    assert (asked.key(), lora.key()) != native
    assert asked.key() != full_recipe("rotten_tomatoes").key()


def test_lora_recipes_are_told_apart() -> None:
    a = lora_recipe("tweets", 8)
    assert a.key() == LoraRecipe("tweets", rank=8).key()
    assert len({a.key(), lora_recipe("tweets", 32).key(), lora_recipe("tweets", 8, 1).key()}) == 3
    assert a.key() != LoraRecipe("tweets", rank=8, alpha=8).key()
    assert a.lora_alpha == 16
    assert finetune.default_out_dir(a).name == f"tweets-lora8-{a.key()}"


def test_targets_are_every_attention_and_mlp_projection() -> None:
    """The pattern PEFT matches picks the six projections of each of MiniLM's 6 layers and
    nothing else (``output.dense`` alone would also name the attention output)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(finetune.base_model_dir(), num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    pattern = finetune._target_pattern(LORA_TARGETS)
    hit = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    assert len(hit) == 36
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(linear) - set(hit) == {"bert.pooler.dense", "classifier"}


@pytest.mark.slow
def test_a_short_lora_merges_and_comes_back_at_the_adapters_size(tmp_path: Path) -> None:
    """A real (3-step) rank-4 LoRA of MiniLM: its merges in fp32 and bf16 are compressed by
    ``lowrank`` at rank ≤ 4 on the 36 adapted matrices, within 1.1× the adapter's fp16 size,
    and rebuild within fp16 rounding of τ (fp32; at exactly rank 4) or mostly bit-exact (bf16)."""
    from bench import lora
    from core.compress import compress

    recipe = LoraRecipe("rotten_tomatoes", rank=4, steps=3)
    adapter = finetune.make_finetune(recipe, out_dir=tmp_path / "adapter", verbose=False)
    marker = finetune.read_marker(adapter)
    assert marker is not None and marker["precision"] == finetune.training_precision(True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["modules_to_save"]
    sizes = lora.adapter_sizes(adapter)
    assert sizes["factor_bytes"] == 2 * 4 * 6 * (4 * 768 + 2 * 1920)
    assert sizes["head_bytes"] == 2 * (2 * 384 + 2)
    assert sizes["factor_bytes"] + sizes["head_bytes"] < sizes["fp16_bytes"]
    assert sizes["fp16_bytes"] < sizes["factor_bytes"] + sizes["head_bytes"] + 16_384
    bf16_base = tmp_path / "base-bf16"
    bf16_base.mkdir()
    lora.bf16_cast(finetune.base_model_dir(), bf16_base)
    for precision, base in (("fp32", finetune.base_model_dir()), ("bf16", bf16_base)):
        merged = tmp_path / f"merged-{precision}"
        merged.mkdir()
        lora.merge_with_peft(adapter, merged, lora._DTYPES[precision])
        out = compress(base, merged, tmp_path / f"{precision}.slim", method="lowrank")
        ranks = lora._ranks(tmp_path / f"{precision}.slim")
        assert len(ranks) == 36 and max(ranks.values()) <= 4, (precision, ranks)
        assert out.weight_bytes <= 1.1 * sizes["fp16_bytes"], (precision, out.weight_bytes)
        err = lora.rebuild_error(base, tmp_path / f"{precision}.slim", merged, precision)
        if precision == "fp32":
            assert set(ranks.values()) == {4}, ranks
            assert err["worst_rel_tau"] <= 2.0**-10, err
        else:
            # after 3 steps τ is about an ulp of bf16, mostly rounding: most weights come back
            # bit-exact (the trained fixtures' per-weight bound is `python -m bench lora`'s)
            assert err["exact"] >= 0.9, err
        got = load_file(str(merged / "model.safetensors"))
        assert {t.dtype for t in got.values()} == {lora._DTYPES[precision]}

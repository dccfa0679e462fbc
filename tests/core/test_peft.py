"""Merging PEFT LoRA adapters (``core.peft``) against the real ``peft``: adapters made with
``get_peft_model`` (factors randomly initialised, so ``B`` is not zero) and saved with
``save_pretrained``; our merge must give the tensors and the outputs of peft's own
``merge_and_unload()``, keep each base tensor's dtype, map names between a task model and a
bare encoder, and refuse what it cannot merge with a message that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
)

from core.peft import AdapterConfig, InvalidAdapter, merge_adapter
from core.peft_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.fixtures import base_dir

INPUT = {
    "input_ids": torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]),
}


def _lora(model: torch.nn.Module, out: Path, seed: int = 0, **kwargs: object) -> PeftModel:
    """A LoRA adapter of ``model`` with random A and B (not peft's zero B), saved to ``out``."""
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **kwargs)  # type: ignore[arg-type]
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return peft_model  # type: ignore[no-any-return]


def _max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert set(ours) >= set(theirs) - {"embeddings.position_ids"}, set(theirs) - set(ours)
    return max(
        (ours[k].float() - theirs[k].float()).abs().max().item() for k in theirs if k in ours
    )


@pytest.fixture(scope="module")
def minilm() -> Path:
    return base_dir()


def test_merge_equals_peft_merge_and_unload_on_minilm(minilm: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    peft_model = _lora(
        AutoModel.from_pretrained(minilm), adapter, r=8, lora_alpha=16,
        target_modules=["query", "value"],
    )  # fmt: skip
    with torch.no_grad():
        lora_out = peft_model(**INPUT).last_hidden_state
    reference = peft_model.merge_and_unload()

    done = merge_adapter(minilm, adapter, tmp_path / "merged")
    assert done.plan.rule == "as is"
    assert len(done.plan.pairs) == 12 and not done.plan.added and not done.plan.replaced
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(minilm / "model.safetensors")
    assert list(merged) == list(base)  # the base's names, in its order
    assert all(merged[k].dtype == base[k].dtype for k in base)
    diff = _max_diff(merged, reference.state_dict())
    assert diff < 1e-6, diff
    query = "encoder.layer.0.attention.self.query.weight"
    assert (merged[query] - base[query]).abs().max() > 1e-3  # the adapter did change it
    assert torch.equal(merged["encoder.layer.0.output.dense.weight"],
                       base["encoder.layer.0.output.dense.weight"])  # fmt: skip
    for name in ("config.json", "tokenizer.json", "vocab.txt", "modules.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (minilm / name).read_bytes()

    loaded = AutoModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ours = loaded(**INPUT).last_hidden_state
        theirs = reference.eval()(**INPUT).last_hidden_state
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours - lora_out).abs().max().item() < 1e-4  # merged == adapter applied


def test_a_task_model_adapter_with_its_head_merges_into_the_bare_encoder(
    minilm: Path, tmp_path: Path
) -> None:
    """An adapter made on ``BertForSequenceClassification`` (``bert.*`` names, a 3-label
    head in modules_to_save, rsLoRA, an alpha pattern) merged into the ``BertModel`` base."""
    adapter = tmp_path / "adapter"
    task = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=3)
    peft_model = _lora(
        task, adapter, r=4, lora_alpha=8, target_modules=["query", "key", "dense"],
        task_type="SEQ_CLS", use_rslora=True, alpha_pattern={"key": 32},
    )  # fmt: skip
    saved = load_file(adapter / ADAPTER_WEIGHTS)
    assert "base_model.model.classifier.weight" in saved
    reference = peft_model.merge_and_unload().eval()

    done = merge_adapter(minilm, adapter, tmp_path / "merged")
    assert done.plan.rule == "without 'bert.'"
    assert set(done.plan.added) == {"classifier.weight", "classifier.bias"}
    config = AdapterConfig.read(adapter)
    assert config.scaling("bert.encoder.layer.0.attention.self.key", rank=4) == 32 / 2
    assert config.scaling("bert.encoder.layer.0.attention.self.query", rank=4) == 8 / 2

    merged = load_file(tmp_path / "merged" / "model.safetensors")
    theirs = {k.removeprefix("bert."): v for k, v in reference.state_dict().items()}
    diff = _max_diff(merged, theirs)
    assert diff < 1e-6, diff
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "merged", num_labels=3
    ).eval()
    with torch.no_grad():
        ours, want = loaded(**INPUT).logits, reference(**INPUT).logits
    assert (ours - want).abs().max().item() < 1e-5


def _tiny_bert(path: Path, dtype: torch.dtype = torch.float32, prefix: bool = False) -> Path:
    config = BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(1)
    model: torch.nn.Module = BertModel(config)
    if prefix:
        model = AutoModelForSequenceClassification.from_config(config)
    model.to(dtype).save_pretrained(path)
    return path


def test_a_bf16_base_keeps_its_dtype_within_bf16_rounding(tmp_path: Path) -> None:
    base = _tiny_bert(tmp_path / "base", torch.bfloat16)
    adapter = tmp_path / "adapter"
    model = AutoModel.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = _lora(model, adapter, r=8, lora_alpha=8, target_modules=["query", "value"])
    reference = peft_model.merge_and_unload().state_dict()
    merge_adapter(base, adapter, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.bfloat16}
    name = "encoder.layer.1.attention.self.value.weight"
    # peft rounds the bf16 update before adding it; we add it in fp32 and round once
    ulp = reference[name].float().abs().max().item() * 2**-7
    assert (merged[name].float() - reference[name].float()).abs().max().item() <= 2 * ulp


def test_fan_in_fan_out_merges_gpt2_conv1d(tmp_path: Path) -> None:
    base = tmp_path / "gpt2"
    torch.manual_seed(2)
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2)
                    ).save_pretrained(base)  # fmt: skip
    adapter = tmp_path / "adapter"
    peft_model = _lora(
        GPT2LMHeadModel.from_pretrained(base), adapter, r=4, lora_alpha=8,
        target_modules=["c_attn"], fan_in_fan_out=True,
    )  # fmt: skip
    reference = peft_model.merge_and_unload().eval()
    merge_adapter(base, adapter, tmp_path / "merged")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        diff = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-5


def test_an_encoder_adapter_merges_into_a_task_model_base(tmp_path: Path) -> None:
    base = _tiny_bert(tmp_path / "task", prefix=True)  # bert.* + classifier.*
    bare = _tiny_bert(tmp_path / "bare")
    adapter = tmp_path / "adapter"
    _lora(AutoModel.from_pretrained(bare), adapter, r=2, lora_alpha=4, target_modules=["query"])
    done = merge_adapter(base, adapter, tmp_path / "merged")
    assert done.plan.rule == "with 'bert.'"
    assert "bert.encoder.layer.0.attention.self.query.weight" in done.plan.pairs


# -- what is refused ----------------------------------------------------------------------------


def test_an_adapter_of_another_base_names_the_targets_it_misses(
    minilm: Path, tmp_path: Path
) -> None:
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2)
                    ).save_pretrained(gpt2)  # fmt: skip
    adapter = tmp_path / "adapter"
    _lora(GPT2LMHeadModel.from_pretrained(gpt2), adapter, r=2, target_modules=["c_attn"])
    with pytest.raises(InvalidAdapter, match=r"not tensors of this base.*h\.0\.attn\.c_attn"):
        merge_adapter(minilm, adapter, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_same_names_other_shapes_are_refused(minilm: Path, tmp_path: Path) -> None:
    tiny = _tiny_bert(tmp_path / "tiny")
    adapter = tmp_path / "adapter"
    _lora(AutoModel.from_pretrained(tiny), adapter, r=2, target_modules=["query"])
    with pytest.raises(InvalidAdapter, match=r"do not update the base's .*\[384, 384\]"):
        merge_adapter(minilm, adapter, tmp_path / "out")


def _edit_config(adapter: Path, **changes: object) -> None:
    doc = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps(doc | changes))


def test_unsupported_adapters_are_refused_with_the_reason(tmp_path: Path) -> None:
    base = _tiny_bert(tmp_path / "base")
    adapter = tmp_path / "adapter"
    _lora(AutoModel.from_pretrained(base), adapter, r=2, target_modules=["query"])
    for changes, reason in (
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LORA"),
        ({"r": 0}, "positive integer 'r'"),
        ({"lora_alpha": "x"}, "lora_alpha"),
    ):
        broken = tmp_path / f"broken-{reason[:4]}"
        shutil.copytree(adapter, broken)
        _edit_config(broken, **changes)
        with pytest.raises(InvalidAdapter, match=reason):
            merge_adapter(base, broken, tmp_path / "out")
    (tmp_path / "nojson").mkdir()
    (tmp_path / "nojson" / ADAPTER_CONFIG).write_text("{")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        AdapterConfig.read(tmp_path / "nojson")
    with pytest.raises(InvalidAdapter, match="not a PEFT adapter"):
        AdapterConfig.read(base)

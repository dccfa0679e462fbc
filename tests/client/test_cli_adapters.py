"""PEFT adapters end to end against a live embedded service: a LoRA adapter made with the real
``peft`` is pushed with ``slim push`` (through the Hub routes, stored as it is), listed with
its rank, targets and size, pulled byte for byte, pulled merged into its base (``--merged``)
with the outputs of peft's own ``merge_and_unload()``, and read by ``PeftModel.from_pretrained``
through the Hub protocol (``HF_ENDPOINT``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel

from cli.main import main
from tests.client.helpers import tiny_bert
from tests.client.test_cli import tree
from tests.client.test_hub_clients import hub_python
from tests.conftest import Stack
from tests.infra import TEST_ADMIN_KEY

INPUT = {
    "input_ids": torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]]),
    "attention_mask": torch.ones(1, 7, dtype=torch.long),
}


def run(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*args, "--url", stack.url, "--api-key", TEST_ADMIN_KEY])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = run(stack, capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def make_adapter(base: Path, out: Path, seed: int) -> torch.Tensor:
    """A rank-8 LoRA adapter on query/value with random A and B, saved by peft; returns the
    merged model's output on :data:`INPUT` (peft's merge_and_unload)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModel.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False),
    )
    model.save_pretrained(out)
    with torch.no_grad():
        merged = model.merge_and_unload().eval()
        hidden: torch.Tensor = merged(**INPUT).last_hidden_state
    return hidden


@pytest.fixture
def served(
    embedded: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Stack, Path]:
    """The tiny BERT base pushed as ``tinybase``."""
    base, _ = tiny_bert(tmp_path, n_finetunes=0)
    code, _, err = run(embedded, capsys, "base", "push", str(base), "--name", "tinybase")
    assert code == 0, err
    return embedded, base


def test_push_list_pull_and_pull_merged(
    served: tuple[Stack, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, base = served
    adapter = tmp_path / "lora"
    expected = make_adapter(base, adapter, seed=0)
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }

    pushed = run_json(stack, capsys, "push", str(adapter), "--name", "lora", "--base", "tinybase")
    info = pushed["adapter"]
    base_id = stack.client.get("/v1/bases", params={"limit": 100}).json()["data"]
    assert info["base_id"] == next(b["id"] for b in base_id if b["name"] == "tinybase")
    assert (info["r"], info["lora_alpha"]) == (8, 16)
    assert sorted(info["target_modules"]) == ["query", "value"]
    assert sorted(pushed["report"]["sent"]) == ["adapter_model.safetensors"]  # others: inline

    listed = run_json(stack, capsys, "adapters")
    assert [a["name"] for a in listed] == ["lora"]
    assert listed[0]["size"] == sum(f["size"] for f in listed[0]["files"])
    assert listed[0]["size"] >= sum(p.stat().st_size for p in adapter.iterdir())
    code, out, _ = run(stack, capsys, "adapters")
    assert code == 0 and "lora" in out and "query,value" in out and "tinybase" in out
    assert run_json(stack, capsys, "ls") == []  # not a checkpoint: nothing was compressed

    # as pushed, byte for byte
    code, out, err = run(stack, capsys, "pull", "lora", str(tmp_path / "pulled"))
    assert code == 0, err
    pulled = tree(tmp_path / "pulled")
    assert tree(adapter).items() <= pulled.items()
    assert set(pulled) - set(tree(adapter)) == {".gitattributes"}
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(base), tmp_path / "pulled")
    with torch.no_grad():
        diff = (reloaded.eval()(**INPUT).last_hidden_state - expected).abs().max().item()
    assert diff < 1e-5

    # merged into the recorded base
    out_dir = tmp_path / "merged"
    cache = tmp_path / "cache"
    code, out, err = run(
        stack, capsys, "pull", "lora", str(out_dir), "--merged", "--cache-dir", str(cache)
    )
    assert code == 0, err
    merged = AutoModel.from_pretrained(out_dir).eval()
    with torch.no_grad():
        diff = (merged(**INPUT).last_hidden_state - expected).abs().max().item()
    assert diff < 1e-5, diff
    assert (out_dir / "config.json").read_bytes() == (base / "config.json").read_bytes()

    # the same directory again: nothing sent, the same commit
    again = run_json(stack, capsys, "push", str(adapter), "--name", "lora", "--base", "tinybase")
    assert again["adapter"]["commit_id"] == info["commit_id"]
    assert again["report"]["sent"] == [] and again["report"]["skipped"]


def test_without_a_recorded_base_merged_needs_one(
    served: tuple[Stack, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, base = served
    adapter = tmp_path / "lora2"
    expected = make_adapter(base, adapter, seed=1)
    code, out, err = run(stack, capsys, "push", str(adapter), "--name", "lora2")
    assert code == 0, err
    assert "no base recorded" in out  # its config names a local path, not a base here

    code, _, err = run(stack, capsys, "pull", "lora2", str(tmp_path / "m"), "--merged")
    assert code == 2 and "no base is recorded" in err and "--base" in err
    code, _, err = run(
        stack, capsys, "pull", "lora2", str(tmp_path / "m"), "--merged", "--base", "tinybase",
        "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert code == 0, err
    with torch.no_grad():
        got = AutoModel.from_pretrained(tmp_path / "m").eval()(**INPUT).last_hidden_state
    assert (got - expected).abs().max().item() < 1e-5

    code, _, err = run(stack, capsys, "push", str(adapter), "--name", "x", "--method", "dare")
    assert code == 2 and "stored as it is" in err
    code, _, err = run(stack, capsys, "push", str(adapter), "--name", "y", "--base", "nobase")
    assert code == 2 and "nobase" in err
    log = run_json(stack, capsys, "log", "tinybase")
    code, _, err = run(stack, capsys, "push", str(adapter), "--name", "tinybase")
    assert code == 2 and "holds a model, not a PEFT adapter" in err
    assert run_json(stack, capsys, "log", "tinybase") == log  # the base stays its main
    code, _, err = run(stack, capsys, "adapters", "tinybase")
    assert code == 2 and "holds no PEFT adapter" in err
    code, _, err = run(stack, capsys, "show", "lora2")
    assert code == 2 and "slim adapters lora2" in err
    code, _, err = run(stack, capsys, "pull", "lora2", str(tmp_path / "l"), "--local")
    assert code == 2 and "--local and --scale do not apply" in err


def test_peft_reads_a_pushed_adapter_through_the_hub_protocol(
    served: tuple[Stack, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack, base = served
    adapter = tmp_path / "lora"
    expected = make_adapter(base, adapter, seed=2)
    code, _, err = run(stack, capsys, "push", str(adapter), "--name", "lora", "--base", "tinybase")
    assert code == 0, err
    got = hub_python(
        stack,
        tmp_path / "hf",
        """
        import json, torch
        from peft import PeftModel
        from transformers import AutoModel
        base = AutoModel.from_pretrained("default/tinybase")
        model = PeftModel.from_pretrained(base, "default/lora").merge_and_unload().eval()
        ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        print(json.dumps(out.flatten().tolist()))
        """,
    )
    diff = (torch.tensor(got) - expected.flatten()).abs().max().item()
    assert diff < 1e-5, diff

"""The ``slim`` command as a new user meets it: a real ``slim serve`` process, the real
all-MiniLM-L6-v2 base and a small real fine-tune, pushed, compressed, pulled three ways
(server rebuild, resumed from a half-written file, ``--local``), loaded with transformers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import client as sdk
from core.files import sha256_file
from tests.client.helpers import CKPT_FILE_ROUTE, counter, serve, settled_counter, slim
from tests.fixtures import base_dir, test_examples, tiny_finetune_dir
from tests.infra import TEST_ADMIN_KEY

pytestmark = pytest.mark.slow


def tree(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_real_model_push_pull_local_resume_and_load(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench.finetune import predict

    ft_dir = tiny_finetune_dir()
    with serve(tmp_path / "data") as server:
        env = server.env()
        timings = {}
        t0 = time.perf_counter()
        r = slim("base", "push", str(base_dir()), "--name", "all-MiniLM-L6-v2", env=env)
        timings["base push"] = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        print("slim base push:", r.stdout.strip())

        t0 = time.perf_counter()
        r = slim(
            "push", str(ft_dir), "--base", "all-MiniLM-L6-v2", "--name", "rotten-tomatoes",
            "--method", "magnitude", "--keep", "0.1", "--wait", env=env,
        )  # fmt: skip
        timings["push --wait"] = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        print("slim push --wait:", r.stdout.strip())
        assert "rotten-tomatoes ready:" in r.stdout

        pulled = tmp_path / "pulled"
        t0 = time.perf_counter()
        r = slim("pull", "rotten-tomatoes", str(pulled), env=env)
        timings["pull"] = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        print("slim pull:", r.stdout.strip())
        assert set(tree(pulled)) == set(tree(ft_dir))

        client = sdk.SlimClient(server.url, TEST_ADMIN_KEY)
        ckpt = client.get_checkpoint("rotten-tomatoes")
        print(
            f"checkpoint: {ckpt.original_bytes} B → {ckpt.stored_bytes} B stored, "
            f"ratio {ckpt.ratio:.2f}, {ckpt.bits_per_param:.3f} bits/param; "
            f"timings {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}"
        )
        assert ckpt.ratio is not None and ckpt.ratio > 5

        # --local: only the delta crosses the wire (the base once, into the cache).
        cache = tmp_path / "cache"
        local = client.pull_local("rotten-tomatoes", tmp_path / "local", cache_dir=cache)
        assert tree(tmp_path / "local") == tree(pulled)  # byte-identical to the server's pull
        again = client.pull_local("rotten-tomatoes", tmp_path / "local2", cache_dir=cache)
        assert again.base_bytes == 0 and again.delta_bytes == 0
        print(
            f"pull --local: delta {local.delta_bytes} B + base {local.base_bytes} B (first), "
            f"then {again.bytes_received} B in {again.seconds:.1f} s"
        )

        # An interrupted pull: half of the weights were written, then the transfer stopped.
        weights = pulled / "model.safetensors"
        data = weights.read_bytes()
        part = pulled / "model.safetensors.incomplete"
        part.write_bytes(data[: len(data) // 2])
        weights.unlink()
        ranged = counter(server.client, "GET", CKPT_FILE_ROUTE, 206)
        report = client.pull("rotten-tomatoes", pulled)
        resumed = {f.path: f for f in report.files}["model.safetensors"]
        assert resumed.resumed_from == len(data) // 2
        assert settled_counter(server.client, "GET", CKPT_FILE_ROUTE, 206, ranged + 1) == ranged + 1
        assert sha256_file(weights) == resumed.sha256 == tree(tmp_path / "local")[weights.name]
        client.close()

    # The pulled directory is a transformers model that predicts like the original.
    model = AutoModelForSequenceClassification.from_pretrained(pulled)
    tokenizer = AutoTokenizer.from_pretrained(pulled)
    examples = test_examples(100)
    want = predict(ft_dir, examples)
    got = predict(model, examples, tokenizer=tokenizer)
    agree = sum(a == b for a, b in zip(want, got, strict=True)) / len(examples)
    print(f"agreement with the original fine-tune on {len(examples)} test examples: {agree:.2f}")
    assert agree >= 0.9
    assert not any(name.endswith(".incomplete") for name in os.listdir(pulled))

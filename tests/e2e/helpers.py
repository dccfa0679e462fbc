"""Shared steps of the end-to-end tests: push the real model, pull it back, compare predictions."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.files import sha256_file
from tests.conftest import Stack
from tests.fixtures import base_dir, tiny_finetune_dir
from tests.infra import push_dir, wait_job

#: Test examples whose predictions are compared (a fixed sample of the task's test split).
N_EXAMPLES = 100


@dataclass
class Run:
    """Measured figures of one push → pull run."""

    stack: str
    method: str
    original_bytes: int = 0
    stored_bytes: int = 0
    ratio: float = 0.0
    bits_per_param: float = 0.0
    push_seconds: float = 0.0
    job_seconds: float = 0.0
    pull_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> str:
        return "slim-run " + json.dumps(asdict(self), sort_keys=True)


def push_base(client: httpx.Client, base_dir: Path, name: str = "all-MiniLM-L6-v2") -> dict:
    base = client.post("/v1/bases", json={"name": name}).json()
    push_dir(client, "bases", base["id"], base_dir)
    r = client.post(f"/v1/bases/{base['id']}/commit")
    assert r.status_code == 200, r.text
    return dict(r.json())


def push_checkpoint(client: httpx.Client, base_id: str, ft_dir: Path, **params: Any) -> dict:
    r = client.post("/v1/checkpoints", json={"base_id": base_id, **params})
    assert r.status_code == 201, r.text
    ckpt = r.json()
    push_dir(client, "checkpoints", ckpt["id"], ft_dir)
    return dict(ckpt)


def pull_all(client: httpx.Client, checkpoint_id: str, out: Path) -> dict[str, str]:
    """Download every file of a ready checkpoint into ``out``; returns path → sha256, each
    checked against the ETag."""
    out.mkdir(parents=True, exist_ok=True)
    files = client.get(f"/v1/checkpoints/{checkpoint_id}/files").json()["data"]
    digests = {}
    for f in files:
        target = out / f["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with client.stream("GET", f"/v1/checkpoints/{checkpoint_id}/files/{f['path']}") as r:
            assert r.status_code == 200, r.read()
            with target.open("wb") as fh:
                for chunk in r.iter_bytes():
                    h.update(chunk)
                    fh.write(chunk)
            assert r.headers["etag"] == f'"{h.hexdigest()}"'
        assert target.stat().st_size == f["size"]
        digests[f["path"]] = h.hexdigest()
    return digests


def agreement(ft_dir: Path, pulled: Path) -> tuple[float, float, float]:
    """(top-1 agreement, accuracy of the original, accuracy of the pulled model)."""
    from bench.finetune import predict
    from tests.fixtures import test_examples

    examples = test_examples(N_EXAMPLES)
    want = predict(ft_dir, examples)
    got = predict(pulled, examples)
    agree = sum(a == b for a, b in zip(want, got, strict=True)) / len(examples)
    acc_ft = sum(p == e.label for p, e in zip(want, examples, strict=True)) / len(examples)
    acc_pulled = sum(p == e.label for p, e in zip(got, examples, strict=True)) / len(examples)
    return agree, acc_ft, acc_pulled


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def push_pull_real_model(stack: Stack, tmp_path: Path) -> Run:
    """Push the real base and fine-tune, compress (magnitude, keep 0.1), pull every file,
    compare predictions with the original fine-tune; returns the measured figures."""
    client = stack.client
    ft_dir = tiny_finetune_dir()
    run = Run(stack=stack.kind, method="magnitude")
    t0 = time.perf_counter()
    base = push_base(client, base_dir())
    ckpt = push_checkpoint(client, base["id"], ft_dir, name="rt", method="magnitude", keep=0.1)
    run.push_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    job = client.post(f"/v1/checkpoints/{ckpt['id']}/commit").json()
    job = wait_job(client, job["id"], timeout=600)
    run.job_seconds = time.perf_counter() - t1
    assert job["state"] == "succeeded", job

    info = client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    run.original_bytes, run.stored_bytes = info["original_bytes"], info["stored_bytes"]
    run.ratio, run.bits_per_param = info["ratio"], info["bits_per_param"]
    assert info["ratio"] > 5 and info["num_params"] > 20_000_000

    t2 = time.perf_counter()
    digests = pull_all(client, ckpt["id"], tmp_path / "pulled")
    run.pull_seconds = time.perf_counter() - t2
    assert set(digests) == {
        p.relative_to(ft_dir).as_posix() for p in ft_dir.rglob("*") if p.is_file()
    }
    for rel, digest in digests.items():
        if not rel.endswith(".safetensors"):
            assert digest == sha256_file(ft_dir / rel)  # aux files come back byte for byte

    agree, acc_ft, acc_pulled = agreement(ft_dir, tmp_path / "pulled")
    run.extra = {"agreement": agree, "accuracy_ft": acc_ft, "accuracy_pulled": acc_pulled}
    assert agree >= 0.9, run.report()
    assert acc_pulled >= acc_ft - 0.05, run.report()
    return run

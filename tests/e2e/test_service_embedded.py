"""End to end on the embedded stack (SQLite + local blobs + in-process worker), through HTTP,
with the real all-MiniLM-L6-v2 base and a small real fine-tune of it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from core.files import sha256_file
from tests.conftest import Stack
from tests.e2e.helpers import push_base, push_checkpoint, push_pull_real_model
from tests.fixtures import base_dir, tiny_finetune_dir
from tests.infra import wait_job

pytestmark = pytest.mark.slow


def test_real_model_push_commit_pull(embedded: Stack, tmp_path: Path) -> None:
    print(push_pull_real_model(embedded, tmp_path).report())


def test_real_model_lossless_and_range_resume(embedded: Stack, tmp_path: Path) -> None:
    client = embedded.client
    ft_dir = tiny_finetune_dir()
    base = push_base(client, base_dir())
    ckpt = push_checkpoint(client, base["id"], ft_dir, name="exact", method="lossless")
    job = client.post(f"/v1/checkpoints/{ckpt['id']}/commit").json()
    assert wait_job(client, job["id"], timeout=600)["state"] == "succeeded"
    info = client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    print(f"slim-run lossless ratio={info['ratio']:.3f} stored={info['stored_bytes']}")

    url = f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors"
    want = sha256_file(ft_dir / "model.safetensors")
    size = (ft_dir / "model.safetensors").stat().st_size
    # An interrupted pull: stop after ~30 MB, then resume from there with Range + If-Range.
    part = bytearray()
    with client.stream("GET", url) as r:
        etag = r.headers["etag"]
        assert etag == f'"{want}"'
        for chunk in r.iter_bytes():
            part += chunk
            if len(part) > 30 << 20:
                break
    resumed = client.get(url, headers={"Range": f"bytes={len(part)}-", "If-Range": etag})
    assert resumed.status_code == 206
    assert resumed.headers["content-range"] == f"bytes {len(part)}-{size - 1}/{size}"
    whole = bytes(part) + resumed.content
    assert len(whole) == size and hashlib.sha256(whole).hexdigest() == want  # bit-identical

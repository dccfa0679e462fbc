"""Push → commit → job → pull through HTTP, on the embedded and the distributed stack."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import xxhash

from core.delta_format import DeltaReader
from core.files import HEADER_XXH3, sha256_file
from core.reconstruct import reconstruct
from core.safetensors_io import SafetensorsFile
from tests.conftest import Models, Stack
from tests.infra import commit_and_wait, make_base, make_checkpoint

pytestmark = pytest.mark.usefixtures("stack")


def pull(stack: Stack, checkpoint_id: str, path: str, **params: object) -> bytes:
    r = stack.client.get(f"/v1/checkpoints/{checkpoint_id}/files/{path}", params=params)
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == len(r.content)
    return r.content


def test_push_commit_pull_magnitude(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    assert base["state"] == "ready"
    assert base["num_params"] == sum(
        t.numel for t in SafetensorsFile(models.base / "model.safetensors").header.tensors.values()
    )
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
    job = commit_and_wait(stack.client, ckpt["id"])
    assert job["state"] == "succeeded", job
    assert job["attempts"] == 1 and job["progress"]["phase"] == "done"

    info = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    assert info["state"] == "ready"
    originals = {p.name: p for p in models.finetune.rglob("*") if p.is_file()}
    assert info["original_bytes"] == sum(p.stat().st_size for p in originals.values())
    assert 0 < info["stored_bytes"] < info["original_bytes"]
    assert info["ratio"] == pytest.approx(info["original_bytes"] / info["stored_bytes"])
    assert info["bits_per_param"] > 0 and info["fitness"]["method"] == "magnitude"

    files = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["data"]
    assert {f["path"] for f in files} == {
        "config.json",
        "model.safetensors",
        "tokenizer/vocab.txt",
    }
    for f in files:
        assert f["stored"] is False  # originals dropped after compression
        r = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files/{f['path']}")
        assert r.status_code == 200
        assert r.headers["etag"] == f'"{f["recon_sha256"]}"'
        assert hashlib.sha256(r.content).hexdigest() == f["recon_sha256"]
        if f["role"] == "weights":  # rebuilt: the recorded xxh3-128 too, for a cheap check
            assert r.headers[HEADER_XXH3] == xxhash.xxh3_128_hexdigest(r.content)
        if f["role"] == "aux":  # carried byte for byte
            assert f["recon_sha256"] == f["sha256"]
    weights = pull(stack, ckpt["id"], "model.safetensors")
    assert len(weights) == (models.finetune / "model.safetensors").stat().st_size


def test_lossless_pull_is_byte_identical(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune, method="lossless")
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    for path in ("model.safetensors", "config.json", "tokenizer/vocab.txt"):
        got = pull(stack, ckpt["id"], path)
        assert hashlib.sha256(got).hexdigest() == sha256_file(models.finetune / path)


def test_range_requests_match_the_whole_file(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune, method="dare")
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    url = f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors"
    whole = stack.client.get(url).content
    size = len(whole)
    header_len = 8 + int.from_bytes(whole[:8], "little")
    cases = [
        (0, 3),  # inside the length prefix
        (5, header_len + 10),  # header into the first tensor
        (header_len, header_len),  # exactly the first data byte
        (header_len + 1000, header_len + 70_000),  # across tensors
        (size - 100, size - 1),  # the tail
        (1234, None),  # open-ended (a resumed download)
    ]
    for start, end in cases:
        spec = f"bytes={start}-" + ("" if end is None else str(end))
        r = stack.client.get(url, headers={"Range": spec})
        stop = size if end is None else end + 1
        assert r.status_code == 206, (spec, r.text)
        assert r.content == whole[start:stop], spec
        assert r.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
        assert int(r.headers["content-length"]) == stop - start
    r = stack.client.get(url, headers={"Range": "bytes=-50"})
    assert r.status_code == 206 and r.content == whole[-50:]
    r = stack.client.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.json()["code"] == "range_not_satisfiable"
    assert r.headers["content-range"] == f"bytes */{size}"
    etag = stack.client.head(url).headers["etag"]
    r = stack.client.get(url, headers={"Range": "bytes=10-", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == whole  # another version: sent whole
    r = stack.client.get(url, headers={"Range": "bytes=10-", "If-Range": etag})
    assert r.status_code == 206 and r.content == whole[10:]
    assert stack.client.get(url, headers={"If-None-Match": etag}).status_code == 304


def test_head_and_scale(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    url = f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors"
    head = stack.client.head(url)
    assert head.status_code == 200 and head.content == b""
    size = int(head.headers["content-length"])
    assert size == (models.finetune / "model.safetensors").stat().st_size
    assert head.headers[HEADER_XXH3] == stack.client.get(url).headers[HEADER_XXH3]
    scaled = stack.client.get(url, params={"scale": 0})
    assert scaled.status_code == 200 and "etag" not in scaled.headers
    assert HEADER_XXH3 not in scaled.headers  # recorded for the fine-tune only
    assert len(scaled.content) == size
    # λ = 0 gives the base's weights for every tensor the base has.
    st_scaled = _tensors(scaled.content)
    st_base = _tensors((models.base / "model.safetensors").read_bytes())
    for name, raw in st_base.items():
        assert st_scaled[name] == raw, name
    half = stack.client.get(url, params={"scale": 0.5})
    assert half.status_code == 200 and half.content not in (
        scaled.content,
        pull(stack, ckpt["id"], "model.safetensors"),
    )
    bad = stack.client.get(url, params={"scale": "nan"})
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error"


def test_delta_download_rebuilds_offline(stack: Stack, models: Models, tmp_path: Path) -> None:
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    r = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/delta")
    assert r.status_code == 200
    assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    delta = tmp_path / "ft.slim"
    delta.write_bytes(r.content)
    with DeltaReader(delta) as reader:
        assert reader.doc.method["name"] == "magnitude"
    reconstruct(models.base, delta, tmp_path / "out")
    served = pull(stack, ckpt["id"], "model.safetensors")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == served
    part = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/delta", headers={"Range": "bytes=8-15"})
    assert part.status_code == 206 and part.content == r.content[8:16]


def test_base_files_can_be_pulled(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    url = f"/v1/bases/{base['id']}/files/model.safetensors"
    r = stack.client.get(url)
    assert r.status_code == 200
    assert r.content == (models.base / "model.safetensors").read_bytes()
    assert r.headers["etag"] == f'"{sha256_file(models.base / "model.safetensors")}"'
    r = stack.client.get(url, headers={"Range": "bytes=100-199"})
    assert (
        r.status_code == 206
        and r.content == (models.base / "model.safetensors").read_bytes()[100:200]
    )


def _tensors(data: bytes) -> dict[str, bytes]:
    n = int.from_bytes(data[:8], "little")
    import json

    doc = json.loads(data[8 : 8 + n])
    doc.pop("__metadata__", None)
    off = 8 + n
    return {
        k: data[off + v["data_offsets"][0] : off + v["data_offsets"][1]] for k, v in doc.items()
    }

"""Every bad input of the issue gets a 4xx with its stable code, before any job is queued,
and leaves nothing stored behind (no file row; the blob store holds no new object)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from core.safetensors_io import build_header, save_file
from tests.conftest import Models, Stack, run_stack
from tests.infra import make_base, make_checkpoint, tiny_model, tiny_tensors


def blob_keys(stack: Stack) -> set[str]:
    return {e.key for e in stack.runtime.store.list_keys("sha256/")}


def tmp_keys(stack: Stack) -> set[str]:
    return {e.key for e in stack.runtime.store.list_keys("tmp/")}


def no_jobs(stack: Stack) -> bool:
    return stack.client.get("/v1/jobs").json()["count"] == 0


@pytest.fixture
def open_ckpt(stack: Stack, models: Models) -> dict:
    base = make_base(stack.client, models.base)
    return make_checkpoint(stack.client, base["id"], None)


def put(stack: Stack, ckpt: dict, path: str, body: bytes, **headers: str):  # type: ignore[no-untyped-def]
    return stack.client.put(
        f"/v1/checkpoints/{ckpt['id']}/files/{path}", content=body, headers=headers
    )


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    entries = [(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    return build_header(entries) + b"".join(t.numpy().tobytes() for t in tensors.values())


GOOD = safetensors_bytes({"w": torch.ones(4, 4)})
BAD_JSON = b"{not json at all, no no no}"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "truncated"),
        (b"\x10\x00\x00", "truncated"),
        (b"this is a pickle, not safetensors" * 10, "invalid_safetensors"),
        (b"PK\x03\x04" + b"\x00" * 200, "invalid_safetensors"),  # a zip (torch .bin)
        (struct.pack("<Q", len(BAD_JSON)) + BAD_JSON, "invalid_safetensors"),
        (GOOD[: len(GOOD) - 7], "truncated"),  # cut inside the data
        (GOOD[:20], "truncated"),  # cut inside the header
        (GOOD + b"trailing", "invalid_safetensors"),
        (
            build_header([("w", "F32", (4, 4))]).replace(b'"F32"', b'"X99"') + b"\0" * 64,
            "invalid_safetensors",
        ),  # unknown dtype
    ],
    ids=[
        "empty",
        "short",
        "text",
        "zip",
        "bad-json",
        "cut-data",
        "cut-header",
        "trailing",
        "unknown-dtype",
    ],
)
def test_bad_safetensors_uploads(stack: Stack, open_ckpt: dict, body: bytes, code: str) -> None:
    before = blob_keys(stack)
    r = put(stack, open_ckpt, "model.safetensors", body)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == code, r.json()
    assert r.json()["detail"]
    files = stack.client.get(f"/v1/checkpoints/{open_ckpt['id']}/files").json()
    assert files["count"] == 0
    assert blob_keys(stack) == before and not tmp_keys(stack)
    assert no_jobs(stack)


def test_truncated_body_without_content_length(stack: Stack, open_ckpt: dict) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield GOOD[:30]
        yield GOOD[30:-4]

    r = stack.client.put(f"/v1/checkpoints/{open_ckpt['id']}/files/m.safetensors", content=chunks())
    assert r.status_code == 400 and r.json()["code"] == "truncated"


@pytest.mark.parametrize(
    "raw_path",
    ["%2E%2E/etc/passwd", "a/%2E%2E/%2E%2E/b.json", "/etc/passwd", "a%00b.json", "a\\b.json"],
    ids=["dotdot", "nested-dotdot", "absolute", "nul", "backslash"],
)
def test_bad_paths(stack: Stack, open_ckpt: dict, raw_path: str) -> None:
    url = f"{stack.url}/v1/checkpoints/{open_ckpt['id']}/files/{raw_path}"
    r = stack.client.put(url, content=b"{}")
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_path"
    assert stack.client.get(f"/v1/checkpoints/{open_ckpt['id']}/files").json()["count"] == 0


def test_header_too_large(tmp_path: Path) -> None:
    with run_stack("embedded", tmp_path, workers=0, max_header_bytes=1024) as stack:
        big = {f"tensor_with_a_long_name_{i:04d}": torch.zeros(1) for i in range(100)}
        body = safetensors_bytes(big)
        b = stack.client.post("/v1/bases", json={"name": "b"}).json()
        r = stack.client.put(f"/v1/bases/{b['id']}/files/model.safetensors", content=body)
        assert r.status_code == 400 and r.json()["code"] == "header_too_large"
        assert "SLIM_MAX_HEADER_BYTES" in r.json()["detail"]


def test_file_size_cap(tmp_path: Path) -> None:
    with run_stack("embedded", tmp_path, workers=0, max_file_bytes=1000) as stack:
        b = stack.client.post("/v1/bases", json={"name": "b"}).json()
        r = stack.client.put(f"/v1/bases/{b['id']}/files/vocab.txt", content=b"x" * 1001)
        assert r.status_code == 413 and r.json()["code"] == "blob_too_large"

        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(20):
                yield b"y" * 100  # no Content-Length: the cap applies while streaming

        r = stack.client.put(f"/v1/bases/{b['id']}/files/vocab.txt", content=chunks())
        assert r.status_code == 413 and r.json()["code"] == "blob_too_large"
        assert not list(stack.runtime.store.list_keys(""))  # nothing kept, not even tmp


def test_too_many_files(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0, max_files_per_checkpoint=2) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], None)
        assert put(stack, ckpt, "a.json", b"{}").status_code == 200
        assert put(stack, ckpt, "b.json", b"{}").status_code == 200
        assert put(stack, ckpt, "a.json", b"[]").status_code == 200  # a replacement is fine
        r = put(stack, ckpt, "c.json", b"{}")
        assert r.status_code == 400 and r.json()["code"] == "too_many_files"


def test_checksum_header(stack: Stack, open_ckpt: dict) -> None:
    r = put(stack, open_ckpt, "config.json", b"{}", **{"X-Slim-Sha256": "0" * 64})
    assert r.status_code == 400 and r.json()["code"] == "checksum_mismatch"
    import hashlib

    good = hashlib.sha256(b"{}").hexdigest()
    r = put(stack, open_ckpt, "config.json", b"{}", **{"X-Slim-Sha256": good.upper()})
    assert r.status_code == 200 and r.json()["sha256"] == good


def test_reput_replaces_and_listing_resumes(stack: Stack, open_ckpt: dict) -> None:
    first = put(stack, open_ckpt, "model.safetensors", GOOD).json()
    assert first["size"] == len(GOOD) and first["role"] == "weights" and first["stored"]
    other = safetensors_bytes({"w": torch.zeros(4, 4)})
    second = put(stack, open_ckpt, "model.safetensors", other).json()
    assert second["sha256"] != first["sha256"]
    listing = stack.client.get(f"/v1/checkpoints/{open_ckpt['id']}/files").json()
    assert listing["count"] == 1 and listing["data"][0]["sha256"] == second["sha256"]


# -- commit-time checks --------------------------------------------------------------------------


def test_commit_without_weights(stack: Stack, open_ckpt: dict) -> None:
    put(stack, open_ckpt, "config.json", b"{}")
    refused = put(stack, open_ckpt, "pytorch_model.bin", b"PK\x03\x04 pickled weights")
    assert refused.status_code == 415 and refused.json()["code"] == "unsupported_file"
    r = stack.client.post(f"/v1/checkpoints/{open_ckpt['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "no_weights"
    assert "safe_serialization" in r.json()["detail"]
    assert no_jobs(stack)
    failed = stack.client.get(f"/v1/checkpoints/{open_ckpt['id']}").json()
    assert failed["state"] == "failed" and failed["error"].startswith("no_weights: ")
    empty = make_checkpoint(stack.client, open_ckpt["base_id"], None, name="empty")
    r = stack.client.post(f"/v1/checkpoints/{empty['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "no_weights"


def test_commit_shape_mismatch(stack: Stack, open_ckpt: dict, tmp_path: Path) -> None:
    wrong = {n: torch.zeros(*(d + 1 for d in t.shape)) for n, t in tiny_tensors(0).items()}
    d = tiny_model(tmp_path / "wrong", wrong)
    put(stack, open_ckpt, "model.safetensors", (d / "model.safetensors").read_bytes())
    r = stack.client.post(f"/v1/checkpoints/{open_ckpt['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "base_mismatch", r.json()
    assert no_jobs(stack)
    state = stack.client.get(f"/v1/checkpoints/{open_ckpt['id']}").json()["state"]
    assert state == "failed"  # its files dropped for GC (tests/service/test_push_rules.py)


def test_commit_dtype_mismatch(stack: Stack, open_ckpt: dict, tmp_path: Path) -> None:
    ints = {n: torch.zeros(t.shape, dtype=torch.int32) for n, t in tiny_tensors(0).items()}
    save_file(ints, tmp_path / "m.safetensors")
    put(stack, open_ckpt, "model.safetensors", (tmp_path / "m.safetensors").read_bytes())
    r = stack.client.post(f"/v1/checkpoints/{open_ckpt['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "base_mismatch"
    assert no_jobs(stack)


def test_one_tensor_of_another_kind_is_refused(
    stack: Stack, open_ckpt: dict, tmp_path: Path
) -> None:
    tensors = tiny_tensors(0)
    tensors["norm.weight"] = torch.zeros(64, dtype=torch.int64)
    save_file(tensors, tmp_path / "m.safetensors")
    put(stack, open_ckpt, "model.safetensors", (tmp_path / "m.safetensors").read_bytes())
    r = stack.client.post(f"/v1/checkpoints/{open_ckpt['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "base_mismatch"
    assert "norm.weight" in r.json()["detail"]


def test_unknown_and_uncommitted_base(stack: Stack) -> None:
    body = {"name": "x", "base_id": "00000000-0000-0000-0000-000000000000"}
    r = stack.client.post("/v1/checkpoints", json=body)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    b = stack.client.post("/v1/bases", json={"name": "b"}).json()
    r = stack.client.post("/v1/checkpoints", json={"name": "x", "base_id": b["id"]})
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    r = stack.client.post(f"/v1/bases/{b['id']}/commit")
    assert r.status_code == 400 and r.json()["code"] == "no_weights"
    assert no_jobs(stack)


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"method": "zip"}, "validation_error"),  # not in the schema's enum
        ({"method": "magnitude", "min_fidelity": 0.9}, "invalid_argument"),
        ({"value_bits": 5}, "validation_error"),
        ({"evaluation": "vibes"}, "validation_error"),
        ({"evaluation": "fidelity"}, "invalid_calibration"),
        ({"method": "auto"}, "invalid_calibration"),
        (
            {"evaluation": "accuracy", "calibration": [{"text": "no label"}]},
            "invalid_calibration",
        ),
        ({"keep": 0}, "validation_error"),
        ({"keep": 1.5}, "validation_error"),
        ({"name": ""}, "validation_error"),
        ({"surprise": 1}, "validation_error"),
    ],
)
def test_bad_checkpoint_parameters(stack: Stack, models: Models, extra: dict, code: str) -> None:
    base = make_base(stack.client, models.base)
    r = stack.client.post("/v1/checkpoints", json={"name": "x", "base_id": base["id"], **extra})
    assert r.status_code in (400, 422), r.text
    assert r.json()["code"] == code, r.json()


def test_files_are_fixed_after_commit(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    r = stack.client.put(f"/v1/bases/{base['id']}/files/extra.json", content=b"{}")
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    again = stack.client.post(f"/v1/bases/{base['id']}/commit")
    assert again.status_code == 200  # committing again is harmless
    dup = stack.client.post("/v1/bases", json={"name": base["name"]})
    assert dup.status_code == 409 and dup.json()["code"] == "already_exists"


def test_unknown_routes_and_ids(stack: Stack) -> None:
    r = stack.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = stack.client.get("/v1/checkpoints/nope")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = stack.client.get("/v1/jobs/nope")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = stack.client.delete("/v1/healthz")
    assert r.status_code in (404, 405)
    r = stack.client.post(
        "/v1/bases", content=b"not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    assert json.loads(r.text)["detail"]


@pytest.mark.parametrize("route", ["/v1/bases", "/v1/checkpoints", "/v1/jobs"])
def test_page_offsets_are_bounded(stack: Stack, route: str) -> None:
    # An offset past what a database integer holds is a 422, not a driver overflow (a 500).
    r = stack.client.get(route, params={"offset": str(2**64)})
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    assert stack.client.get(route, params={"offset": "1000"}).status_code == 200


def test_client_gone_mid_upload_leaves_nothing(stack: Stack, open_ckpt: dict) -> None:
    import socket
    import time

    port = int(stack.url.rsplit(":", 1)[1])
    body = GOOD[: len(GOOD) // 2]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"PUT /v1/checkpoints/{open_ckpt['id']}/files/model.safetensors HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Length: {len(GOOD)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.3)  # the server is now waiting for the rest
    deadline = time.monotonic() + 10
    while tmp_keys(stack) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tmp_keys(stack)
    assert stack.client.get(f"/v1/checkpoints/{open_ckpt['id']}/files").json()["count"] == 0
    assert stack.client.get("/healthz").status_code == 200

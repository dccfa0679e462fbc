"""Jobs, cancel, merges, deletes, retention, stats, probes, metrics and the OpenAPI document."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from core.files import sha256_file
from tests.conftest import Models, Stack, run_stack
from tests.infra import commit_and_wait, make_base, make_checkpoint, wait_job


def test_merge_creates_a_derived_checkpoint(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    a = make_checkpoint(stack.client, base["id"], models.finetune, name="a")
    b = make_checkpoint(stack.client, base["id"], models.finetune2, name="b")
    early = stack.client.post(
        "/v1/merges", json={"name": "m0", "checkpoint_ids": [a["id"], b["id"]]}
    )
    assert early.status_code == 409 and early.json()["code"] == "conflict"  # not ready yet
    for c in (a, b):
        assert commit_and_wait(stack.client, c["id"])["state"] == "succeeded"
    ab = {"name": "ab", "checkpoint_ids": [a["id"], b["id"]], "method": "ties", "lambda": 0.8}
    r = stack.client.post("/v1/merges", json=ab)
    assert r.status_code == 202, r.text
    refused = wait_job(stack.client, r.json()["id"])  # the two heads differ: never averaged
    assert refused["state"] == "failed" and "heads_from" in refused["error"]["detail"], refused
    stack.client.delete(f"/v1/checkpoints/{refused['checkpoint_id']}")
    outsider = stack.client.post("/v1/merges", json={**ab, "heads_from": "nope"})
    assert outsider.status_code == 404
    r = stack.client.post("/v1/merges", json={**ab, "heads_from": "b"})  # a name is accepted
    assert r.status_code == 202, r.text
    job = wait_job(stack.client, r.json()["id"])
    assert job["state"] == "succeeded" and job["kind"] == "merge", job
    merged = stack.client.get(f"/v1/checkpoints/{job['checkpoint_id']}").json()
    assert merged["state"] == "ready" and merged["method"] == "merge"
    assert merged["derived_from"]["method"] == "ties"
    assert [p["id"] for p in merged["derived_from"]["parents"]] == [a["id"], b["id"]]
    assert merged["derived_from"]["heads_from"] == "b"
    assert merged["stored_bytes"] > 0
    files = stack.client.get(f"/v1/checkpoints/{merged['id']}/files").json()["data"]
    for f in files:
        got = stack.client.get(f"/v1/checkpoints/{merged['id']}/files/{f['path']}")
        assert got.status_code == 200
        assert hashlib.sha256(got.content).hexdigest() == f["recon_sha256"]
    bad = stack.client.post("/v1/merges", json={"name": "x", "checkpoint_ids": [a["id"], a["id"]]})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"
    one = stack.client.post("/v1/merges", json={"name": "x", "checkpoint_ids": [a["id"]]})
    assert one.status_code == 422


def test_cancel_a_queued_job_then_commit_again(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0) as stack:  # nobody claims the job
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        job = stack.client.post(f"/v1/checkpoints/{ckpt['id']}/commit").json()
        assert job["state"] == "queued"
        again = stack.client.post(f"/v1/checkpoints/{ckpt['id']}/commit")
        assert again.status_code == 409 and again.json()["code"] == "conflict"
        r = stack.client.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["state"] == "cancelled"
        info = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
        assert info["state"] == "failed" and info["error"].startswith("cancelled")
        r = stack.client.post(f"/v1/checkpoints/{ckpt['id']}/commit")
        assert r.status_code == 202  # a failed checkpoint can be committed again
        jobs = stack.client.get("/v1/jobs", params={"checkpoint_id": ckpt["id"]}).json()
        assert [j["state"] for j in jobs["data"]] == ["queued", "cancelled"]
        assert stack.client.get("/v1/jobs", params={"state": "cancelled"}).json()["count"] == 1


def test_deletes(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    r = stack.client.delete(f"/v1/bases/{base['id']}")
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    assert "delete those checkpoints first" in r.json()["detail"]
    assert stack.client.delete(f"/v1/checkpoints/{ckpt['id']}").status_code == 204
    assert stack.client.get(f"/v1/checkpoints/{ckpt['id']}").status_code == 404
    r = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors")
    assert r.status_code == 404
    assert stack.client.get("/v1/jobs").json()["count"] == 0  # its jobs went with it
    assert stack.client.delete(f"/v1/bases/{base['id']}").status_code == 204
    assert stack.client.delete(f"/v1/bases/{base['id']}").status_code == 404


def test_pull_before_ready(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        for url in ("files/model.safetensors", "delta"):
            r = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/{url}")
            assert r.status_code == 409 and r.json()["code"] == "not_ready"


def test_originals_dropped_unless_retained(tmp_path: Path, models: Models) -> None:
    for retain in (False, True):
        with run_stack("embedded", tmp_path / str(retain), retain_originals=retain) as stack:
            base = make_base(stack.client, models.base)
            ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
            assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
            store = stack.runtime.store
            weights_key = f"sha256/{sha256_file(models.finetune / 'model.safetensors')[:2]}/"
            weights_key += sha256_file(models.finetune / "model.safetensors")
            shared_key = f"sha256/{sha256_file(models.finetune / 'tokenizer/vocab.txt')[:2]}/"
            shared_key += sha256_file(models.finetune / "tokenizer/vocab.txt")
            # the worker lets the originals go just after it publishes (the job shows
            # succeeded first), so wait for the drop
            deadline = time.monotonic() + 10
            while store.exists(weights_key) is not retain and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.exists(weights_key) is retain
            assert store.exists(shared_key)  # the base still uses the same bytes
            files = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["data"]
            assert all(f["stored"] is retain for f in files)


def test_stats_and_metrics(stack: Stack, models: Models) -> None:
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
    assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
    stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors")
    stats = stack.client.get("/v1/stats").json()
    assert stats["num_bases"] == 1 and stats["num_checkpoints"] == 1
    assert stats["checkpoints_by_state"] == {"ready": 1}
    assert stats["jobs_by_state"] == {"succeeded": 1}
    assert stats["logical_bytes"] == base["total_bytes"] + ckpt_bytes(stack, ckpt["id"])
    assert 0 < stats["stored_bytes"] < stats["logical_bytes"]
    text = stack.client.get("/metrics").text
    route = "/v1/checkpoints/{checkpoint_id}/files/{path:path}"
    assert f'slim_http_requests_total{{method="PUT",route="{route}",status="200"}}' in text
    assert f'slim_http_sent_bytes_total{{route="{route}"}}' in text
    assert 'slim_http_received_bytes_total{route="/v1/bases/{base_id}/files/{path:path}"}' in text
    assert 'slim_jobs{state="succeeded"} 1.0' in text
    assert f"slim_stored_bytes {float(stats['stored_bytes'])}" in text
    assert f"slim_logical_bytes {float(stats['logical_bytes'])}" in text
    assert "slim_http_request_duration_seconds_bucket" in text


def ckpt_bytes(stack: Stack, checkpoint_id: str) -> int:
    return int(stack.client.get(f"/v1/checkpoints/{checkpoint_id}").json()["original_bytes"])


def test_probes(stack: Stack) -> None:
    assert stack.client.get("/healthz").json() == {"status": "ok"}
    r = stack.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "blob_store": "ok"}}


def test_database_down_is_503(tmp_path: Path) -> None:
    from tests.infra import free_port

    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    with run_stack("embedded", tmp_path, workers=0, database_url=dead) as stack:
        r = stack.client.get("/v1/bases")
        assert r.status_code == 503 and r.json()["code"] == "unavailable"
        r = stack.client.post("/v1/bases", json={"name": "x"})
        assert r.status_code == 503 and r.json()["code"] == "unavailable"
        r = stack.client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert r.json()["checks"]["blob_store"] == "ok"
        assert stack.client.get("/healthz").status_code == 200


def test_corrupted_base_aborts_the_download(
    tmp_path: Path, models: Models, caplog: pytest.LogCaptureFixture
) -> None:
    with run_stack("embedded", tmp_path) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune, method="lossless")
        assert commit_and_wait(stack.client, ckpt["id"])["state"] == "succeeded"
        digest = sha256_file(models.base / "model.safetensors")
        blob = stack.runtime.store.local_path(f"sha256/{digest[:2]}/{digest}")
        assert blob is not None
        os.chmod(blob, 0o644)
        data = bytearray(blob.read_bytes())
        data[-5] ^= 0xFF  # one byte of the last base tensor
        blob.write_bytes(bytes(data))
        url = f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors"
        with caplog.at_level(logging.ERROR, logger="slim.service"):
            r = stack.client.get(url)
        # The base's bytes are checked before the first byte leaves: a clear error, not a
        # silently wrong model and not a body cut off midway.
        assert r.status_code == 500 and r.json()["code"] == "integrity_error"
        assert "slim scrub" in r.json()["detail"]
        assert any("integrity_error" in rec.getMessage() for rec in caplog.records)
        part = stack.client.get(url, headers={"Range": "bytes=0-99"})
        assert part.status_code == 500 and part.json()["code"] == "integrity_error"
        # Restoring the blob is all it takes: nothing else was touched.
        data[-5] ^= 0xFF
        blob.write_bytes(bytes(data))
        r = stack.client.get(url)
        assert r.status_code == 200
        assert r.content == (models.finetune / "model.safetensors").read_bytes()


def test_openapi_documents_every_route(stack: Stack) -> None:
    doc = stack.client.get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        ("post", "/v1/bases"),
        ("put", "/v1/bases/{base_id}/files/{path}"),
        ("post", "/v1/bases/{base_id}/commit"),
        ("get", "/v1/bases"),
        ("get", "/v1/bases/{base_id}"),
        ("delete", "/v1/bases/{base_id}"),
        ("post", "/v1/checkpoints"),
        ("put", "/v1/checkpoints/{checkpoint_id}/files/{path}"),
        ("post", "/v1/checkpoints/{checkpoint_id}/commit"),
        ("get", "/v1/checkpoints"),
        ("get", "/v1/checkpoints/{checkpoint_id}"),
        ("get", "/v1/checkpoints/{checkpoint_id}/files/{path}"),
        ("get", "/v1/checkpoints/{checkpoint_id}/delta"),
        ("delete", "/v1/checkpoints/{checkpoint_id}"),
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/{job_id}"),
        ("post", "/v1/jobs/{job_id}/cancel"),
        ("post", "/v1/merges"),
        ("get", "/v1/stats"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    }
    for method, path in expected:
        assert method in paths.get(path, {}), (method, path)
    schemas = doc["components"]["schemas"]
    for name in (
        "BaseCreate",
        "BasePublic",
        "BasesPublic",
        "CheckpointCreate",
        "CheckpointPublic",
        "CheckpointsPublic",
        "JobPublic",
        "JobsPublic",
        "MergeCreate",
        "FilePublic",
        "FilesPublic",
        "ErrorPublic",
        "StatsPublic",
        "CheckpointCreated",
    ):
        assert name in schemas, name
    for path, ops in paths.items():
        if path.startswith("/v1/"):
            for method, op in ops.items():
                codes = op["responses"]
                assert "500" in codes and "503" in codes, (method, path)
                assert codes["503"]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorPublic"
                )
    put = paths["/v1/checkpoints/{checkpoint_id}/files/{path}"]["put"]
    assert "application/octet-stream" in put["requestBody"]["content"]

"""Stored bytes are checked on read: jobs, pulls and `slim scrub`; periodic garbage collection."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from cli.main import main as slim
from storage.blobstore import LocalBlobStore
from storage.gc import start_gc_thread
from tests.conftest import Models, Stack
from tests.infra import commit_and_wait, make_base, make_checkpoint


def _corrupt(store: LocalBlobStore, key: str) -> bytes:
    path = store.root.joinpath(*key.split("/"))
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return data


def _restore(store: LocalBlobStore, key: str, data: bytes) -> None:
    path = store.root.joinpath(*key.split("/"))
    path.write_bytes(data)


def _key(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256}"


def test_a_job_never_compresses_corrupted_uploads(embedded: Stack, models: Models) -> None:
    store = embedded.runtime.store
    assert isinstance(store, LocalBlobStore)
    base = make_base(embedded.client, models.base)
    ckpt = make_checkpoint(embedded.client, base["id"], models.finetune)
    files = embedded.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["data"]
    weights = next(f for f in files if f["path"] == "model.safetensors")
    original = _corrupt(store, _key(weights["sha256"]))
    job = commit_and_wait(embedded.client, ckpt["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "integrity_error", job
    _restore(store, _key(weights["sha256"]), original)
    assert commit_and_wait(embedded.client, ckpt["id"])["state"] == "succeeded"


def test_scrub_cli_reports_corruption(
    embedded: Stack, models: Models, capsys: pytest.CaptureFixture[str]
) -> None:
    store = embedded.runtime.store
    assert isinstance(store, LocalBlobStore)
    base = make_base(embedded.client, models.base)
    ckpt = make_checkpoint(embedded.client, base["id"], models.finetune)
    assert commit_and_wait(embedded.client, ckpt["id"])["state"] == "succeeded"
    data_dir = ["--data-dir", str(embedded.settings.data_dir)]
    assert slim(["scrub", *data_dir]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["ok"] and clean["deltas_checked"] == 1 and clean["frames_checked"] > 3
    base_file = embedded.client.get(f"/v1/bases/{base['id']}/files").json()["data"][0]
    key = _key(base_file["sha256"])
    original = _corrupt(store, key)
    try:
        assert slim(["scrub", *data_dir]) == 1
        out = capsys.readouterr()
        report = json.loads(out.out)
        assert not report["ok"] and [p["key"] for p in report["problems"]] == [key]
        assert report["problems"][0]["kind"] == "corrupt"
        assert report["problems"][0]["used_by"] == [f"base {base['id']} file {base_file['path']}"]
        assert "1 problem" in out.err
    finally:
        _restore(store, key, original)


def test_periodic_gc_removes_orphans_and_keeps_referenced_blobs(
    embedded: Stack, models: Models
) -> None:
    store = embedded.runtime.store
    base = make_base(embedded.client, models.base)
    orphan = store.put_stream([os.urandom(64)])  # no row points at it
    referenced = {e.key for e in store.list_keys("sha256/")} - {orphan.key}
    stop = threading.Event()
    thread = start_gc_thread(
        embedded.runtime.sessions, store, grace_seconds=0, interval_seconds=0.1, stop=stop
    )
    assert thread is not None
    try:
        deadline = time.monotonic() + 20
        while store.exists(orphan.key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not store.exists(orphan.key)
        assert all(store.exists(k) for k in referenced)
        r = embedded.client.get(f"/v1/bases/{base['id']}/files/model.safetensors")
        assert r.status_code == 200
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    no_thread = start_gc_thread(
        embedded.runtime.sessions, store, grace_seconds=0, interval_seconds=0, stop=stop
    )
    assert no_thread is None


def test_keys_of_another_data_dir_are_separate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`slim keys` on an embedded data directory without a database refuses: a key written to
    a database no server reads would be rejected (issue 19)."""
    assert slim(["keys", "list", "--data-dir", str(tmp_path / "fresh")]) == 2
    assert "[no_database]" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    assert slim(["migrate", "--data-dir", str(tmp_path / "fresh")]) == 0
    assert slim(["keys", "list", "--data-dir", str(tmp_path / "fresh")]) == 0
    assert "PREFIX" in capsys.readouterr().out

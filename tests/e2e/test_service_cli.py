"""The server verbs as a user runs them: `slim migrate`, `slim serve`, `slim gc`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Models
from tests.infra import (
    AUTH_HEADERS,
    TEST_ADMIN_KEY,
    commit_and_wait,
    free_port,
    make_base,
    make_checkpoint,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def slim(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_serve_embedded_then_gc(tmp_path: Path, models: Models) -> None:
    data = tmp_path / "slim-data"
    migrated = slim("migrate", "--data-dir", str(data))
    assert migrated.returncode == 0, migrated.stderr
    assert (data / "slim.db").is_file()

    port = free_port()
    env = {
        **os.environ,
        "SLIM_WORKER_POLL_SECONDS": "0.1",
        "SLIM_GC_GRACE_SECONDS": "0",
        "SLIM_BOOTSTRAP_KEY": TEST_ADMIN_KEY,
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--data-dir", str(data), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=60, headers=AUTH_HEADERS) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "slim serve did not become ready"
                time.sleep(0.2)
            base = make_base(client, models.base)
            ckpt = make_checkpoint(client, base["id"], models.finetune)
            assert commit_and_wait(client, ckpt["id"])["state"] == "succeeded"
            r = client.get(f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors")
            assert r.status_code == 200
            assert client.delete(f"/v1/checkpoints/{ckpt['id']}").status_code == 204
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log = server.stderr.read().decode() if server.stderr else ""
    # uvicorn re-raises SIGTERM once it has shut down cleanly, so -15 is a clean exit too.
    assert server.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log and "stopped" in log  # worker stopped too

    dry = slim("gc", "--data-dir", str(data), "--grace-seconds", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["dry_run"] and report["deleted_blobs"] >= 1  # the deleted checkpoint's delta
    real = slim("gc", "--data-dir", str(data), "--grace-seconds", "0")
    assert json.loads(real.stdout)["deleted_blobs"] == report["deleted_blobs"]
    again = slim("gc", "--data-dir", str(data), "--grace-seconds", "0")
    assert json.loads(again.stdout)["deleted_blobs"] == 0

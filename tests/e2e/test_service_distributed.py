"""End to end on the distributed stack (PostgreSQL + S3 via moto), with the real model.

A `slim worker` *process* claims the compression and is killed with SIGKILL mid-job; its lease
runs out and a second worker takes the job over and finishes it. The checkpoint appears once,
complete, and pulls back as a working model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from storage.models import Job
from tests.conftest import Stack, run_stack, start_worker
from tests.e2e.helpers import (
    Run,
    agreement,
    pull_all,
    push_base,
    push_checkpoint,
    push_pull_real_model,
    wait_for,
)
from tests.fixtures import base_dir, tiny_finetune_dir
from tests.infra import S3_CREDENTIALS, wait_job

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def worker_process(stack: Stack, data_dir: Path, worker_id: str) -> subprocess.Popen[bytes]:
    """``slim worker`` as its own process, configured only through SLIM_* variables."""
    s = stack.settings
    env = {
        **os.environ,
        "SLIM_DATABASE_URL": s.resolved_database_url,
        "SLIM_BLOB_BACKEND": "s3",
        "SLIM_S3_ENDPOINT_URL": str(s.s3_endpoint_url),
        "SLIM_S3_BUCKET": s.s3_bucket,
        "SLIM_S3_ACCESS_KEY_ID": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "SLIM_S3_SECRET_ACCESS_KEY": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "SLIM_DATA_DIR": str(data_dir),
        "SLIM_WORKER_LEASE_SECONDS": "3",
        "SLIM_WORKER_HEARTBEAT_SECONDS": "0.5",
        "SLIM_WORKER_POLL_SECONDS": "0.1",
    }
    cmd = [sys.executable, "-m", "cli", "worker", "--worker-id", worker_id]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def test_real_model_push_commit_pull(distributed: Stack, tmp_path: Path) -> None:
    print(push_pull_real_model(distributed, tmp_path).report())


def test_real_model_on_postgres_and_s3_survives_a_killed_worker(
    tmp_path: Path, pg_url: str, s3_endpoint: str
) -> None:
    ft_dir = tiny_finetune_dir()
    run = Run(stack="distributed", method="magnitude")
    with run_stack(
        "distributed", tmp_path, pg=pg_url, s3=s3_endpoint, workers=0, worker_lease_seconds=3
    ) as stack:
        client = stack.client
        t0 = time.perf_counter()
        base = push_base(client, base_dir())
        ckpt = push_checkpoint(client, base["id"], ft_dir, name="rt", method="magnitude", keep=0.1)
        run.push_seconds = time.perf_counter() - t0
        job = client.post(f"/v1/checkpoints/{ckpt['id']}/commit").json()

        doomed = worker_process(stack, tmp_path / "doomed", "doomed")
        try:

            def claimed_by_doomed() -> bool:
                with stack.runtime.sessions() as session:
                    row = session.get(Job, job["id"])
                    return row is not None and row.lease_owner == "doomed"

            wait_for(claimed_by_doomed, 120, "the worker process never claimed the job")
            time.sleep(0.5)  # inside the job: fetching the base from S3 or compressing
            assert doomed.poll() is None, doomed.stderr.read() if doomed.stderr else ""
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.wait(timeout=30)
        finally:
            if doomed.poll() is None:
                doomed.kill()
                doomed.wait()
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
        assert client.get(f"/v1/checkpoints/{ckpt['id']}").json()["state"] != "ready"

        t1 = time.perf_counter()
        with ExitStack() as workers:
            survivor = start_worker(workers, stack.settings, tmp_path / "survivor")
            done = wait_job(client, job["id"], timeout=600)
        run.job_seconds = time.perf_counter() - t1
        assert done["state"] == "succeeded" and done["attempts"] == 2, done
        with stack.runtime.sessions() as session:
            row = session.get(Job, job["id"])
            assert row is not None and row.lease_owner == survivor.worker_id

        listing = client.get("/v1/checkpoints").json()
        assert listing["count"] == 1 and listing["data"][0]["state"] == "ready"
        info = client.get(f"/v1/checkpoints/{ckpt['id']}").json()
        run.original_bytes, run.stored_bytes = info["original_bytes"], info["stored_bytes"]
        run.ratio, run.bits_per_param = info["ratio"], info["bits_per_param"]

        t2 = time.perf_counter()
        pull_all(client, ckpt["id"], tmp_path / "pulled")
        run.pull_seconds = time.perf_counter() - t2
        agree, acc_ft, acc_pulled = agreement(ft_dir, tmp_path / "pulled")
        run.extra = {"agreement": agree, "accuracy_ft": acc_ft, "accuracy_pulled": acc_pulled}
        print(run.report())
        assert agree >= 0.9
        assert acc_pulled >= acc_ft - 0.05
        stats = client.get("/v1/stats").json()
        assert stats["checkpoints_by_state"] == {"ready": 1}

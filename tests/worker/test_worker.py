"""The job runner against a real database and blob store: leases, retries, errors, cancels.

Workers here are real :class:`worker.runner.Worker` objects running real compressions; the
subclasses below only *observe* them (record which job ran where) or hold a job at a known
point so a cancel or a shutdown can be issued deterministically.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from sqlalchemy import select

from storage import queue
from storage.models import Job
from tests.conftest import Models, Stack, run_stack, start_worker
from tests.infra import (
    make_base,
    make_checkpoint,
    tiny_finetune,
    tiny_model,
    tiny_tensors,
    wait_job,
)
from worker.runner import Lease, Worker


class RecordingWorker(Worker):
    """Remembers every job it executed (shared list: (job id, worker id))."""

    runs: ClassVar[list[tuple[str, str]]] = []
    lock = threading.Lock()

    def _execute(self, job_id: str, *args: Any) -> None:
        with self.lock:
            self.runs.append((job_id, self.worker_id))
        super()._execute(job_id, *args)


class HoldingWorker(Worker):
    """Pauses each compression after its lease started, until ``release`` is set."""

    started = threading.Event()
    release = threading.Event()

    def _run_compress(self, *args: Any) -> Any:
        lease: Lease = args[-1]
        self.started.set()
        deadline = time.monotonic() + 30
        while not self.release.is_set() and time.monotonic() < deadline:
            if lease.cancel_requested:  # seen by a heartbeat: let core report progress now
                break
            time.sleep(0.02)
        return super()._run_compress(*args)


@pytest.fixture(autouse=True)
def _reset() -> None:
    RecordingWorker.runs = []
    HoldingWorker.started = threading.Event()
    HoldingWorker.release = threading.Event()


def commit(stack: Stack, ckpt: dict) -> dict:
    r = stack.client.post(f"/v1/checkpoints/{ckpt['id']}/commit")
    assert r.status_code == 202, r.text
    return dict(r.json())


def test_two_workers_never_run_the_same_job(
    tmp_path: Path, pg_url: str, s3_endpoint: str, models: Models
) -> None:
    with run_stack("distributed", tmp_path, pg=pg_url, s3=s3_endpoint, workers=0) as stack:
        base = make_base(stack.client, models.base)
        ckpts = [
            make_checkpoint(stack.client, base["id"], models.finetune, name=f"c{i}")
            for i in range(8)
        ]
        with ExitStack() as workers:
            for i in range(2):
                start_worker(workers, stack.settings, tmp_path / f"w{i}", RecordingWorker)
            jobs = [commit(stack, c) for c in ckpts]
            done = [wait_job(stack.client, j["id"]) for j in jobs]
        assert all(j["state"] == "succeeded" and j["attempts"] == 1 for j in done)
        ran = [job_id for job_id, _ in RecordingWorker.runs]
        assert sorted(ran) == sorted(j["id"] for j in jobs)  # each exactly once
        assert len({w for _, w in RecordingWorker.runs}) == 2  # both took part


def test_a_dead_workers_job_is_taken_over(
    tmp_path: Path, pg_url: str, s3_endpoint: str, models: Models
) -> None:
    with run_stack("distributed", tmp_path, pg=pg_url, s3=s3_endpoint, workers=0) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        job = commit(stack, ckpt)
        with stack.runtime.sessions() as session:  # a worker claims it, then dies silently
            claimed = queue.claim(session, "ghost", lease_seconds=0.5)
            assert claimed is not None and claimed.id == job["id"]
        assert stack.client.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
        with ExitStack() as workers:
            worker = start_worker(workers, stack.settings, tmp_path / "w")
            done = wait_job(stack.client, job["id"])
        assert done["state"] == "succeeded" and done["attempts"] == 2
        with stack.runtime.sessions() as session:
            row = session.get(Job, job["id"])
            assert row is not None and row.lease_owner == worker.worker_id
        info = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
        assert info["state"] == "ready"


def test_last_attempt_lost_fails_the_job(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0, job_max_attempts=1) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        job = commit(stack, ckpt)
        with stack.runtime.sessions() as session:
            assert queue.claim(session, "ghost", lease_seconds=0.2) is not None
        with ExitStack() as workers:
            start_worker(workers, stack.settings, tmp_path / "w")
            done = wait_job(stack.client, job["id"], timeout=30)
        assert done["state"] == "failed" and done["error"]["code"] == "job_failed"
        assert "stopped renewing its lease" in done["error"]["detail"]
        info = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
        assert info["state"] == "failed"


def test_core_error_fails_at_once(stack: Stack, models: Models, tmp_path: Path) -> None:
    tensors = tiny_finetune(tiny_tensors(0))
    tensors["layer.0.weight"][0, 0] = float("nan")
    bad = tiny_model(tmp_path / "nan", tensors)
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], bad)
    done = wait_job(stack.client, commit(stack, ckpt)["id"])
    assert done["state"] == "failed" and done["attempts"] == 1  # no retry
    assert done["error"]["code"] == "invalid_checkpoint"
    assert "NaN" in done["error"]["detail"]
    info = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
    assert info["state"] == "failed" and info["error"].startswith("invalid_checkpoint")
    # The originals are kept after a failure, so the same upload can be committed again
    # with a method that stores NaN as it is.
    files = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["data"]
    assert all(f["stored"] for f in files)


def test_unexpected_errors_are_retried(tmp_path: Path, models: Models) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the scratch directory should be")
    with run_stack("embedded", tmp_path / "s", job_max_attempts=2, work_dir=blocker) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        done = wait_job(stack.client, commit(stack, ckpt)["id"])
    assert done["state"] == "failed" and done["attempts"] == 2
    assert done["error"]["code"] == "internal_error"


def test_cancel_a_running_job(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        with ExitStack() as workers:
            start_worker(workers, stack.settings, tmp_path / "w", HoldingWorker)
            job = commit(stack, ckpt)
            assert HoldingWorker.started.wait(30)
            r = stack.client.post(f"/v1/jobs/{job['id']}/cancel")
            assert r.status_code == 202 and r.json()["cancel_requested"] is True
            done = wait_job(stack.client, job["id"])
        assert done["state"] == "cancelled" and done["error"]["code"] == "cancelled"
        info = stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()
        assert info["state"] == "failed" and info["stored_bytes"] is None


def test_worker_shutdown_gives_the_job_back(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        with ExitStack() as workers:
            worker = start_worker(workers, stack.settings, tmp_path / "w", HoldingWorker)
            job = commit(stack, ckpt)
            assert HoldingWorker.started.wait(30)
            worker.stopping.set()
            HoldingWorker.release.set()
        back = stack.client.get(f"/v1/jobs/{job['id']}").json()
        assert back["state"] == "queued" and back["attempts"] == 1
        assert stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()["state"] == "queued"
        with ExitStack() as workers:
            start_worker(workers, stack.settings, tmp_path / "w2")
            done = wait_job(stack.client, job["id"])
        assert done["state"] == "succeeded" and done["attempts"] == 2


def test_progress_is_reported(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        with ExitStack() as workers:
            start_worker(workers, stack.settings, tmp_path / "w", HoldingWorker)
            job = commit(stack, ckpt)
            assert HoldingWorker.started.wait(30)
            deadline = time.monotonic() + 10
            phase = None
            while time.monotonic() < deadline and phase != "prepare":
                phase = stack.client.get(f"/v1/jobs/{job['id']}").json()["progress"]["phase"]
                time.sleep(0.05)
            assert phase == "prepare"  # the heartbeat carried the phase change
            running = stack.client.get(f"/v1/jobs/{job['id']}").json()
            assert running["state"] == "running"
            assert stack.client.get(f"/v1/checkpoints/{ckpt['id']}").json()["state"] == (
                "compressing"
            )
            HoldingWorker.release.set()
            done = wait_job(stack.client, job["id"])
        assert done["state"] == "succeeded" and done["progress"]["phase"] == "done"


def test_jobs_state_survives_a_deleted_checkpoint(tmp_path: Path, models: Models) -> None:
    with run_stack("embedded", tmp_path, workers=0) as stack:
        base = make_base(stack.client, models.base)
        ckpt = make_checkpoint(stack.client, base["id"], models.finetune)
        with ExitStack() as workers:
            start_worker(workers, stack.settings, tmp_path / "w", HoldingWorker)
            job = commit(stack, ckpt)
            assert HoldingWorker.started.wait(30)
            assert stack.client.delete(f"/v1/checkpoints/{ckpt['id']}").status_code == 204
            HoldingWorker.release.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the worker drops it without publishing
                with stack.runtime.sessions() as session:
                    if not session.scalars(select(Job)).all():
                        break
                time.sleep(0.05)
        assert stack.client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert stack.client.get("/v1/checkpoints").json()["count"] == 0
        assert stack.client.get("/healthz").status_code == 200


@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision_finetune_of_a_float32_base(
    stack: Stack, models: Models, tmp_path: Path, dtype: torch.dtype
) -> None:
    tensors = {n: t.to(dtype) for n, t in tiny_finetune(tiny_tensors(0)).items()}
    ft = tiny_model(tmp_path / "half", tensors)
    base = make_base(stack.client, models.base)
    ckpt = make_checkpoint(stack.client, base["id"], ft)
    done = wait_job(stack.client, commit(stack, ckpt)["id"])
    assert done["state"] == "succeeded", done
    r = stack.client.get(f"/v1/checkpoints/{ckpt['id']}/files/model.safetensors")
    assert r.status_code == 200 and len(r.content) == (ft / "model.safetensors").stat().st_size

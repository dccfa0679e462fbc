"""The fault benchmark's scenarios (``bench/faults.py``), a few trials each with short outages.

``python -m bench faults`` runs the same code with 20 trials and a 30-second S3 outage and
writes ``bench/results/faults.{json,md}``. ``test_pg_restart`` stops the shared PostgreSQL
server for a few seconds (marked ``disruptive``; it always starts it again).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults import SCENARIOS, Config
from bench.harness import pg_ready

pytestmark = pytest.mark.slow

#: CI-sized knobs: two trials, a 4 s S3 outage longer than the worker's 2 s retry window (so
#: the give-back and re-commit paths run), small models.
CI = Config(
    trials=2,
    outage_seconds=4.0,
    worker_s3_retry_seconds=2.0,
    api_s3_retry_seconds=2.0,
    pg_down_seconds=3.0,
    model_params=1 << 20,
    kill_params=2 << 20,
    upload_params=2 << 20,
    gc_grace_seconds=1.0,
)


def run(name: str, tmp_path: Path, **overrides: object) -> None:
    if not pg_ready():
        pytest.skip("PostgreSQL is not reachable")
    cfg = Config(**{**CI.__dict__, **overrides})  # type: ignore[arg-type]
    lines: list[str] = []
    outcome = SCENARIOS[name](tmp_path, cfg, lines.append)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    summary = outcome.summary()
    assert summary["trials"] == cfg.trials
    assert summary["successes"] == cfg.trials and summary["lost"] == 0, "\n".join(
        [str(summary), *lines[-40:]]
    )


def test_worker_killed_mid_job(tmp_path: Path) -> None:
    run("worker_kill", tmp_path)


def test_api_killed_mid_upload(tmp_path: Path) -> None:
    run("api_kill_upload", tmp_path)


def test_api_killed_mid_download(tmp_path: Path) -> None:
    run("api_kill_download", tmp_path)


def test_gc_during_uploads(tmp_path: Path) -> None:
    run("gc_during_uploads", tmp_path)


def test_s3_outage_during_a_job(tmp_path: Path) -> None:
    run("s3_outage", tmp_path)


def test_disk_full(tmp_path: Path) -> None:
    run("disk_full", tmp_path)


@pytest.mark.disruptive
def test_pg_restart_under_load(tmp_path: Path) -> None:
    run("pg_restart", tmp_path, trials=1)

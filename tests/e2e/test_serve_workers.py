"""``slim serve --workers 2`` as an operator runs it: two API processes on one port beside a
supervisor that migrates, prints the first key and runs the job worker once; concurrent pulls
answered by both processes; no process left behind however the supervisor stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from client import SlimClient
from core.files import sha256_file
from tests.conftest import Models
from tests.infra import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PULLS = 8


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    key: str

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def serve_workers(data_dir: Path, workers: int = 2) -> Iterator[Served]:
    """``slim serve --workers N`` on a free port with a fresh data directory (no bootstrap key:
    the supervisor generates and prints the first one); killed at exit if still running."""
    port = free_port()
    env = {**os.environ, "SLIM_WORKER_POLL_SECONDS": "0.1"}
    for name in ("SLIM_BOOTSTRAP_KEY", "SLIM_API_WORKERS", "SLIM_OPEN"):
        env.pop(name, None)
    log = data_dir.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "cli", "serve", "--workers", str(workers)),
                *("--data-dir", str(data_dir), "--port", str(port)),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            text = log.read_text(errors="replace")
            if text.count("Application startup complete") >= workers:
                break
            assert process.poll() is None, text
            assert time.monotonic() < deadline, f"slim serve did not start: {text}"
            time.sleep(0.2)
        key = re.search(r"^\s+(slim_\S+)$", text, re.MULTILINE)
        assert key is not None, text
        yield Served(process, url, log, key.group(1))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _process_requests(client: httpx.Client) -> dict[int, float]:
    """``slim_api_process_requests_total`` by pid, summed over every API process."""
    text = client.get("/metrics").text
    found = re.findall(r'^slim_api_process_requests_total\{pid="(\d+)"\} (\S+)$', text, re.M)
    return {int(pid): float(value) for pid, value in found}


def test_two_api_processes_share_one_port(tmp_path: Path, models: Models) -> None:
    with serve_workers(tmp_path / "data") as served:
        log = served.text()
        # Once each: migrations, the key, the URL, the job worker; one API process each.
        assert log.count("Running upgrade  -> 0001") == 1, log
        assert log.count("first admin key") == 1, log
        assert log.count("Uvicorn running on") == 1, log
        assert len(re.findall(r"slim\.worker: worker \S+ started", log)) == 1, log
        api_pids = {int(p) for p in re.findall(r"Started server process \[(\d+)\]", log)}
        assert len(api_pids) == 2 and set(_children(served.process.pid)) >= api_pids

        with SlimClient(served.url, served.key) as sdk:
            sdk.push_base(models.base, "tiny")
            _, job, _ = sdk.push(models.finetune, "tiny", name="ft", method="lossless")
            assert sdk.wait(job.id, timeout=300).state == "succeeded"

        def pull(i: int) -> dict[str, str]:
            out = tmp_path / f"pull-{i}"
            with SlimClient(served.url, served.key) as sdk:
                sdk.pull("ft", out)
            return {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()}

        want = {p.name: sha256_file(p) for p in models.finetune.iterdir() if p.is_file()}
        with ThreadPoolExecutor(PULLS) as pool:
            got = list(pool.map(pull, range(PULLS)))
        assert all(g == want for g in got)  # lossless: every pull bit-identical

        with httpx.Client(
            base_url=served.url, headers={"Authorization": f"Bearer {served.key}"}
        ) as client:
            by_pid = _process_requests(client)
            assert set(by_pid) == api_pids, (by_pid, api_pids)  # both served, summed in one scrape
            assert all(n > 0 for n in by_pid.values())
            assert 'slim_checkpoints{state="ready"} 1.0' in client.get("/metrics").text

        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=60) == 0, served.text()
        assert not [pid for pid in api_pids if _alive(pid)]
        assert re.search(r"slim\.worker: worker \S+ stopped", served.text())


def test_killed_supervisor_leaves_no_api_process(tmp_path: Path) -> None:
    with serve_workers(tmp_path / "data") as served:
        api_pids = set(_children(served.process.pid))
        assert len(api_pids) >= 2
        served.process.kill()  # SIGKILL: the supervisor cannot stop anything itself
        served.process.wait()
        deadline = time.monotonic() + 30
        while [pid for pid in api_pids if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in api_pids if _alive(pid)]

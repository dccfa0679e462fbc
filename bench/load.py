"""Load: 50 concurrent reconstruct streams and 10 concurrent uploads against PostgreSQL + S3.

``python -m bench load [--streams 50] [--uploads 10] [--seconds 60]`` starts a distributed
deployment (PostgreSQL, moto's S3 server standing in for MinIO, ``slim serve --no-worker`` as
a child process, one ``slim worker``), stores a base and a few compressed checkpoints of it,
then for ``--seconds`` runs ``--streams`` clients that each pull checkpoint files (rebuilt from
base + delta as they stream; every body hashed and checked against its ETag) in a loop, next to
``--uploads`` clients that each PUT a weight file in a loop. It reports throughput, p50/p99
latency (whole transfer, and time to first byte for pulls), errors (goal: zero) and the API
process's peak resident memory, in ``bench/results/load.{json,md}``.

The clients run in this process (threads), on the same machine as the server.

``--api-workers 1 2`` compares ``slim serve --workers N`` instead: after the same preparation,
for each N in turn a fresh API (``SLIM_API_WORKERS=N``, its own cache, warmed with each file
once) takes ``--streams`` concurrent pulls for ``--seconds`` (no uploads), and the report gives
each N's aggregate rate, p99 time to first byte and the peak RSS of the API's whole process tree,
with the rate of each N against the first (``bench/results/load-workers.{json,md}``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    Api,
    Deployment,
    Moto,
    client,
    commit,
    make_base,
    make_checkpoint,
    pg_ready,
    synthetic_pair,
    wait_job,
    worker,
)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Samples:
    """Latencies and outcomes of one kind of request."""

    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    bytes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, seconds: float, n: int, ttfb: float | None = None) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.bytes += n
            if ttfb is not None:
                self.ttfb.append(ttfb)

    def error(self, what: str) -> None:
        with self.lock:
            self.errors[what] += 1

    def summary(self, seconds: float) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors),
            "bytes": self.bytes,
            "throughput_mib_s": round(self.bytes / seconds / (1 << 20), 1),
            "requests_per_s": round(len(self.latencies) / seconds, 2),
            "latency_p50_s": _pct(self.latencies, 50),
            "latency_p99_s": _pct(self.latencies, 99),
            "ttfb_p50_s": _pct(self.ttfb, 50),
            "ttfb_p99_s": _pct(self.ttfb, 99),
        }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=50, help="concurrent pulls (default 50)")
    parser.add_argument("--uploads", type=int, default=10, help="concurrent uploads (default 10)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the load runs")
    parser.add_argument("--checkpoints", type=int, default=4, help="stored checkpoints pulled")
    parser.add_argument(
        "--params", type=int, default=4 << 20, help="parameters per model (float32; default 4M)"
    )
    parser.add_argument(
        "--api-workers",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="compare pulls against `slim serve --workers N` for each N (no uploads)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")


def main(args: argparse.Namespace) -> int:
    if not pg_ready():
        print("PostgreSQL is not reachable (SLIM_TEST_PG_ADMIN_URL); start it first")
        return 2
    root = Path(tempfile.mkdtemp(prefix="slim-load-"))
    try:
        result = run(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.api_workers:
        write_workers_results(result, args.out)
        return 0 if all(r["pulls"]["errors"] == 0 for r in result["rounds"]) else 1
    write_results(result, args.out)
    errors = result["pulls"]["errors"] + result["uploads"]["errors"]
    return 0 if errors == 0 else 1


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    moto = Moto().start()
    dep = Deployment.create(root, s3=moto)
    api = Api(dep).start()
    w = worker(dep, "worker").start()
    try:
        print("preparing models and checkpoints", flush=True)
        base_dir, ft0 = synthetic_pair(root / "models", params=args.params)
        fts = [ft0] + [
            _retarget(ft0, base_dir, root / f"ft{i}", i) for i in range(1, args.checkpoints)
        ]
        api.wait_ready()
        targets: list[tuple[str, int]] = []  # (url, size)
        with client(api.url, timeout=600) as c:
            base = make_base(c, base_dir, "base")
            for i, ft in enumerate(fts):
                ckpt = make_checkpoint(c, base["id"], ft, f"load-{i}", keep=0.05)
                done = wait_job(c, commit(c, ckpt["id"])["id"], timeout=900)
                assert done["state"] == "succeeded", done
                for f in c.get(f"/v1/checkpoints/{ckpt['id']}/files").json()["data"]:
                    if f["path"].endswith(".safetensors"):
                        url = f"/v1/checkpoints/{ckpt['id']}/files/{f['path']}"
                        targets.append((url, f["size"]))
            # one open checkpoint per uploader
            uploads = [
                (
                    make_checkpoint(c, base["id"], None, f"upload-{j}", keep=0.05)["id"],
                    fts[j % len(fts)],
                )
                for j in range(args.uploads)
            ]
            # warm-up: each file once (fills the API's blob cache from S3)
            for url, _ in targets:
                c.get(url).raise_for_status()
        w.stop()
        if args.api_workers:
            api.stop()
            return _compare_workers(dep, targets, args)
        rss_before = api.peak_rss_bytes()
        pulls, puts = Samples(), Samples()
        stop_at = time.monotonic() + args.seconds
        threads = [
            threading.Thread(
                target=_puller, args=(api.url, targets, i, stop_at, pulls), daemon=True
            )
            for i in range(args.streams)
        ] + [
            threading.Thread(
                target=_uploader,
                args=(api.url, ckpt_id, ft_dir / "model.safetensors", stop_at, puts),
                daemon=True,
            )
            for ckpt_id, ft_dir in uploads
        ]
        print(
            f"load: {args.streams} pulls + {args.uploads} uploads for {args.seconds:g}s", flush=True
        )
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        peak = api.peak_rss_bytes()
        alive = api.alive
        return {
            "benchmark": "load",
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}",
            "stack": "PostgreSQL 15 + moto S3 server (MinIO stand-in); slim serve --no-worker "
            "as a child process; clients are threads of the benchmark process",
            "config": {
                "streams": args.streams,
                "uploads": args.uploads,
                "seconds": args.seconds,
                "checkpoints": args.checkpoints,
                "params_per_model": args.params,
                "file_bytes": targets[0][1] if targets else None,
            },
            "elapsed_seconds": round(elapsed, 1),
            "pulls": pulls.summary(elapsed),
            "uploads": puts.summary(elapsed),
            "api_rss_before_bytes": rss_before,
            "api_peak_rss_bytes": peak,
            "api_alive_after": alive,
        }
    finally:
        w.stop()
        api.stop()
        moto.stop()
        dep.close()


def _compare_workers(
    dep: Deployment, targets: list[tuple[str, int]], args: argparse.Namespace
) -> dict[str, Any]:
    """``--streams`` concurrent pulls for ``--seconds`` against a fresh ``slim serve --workers
    N`` for each N of ``--api-workers``, one after the other on the same checkpoints."""
    rounds = []
    for n in args.api_workers:
        api = Api(dep, f"api-workers-{n}", api_workers=n).start().wait_ready()
        try:
            with client(api.url, timeout=600) as c:
                for url, _ in targets:  # warm-up: fills this API's blob cache from S3
                    c.get(url).raise_for_status()
            pulls = Samples()
            stop_at = time.monotonic() + args.seconds
            threads = [
                threading.Thread(
                    target=_puller, args=(api.url, targets, i, stop_at, pulls), daemon=True
                )
                for i in range(args.streams)
            ]
            print(f"load: {args.streams} pulls for {args.seconds:g}s, --workers {n}", flush=True)
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
            rounds.append(
                {
                    "api_workers": n,
                    "elapsed_seconds": round(elapsed, 1),
                    "pulls": pulls.summary(elapsed),
                    "api_tree_peak_rss_bytes": _tree_peak_rss(api.pid),
                }
            )
        finally:
            api.stop()
    first = rounds[0]["pulls"]["throughput_mib_s"] or 0
    for r in rounds:
        rate = r["pulls"]["throughput_mib_s"] or 0
        r["rate_vs_first"] = round(rate / first, 2) if first else None
    return {
        "benchmark": "load --api-workers",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, python {platform.python_version()}"
        f", {os.cpu_count()} cores",
        "stack": "PostgreSQL + moto S3 server; slim serve --no-worker --workers N as a child "
        "process; clients are threads of the benchmark process",
        "config": {
            "streams": args.streams,
            "seconds": args.seconds,
            "checkpoints": args.checkpoints,
            "params_per_model": args.params,
            "file_bytes": targets[0][1] if targets else None,
            "api_workers": args.api_workers,
        },
        "rounds": rounds,
    }


def _tree_peak_rss(pid: int | None) -> int | None:
    """VmHWM summed over ``pid`` and its live child processes (the supervisor and the API
    processes of ``slim serve --workers N``), from /proc."""
    if pid is None:
        return None
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _retarget(ft_dir: Path, base_dir: Path, out: Path, seed: int) -> Path:
    """Another fine-tune of the base in ``base_dir`` (the same shapes), seeded ``seed``."""
    import torch

    from core.safetensors_io import SafetensorsFile, save_file

    gen = torch.Generator().manual_seed(1000 + seed)
    with SafetensorsFile(base_dir / "model.safetensors") as f:
        tensors = {}
        names = f.keys()
        for name in names:
            t = f.get(name)
            bump = (torch.rand(t.shape, generator=gen) < 0.05) * torch.randn(t.shape, generator=gen)
            tensors[name] = t + 0.02 * bump
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors")
    for extra in ("config.json", "vocab.txt"):
        shutil.copy(ft_dir / extra, out / extra)
    return out


def _puller(
    url: str, targets: list[tuple[str, int]], i: int, stop_at: float, samples: Samples
) -> None:
    with client(url, timeout=600) as c:
        n = i
        while time.monotonic() < stop_at:
            path, size = targets[n % len(targets)]
            n += 1
            t0 = time.monotonic()
            ttfb = None
            h = hashlib.sha256()
            got = 0
            try:
                with c.stream("GET", path) as r:
                    if r.status_code != 200:
                        r.read()
                        samples.error(f"status {r.status_code}")
                        continue
                    etag = r.headers.get("etag", "").strip('"')
                    for chunk in r.iter_bytes():
                        if ttfb is None:
                            ttfb = time.monotonic() - t0
                        h.update(chunk)
                        got += len(chunk)
            except httpx.HTTPError as exc:
                samples.error(type(exc).__name__)
                continue
            if got != size or h.hexdigest() != etag:
                samples.error("wrong bytes")
                continue
            samples.ok(time.monotonic() - t0, got, ttfb)


def _uploader(url: str, checkpoint_id: str, path: Path, stop_at: float, samples: Samples) -> None:
    size = path.stat().st_size
    with client(url, timeout=600) as c:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                with path.open("rb") as f:
                    r = c.put(
                        f"/v1/checkpoints/{checkpoint_id}/files/model.safetensors",
                        content=iter(lambda f=f: f.read(1 << 20), b""),
                        headers={"content-length": str(size)},
                    )
            except httpx.HTTPError as exc:
                samples.error(type(exc).__name__)
                continue
            if r.status_code != 200:
                samples.error(f"status {r.status_code} {r.text[:80]}")
                continue
            samples.ok(time.monotonic() - t0, size)


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(result, indent=1) + "\n")
    cfg, p, u = result["config"], result["pulls"], result["uploads"]
    mib = 1 << 20
    lines = [
        "# Load benchmark",
        "",
        f"`python -m bench load --streams {cfg['streams']} --uploads {cfg['uploads']} "
        f"--seconds {cfg['seconds']:g}` — {result['when']}, {result['machine']}; "
        f"{result['stack']}.",
        "",
        f"{cfg['checkpoints']} checkpoints of a {cfg['params_per_model'] / 1e6:.1f}M-parameter "
        f"model ({(cfg['file_bytes'] or 0) / mib:.1f} MiB weight file each), pulled whole "
        "(reconstructed from base + delta while streaming, each body checked against its ETag); "
        "uploads PUT a weight file of the same size.",
        "",
        "| traffic | requests | errors | throughput | p50 | p99 | first byte p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {cfg['streams']} concurrent pulls | {p['requests']} | {p['errors']} | "
        f"{p['throughput_mib_s']} MiB/s ({p['requests_per_s']} files/s) | {p['latency_p50_s']} s | "
        f"{p['latency_p99_s']} s | {p['ttfb_p50_s']} s / {p['ttfb_p99_s']} s |",
        f"| {cfg['uploads']} concurrent uploads | {u['requests']} | {u['errors']} | "
        f"{u['throughput_mib_s']} MiB/s ({u['requests_per_s']} files/s) | {u['latency_p50_s']} s | "
        f"{u['latency_p99_s']} s | — |",
        "",
        f"API process peak RSS: {(result['api_peak_rss_bytes'] or 0) / mib:.0f} MiB "
        f"({(result['api_rss_before_bytes'] or 0) / mib:.0f} MiB after warm-up, before the load); "
        f"still serving afterwards: {result['api_alive_after']}.",
        "",
    ]
    if p["error_kinds"] or u["error_kinds"]:
        lines += [f"Errors: pulls {p['error_kinds']}, uploads {u['error_kinds']}", ""]
    (out / "load.md").write_text("\n".join(lines))


def write_workers_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load-workers.json").write_text(json.dumps(result, indent=1) + "\n")
    cfg, mib = result["config"], 1 << 20
    lines = [
        "# Load benchmark: API processes (`slim serve --workers N`)",
        "",
        f"`python -m bench load --api-workers {' '.join(map(str, cfg['api_workers']))} "
        f"--streams {cfg['streams']} --seconds {cfg['seconds']:g} --checkpoints "
        f"{cfg['checkpoints']} --params {cfg['params_per_model']}` — {result['when']}, "
        f"{result['machine']}; {result['stack']}.",
        "",
        f"{cfg['streams']} concurrent pulls of {cfg['checkpoints']} checkpoints "
        f"({(cfg['file_bytes'] or 0) / mib:.1f} MiB weight file each, rebuilt from base + delta "
        "while streaming, each body checked against its ETag), each N on a fresh API in turn.",
        "",
        "| --workers | pulls | errors | aggregate | vs first | p50 | p99 | first byte p50 / p99 "
        "| API peak RSS (all processes) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rounds"]:
        p = r["pulls"]
        lines.append(
            f"| {r['api_workers']} | {p['requests']} | {p['errors']} | "
            f"{p['throughput_mib_s']} MiB/s | {r['rate_vs_first']}x | {p['latency_p50_s']} s | "
            f"{p['latency_p99_s']} s | {p['ttfb_p50_s']} s / {p['ttfb_p99_s']} s | "
            f"{(r['api_tree_peak_rss_bytes'] or 0) / mib:.0f} MiB |"
        )
    (out / "load-workers.md").write_text("\n".join(lines) + "\n")

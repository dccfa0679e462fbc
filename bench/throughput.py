"""Throughput and memory: ingest, compress, reconstruct, next to the machine's own ceilings.

Fixture: a Llama-shaped bf16 checkpoint (bench/llm_fixture.py) as the base and a structured
fine-tune of it. Everything is measured side by side in one run, each as the median of
``--repeat`` runs: memory copy, safetensors read, sha256 and blake3 ceilings; ingest over
HTTP (PUT → stored, hashed); compression with ``magnitude``, ``lossless`` and ``nps``
(``weights`` fitness) in the worker; reconstruction streamed over HTTP and with a local
rebuild from the delta (``pull --local``); ZipNN on the same fine-tune (plain, and on the XOR
against the base: the delta mode its paper describes — the package's own delta mode raises
"Not implemented Yet"). Peak RSS of the API and worker processes comes from
``/proc/<pid>/status`` (VmHWM), reset before each phase (``clear_refs``) so that uploads,
downloads and each method's compression have their own peak; the RSS goal covers upload,
non-NPS compression and reconstruction.

The pull comparison (:func:`pull_phase`) reads each checkpoint the ways a user can, side by
side: ``curl -o /dev/null``, ``curl -o file``, ``slim pull`` (the SDK, to disk, hashed) and
``slim pull --local`` with the base cached, beside the host's ceilings (memcpy, file read,
sha256 / xxh3 / zstd decompress per thread, loopback curl of a static file sent by
``sendfile``).

Run: ``python -m bench throughput [--params 5e8 2e9] [--repeat 3]``, or only the pulls:
``python -m bench throughput --params 2e8 --pull-only`` (a few minutes on 2 cores).
Outputs ``bench/results/throughput.{json,md}`` (``throughput-pull.*`` with ``--pull-only``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.harness import free_port, wait_job
from bench.llm_fixture import build

RESULTS = Path(__file__).parent / "results"
KEY = "slim_bench_throughput_key_0123456789abcdef"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=float, nargs="+", default=[5e8, 2e9], help="checkpoint sizes")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=None, help="fixture cache (default bench/cache/llm)")
    p.add_argument("--skip-zipnn", action="store_true")
    p.add_argument(
        "--pull-only",
        action="store_true",
        help="only compare curl, slim pull and pull --local (lossless and magnitude)",
    )
    p.add_argument("--out", default=str(RESULTS))


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of ``repeat`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def ceilings(sample: Path, repeat: int) -> dict[str, float]:
    """GB/s of the machine's basic operations, measured now."""
    buf = np.frombuffer(os.urandom(256 << 20), dtype=np.uint8)
    out: dict[str, float] = {}
    dst = np.empty_like(buf)
    np.copyto(dst, buf)  # touch the destination's pages first: a copy, not page faults
    t, _ = timed(lambda: np.copyto(dst, buf), repeat)
    out["memcpy_gbps"] = buf.nbytes / t / 1e9
    data = buf.tobytes()
    t, _ = timed(lambda: hashlib.sha256(data).digest(), repeat)
    out["sha256_gbps"] = len(data) / t / 1e9
    try:
        import blake3

        t, _ = timed(lambda: blake3.blake3(data).digest(), repeat)
        out["blake3_gbps"] = len(data) / t / 1e9
    except ImportError:
        pass
    size = sample.stat().st_size

    def read_all() -> None:
        with open(sample, "rb") as f:
            while f.read(8 << 20):
                pass

    read_all()  # warm the page cache
    t, _ = timed(read_all, repeat)
    out["file_read_gbps"] = size / t / 1e9
    import xxhash
    import zstandard

    t, _ = timed(lambda: xxhash.xxh3_128(data).digest(), repeat)
    out["xxh3_gbps"] = len(data) / t / 1e9
    with open(sample, "rb") as f:  # bf16 weights: what a delta's frames hold
        f.seek(min(size // 2, max(size - (64 << 20), 0)))
        weights = f.read(64 << 20)
    frame = zstandard.ZstdCompressor(level=3).compress(weights)
    t, _ = timed(lambda: zstandard.ZstdDecompressor().decompress(frame), repeat)
    out["zstd_decompress_gbps"] = len(weights) / t / 1e9
    with StaticServer(sample) as url:
        for name, dest in (("curl_null_gbps", "/dev/null"), ("curl_file_gbps", None)):
            with tempfile.TemporaryDirectory(dir=sample.parent) as tmp:
                target = dest or str(Path(tmp) / "out")
                t, n = timed(functools.partial(curl_get, url, target), repeat)
            out[f"loopback_{name}"] = n / t / 1e9
    return out


def curl_get(url: str, target: str, *headers: str) -> int:
    """GET ``url`` with curl into ``target`` (a file or /dev/null); the bytes received."""
    args = [a for h in headers for a in ("-H", h)]
    done = subprocess.run(
        ["curl", "-sfS", "-o", target, "-w", "%{size_download}", *args, url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout)


class StaticServer:
    """A loopback HTTP server answering every GET with one file, sent by ``sendfile``: what
    curl reads here when the server costs nothing (the ceiling of a download)."""

    def __init__(self, path: Path) -> None:
        import socket
        import threading

        self.path = path
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/file"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self.thread.join(5)

    def _serve(self) -> None:
        size = self.path.stat().st_size
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request and (got := conn.recv(65536)):
                    request += got
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n" % size
                )
                with open(self.path, "rb") as f:
                    conn.sendfile(f)


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """A process's peak RSS (``VmHWM``) or current RSS (``VmRSS``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(pid: int) -> None:
    """Start a new peak-RSS window for ``pid`` (Linux: ``5`` into clear_refs resets VmHWM)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class Stack:
    """An embedded-layout server with its worker as a separate process (so each has its RSS)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"SLIM_BOOTSTRAP_KEY": KEY, "SLIM_WORKER_HEARTBEAT_SECONDS": "2"}
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "serve",
                "--no-worker",
                "--port",
                str(self.port),
                "--data-dir",
                str(data_dir),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=None
        )
        for _ in range(600):
            try:
                if self.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "worker",
                "--data-dir",
                str(data_dir),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        for p in (self.worker, self.api):
            p.send_signal(signal.SIGTERM)
        for p in (self.worker, self.api):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.client.close()

    def post(self, path: str, **kw: Any) -> dict[str, Any]:
        r = self.client.post(path, **kw)
        r.raise_for_status()
        return r.json()

    def put_dir(self, kind: str, rid: str, directory: Path) -> int:
        total = 0
        for f in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = f.relative_to(directory).as_posix()
            with open(f, "rb") as fh:
                r = self.client.put(
                    f"/v1/{kind}/{rid}/files/{rel}", content=iter(lambda: fh.read(1 << 20), b"")
                )
            r.raise_for_status()
            total += f.stat().st_size
        return total

    def store_base(self, directory: Path, name: str = "base") -> str:
        """Upload and commit a base; its id."""
        b = self.post("/v1/bases", json={"name": name})["id"]
        self.put_dir("bases", b, directory)
        self.post(f"/v1/bases/{b}/commit")
        return str(b)

    def store_checkpoint(self, name: str, base_id: str, directory: Path, method: str) -> str:
        """Upload a fine-tune as ``method`` (1% keep, 16-bit values where they apply), wait
        for its compression job; its id (raises if the job failed)."""
        c = self.post(
            "/v1/checkpoints",
            json={"name": name, "base_id": base_id, "method": method, "keep": 0.01,
                  "value_bits": 16},
        )["id"]  # fmt: skip
        self.put_dir("checkpoints", c, directory)
        job = self.wait_job(self.post(f"/v1/checkpoints/{c}/commit")["id"])
        if job["state"] != "succeeded":
            raise RuntimeError(f"{method} job failed: {job}")
        return str(c)

    def put_dir_curl(self, kind: str, rid: str, directory: Path) -> int:
        """Upload a directory's files with curl: what the server ingests when the client
        keeps up (the SDK's own rate is ``put_dir``)."""
        total = 0
        for f in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = f.relative_to(directory).as_posix()
            self._curl(f"/v1/{kind}/{rid}/files/{rel}", "-T", str(f),
                       "-H", "Content-Type: application/octet-stream")  # fmt: skip
            total += f.stat().st_size
        return total

    def _curl(self, path: str, *args: str) -> str:
        """curl ``path`` on this server with the bench key; the body goes to /dev/null."""
        return subprocess.run(
            ["curl", "-sfS", "-o", "/dev/null", "-H", f"Authorization: Bearer {KEY}",
             *args, self.url + path],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

    def wait_job(self, job_id: str) -> dict[str, Any]:
        return wait_job(self.client, job_id, timeout=math.inf, interval=0.5)

    def stream(self, path: str) -> int:
        """Bytes of one GET read by the SDK's HTTP client (httpx)."""
        n = 0
        with self.client.stream("GET", path) as r:
            r.raise_for_status()
            for chunk in r.iter_raw(1 << 20):
                n += len(chunk)
        return n

    def curl(self, path: str) -> int:
        """Bytes of one GET read by curl: what the server sends when the client keeps up
        (httpx on its own tops out near 0.25 GB/s on this machine, whatever the server)."""
        return int(self._curl(path, "-w", "%{size_download}"))


def zipnn_rates(ft: Path, base: Path) -> dict[str, float]:
    """ZipNN's ratio and speed on the fine-tune's shards: plain, and on the XOR with the base."""
    from zipnn import ZipNN

    z = ZipNN(input_format="byte", bytearray_dtype="bfloat16", threads=os.cpu_count() or 1)
    raw = comp = xcomp = 0
    t_plain = t_delta = 0.0
    for shard in sorted(ft.glob("*.safetensors")):
        a = shard.read_bytes()
        b = (base / shard.name).read_bytes()
        t = time.perf_counter()
        comp += len(z.compress(a))
        t_plain += time.perf_counter() - t
        x = np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()
        t = time.perf_counter()
        xcomp += len(z.compress(x))
        t_delta += time.perf_counter() - t
        raw += len(a)
        del a, b, x
    return {
        "zipnn_ratio": raw / comp,
        "zipnn_gbps": raw / t_plain / 1e9,
        "zipnn_delta_ratio": raw / xcomp,
        "zipnn_delta_gbps": raw / t_delta / 1e9,
    }


def largest_tensor_mb(directory: Path) -> float:
    from core.checkpoint import CheckpointDir

    with CheckpointDir.open(directory) as c:
        return max(ref.info.nbytes for ref in c.tensors.values()) / 2**20


def local_pull(stack: Stack, ckpt: str, base: Path, out: Path) -> int:
    """`pull --local`: fetch only the delta, rebuild against the local base."""
    from core.reconstruct import reconstruct

    delta = out.parent / f"{ckpt}.slim"
    with open(delta, "wb") as f, stack.client.stream("GET", f"/v1/checkpoints/{ckpt}/delta") as r:
        r.raise_for_status()
        for chunk in r.iter_raw(1 << 20):
            f.write(chunk)
    paths = reconstruct(base, delta, out)
    n = sum(p.stat().st_size for p in paths)
    shutil.rmtree(out)
    delta.unlink()
    return n


PULL_MODES = ("curl_base", "curl_null", "curl_file", "sdk_pull", "sdk_pull_local")
#: The issue's goals for each ratio of :func:`pull_phase`, by delta method (none: not a goal).
GOALS: dict[str, dict[str, float]] = {
    "lossless": {"pull_vs_curl_file": 0.95, "pull_local_vs_pull": 1.2, "served_vs_base": 0.5},
    "magnitude": {"pull_vs_curl_file": 0.95, "pull_local_vs_pull": 1.2, "served_vs_base": 0.7},
}


def pull_phase(
    stack: Stack,
    name: str,
    ckpt: str,
    base_id: str,
    tmp: Path,
    repeat: int,
    *,
    method: str | None = None,
) -> dict[str, Any]:
    """What a user gets, side by side: the base's files read by ``curl -o /dev/null`` (the
    server streaming stored files unchanged), the checkpoint's files read by
    ``curl -o /dev/null`` (what the server sends, rebuilt), ``curl -o file``, ``SlimClient.pull`` (to disk, each file's
    sha256 checked against its ETag) and ``SlimClient.pull_local`` with the base already
    cached (only the delta crosses the socket; it is fetched again each time). The modes take
    turns ``repeat`` times; medians in MB/s, and each ratio against ``curl -o file`` and
    ``slim pull`` of the same run."""
    from client import SlimClient

    files = [f["path"] for f in stack.client.get(f"/v1/checkpoints/{ckpt}/files").json()["data"]]
    base_files = [
        f["path"]
        for f in stack.client.get(f"/v1/bases/{base_id}/files").json()["data"]
        if f["path"].endswith(".safetensors")
    ]
    out, cache = tmp / f"pulled-{name}", tmp / "client-cache"
    rates: dict[str, list[float]] = {m: [] for m in PULL_MODES}
    auth = f"Authorization: Bearer {KEY}"
    with SlimClient(stack.url, KEY) as client:
        client.pull_local(name, out, cache_dir=cache)  # caches the base (not timed)
        for _ in range(repeat):
            for mode in PULL_MODES:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache / "deltas", ignore_errors=True)
                out.mkdir(parents=True)
                t = time.perf_counter()
                if mode == "curl_base":
                    n = sum(
                        curl_get(f"{stack.url}/v1/bases/{base_id}/files/{f}", "/dev/null", auth)
                        for f in base_files
                    )
                elif mode.startswith("curl"):
                    n = sum(
                        curl_get(
                            f"{stack.url}/v1/checkpoints/{ckpt}/files/{f}",
                            "/dev/null" if mode == "curl_null" else str(out / f.replace("/", "_")),
                            auth,
                        )
                        for f in files
                    )
                elif mode == "sdk_pull":
                    n = client.pull(name, out).bytes_received
                else:
                    n = sum(f.size for f in client.pull_local(name, out, cache_dir=cache).files)
                rates[mode].append(n / (time.perf_counter() - t) / 1e6)
    shutil.rmtree(out, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    return {
        "mbps": med,
        "runs_mbps": rates,
        "pull_vs_curl_file": med["sdk_pull"] / med["curl_file"],
        "pull_local_vs_pull": med["sdk_pull_local"] / med["sdk_pull"],
        "curl_file_vs_null": med["curl_file"] / med["curl_null"],
        "served_vs_base": med["curl_null"] / med["curl_base"],
        "goals": GOALS.get(method or name, {}),
    }


def pull_only(
    params: float, args: argparse.Namespace, fixtures: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """Only the pull comparison: the base and one ``lossless`` and one ``magnitude`` (1%,
    16-bit values: a sparse delta) checkpoint, then :func:`pull_phase` for each."""
    base, ft, shape = build(fixtures, params)
    weights = sum(p.stat().st_size for p in ft.glob("*.safetensors"))
    row: dict[str, Any] = {"params": shape.num_params, "weight_bytes": weights, "pull": {}}
    log(f"[{params:.0e}] {shape.num_params / 1e9:.2f} B params, {weights / 1e9:.2f} GB bf16")
    with tempfile.TemporaryDirectory(dir=fixtures) as tmp:
        stack = Stack(Path(tmp) / "data")
        try:
            b = stack.store_base(base)
            for method in ("lossless", "magnitude"):
                c = stack.store_checkpoint(method, b, ft, method)
                row["pull"][method] = pull_phase(stack, method, c, b, Path(tmp), args.repeat)
                log(pull_line(method, row["pull"][method]))
        finally:
            stack.close()
    return row


def pull_line(method: str, r: dict[str, Any]) -> str:
    m, goals = r["mbps"], r.get("goals", {})

    def ratio(key: str) -> str:
        goal = goals.get(key)
        return f"{r[key]:.2f}" + ("" if goal is None else f" (goal ≥ {goal})")

    return (
        f"  pull {method}: MB/s base file served {m['curl_base']:.0f}, curl -o /dev/null "
        f"{m['curl_null']:.0f}, curl -o file {m['curl_file']:.0f}, slim pull "
        f"{m['sdk_pull']:.0f}, pull --local {m['sdk_pull_local']:.0f}\n"
        f"    pull / curl -o file {ratio('pull_vs_curl_file')}; pull --local / pull "
        f"{ratio('pull_local_vs_pull')}; served / base file served {ratio('served_vs_base')}"
    )


def run_size(
    params: float, args: argparse.Namespace, fixtures: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    base, ft, shape = build(fixtures, params)
    weights = sum(p.stat().st_size for p in ft.glob("*.safetensors"))
    row: dict[str, Any] = {
        "params": shape.num_params,
        "shape": vars(shape) if hasattr(shape, "__dict__") else str(shape),
        "weight_bytes": weights,
        "largest_tensor_mb": largest_tensor_mb(ft),
    }
    log(f"[{params:.0e}] {shape.num_params / 1e9:.2f} B params, {weights / 1e9:.2f} GB bf16")
    with tempfile.TemporaryDirectory(dir=fixtures) as tmp:
        stack = Stack(Path(tmp) / "data")
        try:
            row["rss_api_idle_mb"] = rss_mb(stack.api.pid, "VmRSS")  # imports, no work yet
            b = stack.post("/v1/bases", json={"name": "base"})["id"]
            t = time.perf_counter()
            stack.put_dir("bases", b, base)
            stack.post(f"/v1/bases/{b}/commit")
            row["base_ingest_s"] = time.perf_counter() - t
            ingest, ingest_sdk, compress, recon = [], [], {}, []
            peaks: dict[str, float] = {}

            def peak(name: str, pid: int) -> None:
                peaks[name] = max(peaks.get(name, 0.0), rss_mb(pid))

            for method in ("lossless", "magnitude", "nps"):
                times, jobs = [], []
                for rep in range(args.repeat if method != "nps" else 1):
                    c = stack.post(
                        "/v1/checkpoints",
                        json={
                            "name": f"{method}-{rep}",
                            "base_id": b,
                            "method": method,
                            "keep": 0.01,
                            "value_bits": 16,
                            "evaluation": "weights",
                        },
                    )["id"]
                    reset_peak(stack.api.pid)
                    t = time.perf_counter()
                    if rep % 2 == 0:  # curl and the SDK's client take turns
                        stack.put_dir_curl("checkpoints", c, ft)
                        ingest.append(time.perf_counter() - t)
                    else:
                        stack.put_dir("checkpoints", c, ft)
                        ingest_sdk.append(time.perf_counter() - t)
                    peak("api_upload", stack.api.pid)
                    reset_peak(stack.worker.pid)
                    job = stack.post(f"/v1/checkpoints/{c}/commit")
                    t = time.perf_counter()
                    job = stack.wait_job(job["id"])
                    times.append(time.perf_counter() - t)
                    peak(f"worker_{method}", stack.worker.pid)
                    if job["state"] != "succeeded":
                        raise RuntimeError(f"{method} job failed: {job}")
                    jobs.append(c)
                info = stack.client.get(f"/v1/checkpoints/{jobs[-1]}").json()
                compress[method] = {
                    "seconds": statistics.median(times),
                    "gbps": weights / statistics.median(times) / 1e9,
                    "ratio": info["ratio"],
                    "bits_per_param": info["bits_per_param"],
                    "stored_bytes": info["stored_bytes"],
                }
                log(
                    f"  compress {method}: {compress[method]['seconds']:.1f} s, ratio {info['ratio']:.2f}"
                )
                if method in ("lossless", "magnitude"):
                    files = [
                        f["path"]
                        for f in stack.client.get(f"/v1/checkpoints/{jobs[-1]}/files").json()[
                            "data"
                        ]
                        if f["path"].endswith(".safetensors")
                    ]
                    reset_peak(stack.api.pid)
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        n = sum(stack.curl(f"/v1/checkpoints/{jobs[-1]}/files/{p}") for p in files)
                        recon.append((method, n / (time.perf_counter() - t) / 1e9))
                        t = time.perf_counter()
                        n = sum(
                            stack.stream(f"/v1/checkpoints/{jobs[-1]}/files/{p}") for p in files
                        )
                        recon.append((f"{method}-httpx", n / (time.perf_counter() - t) / 1e9))
                    peak("api_download", stack.api.pid)
                    local = []
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        n = local_pull(stack, jobs[-1], base, Path(tmp) / "pull")
                        local.append(n / (time.perf_counter() - t) / 1e9)
                    compress[method]["pull_local_gbps"] = statistics.median(local)
                    row.setdefault("pull", {})[method] = pull_phase(
                        stack, f"{method}-{len(jobs) - 1}", jobs[-1], b, Path(tmp), args.repeat,
                        method=method,
                    )  # fmt: skip
                    log(pull_line(method, row["pull"][method]))
            row["ingest_mbps"] = weights / statistics.median(ingest) / 1e6
            if ingest_sdk:
                row["ingest_sdk_mbps"] = weights / statistics.median(ingest_sdk) / 1e6
            row["compress"] = compress
            row["reconstruct_http_gbps"] = {
                m: statistics.median([g for mm, g in recon if mm == m])
                for m in ("lossless", "magnitude", "lossless-httpx", "magnitude-httpx")
            }
            row["rss_api_mb"] = max(peaks["api_upload"], peaks["api_download"])
            row["rss_worker_mb"] = max(peaks["worker_lossless"], peaks["worker_magnitude"])
            row["rss_peaks_mb"] = peaks  # per phase; the NPS search is outside the RSS goal
        finally:
            stack.close()
    if not args.skip_zipnn:
        row |= zipnn_rates(ft, base)
    row["rss_limit_mb"] = 2 * row["largest_tensor_mb"] + 300
    log(
        f"  ingest {row['ingest_mbps']:.0f} MB/s, reconstruct {row['reconstruct_http_gbps']}, "
        f"RSS api {row['rss_api_mb']:.0f} MB worker {row['rss_worker_mb']:.0f} MB (limit {row['rss_limit_mb']:.0f})"
    )
    return row


def main(args: argparse.Namespace) -> int:
    fixtures = Path(args.workdir) if args.workdir else Path(__file__).parent / "cache" / "llm"
    fixtures.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    from bench.fidelity import machine_note

    first_base, _, _ = build(fixtures, min(args.params))
    result: dict[str, Any] = {
        "command": "python -m bench throughput " + " ".join(sys.argv[2:]),
        "machine": machine_note(),
        "ceilings": ceilings(next(first_base.glob("*.safetensors")), args.repeat),
        "sizes": [],
    }
    log(f"ceilings: {json.dumps({k: round(v, 2) for k, v in result['ceilings'].items()})}")
    for p in args.params:
        measure = pull_only if args.pull_only else run_size
        result["sizes"].append(measure(p, args, fixtures, log))
        write(result, out, "throughput-pull" if args.pull_only else "throughput")
    return 0


def write(result: dict[str, Any], out: Path, stem: str = "throughput") -> None:
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    c = result["ceilings"]
    md = [
        "# Throughput benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}",
        "",
        "Ceilings measured in the same run: " + ", ".join(f"{k} {v:.2f}" for k, v in c.items()),
    ]
    if any("compress" in r for r in result["sizes"]):
        md += [
            "",
            "| params | weights GB | ingest MB/s, curl / SDK | lossless ratio | zipnn | zipnn delta | compress lossless s | compress magnitude s | nps (weights) s | reconstruct HTTP GB/s, curl (lossless / magnitude) | same, httpx client | pull --local GB/s (lossless / magnitude) | RSS API MB (idle) | RSS worker MB | limit MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in result["sizes"]:
        if "compress" not in r:
            continue
        comp = r["compress"]
        md.append(
            f"| {r['params'] / 1e9:.2f} B | {r['weight_bytes'] / 1e9:.2f} | {r['ingest_mbps']:.0f} / {r.get('ingest_sdk_mbps', float('nan')):.0f} | "
            f"{comp['lossless']['ratio']:.2f} | {r.get('zipnn_ratio', float('nan')):.2f} | {r.get('zipnn_delta_ratio', float('nan')):.2f} | "
            f"{comp['lossless']['seconds']:.1f} | {comp['magnitude']['seconds']:.1f} | {comp['nps']['seconds']:.1f} | "
            f"{r['reconstruct_http_gbps']['lossless']:.2f} / {r['reconstruct_http_gbps']['magnitude']:.2f} | "
            f"{r['reconstruct_http_gbps']['lossless-httpx']:.2f} / {r['reconstruct_http_gbps']['magnitude-httpx']:.2f} | "
            f"{comp['lossless']['pull_local_gbps']:.2f} / {comp['magnitude']['pull_local_gbps']:.2f} | "
            f"{r['rss_api_mb']:.0f} ({r.get('rss_api_idle_mb', float('nan')):.0f}) | "
            f"{r['rss_worker_mb']:.0f} | {r['rss_limit_mb']:.0f} |"
        )
    if not any("pull" in r for r in result["sizes"]):
        (out / f"{stem}.md").write_text("\n".join(md) + "\n")
        return
    md += [
        "",
        "Pulls to disk, MB/s (medians of the modes taking turns; ratios from the same run):",
        "",
        "| params | delta | base file served | curl -o /dev/null | served / base file "
        "| curl -o file | slim pull | pull / curl -o file "
        "| pull --local (base cached) | pull --local / pull |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["sizes"]:
        for method, x in r.get("pull", {}).items():
            m = x["mbps"]
            g = x.get("goals", {})

            def ratio(key: str, x: dict[str, Any] = x, g: dict[str, float] = g) -> str:
                return f"{x[key]:.2f}" + (f" (≥ {g[key]})" if key in g else "")

            md.append(
                f"| {r['params'] / 1e9:.2f} B | {method} | {m.get('curl_base', float('nan')):.0f} | "
                f"{m['curl_null']:.0f} | {ratio('served_vs_base') if 'served_vs_base' in x else '–'} | "
                f"{m['curl_file']:.0f} | {m['sdk_pull']:.0f} | {ratio('pull_vs_curl_file')} | "
                f"{m['sdk_pull_local']:.0f} | {ratio('pull_local_vs_pull')} |"
            )
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")

"""Load: many pulls and uploads at once, each as a ratio to one alone, beside the host's ceilings.

``python -m bench load [--stack embedded pg-s3] [--params 5e8] [--pulls 16] [--uploads 10]
[--seconds 15]`` stores a Llama-shaped bf16 base and fine-tune (:mod:`bench.llm_fixture`)
as one ``magnitude`` and one ``lossless`` checkpoint, then for each stack and each method:

- **pulls**: one client pulls the weight file in a loop for ``--seconds``, then ``--pulls``
  clients do at once. Aggregate rate = bytes received inside the window / the window (a pull
  still running at the end counts the bytes it got), time to first byte of every request,
  the API's peak RSS in each phase (``VmHWM`` reset before it, summed over the API's
  processes). Targets: aggregate ≥ 80 % of one pull's, p99 first byte ≤ 1 s, peak RSS ≤ 2×
  the single-pull peak.
- **uploads**: one client PUTs the fine-tune's weight file into an open checkpoint in a loop,
  then ``--uploads`` clients do (each its own checkpoint). Target: aggregate ingest ≥ 80 % of
  one upload's.

Clients are ``curl`` processes (``-o /dev/null`` / ``-T file``), so the benchmark's own
interpreter does not compete for the GIL with them; each body's bytes are checked once before
the timed phases (sha256 against the ETag) and every timed pull must deliver the full size or
be cut by the window. The stacks: ``embedded`` (SQLite + a blob directory) and ``pg-s3``
(PostgreSQL + moto's S3 server, ``moto[server]``, standing in for MinIO). Both run ``slim
serve --no-worker`` as a child process (``--api-workers N`` for ``--workers N``) and a separate
``slim worker`` for the compression jobs.

The host's ceilings are measured in the same run: memcpy, sha256, xxh3, zstd decompression and
file reads on one and on every core, loopback ``curl`` of a static file served by
``sendfile`` with 1 and ``--pulls`` clients at once, and, for ``pg-s3``, the S3 server's own
rate (plain boto3 GET/PUT of the same object with 1 and N clients) — the ceiling an upload
through the API cannot pass. ``--py-spy PATH`` records the API with py-spy during each
concurrent phase and puts the busiest frames in the report.

Results: ``bench/results/load.{json,md}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import http.server
import json
import os
import platform
import socketserver
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    ADMIN_KEY,
    S3_KEY_ID,
    S3_SECRET,
    Api,
    Deployment,
    Moto,
    client,
    commit,
    pg_ready,
    push_dir,
    wait_job,
    worker,
)

RESULTS = Path(__file__).resolve().parent / "results"
STACKS = ("embedded", "pg-s3")
METHODS = ("magnitude", "lossless")
#: The issue's targets (docs/scaling.md cites them).
TARGET_RATIO = 0.8
TARGET_TTFB_S = 1.0
TARGET_RSS_FACTOR = 2.0
MIB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack", nargs="+", default=list(STACKS), choices=STACKS)
    parser.add_argument("--params", type=float, default=5e8, help="parameters (default 5e8)")
    parser.add_argument("--pulls", type=int, default=16, help="concurrent pulls (default 16)")
    parser.add_argument("--uploads", type=int, default=10, help="concurrent uploads (default 10)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--api-workers", type=int, default=1, metavar="N", help="`slim serve --workers N`"
    )
    parser.add_argument("--py-spy", default=None, help="py-spy binary: profile busy phases")
    parser.add_argument("--workdir", type=Path, default=None, help="fixture cache")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")


def fixture_dir(args: argparse.Namespace) -> Path:
    if args.workdir is not None:
        return Path(args.workdir)
    cache = os.environ.get("SLIM_BENCH_CACHE")
    return Path(cache) / "llm" if cache else Path(__file__).parent / "cache" / "llm"


def main(args: argparse.Namespace) -> int:
    if "pg-s3" in args.stack and not pg_ready():
        print("PostgreSQL is not reachable (SLIM_TEST_PG_ADMIN_URL); start it first")
        return 2
    result = run(args)
    write_results(result, args.out)
    errors = sum(p["errors"] for s in result["stacks"] for p in _phases(s))
    return 0 if errors == 0 else 1


def _phases(stack: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for m in stack["pulls"].values():
        yield m["one"]
        yield m["many"]
    if stack.get("uploads"):
        yield stack["uploads"]["one"]
        yield stack["uploads"]["many"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args: argparse.Namespace, models: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """The whole benchmark; ``models`` (base and fine-tune directories) replaces the
    Llama-shaped fixture of ``--params`` (the smoke test passes a tiny pair)."""
    from bench.llm_fixture import build

    fixtures = fixture_dir(args)
    fixtures.mkdir(parents=True, exist_ok=True)
    if models is None:
        base_dir, ft_dir, shape = build(fixtures, args.params)
        params = shape.num_params
    else:
        (base_dir, ft_dir), params = models, 0
    weight = max(ft_dir.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    log(f"{params / 1e9:.2f} B params; weight file {weight.stat().st_size / MIB:.0f} MiB")
    result: dict[str, Any] = {
        "benchmark": "load",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "params": params,
            "file_bytes": weight.stat().st_size,
            "pulls": args.pulls,
            "uploads": args.uploads,
            "seconds": args.seconds,
            "methods": args.methods,
            "api_workers": args.api_workers,
            "stacks": args.stack,
        },
        "ceilings": host_ceilings(weight, args.pulls, args.seconds),
        "stacks": [],
    }
    log(f"host ceilings: {json.dumps(result['ceilings'])}")
    for name in args.stack:
        with tempfile.TemporaryDirectory(prefix="slim-load-", dir=fixtures) as tmp:
            result["stacks"].append(run_stack(name, Path(tmp), base_dir, ft_dir, weight, args))
    return result


def machine() -> str:
    load1 = os.getloadavg()[0]
    return (
        f"{platform.machine()} Linux, {os.cpu_count()} cores (1-minute load average "
        f"{load1:.1f} at the start), python {platform.python_version()}"
    )


# -- one stack ------------------------------------------------------------------------------


def run_stack(
    name: str, root: Path, base_dir: Path, ft_dir: Path, weight: Path, args: argparse.Namespace
) -> dict[str, Any]:
    moto = Moto().start() if name == "pg-s3" else None
    dep = Deployment.create(
        root, s3=moto, sqlite=name == "embedded", blob_dir=root / "blobs" if moto is None else None
    )
    api = Api(dep, api_workers=args.api_workers).start().wait_ready()
    try:
        urls, open_ckpts = prepare(name, dep, api, base_dir, ft_dir, weight, args)
        out = {"stack": name, **measure(name, api, urls, open_ckpts, weight, args)}
        if moto is not None:
            out["s3_ceiling"] = s3_ceiling(moto, weight, args)
            log(f"[{name}] S3 server alone: {json.dumps(out['s3_ceiling'])}")
        return out
    finally:
        api.stop()
        if moto is not None:
            moto.stop()
        dep.close()


def prepare(
    name: str,
    dep: Deployment,
    api: Api,
    base_dir: Path,
    ft_dir: Path,
    weight: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, str], list[str]]:
    """Store the base and one checkpoint per method (a ``slim worker`` compresses them), open
    one checkpoint per uploader; check each pulled weight file once against its ETag. Returns
    ({method: weight file URL}, [open checkpoint ids])."""
    w = worker(dep, "worker").start()
    try:
        log(f"[{name}] storing the base and {', '.join(args.methods)} checkpoints")
        with client(api.url, timeout=1800) as c:
            base = c.post("/v1/bases", json={"name": "base"}).json()
            push_dir(c, "bases", base["id"], base_dir)
            c.post(f"/v1/bases/{base['id']}/commit").raise_for_status()
            urls = {}
            for method in args.methods:
                t = time.perf_counter()
                ckpt = _checkpoint(c, base["id"], method, method)
                push_dir(c, "checkpoints", ckpt, ft_dir)
                job = wait_job(c, commit(c, ckpt)["id"], timeout=3600)
                if job["state"] != "succeeded":
                    raise RuntimeError(f"{method} job: {job}")
                urls[method] = f"/v1/checkpoints/{ckpt}/files/{weight.name}"
                log(f"[{name}] {method} stored in {time.perf_counter() - t:.0f} s")
            open_ckpts = [
                _checkpoint(c, base["id"], f"upload-{i}", "magnitude")
                for i in range(max(args.uploads, 1))
            ]
            for method, url in urls.items():
                digest, etag, n = _pull_sha256(c, url)
                if digest != etag or n != weight.stat().st_size:
                    raise RuntimeError(
                        f"{method}: pulled {n} bytes hashing to {digest}, ETag {etag}"
                    )
        return urls, open_ckpts
    finally:
        w.stop()


def measure(
    name: str,
    api: Api,
    urls: dict[str, str],
    open_ckpts: list[str],
    weight: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The timed phases, each on a freshly started API (so each phase's peak RSS is its own:
    a process keeps the memory it once used) warmed by a one-byte range of every file (which
    checks the cached base and deltas once, as every new API process does)."""
    size = weight.stat().st_size

    def fresh() -> Api:
        api.stop()
        api.start().wait_ready()
        with client(api.url, timeout=600) as c:
            for url in urls.values():
                c.get(url, headers={"Range": "bytes=0-0"}).raise_for_status()
        return api

    out: dict[str, Any] = {"pulls": {}}
    for method, url in urls.items():
        out["pulls"][method] = {
            "one": pull_phase(fresh(), url, 1, args, size),
            "many": pull_phase(fresh(), url, args.pulls, args, size, f"{name}-{method}"),
        }
        _log_pair(name, f"{method} pulls", out["pulls"][method])
    if args.uploads:
        out["uploads"] = {
            "one": upload_phase(fresh(), open_ckpts[:1], weight, args),
            "many": upload_phase(fresh(), open_ckpts, weight, args, f"{name}-uploads"),
        }
        _log_pair(name, "uploads", out["uploads"])
    out["api_alive_after"] = api.alive
    return out


def _checkpoint(c: Any, base_id: str, name: str, method: str) -> str:
    body = {
        "name": name,
        "base_id": base_id,
        "method": method,
        "keep": 0.01,
        "value_bits": 16,
        "evaluation": "weights",
    }
    r = c.post("/v1/checkpoints", json=body)
    if r.status_code != 201:
        raise RuntimeError(f"create checkpoint {name}: {r.status_code} {r.text}")
    return str(r.json()["id"])


def _pull_sha256(c: Any, url: str) -> tuple[str, str, int]:
    h, n = hashlib.sha256(), 0
    with c.stream("GET", url) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes(4 << 20):
            h.update(chunk)
            n += len(chunk)
        return h.hexdigest(), r.headers.get("etag", "").strip('"'), n


def _log_pair(stack: str, what: str, pair: dict[str, Any]) -> None:
    one, many = pair["one"], pair["many"]
    log(
        f"[{stack}] {what}: 1 → {one['mib_s']} MiB/s, {many['clients']} → {many['mib_s']} "
        f"MiB/s ({many['mib_s'] / max(one['mib_s'], 1e-9):.2f}×), first byte p99 "
        f"{one['ttfb_p99_s']} / {many['ttfb_p99_s']} s, peak RSS {one['api_peak_rss_mib']} / "
        f"{many['api_peak_rss_mib']} MiB, API CPU s/GiB {one['api_cpu_s_per_gib']} / "
        f"{many['api_cpu_s_per_gib']}, host busy {one['host_busy_cores']} / "
        f"{many['host_busy_cores']} cores, errors {one['errors'] + many['errors']}"
    )


# -- timed phases ---------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients of one phase saw."""

    bytes: int = 0
    done: int = 0
    cut: int = 0
    ttfb: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _curl_loop(argv: list[str], stop_at: float, expect: int, tally: Tally) -> None:
    """Run ``curl argv`` back to back until ``stop_at`` (the last one cut there)."""
    while (left := stop_at - time.monotonic()) > 0.2:
        done = subprocess.run(
            ["curl", "-sS", "--max-time", f"{left:.3f}", *argv],
            capture_output=True,
            text=True,
        )
        try:
            status, size, first = done.stdout.split()
            n, ttfb = int(float(size)), float(first)
        except ValueError:
            with tally.lock:
                tally.errors[f"curl {done.returncode}: {done.stderr.strip()[:80]}"] += 1
            continue
        with tally.lock:
            tally.bytes += n
            if done.returncode == 28:  # the window closed during this transfer
                tally.cut += 1
                if ttfb > 0:
                    tally.ttfb.append(ttfb)
            elif done.returncode == 0 and status in ("200", "201") and n == expect:
                tally.done += 1
                tally.ttfb.append(ttfb)
            else:
                tally.errors[f"HTTP {status}, curl {done.returncode}, {n} bytes"] += 1


def _phase(
    api: Api,
    argvs: list[list[str]],
    expect: int,
    args: argparse.Namespace,
    profile: str | None,
) -> dict[str, Any]:
    tally = Tally()
    pids = tree_pids(api.pid)
    for pid in pids:
        reset_peak(pid)
    spy = _start_spy(args.py_spy, api.pid, args.seconds, args.out, profile)
    cpu_meter, host_before = ThreadCpu(pids), host_cpu()
    started = time.monotonic()
    stop_at = started + args.seconds
    threads = [
        threading.Thread(target=_curl_loop, args=(argv, stop_at, expect, tally), daemon=True)
        for argv in argvs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    api_cpu, cpu = cpu_meter.stop()
    host_busy, host_all = (a - b for a, b in zip(host_cpu(), host_before, strict=True))
    peak = sum(peak_rss(pid) for pid in tree_pids(api.pid))
    out = {
        "clients": len(argvs),
        "seconds": round(elapsed, 2),
        "bytes": tally.bytes,
        "mib_s": round(tally.bytes / elapsed / MIB, 1),
        "completed": tally.done,
        "cut_at_end": tally.cut,
        "errors": sum(tally.errors.values()),
        "error_kinds": dict(tally.errors),
        "ttfb_p50_s": _pct(tally.ttfb, 50),
        "ttfb_p99_s": _pct(tally.ttfb, 99),
        "ttfb_n": len(tally.ttfb),
        "api_peak_rss_mib": round(peak / MIB),
        "api_cpu_s": round(api_cpu, 2),
        "api_cpu_s_per_gib": round(api_cpu / (tally.bytes / (1 << 30)), 2) if tally.bytes else None,
        "api_cpu_by_thread": {k: round(v, 2) for k, v in cpu.most_common(8)},
        "host_busy_cores": round(host_busy / max(host_all, 1e-9) * (os.cpu_count() or 1), 2),
    }
    if spy is not None:
        out["profile"] = _finish_spy(*spy)
    return out


def pull_phase(
    api: Api,
    url: str,
    clients: int,
    args: argparse.Namespace,
    size: int,
    profile: str | None = None,
) -> dict[str, Any]:
    argv = [
        "-o", "/dev/null", "-H", f"Authorization: Bearer {ADMIN_KEY}",
        "-w", "%{http_code} %{size_download} %{time_starttransfer}", api.url + url,
    ]  # fmt: skip
    return _phase(api, [argv] * clients, size, args, profile)


def upload_phase(
    api: Api,
    checkpoints: list[str],
    weight: Path,
    args: argparse.Namespace,
    profile: str | None = None,
) -> dict[str, Any]:
    """Each client PUTs ``weight`` into its own open checkpoint; time to first byte is curl's
    time to the answer's first byte (the whole upload), so the phase reports it but the
    targets do not use it."""
    argvs = [
        [
            "-o", "/dev/null", "-H", f"Authorization: Bearer {ADMIN_KEY}", "-H", "Expect:",
            "-T", str(weight), "-w", "%{http_code} %{size_upload} %{time_starttransfer}",
            f"{api.url}/v1/checkpoints/{ckpt}/files/model.safetensors",
        ]
        for ckpt in checkpoints
    ]  # fmt: skip
    return _phase(api, argvs, weight.stat().st_size, args, profile)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 3)


# -- process memory and profiles ------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (the API processes of ``slim serve --workers N``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


_TICK = os.sysconf("SC_CLK_TCK")


class ThreadCpu:
    """CPU seconds (user + system) of the API's processes over a phase, in all and by thread
    kind: ``event loop`` (the main thread), ``slim-stream``, ``slim-rebuild``, ``slim-planes``,
    ``AnyIO worker``... Threads come and go with the streams, so they are sampled every
    0.2 s; the total is the processes' own (it counts threads that ended, too)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.first: dict[tuple[int, str], float] = {}
        self.last: dict[tuple[int, str], float] = {}
        self.total0 = self._total()
        self._stop = threading.Event()
        self._sample(initial=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def _sample(self, initial: bool = False) -> None:
        for pid in self.pids:
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    name = (task / "comm").read_text().strip()
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                kind = "event loop" if task.name == str(pid) else name.rstrip("_0123456789")
                key = (int(task.name), kind)
                used = (int(fields[11]) + int(fields[12])) / _TICK
                self.first.setdefault(key, used if initial else 0.0)  # 0: started since
                self.last[key] = used

    def _total(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _TICK
        return total

    def stop(self) -> tuple[float, Counter[str]]:
        self._stop.set()
        self._thread.join()
        self._sample()
        by_kind: Counter[str] = Counter()
        for key, used in self.last.items():
            by_kind[key[1]] += used - self.first.get(key, 0.0)
        return self._total() - self.total0, by_kind


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return float(sum(fields) - idle), float(sum(fields))


def reset_peak(pid: int) -> None:
    """Start a new peak-RSS window (``5`` into clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _start_spy(
    py_spy: str | None, pid: int, seconds: float, out: Path, name: str | None
) -> tuple[subprocess.Popen[bytes], Path] | None:
    if py_spy is None or name is None:
        return None
    target = out / "profiles" / f"load-{name}.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds) - 1))]
    argv += [
        "--format",
        "raw",
        "--rate",
        "50",
        "--gil",
        "--nonblocking",
        "--subprocesses",
        "--output",
        str(target),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, target


def _finish_spy(proc: subprocess.Popen[bytes], target: Path) -> dict[str, Any]:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    return summarize_profile(target)


def summarize_profile(path: Path, top: int = 8) -> dict[str, Any]:
    """From py-spy's collapsed stacks: the share of samples per thread kind and the frames
    with the most samples on top of the stack (self time)."""
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    try:
        text = path.read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0].split(" ")[0].strip('"')] += n
        own[_frame(frames[-1])] += n
    return {
        "samples": total,
        "file": str(path.relative_to(path.parents[2])) if len(path.parents) > 2 else str(path),
        "top_self": [[f, round(n / total, 3)] for f, n in own.most_common(top)] if total else [],
    }


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rstrip(')').split(':')[0]).name})" if where else name


# -- ceilings -------------------------------------------------------------------------------


def _rate(nbytes: int, fn: Callable[[], object], threads: int, rounds: int = 3) -> float:
    """GB/s of ``fn`` (over ``nbytes``) run in ``threads`` threads at once; median of rounds."""
    rates = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            t = time.perf_counter()
            list(pool.map(lambda _: fn(), range(threads)))
            rates.append(nbytes * threads / (time.perf_counter() - t) / 1e9)
    return round(statistics.median(rates), 3)


class _StaticHandler(http.server.BaseHTTPRequestHandler):
    path_to_send: Path

    def do_GET(self) -> None:
        size = self.path_to_send.stat().st_size
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.send_header("Connection", "close")
        self.end_headers()
        # (an OSError: curl was cut at the end of the window)
        with self.path_to_send.open("rb") as f, contextlib.suppress(OSError):
            self.connection.sendfile(f)

    def log_message(self, *args: Any) -> None:
        pass


class _Threaded(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def loopback_curl(path: Path, clients: int, seconds: float) -> float:
    """MiB/s that ``clients`` curls read from a ``sendfile`` server of ``path`` (the most a
    download can reach here when serving it costs nothing)."""
    handler = type("H", (_StaticHandler,), {"path_to_send": path})
    server = _Threaded(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/f"
        argv = ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_starttransfer}", url]
        tally = Tally()
        t = time.monotonic()
        threads = [
            threading.Thread(
                target=_curl_loop, args=(argv, t + seconds, path.stat().st_size, tally)
            )
            for _ in range(clients)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return round(tally.bytes / (time.monotonic() - t) / MIB, 1)
    finally:
        server.shutdown()
        server.server_close()


def host_ceilings(sample: Path, clients: int, seconds: float) -> dict[str, Any]:
    """The machine's own rates, now: per thread and with every core."""
    import xxhash
    import zstandard

    cores = os.cpu_count() or 1
    data = os.urandom(64 << 20)
    with sample.open("rb") as f:  # bf16 weights: what a delta's frames hold
        f.seek(sample.stat().st_size // 2)
        weights = f.read(64 << 20)
    frame = zstandard.ZstdCompressor(level=3).compress(weights)
    size = sample.stat().st_size

    def read_all() -> None:
        with sample.open("rb") as f:
            while f.read(8 << 20):
                pass

    read_all()
    ops: dict[str, tuple[int, Callable[[], object]]] = {
        "memcpy": (len(data), lambda: bytearray(data)),
        "sha256": (len(data), lambda: hashlib.sha256(data).digest()),
        "xxh3_128": (len(data), lambda: xxhash.xxh3_128(data).digest()),
        "zstd_decompress": (len(weights), lambda: zstandard.ZstdDecompressor().decompress(frame)),
        "file_read": (size, read_all),
    }
    out: dict[str, Any] = {"cores": cores}
    for name, (n, fn) in ops.items():
        out[f"{name}_gbps_1_thread"] = _rate(n, fn, 1)
        out[f"{name}_gbps_{cores}_threads"] = _rate(n, fn, cores)
    window = max(3.0, seconds / 3)
    out["loopback_curl_mib_s_1"] = loopback_curl(sample, 1, window)
    out[f"loopback_curl_mib_s_{clients}"] = loopback_curl(sample, clients, window)
    return out


def s3_ceiling(moto: Moto, weight: Path, args: argparse.Namespace) -> dict[str, Any]:
    """MiB/s of plain boto3 GETs and PUTs of one 64 MiB object against the S3 server, with 1
    and with N clients at once (N = --pulls for GETs, --uploads for PUTs)."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
    )
    bucket = "slim-load-ceiling"
    s3.create_bucket(Bucket=bucket)
    with weight.open("rb") as f:
        body = f.read(64 << 20)
    s3.put_object(Bucket=bucket, Key="obj", Body=body)
    window = max(3.0, args.seconds / 3)

    def get() -> int:
        return len(s3.get_object(Bucket=bucket, Key="obj")["Body"].read())

    def put() -> int:  # a key per thread: moto fails concurrent PUTs of one key (HTTP 500)
        s3.put_object(Bucket=bucket, Key=f"put-{threading.get_ident()}", Body=body)
        return len(body)

    out: dict[str, Any] = {}
    for name, fn, many in (("get", get, args.pulls), ("put", put, max(args.uploads, 1))):
        for n in (1, many):
            try:
                out[f"{name}_mib_s_{n}"] = _for_window(fn, n, window)
            except Exception as exc:  # the S3 server failing is a finding, not a lost run
                out[f"{name}_mib_s_{n}"] = None
                out[f"{name}_error_{n}"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return out


def _for_window(fn: Callable[[], int], clients: int, seconds: float) -> float:
    """MiB/s of ``fn`` (returns bytes moved) called back to back by ``clients`` threads,
    counting the calls that finish inside ``seconds`` (at least one each)."""
    stop_at = time.monotonic() + seconds
    moved = [0] * clients

    def loop(i: int) -> None:
        while True:
            moved[i] += fn()
            if time.monotonic() >= stop_at:
                return

    t = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, range(clients)))
    return round(sum(moved) / (time.monotonic() - t) / MIB, 1)


# -- report ---------------------------------------------------------------------------------


def verdicts(stack: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue for one stack: measured, target, met."""
    rows = []
    for method, pair in stack["pulls"].items():
        one, many = pair["one"], pair["many"]
        ratio = many["mib_s"] / one["mib_s"] if one["mib_s"] else 0.0
        rss = many["api_peak_rss_mib"] / one["api_peak_rss_mib"] if one["api_peak_rss_mib"] else 0
        ttfb = many["ttfb_p99_s"] if many["ttfb_p99_s"] is not None else float("inf")
        rows += [
            _verdict(f"{method}: {many['clients']} pulls / 1, aggregate", ratio, TARGET_RATIO, "≥"),
            _verdict(
                f"{method}: CPU per byte, 1 pull / {many['clients']} (efficiency)",
                _efficiency(one, many),
                TARGET_RATIO,
                "≥",
            ),
            _verdict(f"{method}: p99 first byte, {many['clients']} pulls", ttfb, TARGET_TTFB_S),
            _verdict(f"{method}: API peak RSS, {many['clients']} pulls / 1", rss, 2.0),
        ]
    if stack.get("uploads"):
        one, many = stack["uploads"]["one"], stack["uploads"]["many"]
        ratio = many["mib_s"] / one["mib_s"] if one["mib_s"] else 0.0
        rows += [
            _verdict(f"{many['clients']} uploads / 1, ingest", ratio, TARGET_RATIO, "≥"),
            _verdict(
                f"CPU per byte, 1 upload / {many['clients']} (efficiency)",
                _efficiency(one, many),
                TARGET_RATIO,
                "≥",
            ),
        ]
    return rows


def _efficiency(one: dict[str, Any], many: dict[str, Any]) -> float:
    """The API's CPU seconds per GiB alone over those with many clients: the share of the
    single-stream rate that N streams would reach on cores of their own (the aggregate itself
    depends on how much of a shared machine the API got)."""
    a, b = one["api_cpu_s_per_gib"], many["api_cpu_s_per_gib"]
    return float(a / b) if a and b else 0.0


def _verdict(what: str, value: float, target: float, sense: str = "≤") -> dict[str, Any]:
    met = value >= target if sense == "≥" else value <= target
    return {"what": what, "value": round(value, 3), "target": f"{sense} {target:g}", "met": met}


def write_results(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for s in result["stacks"]:
        s["verdicts"] = verdicts(s)
    (out / "load.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "load.md").write_text(render(result))


def command(cfg: dict[str, Any]) -> str:
    return (
        f"python -m bench load --stack {' '.join(cfg['stacks'])} --params {cfg['params']:.3g} "
        f"--pulls {cfg['pulls']} --uploads {cfg['uploads']} --seconds {cfg['seconds']:g} "
        f"--methods {' '.join(cfg['methods'])} --api-workers {cfg['api_workers']}"
    )


def render(result: dict[str, Any]) -> str:
    cfg, c = result["config"], result["ceilings"]
    cores = c["cores"]
    lines = [
        "# Load: many pulls and uploads at once, against one",
        "",
        f"`{command(cfg)}` — {result['when']}, {result['machine']}.",
        "",
        f"A Llama-shaped bf16 checkpoint of {cfg['params'] / 1e9:.2f} B parameters (weight file "
        f"{cfg['file_bytes'] / MIB:.0f} MiB) stored as a `magnitude` (1 %) and a `lossless` "
        "delta; each pull rebuilds it from base + delta while streaming. Clients are curl "
        f"processes on the same machine; each phase lasts {cfg['seconds']:g} s and its rate is "
        "the bytes moved inside it (a transfer still running at the end counts what it moved). "
        f"The API is `slim serve --no-worker --workers {cfg['api_workers']}`; peak RSS is "
        "VmHWM, reset before each phase.",
        "",
        "## Host ceilings (measured in the same run)",
        "",
        f"| operation | 1 thread | {cores} threads |",
        "|---|---:|---:|",
    ]
    for op in ("memcpy", "sha256", "xxh3_128", "zstd_decompress", "file_read"):
        lines.append(
            f"| {op} | {c[f'{op}_gbps_1_thread']} GB/s | {c[f'{op}_gbps_{cores}_threads']} GB/s |"
        )
    many = cfg["pulls"]
    lines += [
        f"| loopback curl of a static file (sendfile server), 1 / {many} clients | "
        f"{c['loopback_curl_mib_s_1']} MiB/s | {c[f'loopback_curl_mib_s_{many}']} MiB/s |",
        "",
    ]
    for s in result["stacks"]:
        lines += [f"## Stack `{s['stack']}`", "", *_stack_table(s), ""]
        if "s3_ceiling" in s:
            s3 = s["s3_ceiling"]
            lines += [
                "S3 server alone (boto3, one 64 MiB object): "
                + ", ".join(f"{k.replace('_mib_s_', ' × ')}: {v} MiB/s" for k, v in s3.items()),
                "",
            ]
        lines += [
            "| target | measured | goal | met |",
            "|---|---:|---:|---|",
            *(
                f"| {v['what']} | {v['value']} | {v['target']} | {'yes' if v['met'] else 'NO'} |"
                for v in s["verdicts"]
            ),
            "",
        ]
        profiles = [
            (label, p["profile"])
            for label, p in _labelled(s)
            if p.get("profile") and p["profile"].get("top_self")
        ]
        for label, prof in profiles:
            tops = ", ".join(f"{f} {share:.0%}" for f, share in prof["top_self"][:6])
            lines.append(f"- py-spy, {label} ({prof['samples']} samples, self time): {tops}")
        if profiles:
            lines.append("")
    return "\n".join(lines)


def _labelled(s: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for method, pair in s["pulls"].items():
        yield f"{method} pulls × 1", pair["one"]
        yield f"{method} pulls × {pair['many']['clients']}", pair["many"]
    if s.get("uploads"):
        yield "uploads × 1", s["uploads"]["one"]
        yield f"uploads × {s['uploads']['many']['clients']}", s["uploads"]["many"]


def _stack_table(s: dict[str, Any]) -> list[str]:
    rows = [
        "| traffic | clients | aggregate | completed (+ cut at the end) | errors "
        "| first byte p50 / p99 | API peak RSS | API CPU per GiB (event loop) | host busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, p in _labelled(s):
        loop = p["api_cpu_by_thread"].get("event loop")
        share = f" ({loop / p['api_cpu_s']:.0%})" if loop is not None and p["api_cpu_s"] else ""
        rows.append(
            f"| {label} | {p['clients']} | {p['mib_s']} MiB/s | {p['completed']} "
            f"(+{p['cut_at_end']}) | {p['errors']} | {p['ttfb_p50_s']} / {p['ttfb_p99_s']} s "
            f"| {p['api_peak_rss_mib']} MiB | {p['api_cpu_s_per_gib']} s "
            f"{share} | {p['host_busy_cores']} cores |"
        )
    return rows

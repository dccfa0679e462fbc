"""Where a pull's time goes: the SDK against curl, and sixteen first bytes at once.

Two dev-loop measurements on one stored fixture (a Llama-shaped bf16 checkpoint of
``--params``, stored as ``magnitude`` 1% and as ``lossless``), each from the working directory
it is run in (run it inside two trees to compare them, as :mod:`bench.pull_probe` says):

- ``pull``: ``curl -o file``, ``slim pull`` (``SlimClient.pull``) and ``slim pull --local``
  (the base cached, the delta fetched again) of the same checkpoint taking turns ``--rounds``
  times; per round the rate, the client's CPU seconds (the SDK's process, or curl's as a
  child) and the API's CPU seconds. Writing to disk is where the SDK
  lost to curl on this host (1 MiB ``os.write`` calls; :data:`core.files.WRITE_SIZE`).
- ``first-byte``: ``--clients`` curl pulls of one weight file started together, ``--rounds``
  times, and three single pulls: time to first byte (p50 and max) and the aggregate rate.

Run: ``python -m bench.pull_cost pull|first-byte [--params 5e8] [--rounds 4]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from bench.llm_fixture import build
from bench.throughput import KEY, Stack, curl_get

METHODS = ("magnitude", "lossless")


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client_cpu() -> float:
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@contextmanager
def stored(params: float, workdir: Path) -> Iterator[tuple[Stack, dict[str, str]]]:
    """A fresh embedded stack holding the fixture's base and one checkpoint per method."""
    base, ft, _ = build(workdir, params)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        stack = Stack(Path(tmp) / "data")
        try:
            b = stack.store_base(base)
            ids = {m: stack.store_checkpoint(m, b, ft, m) for m in METHODS}
            yield stack, ids
        finally:
            stack.close()


def pull(args: argparse.Namespace) -> None:
    from client import SlimClient

    with (
        stored(args.params, args.workdir) as (stack, ids),
        tempfile.TemporaryDirectory(dir=args.workdir) as tmp,
    ):
        out = Path(tmp) / "out"
        auth = f"Authorization: Bearer {KEY}"
        with SlimClient(stack.url, KEY) as client:
            for m, c in ids.items():
                files = [f.path for f in client.checkpoint_files(c)]
                rates: dict[str, list[float]] = {
                    "curl -o file": [],
                    "slim pull": [],
                    "slim pull --local": [],
                }
                cache = Path(tmp) / "client-cache"
                client.pull_local(m, out, cache_dir=cache)  # the base cached, not timed
                for r in range(args.rounds):
                    for mode in rates:
                        shutil.rmtree(out, ignore_errors=True)
                        out.mkdir()
                        c0, s0, t0 = _client_cpu(), _cpu_of(stack.api.pid), time.perf_counter()
                        if mode == "slim pull":
                            n = client.pull(m, out).bytes_received
                        elif mode == "slim pull --local":  # the delta fetched again each time
                            shutil.rmtree(cache / "deltas", ignore_errors=True)
                            n = sum(
                                f.size for f in client.pull_local(m, out, cache_dir=cache).files
                            )
                        else:
                            n = sum(
                                curl_get(f"{stack.url}/v1/checkpoints/{c}/files/{f}",
                                         str(out / f.replace("/", "_")), auth)
                                for f in files
                            )  # fmt: skip
                        dt = time.perf_counter() - t0
                        rates[mode].append(n / dt / 1e6)
                        print(
                            f"{m} round {r + 1} {mode}: {n / dt / 1e6:.0f} MB/s, client CPU "
                            f"{_client_cpu() - c0:.2f} s, API CPU {_cpu_of(stack.api.pid) - s0:.2f}"
                            f" s, for {n / 1e9:.2f} GB",
                            flush=True,
                        )
                med = {k: statistics.median(v) for k, v in rates.items()}
                print(
                    f"{m}: medians {', '.join(f'{k} {v:.0f} MB/s' for k, v in med.items())}; "
                    f"slim pull / curl -o file {med['slim pull'] / med['curl -o file']:.2f}, "
                    f"--local / slim pull {med['slim pull --local'] / med['slim pull']:.2f}",
                    flush=True,
                )


def _timed_curl(url: str) -> tuple[float, int]:
    got = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-H", f"Authorization: Bearer {KEY}",
         "-w", "%{time_starttransfer} %{size_download}", url],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return float(got[0]), int(got[1])


def first_byte(args: argparse.Namespace) -> None:
    with stored(args.params, args.workdir) as (stack, ids):
        for m, c in ids.items():
            files = stack.client.get(f"/v1/checkpoints/{c}/files").json()["data"]
            weight = next(f["path"] for f in files if f["path"].endswith(".safetensors"))
            url = f"{stack.url}/v1/checkpoints/{c}/files/{weight}"
            _timed_curl(url)  # the delta and the base in the API's cache
            for r in range(args.rounds):
                t0 = time.perf_counter()
                with ThreadPoolExecutor(args.clients) as pool:
                    got = list(pool.map(_timed_curl, [url] * args.clients))
                wall = time.perf_counter() - t0
                firsts = sorted(g[0] for g in got)
                print(
                    f"{m} round {r + 1}: {args.clients} pulls, first byte p50 "
                    f"{statistics.median(firsts):.3f} s, max {firsts[-1]:.3f} s, aggregate "
                    f"{sum(g[1] for g in got) / wall / 2**20:.0f} MiB/s",
                    flush=True,
                )
            single = [_timed_curl(url)[0] for _ in range(3)]
            print(f"{m}: one pull alone, first byte {', '.join(f'{s:.4f}' for s in single)} s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("pull", "first-byte"))
    p.add_argument("--params", type=float, default=5e8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=16)
    cache = os.environ.get("SLIM_BENCH_CACHE")
    default = Path(cache) / "llm" if cache else Path(__file__).parent / "cache" / "llm"
    p.add_argument("--workdir", type=Path, default=default, help="fixture cache")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pull_cost", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    (pull if args.what == "pull" else first_byte)(args)


if __name__ == "__main__":
    main()

"""A quick A/B probe of the HTTP paths: ingest and curl pulls of one fixture, no compression grid.

Run it with two trees of the code to compare them side by side in one sitting, each from
inside its own tree (``python -m`` puts the working directory first on ``sys.path``, ahead of
PYTHONPATH, so running both from one directory runs that directory's code twice; the server
and worker are started from the same working directory)::

    cd /path/to/old && python -m bench.pull_probe --workdir /path/to/new/bench/cache/llm
    cd /path/to/new && python -m bench.pull_probe

Prints ingest MB/s (SDK client) and curl pull GB/s for ``magnitude`` (1% keep) and ``lossless``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.llm_fixture import build
from bench.throughput import Stack, rss_mb


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pull_probe")
    p.add_argument("--params", type=float, default=2e8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=str(Path(__file__).parent / "cache" / "llm"))
    args = p.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    base, ft, _ = build(root, args.params)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        s = Stack(Path(tmp) / "data")
        try:
            b = s.post("/v1/bases", json={"name": "base"})["id"]
            s.put_dir("bases", b, base)
            s.post(f"/v1/bases/{b}/commit")
            for method in ("magnitude", "lossless"):
                c = s.post(
                    "/v1/checkpoints",
                    json={"name": method, "base_id": b, "method": method, "keep": 0.01},
                )["id"]
                t = time.perf_counter()
                n = s.put_dir("checkpoints", c, ft)
                ingest = n / (time.perf_counter() - t) / 1e6
                job = s.wait_job(s.post(f"/v1/checkpoints/{c}/commit")["id"])
                if job["state"] != "succeeded":
                    raise SystemExit(f"{method} job failed: {job}")
                files = [
                    f["path"]
                    for f in s.client.get(f"/v1/checkpoints/{c}/files").json()["data"]
                    if f["path"].endswith(".safetensors")
                ]
                rates = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    n = sum(s.curl(f"/v1/checkpoints/{c}/files/{f}") for f in files)
                    rates.append(n / (time.perf_counter() - t) / 1e9)
                print(
                    f"{method}: ingest {ingest:.0f} MB/s; curl pull GB/s "
                    f"{' '.join(f'{r:.2f}' for r in rates)} (median {statistics.median(rates):.2f})",
                    flush=True,
                )
            print(f"peak RSS: api {rss_mb(s.api.pid):.0f} MB, worker {rss_mb(s.worker.pid):.0f} MB")
        finally:
            s.close()


if __name__ == "__main__":
    main()

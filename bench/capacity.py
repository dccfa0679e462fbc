"""Capacity model: a fleet sized from the figures measured on this machine.

Reads ``bench/results/throughput.json`` (per-core reconstruct, ingest, lossless ratio),
``bench/results/load.json`` (what many streams at once cost against one: CPU per byte and
memory per stream) and ``bench/results/fidelity.json`` (bits per parameter at the fidelity
goal) and prints the
model of ``docs/scaling.md`` for a scenario (default: 10,000 fine-tunes of a 7B base, 100
pulls a minute). Prices and service limits are list figures, stated in the output; nothing
here is measured except what the result files hold.

Run: ``python -m bench capacity [--finetunes 10000 --params 7e9 --pulls-per-minute 100]``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"

#: List prices and limits the model uses (stated in its output).
S3_GB_MONTH_USD = 0.023  # S3 Standard, first 50 TB/month, us-east-1 list price
S3_PUT_PER_1000_USD = 0.005
S3_GET_PER_1000_USD = 0.0004
S3_GET_PER_PREFIX_S = 5500
S3_PUT_PER_PREFIX_S = 3500
S3_MAX_PARTS = 10_000
PART_BYTES = 8 << 20  # storage.s3_store default part size
BLOB_PREFIXES = 256  # blobs live under sha256/<2 hex digits>/
NIC_GBIT = 25.0
NIC_UTILISATION = 0.8
PG_SIMPLE_QPS_PER_CORE = 5000  # indexed point queries, a conservative figure per core
QUERIES_PER_PULL = 6  # auth, checkpoint, files, base files, metrics-free path
#: GPU model for the searches (no GPU was lent to measure it; see docs/scaling.md).
GPU_EFFECTIVE_TFLOPS = 300.0  # bf16 dense, H100/H200 class at ~30-40 % utilisation
CALIBRATION_TOKENS = 192 * 128
SEARCH_EVALUATIONS = 150  # nps-seeded default budget (2 draws + 12 x 12 + hold-out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetunes", type=int, default=10_000)
    p.add_argument("--params", type=float, default=7e9, help="parameters of the base")
    p.add_argument("--pulls-per-minute", type=float, default=100.0)
    p.add_argument("--bits-per-param", type=float, default=None, help="default: fidelity.json")
    p.add_argument("--results", default=str(RESULTS))


def _measured(results: Path) -> dict[str, Any]:
    tp = json.loads((results / "throughput.json").read_text())
    size = max(tp["sizes"], key=lambda s: s["params"])
    cores = tp["machine"]["cpus"]
    out = {
        "source_params": size["params"],
        "cores": cores,
        "reconstruct_gbps_per_core": size["reconstruct_http_gbps"]["magnitude"] / cores,
        "reconstruct_lossless_gbps_per_core": size["reconstruct_http_gbps"]["lossless"] / cores,
        "ingest_mbps_per_core": size["ingest_mbps"] / cores,
        "lossless_ratio": size["compress"]["lossless"]["ratio"],
        "magnitude_compress_gbps_per_core": size["compress"]["magnitude"]["gbps"] / cores,
    }
    try:
        fid = json.loads((results / "fidelity.json").read_text())
        passing = [
            r["bits_per_param"]
            for t in fid["tasks"]
            for r in t["rows"]
            if r["normalised_accuracy"] >= 0.99 and r["gain_kept"] >= 0.95 and r["keep"]
        ]
        out["bits_per_param"] = min(passing) if passing else None
    except (OSError, KeyError, json.JSONDecodeError):
        out["bits_per_param"] = None
    return out


def _concurrency(results: Path) -> dict[str, Any]:
    """From load.json (the PostgreSQL + S3 stack where it ran, else the embedded one): how
    much more CPU a byte costs with N streams at once than alone, and the memory one more
    stream adds to an API process. Without the file: no penalty and ~30 MB a stream."""
    out: dict[str, Any] = {
        "streams": 1,
        "efficiency": {"magnitude": 1.0, "lossless": 1.0, "upload": 1.0},
        "rss_single_mb": 430.0,
        "rss_per_stream_mb": 30.0,
        "source": None,
    }
    try:
        load = json.loads((results / "load.json").read_text())
    except (OSError, json.JSONDecodeError):
        return out
    stacks = {s["stack"]: s for s in load.get("stacks", [])}
    stack = stacks.get("pg-s3") or stacks.get("embedded")
    if stack is None:
        return out

    def eff(pair: dict[str, Any]) -> float:
        one, many = pair["one"]["api_cpu_s_per_gib"], pair["many"]["api_cpu_s_per_gib"]
        return min(1.0, one / many) if one and many else 1.0

    pulls = stack["pulls"]
    for method, pair in pulls.items():
        out["efficiency"][method] = eff(pair)
    if stack.get("uploads"):
        out["efficiency"]["upload"] = eff(stack["uploads"])
    pair = pulls.get("magnitude") or next(iter(pulls.values()))
    n = pair["many"]["clients"]
    out["streams"] = n
    out["rss_single_mb"] = pair["one"]["api_peak_rss_mib"] * 1.048576
    grown = max(
        p["many"]["api_peak_rss_mib"] - p["one"]["api_peak_rss_mib"] for p in pulls.values()
    )
    out["rss_per_stream_mb"] = grown * 1.048576 / max(n - 1, 1)
    out["source"] = f"load.json, stack {stack['stack']}, {load['when']}"
    return out


def model(args: argparse.Namespace) -> dict[str, Any]:
    m = _measured(Path(args.results))
    conc = _concurrency(Path(args.results))
    eff = conc["efficiency"]
    bpp = args.bits_per_param or m["bits_per_param"] or 0.1
    full_bytes = args.params * 2  # bf16
    delta_bytes = args.params * bpp / 8
    lossless_bytes = full_bytes / m["lossless_ratio"]
    n = args.finetunes
    pulls_s = args.pulls_per_minute / 60
    egress_gbs = pulls_s * full_bytes / 1e9
    local_gbs = pulls_s * delta_bytes / 1e9
    # cores of API that many streams at once need: the single-stream rate per core, times the
    # CPU-per-byte penalty of serving many streams from one process (load.json)
    api_cores = egress_gbs / (m["reconstruct_gbps_per_core"] * eff["magnitude"])
    api_cores_lossless = egress_gbs / (m["reconstruct_lossless_gbps_per_core"] * eff["lossless"])
    nic_gbs = NIC_GBIT / 8 * NIC_UTILISATION
    gets_per_pull_cached = math.ceil(delta_bytes / PART_BYTES)
    gets_per_pull_uncached = gets_per_pull_cached + math.ceil(full_bytes / PART_BYTES)
    flops_eval = 2 * args.params * CALIBRATION_TOKENS
    gpu_s = SEARCH_EVALUATIONS * flops_eval / (GPU_EFFECTIVE_TFLOPS * 1e12)
    return {
        "scenario": {
            "finetunes": n,
            "params": args.params,
            "pulls_per_minute": args.pulls_per_minute,
            "bits_per_param": bpp,
        },
        "measured": m,
        "concurrency": conc,
        "storage": {
            "full_copies_tb": n * full_bytes / 1e12,
            "lossless_tb": (full_bytes + n * lossless_bytes) / 1e12,
            "sparse_tb": (full_bytes + n * delta_bytes) / 1e12,
            "full_copies_usd_month": n * full_bytes / 1e9 * S3_GB_MONTH_USD,
            "lossless_usd_month": (full_bytes + n * lossless_bytes) / 1e9 * S3_GB_MONTH_USD,
            "sparse_usd_month": (full_bytes + n * delta_bytes) / 1e9 * S3_GB_MONTH_USD,
            "delta_mb": delta_bytes / 1e6,
            "parts_per_full_shard_max_gib": S3_MAX_PARTS * PART_BYTES / 2**30,
        },
        "pulls": {
            "egress_gb_s": egress_gbs,
            "egress_gbit_s": egress_gbs * 8,
            "api_cores": api_cores,
            "api_cores_lossless": api_cores_lossless,
            "api_mb_per_process_at_measured_streams": conc["rss_single_mb"]
            + (conc["streams"] - 1) * conc["rss_per_stream_mb"],
            "api_nodes_by_nic": egress_gbs / nic_gbs,
            "local_pull_gb_s": local_gbs,
            "s3_get_s_base_cached": pulls_s * gets_per_pull_cached,
            "s3_get_s_base_uncached": pulls_s * gets_per_pull_uncached,
            "s3_get_limit_s": S3_GET_PER_PREFIX_S * BLOB_PREFIXES,
            "pg_qps": pulls_s * QUERIES_PER_PULL,
        },
        "searches": {
            "gpu_seconds_per_search": gpu_s,
            "gpu_hours_all": n * gpu_s / 3600,
            "ingest_core_hours_all": n
            * full_bytes
            / (m["ingest_mbps_per_core"] * eff["upload"] * 1e6)
            / 3600,
            "sparse_compress_core_hours_all": n
            * full_bytes
            / (m["magnitude_compress_gbps_per_core"] * 1e9)
            / 3600,
        },
    }


def main(args: argparse.Namespace) -> int:
    print(json.dumps(model(args), indent=1))
    return 0

"""One table of GPU figures: NPS search on MiniLM and throughput at 1 B params, on ``cuda``.

Run by ``bench/gpu_check.sh`` on a machine with a GPU (it must finish in under 8 minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def nps_search(device: str, generations: int) -> dict[str, float]:
    from bench.data import load_task
    from bench.fidelity import TestHarness, calibration
    from bench.finetune import base_model_dir, full_recipe, make_finetune
    from core.compress import build_evaluator, compress
    from core.reconstruct import load_state
    from core.workspace import Workspace

    task = "rotten_tomatoes"
    ft = make_finetune(full_recipe(task))
    base = base_model_dir()
    with Workspace(base, ft) as ws:
        ev = build_evaluator(
            "fidelity", ws, ft, calibration(task, 384, False), device=device, calibration_limit=384
        )
    out = {}
    for method in ("nps", "nps-seeded"):
        t = time.perf_counter()
        r = compress(
            base,
            ft,
            f"/tmp/gpu-{method}.slim",
            method=method,
            keep=0.01,
            value_bits=4,
            evaluation="fidelity",
            options={"generations": generations},
            evaluator=ev,
            device=device,
        )
        out[f"{method}_search_s"] = r.search_seconds
        out[f"{method}_total_s"] = time.perf_counter() - t
        out[f"{method}_evaluations"] = r.evaluations
        out[f"{method}_bits_per_param"] = r.bits_per_param
        h = TestHarness(ft, list(load_task(task).test))
        out[f"{method}_test_acc"] = h.accuracy(load_state(base, f"/tmp/gpu-{method}.slim"))
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    row = {"device": torch.cuda.get_device_name(0)} | nps_search("cuda", args.generations)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

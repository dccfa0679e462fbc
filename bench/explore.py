"""Exploratory measurements behind bench/NOTES.md that are not rows of the fidelity grid.

``python -m bench.explore row-rates TASK --keep 0.025 --bits 3 --gammas 0,0.5,1 --seeds 0,1,2``
    Seeded selection with a keep rate per row, p_row ∝ rms(τ_row)^γ (each tensor keeps its
    DARE budget r·numel; γ = 0 is DARE). The decoder knows rows, so positions stay free; each
    row's rate costs a 1/4-octave code (zstd'd, counted as ``rate_bpp``). Values are rescaled
    by 1/p_row and quantised per tensor as the delta would store them.

``python -m bench.explore draws TASK --keep 0.025 --bits 3 --seeds 12``
    DARE's draws against the label-free KL fitness on the 128 calibration texts and on 768
    more validation texts: does the fitness pick the draw that does best on the test split?

Both print one JSON line per point and append them to ``bench/results/explore-*.jsonl``.
The fine-tunes are the benchmark's (``bench/finetune.py``); test accuracy on the full split.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from bench.data import load_task
from bench.fidelity import DEFAULT_CALIBRATION, RESULTS, TestHarness
from bench.finetune import base_model_dir, full_recipe, make_finetune
from core import codec, rng
from core.compress import compress
from core.evaluate import Example as CalExample
from core.evaluate import ModelEvaluator
from core.reconstruct import load_state
from core.tensor_codec import ValueSpec
from core.workspace import Workspace


def _record(name: str, row: dict[str, Any], started: float) -> None:
    print(json.dumps(row), f"{time.time() - started:.1f}s", flush=True)
    with open(RESULTS / f"explore-{name}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def row_rates(tau: torch.Tensor, shape: tuple[int, ...], gamma: float, budget: float) -> tuple:
    """Per-row keep rates ∝ rms(τ_row)^γ with Σ cols·p_row = budget, as stored: a 1/4-octave
    code q per row, p = 2^(−q/4). Returns (rates # (rows,), codes # (rows,) uint8)."""
    rows = shape[0] if len(shape) == 2 else 1
    t = tau.reshape(rows, -1)
    w = (t.pow(2).mean(1).sqrt().double().numpy() + 1e-30) ** gamma
    cols = t.shape[1]
    lo, hi = 0.0, 1.0 / w.min()
    for _ in range(200):
        mid = (lo + hi) / 2
        if (cols * np.minimum(1, mid * w)).sum() < budget:
            lo = mid
        else:
            hi = mid
    q = np.clip(np.round(-4 * np.log2(np.minimum(1, hi * w))), 0, 255).astype(np.uint8)
    return 2.0 ** (-q.astype(np.float64) / 4), q


def explore_row_rates(args: argparse.Namespace) -> None:
    task = load_task(args.task)
    ft, base = make_finetune(full_recipe(args.task)), base_model_dir()
    harness = TestHarness(ft, list(task.test))
    acc_ft = harness.accuracy()
    params = sum(v.numel() for v in harness.original.values())
    with Workspace(base, ft) as ws:
        taus = ws.load_taus()
        plans = {p.name: p for p in ws.delta_plans}
        base_v = {n: ws.base.get(plans[n].base_name).reshape(-1).float() for n in taus}
    for gamma in args.gammas:
        for seed in args.seeds:
            t0 = time.time()
            state = {k: v.clone() for k, v in harness.original.items()}
            value_bytes = rate_bytes = kept = 0
            for n, tau in taus.items():
                shape = plans[n].shape
                p, q = row_rates(tau, shape, gamma, args.keep * tau.numel())
                p_entry = torch.from_numpy(np.repeat(p, tau.numel() // len(p))).float()
                u = torch.from_numpy(rng.uniforms(rng.tensor_key(seed, n), tau.numel()))
                idx = torch.nonzero(u < p_entry).squeeze(1)
                spec = ValueSpec.from_bits(args.bits, plans[n].dtype)
                values = spec.round(tau[idx] / p_entry[idx])
                value_bytes += len(codec.encode_values(values, spec.coding, spec.bits)[0])
                if len(p) > 1 and gamma:
                    rate_bytes += len(zstandard.ZstdCompressor(level=19).compress(q.tobytes()))
                kept += idx.numel()
                delta = torch.zeros_like(tau)
                delta[idx] = values
                state[n] = (base_v[n] + delta).reshape(shape).to(state[n].dtype)
            acc = harness.accuracy(state)
            row = {
                "task": args.task,
                "keep": args.keep,
                "bits": args.bits,
                "gamma": gamma,
                "seed": seed,
                "kept": kept,
                "value_bpp": 8 * value_bytes / params,
                "rate_bpp": 8 * rate_bytes / params,
                "acc": acc,
                "norm": acc / acc_ft,
            }
            _record("row-rates", row, t0)


def explore_draws(args: argparse.Namespace) -> None:
    task = load_task(args.task)
    ft, base = make_finetune(full_recipe(args.task)), base_model_dir()
    harness = TestHarness(ft, list(task.test))
    acc_ft = harness.accuracy()
    val = list(task.validation)
    random.Random(f"calibration-{args.task}").shuffle(val)  # as bench.fidelity.calibration
    n = DEFAULT_CALIBRATION
    cal = [CalExample(e.text, None) for e in val[:n]]
    more = [CalExample(e.text, None) for e in val[n : n + 768]]
    with Workspace(base, ft) as ws:
        ev = ModelEvaluator("fidelity", ft, ws.base, ws.plans, cal, holdout=more)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d.slim"
        for seed in range(args.seeds):
            t0 = time.time()
            compress(base, ft, out, method="dare", keep=args.keep, value_bits=args.bits, seed=seed)
            state = load_state(base, out)
            for name in ev.tensor_names:
                ev.apply(name, state[name].reshape(-1).float() - ev._base[name])
            a, b = ev.run("search"), ev.run("holdout")
            acc = harness.accuracy(state)
            row = {
                "task": args.task,
                "keep": args.keep,
                "bits": args.bits,
                "seed": seed,
                f"kl{n}": a.metrics["kl"],
                "kl768": b.metrics["kl"],
                "acc": acc,
                "norm": acc / acc_ft,
            }
            _record("draws", row, t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.explore")
    sub = ap.add_subparsers(dest="what", required=True)
    rows = sub.add_parser("row-rates")
    draws = sub.add_parser("draws")
    for p in (rows, draws):
        p.add_argument("task")
        p.add_argument("--keep", type=float, default=0.025)
        p.add_argument("--bits", type=int, default=3)
        p.add_argument("--threads", type=int, default=2)
    rows.add_argument("--gammas", type=lambda s: [float(x) for x in s.split(",")], default=[0, 1])
    rows.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    draws.add_argument("--seeds", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"row-rates": explore_row_rates, "draws": explore_draws}[args.what](args)


if __name__ == "__main__":
    main()

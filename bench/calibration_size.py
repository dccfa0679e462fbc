"""How many calibration examples does a search need? Ranking stability against a large set.

Draws ``--candidates`` nps-seeded candidates (random log-rates and log-scales around the DARE
start, tensor-group subspaces, keep 1%, 4-bit values) on a real fine-tune, scores each once on
``--max`` validation examples, keeping every example's KL to the fine-tune, and then ranks the
candidates by the mean KL over nested subsets of n examples. Reports Spearman's ρ against the
ranking on all ``--max`` examples, and the seconds one evaluation takes at each n.

Run: ``python -m bench calibration [--task rotten_tomatoes] [--candidates 12] [--max 768]``.
Outputs ``bench/results/calibration_size.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
SIZES = (32, 64, 96, 128, 192, 256, 384, 512)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--candidates", type=int, default=12)
    p.add_argument("--max", type=int, default=768)
    p.add_argument("--keep", type=float, default=0.01)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def per_example_kl(ev: Any) -> np.ndarray:
    """KL(fine-tune ‖ candidate) of every search example, in the examples' order."""
    part = ev._parts["search"]
    outs = ev._forward_all(part.batches)
    kl = np.zeros(part.n)
    for o, r, batch in zip(outs, part.reference, part.batches, strict=True):
        k = (r["logp"].exp() * (r["logp"] - o["logp"])).sum(-1)
        kl[batch["_index"].numpy()] = k.cpu().numpy()
    return kl


def main(args: argparse.Namespace) -> int:
    from bench.fidelity import calibration, machine_note
    from bench.finetune import base_model_dir, full_recipe, make_finetune
    from core.evaluate import ModelEvaluator
    from core.methods import FitContext
    from core.methods.nps_seeded import NpsSeeded
    from core.tensor_codec import ValueSpec
    from core.workspace import Workspace

    torch.set_num_threads(2)
    ft = make_finetune(full_recipe(args.task))
    base = base_model_dir()
    examples = calibration(args.task, args.max, labels=False)
    rng = np.random.default_rng(0)
    with Workspace(base, ft) as ws:
        ev = ModelEvaluator("fidelity", ft, ws.base, ws.plans, examples)
        method = NpsSeeded(keep=args.keep, generations=0, seed_trials=1)
        ctx = FitContext(keep=args.keep, value_bits=4, evaluator=ev)
        fitted = method.fit(ws, ctx)
        m = len(fitted.result["subspaces"])
        kls = []
        for _ in range(args.candidates):
            x = rng.normal(0, 0.7, 2 * m)
            fitted.rates, fitted.scales = _rates_scales(x, fitted.result["sizes"], args.keep)
            for plan in ws.delta_plans:
                spec = ValueSpec.from_bits(4, plan.dtype)
                sel = fitted.select(plan, ws.tau(plan), spec)
                ev.apply_sparse(plan.name, torch.from_numpy(sel.positions), spec.round(sel.values))
            kls.append(per_example_kl(ev))
        kl = np.stack(kls)  # (candidates, max)
        full = kl.mean(1)
        rows = []
        for n in (s for s in SIZES if s < args.max):
            rhos = []
            for rep in range(20):  # several subsets of each size
                idx = np.random.default_rng(rep).choice(args.max, n, replace=False)
                rhos.append(_spearman(kl[:, idx].mean(1), full))
            sub = ModelEvaluator("fidelity", ft, ws.base, ws.plans, examples[:n])
            t = time.perf_counter()
            for _ in range(3):
                sub.run()
            seconds = (time.perf_counter() - t) / 3
            rows.append(
                {
                    "n": n,
                    "spearman_median": float(np.median(rhos)),
                    "spearman_min": float(np.min(rhos)),
                    "seconds_per_evaluation": seconds,
                }
            )
            print(rows[-1], flush=True)
    result = {
        "command": "python -m bench calibration",
        "machine": machine_note(),
        "task": args.task,
        "candidates": args.candidates,
        "max": args.max,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration_size.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        "# Calibration size: ranking stability",
        "",
        f"Task {args.task}; {args.candidates} nps-seeded candidates (keep {args.keep}, 4-bit) ranked "
        f"by mean KL on n examples vs on {args.max}; 20 random subsets per n.",
        "",
        "| n | Spearman ρ median | ρ min | s / evaluation |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {r['n']} | {r['spearman_median']:.3f} | {r['spearman_min']:.3f} | {r['seconds_per_evaluation']:.2f} |"
        for r in rows
    ]
    (RESULTS / "calibration_size.md").write_text("\n".join(md) + "\n")
    return 0


def _rates_scales(x: np.ndarray, sizes: list[float], keep: float) -> tuple[np.ndarray, np.ndarray]:
    from core.methods.nps_seeded import budget_rates

    m = len(sizes)
    s = np.asarray(sizes, dtype=float)
    rho = budget_rates(x[:m], s, keep * s.sum())
    return rho, np.exp(x[m:]) / np.maximum(rho, 1e-12)

"""Exploratory measurements behind bench/NOTES.md that are not rows of the fidelity grid.

``python -m bench.explore row-rates TASK --keep 0.025 --bits 3 --gammas 0,0.5,1 --seeds 0,1,2``
    Seeded selection with a keep rate per row, p_row ∝ rms(τ_row)^γ (each tensor keeps its
    DARE budget r·numel; γ = 0 is DARE). The decoder knows rows, so positions stay free; each
    row's rate costs a 1/4-octave code (zstd'd, counted as ``rate_bpp``). Values are rescaled
    by 1/p_row and quantised per tensor as the delta would store them.

``python -m bench.explore draws TASK --keep 0.025 --bits 3 --seeds 12``
    DARE's draws against the label-free KL fitness on the 128 calibration texts and on 768
    more validation texts: does the fitness pick the draw that does best on the test split?

``python -m bench.explore points TASK --point 'nps-seeded 0.04 2 0' 'dare 0.04 2 0' ...``
    Points off the fidelity grids (method, keep, value bits, seed), measured as the grids
    measure theirs (``bench.fidelity.run_task``: the delta written in today's format, the
    whole test split; searched methods on the label-free fidelity fitness).

Each prints one JSON line per point and appends them to ``bench/results/explore-*.jsonl``.
The fine-tunes are the benchmark's (``bench/finetune.py``); test accuracy on the full split.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data import load_task
from bench.fidelity import (
    DEFAULT_CALIBRATION,
    PRECISIONS,
    RESULTS,
    Series,
    TestHarness,
    calibration,
    run_task,
    tasks_grid,
)
from bench.finetune import base_model_dir, full_recipe, make_finetune
from core import rng
from core.compress import compress
from core.evaluate import ModelEvaluator, score_with
from core.frames import zstd_compress
from core.methods.nps_seeded import budget_rates
from core.reconstruct import load_state
from core.taskvector import TensorPlan
from core.tensor_codec import ValueSpec
from core.values import encode_values
from core.workspace import Workspace

#: Validation texts beyond the calibration set that the draws are also scored on.
MORE_TEXTS = 768


@dataclass
class Fixture:
    """One task's benchmark fine-tune: its test harness, τ and base values of its tensors."""

    task: str
    ft: Path
    base: Path
    harness: TestHarness
    acc_ft: float
    plans: dict[str, TensorPlan]
    taus: dict[str, torch.Tensor]  # flat float32
    base_values: dict[str, torch.Tensor]  # flat float32

    @classmethod
    def load(cls, task: str) -> Fixture:
        ft, base = make_finetune(full_recipe(task)), base_model_dir()
        harness = TestHarness(ft, list(load_task(task).test))
        with Workspace(base, ft) as ws:
            plans = {p.name: p for p in ws.delta_plans}
            taus = ws.load_taus()
            base_values = {
                n: ws.base.get(p.base_name).reshape(-1).float()
                for n, p in plans.items()
                if p.base_name is not None
            }
        return cls(task, ft, base, harness, harness.accuracy(), plans, taus, base_values)

    def record(
        self,
        name: str,
        args: argparse.Namespace,
        fields: dict[str, Any],
        acc: float,
        started: float,
    ) -> None:
        """Print one point and append it to ``results/explore-<name>.jsonl``."""
        row = {"task": self.task, "keep": args.keep, "bits": args.bits, **fields}
        row |= {"acc": acc, "norm": acc / self.acc_ft}
        print(json.dumps(row), f"{time.time() - started:.1f}s", flush=True)
        with open(RESULTS / f"explore-{name}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def row_rates(
    tau: torch.Tensor, shape: tuple[int, ...], gamma: float, budget: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row keep rates ∝ rms(τ_row)^γ with Σ cols·p_row = budget, as stored: a 1/4-octave
    code q per row, p = 2^(−q/4). Returns (rates # (rows,), codes # (rows,) uint8)."""
    rows = shape[0] if len(shape) == 2 else 1
    t = tau.reshape(rows, -1)
    rms = t.pow(2).mean(1).sqrt().double().numpy() + 1e-30
    rho = budget_rates(gamma * np.log(rms), np.full(rows, float(t.shape[1])), budget)
    q = np.clip(np.round(-4 * np.log2(rho)), 0, 255).astype(np.uint8)
    return 2.0 ** (-q.astype(np.float64) / 4), q


def explore_row_rates(args: argparse.Namespace) -> None:
    fx = Fixture.load(args.task)
    params = sum(v.numel() for v in fx.harness.original.values())
    for gamma in args.gammas:
        for seed in args.seeds:
            t0 = time.time()
            state = dict(fx.harness.original)  # the delta tensors are replaced below
            value_bytes = rate_bytes = kept = 0
            for n, tau in fx.taus.items():
                shape = fx.plans[n].shape
                p, q = row_rates(tau, shape, gamma, args.keep * tau.numel())
                p_entry = torch.from_numpy(np.repeat(p, tau.numel() // len(p))).float()
                u = torch.from_numpy(rng.uniforms(rng.tensor_key(seed, n), tau.numel()))
                idx = torch.nonzero(u < p_entry).squeeze(1)
                spec = ValueSpec.from_bits(args.bits, fx.plans[n].dtype)
                values = spec.round(tau[idx] / p_entry[idx])
                value_bytes += len(encode_values(values, spec.coding, spec.bits)[0])
                if len(p) > 1 and gamma:
                    rate_bytes += len(zstd_compress(q.tobytes(), 19))
                kept += idx.numel()
                rebuilt = fx.base_values[n].clone()
                rebuilt[idx] += values
                state[n] = rebuilt.reshape(shape).to(state[n].dtype)
            fields = {
                "gamma": gamma,
                "seed": seed,
                "kept": kept,
                "value_bpp": 8 * value_bytes / params,
                "rate_bpp": 8 * rate_bytes / params,
            }
            fx.record("row-rates", args, fields, fx.harness.accuracy(state), t0)


def explore_draws(args: argparse.Namespace) -> None:
    fx = Fixture.load(args.task)
    n = DEFAULT_CALIBRATION
    texts = calibration(args.task, n + MORE_TEXTS, labels=False)  # the benchmark's first n
    with Workspace(fx.base, fx.ft) as ws:
        ev = ModelEvaluator("fidelity", fx.ft, ws.base, ws.plans, texts[:n], holdout=texts[n:])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d.slim"
        for seed in range(args.seeds):
            t0 = time.time()
            compress(
                fx.base, fx.ft, out, method="dare", keep=args.keep, value_bits=args.bits, seed=seed
            )
            state = load_state(fx.base, out)
            a = score_with(
                ev, lambda name, s=state: s[name].reshape(-1).float() - fx.base_values[name]
            )
            b = ev.run("holdout")  # the same candidate, still written into the model
            fields = {"seed": seed, f"kl{n}": a.metrics["kl"], f"kl{MORE_TEXTS}": b.metrics["kl"]}
            fx.record("draws", args, fields, fx.harness.accuracy(state), t0)


def point_series(spec: str) -> Series:
    """``"method keep bits seed"`` as a one-point series, evaluated as the tasks grid's series
    of that method are (searched methods on the label-free fidelity fitness)."""
    evaluation = {s.method: s.evaluation for s in tasks_grid()}
    try:
        method, keep, bits, seed = spec.split()
        point = (float(keep),), (int(bits),), (int(seed),)
    except ValueError:
        raise SystemExit(f"a point is 'method keep bits seed', not {spec!r}") from None
    if method not in evaluation:
        raise SystemExit(f"unknown method {method!r}; known: {sorted(evaluation)}")
    return Series(f"{method} {keep}/{bits}", method, *point, evaluation[method])


def explore_points(args: argparse.Namespace) -> None:
    grid = [point_series(spec) for spec in args.point]
    with tempfile.TemporaryDirectory() as tmp:
        result = run_task(
            args.task,
            grid,
            n_cal=DEFAULT_CALIBRATION,
            workdir=Path(tmp),
            log=lambda msg: print(msg, flush=True),
            precision=args.precision,
        )
    with open(RESULTS / "explore-points.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in point_rows(result))


def point_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """``run_task``'s rows, each keyed by the result's task (a row names the task alone; the
    result's key also names the precision: ``"wordnet_nouns (bf16 cast)"``)."""
    return [{**row, "task": result["task"]} for row in result["rows"]]


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
    points = sub.add_parser("points")
    points.add_argument("task")
    points.add_argument("--point", nargs="+", required=True, help="'method keep bits seed'")
    points.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    points.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = {"row-rates": explore_row_rates, "draws": explore_draws, "points": explore_points}
    run[args.what](args)


if __name__ == "__main__":
    main()

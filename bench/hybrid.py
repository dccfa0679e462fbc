"""The ``hybrid`` codec (low rank + DARE residual) against DARE and ``nps-seeded`` at equal bits.

A focused slice of the fidelity grid (``bench/fidelity.py``: the same harness, test split,
bits/param as stored) at 0.04–0.06 bits/param, plus the energy spectrum of the fine-tune's
matrices: the share of ‖τ‖² its leading 1, 2, 4 and 8 singular directions hold, and what the
hybrid chose per matrix.

Run: ``python -m bench.hybrid [--recipe full|tiny] [--tasks ...] [--seeds 0 1]``.
Outputs ``bench/results/hybrid.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.fidelity import RESULTS, Series, machine_note, run_task
from bench.finetune import Recipe, base_model_dir, full_recipe, make_finetune
from core.methods.hybrid import MIN_SIDE
from core.workspace import Workspace

#: The tiny recipe of the tests (50 steps, tests/fixtures.py): ready when the full
#: fine-tunes are not.
TINY_STEPS, TINY_SUBSET = 50, 3000
RANKS = (1, 2, 4, 8)
KEEPS = (0.015, 0.02)


def grid(seeds: tuple[int, ...], searched: bool, keeps: tuple[float, ...] = KEEPS) -> list[Series]:
    """Equal-bit pairs at 2-bit values around 0.04–0.06 bits/param."""
    rows = [
        Series("dare", "dare", keeps, (2,), seeds),
        Series("hybrid", "hybrid", keeps, (2,), seeds),
    ]
    if searched:
        rows += [
            Series("nps-seeded", "nps-seeded", (0.02,), (2,), seeds[:1], "fidelity"),
            Series("hybrid-seeded", "hybrid-seeded", (0.02,), (2,), seeds[:1], "fidelity"),
        ]
    return rows


def spectrum(base: Path, ft: Path) -> list[dict[str, Any]]:
    """Per matrix (both sides ≥ MIN_SIDE): the share of ‖τ‖² in the leading directions."""
    out = []
    with Workspace(base, ft) as ws:
        for plan, tau in ws.iter_taus():
            if len(plan.shape) != 2 or min(plan.shape) < MIN_SIDE:
                continue
            t = tau.reshape(plan.shape).double()
            s2 = torch.linalg.svdvals(t) ** 2
            share = torch.cumsum(s2, 0) / s2.sum()
            out.append(
                {
                    "tensor": plan.name,
                    "shape": list(plan.shape),
                    **{f"r{r}": round(float(share[r - 1]), 4) for r in RANKS},
                }
            )
    return out


def write(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "hybrid.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = [
        "# `hybrid` (low rank + DARE residual) at equal bits",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}; {results.get('load', 'host load not recorded')}  ",
        f"Wall time: {results.get('seconds', 0) / 60:.1f} min",
        "",
    ]
    for t in results["tasks"]:
        lines += [
            f"## {t['task']} ({t['recipe'].get('recipe', {}).get('steps')} steps)",
            "",
            f"Fine-tuned {t['fine_tuned_accuracy']:.4f}, τ removed {t['removed_accuracy']:.4f}, "
            f"test n = {t['test_examples']}. Per seed:",
            "",
            "| series | keep | bits | seed | bits/param | test acc | norm. acc | gain kept |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(t["rows"], key=lambda r: (r["bits_per_param"], r["series"])):
            lines.append(
                f"| {r['series']} | {r['keep']} | {r['value_bits']} | {r['seed']} | "
                f"{r['bits_per_param']:.4f} | {r['test_accuracy']:.4f} | "
                f"{r['normalised_accuracy']:.4f} | {r['gain_kept']:.3f} |"
            )
        spec = t.get("spectrum", [])
        if spec:
            lines += [
                "",
                "Share of ‖τ‖² in the leading singular directions (median over the matrices "
                "of each kind):",
                "",
                "| matrices | n | " + " | ".join(f"rank {r}" for r in RANKS) + " |",
                "|---|---|" + "---|" * len(RANKS),
            ]
            kinds: dict[str, list[dict[str, Any]]] = {}
            for s in spec:
                kind = ".".join(p for p in s["tensor"].split(".")[-3:-1] if not p.isdigit())
                kinds.setdefault(kind, []).append(s)
            for kind, ss in sorted(kinds.items()):
                med = [statistics.median(s[f"r{r}"] for s in ss) for r in RANKS]
                lines.append(
                    f"| {kind} | {len(ss)} | " + " | ".join(f"{m:.3f}" for m in med) + " |"
                )
        lines.append("")
    (out_dir / "hybrid.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hybrid")
    ap.add_argument("--recipe", choices=("full", "tiny"), default="full")
    ap.add_argument("--tasks", nargs="+", default=["rotten_tomatoes"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--no-searched", action="store_true", help="skip the nps-seeded row")
    ap.add_argument("--series", nargs="+", help="measure only these series")
    ap.add_argument("--keeps", nargs="+", type=float, default=list(KEEPS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = "python -m bench.hybrid " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    results: dict[str, Any] = {"command": cmd.strip(), "machine": machine_note(), "tasks": []}
    t0 = time.time()
    load0 = os.getloadavg()[0]
    log_path = args.out / "hybrid.log"
    with open(log_path, "a") as logf, tempfile.TemporaryDirectory() as tmp:

        def log(msg: str) -> None:
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        for task in args.tasks:
            recipe = (
                Recipe(task=task, steps=TINY_STEPS, train_subset=TINY_SUBSET, seed=0)
                if args.recipe == "tiny"
                else full_recipe(task)
            )
            ft = make_finetune(recipe)
            spec = spectrum(base_model_dir(), ft)
            log(f"[{task}] spectrum of {len(spec)} matrices done")

            def save(partial: dict[str, Any], spec: list[dict[str, Any]] = spec) -> None:
                results["seconds"] = time.time() - t0
                write(
                    dict(results, tasks=[*results["tasks"], dict(partial, spectrum=spec)]), args.out
                )

            summary = run_task(
                task,
                grid(tuple(args.seeds), not args.no_searched, tuple(args.keeps)),
                n_cal=128,
                workdir=Path(tmp),
                log=log,
                save=save,
                recipe=recipe,
                measure=set(args.series) if args.series else None,
            )
            results["tasks"].append(dict(summary, spectrum=spec))
            results["seconds"] = time.time() - t0
            results["load"] = (
                f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
            )
            write(results, args.out)


if __name__ == "__main__":
    main()

"""Benchmarks: ``python -m bench fidelity|throughput|load [options]``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench.data import TASKS

#: subcommand -> module under bench/
MODULES = {
    "throughput": "throughput",
    "load": "load",
    "faults": "faults",
    "calibration": "calibration_size",
    "capacity": "capacity",
    "lora": "lora",
    "causal-lm": "causal_lm",
    "document-size": "document_size",
    "lossless-bf16": "lossless_bf16",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("fidelity", help="accuracy vs stored bits on real fine-tunes")
    p.add_argument("--quick", action="store_true", help="one task, fewer points, one seed")
    p.add_argument(
        "--grid",
        choices=["full", "tasks", "quick"],
        default=None,
        help="full: every keep/preset on the shared tasks (default); tasks: every method at "
        "0.04-0.1 bits/param on the multi-class tasks; quick: as --quick",
    )
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS))
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "bf16-trained"],
        default="fp32",
        help="bf16: the bf16 casts of the fine-tunes and of the base; bf16-trained: the "
        "fine-tunes trained with bf16 autocast, then cast",
    )
    p.add_argument(
        "--calibration",
        type=int,
        default=None,
        help="validation examples for the fitness (default: bench.fidelity.DEFAULT_CALIBRATION)",
    )
    p.add_argument("--fresh", action="store_true", help="measure every row again (default: resume)")
    p.add_argument("--series", nargs="+", default=None, help="run only these series (labels)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (per task run)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    for name, module_name in MODULES.items():
        try:
            module = importlib.import_module(f"bench.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{module_name}":
                raise
            continue
        module.add_arguments(
            sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else name)
        )
    args = parser.parse_args(argv)
    if args.name == "fidelity":
        from bench.fidelity import DEFAULT_CALIBRATION, run

        run(
            args.quick,
            args.tasks,
            n_cal=args.calibration or DEFAULT_CALIBRATION,
            fresh=args.fresh,
            series=args.series,
            threads=args.threads,
            grid_name=args.grid,
            precision=args.precision,
            **({"out_dir": args.out} if args.out else {}),
        )
        return 0
    module = importlib.import_module(f"bench.{MODULES[args.name]}")
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

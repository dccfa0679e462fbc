"""Offline verbs (no server): compress, reconstruct, merge, inspect."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Choices are spelled out here so `slim --help` and client verbs start without importing torch;
# tests/core/test_cli_offline.py checks they match the core's registries.
METHODS = ("nps", "nps-seeded", "magnitude", "magnitude-scaled", "dare", "lossless")
VALUE_BITS = (32, 16, 8, 4, 3, 2, 1)
EVAL_KINDS = ("fidelity", "accuracy", "weights")
MERGE_METHODS = ("task_arithmetic", "ties")

HEADLINE = (
    "method",
    "keep",
    "value_bits",
    "stored_bytes",
    "original_bytes",
    "ratio",
    "bits_per_param",
    "fitness_before",
    "fitness_after",
    "search_seconds",
    "evaluations",
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("compress", help="compress a fine-tune against its base into a delta file")
    p.add_argument("base_dir")
    p.add_argument("finetuned_dir")
    p.add_argument("-o", "--output", required=True, help="delta file to write")
    p.add_argument("--method", default="nps", choices=[*METHODS, "auto"])
    p.add_argument("--keep", type=float, default=0.01, help="keep ratio r (default 0.01)")
    p.add_argument("--value-bits", type=int, default=16, choices=VALUE_BITS)
    p.add_argument(
        "--eval",
        dest="evaluation",
        choices=EVAL_KINDS,
        default=None,
        help="fitness: fidelity (default with --calibration), accuracy, weights",
    )
    p.add_argument("--calibration", help='JSONL file of {"text": ..., "label": ...} lines')
    p.add_argument("--generations", type=int, default=None, help="search generations")
    p.add_argument("--subspaces", default=None, help="nps: M (int); nps-seeded: tensor|magnitude")
    p.add_argument(
        "--preset", choices=["default", "paper"], default=None, help="nps parameterisation"
    )
    p.add_argument(
        "--min-fidelity", type=float, default=None, help="auto: quality floor (e.g. 0.99)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_compress)

    p = sub.add_parser("reconstruct", help="rebuild a fine-tune directory from a base and a delta")
    p.add_argument("base_dir")
    p.add_argument("delta")
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--scale", type=float, default=1.0, help="λ of θ_pre + λ·δ (interpolation)")
    p.set_defaults(handler=cmd_reconstruct)

    p = sub.add_parser("merge", help="merge several deltas of one base into a new delta")
    p.add_argument("base_dir")
    p.add_argument("deltas", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--method", choices=MERGE_METHODS, default="task_arithmetic")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0)
    p.add_argument("--density", type=float, default=None, help="ties: trim density per tensor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_merge)

    p = sub.add_parser("inspect", help="show what a delta file holds")
    p.add_argument("delta")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_inspect)


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.generations is not None and args.method in ("nps", "nps-seeded", "auto"):
        opts["generations"] = args.generations
    if args.subspaces is not None:
        if args.method == "nps":
            opts["subspaces"] = int(args.subspaces)
        elif args.method == "nps-seeded":
            opts["subspaces"] = args.subspaces
    if args.preset is not None and args.method == "nps":
        opts["preset"] = args.preset
    return opts


def _progress_printer(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.console import Console

    console = Console(stderr=True)

    def show(info: dict[str, Any]) -> None:
        if info.get("phase") == "search" and "generation" in info:
            console.print(
                f"  search: generation {info['generation']}/{info.get('generations', '?')}, "
                f"best fitness {info.get('best_fitness', float('nan')):.6g}, "
                f"{info.get('evaluations', 0)} evaluations",
                highlight=False,
            )
        elif info.get("phase") == "encode":
            console.print("  encoding…", highlight=False)

    return show


def cmd_compress(args: argparse.Namespace) -> int:
    from core.compress import compress

    evaluation = args.evaluation or ("fidelity" if args.calibration else "weights")
    kwargs: dict[str, Any] = dict(
        keep=args.keep,
        value_bits=args.value_bits,
        evaluation=evaluation,
        calibration=args.calibration,
        seed=args.seed,
        options=_method_options(args),
        device=args.device,
        progress=_progress_printer(not args.json and sys.stderr.isatty()),
    )
    if args.method == "auto":
        from core.auto import auto_compress

        result = auto_compress(
            args.base_dir,
            args.finetuned_dir,
            args.output,
            min_fidelity=args.min_fidelity if args.min_fidelity is not None else 0.99,
            **kwargs,
        )
    else:
        result = compress(
            args.base_dir, args.finetuned_dir, args.output, method=args.method, **kwargs
        )
    data = result.to_dict()
    _print(data, args.json)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from core.reconstruct import reconstruct

    paths = reconstruct(args.base_dir, args.delta, args.output, scale=args.scale)
    for p in paths:
        print(p)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from core.merge import merge

    result = merge(
        args.base_dir,
        args.deltas,
        args.output,
        method=args.method,
        lam=args.lam,
        density=args.density,
    )
    data = {
        "path": result.path,
        "method": result.method,
        "sources": result.sources,
        "stored_bytes": result.stored_bytes,
        "kept": result.kept,
    }
    _print(data, args.json)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from core.summary import describe

    _print(describe(args.delta), args.json)
    return 0


def _print(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        slim = {k: v for k, v in data.items() if k != "trace"}
        print(json.dumps(slim, indent=None, default=str))
        return
    for key in (*HEADLINE, "fidelity", "kept", "path", "sources"):
        if key in data and data[key] is not None:
            value = data[key]
            if isinstance(value, float):
                value = f"{value:.6g}"
            print(f"{key:>16}: {value}")
    for note in data.get("notes", []) or []:
        print(f"{'note':>16}: {note}")

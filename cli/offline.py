"""Offline verbs (no server): compress, reconstruct, inspect, and the offline merge.

``slim merge`` is registered once, by :mod:`cli.client`: its ``-o OUT`` form
(``slim merge BASE_DIR DELTA ... -o OUT``) calls :func:`cmd_merge` here."""

from __future__ import annotations

import argparse
import json
from typing import Any

# core.params imports no torch: `slim --help` and the client verbs start without it
from core.params import (
    AUTO_CALIBRATION_LIMIT,
    DEFAULT_CALIBRATION_LIMIT,
    DEFAULT_KEEP,
    DEFAULT_LOWRANK_ENERGY,
    DEFAULT_MIN_FIDELITY,
    DEFAULT_VALUE_BITS,
    EVAL_KINDS,
    GENERATIONS_METHODS,
    METHODS,
    VALUE_BITS,
    CompressOutcome,
    CompressParams,
    Evaluation,
    Method,
)

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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="compress a fine-tune against its base into a delta file")
    p.add_argument("base_dir")
    p.add_argument("finetuned_dir")
    p.add_argument("-o", "--output", required=True, help="delta file to write")
    p.add_argument(
        "--method",
        default=None,
        choices=[*METHODS, Method.AUTO],
        help="default: auto with --min-fidelity; nps with --calibration, --keep or "
        "--value-bits; else lossless (no unmeasured loss)",
    )
    p.add_argument(
        "--keep",
        type=float,
        default=None,
        help=f"keep ratio r (default {DEFAULT_KEEP:g}; lowrank: 1; auto: searched)",
    )
    p.add_argument(
        "--value-bits",
        type=int,
        default=None,
        choices=VALUE_BITS,
        help=f"bits per stored value (default {DEFAULT_VALUE_BITS}; auto: searched)",
    )
    p.add_argument(
        "--eval",
        dest="evaluation",
        choices=EVAL_KINDS,
        default=None,
        help="fitness: fidelity (default with --calibration), accuracy, weights",
    )
    p.add_argument("--calibration", help='JSONL file of {"text": ..., "label": ...} lines')
    add_calibration_limit(p)
    p.add_argument("--generations", type=int, default=None, help="search generations")
    p.add_argument("--subspaces", default=None, help="nps: M (int); nps-seeded: tensor|magnitude")
    p.add_argument(
        "--preset", choices=["default", "paper"], default=None, help="nps parameterisation"
    )
    p.add_argument(
        "--energy",
        type=float,
        default=None,
        help=f"lowrank: fraction of each tensor's squared norm its rank retains "
        f"(default {DEFAULT_LOWRANK_ENERGY:g})",
    )
    p.add_argument("--max-rank", type=positive_int, default=None, help="lowrank: rank cap")
    p.add_argument(
        "--min-fidelity",
        type=float,
        default=None,
        help=f"auto: quality floor (default {DEFAULT_MIN_FIDELITY:g}; implies --method auto); "
        "see docs/auto.md",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=cmd_compress)

    p = sub.add_parser("reconstruct", help="rebuild a fine-tune directory from a base and a delta")
    p.add_argument("base_dir")
    p.add_argument("delta")
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--scale", type=float, default=1.0, help="λ of θ_pre + λ·δ (interpolation)")
    p.set_defaults(handler=cmd_reconstruct)

    p = sub.add_parser("inspect", help="show what a delta file holds")
    p.add_argument("delta")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_inspect)


def add_calibration_limit(p: argparse.ArgumentParser) -> None:
    """``--calibration-limit N``, the same for ``slim compress`` and ``slim push``."""
    p.add_argument(
        "--calibration-limit",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"evaluate on at most N calibration lines, a subsample drawn by --seed from a "
        f"longer file (default {DEFAULT_CALIBRATION_LIMIT}; auto {AUTO_CALIBRATION_LIMIT})",
    )


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1 (got {value})")
    return value


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    method = args.method or (Method.AUTO if args.min_fidelity is not None else Method.NPS)
    opts: dict[str, Any] = {}
    if args.generations is not None and method in GENERATIONS_METHODS:
        opts["generations"] = args.generations
    if args.subspaces is not None:
        if method == Method.NPS:
            opts["subspaces"] = int(args.subspaces)
        elif method == Method.NPS_SEEDED:
            opts["subspaces"] = args.subspaces
    if args.preset is not None and method == Method.NPS:
        opts["preset"] = args.preset
    if method == Method.LOWRANK:
        for key in ("energy", "max_rank", "device"):
            if getattr(args, key) is not None:
                opts[key] = getattr(args, key)
    return opts


def _pct(keep: Any) -> str:
    return f"{100 * keep:g}%" if isinstance(keep, int | float) else "?"


def progress_line(info: dict[str, Any]) -> str:
    """One readable line for a progress report (core's dict; also a job's ``progress``).

    ``auto``: ``auto: candidate 3/12 dare keep 5% 4-bit: fidelity 0.9921 ≥ floor 0.99,
    passed · 41 s elapsed, ≈95 s left``; a search: ``search: generation 5/8, best fitness …``.
    """
    phase = info.get("phase")
    if phase == "auto":
        cand = info.get("candidate") or {}
        what = (
            f"{cand.get('method', '?')} keep {_pct(cand.get('keep'))} "
            f"{cand.get('value_bits', '?')}-bit"
        )
        fid, floor = info.get("fidelity"), info.get("floor")
        if isinstance(fid, int | float):
            verdict = "passed" if info.get("passed") else "rejected"
            sign = "≥" if info.get("passed") else "<"
            state = f"fidelity {fid:.4f} {sign} floor {floor}, {verdict}"
        else:
            state = f"judging against floor {floor}…"
        timing = f"{info.get('elapsed_seconds', 0):.0f} s elapsed"
        if isinstance(info.get("eta_seconds"), int | float):
            timing += f", ≈{info['eta_seconds']:.0f} s left"
        return (
            f"auto: candidate {info.get('candidate_index', '?')}/"
            f"{info.get('candidates_total', '?')} {what}: {state} · {timing}"
        )
    if phase in ("search", "seed") and info.get("generation") is not None:
        total = info.get("generations")
        gen = f"{info['generation']}/{total}" if total is not None else f"{info['generation']}"
        best = info.get("best_fitness")
        best_s = f", best fitness {best:.6g}" if isinstance(best, int | float) else ""
        evals = info.get("evaluations")
        evals_s = f", {evals} evaluations" if evals is not None else ""
        return f"{phase}: generation {gen}{best_s}{evals_s}"
    if phase == "encode":
        return "encoding…"
    return str(phase or "starting")


def encoding_label(method: str | None, keep: Any = None, value_bits: Any = None) -> str:
    """What a delta stores, in words: ``auto → dare, keep 3%, 3-bit`` (auto's choice),
    ``nps, keep 1%, 16-bit``, ``lossless``."""
    name = str(method or "?")
    if name.startswith("auto:"):
        name = "auto → " + name.split(":", 1)[1]
    if name.endswith("lossless") or keep is None:
        return name
    bits = f", {value_bits}-bit" if value_bits is not None else ""
    return f"{name}, keep {_pct(keep)}{bits}"


def checkpoint_encoding(method: str, params: CompressParams, outcome: CompressOutcome) -> str:
    """A checkpoint's stored encoding: the one the job recorded (auto's choice), else what
    was asked for."""
    if outcome.method:
        return encoding_label(outcome.method, outcome.keep, outcome.value_bits)
    return encoding_label(method, params.keep, params.value_bits)


def _progress_printer(enabled: bool) -> Any:
    """Progress lines on stderr (rich on a terminal, plain lines otherwise), one per report
    that changes the line."""
    if not enabled:
        return None
    from rich.console import Console

    console = Console(stderr=True)
    last: list[str] = []

    def show(info: dict[str, Any]) -> None:
        line = progress_line(info)
        if line not in last[-1:]:
            console.print(f"  {line}", highlight=False, soft_wrap=True)
            last.append(line)

    return show


def cmd_compress(args: argparse.Namespace) -> int:
    from core.compress import compress_request
    from core.evaluate import load_calibration

    calibration = (
        load_calibration(args.calibration, need_labels=args.evaluation == Evaluation.ACCURACY)
        if args.calibration is not None
        else None
    )
    params = CompressParams(
        method=None if args.method is None else Method(args.method),
        keep=args.keep,
        value_bits=args.value_bits,
        evaluation=None if args.evaluation is None else Evaluation(args.evaluation),
        min_fidelity=args.min_fidelity,
        seed=args.seed,
        options=_method_options(args),
        calibration=tuple(calibration) if calibration else None,
        calibration_limit=args.calibration_limit,
    )
    result = compress_request(
        args.base_dir,
        args.finetuned_dir,
        args.output,
        params,
        device=args.device,
        progress=_progress_printer(not args.quiet),
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
    from core.errors import InvalidArgument
    from core.merge import merge

    heads_from = None
    if getattr(args, "heads_from", None) is not None:
        if args.heads_from not in args.deltas:
            raise InvalidArgument(
                f"--heads-from {args.heads_from} is not one of the merged deltas; name one of "
                f"{', '.join(args.deltas)}"
            )
        heads_from = args.deltas.index(args.heads_from)
    result = merge(
        args.base_dir,
        args.deltas,
        args.output,
        method=args.method,
        lam=args.lam,
        density=args.density,
        heads_from=heads_from,
    )
    data = {
        "path": result.path,
        "method": result.method,
        "sources": result.sources,
        "stored_bytes": result.stored_bytes,
        "kept": result.kept,
        "heads_from": args.deltas[result.heads_from] if result.own_tensors else None,
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
    for key in (*HEADLINE, "fidelity", "kept", "lowrank", "path", "sources"):
        if key in data and data[key] is not None:
            value = data[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            if isinstance(value, float):
                value = f"{value:.6g}"
            if key == "fidelity" and data.get("fidelity_part"):
                value = f"{value} (on {data['fidelity_part']}: {data.get('fidelity_examples')} examples)"
            if key in ("fitness_before", "fitness_after") and data.get("fitness_objective"):
                value = f"{value} ({data['fitness_objective']})"
            print(f"{key:>16}: {value}")
    for note in data.get("notes", []) or []:
        print(f"{'note':>16}: {note}")

"""What one ``nps-seeded`` search costs: this checkout against a baseline checkout, side by side.

Two measurements, each run in child processes (a fresh interpreter per run, so one run's caches
and allocator state do not help the next), alternating the two sides round by round:

- ``search``: one search at the fidelity grid's settings (the MiniLM fine-tune, 128 validation
  examples of the task as ``bench.fidelity`` builds them, 96 searched + 32 held out) through
  ``core.compress.compress``; per run the wall seconds, the CPU seconds (user + sys of the
  child, less sensitive to other load than wall time), the evaluations, and a digest of the
  delta's tensors (its frames: positions and values; the metadata holds timings) — the same
  digest on both sides means the same delta was chosen.
- ``calibration``: the CLI (``python -m cli compress ... --method nps-seeded --calibration
  FILE``) on a 200-line and a 5,000-line calibration file (train-split texts): the search
  evaluates on the same subsample size either way (``core.params.DEFAULT_CALIBRATION_LIMIT``).

Run: ``python -m bench.search_cost search --baseline DIR [--rounds 2] [--generations 12]`` where
DIR holds an earlier checkout (``git archive <commit> | tar -x -C DIR``), and
``python -m bench.search_cost calibration``. Both print one line per run and write
``bench/results/search-cost-<what>.json``; the load average is recorded beside every run (the
benchmark machines are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve().parent.parent

#: One search in a child process; prints a JSON object. Uses only APIs that the baseline
#: checkouts have too (compress, build_evaluator, bench.fidelity.calibration).
SEARCH_CHILD = r"""
import hashlib, json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from safetensors import safe_open
from bench.finetune import base_model_dir, full_recipe, make_finetune
from bench.fidelity import calibration
from core.compress import build_evaluator, compress
from core.workspace import Workspace

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

ft = sys.argv[2] or make_finetune(full_recipe(sys.argv[3]))
base = base_model_dir()
cal = calibration(sys.argv[3], int(sys.argv[4]), False)
out = sys.argv[8]
w0, c0 = time.perf_counter(), cpu()
with Workspace(base, ft) as ws:
    ev = build_evaluator("fidelity", ws, ft, cal, calibration_limit=len(cal))
w1, c1 = time.perf_counter(), cpu()
res = compress(base, ft, out, method="nps-seeded", keep=float(sys.argv[5]),
               value_bits=int(sys.argv[6]), evaluation="fidelity", seed=int(sys.argv[9]),
               evaluator=ev, options={"generations": int(sys.argv[7])})
w2, c2 = time.perf_counter(), cpu()
h = hashlib.sha256()
with safe_open(out, "pt") as f:
    for k in sorted(f.keys()):
        h.update(k.encode())
        h.update(f.get_tensor(k).numpy().tobytes())
print(json.dumps({"build_wall_s": w1 - w0, "build_cpu_s": c1 - c0, "search_wall_s": w2 - w1,
                  "search_cpu_s": c2 - c1, "search_seconds": res.search_seconds,
                  "evaluations": res.evaluations, "fidelity": res.fidelity,
                  "bits_per_param": res.bits_per_param, "delta_digest": h.hexdigest()[:16]}))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("search", help="one nps-seeded search, this checkout vs --baseline")
    s.add_argument("--baseline", type=Path, default=None, help="an earlier checkout (a dir)")
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--generations", type=int, default=12)
    s.add_argument("--task", default="rotten_tomatoes")
    s.add_argument("--finetune", default="", help="a fine-tune dir (default: the full recipe)")
    s.add_argument("--calibration", type=int, default=128)
    s.add_argument("--keep", type=float, default=0.02)
    s.add_argument("--bits", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("forward", help="one evaluation's forward passes: batchings side by side")
    f.add_argument("--rounds", type=int, default=4)
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--finetune", default="", help="a fine-tune dir (default: the full recipe)")
    f.add_argument("--costs", type=int, nargs="+", default=[48, 160, 400])
    c = sub.add_parser("calibration", help="CLI search cost: 200- vs 5,000-line calibration")
    c.add_argument("--rounds", type=int, default=1)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--generations", type=int, default=2)
    c.add_argument("--finetune", default="", help="a fine-tune dir (default: the full recipe)")
    c.add_argument("--lines", type=int, nargs="+", default=[200, 5000])


def machine_note() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "note": "shared machine: other sessions' jobs ran at the same time (see load averages)",
    }


def _env(code: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS=str(threads))
    env.setdefault("SLIM_BENCH_CACHE", str(Path.home() / ".cache" / "slim-bench"))
    return env


def _load() -> float:
    return os.getloadavg()[0]


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    sides = {"current": HERE}
    if args.baseline is not None:
        sides = {"baseline": args.baseline.resolve(), **sides}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in names:
                out = Path(tmp) / f"{name}-{r}.slim"
                argv = [
                    str(args.threads),
                    args.finetune,
                    args.task,
                    str(args.calibration),
                    str(args.keep),
                    str(args.bits),
                    str(args.generations),
                    str(out),
                    str(args.seed),
                ]
                load0 = _load()
                proc = subprocess.run(
                    [sys.executable, "-c", SEARCH_CHILD, *argv],
                    env=_env(sides[name], args.threads),
                    cwd=sides[name],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode:
                    raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row |= {"side": name, "round": r, "load_before": load0, "load_after": _load()}
                runs.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for name in sides:
        mine = [x for x in runs if x["side"] == name]
        summary[name] = {
            k: statistics.median(x[k] for x in mine)
            for k in ("search_wall_s", "search_cpu_s", "build_cpu_s", "evaluations")
        } | {"digests": sorted({x["delta_digest"] for x in mine})}
    if "baseline" in summary:
        b, c = summary["baseline"], summary["current"]
        summary["ratio_cpu"] = c["search_cpu_s"] / b["search_cpu_s"]
        summary["ratio_wall"] = c["search_wall_s"] / b["search_wall_s"]
    return {"settings": vars(args) | {"baseline": str(args.baseline)}, "runs": runs} | {
        "summary": summary
    }


def run_forward(args: argparse.Namespace) -> dict[str, Any]:
    """Forward passes of one evaluation (search + holdout parts) under length-grouped batches
    at several per-batch costs and under the earlier fixed cut (64 a batch in length order),
    alternating, in one process; medians of wall and CPU seconds."""
    import torch

    import core.evaluate as evaluate
    from bench.fidelity import calibration
    from bench.finetune import base_model_dir, full_recipe, make_finetune
    from core.compress import build_evaluator
    from core.workspace import Workspace

    torch.set_num_threads(args.threads)
    ft = args.finetune or str(make_finetune(full_recipe("rotten_tomatoes")))
    cal = calibration("rotten_tomatoes", 128, False)
    grouped = evaluate.length_batches

    def fixed(lengths: Any, max_batch: int) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[s : s + max_batch] for s in range(0, len(order), max_batch)]

    evs: dict[str, Any] = {}
    with Workspace(base_model_dir(), ft) as ws:
        for label, split in [
            *((f"grouped-{c}", lambda ls, m, c=c: grouped(ls, m, c)) for c in args.costs),
            ("fixed-64", fixed),
        ]:
            evaluate.length_batches = split  # type: ignore[assignment]
            try:
                evs[label] = build_evaluator("fidelity", ws, ft, cal, calibration_limit=128)
            finally:
                evaluate.length_batches = grouped
    walls: dict[str, list[float]] = {k: [] for k in evs}
    cpus: dict[str, list[float]] = {k: [] for k in evs}
    for r in range(args.rounds):
        for k in list(evs) if r % 2 == 0 else list(evs)[::-1]:
            w0, c0 = time.perf_counter(), time.process_time()
            for part in evs[k].parts:
                evs[k].run(part)
            walls[k].append(time.perf_counter() - w0)
            cpus[k].append(time.process_time() - c0)
    rows = {
        k: {
            "batches": {p: [len(b["_index"]) for b in ev._parts[p].batches] for p in ev.parts},
            "wall_s": statistics.median(walls[k]),
            "cpu_s": statistics.median(cpus[k]),
        }
        for k, ev in evs.items()
    }
    for k, row in rows.items():
        print(k, json.dumps(row), flush=True)
    return {"settings": vars(args), "summary": rows, "load": os.getloadavg()}


def run_calibration(args: argparse.Namespace) -> dict[str, Any]:
    from bench.data import load_task
    from bench.finetune import base_model_dir, full_recipe, make_finetune

    ft = args.finetune or str(make_finetune(full_recipe("rotten_tomatoes")))
    train = list(load_task("rotten_tomatoes").train)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for n in args.lines:
            path = Path(tmp) / f"cal-{n}.jsonl"
            path.write_text("".join(json.dumps({"text": e.text}) + "\n" for e in train[:n]))
            files[n] = path
        for r in range(args.rounds):
            for n in args.lines if r % 2 == 0 else args.lines[::-1]:
                cmd = [
                    sys.executable,
                    "-m",
                    "cli",
                    "compress",
                    str(base_model_dir()),
                    ft,
                    "-o",
                    str(Path(tmp) / f"out-{n}.slim"),
                    "--method",
                    "nps-seeded",
                    "--calibration",
                    str(files[n]),
                    "--generations",
                    str(args.generations),
                    "--json",
                    "--quiet",
                ]
                load0 = _load()
                w0 = time.perf_counter()
                proc = subprocess.Popen(
                    cmd, env=_env(HERE, args.threads), stdout=subprocess.PIPE, text=True
                )
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - w0
                assert proc.stdout is not None
                out = json.loads(proc.stdout.read())
                if status:
                    raise SystemExit(f"slim compress failed ({status})")
                row = {
                    "lines": n,
                    "round": r,
                    "wall_s": wall,
                    "cpu_s": usage.ru_utime + usage.ru_stime,
                    "search_seconds": out.get("search_seconds"),
                    "evaluations": out.get("evaluations"),
                    "calibration_used": out.get("calibration_used"),
                    "calibration_given": out.get("calibration_given"),
                    "load_before": load0,
                    "load_after": _load(),
                }
                runs.append(row)
                print(json.dumps(row), flush=True)
    return {"settings": vars(args), "runs": runs}


def main(args: argparse.Namespace) -> int:
    run = {"search": run_search, "forward": run_forward, "calibration": run_calibration}
    result = run[args.what](args)
    result["machine"] = machine_note()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"search-cost-{args.what}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result.get("summary", {}), indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.search_cost")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))

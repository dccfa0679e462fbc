"""Where a delta's bytes go: its frames, and the container header that holds its document —
format 6 (the document packed) against format 5 (plain JSON), on the same delta.

Each point is written once, in today's format, on a task's real fine-tune (``bench.finetune``);
its format-5 twin is the same frames under the same document marked version 5 and stored as
plain JSON (``core.delta_format.rewritten_size``: nothing is encoded twice, so the two sizes
differ only by the header). Bits/param as everywhere (``core.summary.sizes_of``). Sizes only:
no timing, so the host's load does not matter. Usage::

    SLIM_BENCH_CACHE=/work/bench-cache PYTHONPATH=. python -m bench document-size \\
        --tasks tweets rotten_tomatoes --out bench/results/document-size
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

#: (method, keep, value bits): the budgets of the fidelity goal (0.04-0.1 bits/param) and one
#: above; nps-seeded searches (its document records the search), the others do not.
POINTS = (
    ("dare", 0.01, 2),
    ("dare", 0.02, 2),
    ("dare", 0.02, 4),
    ("dare", 0.05, 4),
    ("nps-seeded", 0.02, 2),
    ("lossless", 1.0, 16),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", default=["tweets", "rotten_tomatoes"])
    p.add_argument("--calibration", type=int, default=128, help="validation texts (nps-seeded)")
    p.add_argument("--out", type=Path, default=Path("bench/results/document-size"))


def measure(
    base: Path,
    ft: Path,
    workdir: Path,
    cal: list[Any],
    points: tuple[tuple[str, float, int], ...] = POINTS,
) -> list[dict[str, Any]]:
    """Sizes of every point of ``points`` on one fine-tune, both formats."""
    from core.compress import compress
    from core.constants import PACKED_VERSION
    from core.delta_format import DeltaReader, rewritten_size
    from core.summary import sizes_of

    rows = []
    for method, keep, bits in points:
        out = workdir / f"{method}-{keep}-{bits}.slim"
        searched = method == "nps-seeded"
        compress(
            base,
            ft,
            out,
            method=method,
            keep=keep,
            value_bits=bits,
            evaluation="fidelity" if searched else "weights",
            calibration=cal if searched else None,
            calibration_limit=len(cal),
        )
        with DeltaReader(out) as r:
            doc = r.doc
            frames = sum(f.size for f in doc.frames.values())
            plain = replace(doc, version=PACKED_VERSION - 1)
            sizes = {
                "format 6": sizes_of(doc, r.size),
                "format 5": sizes_of(doc, rewritten_size(r, plain)),
            }
            text = doc.to_json()
        rows.append(
            {
                "method": method,
                "keep": keep,
                "value_bits": bits,
                "frame_bytes": frames,
                "document_chars": len(text),
                "header_bytes": {k: v["stored_bytes"] - frames for k, v in sizes.items()},
                "stored_bytes": {k: v["stored_bytes"] for k, v in sizes.items()},
                "bits_per_param": {k: v["bits_per_param"] for k, v in sizes.items()},
            }
        )
        out.unlink()
    return rows


def main(args: argparse.Namespace) -> int:
    from bench.fidelity import calibration, machine_note
    from bench.finetune import base_model_dir, full_recipe, make_finetune

    results: dict[str, Any] = {
        "command": "python -m bench document-size --tasks " + " ".join(args.tasks),
        "machine": machine_note(),
        "tasks": {},
    }
    base = base_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            ft = make_finetune(full_recipe(task))
            cal = calibration(task, args.calibration, False)
            results["tasks"][task] = measure(base, ft, Path(tmp), cal)
            print(task, json.dumps(results["tasks"][task]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Where a delta's bytes go: format 6 (packed document) against format 5",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}",
        "",
        "Each point written once in format 6; its format-5 twin is the same frames under the "
        "same document stored as plain JSON (`core.delta_format.rewritten_size`). Header = the "
        "container's length field and JSON header (frame index and document) = stored − frames.",
    ]
    for task, rows in results["tasks"].items():
        lines += [
            "",
            f"## {task}",
            "",
            "| point | frames B | document chars | header B (5 → 6) | bits/param (5 → 6) | saved |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            h, b = r["header_bytes"], r["bits_per_param"]
            point = (
                r["method"]
                if r["method"] == "lossless"
                else f"{r['method']} {r['keep']}/{r['value_bits']}"
            )
            lines.append(
                f"| {point} | {r['frame_bytes']:,} | {r['document_chars']:,} | "
                f"{h['format 5']:,} → {h['format 6']:,} | {b['format 5']:.4f} → {b['format 6']:.4f} | "
                f"{b['format 5'] - b['format 6']:.4f} |"
            )
    return "\n".join(lines) + "\n"

"""Merged LoRA fine-tunes: stored size against the adapter's own, and agreement (issue 17).

Fixtures (cached under ``cache_dir()/lora/``, built from :func:`bench.finetune.lora_recipe`):

- the adapter: a PEFT LoRA of all-MiniLM-L6-v2 (rank r on every attention and MLP projection,
  the new classifier head as ``modules_to_save``), as ``save_pretrained`` writes it (fp32);
- ``merged-fp32``: ``PeftModel.merge_and_unload()`` on the fp32 base, saved in fp32;
- ``merged-bf16``: the same merge on the base loaded in bf16 (PEFT multiplies the factors in
  fp32 on CPU and adds them to the bf16 weight, rounding once), saved in bf16; it is compared
  with the bf16 cast of the base (:func:`base_bf16`), the base a bf16 user holds.

Per fixture and precision: the merged checkpoint compressed by ``lowrank`` (its ranks), by
``lossless``, and by ``dare`` at ``lowrank``'s stored bytes (its keep found in one
proportional step) and ``nps-seeded`` at DARE's keep (it holds every candidate to DARE's
expected bits); top-1
agreement of each rebuilt model with the merged fine-tune on the whole test split, and
accuracy. "The adapter's own fp16 size" is its ``adapter_model.safetensors`` with every tensor
cast to fp16, head included (that is what a user would ship); the ratio is also given for the
adapted matrices alone (the ``lowrank`` frames against 2 bytes per LoRA factor value).

``python -m bench lora [--tasks ...] [--ranks ...] [--methods ...]`` writes
``bench/results/lora.json`` and ``lora.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bench.data import cache_dir, load_task
from bench.finetune import (
    NUM_THREADS,
    LoraRecipe,
    _quiet,
    _quiet_load,
    base_bf16,
    base_model_dir,
    bf16_cast,
    cached_dir,
    lora_recipe,
    make_finetune,
    predict,
    read_marker,
)
from core.auto import auto_compress
from core.compress import compress
from core.device import cpu_has_bf16
from core.evaluate import Example as CalExample
from core.params import AUTO_CALIBRATION_LIMIT
from core.reconstruct import load_state, reconstruct
from core.summary import describe

TASKS = ("rotten_tomatoes", "tweets")
RANKS = (8, 32)
PRECISIONS = ("fp32", "bf16")
METHODS = ("lowrank", "lossless", "dare", "nps-seeded", "auto")
#: ``auto``'s floor here: its default, top-1 agreement with the merged fine-tune on as many
#: validation texts as auto evaluates by default (on 96, a floor of 0.99 allows no flip at all:
#: half-precision factors of the tweets r32 bf16 merge flipped 1 of 96 near-ties, 0.9896, and
#: auto stored the exact delta; on the test split they agree on 0.9998)
AUTO_FLOOR = 0.99
#: The goal: stored ≤ 1.1× the adapter's fp16 size with ≥ 99.9% top-1 agreement.
GOAL_RATIO = 1.1
GOAL_AGREEMENT = 0.999
#: Validation examples ``nps-seeded``'s fitness runs on (its search is the costly part).
NPS_CALIBRATION = 96
RESULTS = Path(__file__).resolve().parent / "results"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LoraFixture:
    """A trained adapter and its merged checkpoints (model directories)."""

    recipe: LoraRecipe
    adapter: Path
    merged: dict[str, Path]  # precision -> merged model directory

    def base(self, precision: str) -> Path:
        """The base the merged checkpoint of ``precision`` is compressed against."""
        return base_model_dir() if precision == "fp32" else base_bf16()


def merge_with_peft(adapter: Path, dest: Path, dtype: torch.dtype) -> None:
    """``merge_and_unload()`` of ``adapter`` on the base loaded in ``dtype``; saved in it."""
    import peft
    import transformers

    marker = read_marker(adapter) or {}
    task = load_task(marker.get("recipe", {}).get("task") or adapter.name.split("-lora")[0])
    model = _quiet_load(
        transformers.AutoModelForSequenceClassification.from_pretrained,
        str(base_model_dir()),
        num_labels=task.num_labels,
        id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)},
        dtype=dtype,
    )
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    with _quiet():
        merged.save_pretrained(str(dest))
        transformers.AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(dest))
    got = {t.dtype for t in load_file(str(dest / "model.safetensors")).values()}
    if got != {dtype}:  # pragma: no cover - transformers change
        raise RuntimeError(f"{dest}: merged weights are {got}, not {dtype}")


def _merge_into(adapter: Path, dtype: torch.dtype, dest: Path) -> None:
    merge_with_peft(adapter, dest, dtype)


def lora_fixture(task: str, rank: int, verbose: bool = True) -> LoraFixture:
    """Train (or reuse) the LoRA of ``task`` at ``rank`` and build its merged checkpoints."""
    recipe = lora_recipe(task, rank)
    adapter = make_finetune(recipe, verbose=verbose)
    merged = {
        p: cached_dir(
            cache_dir() / "lora" / f"{adapter.name}-merged-{p}",
            functools.partial(_merge_into, adapter, _DTYPES[p]),
        )
        for p in PRECISIONS
    }
    return LoraFixture(recipe, adapter, merged)


def adapter_sizes(adapter: Path) -> dict[str, int]:
    """The adapter's sizes: ``fp16_bytes`` (its safetensors file with every tensor in fp16,
    header and head included), ``factor_bytes`` (2 bytes per LoRA factor value), ``head_bytes``
    (2 per value of the other tensors: the head), ``stored_bytes`` (the file as saved)."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    factors = sum(t.numel() for n, t in tensors.items() if ".lora_" in n)
    rest = sum(t.numel() for n, t in tensors.items() if ".lora_" not in n)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter_model.safetensors"
        save_file({n: t.to(torch.float16) for n, t in tensors.items()}, str(path))
        fp16 = path.stat().st_size
    return {
        "fp16_bytes": fp16,
        "factor_bytes": 2 * factors,
        "head_bytes": 2 * rest,
        "stored_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
    }


def rebuild_error(base: Path, delta: Path, merged: Path, precision: str) -> dict[str, float]:
    """How far the rebuilt weights are from the merged ones: ``worst_rel_tau`` (max over
    tensors of max|error| / max|τ|), ``exact`` (fraction of weights bit-identical) and, for
    bf16, ``worst_bound``: max over weights of |error| / (2⁻⁷·|w| + 2⁻⁹·rms w), one bf16 ulp of
    the weight plus half an ulp at the tensor's typical weight (≤ 1: within bf16 rounding; the
    second term keeps weights near 0, whose ulp is tiny, from reading as far off)."""
    got = load_state(base, delta)
    want = load_file(str(merged / "model.safetensors"))
    ref = load_file(str(base / "model.safetensors"))
    worst = bound = 0.0
    same = total = 0
    for name, w in want.items():
        if not w.is_floating_point():
            continue
        r = got[name]
        err = (r.float() - w.float()).abs()
        same += int((r == w).sum())
        total += w.numel()
        b = ref.get(name.removeprefix("bert."))
        if b is not None and b.shape == w.shape:
            tau = float((w.float() - b.float()).abs().max())
            if tau > 0:
                worst = max(worst, float(err.max()) / tau)
        if precision == "bf16":
            wf = w.float()
            limit = 2.0**-7 * wf.abs() + 2.0**-9 * wf.pow(2).mean().sqrt()
            bound = max(bound, float((err / limit).max()))
    out = {"worst_rel_tau": worst, "exact": same / total}
    if precision == "bf16":
        out["worst_bound"] = bound
    return out


def _agreement(preds: list[int], ref: list[int]) -> float:
    return sum(p == q for p, q in zip(preds, ref, strict=True)) / len(ref)


def _accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)


def measure(
    fixture: LoraFixture, precision: str, methods: Sequence[str], work: Path
) -> dict[str, Any]:
    """One fixture at one precision: every method's sizes, agreement and accuracy."""
    task = load_task(fixture.recipe.task)
    merged = fixture.merged[precision]
    base = fixture.base(precision)
    labels = [e.label for e in task.test]
    t0 = time.perf_counter()
    ref = predict(merged, task.test)
    row: dict[str, Any] = {
        "task": fixture.recipe.task,
        "rank": fixture.recipe.rank,
        "precision": precision,
        "adapter": adapter_sizes(fixture.adapter),
        "merged_accuracy": _accuracy(ref, labels),
        "test_examples": len(labels),
        "methods": {},
    }
    adapter_fp16 = row["adapter"]["fp16_bytes"]
    bits = None
    low_bytes = 0
    same_keep = 1.0  # dare's keep at lowrank's bytes (nps-seeded is held to dare's bits)
    for method in methods:
        delta = work / f"{fixture.adapter.name}-{precision}-{method}.slim"
        kwargs: dict[str, Any] = {"value_bits": 16}
        if method in ("dare", "nps-seeded"):
            if bits is None or (method == "nps-seeded" and "dare" not in row["methods"]):
                raise ValueError(
                    "dare and nps-seeded are measured at lowrank's bytes (and "
                    "nps-seeded at dare's keep): list lowrank, then dare first"
                )
            kwargs["keep"] = same_keep if method == "nps-seeded" else min(bits / 16, 1.0)
        if method == "nps-seeded":
            kwargs["evaluation"] = "fidelity"
            kwargs["calibration"] = [
                CalExample(e.text, e.label) for e in task.validation[:NPS_CALIBRATION]
            ]
        if method == "auto":  # its default families and calibration size, nothing pinned
            kwargs = {
                "min_fidelity": AUTO_FLOOR,
                "calibration": [
                    CalExample(e.text, e.label) for e in task.validation[:AUTO_CALIBRATION_LIMIT]
                ],
            }
        t = time.perf_counter()
        if method == "auto":
            out = auto_compress(base, merged, delta, **kwargs)
        else:
            out = compress(base, merged, delta, method=method, **kwargs)
        if method == "dare" and low_bytes:
            # τ is zero outside the adapted matrices, so ``keep`` applies to a third of the
            # parameters: one proportional step puts DARE at lowrank's bytes
            kwargs["keep"] = min(kwargs["keep"] * low_bytes / out.weight_bytes, 1.0)
            out = compress(base, merged, delta, method=method, **kwargs)
            same_keep = kwargs["keep"]
        seconds = time.perf_counter() - t
        info = describe(delta)
        entry: dict[str, Any] = {
            "weight_bytes": out.weight_bytes,
            "stored_bytes": out.stored_bytes,
            "bits_per_param": out.bits_per_param,
            "keep": out.keep,
            "compress_seconds": round(seconds, 1),
            "vs_adapter_fp16": out.weight_bytes / adapter_fp16,
        }
        if method == "auto":
            entry["chosen"] = out.method
            entry["probe"] = _probe(delta)
        if method == "lowrank":
            bits = out.bits_per_param
            low_bytes = out.weight_bytes
            low = info.get("lowrank") or {}
            entry["lowrank"] = low
            entry["ranks"] = _ranks(delta)
            entry["factors_vs_adapter_factors"] = (
                low.get("factor_bytes", 0) / row["adapter"]["factor_bytes"]
            )
            entry["error"] = rebuild_error(base, delta, merged, precision)
        if method == "lossless":
            entry["agreement"] = 1.0  # bit-identical (checked by sha256 on rebuild)
        else:
            rebuilt = work / f"{delta.stem}-rebuilt"
            reconstruct(base, delta, rebuilt)
            preds = predict(rebuilt, task.test)
            entry["agreement"] = _agreement(preds, ref)
            entry["accuracy"] = _accuracy(preds, labels)
            shutil.rmtree(rebuilt)
        delta.unlink()
        row["methods"][method] = entry
        print(
            f"[lora] {fixture.adapter.name} {precision} {method}: "
            f"{out.weight_bytes} B ({entry['vs_adapter_fp16']:.3f}x adapter fp16), "
            f"agreement {entry.get('agreement', float('nan')):.4f}",
            flush=True,
        )
    low = row["methods"].get("lowrank")
    if low is not None:
        row["goal_met"] = (
            low["vs_adapter_fp16"] <= GOAL_RATIO and low["agreement"] >= GOAL_AGREEMENT
        )
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _probe(delta: Path) -> dict[str, Any] | None:
    """What ``auto``'s low-rank probe found (its ranks and whether lowrank was judged)."""
    from core.delta_format import DeltaReader

    with DeltaReader(delta) as r:
        probe = r.doc.method.get("auto", {}).get("lowrank_probe")
    return dict(probe) if probe else None


def _ranks(delta: Path) -> dict[str, int]:
    from core.delta_format import DeltaReader

    with DeltaReader(delta) as r:
        return {t.name: int(t.rank or 0) for t in r.doc.tensors if t.kind == "lowrank"}


def run(
    tasks: Sequence[str],
    ranks: Sequence[int],
    methods: Sequence[str],
    precisions: Sequence[str] = PRECISIONS,
    out: Path = RESULTS / "lora",
    command: str = "",
) -> dict[str, Any]:
    """Build the fixtures and measure them; write ``<out>.json`` and ``<out>.md``."""
    rows: list[dict[str, Any]] = []
    fixtures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="slim-lora-") as tmp:
        for task in tasks:
            for rank in ranks:
                fixture = lora_fixture(task, rank)
                fixtures[fixture.adapter.name] = read_marker(fixture.adapter)
                for precision in precisions:
                    rows.append(measure(fixture, precision, methods, Path(tmp)))
                    _write(out, rows, fixtures, command)
    return _write(out, rows, fixtures, command)


def _machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, bf16 instructions: "
        f"{'yes' if cpu_has_bf16() else 'no'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads; 1-min load average "
        f"{os.getloadavg()[0]:.1f} when written (a host shared with other work: times are "
        "inflated, sizes and agreements are not)"
    )


def _write(
    out: Path, rows: list[dict[str, Any]], fixtures: dict[str, Any], command: str
) -> dict[str, Any]:
    doc = {
        "command": command,
        "machine": _machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "goal": {"ratio": GOAL_RATIO, "agreement": GOAL_AGREEMENT},
        "fixtures": fixtures,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    """The results as a markdown table (one line per fixture, precision and method)."""
    lines = [
        "# Merged LoRA: stored size against the adapter's fp16 size",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}  ",
        f"Created: {doc['created']}",
        "",
        f"Goal: `lowrank` ≤ {doc['goal']['ratio']}× the adapter's fp16 size (its safetensors "
        f"file in fp16, head included) with ≥ {doc['goal']['agreement']:.1%} top-1 agreement "
        "with the merged fine-tune (whole test split). `dare` runs at `lowrank`'s stored bytes, "
        "`nps-seeded` at `dare`'s keep; `lossless` is bit-identical; `auto` with its defaults "
        f"(floor {AUTO_FLOOR} on up to {AUTO_CALIBRATION_LIMIT} validation texts, nothing "
        "pinned).",
        "",
        "| fixture | prec | merged acc | adapter fp16 | method | stored | × adapter | "
        "bits/param | agreement | acc | ranks / note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in doc["rows"]:
        name = f"{row['task']} r{row['rank']}"
        for method, e in row["methods"].items():
            note = ""
            if method == "lowrank":
                low = e.get("lowrank") or {}
                note = (
                    f"ranks {low.get('rank_min')}–{low.get('rank_max')} on {low.get('tensors')}"
                    f" matrices; factors {e['factors_vs_adapter_factors']:.3f}× the adapter's;"
                    f" max err/max\\|τ\\| {e['error']['worst_rel_tau']:.1e}"
                )
                if "worst_bound" in e["error"]:
                    note += f", err/bf16 bound {e['error']['worst_bound']:.2f}"
                note += f", {e['error']['exact']:.1%} bit-exact"
            if method == "auto":
                probe = e.get("probe") or {}
                note = f"chose `{e['chosen']}`; probe: {probe.get('reason', 'not run')}"
            acc = e.get("accuracy")
            lines.append(
                f"| {name} | {row['precision']} | {row['merged_accuracy']:.4f} | "
                f"{row['adapter']['fp16_bytes']:,} | {method} | {e['weight_bytes']:,} | "
                f"{e['vs_adapter_fp16']:.3f} | {e['bits_per_param']:.4f} | "
                f"{e['agreement']:.4f} | {'' if acc is None else f'{acc:.4f}'} | {note} |"
            )
    lines += ["", "Fixtures (training records):", ""]
    for name, rec in doc["fixtures"].items():
        rec = rec or {}
        lines.append(
            f"- `{name}`: {json.dumps(rec.get('recipe'))}, {rec.get('precision')}, "
            f"{rec.get('seconds_per_step')} s/step, final loss {rec.get('final_loss')}"
        )
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--out", type=Path, default=RESULTS / "lora", help="results path stem")
    p.add_argument("--threads", type=int, default=NUM_THREADS, help="torch threads")


def main(args: argparse.Namespace) -> int:
    import sys

    from bench import finetune

    # training and prediction set their threads from it (1 beats 2 on an oversubscribed host)
    finetune.NUM_THREADS = args.threads
    torch.set_num_threads(args.threads)
    doc = run(
        args.tasks,
        args.ranks,
        args.methods,
        args.precisions,
        args.out,
        command="python -m bench lora " + " ".join(sys.argv[2:]),
    )
    missed = [r for r in doc["rows"] if r.get("goal_met") is False]
    print(f"[lora] goal met on {len(doc['rows']) - len(missed)} of {len(doc['rows'])} rows")
    return 0


__all__ = ["LoraFixture", "adapter_sizes", "bf16_cast", "lora_fixture", "run"]

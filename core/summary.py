"""A delta's headline figures, read from its document (what ``slim inspect`` prints)."""

from __future__ import annotations

import os
from typing import Any

from core.delta_format import DeltaDoc, DeltaReader
from core.evaluate import objective_label


def sizes_of(doc: DeltaDoc, stored: int) -> dict[str, Any]:
    """The sizes of a delta whose document is ``doc`` and whose file has ``stored`` bytes."""
    aux = sum(doc.frames[f.frame].size for f in doc.files if f.role == "aux" and f.frame)
    original = sum(f.size for f in doc.files)
    num_params = int(doc.stats.get("num_params") or 0)
    return {
        "stored_bytes": stored,
        "original_bytes": original,
        "weight_bytes": stored - aux,
        "ratio": original / stored if stored else 0.0,
        "bits_per_param": 8 * (stored - aux) / num_params if num_params else 0.0,
    }


def delta_sizes(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The one definition of a delta file's sizes: ``stored_bytes`` is the file's size (what a
    download sends), ``weight_bytes`` all but the embedded aux files, ``original_bytes`` the
    fine-tune's files, ``ratio`` original/stored, ``bits_per_param`` 8·weight_bytes/params.
    Read from the file as written, so a rewritten document is counted too."""
    with DeltaReader(path) as reader:
        return sizes_of(reader.doc, reader.size)


def lowrank_summary(doc: DeltaDoc) -> dict[str, Any] | None:
    """The factored tensors of a delta (``lowrank`` and ``hybrid``): how many, their ranks, the
    bytes of their frames (a hybrid's residual included) and the values a dense τ of the same
    tensors would hold (None when there are none)."""
    low = [t for t in doc.tensors if t.kind in ("lowrank", "hybrid") and t.rank]
    if not low:
        return None
    ranks = sorted(int(t.rank or 0) for t in low)
    return {
        "tensors": len(low),
        "rank_min": ranks[0],
        "rank_max": ranks[-1],
        "rank_median": ranks[len(ranks) // 2],
        "factor_values": sum(int(t.rank or 0) * sum(t.shape) for t in low),
        "factor_bytes": sum(doc.frames[t.frame].size for t in low if t.frame in doc.frames),
        "dense_values": sum(t.numel for t in low),
    }


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Method, keep, bits, sizes, ratio, bits/param, fitness and search cost of a delta file
    (and, where it has factored tensors, :func:`lowrank_summary`).

    ``fitness_before`` / ``fitness_after`` are the search's objective (``fitness_objective``
    says which: −KL in nats for ``fidelity``, so ≤ 0), kept on their own scale because that is
    what the search compared; the 0–1 quality to read is ``fidelity``. An ``auto`` delta
    reports its chosen encoding as ``auto:<method>`` and auto's whole search time.
    """
    with DeltaReader(path) as reader:
        doc = reader.doc
        sizes = sizes_of(doc, reader.size)
        params = doc.method.get("params", {})
        num_params = int(doc.stats.get("num_params") or 0)
        lossless = doc.method.get("name") == "lossless"
        ev = doc.evaluation
        auto = doc.method.get("auto")
        return {
            "path": str(path),
            "format_version": doc.version,
            "method": f"auto:{doc.method.get('name')}" if auto else doc.method.get("name"),
            "keep": None if lossless else params.get("keep"),
            "value_bits": None if lossless else params.get("value_bits"),
            "evaluation": ev.get("kind"),
            **sizes,
            "bits_per_param": sizes["bits_per_param"] if num_params else None,
            "num_params": num_params,
            "kept": doc.stats.get("kept"),
            "fitness_before": ev.get("fitness_before"),
            "fitness_after": ev.get("fitness_after"),
            "fitness_objective": ev.get("objective") or objective_label(ev.get("kind") or ""),
            "fidelity": ev.get("fidelity"),
            "fidelity_part": ev.get("fidelity_part"),
            "fidelity_examples": ev.get("fidelity_examples"),
            "min_fidelity": auto.get("min_fidelity") if auto else None,
            "search_seconds": auto.get("search_seconds", ev.get("search_seconds"))
            if auto
            else ev.get("search_seconds"),
            "evaluations": ev.get("evaluations"),
            "base_sha256": doc.base.get("sha256"),
            "files": [
                {
                    "path": f.path,
                    "role": f.role,
                    "size": f.size,
                    "sha256": f.sha256,
                    "recon_sha256": f.recon_sha256,
                }
                for f in doc.files
            ],
            "tensors": {
                k: sum(1 for t in doc.tensors if t.kind == k)
                for k in ("sparse", "dense", "same", "lossless", "lowrank", "hybrid")
            },
            "lowrank": lowrank_summary(doc),
            "result": doc.method.get("result", {}),
            "notes": ev.get("notes", []),
        }

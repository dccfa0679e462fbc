"""A delta's headline figures, read from its document (what ``slim inspect`` prints)."""

from __future__ import annotations

import os
from typing import Any

from core.delta_format import DeltaReader


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Method, keep, bits, sizes, ratio, bits/param, fitness and search cost of a delta file."""
    with DeltaReader(path) as reader:
        doc = reader.doc
        stored = reader.size
        aux = sum(doc.frames[f.frame].size for f in doc.files if f.role == "aux" and f.frame)
        original = sum(f.size for f in doc.files)
        params = doc.method.get("params", {})
        num_params = int(doc.stats.get("num_params") or 0)
        lossless = doc.method.get("name") == "lossless"
        ev = doc.evaluation
        return {
            "path": str(path),
            "format_version": doc.version,
            "method": doc.method.get("name"),
            "keep": None if lossless else params.get("keep"),
            "value_bits": None if lossless else params.get("value_bits"),
            "evaluation": ev.get("kind"),
            "stored_bytes": stored,
            "original_bytes": original,
            "weight_bytes": stored - aux,
            "ratio": original / stored if stored else 0.0,
            "bits_per_param": 8 * (stored - aux) / num_params if num_params else None,
            "num_params": num_params,
            "kept": doc.stats.get("kept"),
            "fitness_before": ev.get("fitness_before"),
            "fitness_after": ev.get("fitness_after"),
            "fidelity": ev.get("fidelity"),
            "search_seconds": ev.get("search_seconds"),
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
                for k in ("sparse", "dense", "same", "lossless")
            },
            "result": doc.method.get("result", {}),
            "notes": ev.get("notes", []),
        }

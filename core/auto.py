"""``auto``: the smallest stored encoding whose fidelity stays above a floor.

Candidates (method, keep ratio, value bits) are ordered by their estimated stored bits per
parameter and scored without writing anything, relative to the original fine-tune:

1. the unsearched method (DARE, one evaluation each) is screened cheapest first until one
   meets ``min_fidelity`` — an upper bound on what auto will store;
2. the searched method (``nps-seeded``, a short search each) is tried on the candidates below
   that bound, from the largest down, keeping the smallest that passes and stopping after two
   misses in a row.

A searched candidate is judged on the **held-out** part of the calibration data only (never
the part its search fitted); an unsearched one on all of it. The winner is encoded for real;
``lossless`` is the fallback, so auto always succeeds. The trail is recorded in the delta.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from core.compress import CompressResult, build_evaluator, compress
from core.errors import InvalidArgument
from core.evaluate import Evaluator, Score, relative_fidelity
from core.methods import FitContext, make_method
from core.methods.base import Progress
from core.tensor_codec import ValueSpec
from core.workspace import Workspace

KEEPS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
#: 3-bit values: at 2.5% keep they stored what 4-bit values at 2% did and kept more of the
#: gain on both benchmark tasks (bench/NOTES.md, third sitting); 3% is the nearby keep step
BITS = (1, 2, 3, 4, 8, 16)


@dataclass(frozen=True)
class Candidate:
    method: str
    keep: float
    value_bits: int

    @property
    def estimated_bits(self) -> float:
        """Stored bits per parameter, before zstd: values, plus positions if explicit."""
        per_value = self.value_bits
        if self.method in ("magnitude", "magnitude-scaled", "nps"):
            r = self.keep
            entropy = -(r * math.log2(r) + (1 - r) * math.log2(1 - r)) if r < 1 else 0.0
            return self.keep * per_value + entropy
        return self.keep * per_value


def ladder(
    methods: tuple[str, ...] = ("dare", "nps-seeded"),
) -> list[Candidate]:
    """Every candidate, cheapest first (ties: the method order given)."""
    cands = [Candidate(m, k, b) for m in methods for k in KEEPS for b in BITS]
    order = {m: i for i, m in enumerate(methods)}
    return sorted(cands, key=lambda c: (round(c.estimated_bits, 9), order[c.method]))


def _score_candidate(
    ws: Workspace, cand: Candidate, ev: Evaluator, seed: int, generations: int
) -> tuple[Score, Score, int]:
    """(search-part score, holdout score, evaluations) of a candidate, nothing written."""
    options: dict[str, Any] = {"generations": generations} if cand.method == "nps-seeded" else {}
    if cand.method == "magnitude-scaled":
        options = {"grid": 7, "refine": 2}
    method = make_method(cand.method, keep=cand.keep, **options)
    ctx = FitContext(keep=cand.keep, value_bits=cand.value_bits, seed=seed, evaluator=ev)
    fitted = method.fit(ws, ctx)
    assert fitted is not None
    deltas: dict[str, torch.Tensor] = {}
    for plan in ws.delta_plans:
        tau = ws.tau(plan)
        spec = ValueSpec.from_bits(cand.value_bits, plan.dtype)
        sel = fitted.select(plan, tau, spec)
        d = torch.zeros(plan.numel, dtype=torch.float32)
        d[torch.from_numpy(sel.positions)] = spec.round(sel.values)
        deltas[plan.name] = d
    search = ctx.score(lambda n: deltas[n])
    hold = ev.run("holdout") if "holdout" in ev.parts else search
    return search, hold, ctx.evaluations + 1


def auto_compress(
    base_dir: str | os.PathLike[str],
    ft_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    min_fidelity: float = 0.99,
    keep: float | None = None,
    value_bits: int | None = None,
    evaluation: str = "fidelity",
    calibration: Any = None,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    methods: tuple[str, ...] = ("dare", "nps-seeded"),
    generations: int = 8,
    evaluator: Evaluator | None = None,
    **_: Any,
) -> CompressResult:
    """Find and write the smallest encoding whose fidelity is ≥ ``min_fidelity``.

    Fidelity is relative to the original fine-tune (agreement for ``fidelity``, accuracy ratio
    for ``accuracy``) on held-out calibration examples. ``keep`` and ``value_bits``, when
    given, pin that dimension of the search.

    Raises:
        InvalidArgument: no model evaluation (auto needs calibration data) or a bad floor.
    """
    if not 0 < min_fidelity <= 1:
        raise InvalidArgument("--min-fidelity must be in (0, 1], e.g. 0.99")
    if evaluation == "weights":
        raise InvalidArgument(
            "auto needs a fidelity floor to check: pass --calibration (and --eval fidelity or accuracy)"
        )
    generations = int((options or {}).get("generations", generations))
    t0 = time.perf_counter()
    trail: list[dict[str, Any]] = []
    with Workspace(base_dir, ft_dir) as ws:
        ev = evaluator or build_evaluator(
            evaluation, ws, ft_dir, calibration, seed=seed, device=device
        )
        assert ev is not None
        parts = ev.parts
        reference = {p: ev.run(p) for p in parts}
        ws.load_taus()
        pinned = [
            c
            for c in ladder(methods)
            if (keep is None or c.keep == keep)
            and (value_bits is None or c.value_bits == value_bits)
        ]

        def judge(cand: Candidate) -> bool:
            search, hold, n_eval = _score_candidate(ws, cand, ev, seed, generations)
            fid = relative_fidelity(evaluation, hold, reference[parts[-1]])
            if not make_method(cand.method, keep=cand.keep).searches and len(parts) > 1:
                # nothing was fitted: every calibration example is fair evidence
                n_s, n_h = ev.part_size("search"), ev.part_size("holdout")
                fid_s = relative_fidelity(evaluation, search, reference["search"])
                fid = (fid_s * n_s + fid * n_h) / (n_s + n_h)
            step = {
                "method": cand.method,
                "keep": cand.keep,
                "value_bits": cand.value_bits,
                "estimated_bits": cand.estimated_bits,
                "fidelity_holdout": fid,
                "fitness": search.fitness,
                "evaluations": n_eval,
                "passed": fid >= min_fidelity,
            }
            trail.append(step)
            if progress is not None:
                progress(
                    {
                        "phase": "auto",
                        "generation": len(trail),
                        "best_fitness": fid,
                        "candidate": step,
                    }
                )
            return fid >= min_fidelity

        # 1. screen the unsearched methods, cheapest first, until one meets the floor
        cand: Candidate | None = None
        for c in (c for c in pinned if not make_method(c.method, keep=c.keep).searches):
            if judge(c):
                cand = c
                break
        # 2. searched methods below that bound, from just under it downwards: keep the smallest
        #    that passes, stop after two misses in a row (smaller budgets only get harder)
        bound = cand.estimated_bits if cand is not None else math.inf
        below = sorted(
            (
                c
                for c in pinned
                if make_method(c.method, keep=c.keep).searches and c.estimated_bits < bound
            ),
            key=lambda c: -c.estimated_bits,
        )
        misses = 0
        for c in below:
            if judge(c):
                cand, misses = c, 0
            else:
                misses += 1
                if misses >= 2:
                    break
    chosen: CompressResult | None = None
    if cand is not None:
        opts: dict[str, Any] = {"generations": generations} if cand.method == "nps-seeded" else {}
        if cand.method == "magnitude-scaled":
            opts = {"grid": 7, "refine": 2}
        chosen = compress(
            base_dir,
            ft_dir,
            out_path,
            method=cand.method,
            keep=cand.keep,
            value_bits=cand.value_bits,
            evaluation=evaluation,
            calibration=calibration,
            seed=seed,
            options=opts,
            device=device,
            evaluator=ev,
        )
        trail.append(
            {
                "encoded": cand.method,
                "keep": cand.keep,
                "value_bits": cand.value_bits,
                "fidelity_search": chosen.fidelity,
                "bits_per_param": chosen.bits_per_param,
            }
        )
    if chosen is None:
        chosen = compress(base_dir, ft_dir, out_path, method="lossless", evaluation="weights")
        trail.append({"encoded": "lossless", "reason": "no lossy candidate met the floor"})
    chosen.notes = [
        *chosen.notes,
        f"auto: floor {min_fidelity} on held-out calibration; "
        f"{len(trail)} steps in {time.perf_counter() - t0:.1f} s",
    ]
    chosen.trace = [{"auto": trail}, *chosen.trace]
    chosen.method = f"auto:{chosen.method}"
    chosen.total_seconds = time.perf_counter() - t0
    _record_trail(out_path, trail, min_fidelity)
    return chosen


def _record_trail(path: str | os.PathLike[str], trail: list[dict[str, Any]], floor: float) -> None:
    """Store auto's trail in the delta's document (rewrites the small container header)."""
    from core.delta_format import DeltaReader, rewrite_document

    with DeltaReader(path) as r:
        doc = r.doc
    doc.method["auto"] = {"min_fidelity": floor, "trail": trail}
    rewrite_document(path, doc)

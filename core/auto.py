"""``auto``: the smallest stored encoding whose fidelity stays above a floor.

What the floor measures is :func:`core.evaluate.relative_fidelity` of the rebuilt model against
the original fine-tune: top-1 agreement with its predictions (``fidelity`` on a classifier or a
causal LM; cosine similarity of mean-pooled states for an embedder), or its accuracy divided by
the fine-tune's (``accuracy``). docs/auto.md says it for users.

Candidates (method, keep ratio, value bits) are scored in memory, nothing written:

1. **Screen of the unsearched families** (``dare``, then ``hybrid`` when asked: low-rank
   factors plus a DARE residual at DARE's stored bits). They fit nothing, so every
   calibration example is fair evidence: they are judged on ``all`` of them. Fidelity rises
   with the keep ratio at a fixed value width, so each width is bisected over the keep ladder
   (≤ 4 evaluations for 8 keeps), widths that can only cost more than the best passing
   candidate so far are skipped, and a later family is judged only below the cheapest pass
   of the earlier ones. That pass (by estimated stored bits) bounds the rest.
2. **Searched candidates** (``nps-seeded``, a short search each) below that bound, from the
   largest down, judged on the **held-out** part only (never the part their search fitted);
   at most :data:`MAX_SEARCHED`, stopping at the first miss, and only while the search's
   predicted time (its evaluations × the measured cost of one) fits the time budget.
3. **Encoding.** The judged candidate itself is encoded (its fitted result is reused, not
   searched again), and the encoded delta's fidelity is measured again on the same examples.
   Under the floor (a rounding difference between the in-memory candidate and the codec), the
   next passing candidate is tried; when none is left, the exact ``lossless`` delta is stored
   and the trail and notes say the floor could not be met lossily. A choice of at least
   :data:`LOSSLESS_RIVAL_BITS` bits/param is encoded beside the exact delta too, and the exact
   one is kept when it stores no more (the trail says so).

The trail (``method.auto`` of the delta's document, and the first element of the result's
``trace``) says, for each judged candidate, its fidelity against the floor, on which part and
how many examples, and the seconds it took; its final step says what was encoded and why,
and per family judged its cheapest pass (or none) and how many of its candidates failed.
Progress is reported as one dict per candidate (docs/auto.md, "progress").
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from core.compress import build_evaluator, compress
from core.errors import InvalidArgument
from core.evaluate import Evaluator, combined, part_label, relative_fidelity
from core.methods import FitContext, Fitted, make_method
from core.methods.base import Progress
from core.methods.hybrid import HybridFitted
from core.methods.lowrank import PROBE_RANK, looks_low_rank, probe_ranks
from core.methods.nps import default_popsize
from core.params import (
    AUTO_CALIBRATION_LIMIT,
    DEFAULT_LOWRANK_KEEP,
    DEFAULT_MIN_FIDELITY,
    DEFAULT_SEED,
    CompressOutcome,
    Evaluation,
    Method,
)
from core.tensor_codec import Hybrid, LowRank, Selection, ValueSpec, lowrank_rows
from core.workspace import Workspace

#: 0.3 and 0.5 reach floors of top-1 agreement ≥ 0.99, which DARE at 20% may miss on a
#: fine-tune (tweets: 0.984 at 20%/4-bit, 0.998 at 50%/8-bit) — still 3–8× under lossless.
KEEPS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
#: The ladder's top rung, for DARE only: every entry kept, the values rounded to the width
#: (no drop, no rescale). DARE's drop is unbiased but adds noise as large as the dropped
#: entries; on a fine-tune whose predictions sit near ties (a 15-class WordNet task, test
#: accuracy 0.61) DARE at 50%/16-bit missed a 0.99 agreement floor and auto stored the
#: exact delta at 17 bits/param, where rounding every entry to a few bits passes.
FULL_KEEP = 1.0
#: A lossy choice storing at least this many bits/param is encoded beside the exact delta,
#: and the exact one is kept when it is no larger (a bf16 fine-tune's exact delta takes ~5).
LOSSLESS_RIVAL_BITS = 1.0
#: 3-bit values: at 2.5% keep they stored what 4-bit values at 2% did and kept more of the
#: gain on both benchmark tasks (bench/NOTES.md, third sitting); 3% is the nearby keep step
BITS = (1, 2, 3, 4, 8, 16)
#: ``lowrank``'s factor widths auto tries (each judged once: its rank rule is its own).
LOWRANK_BITS = (8, 16)
#: The families auto judges unless told otherwise: ``lowrank`` first where τ looks exactly
#: low-rank (a merged LoRA: :func:`core.methods.lowrank.looks_low_rank`; never otherwise), then
#: the DARE screen and the searched ``nps-seeded`` below it. ``hybrid`` is judged only when named:
#: on the real fine-tunes measured it stored what DARE did within noise (bench/results/hybrid.md).
METHODS = ("lowrank", "dare", "nps-seeded")
#: Seconds auto may spend judging before it stops trying searched candidates (the DARE
#: screen always completes; model loading and the final encoding come on top).
TIME_BUDGET = 180.0
#: Searched candidates tried at most, and their search length.
MAX_SEARCHED = 2
GENERATIONS = 4


@dataclass(frozen=True)
class Candidate:
    method: str
    keep: float
    value_bits: int
    #: bits per parameter counted from the candidate's own selections once judged (``lowrank``,
    #: whose ranks, and so size, are known only then)
    measured_bits: float | None = field(default=None, compare=False)

    @property
    def estimated_bits(self) -> float:
        """Stored bits per parameter, before zstd: values, plus positions if explicit."""
        if self.measured_bits is not None:
            return self.measured_bits
        if self.method == Method.LOWRANK:
            return math.inf  # not known before it is judged
        per_value = self.value_bits
        if self.method in ("magnitude", "magnitude-scaled", "nps"):
            r = self.keep
            entropy = -(r * math.log2(r) + (1 - r) * math.log2(1 - r)) if r < 1 else 0.0
            return self.keep * per_value + entropy
        return self.keep * per_value

    @property
    def searches(self) -> bool:
        return make_method(self.method, keep=self.keep).searches

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "keep": self.keep, "value_bits": self.value_bits}


def ladder(
    methods: tuple[str, ...] = ("dare", "nps-seeded"),  # the ladder of sparse candidates
    keeps: tuple[float, ...] = KEEPS,
    bits: tuple[int, ...] = BITS,
) -> list[Candidate]:
    """Every candidate, cheapest first (ties: the method order given)."""
    cands = [Candidate(m, k, b) for m in methods for k in keeps for b in bits]
    order = {m: i for i, m in enumerate(methods)}
    return sorted(cands, key=lambda c: (round(c.estimated_bits, 9), order[c.method]))


def _bisection_steps(n: int) -> int:
    """Evaluations a bisection over ``n`` ordered candidates takes at most."""
    return math.ceil(math.log2(n + 1)) if n else 0


@dataclass
class _Judged:
    candidate: Candidate
    fitted: Fitted
    parts: tuple[str, ...]
    fidelity: float
    passed: bool


def _options(method: str, generations: int) -> dict[str, Any]:
    return {"generations": generations} if method in (Method.NPS, Method.NPS_SEEDED) else {}


@dataclass
class _Run:
    """The state of one auto search: the trail, the clock, progress and the cost model."""

    ws: Workspace
    ev: Evaluator
    evaluation: str
    floor: float
    seed: int
    generations: int
    time_budget: float
    progress: Progress | None
    #: what the chosen candidate is encoded from, and where (constant for the run)
    base_dir: str | os.PathLike[str] = ""
    ft_dir: str | os.PathLike[str] = ""
    device: str | None = None
    t0: float = field(default_factory=time.perf_counter)
    trail: list[dict[str, Any]] = field(default_factory=list)
    judged: list[_Judged] = field(default_factory=list)
    evaluations: int = 0
    eval_seconds: float = 0.0  # seconds spent in model evaluations
    eval_examples: int = 0  # examples those evaluations covered
    #: upper bounds on the candidates still to judge: DARE screen, searched
    remaining_screen: int = 0
    remaining_searched: int = 0
    current_start: float = 0.0
    search_seconds: float = 0.0  # from auto's start to the encoding of its choice
    notes: list[str] = field(default_factory=list)
    factor_cache: dict[str, Any] = field(default_factory=dict)  # hybrid's, see HybridFitted
    probe: dict[str, Any] | None = None  # lowrank's probe (:func:`_low_rank`), when it ran

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def search_cost(self) -> float | None:
        """Predicted seconds of one searched candidate (None before any evaluation ran)."""
        if not self.eval_examples:
            return None
        per = self.eval_seconds / self.eval_examples
        m = make_method("nps-seeded", generations=self.generations)
        dims = 2 * int(getattr(m, "m", 8))
        popsize = getattr(m, "popsize", None) or default_popsize(dims)
        seed_trials = int(getattr(m, "seed_trials", 1))
        n_search = self.ev.part_size("search")
        n_hold = self.ev.part_size("holdout") if "holdout" in self.ev.parts else 0
        evals = seed_trials + 1 + self.generations * popsize
        return per * (evals * n_search + 4 * n_hold)

    def eta(self, running: Candidate | None) -> float | None:
        """Seconds still to go: the measured mean of a screen step for each step left, plus
        the predicted cost of each search that fits the budget; None until one step is done."""
        steps = [s["seconds"] for s in self.trail if "seconds" in s]
        if not steps:
            return None
        mean = sum(steps) / len(steps)
        now = time.perf_counter() - self.current_start
        left = mean * self.remaining_screen
        cost = self.search_cost() or 0.0
        if running is not None:
            left += max((cost if running.searches else mean) - now, 0.0)
        for _ in range(self.remaining_searched):
            if self.elapsed + left + cost <= self.time_budget:
                left += cost
        return round(left, 1)

    def report(self, cand: Candidate, fidelity: float | None, passed: bool | None) -> None:
        if self.progress is None:
            return
        running = fidelity is None
        self.progress(
            {
                "phase": "auto",
                "candidate_index": len(self.trail) + running,
                "candidates_total": len(self.trail)
                + running
                + self.remaining_screen
                + self.remaining_searched,
                "candidate": cand.describe(),
                "fidelity": fidelity,
                "floor": self.floor,
                "passed": passed,
                "elapsed_seconds": round(self.elapsed, 1),
                "eta_seconds": self.eta(cand if running else None),
            }
        )

    def judge(self, cand: Candidate) -> _Judged:
        """Fit (search) and score one candidate in memory; appends its trail step."""
        if cand.searches:
            self.remaining_searched = max(self.remaining_searched - 1, 0)
        else:
            self.remaining_screen = max(self.remaining_screen - 1, 0)
        self.current_start = t = time.perf_counter()
        self.report(cand, None, None)
        method = make_method(cand.method, keep=cand.keep, **_options(cand.method, self.generations))
        inner = None
        if self.progress is not None and cand.searches:
            # a search reports each generation: relay it as this candidate, still running
            inner = lambda _info: self.report(cand, None, None)  # noqa: E731
        ctx = FitContext(
            keep=cand.keep,
            value_bits=cand.value_bits,
            seed=self.seed,
            evaluator=self.ev,
            progress=inner,
        )
        fitted = method.fit(self.ws, ctx)
        assert fitted is not None
        if isinstance(fitted, HybridFitted):
            fitted.cache = self.factor_cache  # the factors do not depend on the keep
        stored = 0.0  # value bits of what is selected (lowrank's size)
        for plan in self.ws.delta_plans:
            spec = ValueSpec.from_bits(cand.value_bits, plan.dtype)
            if plan.name not in self.ev.tensor_names:
                if cand.method == Method.LOWRANK:
                    sel = fitted.select(plan, self.ws.tau(plan), spec)
                    stored += _stored_values(sel) * cand.value_bits
                continue
            sel = fitted.select(plan, self.ws.tau(plan), spec)
            stored += _stored_values(sel) * cand.value_bits
            if isinstance(sel, Selection):
                idx = torch.from_numpy(sel.positions)
                self.ev.apply_sparse(plan.name, idx, spec.round(sel.values))
            elif isinstance(sel, Hybrid):  # factors already rounded as stored
                res = sel.residual
                delta = lowrank_rows(sel.factors, 0, plan.shape[0]).reshape(-1)
                delta[torch.from_numpy(res.positions)] += spec.round(res.values)
                self.ev.apply(plan.name, delta)
            else:
                self.ev.apply(plan.name, lowrank_rows(sel, 0, plan.shape[0]).reshape(-1))
        # searched candidates are judged on the held-out part only; DARE on every example
        parts = ("holdout",) if cand.searches and "holdout" in self.ev.parts else self.ev.parts
        t_eval = time.perf_counter()
        score = combined(self.ev, parts)
        examples = sum(self.ev.part_size(p) for p in parts)
        self.eval_seconds += time.perf_counter() - t_eval
        self.eval_examples += examples
        fid = relative_fidelity(self.evaluation, score, combined(self.ev, parts, reference=True))
        self.evaluations += ctx.evaluations + len(parts)
        passed = fid >= self.floor
        self.trail.append(
            {
                "method": cand.method,
                "keep": cand.keep,
                "value_bits": cand.value_bits,
                "estimated_bits": round(cand.estimated_bits, 6),
                "fidelity": fid,
                "floor": self.floor,
                "passed": passed,
                "part": part_label(self.ev, parts),
                "examples": examples,
                "seconds": round(time.perf_counter() - t, 2),
            }
        )
        self.report(cand, fid, passed)
        if cand.method == Method.LOWRANK:
            cand = replace(cand, measured_bits=stored / max(self.ws.delta_numel, 1))
            self.trail[-1]["estimated_bits"] = round(cand.estimated_bits, 6)
        judged = _Judged(cand, fitted, tuple(parts), fid, passed)
        self.judged.append(judged)
        return judged


def _low_rank(run: _Run) -> bool:
    """Whether τ looks exactly low-rank (then ``lowrank`` is judged); ``run.probe`` says why."""
    t = time.perf_counter()
    ranks = probe_ranks(run.ws, seed=run.seed, device=run.ev.device)
    found = looks_low_rank(ranks)
    exact = sum(1 for r in ranks.values() if r > 0)
    run.probe = {
        "ranks": ranks,
        "judged": found,
        "reason": (
            f"{exact} of the {len(ranks)} matrices with the largest τ have an exact rank "
            f"≤ {PROBE_RANK} above rounding noise"
            + (": lowrank is judged" if found else "; fewer than half: lowrank is not judged")
        ),
        "seconds": round(time.perf_counter() - t, 2),
    }
    return found


def _stored_values(sel: Selection | LowRank | Hybrid) -> int:
    """Values a selection stores (kept entries, factor entries, or both)."""
    if isinstance(sel, Selection):
        return int(sel.positions.size)
    if isinstance(sel, Hybrid):
        return int(sel.factors.a.numel() + sel.factors.b.numel() + sel.residual.positions.size)
    return int(sel.a.numel() + sel.b.numel())


def _screen(run: _Run, dare: list[Candidate], bound: float = math.inf) -> Candidate | None:
    """The cheapest passing candidate of one unsearched family (DARE, the hybrid) that stores
    less than ``bound`` (None if none passes), judging few.

    Fidelity is taken to rise with the keep ratio at a width, and with the width at a keep
    (fewer value bits only add rounding). Widths are visited from the widest down; at each,
    the open keeps are those above every keep already seen to fail (a failure there fails at
    every narrower width too) and cheaper than the best pass so far. The largest open keep is
    judged first: if it fails, so does every open keep of this width and of the narrower ones
    at or below it; if it passes, the cheapest passing keep is bisected below it.
    """
    widths = sorted({c.value_bits for c in dare}, reverse=True)
    by_width = {
        b: sorted((c for c in dare if c.value_bits == b), key=lambda c: c.keep) for b in widths
    }
    best: Candidate | None = None
    failed_keep = 0.0  # the largest keep seen to fail (at this width or a wider one)

    def open_(b: int) -> list[Candidate]:
        limit = best.estimated_bits if best is not None else bound
        return [c for c in by_width[b] if c.keep > failed_keep and c.estimated_bits < limit - 1e-12]

    def plan(rest: list[int]) -> int:
        return sum(1 + _bisection_steps(len(open_(b)) - 1) for b in rest if open_(b))

    for i, b in enumerate(widths):
        cands = open_(b)
        if not cands:
            continue
        run.remaining_screen = 1 + _bisection_steps(len(cands) - 1) + plan(widths[i + 1 :])
        top = run.judge(cands[-1])
        if not top.passed:
            failed_keep = max(failed_keep, cands[-1].keep)
            continue
        lo, hi = 0, len(cands) - 1  # cands[hi] passes; find the first that does
        while lo < hi:
            mid = (lo + hi) // 2
            if run.judge(cands[mid]).passed:
                hi = mid
            else:
                failed_keep = max(failed_keep, cands[mid].keep)
                lo = mid + 1
        best = cands[hi]
    run.remaining_screen = 0
    return best


def _screen_families(run: _Run, unsearched: list[Candidate], bound: float = math.inf) -> float:
    """Screen each unsearched family in the order given (DARE, then the hybrid), each below
    the cheapest pass so far — a later family is judged only where it would store less than
    what already passed (and than ``bound``); returns the cheapest pass's estimated bits
    (``bound`` when none is cheaper)."""
    for family in dict.fromkeys(c.method for c in unsearched):
        best = _screen(run, [c for c in unsearched if c.method == family], bound)
        if best is not None:
            bound = best.estimated_bits
    return bound


def _searched_below(
    searched: list[Candidate], judged: list[_Judged], bound: float
) -> list[Candidate]:
    """The searched candidates worth a search, best first: cheaper than the DARE bound, at a
    width where DARE passed (a search moves rates and scales; it cannot undo the rounding of
    a width too narrow) — at any width when none passed — from the largest down (ties: the
    larger keep), at most :data:`MAX_SEARCHED`."""
    widths = {j.candidate.value_bits for j in judged if j.passed and not j.candidate.searches}
    fit = [
        c
        for c in searched
        if c.estimated_bits < bound - 1e-12 and (not widths or c.value_bits in widths)
    ]
    return sorted(fit, key=lambda c: (-c.estimated_bits, -c.keep))[:MAX_SEARCHED]


def _candidates(
    methods: tuple[str, ...], keep: float | None, value_bits: int | None
) -> list[Candidate]:
    keeps = KEEPS if keep is None else (keep,)
    bits = BITS if value_bits is None else (value_bits,)
    cands = ladder(tuple(m for m in methods if m != Method.LOWRANK), keeps, bits)
    if keep is None and Method.DARE in methods:
        cands += [Candidate(Method.DARE, FULL_KEEP, b) for b in bits]
    if Method.LOWRANK in methods:  # its own keep and rank rule; half precision or 8 bits
        lr_keep = DEFAULT_LOWRANK_KEEP if keep is None else keep
        cands += [Candidate(Method.LOWRANK, lr_keep, b) for b in LOWRANK_BITS if b in bits]
    return cands


def auto_compress(
    base_dir: str | os.PathLike[str],
    ft_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    min_fidelity: float = DEFAULT_MIN_FIDELITY,
    keep: float | None = None,
    value_bits: int | None = None,
    evaluation: str = Evaluation.FIDELITY,
    calibration: Any = None,
    seed: int = DEFAULT_SEED,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    methods: tuple[str, ...] = METHODS,
    generations: int = GENERATIONS,
    time_budget: float = TIME_BUDGET,
    evaluator: Evaluator | None = None,
    calibration_limit: int = AUTO_CALIBRATION_LIMIT,
) -> CompressOutcome:
    """Find and write the smallest encoding whose fidelity is ≥ ``min_fidelity``.

    Fidelity is relative to the original fine-tune (agreement for ``fidelity``, accuracy ratio
    for ``accuracy``); the recorded fidelity of what is stored is measured on the examples that
    judged it (see the module docstring). ``keep`` and ``value_bits``, when given, pin that
    dimension of the search. ``options`` may set ``generations`` (of each searched candidate)
    and ``time_budget`` (seconds). At most ``calibration_limit`` examples are evaluated on
    (a longer file is subsampled by ``seed``: :func:`core.params.calibration_sample`).

    Raises:
        InvalidArgument: no model evaluation (auto needs calibration data) or a bad floor.
    """
    if not 0 < min_fidelity <= 1:
        raise InvalidArgument("`min_fidelity` must be in (0, 1], e.g. `min_fidelity=0.99`")
    if evaluation == Evaluation.WEIGHTS:
        raise InvalidArgument(
            "auto needs a fidelity floor to check: pass `calibration` examples (and "
            "`evaluation=fidelity` or `evaluation=accuracy`)"
        )
    opts = dict(options or {})
    generations = int(opts.pop("generations", generations))
    time_budget = float(opts.pop("time_budget", time_budget))
    if opts:
        raise InvalidArgument(
            f"auto takes the options generations and time_budget only (got {', '.join(opts)})"
        )
    if value_bits is not None and value_bits not in BITS:
        raise InvalidArgument(f"auto searches value bits among {BITS} (got {value_bits})")
    t0 = time.perf_counter()
    with Workspace(base_dir, ft_dir) as ws:
        ev = evaluator or build_evaluator(
            evaluation,
            ws,
            ft_dir,
            calibration,
            seed=seed,
            device=device,
            calibration_limit=calibration_limit,
        )
        assert ev is not None
        ws.load_taus()
        run = _Run(
            ws,
            ev,
            evaluation,
            min_fidelity,
            seed,
            generations,
            time_budget,
            progress,
            base_dir=base_dir,
            ft_dir=ft_dir,
            device=device,
            t0=t0,
        )
        cands = _candidates(methods, keep, value_bits)
        if any(c.method == Method.LOWRANK for c in cands) and not _low_rank(run):
            cands = [c for c in cands if c.method != Method.LOWRANK]
        factored = [c for c in cands if c.method == Method.LOWRANK]
        unsearched = [c for c in cands if not c.searches and c.method != Method.LOWRANK]
        searched = [c for c in cands if c.searches]
        run.remaining_searched = min(MAX_SEARCHED, len(searched))
        # lowrank first, each width once: its size is counted from what it selected, and
        # a pass bounds every family after it (a merged LoRA's τ: far under any sparse one)
        bound = math.inf
        for c in factored:
            run.remaining_screen = 1
            j = run.judge(c)
            if j.passed:
                bound = min(bound, j.candidate.estimated_bits)
        bound = _screen_families(run, unsearched, bound)
        below = _searched_below(searched, run.judged, bound)
        run.remaining_screen, run.remaining_searched = 0, len(below)
        for c in below:
            predicted = run.search_cost()
            if predicted is not None and run.elapsed + predicted > time_budget:
                run.notes.append(
                    f"auto: searched candidate {c.method} at keep {c.keep:g}, {c.value_bits}-bit "
                    f"not tried: its search would take ≈{predicted:.0f} s, past the "
                    f"{time_budget:.0f} s budget ({run.elapsed:.0f} s used; "
                    "options.time_budget raises it)"
                )
                break
            if not run.judge(c).passed:
                break
        run.remaining_searched = 0
        run.search_seconds = run.elapsed
        result = _encode_best(run, out_path)
    result = replace(
        result,
        search_seconds=run.search_seconds,
        total_seconds=time.perf_counter() - t0,
        evaluations=run.evaluations + result.evaluations,
    )
    return _record_trail(out_path, run, result)


def _lossless(run: _Run, out_path: str | os.PathLike[str]) -> CompressOutcome:
    """The exact delta, its fidelity (1.0) recorded on every calibration part."""
    return compress(
        run.base_dir,
        run.ft_dir,
        out_path,
        method=Method.LOSSLESS,
        evaluation=run.evaluation,
        device=run.device,
        progress=run.progress,
        evaluator=run.ev,
        judge_parts=run.ev.parts,
    )


def _exact_if_smaller(
    run: _Run, lossy: CompressOutcome, out_path: str | os.PathLike[str]
) -> CompressOutcome | None:
    """The exact delta, written over ``out_path``, when it stores no more than ``lossy`` (a
    choice of at least :data:`LOSSLESS_RIVAL_BITS` bits/param); else None."""
    if lossy.bits_per_param < LOSSLESS_RIVAL_BITS:
        return None
    rival = f"{os.fspath(out_path)}.exact.tmp"
    try:
        exact = _lossless(run, rival)
        if exact.stored_bytes > lossy.stored_bytes:
            return None
        os.replace(rival, out_path)
        return replace(exact, path=os.fspath(out_path))
    finally:
        if os.path.exists(rival):
            os.unlink(rival)


def _encode_best(run: _Run, out_path: str | os.PathLike[str]) -> CompressOutcome:
    """Encode the cheapest passing candidate (its fitted result, not a fresh search) and check
    the encoded delta on the examples that judged it; the next one if it falls under the floor;
    lossless when none is left, or when the exact delta stores no more than the choice."""
    passing = sorted(
        (j for j in run.judged if j.passed), key=lambda j: round(j.candidate.estimated_bits, 9)
    )
    for j in passing:
        c = j.candidate
        result = compress(
            run.base_dir,
            run.ft_dir,
            out_path,
            method=c.method,
            keep=c.keep,
            value_bits=c.value_bits,
            evaluation=run.evaluation,
            seed=run.seed,
            options=_options(c.method, run.generations),
            device=run.device,
            progress=run.progress,  # "encode": the job shows it, and a cancel stops it
            evaluator=run.ev,
            fitted=j.fitted,
            judge_parts=j.parts,
        )
        fid = result.fidelity if result.fidelity is not None else math.nan
        if fid < run.floor:
            run.notes.append(
                f"auto: {c.method} at keep {c.keep:g}, {c.value_bits}-bit passed in memory "
                f"({j.fidelity:.4f}) but {fid:.4f} as encoded, under the floor; next candidate"
            )
            continue
        exact = _exact_if_smaller(run, result, out_path)
        if exact is not None:
            reason = (
                f"the smallest candidate that met the floor, {c.method} at keep {c.keep:g}, "
                f"{c.value_bits}-bit, stored {result.bits_per_param:.3f} bits/param; the exact "
                f"delta stores {exact.bits_per_param:.3f}: the exact one is kept"
            )
            return _stored_exact(run, exact, reason, f"auto: {reason}")
        run.trail.append(
            {
                "encoded": c.method,
                "keep": c.keep,
                "value_bits": c.value_bits,
                "fidelity": fid,
                "bits_per_param": result.bits_per_param,
                "families": _families(run),
                "reason": (
                    f"the smallest candidate that met the floor {run.floor}: fidelity "
                    f"{fid:.4f} as stored, on {part_label(run.ev, j.parts)} "
                    f"({sum(run.ev.part_size(p) for p in j.parts)} examples)"
                ),
            }
        )
        return replace(
            result,
            notes=[
                *result.notes,
                f"auto chose {c.method} at keep {c.keep:g}, {c.value_bits}-bit values: "
                f"fidelity {fid:.4f} ≥ floor {run.floor} as stored, measured on "
                f"{part_label(run.ev, j.parts)} ({sum(run.ev.part_size(p) for p in j.parts)} "
                f"examples); {len(run.judged)} candidates judged in {run.search_seconds:.1f} s",
            ],
        )
    reason = (
        f"no lossy candidate met the floor {run.floor} "
        f"(best {max((j.fidelity for j in run.judged), default=math.nan):.4f}): "
        "the exact (lossless) delta is stored"
    )
    return _stored_exact(
        run,
        _lossless(run, out_path),
        reason,
        f"auto: the floor {run.floor} could not be met lossily ({len(run.judged)} candidates "
        f"judged in {run.search_seconds:.1f} s); stored exact. Lower `min_fidelity` for a "
        "smaller delta",
    )


def _stored_exact(run: _Run, result: CompressOutcome, reason: str, note: str) -> CompressOutcome:
    run.trail.append(
        {
            "encoded": "lossless",
            "keep": None,
            "value_bits": None,
            "fidelity": result.fidelity,
            "bits_per_param": result.bits_per_param,
            "families": _families(run),
            "reason": reason,
        }
    )
    return replace(result, notes=[*result.notes, note])


def _families(run: _Run) -> dict[str, Any]:
    """Per family judged, its cheapest passing candidate in memory (``estimated_bits``,
    fidelity), or None with how many of its candidates failed: why one family won."""
    out: dict[str, Any] = {}
    for j in run.judged:
        c = j.candidate
        entry = out.setdefault(c.method, {"passed": None, "failed": 0})
        if not j.passed:
            entry["failed"] += 1
        elif entry["passed"] is None or c.estimated_bits < entry["passed"]["estimated_bits"]:
            entry["passed"] = {**c.describe(), "estimated_bits": round(c.estimated_bits, 6)}
            entry["passed"]["fidelity"] = j.fidelity
    return out


def _record_trail(
    path: str | os.PathLike[str], run: _Run, result: CompressOutcome
) -> CompressOutcome:
    """Store auto's trail, notes and search time in the delta's document, then take the sizes
    of the file as rewritten (the document is part of what is stored and downloaded). The
    trail's final step reports bits/param, which the document's own length changes: the size
    is settled in memory first, so the container is rewritten once."""
    from core.delta_format import DeltaReader, rewrite_document, rewritten_size
    from core.summary import delta_sizes, sizes_of

    result = replace(
        result,
        notes=[*result.notes, *run.notes],
        trace=[{"auto": run.trail}, *result.trace],
        method=f"auto:{result.method}",
    )
    final = run.trail[-1]
    with DeltaReader(path) as reader:
        doc = reader.doc
        doc.method["auto"] = {
            "min_fidelity": run.floor,
            "trail": run.trail,
            "search_seconds": result.search_seconds,
            "candidates": len(run.judged),
        }
        if run.probe is not None:
            doc.method["auto"]["lowrank_probe"] = run.probe
        doc.evaluation["search_seconds"] = result.search_seconds
        doc.evaluation["evaluations"] = result.evaluations
        doc.evaluation["notes"] = result.notes
        # bits/param's digits change the (compressed) length it reports: the size only grows
        # until the document fits in it, and the header is padded to it
        size = rewritten_size(reader, doc)
        for _ in range(8):
            final["bits_per_param"] = sizes_of(doc, size)["bits_per_param"]
            natural = rewritten_size(reader, doc)
            if natural <= size:
                break
            size = natural
    rewrite_document(path, doc, min_size=size)
    return replace(result, **delta_sizes(path))  # the file's own, whatever the loop settled

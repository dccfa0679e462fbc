"""Compression: (base, fine-tune) → a delta file, tensor at a time.

The pipeline: plan tensors → build the fitness (when a model can be evaluated) → fit the
method → one streamed encoding pass that writes each tensor's frames, decodes them again to
hash the reconstructed files and to score exactly what was stored → write the container.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Any

import torch

from core.checkpoint import CheckpointDir
from core.constants import DTYPES, FLOAT_DTYPES, PIECE_BYTES, ZSTD_LEVEL
from core.delta_format import DeltaDoc, DeltaWriter, FileEntry, TensorEntry
from core.errors import InvalidArgument
from core.evaluate import (
    Evaluator,
    Example,
    ModelEvaluator,
    Score,
    combined,
    load_calibration,
    part_label,
    relative_fidelity,
)
from core.files import sha256_file
from core.frames import zstd_compress
from core.methods import FitContext, Fitted, make_method
from core.methods.base import Progress
from core.methods.lowrank import factor_spec
from core.params import (
    DEFAULT_CALIBRATION_LIMIT,
    DEFAULT_KEEP,
    DEFAULT_SEED,
    DEFAULT_VALUE_BITS,
    EVAL_KINDS,
    VALUE_BITS,
    CompressOutcome,
    CompressParams,
    Evaluation,
    Method,
    calibration_sample,
    default_calibration_limit,
    default_keep,
)
from core.reconstruct import RebuildHasher, tensor_pieces
from core.safetensors_io import tensor_to_bytes
from core.summary import delta_sizes
from core.tensor_codec import (
    Hybrid,
    LowRank,
    Selection,
    ValueSpec,
    decode_hybrid,
    decode_lowrank,
    decode_sparse,
    encode_hybrid,
    encode_lowrank,
    encode_sparse,
    hybrid_rows,
    lowrank_rows,
)
from core.workspace import Workspace
from core.xor import CASTS, XorEncoder, cast_base


def build_evaluator(
    evaluation: str,
    ws: Workspace,
    ft_dir: str | os.PathLike[str],
    calibration: str | os.PathLike[str] | list[Example] | None,
    *,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    device: str | None = None,
    max_length: int = 64,
    batch_size: int = 64,
    calibration_limit: int = DEFAULT_CALIBRATION_LIMIT,
) -> ModelEvaluator | None:
    """The fitness for an evaluation kind (None for ``weights``).

    At most ``calibration_limit`` examples are evaluated on (:func:`calibration_sample`
    with ``seed`` picks them from a longer file); a quarter of them is held out when there are
    32 or more."""
    if evaluation not in EVAL_KINDS:
        raise InvalidArgument(f"evaluation must be one of {', '.join(EVAL_KINDS)}")
    if evaluation == Evaluation.WEIGHTS:
        return None
    if calibration is None:
        raise InvalidArgument(
            f"`evaluation={evaluation}` needs `calibration` examples (a JSONL file of texts)"
        )
    examples = (
        calibration
        if isinstance(calibration, list)
        else load_calibration(calibration, need_labels=evaluation == "accuracy")
    )
    given = len(examples)
    examples = calibration_sample(examples, calibration_limit, seed)
    rnd = random.Random(seed)
    order = list(range(len(examples)))
    rnd.shuffle(order)
    n_hold = int(len(examples) * holdout_fraction) if len(examples) >= 32 else 0
    hold = [examples[i] for i in sorted(order[:n_hold])]
    search = [examples[i] for i in sorted(order[n_hold:])]
    return ModelEvaluator(
        evaluation,
        ft_dir,
        ws.base,
        ws.plans,
        search,
        holdout=hold,
        device=device,
        max_length=max_length,
        batch_size=batch_size,
        given=given,
    )


def calibration_counts(evaluator: Evaluator | None) -> tuple[int | None, int | None]:
    """(calibration examples evaluated on, examples given) — None without a model."""
    if evaluator is None:
        return None, None
    used = sum(evaluator.part_size(p) for p in evaluator.parts)
    return used, getattr(evaluator, "calibration_given", None) or used


def compress(
    base_dir: str | os.PathLike[str],
    ft_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    method: str = Method.MAGNITUDE,
    keep: float | None = None,
    value_bits: int = DEFAULT_VALUE_BITS,
    evaluation: str = Evaluation.WEIGHTS,
    calibration: str | os.PathLike[str] | list[Example] | None = None,
    seed: int = DEFAULT_SEED,
    options: dict[str, Any] | None = None,
    device: str | None = None,
    level: int = ZSTD_LEVEL,
    progress: Progress | None = None,
    evaluator: Evaluator | None = None,
    fitted: Fitted | None = None,
    judge_parts: tuple[str, ...] | None = None,
    calibration_limit: int = DEFAULT_CALIBRATION_LIMIT,
) -> CompressOutcome:
    """Compress a fine-tune against its base into a delta file.

    Args:
        base_dir: the base model directory.
        ft_dir: the fine-tuned model directory (same architecture, saved with safetensors).
        out_path: the delta file to write (atomically).
        method: a registered method name (``nps``, ``nps-seeded``, ``magnitude``,
            ``magnitude-scaled``, ``dare``, ``lossless``).
        keep: keep ratio r (default: :func:`core.params.default_keep` of the method).
        value_bits: 32, 16 (fp16/bf16) or 8/4/3/2/1 (quantised, sign + levels).
        evaluation: ``fidelity``, ``accuracy`` or ``weights``.
        calibration: JSONL path (or examples) for model evaluations.
        seed: seed of searches and seeded masks.
        options: extra method options (e.g. ``{"generations": 30}``).
        device: ``cuda``/``cpu`` (default: ``cuda`` when present).
        level: zstd level of the frames.
        progress: callback for search progress; may raise ``Cancelled``.
        evaluator: a prebuilt evaluator (reused across calls by benchmarks and ``auto``).
        fitted: the method already fitted on this workspace (``auto`` stores the candidate it
            judged, not a fresh search); the fit is then skipped.
        judge_parts: the calibration parts the recorded fidelity is measured on (default: the
            ``search`` part); recorded in the document as ``fidelity_part`` with the number of
            examples.
        calibration_limit: how many calibration examples the evaluation uses at most
            (a longer file is subsampled by ``seed``, see :func:`build_evaluator`).

    Returns:
        A :class:`core.params.CompressOutcome`.

    Example:
        >>> compress("base/", "ft/", "ft.slim", method="dare", keep=0.02, value_bits=4)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if value_bits not in VALUE_BITS:
        raise InvalidArgument(f"value bits must be one of {VALUE_BITS} (got {value_bits})")
    if keep is None:
        keep = default_keep(method) or DEFAULT_KEEP
    m = make_method(
        method, **({} if method == Method.LOSSLESS else {"keep": keep}), **(options or {})
    )
    with Workspace(base_dir, ft_dir) as ws:
        if evaluator is None:
            evaluator = build_evaluator(
                evaluation,
                ws,
                ft_dir,
                calibration,
                seed=seed,
                device=device,
                calibration_limit=calibration_limit,
            )
        ctx = FitContext(
            keep=keep, value_bits=value_bits, seed=seed, evaluator=evaluator, progress=progress
        )
        reference = removed = None
        parts: tuple[str, ...] = ()
        if evaluator is not None:
            parts = judge_parts or ("search",)
            reference = combined(evaluator, parts, reference=True)
            removed = _score_removed(ctx, parts)
        t_search = time.perf_counter()
        if fitted is None:
            fitted = m.fit(ws, ctx)
        search_seconds = time.perf_counter() - t_search
        if progress is not None:
            progress({"phase": "encode"})
        writer = DeltaWriter(out_path)
        try:
            doc, kept = _encode(ws, fitted, m.name, value_bits, level, writer, ctx)
            doc.method = {
                "name": m.name,
                "paper": m.paper,
                "params": (fitted.params if fitted else {})
                | {"value_bits": value_bits, "seed": seed},
                "result": fitted.result if fitted else {},
            }
            after = combined(evaluator, parts) if evaluator is not None else None
            if evaluator is not None:
                ctx.evaluations += 1
            fidelity = (
                relative_fidelity(evaluation, after, reference) if after and reference else None
            )
            notes = list(fitted.notes) if fitted else []
            used, given = calibration_counts(evaluator)
            if used is not None and given is not None and given > used:
                notes.append(
                    f"calibration: {used} of the {given} examples given were evaluated on (a "
                    f"subsample drawn with seed {seed}; `calibration_limit` sets how many)"
                )
            doc.evaluation = {
                "kind": evaluation,
                "reference": reference.metrics if reference else None,
                "removed": removed.metrics if removed else None,
                "after": after.metrics if after else None,
                "fitness_before": fitted.result.get("fitness_start") if fitted else None,
                "fitness_after": after.fitness if after else None,
                "fidelity": fidelity,
                # the examples the fidelity was measured on
                "fidelity_part": part_label(evaluator, parts) if evaluator is not None else None,
                "fidelity_examples": sum(evaluator.part_size(p) for p in parts)
                if evaluator is not None
                else None,
                "calibration_used": used,
                "calibration_given": given,
                "objective": evaluator.objective if evaluator is not None else None,
                # what the model computed in (bf16 only where the device has bf16 arithmetic)
                "compute_dtype": str(evaluator.dtype).removeprefix("torch.")
                if evaluator is not None
                else None,
                "search_seconds": search_seconds,
                "evaluations": ctx.evaluations,
                "trace": fitted.trace if fitted else [],
                "notes": notes,
            }
            writer.finish(doc)
        except BaseException:
            writer.abort()
            raise
    return CompressOutcome(
        path=str(out_path),
        method=m.name,
        keep=None if m.lossless else keep,
        value_bits=None if m.lossless else value_bits,
        evaluation=evaluation,
        **delta_sizes(out_path),
        num_params=ws.num_params,
        kept=kept,
        fitness_before=doc.evaluation["fitness_before"],
        fitness_after=doc.evaluation["fitness_after"],
        fidelity=doc.evaluation["fidelity"],
        fidelity_part=doc.evaluation["fidelity_part"],
        fidelity_examples=doc.evaluation["fidelity_examples"],
        calibration_used=used,
        calibration_given=given,
        fitness_objective=doc.evaluation["objective"],
        metrics_after=doc.evaluation["after"] or {},
        metrics_removed=doc.evaluation["removed"] or {},
        metrics_reference=doc.evaluation["reference"] or {},
        search_seconds=search_seconds,
        total_seconds=time.perf_counter() - t0,
        evaluations=ctx.evaluations,
        notes=doc.evaluation["notes"],
        trace=doc.evaluation["trace"],
    )


def compress_request(
    base_dir: str | os.PathLike[str],
    ft_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    params: CompressParams,
    *,
    device: str | None = None,
    progress: Progress | None = None,
) -> CompressOutcome:
    """A compression as a user asks for it (``slim compress`` and the service's worker both
    call this): the parameters are resolved (:meth:`core.params.CompressParams.resolve`, the
    one place defaults are applied), then ``auto`` searches or the method runs.

    Raises:
        InvalidArgument: ``min_fidelity`` with a method other than ``auto``.
    """
    p = params.resolve()
    assert p.method is not None and p.evaluation is not None and p.seed is not None
    common: dict[str, Any] = {
        "evaluation": str(p.evaluation),
        "calibration": list(p.calibration) if p.calibration else None,
        "seed": p.seed,
        "options": dict(p.options) or None,
        "device": device,
        "progress": progress,
        "calibration_limit": p.calibration_limit or default_calibration_limit(p.method),
    }
    if p.method == Method.AUTO:
        from core.auto import auto_compress

        return auto_compress(
            base_dir,
            ft_dir,
            out_path,
            min_fidelity=p.floor,
            keep=p.keep,
            value_bits=p.value_bits,
            **common,
        )
    if p.min_fidelity is not None:
        raise InvalidArgument(
            f"a fidelity floor goes with method auto, not {p.method}: drop `min_fidelity` or "
            "use `method=auto`"
        )
    # lossless records no keep or value bits: compress's own defaults stand for them
    pinned: dict[str, Any] = {"keep": p.keep, "value_bits": p.value_bits}
    return compress(
        base_dir,
        ft_dir,
        out_path,
        method=str(p.method),
        **{k: v for k, v in pinned.items() if v is not None},
        **common,
    )


def _score_removed(ctx: FitContext, parts: tuple[str, ...]) -> Score:
    """The fitness with the whole task vector removed (base weights + the fine-tune's heads)."""
    assert ctx.evaluator is not None
    for name in ctx.evaluator.tensor_names:
        ctx.evaluator.apply(name, None)
    ctx.evaluations += 1
    return combined(ctx.evaluator, parts)


def base_fingerprint(base: CheckpointDir) -> dict[str, Any]:
    """Identity of a base: sha256 over its weight files' sha256s, plus their names and sizes."""
    files = [
        {"path": rel, "size": h.file_size, "sha256": sha256_file(base.root / rel)}
        for rel, h in base.headers.items()
    ]
    digest = hashlib.sha256(
        "".join(f"{f['path']}\0{f['sha256']}\n" for f in files).encode()
    ).hexdigest()
    return {"sha256": digest, "num_params": base.num_params, "files": files}


def _encode(
    ws: Workspace,
    fitted: Fitted | None,
    method: str,
    value_bits: int,
    level: int,
    writer: DeltaWriter,
    ctx: FitContext,
) -> tuple[DeltaDoc, int]:
    """Write every frame; returns the document (without method/evaluation) and kept count."""
    base_aux = {sha256_file(ws.base.root / rel): rel for rel in ws.base.aux_files}
    plans = {p.name: p for p in ws.plans}
    files: list[FileEntry] = []
    tensors: list[TensorEntry] = []
    kept = 0
    for fi, (rel, header) in enumerate(ws.ft.headers.items()):
        hasher = RebuildHasher(header.raw)
        entry = FileEntry(
            path=rel,
            role="weights",
            size=header.file_size,
            sha256=sha256_file(ws.ft.root / rel),
            header_frame=writer.add(f"h{fi}", zstd_compress(header.raw, level)),
            header_size=len(header.raw),
        )
        for name in header.tensors:
            plan = plans[name]
            prefix = f"t{len(tensors)}"
            te = TensorEntry(name=name, kind="dense", dtype=plan.dtype, shape=list(plan.shape))
            writer.forget_recent()
            delta_for_eval: torch.Tensor | None = None
            if plan.kind == "dense":
                te.frame = writer.add(
                    prefix, zstd_compress(tensor_to_bytes(ws.ft.get(name)), level)
                )
            else:
                base_ref = ws.base.tensors[plan.base_name or ""]
                te.base_name, te.base_dtype = plan.base_name, base_ref.info.dtype
                sel: Selection | LowRank | Hybrid | None = None
                if fitted is None:  # lossless
                    _encode_lossless(ws, te, prefix, writer, level)
                else:
                    spec = ValueSpec.from_bits(value_bits, plan.dtype)
                    if fitted.streams:  # τ a slice at a time: never whole in memory
                        sel = fitted.select_slices(plan, ws.tau_slices(plan), spec)
                    else:
                        tau = ws.tau(plan)
                        sel = fitted.select(plan, tau, spec) if bool(tau.any()) else None
                        del tau  # not held while the tensor is rebuilt and hashed below
                    if sel is None:
                        te.kind = "same"  # τ is all zero
                if isinstance(sel, Hybrid):
                    encode_hybrid(te, prefix, sel, spec, writer, level)
                    kept += (te.rank or 0) * sum(plan.shape) + te.nnz
                    sel = None
                    if ctx.evaluator is not None:
                        delta_for_eval = hybrid_rows(
                            *decode_hybrid(te, writer), 0, plan.shape[0]
                        ).reshape(-1)
                elif isinstance(sel, LowRank):
                    encode_lowrank(te, prefix, sel, factor_spec(spec), writer, level)
                    sel = None
                    kept += (te.rank or 0) * sum(plan.shape)  # stored factor values
                    if ctx.evaluator is not None:
                        delta_for_eval = lowrank_rows(
                            decode_lowrank(te, writer), 0, plan.shape[0]
                        ).reshape(-1)
                elif sel is not None:
                    encode_sparse(te, prefix, sel, spec, writer, level)
                    sel = None
                    kept += te.nnz
                    if ctx.evaluator is not None:
                        positions, values = decode_sparse(te, writer)
                        delta_for_eval = torch.zeros(plan.numel, dtype=torch.float32)
                        delta_for_eval[torch.from_numpy(positions)] = values
            for piece in tensor_pieces(te, writer, ws.base):
                hasher.update(piece)
            if (
                ctx.evaluator is not None
                and plan.kind == "delta"
                and name in ctx.evaluator.tensor_names
            ):
                if te.kind == "same":
                    ctx.evaluator.apply(name, torch.zeros(plan.numel))
                elif te.kind in ("lossless", "dense"):  # dense: exact, the base's dtype differs
                    ctx.evaluator.apply(name, ws.tau(plan))
                else:
                    ctx.evaluator.apply(name, delta_for_eval)
            tensors.append(te)
        hasher.record(entry)
        if method == "lossless" and entry.recon_sha256 != entry.sha256:
            raise AssertionError(f"lossless reconstruction of {rel} is not bit-identical")
        files.append(entry)
    for ai, rel in enumerate(ws.ft.aux_files):
        path = ws.ft.root / rel
        digest = sha256_file(path)
        entry = FileEntry(path=rel, role="aux", size=path.stat().st_size, sha256=digest)
        if digest in base_aux:
            entry.base_path = base_aux[digest]
        else:
            entry.frame = writer.add(f"a{ai}", zstd_compress(path.read_bytes(), level))
        files.append(entry)
    doc = DeltaDoc(
        base=base_fingerprint(ws.base),
        method={},
        evaluation={},
        stats={
            "num_params": ws.num_params,
            "delta_params": ws.delta_numel,
            "kept": kept,
            "dtypes": sorted({p.dtype for p in ws.plans}),
        },
        files=files,
        tensors=tensors,
    )
    return doc, kept


def _encode_lossless(
    ws: Workspace, te: TensorEntry, prefix: str, writer: DeltaWriter, level: int
) -> None:
    """Exact coding of one tensor: planes of its residual against the base (floats: ``ulp``,
    else XOR) fed a piece at a time (neither tensor is ever whole), ``same`` where the bytes
    are equal. When the base's dtype differs, the residual is against the base converted to
    the fine-tune's dtype (``base_cast``, pairs of :data:`core.xor.CASTS`), or it is dense."""
    plan_dtype = te.dtype
    base_info = ws.base.tensors[te.base_name or ""].info
    cast = base_info.dtype != plan_dtype
    if cast and (base_info.dtype, plan_dtype) not in CASTS:
        te.kind = "dense"
        te.base_name = te.base_dtype = None
        ft_t = ws.ft.get(te.name).reshape(-1)
        te.frame = writer.add(prefix, zstd_compress(tensor_to_bytes(ft_t), level))
        return
    width, bwidth = DTYPES[plan_dtype][0], DTYPES[base_info.dtype][0]
    n = ws.ft.tensors[te.name].info.numel
    residual = "ulp" if plan_dtype in FLOAT_DTYPES else "xor"
    enc = XorEncoder(width, n, level, residual)
    step = max(PIECE_BYTES // max(width, bwidth), 1)
    for i in range(0, n, step):
        k = min(step, n - i)
        base_raw = ws.base.read_bytes(base_info.name, i * bwidth, k * bwidth)
        if cast:
            base_raw = cast_base(base_raw, base_info.dtype, plan_dtype).data.cast("B")
        enc.add(ws.ft.read_bytes(te.name, i * width, k * width), base_raw)
    frame, planes = enc.finish()
    if enc.equal and not cast:  # a cast stays lossless: `same` casts by torch's NaN rules
        te.kind = "same"
        return
    te.kind = "lossless"
    te.planes = planes
    te.base_cast = True if cast else None
    te.residual = None if residual == "xor" else residual
    te.frame = writer.add(prefix, frame)

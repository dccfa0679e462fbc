"""Merging several deltas of one base into a new delta (the paper's "fusion" use).

- ``task_arithmetic``: τ = λ Σ_i τ_i (Ilharco et al., "Editing Models with Task Arithmetic",
  ICLR 2023, https://arxiv.org/abs/2212.04089).
- ``ties``: trim each τ_i to its top ``density`` by magnitude (per tensor), elect the sign of
  Σ τ_i per entry, average the entries that agree with it (disjoint mean), × λ (Yadav et al.,
  NeurIPS 2023, https://arxiv.org/abs/2306.01708).

Tensors that exist only in the fine-tunes (a classifier head, a resized embedding) cannot be
merged meaningfully — two heads map different features to different labels — so they are never
averaged: when the deltas agree on them (the same bytes), they are kept; when they differ, the
caller names the parent whose own tensors, file layout and non-weight files (``config.json``
with its label names) the merged delta takes (``heads_from``), or the merge is refused. The
merged delta records which parent that was. The base must be the same for every delta.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.checkpoint import CheckpointDir
from core.compress import base_fingerprint
from core.constants import ZSTD_LEVEL
from core.delta_format import DeltaDoc, DeltaReader, DeltaWriter, FileEntry, TensorEntry
from core.errors import BaseMismatch, InvalidArgument
from core.params import DEFAULT_LAMBDA, DEFAULT_MERGE_METHOD, DEFAULT_VALUE_BITS, MERGE_METHODS
from core.reconstruct import RebuildHasher, check_base, tensor_bytes, weight_header
from core.safetensors_io import bytes_to_tensor
from core.tensor_codec import (
    Selection,
    ValueSpec,
    decode_hybrid,
    decode_lowrank,
    dense_delta,
    encode_sparse,
    hybrid_rows,
    lowrank_rows,
)


@dataclass
class MergeResult:
    path: str
    method: str
    sources: int
    stored_bytes: int
    kept: int
    heads_from: int  # index of the delta whose own (non-base) tensors and files were taken
    own_tensors: list[str]  # those tensors' names (empty when the fine-tunes add none)


def task_delta(entry: TensorEntry, reader: DeltaReader, base: CheckpointDir) -> torch.Tensor | None:
    """The decoded τ of one tensor (None when it is not a base tensor). # (numel,) float32"""
    if entry.kind == "sparse":
        return dense_delta(entry, reader)
    if entry.kind == "same":
        return torch.zeros(entry.numel, dtype=torch.float32)
    if entry.kind == "lowrank":
        return lowrank_rows(decode_lowrank(entry, reader), 0, entry.shape[0]).reshape(-1)
    if entry.kind == "hybrid":
        return hybrid_rows(*decode_hybrid(entry, reader), 0, entry.shape[0]).reshape(-1)
    if entry.kind == "lossless":
        ft = bytes_to_tensor(tensor_bytes(entry, reader, base), entry.dtype, (entry.numel,))
        assert entry.base_name is not None
        return ft.to(torch.float32) - base.get(entry.base_name).reshape(-1).to(torch.float32)
    return None


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of |τ| (per tensor). # (numel,)"""
    nz = int(torch.count_nonzero(tau))
    k = int(np.ceil(density * tau.numel()))
    if k >= nz:
        return tau
    thr = torch.topk(tau.abs(), k, sorted=False).values.min()
    return torch.where(tau.abs() >= thr, tau, torch.zeros_like(tau))


def merge_tensors(
    taus: list[torch.Tensor], method: str, lam: float, density: float | None
) -> torch.Tensor:
    """Merge one tensor's task vectors. # (numel,) float32"""
    stack = torch.stack(taus)  # (n, numel)
    if method == "task_arithmetic":
        return lam * stack.sum(0)
    if density is not None:
        stack = torch.stack([trim(t, density) for t in stack])
    sign = torch.sign(stack.sum(0))  # (numel,) elected sign
    agree = (torch.sign(stack) == sign) & (stack != 0)  # (n, numel)
    total = (stack * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return lam * total / count


def merge(
    base_dir: str | os.PathLike[str],
    deltas: list[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    method: str = DEFAULT_MERGE_METHOD,
    lam: float = DEFAULT_LAMBDA,
    density: float | None = None,
    value_bits: int = DEFAULT_VALUE_BITS,
    level: int = ZSTD_LEVEL,
    heads_from: int | None = None,
) -> MergeResult:
    """Merge deltas of one base into a new delta.

    Args:
        base_dir: the base all deltas were made from.
        deltas: two or more delta files.
        out_path: the merged delta to write.
        method: ``task_arithmetic`` or ``ties``.
        lam: λ, the scale of the merged task vector.
        density: TIES trim density per tensor (None keeps each delta's entries as stored).
        value_bits: 32 or 16 for the merged values.
        heads_from: index in ``deltas`` of the parent whose tensors that are not in the base
            (heads), file layout and non-weight files are taken. Needed only when the deltas'
            own tensors differ; default: the first delta when they are all the same.

    Raises:
        InvalidArgument: bad method, fewer than two deltas, bad ``heads_from``, or own
            tensors that differ between the deltas with no ``heads_from`` named.
        BaseMismatch: deltas of different bases, or a base tensor missing from one.
    """
    if method not in MERGE_METHODS:
        raise InvalidArgument(f"merge method must be one of {', '.join(MERGE_METHODS)}")
    if len(deltas) < 2:
        raise InvalidArgument("merging needs at least two deltas")
    if value_bits not in (16, 32):
        raise InvalidArgument("merged values are stored with 16 or 32 bits")
    readers = [DeltaReader(p) for p in deltas]
    base = CheckpointDir.open(base_dir)
    try:
        fps = {r.doc.base.get("sha256") for r in readers}
        if len(fps) != 1:
            raise BaseMismatch(
                "the deltas were made from different bases; merge deltas of one base"
            )
        for r in readers:
            check_base(r, base)
        source = _heads_source(readers, base, heads_from)
        ordered = [readers[source], *(r for i, r in enumerate(readers) if i != source)]
        heads = f"delta {source + 1} of {len(readers)} ({Path(deltas[source]).name})"
        result = _merge(base, ordered, out_path, method, lam, density, value_bits, level, heads)
        result.heads_from = source
        return result
    finally:
        for r in readers:
            r.close()
        base.close()


def own_tensors(reader: DeltaReader, base: CheckpointDir) -> dict[str, bytes]:
    """A delta's tensors that are not in the base (heads, resized embeddings) → their bytes."""
    return {
        t.name: bytes(tensor_bytes(t, reader, base))
        for t in reader.doc.tensors
        if t.kind == "dense"
    }


def _heads_source(readers: list[DeltaReader], base: CheckpointDir, heads_from: int | None) -> int:
    """The index of the delta whose own tensors the merge keeps (see the module docstring)."""
    if heads_from is not None:
        if not 0 <= heads_from < len(readers):
            raise InvalidArgument(
                f"heads_from must name one of the {len(readers)} merged deltas "
                f"(0..{len(readers) - 1}); got {heads_from}"
            )
        return heads_from
    owns = [own_tensors(r, base) for r in readers]
    differ = sorted({name for o in owns for name in o if any(x.get(name) != o[name] for x in owns)})
    if differ:
        shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise InvalidArgument(
            f"the fine-tunes have their own, different tensors that are not in the base "
            f"({shown}: e.g. classifier heads); averaging them would mix unrelated heads — "
            "name the parent whose heads the merged model keeps (heads_from)"
        )
    return 0


def _merge(
    base: CheckpointDir,
    readers: list[DeltaReader],
    out_path: str | os.PathLike[str],
    method: str,
    lam: float,
    density: float | None,
    value_bits: int,
    level: int,
    heads: str,
) -> MergeResult:
    first = readers[0]  # the parent whose own tensors and files are kept
    maps = [r.doc.tensor_map() for r in readers]
    own = sorted(t.name for t in first.doc.tensors if t.kind == "dense")
    notes = [f"merged from {len(readers)} deltas"]
    if own:
        notes.append(
            f"tensors not in the base ({', '.join(own[:4])}{' …' if len(own) > 4 else ''}) "
            f"and non-weight files taken from {heads}, not merged"
        )
    writer = DeltaWriter(out_path)
    files: list[FileEntry] = []
    tensors: list[TensorEntry] = []
    kept = 0
    try:
        for fi, f in enumerate(first.doc.files):
            if f.role == "aux":
                nf = FileEntry(
                    path=f.path, role="aux", size=f.size, sha256=f.sha256, base_path=f.base_path
                )
                if f.frame is not None:
                    nf.frame = writer.add(f"a{fi}", first.frame(f.frame))
                files.append(nf)
                continue
            raw_header, header = weight_header(first, f)
            hasher = RebuildHasher(raw_header)
            nf = FileEntry(
                path=f.path,
                role="weights",
                size=f.size,
                sha256="",
                header_frame=writer.add(f"h{fi}", first.frame(f.header_frame or "")),
                header_size=f.header_size,
            )
            for name in header.tensors:
                src = maps[0][name]
                prefix = f"t{len(tensors)}"
                te = TensorEntry(
                    name=name,
                    kind=src.kind,
                    dtype=src.dtype,
                    shape=list(src.shape),
                    base_name=src.base_name,
                    base_dtype=src.base_dtype,
                )
                writer.forget_recent()
                if src.kind == "dense":
                    assert src.frame is not None
                    te.frame = writer.add(prefix, first.frame(src.frame))
                else:
                    taus = []
                    for r, mp in zip(readers, maps, strict=True):
                        e = mp.get(name)
                        t = (
                            task_delta(e, r, base)
                            if e is not None and e.shape == src.shape
                            else None
                        )
                        if t is None:
                            raise BaseMismatch(
                                f"tensor {name!r} is not a base tensor in every delta"
                            )
                        taus.append(t)
                    merged = merge_tensors(taus, method, lam, density)
                    idx = torch.nonzero(merged).reshape(-1)
                    spec = ValueSpec.from_bits(value_bits, src.dtype)
                    sel = Selection(idx.numpy().astype(np.int64), merged[idx])
                    encode_sparse(te, prefix, sel, spec, writer, level)
                    kept += te.nnz
                hasher.update(tensor_bytes(te, writer, base))
                tensors.append(te)
            # a merged file has no original; its identity is the rebuild
            nf.sha256 = hasher.record(nf)
            files.append(nf)
        doc = DeltaDoc(
            base=base_fingerprint(base) | {"sha256": first.doc.base.get("sha256")},
            method={
                "name": "merge",
                "paper": "https://arxiv.org/abs/2306.01708",
                "params": {
                    "method": method,
                    "lambda": lam,
                    "density": density,
                    "value_bits": value_bits,
                    "sources": [r.doc.method.get("name") for r in readers],
                    "own_tensors": own,
                },
                "result": {},
            },
            evaluation={"kind": "weights", "notes": notes},
            stats={"num_params": first.doc.stats.get("num_params"), "kept": kept},
            files=files,
            tensors=tensors,
        )
        stored = writer.finish(doc)
    except BaseException:
        writer.abort()
        raise
    return MergeResult(str(out_path), method, len(readers), stored, kept, 0, own)

"""``hybrid``: low-rank factors plus a DARE residual — the kind's round trip, its version,
pieces, merges and the rank the method chooses."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from core.checkpoint import CheckpointDir
from core.compress import compress
from core.constants import FORMAT_VERSION, HYBRID_VERSION
from core.delta_format import DeltaReader, TensorEntry, rewrite_document
from core.errors import InvalidArgument, InvalidDelta, UnsupportedFormatVersion
from core.merge import task_delta
from core.methods import make_method
from core.methods.hybrid import residual_rate
from core.reconstruct import load_state, tensor_bytes, tensor_pieces
from core.safetensors_io import read_header, save_file
from core.tensor_codec import decode_hybrid, hybrid_rows, lowrank_rows

SHAPES = {"attn.weight": (384, 384), "up.weight": (1536, 384), "noise.weight": (384, 384)}


def _finetune(root: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """A base and a fine-tune whose τ is one strong direction plus noise in two matrices
    (what a full fine-tune's attention looks like, more so) and noise alone in the third; a
    1-D tensor changed a little."""
    g = torch.Generator().manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    for name, (m, n) in SHAPES.items():
        base[name] = 0.05 * torch.randn(m, n, generator=g)
        tau = 1e-3 * torch.randn(m, n, generator=g)
        if name != "noise.weight":
            tau += 0.3 * torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g) / n**0.5
        ft[name] = base[name] + tau
    base["norm.bias"] = torch.zeros(384)
    ft["norm.bias"] = 1e-3 * torch.randn(384, generator=g)
    for d, tensors in (("base", base), ("ft", ft)):
        (root / d).mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(dtype) for k, v in tensors.items()}, root / d / "model.safetensors")
    return root / "base", root / "ft"


def test_hybrid_round_trip_factors_the_low_rank_matrices_only(tmp_path: Path) -> None:
    """Matrices with a strong direction are stored as factors + residual (version 5), the
    noise matrix and the bias as DARE's seeded selection; what is rebuilt is the base plus
    A·Bᵀ plus the residual's kept entries, and it is far closer to τ than DARE at the same
    keep, for about the same stored bytes."""
    base_dir, ft_dir = _finetune(tmp_path)
    hyb = compress(base_dir, ft_dir, tmp_path / "h.slim", method="hybrid", keep=0.02, value_bits=2)
    dare = compress(base_dir, ft_dir, tmp_path / "d.slim", method="dare", keep=0.02, value_bits=2)
    # the frames store about what DARE's do (the residual codes a little worse); the
    # document names the factors (≈ 0.5 KB here)
    assert hyb.stored_bytes <= dare.stored_bytes + 1024
    with DeltaReader(tmp_path / "h.slim") as rh, DeltaReader(tmp_path / "d.slim") as rd:
        frames = [sum(f.size for f in r.doc.frames.values()) for r in (rh, rd)]
    assert frames[0] <= 1.05 * frames[1], frames
    base = load_state(base_dir, tmp_path / "d.slim")  # only for the tensor names
    with CheckpointDir.open(base_dir) as b:
        base = {n: b.get(n) for n in base}
    with CheckpointDir.open(ft_dir) as f:
        ft = {n: f.get(n) for n in base}
    got_h = load_state(base_dir, tmp_path / "h.slim")
    got_d = load_state(base_dir, tmp_path / "d.slim")
    with DeltaReader(tmp_path / "h.slim") as r:
        assert r.doc.version == FORMAT_VERSION >= HYBRID_VERSION
        kinds = {t.name: t.kind for t in r.doc.tensors}
        assert kinds == {
            "attn.weight": "hybrid",
            "up.weight": "hybrid",
            "noise.weight": "sparse",
            "norm.bias": "sparse",
        }
        for name in ("attn.weight", "up.weight"):
            entry = r.doc.tensor_map()[name]
            factors, positions, values = decode_hybrid(entry, r)
            assert entry.rank == factors.a.shape[1] >= 1
            delta = hybrid_rows(factors, positions, values, 0, entry.shape[0])
            assert torch.equal(got_h[name], base[name] + delta)
            err_h = float(((got_h[name] - ft[name]) ** 2).sum())
            err_d = float(((got_d[name] - ft[name]) ** 2).sum())
            assert err_h < 0.2 * err_d, (name, err_h, err_d)
    with DeltaReader(tmp_path / "d.slim") as r:
        assert r.doc.version == FORMAT_VERSION  # every delta says the current version


def test_hybrid_pieces_offsets_and_merge_rebuild_the_same(tmp_path: Path) -> None:
    """Any piece size and start give the whole tensor's bytes (the residual's entries land
    in the right piece), and a merge reads a hybrid tensor's τ as the rebuild does."""
    base_dir, ft_dir = _finetune(tmp_path, torch.bfloat16)
    compress(base_dir, ft_dir, tmp_path / "h.slim", method="hybrid", keep=0.05, value_bits=4)
    with DeltaReader(tmp_path / "h.slim") as r, CheckpointDir.open(base_dir) as b:
        entry = r.doc.tensor_map()["up.weight"]
        assert entry.kind == "hybrid"
        whole = bytes(tensor_bytes(entry, r, b))
        for start, piece in ((0, 4096), (1000, 777), (len(whole) - 10, 3), (384 * 2 * 7, 384)):
            got = b"".join(tensor_pieces(entry, r, b, start=start, piece=piece))
            assert got == whole[start:], (start, piece)
        factors, positions, values = decode_hybrid(entry, r)
        full = hybrid_rows(factors, positions, values, 0, 1536)
        assert torch.equal(hybrid_rows(factors, positions, values, 17, 400), full[17:400])
        assert torch.equal(task_delta(entry, r, b), full.reshape(-1))


def _with_document(path: Path, out: Path, change: dict[str, object]) -> None:
    """A copy of the delta at ``path`` with top-level fields of its document replaced."""
    shutil.copyfile(path, out)
    with DeltaReader(out) as r:
        doc = dataclasses.replace(r.doc, **change)  # type: ignore[arg-type]
    rewrite_document(out, doc)


def test_a_hybrid_tensor_needs_version_5_and_a_whole_residual(tmp_path: Path) -> None:
    """A document of version 4 or older naming a hybrid tensor is refused, as are hybrid
    entries whose residual or factor sections do not match the frame."""
    base_dir, ft_dir = _finetune(tmp_path)
    compress(base_dir, ft_dir, tmp_path / "h.slim", method="hybrid", keep=0.02, value_bits=2)
    _with_document(tmp_path / "h.slim", tmp_path / "v4.slim", {"version": 4})
    read_header(tmp_path / "v4.slim")  # still a valid container
    with pytest.raises(InvalidDelta, match="version 5"):
        DeltaReader(tmp_path / "v4.slim")
    with DeltaReader(tmp_path / "h.slim") as r:
        good = r.doc.tensor_map()["attn.weight"]
        assert good.values is not None and good.factors is not None
        bad = [
            {"positions": None},
            {"values": {**good.values, "size": good.values["size"] + 1}},
            {"factors": {k: {**v, "size": v["size"] + 1} for k, v in good.factors.items()}},
            {"nnz": good.nnz + 1},
            {"rank": 0},
        ]
        for change in bad:
            with pytest.raises(InvalidDelta):
                decode_hybrid(TensorEntry(**{**good.__dict__, **change}), r)


def test_older_versions_still_read(tmp_path: Path) -> None:
    """Every version up to 6 is read, and one past it refused."""
    base_dir, ft_dir = _finetune(tmp_path)
    compress(base_dir, ft_dir, tmp_path / "d.slim", method="dare", keep=0.02)
    for v in (1, 2, 3, 4, 5, 6):
        _with_document(tmp_path / "d.slim", tmp_path / f"v{v}.slim", {"version": v})
        with DeltaReader(tmp_path / f"v{v}.slim") as r:
            assert r.doc.version == v
    _with_document(tmp_path / "d.slim", tmp_path / "v7.slim", {"version": 7})
    with pytest.raises(UnsupportedFormatVersion, match="version 7"):
        DeltaReader(tmp_path / "v7.slim")


def test_rank_pays_for_itself_from_the_budget(tmp_path: Path) -> None:
    """The residual's rate is the keep less what the factors cost; a rank that would leave
    no rate is never taken, and the factors' widths and rank are validated."""
    assert residual_rate(6000, 3584, 384 * 384, 2.0) == pytest.approx(2416 / (384 * 384 * 2))
    assert residual_rate(600, 3584, 384 * 384, 2.0) < 0
    base_dir, ft_dir = _finetune(tmp_path)
    compress(base_dir, ft_dir, tmp_path / "h.slim", method="hybrid", keep=0.001, value_bits=2)
    with DeltaReader(tmp_path / "h.slim") as r:
        assert {t.kind for t in r.doc.tensors} == {"sparse"}  # factors cost more than the keep
        assert r.doc.version == FORMAT_VERSION
    for bad in ({"rank": -1}, {"rank": 1.5}, {"factor_bits": 5}, {"factor_bits": []}):
        with pytest.raises(InvalidArgument):
            make_method("hybrid", **bad)


def test_rows_of_the_factors_are_the_lowrank_rows(tmp_path: Path) -> None:
    """With no residual entries in a row range, hybrid rows are A·Bᵀ's rows exactly."""
    base_dir, ft_dir = _finetune(tmp_path)
    compress(base_dir, ft_dir, tmp_path / "h.slim", method="hybrid", keep=0.02, value_bits=2)
    with DeltaReader(tmp_path / "h.slim") as r:
        factors, positions, values = decode_hybrid(r.doc.tensor_map()["attn.weight"], r)
    empty = positions[:0]
    assert torch.equal(hybrid_rows(factors, empty, values[:0], 3, 9), lowrank_rows(factors, 3, 9))


def test_hybrid_seeded_searches_the_residual_on_top_of_the_factors(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """``hybrid-seeded`` keeps ``hybrid``'s factors and searches ``nps-seeded``'s rates and
    scales for what they leave, at the budget they leave; its stored fidelity is measured on
    the written delta (factors and residual) and it stores about what DARE does."""
    common: dict[str, Any] = {
        "keep": 0.05,
        "value_bits": 4,
        "evaluation": "fidelity",
        "calibration": tiny_models["calibration"],
    }
    out = tmp_path / "s.slim"
    r = compress(
        tiny_models["base"],
        tiny_models["ft"],
        out,
        method="hybrid-seeded",
        options={"generations": 1},
        **common,
    )
    dare = compress(
        tiny_models["base"], tiny_models["ft"], tmp_path / "d.slim", method="dare", **common
    )
    with DeltaReader(out) as reader:
        assert "hybrid" in {t.kind for t in reader.doc.tensors}
        result = reader.doc.method["result"]
        assert 0 < result["residual_keep"] < 0.05 and result["factored"]
        assert result["residual"]["subspaces"]  # nps-seeded's own record
    assert r.fidelity is not None and r.evaluations > 1
    assert r.stored_bytes <= 1.1 * dare.stored_bytes

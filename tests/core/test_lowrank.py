"""``lowrank``: factored task vectors — exact-rank round trips, sizes, fallback, pieces."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.finetune import LORA_TARGETS
from core.checkpoint import CheckpointDir
from core.compress import compress
from core.delta_format import DeltaReader, TensorEntry
from core.errors import InvalidArgument, InvalidDelta
from core.methods import make_method
from core.params import CompressParams, Method
from core.reconstruct import load_state, tensor_bytes, tensor_pieces
from core.safetensors_io import save_file
from core.summary import describe
from core.tensor_codec import LowRank, decode_lowrank, lowrank_rows
from tests.fixtures import base_dir

RANK = 8
SHAPES = {"attn.weight": (384, 384), "up.weight": (1536, 384)}


def _merged_lora(
    root: Path, dtype: torch.dtype, full_rank: bool = False, seed: int = 0
) -> tuple[Path, Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A base in ``dtype`` and the base + B·A (rank 8; or a full-rank τ) merged in float32
    and rounded to ``dtype``, as a merged LoRA is; a 1-D tensor left alone."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    for name, (m, n) in SHAPES.items():
        base[name] = (0.05 * torch.randn(m, n, generator=g)).to(dtype)
        if full_rank:
            tau = 1e-3 * torch.randn(m, n, generator=g)
        else:
            tau = (0.02 * torch.randn(m, RANK, generator=g)) @ (
                0.02 * torch.randn(RANK, n, generator=g)
            )
        ft[name] = (base[name].float() + tau).to(dtype)
    base["norm.bias"] = torch.randn(384, generator=g).to(dtype)
    ft["norm.bias"] = base["norm.bias"].clone()
    for d, tensors in (("base", base), ("ft", ft)):
        (root / d).mkdir(parents=True, exist_ok=True)
        save_file(tensors, root / d / "model.safetensors")
    return root / "base", root / "ft", base, ft


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_exact_rank_tau_comes_back_within_rounding_at_the_factors_size(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """A rank-8 τ on 384×384 and 1536×384 is stored as rank-8 fp16 factors, about
    2·(m + n)·r bytes per matrix, and rebuilds within the rounding of half precision: fp32
    weights within an fp16 ulp of τ's largest entry, bf16 weights within one bf16 ulp plus
    the matrix's own rounding noise (87% of them exact)."""
    base_dir, ft_dir, base, ft = _merged_lora(tmp_path, dtype)
    out = compress(base_dir, ft_dir, tmp_path / "d.slim", method="lowrank")
    got = load_state(base_dir, tmp_path / "d.slim")
    with DeltaReader(tmp_path / "d.slim") as r:
        entries = r.doc.tensor_map()
        assert entries["norm.bias"].kind == "same"
        for name, (m, n) in SHAPES.items():
            e = entries[name]
            assert (e.kind, e.rank) == ("lowrank", RANK)
            stored = r.doc.frames[e.frame or ""].size
            fp16 = 2 * (m + n) * RANK
            # zstd takes a few percent off the fp16 bytes; never more than they are
            assert 0.85 * fp16 <= stored <= fp16, (name, stored, fp16)
            tau = ft[name].float() - base[name].float()
            err = (got[name].float() - ft[name].float()).abs()
            if dtype == torch.float32:
                assert float(err.max()) <= 2.0**-10 * float(tau.abs().max()), name
            else:
                # one bf16 ulp of the weight (≤ 2⁻⁷·|w|) plus the matrix's own rounding noise
                # (half a bf16 ulp at its typical weight, 2⁻⁹·rms w), a little of which the
                # factors fit: it shows as several ulps only at weights near 0
                w = ft[name].float()
                bound = 2.0**-7 * w.abs() + 2.0**-9 * w.pow(2).mean().sqrt()
                assert bool((err <= bound).all()), name
                assert float((err > 0).float().mean()) < 0.25, name
    assert out.stored_bytes < 1.1 * sum(2 * (m + n) * RANK for m, n in SHAPES.values()) + 4096


def test_full_rank_tau_falls_back_to_no_more_than_the_sparse_encoding(tmp_path: Path) -> None:
    """A full-rank τ is not factored (its factors would hold more values than τ): it is
    stored as the sparse encoding of the same entries, no larger than ``magnitude``'s."""
    base_dir, ft_dir, _, _ = _merged_lora(tmp_path, torch.float32, full_rank=True)
    low = compress(base_dir, ft_dir, tmp_path / "low.slim", method="lowrank")
    mag = compress(base_dir, ft_dir, tmp_path / "mag.slim", method="magnitude", keep=1.0)
    with DeltaReader(tmp_path / "low.slim") as r, DeltaReader(tmp_path / "mag.slim") as q:
        assert {t.kind for t in r.doc.tensors} == {"sparse", "same"}
        assert r.doc.method["result"]["sparse_tensors"] == 2
        for name in SHAPES:  # the same entries, coded the same way
            a, b = r.doc.tensor_map()[name], q.doc.tensor_map()[name]
            assert r.frame(a.frame or "") == q.frame(b.frame or ""), name
    # the files differ only by their documents' method parameters
    assert low.weight_bytes <= mag.weight_bytes + 100
    # a keep below 1 keeps each fallen-back tensor's top entries (magnitude's cut is global)
    low5 = compress(base_dir, ft_dir, tmp_path / "low5.slim", method="lowrank", keep=0.05)
    mag5 = compress(base_dir, ft_dir, tmp_path / "mag5.slim", method="magnitude", keep=0.05)
    assert low5.kept == sum(math.ceil(0.05 * m * n) for m, n in SHAPES.values())
    assert abs(low5.kept - mag5.kept) < 0.001 * mag5.kept
    assert low5.weight_bytes <= 1.02 * mag5.weight_bytes


def test_rank_follows_energy_and_the_cap(tmp_path: Path) -> None:
    """``max_rank`` caps every rank; ``energy`` picks the rank of a τ that is not exactly
    low-rank (more energy, a higher rank), and does not truncate an exact-rank one."""
    base_dir, ft_dir, _, _ = _merged_lora(tmp_path, torch.float32)
    compress(base_dir, ft_dir, tmp_path / "c.slim", method="lowrank", options={"max_rank": 4})
    compress(base_dir, ft_dir, tmp_path / "e.slim", method="lowrank", options={"energy": 0.5})
    full_base, full_ft, _, _ = _merged_lora(tmp_path / "full", torch.float32, full_rank=True)
    for energy in (0.3, 0.5):
        compress(
            full_base,
            full_ft,
            tmp_path / f"f{energy}.slim",
            method="lowrank",
            options={"energy": energy},
        )
    ranks = {}
    for path in ("c.slim", "e.slim", "f0.3.slim", "f0.5.slim"):
        with DeltaReader(tmp_path / path) as r:
            ranks[path] = [t.rank or 0 for t in r.doc.tensors if t.kind == "lowrank"]
    assert len(ranks["c.slim"]) == 2 and max(ranks["c.slim"]) == 4, ranks
    assert ranks["e.slim"] == [RANK, RANK], ranks  # exact rank: not truncated by energy
    low, high = ranks["f0.3.slim"], ranks["f0.5.slim"]
    assert len(low) == len(high) == 2, ranks
    assert all(RANK < a < b < 192 for a, b in zip(low, high, strict=True)), ranks
    with pytest.raises(InvalidArgument, match="energy"):
        make_method("lowrank", energy=1.5)
    with pytest.raises(InvalidArgument, match="max_rank"):
        make_method("lowrank", max_rank=0)
    with pytest.raises(InvalidArgument, match="device"):
        make_method("lowrank", device="tpu:3")


def test_lowrank_keep_defaults_to_every_entry() -> None:
    p = CompressParams(method=Method.LOWRANK).resolve()
    assert p.keep == 1.0 and p.value_bits == 16
    assert CompressParams(method=Method.LOWRANK, keep=0.1).resolve().keep == 0.1
    assert CompressParams(method=Method.MAGNITUDE).resolve().keep == 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_pieces_and_offsets_rebuild_the_same_bytes(tmp_path: Path, dtype: torch.dtype) -> None:
    """Rows of A·Bᵀ are summed the same way whichever rows a piece needs: any piece size and
    start give the whole tensor's bytes, and rows computed alone equal the whole product."""
    base_dir, ft_dir, _, _ = _merged_lora(tmp_path, dtype)
    compress(base_dir, ft_dir, tmp_path / "d.slim", method="lowrank", value_bits=4)
    with DeltaReader(tmp_path / "d.slim") as r, CheckpointDir.open(base_dir) as b:
        entry = r.doc.tensor_map()["up.weight"]
        assert entry.kind == "lowrank" and entry.factors and entry.factors["a"]["coding"] == "q"
        whole = bytes(tensor_bytes(entry, r, b))
        for start, piece in ((0, 4096), (1000, 777), (len(whole) - 10, 3), (384 * 2 * 7, 384)):
            got = b"".join(tensor_pieces(entry, r, b, start=start, piece=piece))
            assert got == whole[start:], (start, piece)
        f = decode_lowrank(entry, r)
    full = lowrank_rows(f, 0, 1536)
    assert torch.equal(lowrank_rows(f, 17, 400), full[17:400])
    assert torch.equal(lowrank_rows(LowRank(f.a[5:9], f.b), 0, 4), full[5:9])


def test_malformed_lowrank_entries_are_refused(tmp_path: Path) -> None:
    base_dir, ft_dir, _, _ = _merged_lora(tmp_path, torch.float32)
    compress(base_dir, ft_dir, tmp_path / "d.slim", method="lowrank")
    with DeltaReader(tmp_path / "d.slim") as r:
        good = r.doc.tensor_map()["attn.weight"]
        bad = [
            {"rank": 0},
            {"rank": 385},
            {"rank": True},
            {"shape": [384 * 384]},
            {"factors": None},
            {"factors": {"a": good.factors["a"] if good.factors else {}}},
            {"factors": {k: {**v, "size": v["size"] + 1} for k, v in (good.factors or {}).items()}},
            {"factors": {k: {**v, "size": v["size"] - 1} for k, v in (good.factors or {}).items()}},
            {"factors": {k: {**v, "coding": "f8"} for k, v in (good.factors or {}).items()}},
        ]
        for change in bad:
            entry = TensorEntry(**{**good.__dict__, **change})
            with pytest.raises(InvalidDelta):
                decode_lowrank(entry, r)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_merged_lora_of_the_real_base_round_trips_through_the_cli(tmp_path: Path) -> None:
    """The real MiniLM base + B·A (rank 8) on every attention and MLP matrix, through
    ``slim compress --method lowrank`` and ``slim reconstruct``: rebuilt within fp16 rounding
    of τ, at most 1.1× the adapter's own fp16 size (2·(m + n)·r bytes per adapted matrix)."""
    real_base = base_dir()
    base = load_file(real_base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    ft = dict(base)
    adapter_bytes = 0
    for name, w in base.items():
        if w.ndim == 2 and name.startswith("encoder.") and any(a in name for a in LORA_TARGETS):
            m, n = w.shape
            b_, a_ = (
                0.02 * torch.randn(m, RANK, generator=g),
                0.02 * torch.randn(RANK, n, generator=g),
            )
            ft[name] = w + b_ @ a_
            adapter_bytes += 2 * (m + n) * RANK
    assert adapter_bytes == 6 * (4 * 2 * 768 + 2 * 2 * 1920) * RANK
    ft_dir = tmp_path / "ft"
    shutil.copytree(real_base, ft_dir, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(ft, ft_dir / "model.safetensors")
    delta = tmp_path / "lora.slim"
    proc = _run(
        "compress",
        str(real_base),
        str(ft_dir),
        "-o",
        str(delta),
        "--method",
        "lowrank",
        "--json",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout)
    assert outcome["method"] == "lowrank"
    proc = _run("reconstruct", str(real_base), str(delta), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    worst = 0.0
    for name in ft:
        tau = (ft[name] - base[name]).abs().max() if ft[name].is_floating_point() else 0
        err = (got[name] - ft[name]).abs().max() if ft[name].is_floating_point() else 0
        assert float(err) <= 2.0**-10 * float(tau), name
        worst = max(worst, float(err) / float(tau) if float(tau) else 0.0)
    info = describe(delta)
    assert info["lowrank"]["tensors"] == 36 and info["lowrank"]["rank_max"] == RANK
    assert info["tensors"]["sparse"] == 0
    assert info["stored_bytes"] <= 1.1 * adapter_bytes, (info["stored_bytes"], adapter_bytes)
    print(
        f"merged LoRA r={RANK}: delta {info['stored_bytes']} B, adapter fp16 {adapter_bytes} B "
        f"({info['stored_bytes'] / adapter_bytes:.3f}×), factors {info['lowrank']['factor_bytes']}"
        f" B, worst error / max|τ| {worst:.2e}"
    )
    proc = _run("inspect", str(delta))
    assert proc.returncode == 0 and "rank_max 8" in proc.stdout, proc.stdout + proc.stderr


def test_randomised_decomposition_finds_the_exact_rank(tmp_path: Path) -> None:
    """A matrix larger than the exact decomposition's limit with a small rank cap takes the
    seeded randomised path; it finds the rank-8 τ as the exact one does, and repeats itself."""
    from core.methods.lowrank import EXACT_SVD_MAX

    m, n = EXACT_SVD_MAX + 76, EXACT_SVD_MAX + 6
    g = torch.Generator().manual_seed(3)
    base = {"big.weight": 0.05 * torch.randn(m, n, generator=g)}
    tau = (0.02 * torch.randn(m, RANK, generator=g)) @ (0.02 * torch.randn(RANK, n, generator=g))
    ft = {"big.weight": base["big.weight"] + tau}
    for d, tensors in (("base", base), ("ft", ft)):
        (tmp_path / d).mkdir()
        save_file(tensors, tmp_path / d / "model.safetensors")
    frames = []
    for name in ("a.slim", "b.slim"):
        opts = {"max_rank": 16, "device": "cpu"}
        compress(
            tmp_path / "base", tmp_path / "ft", tmp_path / name, method="lowrank", options=opts
        )
        with DeltaReader(tmp_path / name) as r:
            (entry,) = r.doc.tensors
            assert (entry.kind, entry.rank) == ("lowrank", RANK)
            frames.append(r.frame(entry.frame or ""))
    assert frames[0] == frames[1]
    got = load_state(tmp_path / "base", tmp_path / "a.slim")["big.weight"]
    assert float((got - ft["big.weight"]).abs().max()) <= 2.0**-10 * float(tau.abs().max())


def test_lowrank_deltas_merge(tmp_path: Path) -> None:
    """Task arithmetic over two lowrank deltas adds their factored task vectors (stored
    sparse, as every merge result is)."""
    from core.merge import merge

    base_dir, ft_a, base, fa = _merged_lora(tmp_path, torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    fb = dict(fa)
    for name, (m, n) in SHAPES.items():
        lora = (0.02 * torch.randn(m, RANK, generator=g)) @ (
            0.02 * torch.randn(RANK, n, generator=g)
        )
        fb[name] = base[name] + lora
    (tmp_path / "ft_b").mkdir()
    save_file(fb, tmp_path / "ft_b" / "model.safetensors")
    for ft_dir, out in ((ft_a, "a.slim"), (tmp_path / "ft_b", "b.slim")):
        compress(base_dir, ft_dir, tmp_path / out, method="lowrank")
    merge(base_dir, [tmp_path / "a.slim", tmp_path / "b.slim"], tmp_path / "m.slim", lam=1.0)
    got = load_state(base_dir, tmp_path / "m.slim")
    for name in SHAPES:
        want = fa[name] + fb[name] - base[name]
        tau = (fa[name] - base[name]).abs().max() + (fb[name] - base[name]).abs().max()
        assert float((got[name] - want).abs().max()) <= 2.0**-9 * float(tau), name


def _steep_lora(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """A rank-8 τ whose singular values fall from 1 to 1/64 of its first (its 8th holds
    0.02% of the energy: a rank retaining 99% of it is 4), merged into a base in ``dtype``."""
    g = torch.Generator().manual_seed(3)
    base: dict[str, torch.Tensor] = {}
    ft: dict[str, torch.Tensor] = {}
    for name, (m, n) in SHAPES.items():
        base[name] = (0.05 * torch.randn(m, n, generator=g)).to(dtype)
        u = torch.linalg.qr(torch.randn(m, RANK, generator=g)).Q  # (m, 8)
        v = torch.linalg.qr(torch.randn(n, RANK, generator=g)).Q  # (n, 8)
        s = 0.5 * 2.0 ** -torch.linspace(0, 6, RANK)  # (8,)
        ft[name] = (base[name].float() + (u * s) @ v.T).to(dtype)
    for d, tensors in (("base", base), ("ft", ft)):
        (root / d).mkdir(parents=True, exist_ok=True)
        save_file(tensors, root / d / "model.safetensors")
    return root / "base", root / "ft"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_an_exact_rank_tau_keeps_its_rank_whatever_its_energy_or_rounding(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """The rank of an exact-rank τ is its own — not the energy rule's 4 (which loses its
    weak components), nor more where bf16's rounding noise is large — and it rebuilds within
    the rounding of its dtype."""
    base_dir, ft_dir = _steep_lora(tmp_path, dtype)
    compress(base_dir, ft_dir, tmp_path / "d.slim", method="lowrank")
    with DeltaReader(tmp_path / "d.slim") as r:
        assert {t.name: t.rank for t in r.doc.tensors} == dict.fromkeys(SHAPES, RANK)
        assert r.doc.method["result"]["exact_rank_tensors"] == len(SHAPES)
    got = load_state(base_dir, tmp_path / "d.slim")
    base, ft = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    for name in SHAPES:
        err = (got[name].float() - ft[name].float()).abs()
        tau = (ft[name].float() - base[name].float()).abs()
        if dtype == torch.float32:
            assert float(err.max()) <= 2.0**-10 * float(tau.max()), name
        else:
            w = ft[name].float()
            bound = 2.0**-7 * w.abs() + 2.0**-9 * w.pow(2).mean().sqrt()
            assert bool((err <= bound).all()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_the_probe_finds_a_merged_loras_rank_and_no_rank_in_a_full_tau(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """``auto``'s probe: a merged LoRA's matrices at the adapter's rank (through bf16 rounding),
    a full-rank τ none; a τ-free tensor is not probed."""
    from core.methods.lowrank import looks_low_rank, probe_ranks
    from core.workspace import Workspace

    base_dir, ft_dir, _, _ = _merged_lora(tmp_path / "lora", dtype)
    with Workspace(base_dir, ft_dir) as ws:
        ranks = probe_ranks(ws)
    assert ranks == dict.fromkeys(SHAPES, RANK) and looks_low_rank(ranks)
    base_dir, ft_dir, _, _ = _merged_lora(tmp_path / "full", dtype, full_rank=True)
    with Workspace(base_dir, ft_dir) as ws:
        ranks = probe_ranks(ws)
    assert ranks == dict.fromkeys(SHAPES, 0) and not looks_low_rank(ranks)
    assert not looks_low_rank({})

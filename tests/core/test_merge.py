"""Merging deltas of one base: task arithmetic and TIES."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.compress import compress
from core.delta_format import DeltaReader
from core.errors import BaseMismatch, InvalidArgument
from core.merge import merge, merge_tensors
from core.reconstruct import load_state, reconstruct
from core.safetensors_io import save_file
from tests.core.conftest import make_pair


def test_ties_elects_sign_and_averages_agreeing_entries() -> None:
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([3.0, 1.0, 0.0, -1.0])
    c = torch.tensor([0.0, -2.0, 5.0, 0.0])
    out = merge_tensors([a, b, c], "ties", 1.0, None)
    # entry 0: sum +4 → mean(1, 3) = 2; entry 1: sum −3 → mean(−2, −2); entry 2: 5; entry 3: +2 → 3
    assert out.tolist() == [2.0, -2.0, 5.0, 3.0]
    assert merge_tensors([a, b], "task_arithmetic", 0.5, None).tolist() == [2.0, -0.5, 0.0, 1.0]


def test_ties_trim_keeps_top_density() -> None:
    a = torch.tensor([0.1, -5.0, 0.2, 4.0])
    out = merge_tensors([a, torch.zeros(4)], "ties", 1.0, 0.5)
    assert out.tolist() == [0.0, -5.0, 0.0, 4.0]


def _second_finetune(tmp_path: Path) -> Path:
    _, ft2, _, ft_t = make_pair(tmp_path / "two", seed=0)
    g = torch.Generator().manual_seed(7)
    ft_t["m.enc.a.weight"] = ft_t["m.enc.a.weight"] + 0.05 * torch.randn(
        ft_t["m.enc.a.weight"].shape, generator=g
    )
    save_file(ft_t, ft2 / "model.safetensors")
    return ft2


def test_task_arithmetic_of_lossless_deltas_is_the_sum_of_task_vectors(tmp_path: Path) -> None:
    base, ft1, base_t, ft1_t = make_pair(tmp_path / "one", seed=0)
    ft2 = _second_finetune(tmp_path)
    compress(base, ft1, tmp_path / "1.slim", method="lossless")
    compress(base, ft2, tmp_path / "2.slim", method="lossless")
    result = merge(base, [tmp_path / "1.slim", tmp_path / "2.slim"], tmp_path / "m.slim", lam=0.5)
    assert result.sources == 2
    merged = load_state(base, tmp_path / "m.slim")
    s1 = load_state(base, tmp_path / "1.slim")
    s2 = load_state(base, tmp_path / "2.slim")
    b = base_t["enc.a.weight"]
    want = b + 0.5 * ((s1["m.enc.a.weight"] - b) + (s2["m.enc.a.weight"] - b))
    assert torch.allclose(merged["m.enc.a.weight"], want, atol=2e-3)  # fp16 values
    assert torch.equal(merged["head.weight"], ft1_t["head.weight"])  # heads from the first delta
    out = reconstruct(base, tmp_path / "m.slim", tmp_path / "out")
    assert {p.name for p in out} >= {"model.safetensors", "config.json"}


def test_merge_refuses_mismatched_inputs(tmp_path: Path) -> None:
    base, ft1, _, _ = make_pair(tmp_path / "one", seed=0)
    other_base, other_ft, _, _ = make_pair(tmp_path / "other", seed=5)
    compress(base, ft1, tmp_path / "1.slim", method="magnitude")
    compress(other_base, other_ft, tmp_path / "x.slim", method="magnitude")
    with pytest.raises(BaseMismatch, match="different bases"):
        merge(base, [tmp_path / "1.slim", tmp_path / "x.slim"], tmp_path / "m.slim")
    with pytest.raises(InvalidArgument, match="two"):
        merge(base, [tmp_path / "1.slim"], tmp_path / "m.slim")
    with pytest.raises(InvalidArgument, match="merge method"):
        merge(base, [tmp_path / "1.slim", tmp_path / "1.slim"], tmp_path / "m.slim", method="dare")


def _finetune_with_own_head(tmp_path: Path, name: str, seed: int) -> tuple[Path, dict]:
    """A fine-tune of the shared base whose head (a tensor not in the base) is its own."""
    _, ft, _, ft_t = make_pair(tmp_path / name, seed=0)
    g = torch.Generator().manual_seed(seed)
    ft_t["head.weight"] = torch.randn(ft_t["head.weight"].shape, generator=g)
    ft_t["m.enc.a.weight"] = ft_t["m.enc.a.weight"] + 0.05 * torch.randn(
        ft_t["m.enc.a.weight"].shape, generator=g
    )
    save_file(ft_t, ft / "model.safetensors")
    return ft, ft_t


def test_merge_never_averages_heads_that_differ(tmp_path: Path) -> None:
    base, _, _, _ = make_pair(tmp_path / "base", seed=0)
    ft1, ft1_t = _finetune_with_own_head(tmp_path, "one", seed=1)
    ft2, ft2_t = _finetune_with_own_head(tmp_path, "two", seed=2)
    compress(base, ft1, tmp_path / "1.slim", method="lossless")
    compress(base, ft2, tmp_path / "2.slim", method="lossless")
    deltas = [tmp_path / "1.slim", tmp_path / "2.slim"]
    with pytest.raises(InvalidArgument, match=r"\(head\.weight: .*heads_from") as err:
        merge(base, deltas, tmp_path / "m.slim")
    assert "m.enc.emb" not in str(err.value)  # own tensors the parents share are not a conflict
    assert not (tmp_path / "m.slim").exists()
    result = merge(base, deltas, tmp_path / "m.slim", heads_from=1)
    assert result.heads_from == 1 and "head.weight" in result.own_tensors
    merged = load_state(base, tmp_path / "m.slim")
    assert torch.equal(merged["head.weight"], ft2_t["head.weight"])  # the named parent's head
    assert not torch.equal(merged["head.weight"], ft1_t["head.weight"])
    with DeltaReader(tmp_path / "m.slim") as r:
        assert "head.weight" in r.doc.method["params"]["own_tensors"]
        assert any("head.weight" in n and "2.slim" in n for n in r.doc.evaluation["notes"])
    with pytest.raises(InvalidArgument, match="heads_from must name"):
        merge(base, deltas, tmp_path / "m2.slim", heads_from=2)

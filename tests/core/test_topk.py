"""Exact global top-k without a flattened copy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.topk import CutApplier, coarse_histogram, count_at_least, cumulative_above, top_k_cut


def _select(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    scores = [t.abs() for t in tensors]
    hist = coarse_histogram(scores)
    cut = top_k_cut(k, hist, lambda: iter(scores))
    applier = CutApplier(cut)
    return torch.cat([applier.mask(s) for s in scores])


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=5),
    st.floats(0, 1),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_keeps_exactly_the_k_largest(sizes: list[int], frac: float, seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, generator=g) for n in sizes]
    if ties:  # bf16-like values: many exact ties
        tensors = [t.to(torch.bfloat16).float().round(decimals=1) for t in tensors]
    flat = torch.cat(tensors).abs()
    k = int(frac * flat.numel())
    mask = _select(tensors, k)
    assert int(mask.sum()) == k
    if 0 < k < flat.numel():
        assert float(flat[mask].min()) >= float(flat[~mask].max())


def test_ties_are_broken_by_position() -> None:
    tensors = [torch.ones(5), torch.ones(5)]
    mask = _select(tensors, 7)
    assert mask.tolist() == [True] * 7 + [False] * 3


def test_histogram_counts_are_close_to_exact() -> None:
    t = torch.randn(200_000)
    cum = cumulative_above(coarse_histogram([t.abs()]))
    for x in (0.01, 0.5, 1.0, 2.5):
        exact = int((t.abs() >= x).sum())
        approx = float(count_at_least(cum, torch.tensor([x]))[0])
        assert abs(approx - exact) <= max(50, 0.002 * exact)


def test_sliced_passes_give_the_same_cut(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Histograms are taken a slice at a time (bounded temporaries); slice edges change
    nothing, ties included."""
    import core.topk

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g).to(torch.bfloat16).float() for n in (1000, 37, 4096)]
    whole = [_select(tensors, k) for k in (1, 100, 2500, 5000)]
    monkeypatch.setattr(core.topk, "SLICE", 7)
    assert all(
        torch.equal(a, _select(tensors, k))
        for a, k in zip(whole, (1, 100, 2500, 5000), strict=True)
    )
    assert coarse_histogram([t.abs() for t in tensors]).sum() == 5133


def test_mask_abs_in_slices_equals_the_whole_tensor_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ties straddling a slice boundary are spent in position order, as on the whole tensor."""
    from core import topk

    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g).round(decimals=1) for n in (37, 50, 13)]
    scores = [t.abs() for t in tensors]
    hist = coarse_histogram(scores)
    cut = top_k_cut(29, hist, lambda: iter(scores))
    assert cut.take_equal > 0  # the cut falls inside a run of equal scores
    whole = CutApplier(cut).mask(torch.cat(scores))
    monkeypatch.setattr(topk, "SLICE", 8)
    applier = CutApplier(cut)
    sliced = torch.cat([applier.mask_abs(t) for t in tensors])
    assert torch.equal(sliced, whole) and int(sliced.sum()) == 29

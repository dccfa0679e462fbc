"""Piecewise reconstruction: any byte range of any tensor, in pieces of any size, equals the
same bytes of the whole tensor; the helper thread that rebuilds ahead stops and reports."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.checkpoint import CheckpointDir
from core.compress import compress
from core.constants import DTYPES
from core.delta_format import DeltaReader
from core.errors import InvalidDelta
from core.reconstruct import rebuilt_ahead, run_ahead, tensor_bytes, tensor_pieces
from core.safetensors_io import save_file
from tests.core.conftest import make_pair

METHODS = [
    dict(method="magnitude", keep=0.3, value_bits=16),
    dict(method="dare", keep=0.4, value_bits=4, seed=3),
    dict(method="lossless"),
]


def _check_every_range(delta: Path, base_dir: Path, scale: float) -> int:
    """Compare pieces with the whole tensor for a few ranges and piece sizes; returns how many
    tensors were checked."""
    checked = 0
    with DeltaReader(delta) as r, CheckpointDir.open(base_dir) as base:
        for t in r.doc.tensors:
            whole = bytes(tensor_bytes(t, r, base, scale))
            n, item = len(whole), DTYPES[t.dtype][0]
            for start, end, piece in [
                (0, None, 8),
                (0, None, 3 * item),  # pieces of whole elements
                (1, n - 1, 5),  # ranges that cut elements
                (n // 2, n // 2 + item + 1, 2),
                (n, n, 8),
            ]:
                got = b"".join(tensor_pieces(t, r, base, scale, start, end, piece=piece))
                assert got == whole[start:end], (t.name, t.kind, start, end, piece)
            checked += 1
    return checked


@pytest.mark.parametrize("kwargs", METHODS, ids=lambda k: k["method"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_pieces_equal_the_whole_tensor(
    tmp_path: Path, kwargs: dict, dtype: torch.dtype, scale: float
) -> None:
    base, ft, _, _ = make_pair(tmp_path, dtype=dtype)
    compress(base, ft, tmp_path / "d.slim", **kwargs)
    assert _check_every_range(tmp_path / "d.slim", base, scale) >= 5


def test_pieces_convert_a_base_of_another_dtype(tmp_path: Path) -> None:
    """A float32 base, a bf16 fine-tune: `same` and `sparse` tensors convert each piece."""
    g = torch.Generator().manual_seed(4)
    frozen = torch.randn(9, generator=g).to(torch.bfloat16).float()  # exact in bf16: no τ
    base = {"w": torch.randn(33, 17, generator=g), "frozen": frozen}
    ft = {
        "w": (base["w"] + 0.05 * torch.randn(33, 17, generator=g)).to(torch.bfloat16),
        "frozen": base["frozen"].to(torch.bfloat16),
    }
    for d, tensors in (("base", base), ("ft", ft)):
        (tmp_path / d).mkdir()
        save_file(tensors, tmp_path / d / "model.safetensors")
    compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d.slim", method="magnitude", keep=0.5)
    with DeltaReader(tmp_path / "d.slim") as r:
        assert {t.kind for t in r.doc.tensors} == {"sparse", "same"}
    for scale in (1.0, 0.25):
        assert _check_every_range(tmp_path / "d.slim", tmp_path / "base", scale) == 2


def test_a_damaged_dense_frame_is_refused_at_its_end(tmp_path: Path) -> None:
    """A streamed frame that inflates to fewer bytes than the tensor raises, it is not padded."""
    base, ft, _, _ = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="magnitude")
    with DeltaReader(tmp_path / "d.slim") as r, CheckpointDir.open(base) as b:
        dense = next(t for t in r.doc.tensors if t.kind == "dense")
        dense.shape = [dense.shape[0] + 1, *dense.shape[1:]]  # the frame is now too short
        with pytest.raises(InvalidDelta, match="declares"):
            list(tensor_pieces(dense, r, b))


def test_rebuilt_ahead_stops_its_helper_when_the_reader_stops(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="lossless")
    before = threading.active_count()
    with DeltaReader(tmp_path / "d.slim") as r, CheckpointDir.open(base) as b:
        parts = [(t, 0, None) for t in r.doc.tensors]
        it = rebuilt_ahead(parts, r, b)
        next(it)
        it.close()  # e.g. the client hung up: the helper ends before the files are closed
        assert threading.active_count() == before
        whole = b"".join(bytes(tensor_bytes(t, r, b)) for t in r.doc.tensors)
        assert b"".join(rebuilt_ahead(parts, r, b)) == whole


def test_run_ahead_keeps_order_and_raises_the_helpers_error_in_place() -> None:
    def items() -> Iterator[int]:
        yield from range(5)
        raise InvalidDelta("frame t3 is damaged")

    got: list[int] = []
    with pytest.raises(InvalidDelta, match="t3"):
        for x in run_ahead(items(), depth=2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]

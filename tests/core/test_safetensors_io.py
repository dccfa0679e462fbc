"""The safetensors parser: valid files, the hostile corpus, lazy reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from core.checkpoint import CheckpointDir
from core.errors import HeaderTooLarge, InvalidCheckpoint, InvalidSafetensors
from core.safetensors_io import SafetensorsFile, build_header, parse_header, read_header, save_file
from tests.hostile.corpus import safetensors_cases


@pytest.mark.parametrize("name", sorted(safetensors_cases()))
def test_hostile_headers_are_refused_with_their_code(tmp_path: Path, name: str) -> None:
    data, code = safetensors_cases()[name]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(InvalidSafetensors) as info:
        read_header(path)
    assert info.value.code == code, info.value.detail


def test_header_bomb_costs_one_bounded_read(tmp_path: Path) -> None:
    path = tmp_path / "bomb.safetensors"
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(HeaderTooLarge, match="limit"):
        read_header(path)


def test_reads_files_written_by_the_reference_library(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.randn(2, 2).to(torch.float16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e": torch.zeros(0, 4),
        "f": torch.tensor([True, False]),
    }
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"k": "v"})
    with SafetensorsFile(path) as f:
        assert f.header.metadata == {"k": "v"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get(name), t), name
    assert f.header.file_size == path.stat().st_size


def test_our_writer_is_readable_by_the_reference_library(tmp_path: Path) -> None:
    tensors = {"x": torch.randn(4, 4).to(torch.bfloat16), "y": torch.arange(3, dtype=torch.int32)}
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"m": "1"})
    loaded = safetensors.torch.load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_parse_header_from_first_bytes_only() -> None:
    head = build_header([("w", "F32", (2, 2))])
    header = parse_header(head + b"\0" * 8)  # fewer data bytes than declared: size unknown
    assert header.tensors["w"].shape == (2, 2)
    assert header.data_size == 16


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    from tests.core.conftest import make_pair

    _, ft_dir, _, ft = make_pair(tmp_path, shards=3)
    ckpt = CheckpointDir.open(ft_dir)
    assert len(ckpt.headers) == 3
    assert set(ckpt.tensors) == set(ft)
    assert "model.safetensors.index.json" in ckpt.aux_files
    assert torch.equal(ckpt.get("head.weight"), ft["head.weight"])


def test_index_that_disagrees_with_the_shards_is_refused(tmp_path: Path) -> None:
    from tests.core.conftest import make_pair

    _, ft_dir, _, _ = make_pair(tmp_path, shards=2)
    (ft_dir / "model.safetensors.index.json").write_text(
        '{"weight_map": {"ghost": "model-00001-of-00002.safetensors"}}'
    )
    with pytest.raises(InvalidCheckpoint, match="ghost"):
        CheckpointDir.open(ft_dir)


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidCheckpoint, match=r"no \.safetensors"):
        CheckpointDir.open(tmp_path)


def test_duplicate_tensor_across_shards_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(InvalidCheckpoint, match="both"):
        CheckpointDir.open(tmp_path)


def test_read_header_reuses_a_parse_until_the_file_changes(tmp_path: Path) -> None:
    """An unchanged file's header is parsed once; rewriting the file in place (same name,
    even the same size) is seen at once."""
    import os

    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4)}, path)
    first = read_header(path)
    assert read_header(path) is first
    save_file({"b": torch.ones(4)}, path)  # same size, another tensor name
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # even within one clock tick
    again = read_header(path)
    assert again is not first and list(again.tensors) == ["b"]

"""The file rules of core/files.py: one path rule, hashing, the manifest digest, unread suffixes."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import InvalidCheckpoint, InvalidPath
from core.files import (
    CHUNK_SIZE,
    MAX_PATH_BYTES,
    check_path,
    is_unread,
    manifest_sha256,
    sha256_file,
)

ROOT = Path(__file__).resolve().parents[2]


def test_importing_core_files_loads_no_tensor_library() -> None:
    code = (
        "import sys, core.files; "
        "bad = sorted(m for m in ('torch', 'numpy', 'safetensors', 'zstandard') if m in sys.modules); "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "path", ["model.safetensors", "tokenizer/vocab.json", "a b/ü.txt", ".cache/x", "a..b"]
)
def test_good_paths_come_back_unchanged(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize(
    "path",
    [
        "",
        ".",
        "/etc/passwd",
        "../up",
        "a/../b",
        "a/b/..",
        "a//b",
        "a/./b",
        "./a",
        "dir/",
        "a\\b",
        "nul\x00",
        "bell\x07.json",
        "line\nbreak",
        "a/" * 600 + "b.json",
    ],
)
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidPath) as info:
        check_path(path)
    assert info.value.code == "invalid_path"
    assert isinstance(info.value, InvalidCheckpoint)  # a bad path makes a checkpoint unusable


def test_path_length_counts_utf8_bytes() -> None:
    check_path("é" * (MAX_PATH_BYTES // 2))
    with pytest.raises(InvalidPath, match="shorter"):
        check_path("é" * (MAX_PATH_BYTES // 2) + "x")


@given(st.text(alphabet="ab./\\\x00", max_size=12))
def test_accepted_paths_stay_inside(path: str) -> None:
    try:
        check_path(path)
    except InvalidPath:
        return
    p = PurePosixPath(path)
    assert not p.is_absolute() and ".." not in p.parts and "/".join(p.parts) == path


def test_sha256_file_spans_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (CHUNK_SIZE // 128 + 3)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_manifest_ignores_order_and_hashes_path_and_digest() -> None:
    one = manifest_sha256([("b.json", "00"), ("a.safetensors", "ff")])
    assert one == manifest_sha256([("a.safetensors", "ff"), ("b.json", "00")])
    want = hashlib.sha256(b"a.safetensors\0ff\nb.json\x0000\n").hexdigest()
    assert one == want
    assert manifest_sha256([("a.safetensors", "fe"), ("b.json", "00")]) != one


@pytest.mark.parametrize(
    ("path", "unread"),
    [
        ("pytorch_model.bin", True),
        ("W.PT", True),
        ("x/model.ckpt", True),
        ("data.pkl", True),
        ("model.safetensors", False),
        ("config.json", False),
        ("binary.txt", False),
    ],
)
def test_unread_suffixes(path: str, unread: bool) -> None:
    assert is_unread(path) is unread

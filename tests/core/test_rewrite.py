"""A delta with another set of aux files: same weights, bit for bit, without re-encoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.compress import compress
from core.delta_format import DeltaReader
from core.errors import InvalidArgument
from core.files import sha256_file
from core.reconstruct import reconstruct
from core.rewrite import with_aux_files
from tests.core.conftest import make_pair


def _files(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("method", ["lossless", "magnitude"])
def test_new_aux_files_same_weights(tmp_path: Path, method: str) -> None:
    base, ft, _, _ = make_pair(tmp_path, shards=2)
    (ft / "config.json").write_text('{"a": 1}')
    (ft / "README.md").write_text("old card")
    delta = tmp_path / "d.slim"
    compress(base, ft, delta, method=method, keep=0.1)
    before = tmp_path / "before"
    reconstruct(base, delta, before)

    new = tmp_path / "new"
    new.mkdir()
    (new / "README.md").write_text("---\nbase_model: b\n---\nnew card")
    (new / "tok").mkdir()
    (new / "tok" / "vocab.txt").write_text("a\nb\n")
    aux = {
        "config.json": ft / "config.json",  # unchanged: its entry is kept
        "README.md": new / "README.md",
        "tok/vocab.txt": new / "tok" / "vocab.txt",
    }
    out = tmp_path / "new.slim"
    with_aux_files(delta, out, aux)
    after = tmp_path / "after"
    reconstruct(base, out, after)
    got, old = _files(after), _files(before)
    weights = [p for p in old if p.endswith(".safetensors")]
    assert len(weights) == 2 and all(got[p] == old[p] for p in weights)
    assert got["README.md"] == sha256_file(new / "README.md")
    assert got["tok/vocab.txt"] == sha256_file(new / "tok" / "vocab.txt")
    assert got["config.json"] == old["config.json"]
    assert set(got) == set(weights) | set(aux)
    with DeltaReader(delta) as a, DeltaReader(out) as b:
        assert a.doc.tensors == b.doc.tensors and a.doc.method == b.doc.method
        for t in a.doc.tensors:
            if t.frame is not None:
                assert a.frame(t.frame) == b.frame(t.frame)


def test_a_weights_path_cannot_become_aux(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path, shards=1)
    delta = tmp_path / "d.slim"
    compress(base, ft, delta, method="lossless")
    name = next(p.name for p in ft.iterdir() if p.suffix == ".safetensors")
    (tmp_path / "x").write_text("x")
    with pytest.raises(InvalidArgument):
        with_aux_files(delta, tmp_path / "o.slim", {name: tmp_path / "x"})

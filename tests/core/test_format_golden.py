"""Golden bytes: committed deltas must keep reading to the same checkpoints, and today's
writer must produce the same frames and document. A deliberate format change regenerates them
(``python -m tests.core.golden.make_golden``) and bumps FORMAT_VERSION."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.checkpoint import CheckpointDir
from core.compress import compress
from core.constants import FORMAT_VERSION, PACKED_KEY
from core.delta_format import DeltaReader
from core.errors import IntegrityError
from core.reconstruct import rebuild_check, reconstruct, tensor_bytes, tensor_pieces
from core.safetensors_io import save_file
from tests.core.golden.make_golden import CASES, HERE, OLD_CASES, write_pair

MANIFEST = json.loads((HERE / "manifest.json").read_text())
#: What the deltas of versions 1–4 rebuild (their fine-tune's ``layer.bias`` was float32).
OLD_MANIFEST = json.loads((HERE / "v4" / "manifest.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_delta_reconstructs_to_pinned_bytes(tmp_path: Path, name: str) -> None:
    base, ft = write_pair(tmp_path)
    golden = HERE / f"{name}.slim"
    assert golden.stat().st_size == MANIFEST[name]["size"]
    with DeltaReader(golden) as r:
        assert r.doc.version == FORMAT_VERSION
        lossless = [t for t in r.doc.tensors if t.kind == "lossless"]
        assert all(t.planes and len(t.planes) > 1 for t in lossless if t.dtype != "U8")
    out = reconstruct(base, golden, tmp_path / "out")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out}
    assert got == MANIFEST[name]["files"]
    if name == "lossless":
        assert (
            got["model.safetensors"]
            == hashlib.sha256((ft / "model.safetensors").read_bytes()).hexdigest()
        )


@pytest.mark.parametrize("name", sorted(OLD_CASES))
def test_version_1_deltas_still_read_and_are_checked_by_sha256(tmp_path: Path, name: str) -> None:
    """Deltas written before ``recon_xxh3`` existed (version 1) rebuild to the same bytes;
    their stream check falls back to the recorded sha256, and still catches a wrong base."""
    base, _ = write_pair(tmp_path)
    golden = HERE / "v1" / f"{name}.slim"
    with DeltaReader(golden) as r:
        assert r.doc.version == 1
        weights = [f for f in r.doc.files if f.role == "weights"]
        assert weights and all(f.recon_xxh3 is None for f in weights)
        assert rebuild_check(weights[0], 1.0).kind == "sha256"
    out = reconstruct(base, golden, tmp_path / "out")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out}
    assert got == OLD_MANIFEST[name]["files"]
    with DeltaReader(HERE / f"{name}.slim") as r:
        assert (
            rebuild_check(next(f for f in r.doc.files if f.role == "weights"), 1.0).kind == "xxh3"
        )
    # a base with the same layout but other values fails the sha256 check
    tensors = {k: v.clone() for k, v in load_file(base / "model.safetensors").items()}
    tensors["layer.bias"] = tensors["layer.bias"] + 1.0
    save_file(tensors, base / "model.safetensors")
    with pytest.raises(IntegrityError):
        reconstruct(base, golden, tmp_path / "out2")


@pytest.mark.parametrize("name", sorted(OLD_CASES))
def test_version_2_deltas_still_read(tmp_path: Path, name: str) -> None:
    """Deltas written before lossless planes were stored side by side (version 2: all planes
    in one zstd frame, rebuilt a whole tensor at a time) rebuild to the same bytes, also in
    pieces and from an offset inside a lossless tensor."""
    base, _ = write_pair(tmp_path)
    golden = HERE / "v2" / f"{name}.slim"
    with DeltaReader(golden) as r:
        assert r.doc.version == 2
        assert all(t.planes is None for t in r.doc.tensors)
    out = reconstruct(base, golden, tmp_path / "out")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out}
    assert got == OLD_MANIFEST[name]["files"]
    with DeltaReader(golden) as r, CheckpointDir.open(base) as b:
        for t in r.doc.tensors:
            whole = bytes(tensor_bytes(t, r, b))
            parts = b"".join(tensor_pieces(t, r, b, start=3, piece=16))
            assert parts == whole[3:], t.name


@pytest.mark.parametrize("name", sorted(OLD_CASES))
def test_version_3_deltas_still_read(tmp_path: Path, name: str) -> None:
    """Deltas written before the ``lowrank`` kind (version 3) rebuild to the same bytes, whole
    and in pieces."""
    base, _ = write_pair(tmp_path)
    golden = HERE / "v3" / f"{name}.slim"
    with DeltaReader(golden) as r:
        assert r.doc.version == 3
        assert all(t.kind != "lowrank" and t.rank is None for t in r.doc.tensors)
    out = reconstruct(base, golden, tmp_path / "out")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out}
    assert got == OLD_MANIFEST[name]["files"]
    with DeltaReader(golden) as r, CheckpointDir.open(base) as b:
        for t in r.doc.tensors:
            whole = bytes(tensor_bytes(t, r, b))
            assert b"".join(tensor_pieces(t, r, b, start=3, piece=16)) == whole[3:], t.name


@pytest.mark.parametrize("name", sorted(CASES))
def test_version_4_deltas_still_read(tmp_path: Path, name: str) -> None:
    """Deltas written before ``base_cast`` (version 4) rebuild to the same bytes, whole and in
    pieces."""
    base, _ = write_pair(tmp_path)
    golden = HERE / "v4" / f"{name}.slim"
    assert golden.stat().st_size == OLD_MANIFEST[name]["size"]
    with DeltaReader(golden) as r:
        assert r.doc.version == 4
        assert all(t.base_cast is None and t.residual is None for t in r.doc.tensors)
    out = reconstruct(base, golden, tmp_path / "out")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out}
    assert got == OLD_MANIFEST[name]["files"]
    with DeltaReader(golden) as r, CheckpointDir.open(base) as b:
        for t in r.doc.tensors:
            whole = bytes(tensor_bytes(t, r, b))
            assert b"".join(tensor_pieces(t, r, b, start=3, piece=16)) == whole[3:], t.name


@pytest.mark.parametrize("name", sorted(CASES))
def test_version_5_deltas_still_read(tmp_path: Path, name: str) -> None:
    """Deltas written before the document was packed (version 5: plain JSON under
    ``slimstore``) rebuild to the same bytes as today's, whole and in pieces; today's store the
    same document in fewer bytes."""
    base, _ = write_pair(tmp_path)
    golden = HERE / "v5" / f"{name}.slim"
    old_manifest = json.loads((HERE / "v5" / "manifest.json").read_text())
    assert golden.stat().st_size == old_manifest[name]["size"] > MANIFEST[name]["size"]
    with DeltaReader(golden) as r, DeltaReader(HERE / f"{name}.slim") as new:
        assert r.doc.version == 5 and PACKED_KEY not in (r.header.metadata or {})
        assert PACKED_KEY in (new.header.metadata or {})
        assert [t.name for t in r.doc.tensors] == [t.name for t in new.doc.tensors]
    out = reconstruct(base, golden, tmp_path / "out")
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out}
    assert got == old_manifest[name]["files"] == MANIFEST[name]["files"]
    with DeltaReader(golden) as r, CheckpointDir.open(base) as b:
        for t in r.doc.tensors:
            whole = bytes(tensor_bytes(t, r, b))
            assert b"".join(tensor_pieces(t, r, b, start=3, piece=16)) == whole[3:], t.name


def test_lossless_golden_codes_floats_in_ulps_and_casts_a_base_of_another_dtype() -> None:
    """Version 5: every float tensor's planes hold its ``ulp`` residual (versions 1–4: XOR);
    the bf16 ``layer.bias`` of the fp32 base is lossless against the base cast to bf16
    (``base_cast``; versions 1–4 stored it dense)."""
    with DeltaReader(HERE / "lossless.slim") as r:
        tensors = r.doc.tensor_map()
        t = tensors["layer.bias"]
        assert (t.kind, t.dtype, t.base_dtype, t.base_cast) == ("lossless", "BF16", "F32", True)
        assert sum(t.planes or []) == r.doc.frames[t.frame or ""].size
        lossless = [t for t in tensors.values() if t.kind == "lossless"]
        assert {t.name for t in lossless} == {"layer.weight", "layer.bias", "emb.weight"}
        assert all(t.residual == "ulp" for t in lossless)


def test_lowrank_golden_stores_factors_and_rebuilds_in_pieces(tmp_path: Path) -> None:
    """The golden delta factors the two rank-2 task vectors (fp32 and bf16) and keeps
    the 1-D one sparse; every tensor rebuilds the same from any offset, in any piece size."""
    base, _ = write_pair(tmp_path)
    with DeltaReader(HERE / "lowrank_f16.slim") as r, CheckpointDir.open(base) as b:
        kinds = {t.name: (t.kind, t.rank) for t in r.doc.tensors}
        assert kinds["layer.weight"] == ("lowrank", 2) and kinds["emb.weight"] == ("lowrank", 2)
        assert kinds["layer.bias"][0] == "sparse"
        for t in r.doc.tensors:
            whole = bytes(tensor_bytes(t, r, b))
            for start, piece in ((0, 4), (6, 10), (37, 2)):
                start = min(start, len(whole))
                parts = b"".join(tensor_pieces(t, r, b, start=start, piece=piece))
                assert parts == whole[start:], (t.name, start, piece)


def _strip_timing(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    doc["evaluation"].pop("search_seconds", None)
    return doc


@pytest.mark.parametrize("name", sorted(CASES))
def test_writer_reproduces_the_golden_frames_and_document(tmp_path: Path, name: str) -> None:
    base, ft = write_pair(tmp_path)
    compress(base, ft, tmp_path / "new.slim", **CASES[name])  # type: ignore[arg-type]
    with DeltaReader(HERE / f"{name}.slim") as old, DeltaReader(tmp_path / "new.slim") as new:
        assert list(old.header.tensors) == list(new.header.tensors)
        for frame in old.doc.frames:
            assert old.frame(frame) == new.frame(frame), frame
        from dataclasses import asdict

        assert _strip_timing(asdict(old.doc)) == _strip_timing(asdict(new.doc))

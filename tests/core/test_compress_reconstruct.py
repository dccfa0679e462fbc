"""compress → reconstruct on synthetic pairs: every tensor kind, dtype, layout and method."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from core.checkpoint import CheckpointDir
from core.compress import compress
from core.constants import (
    FORMAT_VERSION,
    METADATA_KEY,
    PACKED_KEY,
    PACKED_VERSION,
    READABLE_VERSIONS,
)
from core.delta_format import (
    DeltaReader,
    pack_document,
    rewrite_document,
    rewritten_size,
    unpack_document,
)
from core.errors import (
    BaseMismatch,
    IntegrityError,
    InvalidCheckpoint,
    InvalidDelta,
    UnsupportedFormatVersion,
)
from core.files import sha256_file
from core.reconstruct import load_state, reconstruct, tensor_bytes, tensor_pieces
from core.safetensors_io import SafetensorsFile, save_file, tensor_to_bytes
from tests.core.conftest import make_pair

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _files(d: Path) -> dict[str, str]:
    return {
        p.relative_to(d).as_posix(): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shards", [1, 3])
def test_lossless_is_bit_identical(tmp_path: Path, dtype: torch.dtype, shards: int) -> None:
    base, ft, _, _ = make_pair(tmp_path, dtype=dtype, shards=shards)
    result = compress(base, ft, tmp_path / "d.slim", method="lossless")
    reconstruct(base, tmp_path / "d.slim", tmp_path / "out")
    assert _files(tmp_path / "out") == _files(ft)
    assert result.stored_bytes > 0


@pytest.mark.parametrize(
    ("base_dtype", "ft_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_lossless_across_dtypes_xors_the_base_cast_to_the_fine_tunes_dtype(
    tmp_path: Path, base_dtype: torch.dtype, ft_dtype: torch.dtype
) -> None:
    """A fine-tune of another dtype than its base XORs the base converted to its own dtype
    (format version 5, ``base_cast``): bit-exact, from any offset in any piece size, and far
    smaller than the tensors stored dense (a narrow fine-tune of an unchanged base tensor is
    its rounding: all-zero planes)."""
    base, ft, base_t, ft_t = make_pair(tmp_path, dtype=base_dtype)
    cast = {k: v.to(ft_dtype) for k, v in ft_t.items() if v.is_floating_point()}
    save_file({**ft_t, **cast}, ft / "model.safetensors")
    compress(base, ft, tmp_path / "d.slim", method="lossless")
    reconstruct(base, tmp_path / "d.slim", tmp_path / "out")
    assert _files(tmp_path / "out") == _files(ft)
    with DeltaReader(tmp_path / "d.slim") as r, CheckpointDir.open(base) as b:
        kinds = {t.name: (t.kind, t.base_cast) for t in r.doc.tensors}
        for name in ("m.enc.a.weight", "m.enc.b.weight", "m.enc.frozen"):
            assert kinds[name] == ("lossless", True), name
        frozen = next(t for t in r.doc.tensors if t.name == "m.enc.frozen")
        if base_dtype == torch.float32:  # the fine-tune's tensor is the base's, rounded
            assert r.doc.frames[frozen.frame].size < 40  # two all-zero plane frames
        for t in r.doc.tensors:
            whole = bytes(tensor_bytes(t, r, b))
            for start, piece in ((3, 16), (41, 6)):
                start = min(start, len(whole))
                parts = b"".join(tensor_pieces(t, r, b, start=start, piece=piece))
                assert parts == whole[start:], (t.name, start, piece)
        zero = tensor_bytes(next(t for t in r.doc.tensors if t.name == "m.enc.a.weight"), r, b, 0.0)
        assert bytes(zero) == tensor_to_bytes(base_t["enc.a.weight"].to(ft_dtype))
    stored = sum(ref.size for ref in DeltaReader(tmp_path / "d.slim").doc.frames.values())
    dense = sum(v.numel() * v.element_size() for v in cast.values())
    assert stored < 0.8 * dense


def test_a_cast_lossless_tensor_must_be_of_another_dtype(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="lossless")
    with DeltaReader(tmp_path / "d.slim") as r, CheckpointDir.open(base) as b:
        t = next(t for t in r.doc.tensors if t.kind == "lossless")
        t.base_cast = True  # fp32 against fp32: no cast to undo
        with pytest.raises(InvalidDelta, match="malformed"):
            bytes(tensor_bytes(t, r, b))
        t.base_cast, t.dtype = True, "F64"
        with pytest.raises(InvalidDelta, match="casts F32 to F64"):
            bytes(tensor_bytes(t, r, b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["magnitude", "dare", "nps", "nps-seeded", "magnitude-scaled"])
def test_lossy_methods_keep_layout_and_exact_tensors(
    tmp_path: Path, dtype: torch.dtype, method: str
) -> None:
    base, ft_dir, base_t, ft_t = make_pair(tmp_path, dtype=dtype, shards=2)
    compress(base, ft_dir, tmp_path / "d.slim", method=method, keep=0.1)
    out = tmp_path / "out"
    reconstruct(base, tmp_path / "d.slim", out)
    assert sorted(_files(out)) == sorted(_files(ft_dir))
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        with SafetensorsFile(out / name) as got, SafetensorsFile(ft_dir / name) as want:
            assert got.header.raw == want.header.raw  # same names, dtypes, shapes, offsets
    state = load_state(base, tmp_path / "d.slim")
    # tensors the method must not touch are exact
    for name in ("head.weight", "m.enc.emb", "m.enc.ids", "m.enc.frozen"):
        assert torch.equal(state[name], ft_t[name]), name
    # the task vector is approximated: closer to the fine-tune than the base is
    tau = ft_t["m.enc.a.weight"].float() - base_t["enc.a.weight"].float()
    err = state["m.enc.a.weight"].float() - ft_t["m.enc.a.weight"].float()
    assert float(err.norm()) < float(tau.norm()) * (
        1.0 if method not in ("dare", "nps-seeded") else 3.6
    )  # seeded (DARE): E‖err‖² = (1/r − 1)‖τ‖²


def test_tensor_kinds_in_the_document(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="magnitude", keep=0.05)
    with DeltaReader(tmp_path / "d.slim") as r:
        kinds = {t.name: t.kind for t in r.doc.tensors}
        files = {f.path: f for f in r.doc.files}
    assert kinds["m.enc.a.weight"] == "sparse"
    assert kinds["m.enc.frozen"] == "same"
    assert kinds["head.weight"] == "dense"  # only in the fine-tune
    assert kinds["m.enc.emb"] == "dense"  # shape changed
    assert kinds["m.enc.ids"] == "dense"  # not floating point
    assert files["sub/notes.txt"].frame is not None


def test_magnitude_keeps_exactly_the_global_top_r(tmp_path: Path) -> None:
    base, ft, base_t, ft_t = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="magnitude", keep=0.03)
    names = ["enc.a.weight", "enc.a.bias", "enc.b.weight", "enc.frozen"]  # D counts every base twin
    taus = {n: (ft_t["m." + n].float() - base_t[n].float()).reshape(-1) for n in names}
    flat = torch.cat(list(taus.values())).abs()
    k = -(-3 * flat.numel() // 100)
    thr = flat.topk(k).values.min()
    with DeltaReader(tmp_path / "d.slim") as r:
        nnz = {t.name: t.nnz for t in r.doc.tensors if t.kind == "sparse"}
    assert sum(nnz.values()) == k  # ⌈r·D⌉
    assert "m.enc.frozen" not in nnz  # all-zero τ is stored as `same`
    for n in names[:3]:
        assert nnz["m." + n] == int((taus[n].abs() >= thr).sum())


def test_aux_file_identical_to_the_base_is_not_stored_again(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    blob = b"x" * 50_000
    (base / "tokenizer.json").write_bytes(blob)
    (ft / "tokenizer.json").write_bytes(blob)
    compress(base, ft, tmp_path / "d.slim", method="magnitude")
    with DeltaReader(tmp_path / "d.slim") as r:
        tok = next(f for f in r.doc.files if f.path == "tokenizer.json")
    assert tok.base_path == "tokenizer.json" and tok.frame is None
    reconstruct(base, tmp_path / "d.slim", tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == blob


def test_scale_interpolates_the_task_vector(tmp_path: Path) -> None:
    base, ft, base_t, ft_t = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="lossless")
    half = load_state(base, tmp_path / "d.slim", scale=0.5)
    zero = load_state(base, tmp_path / "d.slim", scale=0.0)
    b, f = base_t["enc.a.weight"], ft_t["m.enc.a.weight"]
    assert torch.allclose(half["m.enc.a.weight"], (b + f) / 2, atol=1e-6)
    assert torch.equal(zero["m.enc.a.weight"], b)
    assert torch.equal(half["head.weight"], ft_t["head.weight"])  # not in the base: unscaled


def test_reconstruction_is_deterministic_and_recorded(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path, dtype=torch.bfloat16)
    compress(base, ft, tmp_path / "d.slim", method="nps-seeded", keep=0.1, value_bits=4)
    reconstruct(base, tmp_path / "d.slim", tmp_path / "o1")
    reconstruct(base, tmp_path / "d.slim", tmp_path / "o2")
    assert _files(tmp_path / "o1") == _files(tmp_path / "o2")
    with DeltaReader(tmp_path / "d.slim") as r:
        rec = {f.path: f.recon_sha256 for f in r.doc.files if f.role == "weights"}
    assert rec == {k: v for k, v in _files(tmp_path / "o1").items() if k in rec}


def test_wrong_base_fails_cleanly(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path / "a")
    other, _, _, _ = make_pair(tmp_path / "b", seed=1)
    compress(base, ft, tmp_path / "d.slim", method="magnitude")
    with pytest.raises(IntegrityError, match="sha256"):
        reconstruct(other, tmp_path / "d.slim", tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not list((tmp_path / "out").glob("*.incomplete"))


def test_unrelated_fine_tune_is_refused(tmp_path: Path) -> None:
    base, _, _, _ = make_pair(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    save_file({"x": torch.zeros(5, 5)}, other / "model.safetensors")
    with pytest.raises(BaseMismatch, match="same name and shape"):
        compress(base, other, tmp_path / "d.slim")
    assert not (tmp_path / "d.slim").exists()


def test_nan_in_a_fine_tune_is_refused_for_lossy_methods(tmp_path: Path) -> None:
    base, ft, _, ft_t = make_pair(tmp_path)
    ft_t["m.enc.a.weight"][0, 0] = float("nan")
    save_file(ft_t, ft / "model.safetensors")
    with pytest.raises(InvalidCheckpoint, match="NaN"):
        compress(base, ft, tmp_path / "d.slim", method="magnitude")
    compress(base, ft, tmp_path / "l.slim", method="lossless")  # exact coding carries NaN
    reconstruct(base, tmp_path / "l.slim", tmp_path / "out")
    assert sha256_file(tmp_path / "out" / "model.safetensors") == sha256_file(
        ft / "model.safetensors"
    )


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="magnitude")
    raw = (tmp_path / "d.slim").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    doc = json.loads(unpack_document(header["__metadata__"], "d.slim")[0])
    doc["version"] = max(READABLE_VERSIONS) + 1
    header["__metadata__"] = pack_document(json.dumps(doc), doc["version"])
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    (tmp_path / "future.slim").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    with pytest.raises(UnsupportedFormatVersion, match=f"version {max(READABLE_VERSIONS) + 1}"):
        DeltaReader(tmp_path / "future.slim")


def test_zero_size_and_tiny_tensors(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "f").mkdir()
    base = {"z": torch.zeros(0, 3), "one": torch.tensor([1.0]), "w": torch.randn(64)}
    ft = {"z": torch.zeros(0, 3), "one": torch.tensor([1.5]), "w": base["w"] + 0.1}
    save_file(base, tmp_path / "b" / "model.safetensors")
    save_file(ft, tmp_path / "f" / "model.safetensors")
    for method in ("magnitude", "dare", "lossless"):
        compress(
            tmp_path / "b", tmp_path / "f", tmp_path / f"{method}.slim", method=method, keep=0.5
        )
        state = load_state(tmp_path / "b", tmp_path / f"{method}.slim")
        assert state["z"].shape == (0, 3)


def test_delta_file_hash_of_frames_detects_tampering(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path)
    compress(base, ft, tmp_path / "d.slim", method="magnitude")
    raw = bytearray((tmp_path / "d.slim").read_bytes())
    raw[-3] ^= 0x55  # inside the last frame
    (tmp_path / "bad.slim").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        reconstruct(base, tmp_path / "bad.slim", tmp_path / "out")
    assert hashlib.sha256(bytes(raw)).hexdigest() != sha256_file(tmp_path / "d.slim")


def test_large_frames_are_checked_by_their_xxh3(tmp_path: Path) -> None:
    """Frames of 1 MiB or more record an xxh3-128 beside the sha256 and are checked by it;
    a damaged byte inside one is refused just the same."""
    g = torch.Generator().manual_seed(9)
    base = {"w": torch.randn(700, 1024, generator=g)}  # 2.8 MB: its lossless planes ≥ 1 MiB
    ft = {"w": base["w"] + 0.01 * torch.randn(700, 1024, generator=g)}
    for d, tensors in (("base", base), ("ft", ft)):
        (tmp_path / d).mkdir()
        save_file(tensors, tmp_path / d / "model.safetensors")
    compress(tmp_path / "base", tmp_path / "ft", tmp_path / "d.slim", method="lossless")
    with DeltaReader(tmp_path / "d.slim") as r:
        big = {n for n, f in r.doc.frames.items() if f.size >= 1 << 20}
        assert big and all(r.doc.frames[n].xxh3 for n in big)
        assert all(f.xxh3 is None for n, f in r.doc.frames.items() if n not in big)
        w = next(t for t in r.doc.tensors if t.name == "w")
        assert w.frame in big
        start = r.header.data_offset + r.header.tensors[w.frame].start
    raw = bytearray((tmp_path / "d.slim").read_bytes())
    raw[start + 100] ^= 0x01
    (tmp_path / "bad.slim").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="xxh3"):
        reconstruct(tmp_path / "base", tmp_path / "bad.slim", tmp_path / "out")
    out = reconstruct(tmp_path / "base", tmp_path / "d.slim", tmp_path / "good")
    assert _files(tmp_path / "good")["model.safetensors"] == sha256_file(
        tmp_path / "ft" / "model.safetensors"
    )
    assert out


@pytest.mark.parametrize("method", ["lossless", "magnitude"])
@pytest.mark.parametrize("shards", [1, 3])
def test_parallel_rebuild_writes_the_same_bytes_and_reports_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, shards: int
) -> None:
    import core.reconstruct as rec_mod

    base, ft, _, _ = make_pair(tmp_path, dtype=torch.bfloat16, shards=shards)
    compress(base, ft, tmp_path / "d.slim", method=method, keep=0.1)
    reconstruct(base, tmp_path / "d.slim", tmp_path / "one", workers=1)
    monkeypatch.setattr(rec_mod, "AHEAD_BYTES", 1)  # one tensor ahead at a time
    for workers in (2, 4):
        digests: dict[str, str] = {}
        out = tmp_path / f"w{workers}"
        reconstruct(base, tmp_path / "d.slim", out, workers=workers, digests=digests)
        assert _files(out) == _files(tmp_path / "one")
        assert digests == _files(out)  # the recorded sha256 is the written file's
    half: dict[str, str] = {}
    reconstruct(base, tmp_path / "d.slim", tmp_path / "half", scale=0.5, digests=half)
    assert half == _files(tmp_path / "half")  # nothing recorded: hashed while writing


def test_parallel_rebuild_of_a_wrong_base_fails_and_keeps_nothing(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path, dtype=torch.bfloat16)
    compress(base, ft, tmp_path / "d.slim", method="lossless")
    other, _, _, _ = make_pair(tmp_path / "other", dtype=torch.bfloat16, seed=1)
    with pytest.raises(IntegrityError):
        reconstruct(other, tmp_path / "d.slim", tmp_path / "out", workers=2)
    left = [p.name for p in (tmp_path / "out").rglob("*")]
    assert not [n for n in left if n.endswith((".safetensors", ".incomplete"))]


class _Trickle:
    """A delta copied into ``part`` a few kB at a time by a thread: what a download that a
    rebuild follows looks like (``core.delta_format.Arriving``); ``fail`` is raised by the
    final wait, as a download whose sha256 did not match."""

    def __init__(self, src: Path, part: Path, fail: Exception | None = None) -> None:
        self.data, self.part, self.fail = src.read_bytes(), part, fail
        self.size = len(self.data)
        self.have = 0
        self.early = 0  # frames read before the whole delta was there
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with open(self.part, "wb") as f:
            for at in range(0, self.size, 4096):
                f.write(self.data[at : at + 4096])
                f.flush()
                with self._cond:
                    self.have = min(at + 4096, self.size)
                    self._cond.notify_all()
                time.sleep(0.0005)

    def wait(self, end: int) -> None:
        with self._cond:
            while self.have < min(end, self.size):
                self._cond.wait()
            if end < self.size:
                self.early += 1
        if end >= self.size and self.fail is not None:
            raise self.fail


@pytest.mark.parametrize("method", ["lossless", "magnitude"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_rebuild_follows_a_delta_as_it_arrives(tmp_path: Path, method: str, workers: int) -> None:
    base, ft, _, _ = make_pair(tmp_path, dtype=torch.bfloat16, shards=2)
    compress(base, ft, tmp_path / "d.slim", method=method, keep=0.1)
    reconstruct(base, tmp_path / "d.slim", tmp_path / "whole")
    arriving = _Trickle(tmp_path / "d.slim", tmp_path / "d.part")
    digests: dict[str, str] = {}
    out = tmp_path / "followed"
    reconstruct(base, tmp_path / "d.part", out, workers=workers, digests=digests,
                arriving=arriving)  # fmt: skip
    assert _files(out) == _files(tmp_path / "whole") == digests
    assert arriving.early > 2  # the header and frames were read while the rest still came


def test_a_followed_delta_that_fails_its_check_moves_nothing_into_place(tmp_path: Path) -> None:
    base, ft, _, _ = make_pair(tmp_path, dtype=torch.bfloat16)
    compress(base, ft, tmp_path / "d.slim", method="lossless")
    failed = IntegrityError("the delta's sha256 does not match")
    arriving = _Trickle(tmp_path / "d.slim", tmp_path / "d.part", fail=failed)
    with pytest.raises(IntegrityError, match="sha256 does not match"):
        reconstruct(base, tmp_path / "d.part", tmp_path / "out", workers=2, arriving=arriving)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # not even a part


def test_the_document_is_packed_and_a_rewrite_can_pad_to_a_size(tmp_path: Path) -> None:
    """Version 6: ``slimstore`` holds a stub naming the zstd+base64 document, which is several
    times smaller than the plain JSON a version-5 container held; rewriting the document with
    ``min_size`` pads the header so the file is exactly that long, and it still reads."""
    base, ft, _, _ = make_pair(tmp_path)
    path = tmp_path / "d.slim"
    compress(base, ft, path, method="dare", keep=0.1, value_bits=2)
    with DeltaReader(path) as r:
        meta = dict(r.header.metadata or {})
        doc = r.doc
        natural = rewritten_size(r, doc)
    assert set(meta) == {METADATA_KEY, PACKED_KEY} and natural == path.stat().st_size
    stub = json.loads(meta[METADATA_KEY])
    text = doc.to_json()
    assert stub == {
        "format": "slimstore-delta",
        "version": FORMAT_VERSION,
        "document": {"key": PACKED_KEY, "coding": "zstd+base64", "size": len(text.encode())},
    }
    assert unpack_document(meta, "d.slim") == (text, FORMAT_VERSION)
    assert len(meta[PACKED_KEY]) < len(text)  # base64 of the zstd frame (sha256s dominate here)
    plain = pack_document(text, PACKED_VERSION - 1)  # what version 5 stored
    assert plain == {METADATA_KEY: text} and unpack_document(plain, "d.slim") == (text, None)
    rewrite_document(path, doc, min_size=natural + 64)
    assert path.stat().st_size == natural + 64
    with DeltaReader(path) as r:
        assert r.doc.to_json() == text
    out = reconstruct(base, path, tmp_path / "out")
    assert out

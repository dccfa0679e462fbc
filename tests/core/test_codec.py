"""Round-trip properties of the frame codings: zstd frames, positions, values (and their
quantisation) and XOR planes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core import xor
from core.errors import InvalidArgument, InvalidDelta
from core.frames import to_planes, zstd_compress, zstd_decompress
from core.positions import decode_positions, encode_positions
from core.safetensors_io import tensor_to_bytes
from core.values import (
    _round_q_on_device,
    decode_values,
    encode_values,
    pack_codes,
    round_values,
    unpack_codes,
)
from core.xor import XorEncoder, XorPlanes

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def positions_and_numel(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    numel = draw(st.integers(0, 5000))
    mode = draw(st.sampled_from(["empty", "all", "single", "random", "dense", "clustered"]))
    if numel == 0 or mode == "empty":
        return np.zeros(0, dtype=np.int64), numel
    if mode == "all":
        return np.arange(numel, dtype=np.int64), numel
    if mode == "single":
        return np.array([draw(st.integers(0, numel - 1))], dtype=np.int64), numel
    rate = {"random": 0.01, "dense": 0.6, "clustered": 0.1}[mode]
    rnd = np.random.default_rng(draw(st.integers(0, 2**31)))
    mask = rnd.random(numel) < rate
    if mode == "clustered":
        mask = np.repeat(mask[: numel // 8 + 1], 8)[:numel]
    return np.flatnonzero(mask).astype(np.int64), numel


@SETTINGS
@given(positions_and_numel())
def test_positions_round_trip(case: tuple[np.ndarray, int]) -> None:
    positions, numel = case
    coding, frame, params = encode_positions(positions, numel)
    out = decode_positions(coding, frame, params, positions.size, numel)
    assert np.array_equal(out, positions)


def test_positions_pick_the_smaller_coding() -> None:
    numel = 100_000
    sparse = np.arange(0, numel, 997, dtype=np.int64)
    dense = np.flatnonzero(np.random.default_rng(0).random(numel) < 0.5).astype(np.int64)
    assert encode_positions(sparse, numel)[0] == "gaps"
    assert encode_positions(dense, numel)[0] == "bitmap"


def test_huge_gaps_use_wide_planes() -> None:
    positions = np.array([0, 2**33], dtype=np.int64)
    coding, (frame, params) = "gaps", _gaps(positions)
    assert params["width"] == 8
    assert np.array_equal(decode_positions(coding, frame, params, 2, 2**33 + 1), positions)


def _gaps(positions: np.ndarray) -> tuple[bytes, dict[str, int]]:
    gaps = np.diff(positions, prepend=-1) - 1
    return zstd_compress(to_planes(gaps.astype("<u8"))), {"width": 8}


float_values = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=400
)


@SETTINGS
@given(float_values, st.sampled_from(["f32", "f16", "bf16"]))
def test_float_values_round_trip_to_their_rounding(values: list[float], coding: str) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    frame, params = encode_values(t, coding, 16 if coding != "f32" else 32)
    out = decode_values(coding, frame, params, t.numel())
    assert torch.equal(out, round_values(t, coding, 16))


@SETTINGS
@given(float_values, st.sampled_from([1, 2, 3, 4, 8]))
def test_quantised_values_decode_to_what_the_search_sees(values: list[float], bits: int) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    frame, params = encode_values(t, "q", bits)
    out = decode_values("q", frame, params, t.numel())
    assert torch.equal(out, round_values(t, "q", bits))
    if t.numel():
        assert bool(((out == 0) | (torch.sign(out) == torch.sign(t)) | (t == 0)).all())


def test_quantisation_error_shrinks_with_bits() -> None:
    t = torch.randn(20_000) * torch.rand(20_000)
    errors = [float((round_values(t, "q", b) - t).norm()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.02 * float(t.norm())


@SETTINGS
@given(st.integers(0, 3000), st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 2**31))
def test_code_packing_round_trip(n: int, bits: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    assert np.array_equal(unpack_codes(pack_codes(codes, bits), n, bits), codes)


def _pair(n: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[bytes, bytes]:
    """Base and fine-tune bytes of ``n`` elements that differ a little."""

    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, generator=g) * 10).to(dtype)
    b = (a.float() + torch.randn(n, generator=g)).to(dtype)
    return tensor_to_bytes(a), tensor_to_bytes(b)


def _single_frame_planes(ft: bytes, base: bytes, width: int) -> bytes:
    """The lossless frame of format versions 1–2: all planes, one after another, one frame."""
    x = np.bitwise_xor(np.frombuffer(ft, np.uint8), np.frombuffer(base, np.uint8))
    return zstd_compress(x.reshape(-1, width).T.copy().tobytes())


def _encode_xor(ft: bytes, base: bytes, width: int) -> tuple[bytes, list[int]]:
    """The lossless frame of a whole tensor, fed in two pieces as the encoder is."""
    enc = XorEncoder(width, len(ft) // width)
    half = (len(ft) // width // 2) * width
    enc.add(ft[:half], base[:half])
    enc.add(ft[half:], base[half:])
    return enc.finish()


def _decode_xor(
    frame: bytes, base: bytes, width: int, plane_sizes: list[int] | None = None
) -> bytes:
    """The fine-tune's bytes: the planes XORed into a copy of the base, the whole at once."""
    items = np.frombuffer(base, dtype=f"<u{width}").copy()  # (n,)
    planes = XorPlanes(frame, width, len(items), plane_sizes)
    planes.apply(items)
    planes.finish()
    return items.tobytes()


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (2, 3, 5)])
def test_xor_is_exact_for_every_dtype_and_odd_shapes(
    dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    n = int(np.prod(shape))
    ab, bb = _pair(n, dtype)
    width = torch.empty(0, dtype=dtype).element_size()
    frame, sizes = _encode_xor(bb, ab, width)
    assert len(sizes) == width and sum(sizes) == len(frame)  # one zstd frame per byte plane
    assert _decode_xor(frame, ab, width, plane_sizes=sizes) == bb
    # the single-frame planes of format versions 1–2 still decode
    assert _decode_xor(_single_frame_planes(bb, ab, width), ab, width) == bb


def test_xor_decodes_in_steps_smaller_than_a_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planes are inflated a few bytes at a time; a step boundary mid-plane changes nothing."""
    monkeypatch.setattr(xor, "STEP_BYTES", 7)
    ab, bb = _pair(1001, seed=1)
    frame, sizes = _encode_xor(bb, ab, 2)
    assert _decode_xor(frame, ab, 2, plane_sizes=sizes) == bb
    assert _decode_xor(_single_frame_planes(bb, ab, 2), ab, 2) == bb


def test_xor_planes_rebuild_any_run_of_pieces() -> None:
    """Side-by-side planes rebuild piece after piece, from any element on (skip), to the same
    bytes as the whole; the single-frame layout refuses pieces instead of misreading them."""
    n, width = 5000, 4
    ab, bb = _pair(n, torch.float32, seed=2)
    frame, sizes = _encode_xor(bb, ab, width)
    for first, step in [(0, 1), (0, 999), (1234, 321), (4999, 7)]:
        planes = XorPlanes(frame, width, n, sizes)
        planes.skip(first)
        got = bytearray(ab[first * width :])
        items = np.frombuffer(got, dtype="<u4")
        for i in range(0, n - first, step):
            planes.apply(items[i : i + step])
        planes.finish()
        assert bytes(got) == bb[first * width :]
    legacy = XorPlanes(_single_frame_planes(bb, ab, width), width, n, None)
    assert not legacy.streamable
    with pytest.raises(InvalidDelta, match="only whole"):
        legacy.apply(np.zeros(10, dtype="<u4"))


def test_xor_refuses_frames_of_the_wrong_size_or_damaged() -> None:
    base = bytes(range(256)) * 40
    frame, sizes = _encode_xor(bytes(reversed(base)), base, 4)
    with pytest.raises(InvalidDelta, match="declares"):
        _decode_xor(frame, base[:-4], 4, plane_sizes=sizes)
    with pytest.raises(InvalidDelta, match="not a zstd frame"):
        _decode_xor(b"garbage!", base, 4)
    with pytest.raises(InvalidDelta, match="do not add up"):
        _decode_xor(frame, base, 4, plane_sizes=[*sizes[:-1], sizes[-1] + 1])
    with pytest.raises(InvalidDelta, match="do not add up"):
        _decode_xor(frame, base, 4, plane_sizes=sizes[:2])
    cut = frame[: len(frame) - sizes[-1] // 2]
    with pytest.raises(InvalidDelta, match=r"wrong size|does not decompress"):
        _decode_xor(cut, base, 4, plane_sizes=[*sizes[:-1], sizes[-1] - sizes[-1] // 2])
    extra = zstd_compress(b"x" * 64)  # a plane with trailing garbage after its content
    with pytest.raises(InvalidDelta):
        _decode_xor(frame + extra, bytearray(base), 4,
                         plane_sizes=[*sizes[:-1], sizes[-1] + len(extra)])  # fmt: skip
    legacy = _single_frame_planes(bytes(reversed(base)), base, 4)
    with pytest.raises(InvalidDelta):
        _decode_xor(legacy + extra, bytearray(base), 4)


def test_non_contiguous_tensors_encode_like_their_contiguous_copy() -> None:
    t = torch.randn(10, 12).t()[::2]  # a strided view
    assert not t.is_contiguous()

    assert tensor_to_bytes(t) == tensor_to_bytes(t.contiguous())
    f1, _ = encode_values(t.reshape(-1), "f16", 16)
    f2, _ = encode_values(t.contiguous().reshape(-1), "f16", 16)
    assert f1 == f2


def test_zstd_refuses_frames_larger_than_declared() -> None:
    frame = zstd_compress(b"\0" * 10_000)
    with pytest.raises(InvalidDelta, match="declares"):
        zstd_decompress(frame, 100)
    with pytest.raises(InvalidDelta, match="not a zstd frame"):
        zstd_decompress(b"garbage", 5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_accelerator_quantisation_matches_the_host_fit(bits: int) -> None:
    """The torch-only fit used on a GPU (run here on the CPU) agrees with the stored one."""
    t = torch.randn(5000) * torch.rand(5000)
    host = round_values(t, "q", bits)
    device_path = _round_q_on_device(t, bits)
    assert torch.allclose(host, device_path, rtol=1e-4, atol=1e-6)


def _torch_bits(bits: np.ndarray, src: torch.dtype, dst: torch.dtype) -> np.ndarray:
    """What ``Tensor.to`` makes of the values whose bits are ``bits``, as unsigned bits."""
    wide = {2: np.int16, 4: np.int32}
    t = torch.from_numpy(bits.view(wide[bits.itemsize]).copy()).view(src).to(dst)
    width = torch.empty(0, dtype=dst).element_size()
    return t.view({2: torch.int16, 4: torch.int32}[width]).numpy().view(f"<u{width}")


@pytest.mark.parametrize(("dst", "tdst"), [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_cast_base_rounds_like_torch_and_keeps_nan_signs(dst: str, tdst: torch.dtype) -> None:
    """float32 to bf16/f16 as format §5b says: every finite value and ±inf as ``Tensor.to``
    (round to nearest even: random bits, exact halves and their neighbours, overflow,
    subnormals), a NaN a quiet NaN of its sign."""
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    half = (rng.integers(0, 2**16, size=20_000).astype(np.uint32) << 16) | 0x8000
    halves = half | (np.uint32(1) << np.arange(16, dtype=np.uint32)[:, None] % 14)
    edges = np.array([0x7F7FFFFF, 0x477FF000, 0x477FEFFF, 0x33800001, 0x00000001, 0x7F800000],
                     dtype=np.uint32)  # fmt: skip
    bits = np.concatenate([rand, half, half - 1, halves.reshape(-1), edges, edges | 0x80000000])
    got = xor.cast_base(bits.tobytes(), "F32", dst)
    fin = ~np.isnan(bits.view(np.float32))
    assert got.dtype == np.dtype("<u2") and len(got) == len(bits)
    assert np.array_equal(got[fin], _torch_bits(bits[fin], torch.float32, tdst))
    nans = np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0xFF812345], dtype=np.uint32)
    out = xor.cast_base(nans.tobytes(), "F32", dst).astype(np.uint32)
    exp, quiet = (0x7F80, 0x0040) if dst == "BF16" else (0x7C00, 0x0200)
    assert np.all(out & exp == exp) and np.all(out & quiet)  # quiet NaNs
    assert np.array_equal(out >> 15, nans >> 31)  # of the same sign


@pytest.mark.parametrize(("src", "tsrc"), [("BF16", torch.bfloat16), ("F16", torch.float16)])
def test_cast_base_widens_every_16_bit_value_exactly(src: str, tsrc: torch.dtype) -> None:
    bits = np.arange(2**16, dtype=np.uint16)
    got = xor.cast_base(bits.tobytes(), src, "F32")
    fin = ~np.isnan(got.view(np.float32))
    assert np.array_equal(got[fin], _torch_bits(bits[fin], tsrc, torch.float32))
    assert fin.sum() < len(bits)  # NaNs stay NaNs
    assert np.isnan(got[~fin].view(np.float32)).all()


def test_cast_base_refuses_pairs_it_does_not_define() -> None:
    for pair in [("F64", "F32"), ("F32", "F32"), ("BF16", "F16"), ("I32", "F32")]:
        with pytest.raises(InvalidArgument, match="no lossless cast"):
            xor.cast_base(b"\0" * 8, *pair)


@pytest.mark.parametrize("width", [2, 4, 8])
def test_ulp_residual_round_trips_every_bit_pattern_and_counts_ulps(width: int) -> None:
    """Any two bit patterns (NaNs, ±0, ±inf included) come back; neighbours in float order
    are residual 1 or 2 apart, across a power of two and across zero too (where XOR is wide)."""
    u = np.dtype(f"<u{width}")
    rng = np.random.default_rng(width)
    hi = np.iinfo(u).max
    a = rng.integers(0, hi, size=50_000, dtype=u, endpoint=True)
    b = rng.integers(0, hi, size=50_000, dtype=u, endpoint=True)
    special = np.array([0, 1, hi, hi >> 1, (hi >> 1) + 1, (hi >> 1) + 2], dtype=u)
    a, b = np.concatenate([a, special, special[::-1]]), np.concatenate([b, special, special])
    z = xor.ulp_residual(a, b)
    assert z.dtype == u and np.array_equal(xor.undo_ulp_residual(b, z), a)
    f = {2: np.float16, 4: np.float32, 8: np.float64}[width]
    one, zero = np.array([1.0, 0.0], dtype=f).view(u)
    below_one = np.nextafter(f(1), f(0)).view(u)
    neg_tiny = np.nextafter(f(-0.0), f(-1)).view(u)
    # (ft, base, z): one step down, one step up, two steps up from −tiny to +0 (past −0)
    pairs = [(below_one, one, 1), (one, below_one, 2), (zero, neg_tiny, 4)]
    for ft, base, want in pairs:
        got = xor.ulp_residual(np.array([ft], u), np.array([base], u))
        assert int(got[0]) == want, (ft, base)


def test_ulp_planes_rebuild_pieces_and_beat_xor_on_a_small_change() -> None:
    n = 6000
    ab, bb = _pair(n, torch.bfloat16, seed=3)
    enc = XorEncoder(2, n, residual="ulp")
    enc.add(bb[:2000], ab[:2000])
    enc.add(bb[2000:], ab[2000:])
    frame, sizes = enc.finish()
    for first, step in [(0, n), (17, 999), (5999, 1)]:
        planes = XorPlanes(frame, 2, n, sizes, "ulp")
        planes.skip(first)
        got = np.frombuffer(bytearray(ab[first * 2 :]), dtype="<u2")
        for i in range(0, n - first, step):
            if i % 2:  # both ways of applying a piece
                planes.xor_into(got[i : i + step], planes.inflate(len(got[i : i + step])))
            else:
                planes.apply(got[i : i + step])
        planes.finish()
        assert got.tobytes() == bb[first * 2 :]
    a = torch.randn(n, generator=torch.Generator().manual_seed(4))
    small = tensor_to_bytes(
        (a + 1e-3 * torch.randn(n, generator=torch.Generator().manual_seed(5))).to(torch.bfloat16)
    )
    base = tensor_to_bytes(a.to(torch.bfloat16))
    assert len(_encode_xor(small, base, 2)[0]) > 1.05 * len(_encode_ulp(small, base, 2))


def _encode_ulp(ft: bytes, base: bytes, width: int) -> bytes:
    enc = XorEncoder(width, len(ft) // width, residual="ulp")
    enc.add(ft, base)
    return enc.finish()[0]


def test_unknown_residuals_are_refused() -> None:
    frame, sizes = _encode_xor(b"\1\2" * 8, b"\0\0" * 8, 2)
    with pytest.raises(InvalidDelta, match="unknown lossless residual"):
        XorPlanes(frame, 2, 8, sizes, "sub")
    with pytest.raises(InvalidDelta, match="not defined"):
        XorPlanes(zstd_compress(b"\0" * 8), 1, 8, [17], "ulp")
    with pytest.raises(InvalidDelta, match="plane sizes"):
        XorPlanes(frame, 2, 8, None, "ulp")  # versions 1–2 have no residual

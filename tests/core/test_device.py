"""The precision rule of :mod:`core.device`: bf16 only for bf16 weights on bf16 hardware."""

from __future__ import annotations

from pathlib import Path

import torch

from core.device import compute_dtype, computes_bf16, cpu_flags, cpu_has_bf16


def test_cpu_bf16_is_read_from_the_flags(tmp_path: Path) -> None:
    assert not cpu_has_bf16({"sse4_2", "avx2", "fma"}, "x86_64")
    assert cpu_has_bf16({"avx2", "avx512f", "avx512_bf16"}, "x86_64")
    assert cpu_has_bf16({"avx2", "amx_tile", "amx_bf16"}, "x86_64")
    assert cpu_has_bf16({"fp", "asimd", "bf16"}, "aarch64")
    assert not cpu_has_bf16({"fp", "asimd", "sve"}, "aarch64")
    assert not cpu_has_bf16({"bf16"}, "x86_64")  # an Arm flag name means nothing on x86
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(arm)) == {"fp", "asimd", "bf16", "i8mm"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_compute_dtype_is_bf16_only_for_bf16_weights_on_bf16_hardware() -> None:
    cpu = torch.device("cpu")
    native = cpu_has_bf16()
    assert computes_bf16(cpu) == native
    assert compute_dtype(cpu, {torch.bfloat16}) == (torch.bfloat16 if native else torch.float32)
    for weights in ({torch.float32}, {torch.float16}, {torch.bfloat16, torch.float32}, set()):
        assert compute_dtype(cpu, weights) == torch.float32
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert compute_dtype(gpu, {torch.bfloat16}) == want

"""Where a model runs and in which precision: the one owner of both choices.

bf16 weights are computed in bf16 only where the hardware has bf16 arithmetic: a CUDA GPU that
supports it (``torch.cuda.is_bf16_supported()``), or a CPU whose flags name bf16 instructions
(x86: ``avx512_bf16`` or ``amx_bf16``; aarch64: ``bf16``). Elsewhere bf16 weights are upcast
to float32 for the forward pass: on an AVX2-only CPU a MiniLM forward of 64×64 tokens took
2.7 s in float32 and 15–22 s in bf16 (torch falls back to reference kernels), while on a CPU
with AMX the bf16 forward is ~2.8× faster than float32 (0.20 s against 0.55 s).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterable
from pathlib import Path

import torch

#: CPU flags (``/proc/cpuinfo``) that mean native bf16 arithmetic, by machine family.
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
ARM_BF16_FLAGS = frozenset({"bf16"})


def pick_device(device: str | None = None) -> torch.device:
    """``cuda`` when present, else CPU (or what the caller asks for)."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags: the ``flags`` (x86) or ``Features`` (aarch64) line of
    ``/proc/cpuinfo``; empty where there is no such file (then no bf16 is assumed)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16(flags: Iterable[str] | None = None, machine: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively, from its flags (default: this CPU's).

    Args:
        flags: CPU feature flags (default :func:`cpu_flags`).
        machine: ``platform.machine()`` (default: this one's); ``aarch64``/``arm64`` read the
            Arm flag, anything else the x86 flags.
    """
    have = cpu_flags() if flags is None else frozenset(flags)
    machine = (machine or platform.machine()).lower()
    wanted = ARM_BF16_FLAGS if machine in ("aarch64", "arm64") else X86_BF16_FLAGS
    return bool(have & wanted)


def computes_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 arithmetic (a CUDA GPU that supports it, or a CPU whose
    flags say so, :func:`cpu_has_bf16`)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def compute_dtype(device: torch.device, weight_dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype a model with these floating-point weights is run in on ``device``.

    bf16 when every weight is bf16 and the device computes bf16 natively
    (:func:`computes_bf16`); float32 otherwise (fp16 and mixed checkpoints included: their
    weights are upcast, which is exact).

    Example:
        >>> compute_dtype(torch.device("cpu"), [torch.float32])
        torch.float32
    """
    kinds = set(weight_dtypes)
    if kinds == {torch.bfloat16} and computes_bf16(device):
        return torch.bfloat16
    return torch.float32

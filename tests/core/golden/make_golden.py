"""Regenerate the golden delta files: ``python -m tests.core.golden.make_golden``.

Run only after a deliberate format change (and bump ``FORMAT_VERSION``); the golden tests
pin both what the reader accepts and the exact bytes the writer produces.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from core.compress import compress
from core.reconstruct import reconstruct
from core.safetensors_io import save_file

HERE = Path(__file__).parent
CASES = {
    "magnitude_f16": dict(method="magnitude", keep=0.25, value_bits=16),
    "dare_q4": dict(method="dare", keep=0.5, value_bits=4, seed=11),
    "nps_seeded_q2": dict(method="nps-seeded", keep=0.3, value_bits=2, seed=5),
    "lossless": dict(method="lossless"),
    # version 4: the sine waves' task vectors are rank 2 (a rank-2 τ, a bf16 one, a 1-D one)
    "lowrank_f16": dict(method="lowrank", options={"device": "cpu"}),
}
#: The cases of each older version kept under ``v<version>/`` (written before ``lowrank``;
#: ``v4/`` also holds ``lowrank_f16``). Their fine-tune is :func:`write_pair`'s before version
#: 5 made ``layer.bias`` bf16; only the base matters to them, and it is unchanged.
OLD_CASES = ("magnitude_f16", "dare_q4", "nps_seeded_q2", "lossless")


def _wave(n: int, a: float, b: float) -> torch.Tensor:
    return torch.tensor([math.sin(a * i + b) for i in range(n)], dtype=torch.float32)


def write_pair(root: Path) -> tuple[Path, Path]:
    """A deterministic base/fine-tune pair built from sine waves (no RNG)."""
    base = {
        "layer.weight": _wave(96, 0.37, 0.1).reshape(12, 8),
        "layer.bias": _wave(12, 1.3, 0.7),
        "emb.weight": _wave(40, 0.11, 2.0).reshape(5, 8).to(torch.bfloat16),
        "same.weight": _wave(6, 0.5, 0.5).to(torch.float16),
    }
    ft = {k: v.clone() for k, v in base.items()}
    ft["layer.weight"] = base["layer.weight"] + 0.05 * _wave(96, 2.71, 0.3).reshape(12, 8)
    ft["emb.weight"] = (base["emb.weight"].float() + 0.03 * _wave(40, 1.7, 0.2).reshape(5, 8)).to(
        torch.bfloat16
    )
    # version 5: a bf16 fine-tune of an fp32 tensor (lossless XORs the base cast to bf16)
    ft["layer.bias"] = (base["layer.bias"] + 0.1 * _wave(12, 0.9, 1.1)).to(torch.bfloat16)
    ft["head.weight"] = _wave(16, 0.77, 0.0).reshape(2, 8)
    (root / "base").mkdir(parents=True, exist_ok=True)
    (root / "ft").mkdir(parents=True, exist_ok=True)
    save_file(base, root / "base" / "model.safetensors")
    save_file(ft, root / "ft" / "model.safetensors")
    (root / "ft" / "config.json").write_text('{"golden": true}\n')
    return root / "base", root / "ft"


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base, ft = write_pair(Path(tmp))
        manifest = {}
        for name, kwargs in CASES.items():
            out = HERE / f"{name}.slim"
            compress(base, ft, out, **kwargs)  # type: ignore[arg-type]
            rebuilt = reconstruct(base, out, Path(tmp) / f"out-{name}")
            manifest[name] = {
                "size": out.stat().st_size,
                "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in rebuilt},
            }
        (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

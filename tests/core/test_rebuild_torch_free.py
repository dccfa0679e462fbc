"""A lossless rebuild reads and writes bytes only: it never imports torch (whose import costs
seconds, more than a small ``pull --local`` takes otherwise), and its files are the fine-tune's
own bytes, bf16, fp32 and mixed files alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.compress import compress
from core.delta_format import DeltaReader
from core.files import sha256_file
from core.reconstruct import reconstruct
from core.safetensors_io import save_file
from tests.core.conftest import make_pair

ROOT = Path(__file__).resolve().parents[2]


def _mixed_pair(root: Path) -> tuple[Path, Path]:
    """A base and a fine-tune whose one weight file mixes bf16, fp32, fp16 and int tensors,
    changed, unchanged and new."""
    g = torch.Generator().manual_seed(3)
    base = {
        "a.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "a.bias": torch.randn(64, generator=g),
        "b.weight": torch.randn(48, 64, generator=g).to(torch.float16),
        "frozen": torch.randn(9, 5, generator=g).to(torch.bfloat16),
        "ids": torch.arange(20, dtype=torch.int32),
    }
    ft = {k: v.clone() for k, v in base.items()}
    for k in ("a.weight", "a.bias", "b.weight"):
        ft[k] = (base[k].float() + 0.01 * torch.randn(base[k].shape, generator=g)).to(base[k].dtype)
    ft["head.weight"] = torch.randn(3, 48, generator=g)
    for name, tensors in (("base", base), ("ft", ft)):
        (root / name).mkdir(parents=True)
        save_file(tensors, root / name / "model.safetensors")
        (root / name / "config.json").write_text('{"model_type": "toy"}')
    return root / "base", root / "ft"


def _rebuild_without_torch(base: Path, delta: Path, out: Path) -> list[str]:
    """Rebuild in a fresh interpreter; the modules of torch it loaded."""
    code = (
        "import sys; from core.reconstruct import reconstruct; "
        f"reconstruct({str(base)!r}, {str(delta)!r}, {str(out)!r}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.strip().replace("'", '"')))


@pytest.mark.parametrize("pair", ["bf16", "fp32-sharded", "mixed"])
def test_lossless_rebuild_imports_no_torch_and_gives_the_fine_tunes_bytes(
    pair: str, tmp_path: Path
) -> None:
    if pair == "mixed":
        base, ft = _mixed_pair(tmp_path)
    else:
        dtype = torch.bfloat16 if pair == "bf16" else torch.float32
        base, ft, _, _ = make_pair(tmp_path, dtype=dtype, shards=1 if pair == "bf16" else 2)
    delta = tmp_path / "d.slim"
    compress(base, ft, delta, method="lossless")
    with DeltaReader(delta) as reader:
        kinds = {t.kind for t in reader.doc.tensors}
    assert {"lossless", "same", "dense"} <= kinds  # every kind of a lossless delta
    assert _rebuild_without_torch(base, delta, tmp_path / "out") == []
    # ... and the same bytes as the rebuild in this process (torch loaded) and the fine-tune
    reconstruct(base, delta, tmp_path / "here", workers=1)
    files = sorted(p.relative_to(ft) for p in ft.rglob("*") if p.is_file())
    assert files
    for rel in files:
        want = sha256_file(ft / rel)
        assert sha256_file(tmp_path / "out" / rel) == want, rel
        assert sha256_file(tmp_path / "here" / rel) == want, rel


def test_a_sparse_rebuild_loads_torch_only_when_it_needs_arithmetic(tmp_path: Path) -> None:
    base, ft = _mixed_pair(tmp_path)
    delta = tmp_path / "d.slim"
    compress(base, ft, delta, method="magnitude", keep=0.1)
    assert "torch" in _rebuild_without_torch(base, delta, tmp_path / "out")

"""Helpers for the test suite: the real base model, a small real fine-tune, calibration files.

Wrap these in pytest fixtures where they are needed, e.g.::

    @pytest.fixture(scope="session")
    def finetune_dir():
        return tiny_finetune_dir()

The tiny fine-tune is cached under the benchmark cache (``$SLIM_BENCH_CACHE`` or
``bench/cache``), so only the first run trains it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from bench.data import Example, load_task, write_jsonl
from bench.finetune import Recipe, base_model_dir, make_finetune

__all__ = [
    "TINY_RECIPE",
    "TINY_TASK",
    "base_dir",
    "bf16_copy",
    "calibration_jsonl",
    "sample_examples",
    "test_examples",
    "tiny_finetune_dir",
]

TINY_TASK = "rotten_tomatoes"
#: 50 steps of 32 on 3,000 training examples (about half an epoch).
TINY_RECIPE = Recipe(task=TINY_TASK, steps=50, train_subset=3000, seed=0)


def base_dir() -> Path:
    """The real base model directory (all-MiniLM-L6-v2, a ``BertModel``; no ``bert.`` prefix)."""
    return base_model_dir()


def tiny_finetune_dir() -> Path:
    """A small real fine-tune of the base on rotten_tomatoes (cached after the first call).

    A complete HF model directory (``config.json``, ``model.safetensors``, tokenizer files)
    loadable with ``AutoModelForSequenceClassification``; encoder under ``bert.*``, head under
    ``classifier.*``, 2 labels (0 = rotten, 1 = fresh).
    """
    return make_finetune(TINY_RECIPE, verbose=False)


def sample_examples(
    n: int, split: str = "test", task: str = TINY_TASK, seed: int = 0
) -> list[Example]:
    """A seeded random sample of ``n`` examples of ``split`` (all of it if ``n`` is larger)."""
    examples = load_task(task).split(split)
    if n >= len(examples):
        return list(examples)
    idx = sorted(random.Random(f"{task}-{split}-{seed}").sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def test_examples(n: int = 200, task: str = TINY_TASK) -> list[Example]:
    """``n`` test examples (a fixed sample over the whole test split)."""
    return sample_examples(n, "test", task)


test_examples.__test__ = False  # not a test, despite the name


def calibration_jsonl(
    path: str | os.PathLike,
    n: int = 64,
    split: str = "validation",
    with_labels: bool = True,
    task: str = TINY_TASK,
) -> Path:
    """Write ``n`` examples of ``split`` (a fixed sample) to ``path`` as calibration JSON lines
    (``{"text": ..., "label": ...}``); returns the path."""
    return write_jsonl(sample_examples(n, split, task), path, with_labels=with_labels)


def bf16_copy(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> Path:
    """A copy of a model directory whose weights are cast to bfloat16; returns ``dst_dir``.

    Every floating-point tensor of every ``*.safetensors`` file is rounded to bfloat16 (round to
    nearest even, as ``Tensor.to`` does); other tensors keep their dtype, the file's
    ``__metadata__`` is kept, and ``config.json``'s ``dtype``/``torch_dtype`` (where present)
    says ``bfloat16``. All other files are copied as they are. Written to a temporary sibling
    and renamed into place, so an existing ``dst_dir`` is complete (and is returned as is).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src_dir), Path(dst_dir)
    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    for path in sorted(tmp.rglob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            tensors = {}
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                t = f.get_tensor(name)
                tensors[name] = t.to(torch.bfloat16) if t.is_floating_point() else t
        save_file(tensors, path, metadata=meta)
    config = tmp / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = "bfloat16"
        config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.rename(dst)
    return dst

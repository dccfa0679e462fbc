"""Merging a PEFT LoRA adapter into its base's weights, tensor at a time.

For every adapted linear layer ``W (out, in)`` with factors ``A (r, in)`` and ``B (out, r)``,
the merged weight is ``W + s · B @ A`` (transposed when the adapter was made with
``fan_in_fan_out``, as for GPT-2's ``Conv1D``), ``s = alpha / r`` or ``alpha / sqrt(r)`` with
rsLoRA, ``alpha`` from ``alpha_pattern`` where it names the module (:class:`AdapterConfig`).
Other tensors the adapter carries — the copies of ``modules_to_save`` (a task head) and, with
``bias: all|lora_only``, trained biases — replace the base's tensor of that name, or are added
when the base has none (a head the base lacks). The sum is computed in fp32 and each tensor is
written in its base tensor's dtype, which is what ``PeftModel.merge_and_unload()`` gives.

Names. PEFT saves ``base_model.model.<module>.lora_A.weight``, ``<module>`` being the module's
name in the model the adapter was made on. That model and the stored base may differ by one
leading component — a task model (``BertForSequenceClassification``: ``bert.encoder…``) against
a bare encoder base (``BertModel``: ``encoder…``), or the other way round. The rule used is the
first of these under which **every** LoRA target ``<module>.weight`` is a tensor of the base:

1. as is: ``<module>`` → ``<module>``;
2. without the task model's prefix ``P`` (the first component shared by every target, e.g.
   ``bert``): ``P.<rest>`` → ``<rest>``; names outside ``P`` (the head: ``classifier.*``) stay;
3. with a prefix ``P`` of the base's (a first component of its tensor names): ``<module>`` →
   ``P.<module>``.

When none fits, :class:`InvalidAdapter` names the targets the base lacks. The merged directory
keeps the base's tensor names, so a head added under rule 2 sits beside the bare encoder's
names, which ``transformers`` loads as a task model
(``AutoModelForSequenceClassification.from_pretrained(dir, num_labels=N)``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from core.checkpoint import INDEX_SUFFIX, CheckpointDir
from core.files import CHUNK_SIZE
from core.peft_config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    AdapterConfig,
    InvalidAdapter,
)
from core.safetensors_io import SafetensorsFile, build_header, tensor_view

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterConfig",
    "InvalidAdapter",
    "LoraPair",
    "MergePlan",
    "MergedAdapter",
    "merge_adapter",
    "plan_merge",
]

_A, _B = ".lora_A.weight", ".lora_B.weight"
#: The weights file a tensor the base lacks (a head) is added to, when the base has it.
_MAIN_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: its factors in the adapter and the base tensor they update."""

    module: str  # the module's name in the model the adapter was made on
    a: str  # adapter tensor (r, in)
    b: str  # adapter tensor (out, r)
    target: str  # base tensor (out, in), or (in, out) with fan_in_fan_out


@dataclass(frozen=True)
class MergePlan:
    """What a merge does, decided from the headers alone (no tensor read)."""

    rule: str  # how adapter names became base names (module docstring), in words
    pairs: dict[str, LoraPair]  # by base tensor name
    replaced: dict[str, str]  # base tensor name -> adapter tensor replacing it
    added: dict[str, str]  # new tensor name -> adapter tensor


@dataclass
class MergedAdapter:
    """The result of :func:`merge_adapter`."""

    plan: MergePlan
    files: list[Path] = field(default_factory=list)  # every file written, in order


def _module_names(adapter_names: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """LoRA modules (module -> (A, B) tensor names) and the other tensors, by adapter name."""
    halves: dict[str, dict[str, str]] = {}
    others: list[str] = []
    for name in adapter_names:
        if not name.startswith(PEFT_PREFIX):
            raise InvalidAdapter(
                f"{ADAPTER_WEIGHTS} holds {name!r}, which does not start with {PEFT_PREFIX!r}; "
                "save the adapter with PeftModel.save_pretrained"
            )
        rest = name[len(PEFT_PREFIX) :]
        if rest.endswith(_A) or rest.endswith(_B):
            halves.setdefault(rest[: -len(_A)], {})[rest[-len(_A) :]] = name
        elif ".lora_" in rest:
            kind = rest.split(".lora_", 1)[1].split(".", 1)[0]
            raise InvalidAdapter(
                f"{ADAPTER_WEIGHTS} holds {name!r} (lora_{kind}): only LoRA on linear layers "
                "(lora_A/lora_B) is merged here; merge this adapter with peft's "
                "merge_and_unload()"
            )
        else:
            others.append(name)
    pairs = {}
    for module, got in halves.items():
        if set(got) != {_A, _B}:
            raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds only one of lora_A/lora_B of {module}")
        pairs[module] = (got[_A], got[_B])
    return pairs, others


def _rules(modules: list[str], base_names: set[str]) -> list[tuple[str, Callable[[str], str]]]:
    """The candidate name rules of the module docstring, in order."""
    rules: list[tuple[str, Callable[[str], str]]] = [("as is", lambda n: n)]
    firsts = {m.split(".", 1)[0] for m in modules if "." in m}
    if len(firsts) == 1 and all("." in m for m in modules):
        p = f"{firsts.pop()}."
        rules.append((f"without {p!r}", lambda n: n[len(p) :] if n.startswith(p) else n))
    for first in sorted({n.split(".", 1)[0] for n in base_names if "." in n}):
        rules.append((f"with {first + '.'!r}", _prefixed(f"{first}.")))
    return rules


def _prefixed(prefix: str) -> Callable[[str], str]:
    return lambda name: prefix + name


def plan_merge(config: AdapterConfig, adapter_names: list[str], base_names: set[str]) -> MergePlan:
    """Which base tensor each adapter tensor updates, replaces or adds (module docstring).

    Raises:
        InvalidAdapter: no LoRA factors, an unsupported option, or no naming rule under which
            every target is a tensor of the base.
    """
    config.check_mergeable()
    modules, others = _module_names(adapter_names)
    if not modules:
        raise InvalidAdapter(f"{ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors")
    names = sorted(modules)
    best: tuple[int, str] | None = None
    for rule, rename in _rules(names, base_names):
        missing = [m for m in names if f"{rename(m)}.weight" not in base_names]
        if not missing:
            pairs = {}
            for m in names:
                a, b = modules[m]
                pairs[f"{rename(m)}.weight"] = LoraPair(m, a, b, f"{rename(m)}.weight")
            replaced: dict[str, str] = {}
            added: dict[str, str] = {}
            for name in others:
                target = rename(name[len(PEFT_PREFIX) :])
                (replaced if target in base_names else added)[target] = name
            return MergePlan(rule, pairs, replaced, added)
        if best is None or len(missing) < best[0]:
            best = (len(missing), f"{len(missing)} of {len(names)} targets ({missing[0]}, …)")
    example = next(iter(sorted(base_names)), "")
    raise InvalidAdapter(
        f"the adapter's targets are not tensors of this base: at best {best[1] if best else ''} "
        f"have no '<module>.weight' in the base (whose names look like {example!r}); is this "
        f"adapter made for this base? (its config says {config.base_model_name_or_path!r})"
    )


def _check_shapes(
    plan: MergePlan, config: AdapterConfig, adapter: SafetensorsFile, base: CheckpointDir
) -> None:
    for target, pair in plan.pairs.items():
        w = base.tensors[target].info.shape
        a, b = adapter.info(pair.a).shape, adapter.info(pair.b).shape
        want = (b[0], a[1]) if len(a) == 2 and len(b) == 2 else None
        if want is not None and config.fan_in_fan_out:
            want = (want[1], want[0])
        if want is None or a[0] != b[1] or tuple(w) != want:
            raise InvalidAdapter(
                f"{pair.module}: lora_A {list(a)} and lora_B {list(b)} do not update the base's "
                f"{target} of shape {list(w)}; is this adapter made for this base?"
            )


def _merged(
    plan: MergePlan, config: AdapterConfig, adapter: SafetensorsFile, base: CheckpointDir, name: str
) -> torch.Tensor:
    """The merged (or replaced) tensor ``name`` in its base dtype."""
    pair = plan.pairs.get(name)
    if pair is not None:
        w = base.get(name)  # (out, in), base dtype
        a = adapter.get(pair.a).to(torch.float32)  # (r, in)
        b = adapter.get(pair.b).to(torch.float32)  # (out, r)
        delta = (b @ a) * config.scaling(pair.module, rank=a.shape[0])  # (out, in)
        if config.fan_in_fan_out:
            delta = delta.T  # (in, out), as Conv1D stores it
        return (w.to(torch.float32) + delta).to(w.dtype)
    return adapter.get(plan.replaced[name]).to(base.tensors[name].info.torch_dtype)


def merge_adapter(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
) -> MergedAdapter:
    """Write the base's files with the adapter merged into its weights to ``out_dir``.

    Every file of the base is written: weight files holding a merged or replaced tensor are
    rewritten tensor by tensor (peak memory: one tensor and its factors), the others copied;
    tensors the base lacks (a head kept in ``modules_to_save``) are added to
    ``model.safetensors`` (else the first weight file), and a sharding index, if any, lists them.
    Each file appears under its name only once complete.

    Args:
        base_dir: the base model directory (config, safetensors weights, tokenizer).
        adapter_dir: a PEFT LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``).
        out_dir: where the merged model goes (created; files of the same names replaced).

    Returns:
        The plan and the files written.

    Raises:
        InvalidAdapter: see :func:`plan_merge`; also factor shapes that do not fit the base.

    Example:
        >>> merge_adapter("minilm", "my-lora", "merged")  # doctest: +SKIP
    """
    config = AdapterConfig.read(adapter_dir)
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise InvalidAdapter(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with SafetensorsFile(weights) as adapter, CheckpointDir.open(base_dir) as base:
        plan = plan_merge(config, adapter.keys(), set(base.tensors))
        _check_shapes(plan, config, adapter, base)
        result = MergedAdapter(plan)
        files = sorted(base.headers)
        home = _MAIN_WEIGHTS if _MAIN_WEIGHTS in base.headers else files[0]
        changed = set(plan.pairs) | set(plan.replaced)
        for rel in files:
            header = base.headers[rel]
            extra = sorted(plan.added) if rel == home else []
            if not extra and not changed & set(header.tensors):
                result.files.append(_copy(base.root / rel, out / rel))
                continue
            entries = []
            for name, info in header.tensors.items():
                if name in plan.replaced:
                    shape = adapter.info(plan.replaced[name]).shape
                    entries.append((name, info.dtype, tuple(shape)))
                else:
                    entries.append((name, info.dtype, info.shape))
            for name in extra:
                info = adapter.info(plan.added[name])
                entries.append((name, info.dtype, info.shape))
            target = out / rel
            with _writing(target) as f:
                f.write(build_header(entries, header.metadata))
                for name in header.tensors:
                    if name in changed:
                        f.write(tensor_view(_merged(plan, config, adapter, base, name)))
                    else:
                        f.write(base.read_bytes(name))
                for name in extra:
                    f.write(adapter.read_bytes(plan.added[name]))
            result.files.append(target)
        for rel in base.aux_files:
            if rel.endswith(INDEX_SUFFIX) and plan.added:
                result.files.append(_index_with(base.root / rel, out / rel, plan, home))
            else:
                result.files.append(_copy(base.root / rel, out / rel))
    return result


class _writing:
    """A file written to ``<name>.incomplete`` and moved into place when complete."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.part = target.with_name(target.name + ".incomplete")

    def __enter__(self) -> BinaryIO:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.f = self.part.open("wb")
        return self.f

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.f.close()
        if exc_type is None:
            os.replace(self.part, self.target)
        else:
            self.part.unlink(missing_ok=True)


def _copy(src: Path, target: Path) -> Path:
    with _writing(target) as f, src.open("rb") as s:
        shutil.copyfileobj(s, f, CHUNK_SIZE)
    return target


def _index_with(src: Path, target: Path, plan: MergePlan, home: str) -> Path:
    """The sharding index with the added tensors mapped to ``home``."""
    doc = json.loads(src.read_text("utf-8"))
    shard = home.rsplit("/", 1)[-1]
    doc["weight_map"] |= {name: shard for name in plan.added}
    with _writing(target) as f:
        f.write(json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n")
    return target

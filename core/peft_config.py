"""PEFT adapter directories: their file names and ``adapter_config.json``, read and checked.

Torch-free, so the SDK lists adapters with it; merging an adapter into its base's weights is
:mod:`core.peft`. Only LoRA adapters are understood: a DoRA, a LoRA with trained ``lora_B``
biases, layer replication, LoRA on raw parameters or on embedding tokens is refused with a
message saying what is not supported (such adapters are still stored and pulled as they are).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from core.errors import InvalidCheckpoint

#: The file that makes a directory a PEFT adapter.
ADAPTER_CONFIG: Final = "adapter_config.json"
#: The adapter's weights, as ``PeftModel.save_pretrained`` writes them.
ADAPTER_WEIGHTS: Final = "adapter_model.safetensors"
#: The prefix of every tensor name PEFT saves (``PeftModel`` → ``LoraModel`` → the model).
PEFT_PREFIX: Final = "base_model.model."
#: ``adapter_config.json`` is read up to this many bytes.
MAX_CONFIG_BYTES: Final = 1 << 20

# options that change what merging means; each must be off (false, null, empty) to merge
_UNSUPPORTED: Final = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "trained lora_B biases (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}


class InvalidAdapter(InvalidCheckpoint):
    """An adapter directory that cannot be read or merged (the detail says why)."""

    code = "invalid_adapter"


@dataclass(frozen=True)
class AdapterConfig:
    """What ``adapter_config.json`` says about a LoRA adapter.

    Example:
        >>> cfg = AdapterConfig.from_json(b'{"peft_type": "LORA", "r": 8, "lora_alpha": 16,'
        ...     b' "target_modules": ["query", "value"]}')
        >>> cfg.scaling("encoder.layer.0.attention.self.query", rank=8)
        2.0
    """

    peft_type: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str  # a list of names, or one regular expression
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    bias: str = "none"
    unsupported: tuple[str, ...] = ()  # options set that merging does not support

    @classmethod
    def from_json(cls, data: bytes | str) -> AdapterConfig:
        """Parse ``adapter_config.json``.

        Raises:
            InvalidAdapter: not JSON, not a LoRA adapter, or ``r``/``lora_alpha`` missing.
        """
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidAdapter(f"{ADAPTER_CONFIG} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise InvalidAdapter(f"{ADAPTER_CONFIG} must hold a JSON object")
        peft_type = str(doc.get("peft_type") or "")
        if peft_type.upper() != "LORA":
            raise InvalidAdapter(
                f"{ADAPTER_CONFIG} has peft_type {peft_type or None!r}; only LORA adapters are "
                "read here (others are stored and pulled as they are)"
            )
        r, alpha = doc.get("r"), doc.get("lora_alpha")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not _number(alpha):
            raise InvalidAdapter(
                f"{ADAPTER_CONFIG} needs a positive integer 'r' and a number 'lora_alpha' "
                f"(got r={r!r}, lora_alpha={alpha!r})"
            )
        targets = doc.get("target_modules")
        target_modules: tuple[str, ...] | str = (
            targets if isinstance(targets, str) else tuple(str(t) for t in targets or ())
        )
        patterns = doc.get("alpha_pattern") or {}
        if not isinstance(patterns, dict) or not all(_number(v) for v in patterns.values()):
            raise InvalidAdapter(f"{ADAPTER_CONFIG}: 'alpha_pattern' must map names to numbers")
        base = doc.get("base_model_name_or_path")
        return cls(
            peft_type="LORA",
            r=r,
            lora_alpha=float(alpha),  # type: ignore[arg-type]  # _number checked it
            target_modules=target_modules,
            base_model_name_or_path=str(base) if base else None,
            task_type=str(doc["task_type"]) if doc.get("task_type") else None,
            use_rslora=bool(doc.get("use_rslora")),
            fan_in_fan_out=bool(doc.get("fan_in_fan_out")),
            modules_to_save=tuple(str(m) for m in doc.get("modules_to_save") or ()),
            alpha_pattern={str(k): float(v) for k, v in patterns.items()},
            bias=str(doc.get("bias") or "none"),
            unsupported=tuple(text for key, text in _UNSUPPORTED.items() if doc.get(key)),
        )

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> AdapterConfig:
        """:meth:`from_json` of ``directory/adapter_config.json``."""
        path = Path(directory) / ADAPTER_CONFIG
        if not path.is_file():
            raise InvalidAdapter(f"{directory} has no {ADAPTER_CONFIG}; it is not a PEFT adapter")
        with path.open("rb") as f:
            return cls.from_json(f.read(MAX_CONFIG_BYTES))

    def check_mergeable(self) -> None:
        """Raises :class:`InvalidAdapter` when merging this adapter is not supported here."""
        if self.unsupported:
            raise InvalidAdapter(
                f"merging an adapter with {', '.join(self.unsupported)} is not supported; pull "
                "it as an adapter and merge it with peft's merge_and_unload()"
            )

    def scaling(self, module: str, *, rank: int) -> float:
        """The factor of ``B @ A`` for ``module`` (its name inside the model) of rank
        ``rank``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), ``alpha`` from
        ``alpha_pattern`` when one of its keys matches the module's name as PEFT matches it."""
        alpha = self.lora_alpha
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = value
                break
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def summary(self) -> dict[str, Any]:
        """The fields a listing shows."""
        targets = self.target_modules
        return {
            "peft_type": self.peft_type,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "modules_to_save": list(self.modules_to_save),
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
        }


def is_adapter_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a PEFT adapter (an ``adapter_config.json``)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

"""Fitness: how good a candidate reconstruction is, behind one protocol.

- ``fidelity``: no labels; the candidate's outputs against the fine-tune's own outputs on the
  calibration texts (top-1 agreement and KL for classifiers and causal LMs, cosine similarity
  of mean-pooled states for embedders). Fitness = −KL (or mean cosine).
- ``accuracy``: labelled calibration texts (the paper's setting). Fitness = accuracy plus a
  small log-likelihood term that breaks ties between equal accuracies.
- ``weights``: no model; data-free. Searches degenerate to magnitude pruning.

The model is built once from the fine-tune's own directory (``config.json`` + weights; no hub
access). A candidate is applied by writing base + delta into the model's parameters in place,
rounded to each tensor's own dtype (what reconstruction stores). A bf16 fine-tune is run in bf16
where the device computes bf16 natively and upcast to float32 elsewhere
(:func:`core.device.compute_dtype` decides); any other fine-tune is run in float32.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core.checkpoint import CheckpointDir
from core.constants import DTYPES, FLOAT_DTYPES
from core.device import compute_dtype, pick_device
from core.errors import EvaluationUnavailable, InvalidCalibration
from core.params import Example
from core.taskvector import TensorPlan

#: Largest calibration file accepted, in bytes.
MAX_CALIBRATION_BYTES = 64 * 1024 * 1024
LM_TOPK = 32
#: What one more forward pass costs, in padded tokens' worth of compute (measured on MiniLM on
#: a CPU: ~10 ms of per-batch overhead against ~0.2 ms a token; ``bench/results/search-cost.md``)
BATCH_COST_TOKENS = 48


@dataclass(frozen=True)
class Score:
    """One evaluation: the scalar the search maximises and the metrics behind it."""

    fitness: float
    metrics: dict[str, float] = field(default_factory=dict)


def load_calibration(path: str | os.PathLike[str], *, need_labels: bool) -> list[Example]:
    """Read a calibration JSONL file: one ``{"text": ..., "label": ...}`` object per line.

    Raises:
        InvalidCalibration: unreadable, too large, a malformed line (its number is given), a
            missing label when labels are needed, or no examples.
    """
    p = Path(path)
    if not p.is_file():
        raise InvalidCalibration(f"calibration file {p} does not exist")
    if p.stat().st_size > MAX_CALIBRATION_BYTES:
        raise InvalidCalibration(f"calibration file {p} is over {MAX_CALIBRATION_BYTES} bytes")
    examples: list[Example] = []
    with open(p, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            raise InvalidCalibration(f"calibration file {p} is not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidCalibration(f"{p.name} line {i}: not a JSON object") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise InvalidCalibration(f'{p.name} line {i}: needs a string "text" field')
        label = obj.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int | str)):
            raise InvalidCalibration(f"{p.name} line {i}: label must be an integer or a string")
        if need_labels and label is None:
            raise InvalidCalibration(
                f'{p.name} line {i}: has no "label"; accuracy evaluation needs labels '
                "(or use `evaluation=fidelity`)"
            )
        examples.append(Example(obj["text"], label))
    if not examples:
        raise InvalidCalibration(f"calibration file {p} holds no examples")
    return examples


class Evaluator(Protocol):
    kind: str
    device: torch.device  # where candidates are applied (searches keep their tensors there)
    dtype: torch.dtype  # what the model computes in (core.device.compute_dtype)

    def apply(self, name: str, delta: torch.Tensor | None) -> None:
        """Set one tensor of the candidate: base + ``delta`` (flat float32; None = base)."""

    def apply_sparse(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Set one tensor of the candidate: base, plus ``values`` at flat ``index``."""

    @property
    def parts(self) -> tuple[str, ...]:
        """Calibration parts: ``search`` and, when one was split off, ``holdout``."""

    def run(self, part: str = "search") -> Score:
        """Score the candidate currently written into the model on one calibration part."""

    def part_size(self, part: str) -> int:
        """Number of examples in a calibration part."""

    def reference(self, part: str = "search") -> Score:
        """The fine-tune's own score on one calibration part (whatever candidate is applied)."""

    @property
    def objective(self) -> str:
        """What ``Score.fitness`` measures, in words (it is not on a 0–1 scale)."""

    @property
    def tensor_names(self) -> list[str]:
        """The fine-tune tensor names this evaluator writes (delta tensors only)."""


def _model_class(config: Any) -> tuple[str, Any]:
    import transformers

    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier", transformers.AutoModelForSequenceClassification
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm", transformers.AutoModelForCausalLM
    return "embedder", transformers.AutoModel


@dataclass
class _Part:
    batches: list[dict[str, torch.Tensor]]
    labels: torch.Tensor | None
    n: int
    reference: list[dict[str, torch.Tensor]]


class ModelEvaluator:
    """Builds the fine-tune's model once and scores candidates written into it in place.

    Args:
        kind: ``fidelity`` or ``accuracy``.
        ft_dir: the fine-tune directory (config.json, tokenizer, weights).
        base: the base checkpoint (values for the delta tensors).
        plans: the tensor plans; ``delta`` tensors are the ones candidates change.
        examples: calibration texts (with labels for ``accuracy``).
        holdout: more calibration texts, scored only to pick a search's winner.
        device: ``cuda``/``cpu``; default picks ``cuda`` when present.
        dtype: what the model computes in; default :func:`core.device.compute_dtype` of the
            device and the fine-tune's floating-point dtypes.
        max_length: tokens per example.
        batch_size: examples per forward pass at most (batches group similar lengths).
        given: how many calibration examples were given before a subsample (default: these).
    """

    def __init__(
        self,
        kind: str,
        ft_dir: str | os.PathLike[str],
        base: CheckpointDir,
        plans: Sequence[TensorPlan],
        examples: Sequence[Example],
        *,
        holdout: Sequence[Example] = (),
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = 64,
        batch_size: int = 64,
        given: int | None = None,
    ) -> None:
        if kind not in ("fidelity", "accuracy"):
            raise EvaluationUnavailable(f"a model evaluator cannot run {kind!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        transformers.logging.set_verbosity_error()
        self.kind = kind
        self.calibration_given = given if given is not None else len(examples) + len(holdout)
        self.device = pick_device(device)
        self.dtype = dtype or compute_dtype(
            self.device, {DTYPES[p.dtype][1] for p in plans if p.dtype in FLOAT_DTYPES}
        )
        ft_dir = Path(ft_dir)
        if not (ft_dir / "config.json").is_file():
            raise EvaluationUnavailable(
                "the fine-tune has no config.json, so no model can be built; use "
                "`evaluation=weights`"
            )
        try:
            config = transformers.AutoConfig.from_pretrained(ft_dir, local_files_only=True)
            self.task, cls = _model_class(config)
            model = cls.from_pretrained(ft_dir, local_files_only=True, dtype=self.dtype)
            tokenizer = transformers.AutoTokenizer.from_pretrained(ft_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise EvaluationUnavailable(
                f"cannot build the model from the fine-tune's files ({exc}); use "
                "`evaluation=weights`"
            ) from None
        if self.task == "embedder" and kind == "accuracy":
            raise EvaluationUnavailable(
                "accuracy needs a classifier or a causal LM; this model is an embedder "
                "(use `evaluation=fidelity`)"
            )
        self.model = model.to(self.device).eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self._params = self._map_params(plans)
        #: per tensor, the entries the last sparse candidate changed from the base (absent:
        #: unknown, the next sparse candidate copies the whole base)
        self._written: dict[str, torch.Tensor] = {}
        self._base: dict[str, torch.Tensor] = {}
        # unkept entries as rebuilt, in the dtype the model computes in
        self._base_stored: dict[str, torch.Tensor] = {}
        self._dtype: dict[str, torch.dtype] = {}
        for plan in plans:
            if plan.kind != "delta" or plan.base_name is None:
                continue
            raw = base.get(plan.base_name).reshape(-1)
            exact = raw.to(self.device, torch.float32)
            stored = raw.to(DTYPES[plan.dtype][1]).to(self.device, torch.float32)
            self._base[plan.name] = exact
            stored = exact if torch.equal(stored, exact) else stored
            dt = self._params[plan.name].dtype
            self._base_stored[plan.name] = stored if dt == torch.float32 else stored.to(dt)
            self._dtype[plan.name] = DTYPES[plan.dtype][1]
        self._parts: dict[str, _Part] = {}
        self._reference: dict[str, Score] = {}
        for part, exs in (("search", examples), ("holdout", holdout)):
            if not exs:
                continue
            batches = self._tokenise(tokenizer, [e.text for e in exs], max_length, batch_size)
            labels = self._labels(exs, config) if kind == "accuracy" else None
            self._parts[part] = _Part(
                batches, labels, len(exs), self._forward_all(batches, reference=True)
            )
            # the fine-tune's own score, taken now while the model holds its own weights (an
            # LM's reference keeps only its top-K, so it is scored by one more forward pass)
            self._reference[part] = (
                self.run(part)
                if self.task == "causal_lm"
                else self._score(self._parts[part], self._parts[part].reference)
            )
        if "search" not in self._parts:
            raise InvalidCalibration("no calibration examples to evaluate on")

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self._parts)

    def part_size(self, part: str) -> int:
        return self._parts[part].n

    def reference(self, part: str = "search") -> Score:
        return self._reference[part]

    @property
    def objective(self) -> str:
        return objective_label(self.kind, self.task)

    @torch.no_grad()
    def apply_sparse(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        base = self._base[name]
        flat = self._params[name].view(-1)
        # back to the base: only the entries the last sparse candidate wrote, when known (a
        # whole-tensor copy per candidate cost as much as a sixth of an evaluation)
        # (index_select / index_copy_: the same values as advanced indexing, at a fraction of
        # its cost on a CPU)
        before = self._written.pop(name, None)
        if before is None:
            flat.copy_(self._base_stored[name])
        elif before.numel():
            flat.index_copy_(0, before, self._base_stored[name].index_select(0, before))
        idx = index.to(self.device)
        self._written[name] = idx
        if idx.numel():
            new = base.index_select(0, idx) + values.to(self.device, torch.float32)
            if self._dtype[name] != torch.float32:
                new = new.to(self._dtype[name])  # what reconstruction will store
            flat.index_copy_(0, idx, new.to(flat.dtype))

    def run(self, part: str = "search") -> Score:
        p = self._parts[part]
        return self._score(p, self._forward_all(p.batches))

    def _score(self, p: _Part, outs: list[dict[str, torch.Tensor]]) -> Score:
        if self.task == "classifier":
            return self._score_classifier(p, outs)
        if self.task == "causal_lm":
            return self._score_lm(p, outs)
        cos = torch.cat(
            [
                torch.nn.functional.cosine_similarity(o["emb"], r["emb"], dim=-1)
                for o, r in zip(outs, p.reference, strict=True)
            ]
        )
        c = float(cos.mean())
        return Score(c, {"cosine": c, "fidelity": c})

    @property
    def tensor_names(self) -> list[str]:
        return list(self._base)

    def _map_params(self, plans: Sequence[TensorPlan]) -> dict[str, torch.Tensor]:
        state = dict(self.model.named_parameters())
        state.update(dict(self.model.named_buffers()))
        out: dict[str, torch.Tensor] = {}
        missing = []
        for plan in plans:
            if plan.kind != "delta":
                continue
            t = state.get(plan.name)
            if t is None or t.numel() != plan.numel:
                missing.append(plan.name)
            else:
                out[plan.name] = t
        if missing:
            raise EvaluationUnavailable(
                f"the model built from config.json has no parameter for {len(missing)} tensors "
                f"(e.g. {missing[0]!r}); use `evaluation=weights`"
            )
        return out

    def _labels(self, examples: Sequence[Example], config: Any) -> torch.Tensor:
        label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
        num = int(getattr(config, "num_labels", 0) or 0)
        ids = []
        for i, e in enumerate(examples):
            if isinstance(e.label, str):
                if e.label not in label2id:
                    raise InvalidCalibration(f"example {i + 1}: unknown label {e.label!r}")
                ids.append(label2id[e.label])
            elif isinstance(e.label, int) and (self.task != "classifier" or 0 <= e.label < num):
                ids.append(e.label)
            else:
                raise InvalidCalibration(f"example {i + 1}: label {e.label!r} is out of range")
        return torch.tensor(ids, dtype=torch.long)

    def _tokenise(
        self, tokenizer: Any, texts: list[str], max_length: int, batch_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """Tokenise once, into batches of similar lengths (:func:`length_batches`): padding is
        computed by every candidate's forward pass. Keeps original order ids."""
        lengths = [
            len(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts
        ]
        batches = []
        for idx in length_batches(lengths, batch_size):
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            batch = {
                k: v.to(self.device)
                for k, v in enc.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            batch["_index"] = torch.tensor(idx)
            batches.append(batch)
        return batches

    @torch.inference_mode()
    def _forward_all(
        self, batches: list[dict[str, torch.Tensor]], *, reference: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        outs = []
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
            out = self.model(**inputs)
            if self.task == "classifier":
                outs.append({"logp": torch.log_softmax(out.logits.float(), -1)})
            elif self.task == "causal_lm":
                logp = torch.log_softmax(out.logits[:, :-1].float(), -1)  # (B, T-1, V)
                if reference:  # keep the top-K only: a full (n, T, V) copy would not fit
                    top, idx = logp.topk(min(LM_TOPK, logp.shape[-1]), -1)  # (B, T-1, K)
                    outs.append(
                        {
                            "top": top,
                            "idx": idx,
                            "mask": inputs["attention_mask"][:, 1:].bool(),
                            "target": inputs["input_ids"][:, 1:],
                        }
                    )
                else:
                    outs.append({"logp": logp, "argmax": logp.argmax(-1)})
            else:
                m = inputs["attention_mask"].unsqueeze(-1).float()
                pooled = (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)
                outs.append({"emb": pooled.float()})
        return outs

    @torch.no_grad()
    def apply(self, name: str, delta: torch.Tensor | None) -> None:
        base = self._base[name]
        value = base if delta is None else base + delta.to(self.device, torch.float32)
        if self._dtype[name] != torch.float32:
            value = value.to(self._dtype[name])  # what reconstruction will store
        self._params[name].copy_(value.reshape(self._params[name].shape))
        self._written.pop(name, None)  # the whole tensor was written

    def _score_classifier(self, p: _Part, outs: list[dict[str, torch.Tensor]]) -> Score:
        kl_sum = agree = correct = ll = 0.0
        for o, r, batch in zip(outs, p.reference, p.batches, strict=True):
            p_ref = r["logp"].exp()
            kl_sum += float((p_ref * (r["logp"] - o["logp"])).sum())
            pred = o["logp"].argmax(-1)
            agree += float((pred == r["logp"].argmax(-1)).sum())
            if p.labels is not None:
                y = p.labels[batch["_index"]].to(pred.device)
                correct += float((pred == y).sum())
                ll += float(o["logp"].gather(-1, y.unsqueeze(-1)).sum())
        n = p.n
        metrics = {"kl": kl_sum / n, "agreement": agree / n, "fidelity": agree / n}
        if p.labels is not None:
            metrics["accuracy"] = correct / n
            return Score(correct / n + 0.01 * ll / n, metrics)
        return Score(-kl_sum / n, metrics)

    def _score_lm(self, p: _Part, outs: list[dict[str, torch.Tensor]]) -> Score:
        kl_sum = agree = correct = count = 0.0
        for o, r in zip(outs, p.reference, strict=True):
            mask = r["mask"]
            # truncated KL over the reference's top-K tokens plus one bucket for the tail
            q_top = torch.gather(o["logp"], -1, r["idx"])  # (B, T-1, K)
            p_top = r["top"].exp()
            p_tail = (1 - p_top.sum(-1)).clamp(min=1e-12)
            q_tail = (1 - q_top.exp().sum(-1)).clamp(min=1e-12)
            kl = (p_top * (r["top"] - q_top)).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
            kl_sum += float(kl[mask].sum())
            agree += float(((o["argmax"] == r["idx"][..., 0]) & mask).sum())
            correct += float(((o["argmax"] == r["target"]) & mask).sum())
            count += float(mask.sum())
        count = max(count, 1.0)
        metrics = {
            "kl": kl_sum / count,
            "agreement": agree / count,
            "fidelity": agree / count,
            "accuracy": correct / count,
        }
        if self.kind == "accuracy":
            return Score(correct / count, metrics)
        return Score(-kl_sum / count, metrics)


def length_batches(
    lengths: Sequence[int], max_batch: int, batch_cost: int = BATCH_COST_TOKENS
) -> list[list[int]]:
    """Examples (by index) cut into batches that cost the fewest padded tokens.

    Sorted by length, the examples are split where a batch's padding (every example is run at
    its batch's longest length) would cost more than starting another batch, which costs
    ``batch_cost`` tokens' worth of time; at most ``max_batch`` examples a batch. An exact
    dynamic programme over the split points (n² for n examples: calibration is subsampled).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest cost of the first j examples
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(max(0, j - max_batch), j):
            c = best[i] + batch_cost + longest * (j - i)
            if c < best[j]:
                best[j], cut[j] = c, i
    spans = []
    j = n
    while j > 0:
        spans.append(order[cut[j] : j])
        j = cut[j]
    return spans[::-1]


def score_with(
    evaluator: Evaluator, delta_fn: Callable[[str], torch.Tensor | None], part: str = "search"
) -> Score:
    """Write every tensor's delta (``delta_fn(name)``) into the evaluator's model and score it."""
    for name in evaluator.tensor_names:
        evaluator.apply(name, delta_fn(name))
    return evaluator.run(part)


def objective_label(kind: str, task: str | None = None) -> str:
    """What a search's fitness (``fitness_before`` / ``fitness_after``) measures, in words.

    It is the quantity the search maximises, not a 0–1 quality: −KL is ≤ 0 (0 = the
    fine-tune's own outputs). The 0–1 figure to read is ``fidelity``.
    """
    if kind == "accuracy":
        return "accuracy + 0.01 × mean log-likelihood of the labels (higher is better)"
    if kind == "fidelity":
        if task == "embedder":
            return "mean cosine similarity to the fine-tune's embeddings (1 = identical)"
        return "−KL divergence from the fine-tune's outputs, in nats (0 = identical; ≤ 0)"
    return "none (weights evaluation: no model was run)"


def combined(evaluator: Evaluator, parts: Sequence[str], *, reference: bool = False) -> Score:
    """One score over several calibration parts: each metric (and the fitness) averaged over
    the parts weighted by their number of examples. ``reference``: the fine-tune's own."""
    scores = [(evaluator.reference(p) if reference else evaluator.run(p)) for p in parts]
    sizes = [evaluator.part_size(p) for p in parts]
    if len(scores) == 1:
        return scores[0]
    total = sum(sizes)
    keys = set.intersection(*(set(s.metrics) for s in scores))
    return Score(
        sum(s.fitness * n for s, n in zip(scores, sizes, strict=True)) / total,
        {
            k: sum(s.metrics[k] * n for s, n in zip(scores, sizes, strict=True)) / total
            for k in sorted(keys)
        },
    )


def part_label(evaluator: Evaluator, parts: Sequence[str]) -> str:
    """``all`` when ``parts`` are every calibration example, else the one part's name."""
    return "all" if set(parts) == set(evaluator.parts) else "+".join(parts)


def relative_fidelity(kind: str, score: Score, reference: Score) -> float:
    """A checkpoint's quality relative to the original fine-tune (1.0 = as good).

    ``accuracy``: accuracy / the fine-tune's accuracy; ``fidelity``: top-1 agreement with the
    fine-tune (or cosine similarity for embedders).
    """
    if kind == "accuracy":
        ref = reference.metrics.get("accuracy", 0.0)
        return score.metrics.get("accuracy", 0.0) / ref if ref > 0 else 0.0
    return score.metrics.get("fidelity", math.nan)

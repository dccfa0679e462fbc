"""What every compression method shares: its interface, its context, and small helpers."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from core.errors import Cancelled, InvalidArgument
from core.evaluate import Evaluator, Score
from core.taskvector import TensorPlan
from core.tensor_codec import Hybrid, LowRank, Selection, ValueSpec
from core.workspace import Workspace

Progress = Callable[[dict[str, Any]], None]
#: A candidate's delta for one tensor: dense, the base (None), or sparse (index, values).
Candidate = torch.Tensor | None | tuple[torch.Tensor, torch.Tensor]


@dataclass
class FitContext:
    """What a method may use while fitting.

    Attributes:
        keep: fraction r of τ's entries to keep (ignored by lossless).
        value_bits: bits per stored value: 32, 16, or 8/4/3/2/1 (quantised).
        seed: seed of every random choice (CMA-ES, seeded masks).
        evaluator: the fitness, or None for the data-free ``weights`` evaluation.
        progress: called with {"phase", "generation", "generations", "best_fitness", ...};
            it may raise :class:`core.errors.Cancelled` to stop.
    """

    keep: float
    value_bits: int = 16
    seed: int = 0
    evaluator: Evaluator | None = None
    progress: Progress | None = None
    evaluations: int = 0

    @property
    def device(self) -> torch.device:
        """Where candidate tensors live: the evaluator's device (``cuda`` when present)."""
        return self.evaluator.device if self.evaluator is not None else torch.device("cpu")

    def on_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t.to(self.device) for n, t in tensors.items()}

    def report(self, **info: Any) -> None:
        if self.progress is not None:
            self.progress(info)

    def score(self, delta_fn: Callable[[str], Candidate], part: str = "search") -> Score:
        """Evaluate one candidate (counts evaluations).

        ``delta_fn(name)`` gives each tensor's delta: dense (flat float32), None (the base),
        or sparse as ``(index, values)``.
        """
        assert self.evaluator is not None
        for name in self.evaluator.tensor_names:
            d = delta_fn(name)
            if isinstance(d, tuple):
                self.evaluator.apply_sparse(name, d[0], d[1])
            else:
                self.evaluator.apply(name, d)
        self.evaluations += 1
        return self.evaluator.run(part)


@dataclass
class Fitted(ABC):
    """A fitted method: turns each tensor's τ into the entries to store."""

    params: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fitness_before: Score | None = None
    fitness_after: Score | None = None

    #: Whether :meth:`select_slices` works (τ need not be whole to select from it).
    streams: ClassVar[bool] = False

    @abstractmethod
    def select(
        self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec
    ) -> Selection | LowRank | Hybrid:
        """The kept positions and values of one tensor, its factors (``lowrank``), or both
        (``hybrid``); called in file order, once each."""

    def select_slices(
        self, plan: TensorPlan, slices: Iterable[tuple[int, torch.Tensor]], spec: ValueSpec
    ) -> Selection | None:
        """What :meth:`select` returns, from τ's ``(offset, slice)`` pairs in order (for
        methods that set :attr:`streams`); None where τ is all zero (the tensor is ``same``
        and nothing was selected)."""
        raise NotImplementedError(f"{type(self).__name__} selects from whole task vectors")


class Method(ABC):
    """A compression method: a name, a paper, parameters, and :meth:`fit`."""

    name: ClassVar[str]
    paper: ClassVar[str]
    lossless: ClassVar[bool] = False
    searches: ClassVar[bool] = False

    @abstractmethod
    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted | None:
        """Fit on the workspace; None for lossless (every tensor stored exactly)."""


def check_keep(keep: float) -> float:
    if not (isinstance(keep, int | float) and 0 < keep <= 1 and math.isfinite(keep)):
        raise InvalidArgument(f"`keep` must be in (0, 1] (got {keep!r}); e.g. `keep=0.01` keeps 1%")
    return float(keep)


def keep_count(keep: float, total: int) -> int:
    """⌈r·D⌉, the number of entries a top-r mask keeps."""
    return min(total, math.ceil(keep * total - 1e-9))


def from_mask(
    tau: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor | float = 1.0
) -> Selection:
    """A selection of the masked entries of τ (optionally scaled per entry)."""
    idx = torch.nonzero(mask).reshape(-1)  # (nnz,)
    values = tau[idx] * (scale[idx] if isinstance(scale, torch.Tensor) else scale)
    return Selection(idx.cpu().numpy().astype(np.int64), values.to(torch.float32).cpu())


def check_cancel(exc: BaseException) -> None:
    if isinstance(exc, Cancelled):
        raise exc

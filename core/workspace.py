"""The (base, fine-tune) pair being compressed, with tensor-at-a-time task vectors."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from core.checkpoint import CheckpointDir
from core.errors import InvalidCheckpoint
from core.taskvector import (
    TensorPlan,
    all_finite,
    plan_tensors,
    task_vector,
    task_vector_slices,
)
from core.topk import SLICE


def _not_finite(plan: TensorPlan) -> InvalidCheckpoint:
    return InvalidCheckpoint(
        f"tensor {plan.name!r} has NaN or infinite values (in the fine-tune or the base); "
        "lossy methods cannot compress it — fix the checkpoint or use `method=lossless`"
    )


class Workspace:
    """Opens both directories, plans every tensor, and hands out task vectors.

    Task vectors are recomputed on each pass (bounded memory) unless :meth:`load_taus` is
    called, which keeps them all in memory for searches that evaluate a model anyway.
    """

    def __init__(self, base_dir: str | os.PathLike[str], ft_dir: str | os.PathLike[str]) -> None:
        self.base = CheckpointDir.open(base_dir)
        self.ft = CheckpointDir.open(ft_dir)
        self.plans: list[TensorPlan] = plan_tensors(self.ft, self.base)
        self.delta_plans = [p for p in self.plans if p.kind == "delta"]
        self._taus: dict[str, torch.Tensor] | None = None

    @property
    def num_params(self) -> int:
        return self.ft.num_params

    @property
    def delta_numel(self) -> int:
        return sum(p.numel for p in self.delta_plans)

    def tau(self, plan: TensorPlan) -> torch.Tensor:
        """τ of one delta tensor, float32, flat. Non-finite values are refused. # (numel,)"""
        held = self._held(plan)
        if held is not None:
            return held
        t = task_vector(self.ft, self.base, plan)
        if not all_finite(t):
            raise _not_finite(plan)
        return t

    def tau_slices(self, plan: TensorPlan) -> Iterator[tuple[int, torch.Tensor]]:
        """τ of one delta tensor as ``(offset, slice)`` pairs in order, never whole unless
        :meth:`load_taus` holds it (then views of it). Non-finite values are refused."""
        held = self._held(plan)
        if held is not None:
            for i in range(0, held.numel(), SLICE):
                yield i, held[i : i + SLICE]
            return
        for i, part in task_vector_slices(self.ft, self.base, plan):
            if not all_finite(part):
                raise _not_finite(plan)
            yield i, part

    def iter_taus(self) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
        for plan in self.delta_plans:
            yield plan, self.tau(plan)

    def iter_abs_taus(self) -> Iterator[torch.Tensor]:
        """|τ| of every delta tensor in plan order, as slices (a τ computed for the purpose
        is never whole; a held one is made absolute a slice at a time too)."""
        for plan in self.delta_plans:
            held = self._held(plan) is not None
            for _, part in self.tau_slices(plan):
                yield part.abs() if held else part.abs_()

    def _held(self, plan: TensorPlan) -> torch.Tensor | None:
        """``plan``'s τ where :meth:`load_taus` holds it (callers must not change it)."""
        return None if self._taus is None else self._taus.get(plan.name)

    def load_taus(self) -> dict[str, torch.Tensor]:
        """All task vectors in memory (float32, CPU), computed once."""
        if self._taus is None:
            taus = {}
            for plan in self.delta_plans:
                taus[plan.name] = self.tau(plan)
            self._taus = taus
        return self._taus

    def close(self) -> None:
        self.base.close()
        self.ft.close()
        self._taus = None

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

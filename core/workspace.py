"""The (base, fine-tune) pair being compressed, with tensor-at-a-time task vectors."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from core.checkpoint import CheckpointDir
from core.errors import InvalidCheckpoint
from core.taskvector import TensorPlan, all_finite, plan_tensors, task_vector


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
            raise InvalidCheckpoint(
                f"tensor {plan.name!r} has NaN or infinite values (in the fine-tune or the base); "
                "lossy methods cannot compress it — fix the checkpoint or use --method lossless"
            )
        return t

    def iter_taus(self) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
        for plan in self.delta_plans:
            yield plan, self.tau(plan)

    def iter_abs_taus(self) -> Iterator[torch.Tensor]:
        """|τ| of each delta tensor in plan order; a τ computed for the purpose is made
        absolute in place (no second τ-sized tensor), a loaded one is left as it is."""
        for plan in self.delta_plans:
            held = self._held(plan)
            yield held.abs() if held is not None else self.tau(plan).abs_()

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

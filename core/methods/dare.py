"""``dare``: drop each entry with probability 1 − r, rescale survivors by 1/r.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099.

The mask comes from the counter-based generator of :mod:`core.rng` keyed by (seed, tensor
name), so its positions cost no storage: the decoder draws them again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core import rng
from core.methods.base import FitContext, Fitted, Method, check_keep
from core.params import DEFAULT_KEEP
from core.taskvector import TensorPlan
from core.tensor_codec import Seeded, Selection, ValueSpec
from core.workspace import Workspace


@dataclass
class DareFitted(Fitted):
    keep: float = DEFAULT_KEEP
    seed: int = 0
    rescale: bool = True

    def select(self, plan: TensorPlan, tau: torch.Tensor, spec: ValueSpec) -> Selection:
        key = rng.tensor_key(self.seed, plan.name)
        limit = rng.rate_limit(self.keep)
        positions, _ = rng.seeded_positions(key, tau.numel(), limit, limit)
        idx = torch.from_numpy(positions)
        values = tau.cpu()[idx] * (1.0 / self.keep if self.rescale else 1.0)
        return Selection(
            positions.astype(np.int64), values.to(torch.float32), Seeded(key, limit, limit)
        )


class Dare(Method):
    name = "dare"
    paper = "https://arxiv.org/abs/2311.03099"

    def __init__(self, keep: float = DEFAULT_KEEP, rescale: bool = True) -> None:
        self.keep = check_keep(keep)
        self.rescale = rescale

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted:
        return DareFitted(
            params={"keep": self.keep, "seed": ctx.seed, "rescale": self.rescale},
            keep=self.keep,
            seed=ctx.seed,
            rescale=self.rescale,
        )

"""``lossless``: exact. Each tensor is XORed with its base twin, split into byte planes and
zstd-compressed; reconstruction is bit-identical (sha256 per file).

Byte-plane grouping of float weights follows ZipNN (Hershcovitch et al., "ZipNN: Lossless
Compression for AI Models", 2024, https://arxiv.org/abs/2411.05239).
"""

from __future__ import annotations

from core.methods.base import FitContext, Fitted, Method
from core.workspace import Workspace


class Lossless(Method):
    name = "lossless"
    paper = "https://arxiv.org/abs/2411.05239"
    lossless = True

    def fit(self, ws: Workspace, ctx: FitContext) -> Fitted | None:
        return None

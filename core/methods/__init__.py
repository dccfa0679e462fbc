"""The method registry: every compression method behind one interface, selected by name."""

from __future__ import annotations

from typing import Any

from core.errors import InvalidArgument
from core.methods.base import FitContext, Fitted, Method
from core.methods.dare import Dare
from core.methods.hybrid import HybridMethod, HybridSeeded
from core.methods.lossless import Lossless
from core.methods.lowrank import LowRankMethod
from core.methods.magnitude import Magnitude, MagnitudeScaled
from core.methods.nps import Nps
from core.methods.nps_seeded import NpsSeeded
from core.params import Method as MethodName

REGISTRY: dict[str, type[Method]] = {
    MethodName.NPS: Nps,
    MethodName.NPS_SEEDED: NpsSeeded,
    MethodName.MAGNITUDE: Magnitude,
    MethodName.MAGNITUDE_SCALED: MagnitudeScaled,
    MethodName.DARE: Dare,
    MethodName.LOSSLESS: Lossless,
    MethodName.LOWRANK: LowRankMethod,
    MethodName.HYBRID: HybridMethod,
    MethodName.HYBRID_SEEDED: HybridSeeded,
}


def make_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method; options are its constructor's keyword arguments."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise InvalidArgument(
            f"unknown method {name!r}; choose one of {', '.join(REGISTRY)} or auto"
        )
    if cls is Lossless:
        options = {}
    try:
        return cls(**options)
    except TypeError as exc:
        raise InvalidArgument(f"bad options for method {name!r}: {exc}") from None


__all__ = ["REGISTRY", "FitContext", "Fitted", "Method", "MethodName", "make_method"]

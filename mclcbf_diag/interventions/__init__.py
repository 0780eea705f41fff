"""Interventions on one seam (:mod:`.base`): MC-LCBF, attention knockouts, and yours.

:data:`REGISTRY` maps each ``--intervention`` name to its class; :func:`resolve` builds one
from a name, a preset and ``--set`` overrides. A user-defined intervention is a subclass of
:class:`Intervention` passed directly to the library calls (``trace_sample``, ``explain_sample``,
``answer_pair``), or registered with :func:`register` for the command line.
"""

from __future__ import annotations

from ..errors import UserError
from .adhh import AdHH
from .base import Intervention, Row, Site
from .block import AttentionBlock, BlockKnobs
from .knockout import AttentionKnockout, KnockoutKnobs
from .mclcbf import MCLCBF
from .pai import PAI
from .vaf import VAF
from .var import VAR
from .vista import VISTA

REGISTRY: dict[str, type[Intervention]] = {"mclcbf": MCLCBF, "knockout": AttentionKnockout, "block": AttentionBlock, "pai": PAI, "vaf": VAF,
                                           "vista": VISTA, "adhh": AdHH, "var": VAR}


def register(cls: type[Intervention]) -> type[Intervention]:
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def as_intervention(intervention) -> Intervention | None:
    """An :class:`Intervention`; an MC-LCBF ``BarrierConfig`` is wrapped (None stays None)."""
    from .mclcbf.config import BarrierConfig

    if intervention is None or isinstance(intervention, Intervention):
        return intervention
    if isinstance(intervention, BarrierConfig):
        return MCLCBF(intervention)
    raise TypeError(f"expected an Intervention or a BarrierConfig, not {type(intervention).__name__}")


def resolve(name: str = "mclcbf", preset: str | None = None, overrides=()) -> Intervention:
    """The intervention ``name`` at ``preset`` (default: its first) with ``knob=value`` overrides."""
    if name not in REGISTRY:
        raise UserError(f"unknown intervention {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name].from_preset(preset, overrides)


__all__ = ["Intervention", "Row", "Site", "MCLCBF", "AttentionKnockout", "KnockoutKnobs", "AttentionBlock", "BlockKnobs", "REGISTRY",
           "register", "resolve", "as_intervention"]

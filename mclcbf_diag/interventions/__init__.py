"""Interventions on one seam (:mod:`.base`): MC-LCBF, attention knockouts, and yours.

:data:`REGISTRY` maps each ``--intervention`` name to its class; :func:`resolve` builds one
from a name, a preset and ``--set`` overrides; :func:`specs` describes every registered one
(summary, paper, knobs, presets) without importing torch, for ``mclcbf-diag interventions``. A user-defined
intervention is a subclass of
:class:`Intervention` passed directly to the library calls (``trace_sample``, ``explain_sample``,
``answer_pair``), or registered with :func:`register` for the command line.
"""

from __future__ import annotations

import importlib

from ..errors import UserError

# name → submodule; loaded on first use, so that knobs and presets load without torch
_NAMES = {"Intervention": ".base", "Row": ".base", "Site": ".base", "AttentionBlock": ".block",
          "BlockKnobs": ".catalog", "AttentionKnockout": ".knockout", "KnockoutKnobs": ".catalog", "MCLCBF": ".mclcbf",
          "PAI": ".pai", "VAF": ".vaf", "VISTA": ".vista", "AdHH": ".adhh", "VAR": ".var", "VCD": ".vcd",
          "DoLa": ".dola", "CausalMM": ".causalmm", "OPERA": ".opera", "HALC": ".halc"}
BUILTIN = {"mclcbf": "MCLCBF", "knockout": "AttentionKnockout", "block": "AttentionBlock", "pai": "PAI", "vaf": "VAF",
           "vista": "VISTA", "adhh": "AdHH", "var": "VAR", "vcd": "VCD", "dola": "DoLa",
           "causalmm": "CausalMM", "opera": "OPERA", "halc": "HALC"}
_REGISTRY: dict = {}


def _load(name: str):
    value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def registry() -> dict:
    """``--intervention`` name → class: the built-in ones and any :func:`register` added."""
    for key, cls in BUILTIN.items():
        if key not in _REGISTRY:
            _REGISTRY[key] = _load(cls)
    return _REGISTRY


def names() -> list[str]:
    """Every ``--intervention`` name, built-in ones first, without loading any class."""
    return list(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def specs() -> dict:
    """``--intervention`` name → :class:`~.catalog.Spec`, for every registered intervention. A built-in's spec is
    read from :mod:`.catalog` (no torch); a registered class's from its attributes."""
    cards = importlib.import_module(".catalog", __name__)
    return {name: cards.spec_of(_REGISTRY[name]) if name in _REGISTRY else cards.SPECS[name] for name in names()}


def __getattr__(name: str):
    if name == "REGISTRY":
        return registry()
    if name in _NAMES:
        return _load(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(cls):
    """Make ``cls`` available under ``cls.name`` (usable as a class decorator)."""
    registry()[cls.name] = cls
    return cls


def as_intervention(intervention):
    """An :class:`Intervention`; an MC-LCBF ``BarrierConfig`` is wrapped (None stays None)."""
    from .base import Intervention
    from .mclcbf import MCLCBF
    from .mclcbf.config import BarrierConfig

    if intervention is None or isinstance(intervention, Intervention):
        return intervention
    if isinstance(intervention, BarrierConfig):
        return MCLCBF(intervention)
    raise TypeError(f"expected an Intervention or a BarrierConfig, not {type(intervention).__name__}")


def resolve(name: str = "mclcbf", preset: str | None = None, overrides=()):
    """The intervention ``name`` at ``preset`` with ``knob=value`` overrides.

    Args:
        name: a registered intervention (``mclcbf``, ``pai``, ``vcd`` …).
        preset: one of its presets (None: its first).
        overrides: ``knob=value`` strings applied over the preset.

    Returns:
        The configured :class:`~mclcbf_diag.interventions.base.Intervention`.

    Raises:
        UserError: an unknown intervention or preset, or a bad ``knob=value`` override.
    """
    reg = registry()
    if name not in reg:
        raise UserError(f"unknown intervention {name!r}; choose one of {', '.join(reg)}")
    return reg[name].from_preset(preset, overrides)


__all__ = ["Intervention", "Row", "Site", "MCLCBF", "AttentionKnockout", "KnockoutKnobs", "AttentionBlock",
           "BlockKnobs", "PAI", "VAF", "VISTA", "AdHH", "VAR", "VCD", "DoLa", "CausalMM", "OPERA", "HALC",
           "REGISTRY", "register", "resolve",
           "as_intervention",
           "registry", "names", "specs"]

"""MC-LCBF, the researcher's control-barrier-function intervention, as one package.

:mod:`.config` holds its knobs and presets (importable without torch, so the command line
checks ``--set`` in a fraction of a second), :mod:`.math` the barrier h(x) and the step as
pure functions, :mod:`.intervention` the :class:`MCLCBF` intervention on the seam, and
:mod:`.rules` its diagnosis rules. The intervention's names are loaded on first use.
"""

from __future__ import annotations

import importlib

from .config import ALIASES, PRESETS, BarrierConfig

_FROM_INTERVENTION = ("MCLCBF", "FIXES", "METRICS")


def __getattr__(name: str):
    if name in _FROM_INTERVENTION:
        value = getattr(importlib.import_module(".intervention", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MCLCBF", "BarrierConfig", "PRESETS", "ALIASES", "FIXES", "METRICS"]

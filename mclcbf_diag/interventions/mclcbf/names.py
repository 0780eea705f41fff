"""MC-LCBF's names in one flat namespace (``from mclcbf_diag import barrier as B`` loads this module).

The intervention itself lives in :mod:`mclcbf_diag.interventions.mclcbf` (math, knobs and
presets, records); the attention edits in :mod:`mclcbf_diag.interventions.attention_edits`;
the layer projections in :mod:`mclcbf_diag.models.projection`. This module only gathers
their names for notebooks and scripts.
"""

from __future__ import annotations

from ... import knobs as _knobs
from ...errors import UserError
from ...models.projection import LayerWeights, project_keys, project_queries
from ..attention_edits import (
    logit_bias_for_target,
    rescale_image_probs,
    shift_image_logits,
)
from .config import (
    ALIASES,
    PRESETS,
    BarrierConfig,
    depth_fraction,
    image_span_mask,
    phase_params,
    resolve_grad_dtype,
    steered_layers,
    target_positions,
)
from .intervention import FIXES, MCLCBF
from .math import StepResult, barrier_gradient, barrier_value, step


def get_preset(name: str) -> BarrierConfig:
    """The named MC-LCBF preset, or a UserError that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def apply_overrides(config: BarrierConfig, overrides) -> BarrierConfig:
    """``knob=value`` strings applied to an MC-LCBF config (``tau=``/``alpha=`` set both phases)."""
    return _knobs.apply_overrides(config, list(overrides), ALIASES)


__all__ = ["LayerWeights", "project_keys", "project_queries", "barrier_value", "barrier_gradient", "BarrierConfig",
           "PRESETS", "FIXES", "MCLCBF", "get_preset", "apply_overrides", "steered_layers", "depth_fraction",
           "image_span_mask", "target_positions", "phase_params", "resolve_grad_dtype", "StepResult", "step",
           "logit_bias_for_target", "rescale_image_probs", "shift_image_logits"]

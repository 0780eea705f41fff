"""MC-LCBF's knobs, its presets, and which layers, image keys and tokens it targets.

``seed-exp6`` (alias ``original``) is the researcher's experiment 6 knob for knob;
``fixed`` (alias ``corrected``) corrects every suspected cause at once. Every suspected
cause is one knob, so a counterfactual fix is one knob changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ...errors import UserError
from ...knobs import check_choices, knob
from ..layers import depth_fraction  # noqa: F401  (shared; also importable from here)

if TYPE_CHECKING:  # torch is imported where it is used, so the knobs load without it
    import torch

GradDtype = Literal["model", "float32"]
Clamp = Literal["scale", "step_norm", "none"]
Span = Literal["fixed", "detected"]
Site = Literal["resid_pre", "ln1_out", "attn_logits"]
Tokens = Literal["last", "after_image"]


@dataclass(frozen=True)
class BarrierConfig:
    """Knobs of the intervention. The defaults are the seed's experiment 6; each knob's
    one-line description is its ``help`` (``mclcbf-diag interventions`` lists them).

    When Σg² is far below ``guard``, the guard, not the gradient, sets the scale:
    ``(τ − h)/guard``; ``guard=0`` divides by Σg² alone (a zero gradient then gives no step).

    Edge values: τ = 0 never fires (h ≥ 0); τ = 1 always fires (the attention-logit site
    then aims at a mass of 1 − 1e-6, the most a finite logit shift reaches); α = 0 fires
    with a zero step (nothing changes). A step that overflows is not applied and is
    recorded (``step_nonfinite``); a residual that is already NaN/inf is recorded
    (``residual_nonfinite``) and not steered: the diagnosis reports the non-finite cause.
    """

    layers: tuple[int, ...] | None = knob(None, "steered decoder layers; none: 10–27 of 32, the same fraction of "
                                                "other depths")
    tau_prefill: float = knob(0.2, "threshold τ on the decision token's image mass h (prefill; tau= sets both "
                                   "phases)")
    alpha_prefill: float = knob(1.0, "multiplier α on the step θ* (prefill; alpha= sets both phases)")
    tau_decode: float = knob(0.2, "τ at generated tokens")
    alpha_decode: float = knob(0.5, "α at generated tokens")
    grad_dtype: GradDtype = knob("model", "compute h and ∇h in the model's dtype (the seed) or in float32")
    guard: float = knob(1e-6, "added to Σg² before dividing: scale = (τ − h)/(Σg² + guard)")
    clamp: Clamp = knob("scale", "scale: cap the scale at clamp_value; step_norm: cap ‖α·θ*‖ at "
                                 "clamp_value·‖x‖; none: the raw scale")
    clamp_value: float = knob(0.5, "the cap clamp applies")
    span: Span = knob("fixed", "image keys: fixed_span (the seed's literal span) or the image tokens detected in "
                               "input_ids")
    fixed_span: tuple[int, int] = knob((1, 577), "[a, b) for span=fixed")
    site: Site = knob("resid_pre", "where the step acts: the residual before the layer, the input_layernorm "
                                   "output, or the attention logits on image keys")
    tokens: Tokens = knob("last", "steer the decision token (last) or every text token after the image")

    def __post_init__(self):
        check_choices(self)
        for name in ("tau_prefill", "tau_decode"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise UserError(f"{name}={v} is not a probability mass; use a value in [0, 1]")
        for name in ("alpha_prefill", "alpha_decode", "clamp_value", "guard"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UserError(f"{name}={v} must be a finite number >= 0")
        a, b = self.fixed_span
        if not (0 <= a < b):
            raise UserError(f"fixed_span=({a}, {b}) must satisfy 0 <= start < stop")
        if self.layers is not None and any(layer < 0 for layer in self.layers):
            raise UserError(f"layers={self.layers} contains a negative index")

    def to_dict(self) -> dict:
        from ...knobs import to_dict

        return to_dict(self)


_FIXED = BarrierConfig(
    # float32: in fp16 ‖g‖² underflows to 0 and the scale is decided by the 1e-6 guard and the
    # cap, not by the barrier.
    grad_dtype="float32",
    # Cap the step relative to the vector it perturbs: ‖α·θ*‖ ≤ 0.5·‖x‖. The seed's cap on the
    # scale (a number multiplying g, whose size ∝ 1/r) binds exactly when the step is needed.
    clamp="step_norm",
    clamp_value=0.5,
    # The image tokens, found in input_ids; [1, 577) is shifted by 4 in llava-hf.
    span="detected",
    # Edit the attention logits on image keys directly: the mass reaches τ exactly, no
    # linearisation, no RMSNorm in the way, and no step the fp16 residual rounds away.
    site="attn_logits",
    # The decision token, as in the seed, so the two presets stay comparable.
    tokens="last",
)

PRESETS: dict[str, BarrierConfig] = {
    "seed-exp6": BarrierConfig(),  # the researcher's experiment 6 (the original MC-LCBF run)
    "original": BarrierConfig(),  # the same, under a name that says what it is
    "fixed": _FIXED,  # every suspected cause corrected
    "corrected": _FIXED,  # the same, under a name that says what it is
}

ALIASES = {"tau": ("tau_prefill", "tau_decode"), "alpha": ("alpha_prefill", "alpha_decode")}


def steered_layers(config: BarrierConfig, n_layers: int) -> tuple[int, ...]:
    """Layers to steer: ``config.layers`` if set (validated), else the seed's fraction.

    The seed steers 10..27 of 32 layers; for depth L the same fraction is
    ``range(round(10L/32), round(28L/32))`` with halves rounded up (L=4 → 1..3).

    Raises:
        UserError: a configured layer is not in ``0 … n_layers − 1``.
    """
    if config.layers is not None:
        bad = [layer for layer in config.layers if not 0 <= layer < n_layers]
        if bad:
            raise UserError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
        return tuple(sorted(set(config.layers)))
    return depth_fraction(10, 28, n_layers)


def image_span_mask(config: BarrierConfig, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Bool [seq] marking the image keys: the fixed span clipped to seq, or detected tokens.

    Args:
        config: its ``span`` (``fixed``: ``fixed_span``'s half-open range; else the detected image tokens).
        input_ids: the prompt's ids, [seq] or [1, seq].
        image_token_id: the image placeholder's id.

    Raises:
        UserError: the span is detected and the prompt holds no image token.
    """
    import torch  # here, so that the knobs above load without torch (fast --set checks)

    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [seq] or [1, seq], got shape {tuple(ids.shape)}")
    seq = ids.shape[0]
    if config.span == "fixed":
        a, b = config.fixed_span
        mask = torch.zeros(seq, dtype=torch.bool, device=ids.device)
        mask[min(a, seq): min(b, seq)] = True
        return mask
    mask = ids == image_token_id
    if not bool(mask.any()):
        raise UserError(f"no image token id {image_token_id} in the prompt ({seq} tokens); "
                        "check the prompt contains the image placeholder, or use span=fixed")
    return mask


def target_positions(config: BarrierConfig, image_mask: torch.Tensor) -> torch.Tensor:
    """Prefill target positions (long): the last token, or every token after the image."""
    import torch

    seq = image_mask.shape[-1]
    if config.tokens == "last" or not bool(image_mask.any()):
        return torch.tensor([seq - 1], dtype=torch.long)
    last_img = int(torch.nonzero(image_mask).max())
    pos = torch.arange(last_img + 1, seq, dtype=torch.long)
    return pos if pos.numel() else torch.tensor([seq - 1], dtype=torch.long)


def phase_params(config: BarrierConfig, phase: str) -> tuple[float, float]:
    """``(tau, alpha)`` for a phase."""
    if phase == "prefill":
        return config.tau_prefill, config.alpha_prefill
    if phase == "decode":
        return config.tau_decode, config.alpha_decode
    raise ValueError(f"phase must be 'prefill' or 'decode', not {phase!r}")


def resolve_grad_dtype(config: BarrierConfig, model_dtype: torch.dtype) -> torch.dtype:
    import torch

    return model_dtype if config.grad_dtype == "model" else torch.float32

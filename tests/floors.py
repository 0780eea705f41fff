"""Tolerances for tests that compare two routes to one quantity, from the noise floors.

Two computations of the same figure by different routes (batched and alone, a cached prefix and
the full forward, vmapped and looped, sharded and single, offloaded and in place) differ by
their rounding, and how much depends on the CPU's summation order (CONTRIBUTING.md,
"Tolerances"). Every function here returns ``eps(float32) · scale · √n`` through
:mod:`mclcbf_diag.measurements.noise`, with the scale and the count of roundings said in its docstring, so a
test names the floor it uses instead of a bare constant.

A float32 forward of the whole model: every decoder layer of the vision tower and of the
language model adds ``noise.ROUNDINGS_PER_LAYER`` roundings that can differ between routes,
and the final norm one more (:func:`depth`). Where a route also *amplifies* a difference (an
unclamped MC-LCBF step, whose scale divides by ``τ − h``), the floor is not enough by itself:
propagate the measured differences of the amplifying figures to first order, as
``tests/test_engine_units.py`` does.
"""

from __future__ import annotations

import math

import torch

from mclcbf_diag.measurements import noise

F32 = torch.float32


def hf_model(model):
    """The Hugging Face model of a ``LoadedModel`` (or the model itself)."""
    return getattr(model, "model", model) if hasattr(model, "adapter") else model


def depth(model) -> int:
    """Decoder layers a float32 forward runs through: the language model's, plus the vision tower's."""
    cfg = hf_model(model).config
    text = getattr(cfg, "text_config", cfg)
    vision = getattr(cfg, "vision_config", None)
    return int(text.num_hidden_layers) + int(getattr(vision, "num_hidden_layers", 0) or 0)


def _final_norm_and_unembed(model):
    m = hf_model(model)
    lm = m.model.language_model if hasattr(m.model, "language_model") else m.model
    return lm.norm.weight.detach().float(), m.get_output_embeddings().weight.detach().float()


def logit_scale(model, rows=None) -> float:
    """A bound on the size of the logits ``W_U · y`` (``rows``: ids whose logits are compared; all by default).

    The final-normed state ``y = γ ⊙ x / rms(x)`` has ``‖y‖ ≤ ‖γ‖_∞ · √d``, and a logit is at most
    ``‖w_row‖ · ‖y‖`` (Cauchy–Schwarz)."""
    gamma, w = _final_norm_and_unembed(model)
    if rows is not None:
        w = w[list(rows)]
    return float(w.norm(dim=-1).max()) * float(gamma.abs().max()) * math.sqrt(gamma.numel())


def logit_floor(model, rows=None) -> float:
    """Floor of a logit computed by two float32 routes: ``noise.propagation_floor`` at :func:`logit_scale`
    after :func:`depth` layers and the final norm (a logit's error is ‖w_row‖ times the state's)."""
    return noise.propagation_floor(F32, logit_scale(model, rows), depth(model), final_norm=True)


def margin_floor(model, yes_id: int, no_id: int) -> float:
    """Floor of the Yes − No margin: :func:`logit_floor` with the row ``w_Yes − w_No``."""
    gamma, w = _final_norm_and_unembed(model)
    scale = float((w[yes_id] - w[no_id]).norm()) * float(gamma.abs().max()) * math.sqrt(gamma.numel())
    return noise.propagation_floor(F32, scale, depth(model), final_norm=True)


def prob_floor(model) -> float:
    """Floor of a softmax probability (or a sum of some, such as p_yes): ``δp_k = p_k(δl_k − Σ p δl)`` is at
    most ``2 · max |δl|``, so twice :func:`logit_floor`."""
    return 2 * logit_floor(model)


def state_floor(reference: torch.Tensor, layers: int) -> float:
    """Floor of a residual (hidden state) after ``layers`` float32 decoder layers, per element: the floor of
    its norm (``noise.propagation_floor`` at the largest row norm), which bounds every element's error."""
    r = reference.detach().float()
    scale = float(r.reshape(-1, r.shape[-1]).norm(dim=-1).max()) if r.numel() else 0.0
    return noise.propagation_floor(F32, scale, max(int(layers), 1))


def mass_floor(*masses: float) -> float:
    """Floor of a float32 attention mass: ``noise.mass_floor`` (scale √m, 16 roundings)."""
    return noise.mass_floor(F32, *masses)


def mass_floors(masses: torch.Tensor) -> torch.Tensor:
    """:func:`mass_floor` elementwise, for tensors of masses (or probabilities)."""
    m = masses.detach().double().clamp(min=0.0)
    return noise.eps(F32) * m.sqrt() * math.sqrt(noise.MASS_ROUNDINGS)

"""Noise floors: below what size a difference is rounding, not an effect.

Every floating-point operation rounds its result to the dtype: a relative error of up to
``eps/2``, where ``eps = torch.finfo(dtype).eps`` is the gap between 1 and the next number
(2⁻²³ ≈ 1.2e-7 in float32, 2⁻¹⁰ ≈ 9.8e-4 in float16, 2⁻⁷ ≈ 7.8e-3 in bfloat16). A figure
that is the difference ``a − b`` of two quantities of magnitude ``s``, each the end of a
chain of ``n`` roundings that may differ between ``a`` and ``b``, cannot be told from 0 below

    floor = eps(dtype) · s · √n

(independent rounding errors of size up to ``eps·s`` add like a random walk; using ``eps``
rather than ``eps/2`` leaves a factor of two of margin). A floor is an estimate of the
rounding noise, not a bound: a figure under it is reported as "below noise" and no
diagnosis rule draws a conclusion from it. Which dtype, scale and count each figure gets:

* ``dh_predicted``, ``dh_recomputed`` (MC-LCBF): h and Δh are computed by the toolkit in
  float32 (:func:`measure_dtype`; float64 stays float64) whatever the model's dtype, so
  ``dtype`` = float32; ``dh_realised`` is the model's own attention mass (its forward, in its
  dtype) minus the float32 h, so ``dtype`` = the model's. For an attention mass
  ``m = Σ_{k∈I} p_k`` two errors add. A logit error δl moves it by
  ``δm = Σ_k p_k (1_I(k) − m) δl_k = Cov_p(1_I, δl) ≤ √(m(1 − m)) · sd_p(δl)``
  (Cauchy–Schwarz), small near 0 and near 1; but the probabilities are then rounded and
  summed, which adds an error of order ``eps · m`` (a float32 number near 0.99 cannot move by
  less than one step of 6e-8). In quadrature, ``m(1 − m) + m² = m``, so the scale is
  ``s = √m``: a mass near 0 is resolved finely, one near 1 only to ``eps`` (float32 masses
  between 0.98 and 1 erred, against float64, by up to 38× a floor on the logit-only scale).
  ``n`` = :data:`MASS_ROUNDINGS`; ``s`` takes the larger of h and h + Δh (:func:`mass_floor`).
* ``propagation`` at layer k: ``‖x_k^steered − x_k^base‖`` of two forwards in the model's
  dtype: ``s = ‖x_k^base‖``, ``n`` = :data:`ROUNDINGS_PER_LAYER` × the layers from the first
  one whose output differs up to k; after the final norm (layer −1) ``s`` is the norm of the
  final-normalised baseline state and the final norm adds one rounding
  (:func:`propagation_floor`).
* ``grad_norm`` against ``grad_norm_f32`` (the gradient in its dtype vs float32):
  ``s = ‖g‖_f32``, ``n`` = :data:`GRAD_ROUNDINGS`.

The counts are calibrated on the embedded model (4 layers, 20 questions, a zero step so that
every difference is pure rounding): the model's own mass differed from the float32 h by at
most 0.6·eps·√(m(1 − m)) in bfloat16 and 2.2·eps·√(m(1 − m)) in float32 (longer float32
accumulations), under √16 = 4; a tiny random model's bfloat16 propagation noise was
0.9·eps·‖x‖ three layers after the step, under √12 ≈ 3.5.

Hand-worked: a bfloat16 mass going from 0.5 has floor 2⁻⁷ · √0.5 · √16 ≈ 0.0221; in float32
2⁻²³ · √0.5 · 4 ≈ 3.4e-7; a float32 mass near 0.99, 2⁻²³ · √0.99 · 4 ≈ 4.7e-7 (eight steps
of 0.99); a bfloat16 residual of norm 64 one layer after the step has a
propagation floor 2⁻⁷ · 64 · √4 = 1.0, and after the final norm (norm 64) 2⁻⁷ · 64 · √5 ≈ 1.12.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the rules read floors without it
    import torch

# x → norm → q and k projections → RoPE → q·k → softmax → the probabilities' cast, each with
# its accumulations (two roundings per stage)
MASS_ROUNDINGS = 16
ROUNDINGS_PER_LAYER = 4  # decoder layer: the two residual additions, and the attention and MLP outputs added there
GRAD_ROUNDINGS = 16  # ∇h: the forward chain of h and its backward pass, eight stages each


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (the gap between 1 and the next representable number)."""
    import torch

    return float(torch.finfo(dtype).eps)


def measure_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the toolkit computes its figures in: float64 stays float64, everything else float32."""
    import torch

    return torch.float64 if model_dtype == torch.float64 else torch.float32


def floor(dtype: torch.dtype, scale: float, roundings: int = 1) -> float:
    """``eps(dtype) · |scale| · √roundings``: the size below which a difference is rounding noise.

    Args:
        dtype: the dtype the figures were computed in.
        scale: the size of the quantities compared (their magnitude), in their units.
        roundings: how many roundings the difference went through (at least 1 is counted).

    Returns:
        The floor, in the units of ``scale``.
    """
    return eps(dtype) * abs(float(scale)) * math.sqrt(max(int(roundings), 1))


def mass_floor(dtype: torch.dtype, *masses: float) -> float:
    """Floor of a difference of attention masses (h, h + Δh) computed in ``dtype``: scale √m (see above)."""
    spread = [math.sqrt(max(m, 0.0)) for m in map(float, masses) if math.isfinite(m)]
    return floor(dtype, max(spread), MASS_ROUNDINGS) if spread else math.nan


def propagation_floor(dtype: torch.dtype, base_norm: float, layers: int, final_norm: bool = False) -> float:
    """Floor of ``‖x^steered − x^base‖`` after ``layers`` decoder layers run in ``dtype`` (+1 for a final norm).

    Args:
        dtype: the dtype the layers ran in.
        base_norm: ``‖x^base‖``, the scale of the residual compared.
        layers: how many decoder layers ran since the step (at least 1 is counted), four roundings each.
        final_norm: whether the residual also went through the final norm (one rounding more).

    Returns:
        The floor, in the residual's units: :func:`floor` with ``4 · layers (+1)`` roundings.
    """
    return floor(dtype, base_norm, ROUNDINGS_PER_LAYER * max(int(layers), 1) + int(final_norm))


def grad_norm_floor(dtype: torch.dtype, norm_f32: float) -> float:
    """Floor of ``‖g‖_dtype − ‖g‖_f32`` for a gradient computed in ``dtype`` (``norm_f32``: ‖g‖ in float32)."""
    return floor(dtype, norm_f32, GRAD_ROUNDINGS)


def below(value: float | None, noise: float | None) -> bool:
    """True when ``|value|`` is under its floor (a missing or NaN floor: never below)."""
    if value is None or noise is None or not math.isfinite(noise) or not math.isfinite(value):
        return False
    return abs(value) < noise


def resolved(value: float | None, noise: float | None) -> float | None:
    """``value``, or 0.0 when it is below its floor (for sums such as h + Δh)."""
    return 0.0 if below(value, noise) else value


def show(value: float | None, noise: float | None, spec: str = ".3g") -> str:
    """``value`` formatted with ``spec``, or ``"below noise"`` under its floor (``n/a`` when missing)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return "below noise" if below(value, noise) else format(value, spec)

"""The barrier h(x) and the controller step, as pure tensor functions.

At each steered decoder layer and for each target token, the barrier is

    h(x) = mean over heads (and target tokens) of Σ_{k ∈ image} softmax(q·Kᵀ · s)_k

where ``x`` is the *un-normalised* residual entering the layer, the query is
``q = RoPE(W_q · norm(x) + b_q)``, the keys ``K`` come from the same layer's
``norm → k_proj → RoPE`` over the sequence (prefill) or from the KV cache (decode),
``s = head_dim^-0.5`` and a query at position p sees only keys ≤ p.

If ``h < τ`` the controller solves the linearised problem "smallest θ with h + ∇h·θ ≥ τ",
whose solution is ``θ* = (τ − h)/‖g‖² · g`` with ``g = ∇ₓh``. The seed adds 1e-6 to ``‖g‖²``,
caps the scale at 0.5 and adds ``α·θ*`` to ``x`` before the layer runs. The keys are treated
as constants: only the target token's query moves.

Because ``g`` passes back through RMSNorm, ``‖g‖ ∝ 1/r`` (``r`` = RMS of x), so ``‖g‖²`` can be
tiny: far below the 1e-6 guard (a knob, ``BarrierConfig.guard``), the guard, not the
gradient, sets the scale (:func:`guard_share` → 1), and the cap then binds. In fp16 ``‖g‖²``
can even underflow to 0, which only enlarges the scale: ``(τ − h)/guard`` instead of
``(τ − h)/(Σg² + guard)``, the same number once Σg² ≪ guard. Every function computes in the
dtype it is given, so such dtype effects are kept.

Edge values: α = 0 gives a zero step; with guard = 0 and Σg² = 0 the scale is infinite and so
is the step (``finite`` is False: the caller must not apply it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ...measurements.probes import fit_mask
from ...models.projection import LayerWeights, attention_rows, project_queries
from .config import BarrierConfig


def barrier_value(
    x_tok: torch.Tensor,
    keys: torch.Tensor,
    w: LayerWeights,
    cos_tok: torch.Tensor,
    sin_tok: torch.Tensor,
    image_mask: torch.Tensor,
    query_positions: torch.Tensor,
    *,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Barrier h and per-head image masses for target tokens.

    Computed in ``x_tok``'s dtype (pass fp16 to see fp16 behaviour).

    Args:
        x_tok: [n_tok, d] the target tokens' residuals (or input_layernorm outputs with ``normalized=True``).
        keys: [KV, seq, hd] the layer's keys (after RoPE).
        w: the layer's weights (input norm, q/k projections, heads).
        cos_tok: [n_tok, hd] the rotary cos at the target tokens' positions.
        sin_tok: [n_tok, hd] the rotary sin there.
        image_mask: bool [seq] the image keys (shorter is padded with False).
        query_positions: long [n_tok] each target token's position p: keys at positions > p are masked out.
        normalized: ``x_tok`` already is the input norm's output.

    Returns:
        ``(h, per_head)``: h is the mean over heads and tokens (0-dim), per_head is [H, n_tok].
    """
    q = project_queries(x_tok, w, cos_tok, sin_tok, normalized=normalized)  # [H, n, hd]
    probs = attention_rows(q, keys, w, query_positions)  # [H, n, seq]
    img = fit_mask(image_mask, probs.shape[-1], q.device)
    per_head = (probs * img.to(probs.dtype)).sum(-1)  # [H, n]
    return per_head.mean(), per_head


def barrier_gradient(x_tok: torch.Tensor, keys: torch.Tensor, w: LayerWeights, cos_tok: torch.Tensor,
                     sin_tok: torch.Tensor, image_mask: torch.Tensor, query_positions: torch.Tensor, dtype: torch.dtype,
                     *, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, ∂h/∂x_tok)`` with every input cast to ``dtype``; keys are constants.

    Uses a local ``enable_grad`` (and leaves inference mode locally), so it works inside
    ``torch.no_grad()`` contexts such as ``generate``.

    Args:
        x_tok: [n_tok, d] the target tokens' residuals (see :func:`barrier_value`).
        keys: [KV, seq, hd] the layer's keys.
        w: the layer's weights.
        cos_tok: [n_tok, hd] the rotary cos at the target tokens' positions.
        sin_tok: [n_tok, hd] the rotary sin there.
        image_mask: bool [seq] the image keys.
        query_positions: long [n_tok] the target tokens' positions.
        dtype: the dtype h and its gradient are computed in.
        normalized: ``x_tok`` already is the input norm's output.

    Returns:
        ``(h, g)``: h 0-dim and g with ``x_tok``'s shape, both detached, in ``dtype``.
    """
    with torch.inference_mode(False), torch.enable_grad():

        def prep(t):
            if t is None:
                return None
            t = t.detach().to(dtype)
            return t.clone() if t.is_inference() else t

        wd = dataclasses.replace(w, **{name: prep(getattr(w, name)) for name in LayerWeights.TENSORS})
        x = x_tok.detach().to(dtype).clone().requires_grad_(True)
        h, _ = barrier_value(
            x, prep(keys), wd, prep(cos_tok), prep(sin_tok),
            image_mask, query_positions, normalized=normalized,
        )
        (g,) = torch.autograd.grad(h, x)
    return h.detach(), g.detach()


@dataclass(frozen=True, eq=False)
class StepResult:
    """One controller step. ``theta = scale·g``; ``applied = α·theta`` is added to x."""

    active: bool  # h < tau
    h: float
    tau: float
    alpha: float
    grad_norm: float  # ‖g‖ of the g given (in float32 arithmetic)
    grad_norm_sq_dtype: float  # Σg² as computed in g's dtype (what the seed divides by)
    scale_unclamped: float  # (tau − h)/(‖g‖² + guard), in g's dtype
    scale: float  # after the clamp; 0 when inactive
    clamp_active: bool
    theta: torch.Tensor
    applied: torch.Tensor
    theta_norm: float
    applied_norm: float
    theta_rel: float  # ‖theta‖/‖x‖
    predicted_delta_h: float  # first order: g·applied
    guard_share: float = math.nan  # guard/(Σg² + guard)
    finite: bool = True  # the applied step is finite (an overflowing step is not applied)

    def to_record(self) -> dict[str, float | bool]:
        """The scalar fields, for tidy records."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("theta", "applied")
        }


def step(
    h: torch.Tensor,
    g: torch.Tensor,
    x_norm: float,
    tau: float,
    alpha: float,
    config: BarrierConfig,
) -> StepResult:
    """The controller step, computed in ``g``'s dtype as the seed does.

    ``scale_unclamped = (τ − h)/(Σg² + guard)`` (``config.guard``, seed 1e-6). Clamps (:func:`clamped_scale`):
    "scale" → ``min(clamp_value, ·)``; "step_norm" → ``min(·, c‖x‖/(α‖g‖))`` so that ``‖α·θ‖ ≤ c‖x‖``;
    "none" → as is. Inactive (h ≥ τ) → theta = 0, scale = 0.

    Args:
        h: the barrier before the step (0-dim).
        g: ∂h/∂x over the target tokens (:func:`barrier_gradient`); its dtype is the step's.
        x_norm: ‖x‖ over the target tokens (for ``theta_rel`` and the "step_norm" clamp).
        tau: the target τ.
        alpha: the step's gain α (``applied = α·theta``).
        config: the clamp (``clamp``, ``clamp_value``) and the guard.

    Returns:
        The :class:`StepResult`; ``finite`` False when the applied step overflowed (the caller must not apply it).
    """
    dt = g.dtype
    h_t = torch.as_tensor(h).to(dt)
    h_f = float(h_t)
    gsq = (g * g).sum()  # in g's dtype: may underflow in fp16
    guard = float(getattr(config, "guard", 1e-6))
    denom = gsq + guard
    unclamped = (tau - h_t) / denom if float(denom) > 0 else torch.tensor(
        math.inf if tau > float(h_t) else 0.0, dtype=dt, device=g.device)
    grad_norm = float(g.to(torch.float32).norm()) if dt != torch.float64 else float(g.norm())
    active = bool(h_t < tau)

    scale_t = torch.zeros((), dtype=dt, device=g.device)
    clamp_active = False
    if active:
        scale_t = clamped_scale(unclamped, config, alpha * grad_norm, x_norm)
        clamp_active = bool(scale_t < unclamped)
        # no direction to move in: no step (avoids inf·0 = NaN); an infinite scale stays infinite
        theta = torch.zeros_like(g) if grad_norm == 0.0 else scale_t * g
    else:
        theta = torch.zeros_like(g)
    applied = alpha * theta if alpha != 0 else torch.zeros_like(theta)
    finite = bool(torch.isfinite(applied).all())

    theta_norm = float(theta.to(torch.float64).norm())
    return StepResult(
        active=active,
        h=h_f,
        tau=float(tau),
        alpha=float(alpha),
        grad_norm=grad_norm,
        grad_norm_sq_dtype=float(gsq),
        scale_unclamped=float(unclamped),
        scale=float(scale_t),
        clamp_active=clamp_active,
        theta=theta,
        applied=applied,
        theta_norm=theta_norm,
        applied_norm=float(applied.to(torch.float64).norm()),
        theta_rel=theta_norm / x_norm if x_norm > 0 else math.nan,
        predicted_delta_h=float((g.to(torch.float64) * applied.to(torch.float64)).sum()),
        guard_share=guard_share(float(gsq), guard),
        finite=finite,
    )


def clamped_scale(unclamped: torch.Tensor, config: BarrierConfig, step_per_scale: float, x_norm: float):
    """The scale after the configured clamp: "scale" → ``min(clamp_value, ·)``; "step_norm" → ``min(·,
    c‖x‖/(α‖g‖))``, so that ``‖α·θ‖ ≤ c‖x‖``; "none" → as is.

    Args:
        unclamped: the scale ``(τ − h)/(Σg² + guard)`` (0-dim).
        config: its ``clamp`` and ``clamp_value`` (c).
        step_per_scale: α‖g‖, the applied step's norm per unit of scale (0: no "step_norm" limit).
        x_norm: ‖x‖ over the target tokens.

    Returns:
        The clamped scale (0-dim, ``unclamped``'s dtype).
    """
    if config.clamp == "scale":
        return torch.clamp(unclamped, max=config.clamp_value)
    if config.clamp == "step_norm":
        limit = config.clamp_value * x_norm / step_per_scale if step_per_scale > 0 else math.inf
        return torch.clamp(unclamped, max=limit) if math.isfinite(limit) else unclamped
    return unclamped


def guard_share(grad_norm_sq: float, guard: float) -> float:
    """``guard/(Σg² + guard)``: the share of the scale's divisor that is the guard, not the gradient.

    Near 1 the scale is ``(τ − h)/guard`` whatever the gradient; near 0 the gradient sets it.
    """
    denom = grad_norm_sq + guard
    return guard / denom if denom > 0 and math.isfinite(denom) else (0.0 if guard == 0 else math.nan)

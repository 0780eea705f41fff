"""The MC-LCBF intervention as pure tensor functions, plus its configuration.

Mechanism
---------
At each steered decoder layer ℓ and for each target token, the barrier is

    h(x) = mean over heads (and target tokens) of Σ_{k ∈ image} softmax(q·Kᵀ · s)_k

where ``x`` is the *un-normalised* residual entering the layer, the query is
``q = RoPE(W_q · RMSNorm(x) + b_q)``, the keys ``K`` come from the same layer's
``input_layernorm → k_proj → RoPE`` over the sequence (prefill) or from the KV cache
(decode), ``s = head_dim^-0.5`` and a query at position p sees only keys ≤ p.

If ``h < τ`` the controller solves the linearised problem "smallest θ with
h + ∇h·θ ≥ τ", whose solution is ``θ* = (τ − h)/‖g‖² · g`` with ``g = ∇ₓh``. The seed adds
1e-6 to ``‖g‖²``, caps the scale at 0.5 and adds ``α·θ*`` to ``x`` before the layer runs.
The keys are treated as constants: only the target token's query moves.

Because ``g`` passes back through RMSNorm, ``‖g‖ ∝ 1/r`` (``r`` = RMS of x), so ``‖g‖²`` can
be tiny. In fp16 it can even underflow to 0; the scale then becomes ``(τ−h)/1e-6`` and
the 0.5 cap binds, leaving ``‖θ*‖ = 0.5‖g‖``, far below ``‖x‖``. This module keeps such
dtype effects: every function computes in the dtype it is given.

Alternative knobs (clamp on the step norm relative to ‖x‖, detected image span,
editing attention logits directly) live in :class:`BarrierConfig` and :data:`PRESETS`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .errors import UserError
from .probes import fit_mask, rms_norm

__all__ = [
    "LayerWeights",
    "project_keys",
    "project_queries",
    "barrier_value",
    "barrier_gradient",
    "BarrierConfig",
    "PRESETS",
    "get_preset",
    "apply_overrides",
    "steered_layers",
    "image_span_mask",
    "target_positions",
    "phase_params",
    "resolve_grad_dtype",
    "StepResult",
    "step",
    "logit_bias_for_target",
    "rescale_image_probs",
    "shift_image_logits",
]


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """The tensors of one decoder layer that the barrier needs (plain tensors)."""

    ln_weight: torch.Tensor  # [d]   input_layernorm.weight
    ln_eps: float
    q_weight: torch.Tensor  # [H*hd, d]
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor  # [KV*hd, d]
    k_bias: torch.Tensor | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float  # head_dim ** -0.5 for Llama

    def to(self, dtype: torch.dtype) -> "LayerWeights":
        """The same weights in ``dtype`` (returns self when nothing needs casting)."""
        tensors = (self.ln_weight, self.q_weight, self.q_bias, self.k_weight, self.k_bias)
        if all(t is None or t.dtype == dtype for t in tensors):
            return self
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return dataclasses.replace(
            self,
            ln_weight=cast(self.ln_weight),
            q_weight=cast(self.q_weight),
            q_bias=cast(self.q_bias),
            k_weight=cast(self.k_weight),
            k_bias=cast(self.k_bias),
        )


def _norm_input(x: torch.Tensor, w: LayerWeights, normalized: bool) -> torch.Tensor:
    return x if normalized else rms_norm(x, w.ln_weight, w.ln_eps)


def _project(x: torch.Tensor, w: LayerWeights, weight: str, bias: str, n_heads: int, cos, sin,
             normalized: bool) -> torch.Tensor:
    """RMSNorm → linear → RoPE, split into heads: [heads, n, hd], in ``x``'s dtype."""
    w, cos, sin = w.to(x.dtype), cos.to(x.dtype), sin.to(x.dtype)
    out = F.linear(_norm_input(x, w, normalized), getattr(w, weight), getattr(w, bias))
    out = out.view(x.shape[0], n_heads, w.head_dim).transpose(0, 1)
    out, _ = apply_rotary_pos_emb(out, out, cos, sin, unsqueeze_dim=0)
    return out


def project_keys(x_seq: torch.Tensor, w: LayerWeights, cos: torch.Tensor, sin: torch.Tensor, *,
                 normalized: bool = False) -> torch.Tensor:
    """Keys [KV, seq, hd] from residuals x_seq [seq, d] (RMSNorm → k_proj → RoPE).

    ``cos``/``sin`` are [seq, hd] (the rotary embedding's output for batch 0).
    ``normalized=True`` means ``x_seq`` already is the input_layernorm output.
    Computed in ``x_seq``'s dtype (weights and cos/sin are cast to it).
    """
    return _project(x_seq, w, "k_weight", "k_bias", w.n_kv_heads, cos, sin, normalized)


def project_queries(x_tok: torch.Tensor, w: LayerWeights, cos_tok: torch.Tensor, sin_tok: torch.Tensor, *,
                    normalized: bool = False) -> torch.Tensor:
    """Queries [H, n_tok, hd] from residuals x_tok [n_tok, d] (RMSNorm → q_proj → RoPE)."""
    return _project(x_tok, w, "q_weight", "q_bias", w.n_heads, cos_tok, sin_tok, normalized)


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

    x_tok [n_tok, d] (residuals, or input_layernorm outputs with ``normalized=True``),
    keys [KV, seq, hd], image_mask bool [seq] (shorter is padded with False),
    query_positions long [n_tok]: keys at positions > p are masked out.
    Returns ``(h, per_head)``: h is the mean over heads and tokens (0-dim), per_head is
    [H, n_tok]. Computed in ``x_tok``'s dtype (pass fp16 to see fp16 behaviour).
    """
    q = project_queries(x_tok, w, cos_tok, sin_tok, normalized=normalized)  # [H, n, hd]
    k = keys.to(q.dtype)
    if w.n_heads != w.n_kv_heads:
        k = repeat_kv(k[None], w.n_heads // w.n_kv_heads)[0]  # [H, seq, hd]
    scores = torch.matmul(q, k.transpose(-1, -2)) * w.scaling  # [H, n, seq]
    n_keys = k.shape[-2]
    pos = torch.as_tensor(query_positions, device=q.device).reshape(-1, 1)
    future = torch.arange(n_keys, device=q.device)[None, :] > pos  # [n, seq]
    scores = scores.masked_fill(future[None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    img = fit_mask(image_mask, n_keys, q.device)
    per_head = (probs * img.to(probs.dtype)).sum(-1)  # [H, n]
    return per_head.mean(), per_head


def barrier_gradient(
    x_tok: torch.Tensor,
    keys: torch.Tensor,
    w: LayerWeights,
    cos_tok: torch.Tensor,
    sin_tok: torch.Tensor,
    image_mask: torch.Tensor,
    query_positions: torch.Tensor,
    dtype: torch.dtype,
    *,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, ∂h/∂x_tok)`` with every input cast to ``dtype``; keys are constants.

    Uses a local ``enable_grad`` (and leaves inference mode locally), so it works inside
    ``torch.no_grad()`` contexts such as ``generate``. Both results are detached, in
    ``dtype``; g has x_tok's shape.
    """
    with torch.inference_mode(False), torch.enable_grad():

        def prep(t):
            if t is None:
                return None
            t = t.detach().to(dtype)
            return t.clone() if t.is_inference() else t

        wd = LayerWeights(
            prep(w.ln_weight), w.ln_eps, prep(w.q_weight), prep(w.q_bias), prep(w.k_weight),
            prep(w.k_bias), w.n_heads, w.n_kv_heads, w.head_dim, w.scaling,
        )
        x = x_tok.detach().to(dtype).clone().requires_grad_(True)
        h, _ = barrier_value(
            x, prep(keys), wd, prep(cos_tok), prep(sin_tok),
            image_mask, query_positions, normalized=normalized,
        )
        (g,) = torch.autograd.grad(h, x)
    return h.detach(), g.detach()


# --------------------------------------------------------------------------- config

GradDtype = Literal["model", "float32"]
Clamp = Literal["scale", "step_norm", "none"]
Span = Literal["fixed", "detected"]
Site = Literal["resid_pre", "ln1_out", "attn_logits"]
Tokens = Literal["last", "after_image"]


@dataclass(frozen=True)
class BarrierConfig:
    """Knobs of the intervention. The defaults are the seed's experiment 6.

    * ``layers``: steered decoder layers; None → :func:`steered_layers`' depth rule.
    * ``tau_*``/``alpha_*``: threshold and step multiplier, prefill and decode.
    * ``grad_dtype``: compute h and ∇h in the model's dtype (seed) or in float32.
    * ``clamp``: "scale" caps the scale at ``clamp_value`` (seed: 0.5); "step_norm" caps
      the applied step at ``clamp_value·‖x‖``; "none" applies the raw scale.
    * ``span``: image keys from ``fixed_span`` [a, b) (seed) or detected image tokens.
    * ``site``: where the step acts: the residual before the layer (seed), the
      input_layernorm output, or the attention logits on image keys directly.
    * ``tokens``: steer the last prompt token (seed) or every text token after the image.
    """

    layers: tuple[int, ...] | None = None
    tau_prefill: float = 0.2
    alpha_prefill: float = 1.0
    tau_decode: float = 0.2
    alpha_decode: float = 0.5
    grad_dtype: GradDtype = "model"
    clamp: Clamp = "scale"
    clamp_value: float = 0.5
    span: Span = "fixed"
    fixed_span: tuple[int, int] = (1, 577)
    site: Site = "resid_pre"
    tokens: Tokens = "last"

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"{f.name}={value!r} is not valid; choose one of {', '.join(choices)}")
        for name in ("tau_prefill", "tau_decode"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise UserError(f"{name}={v} is not a probability mass; use a value in [0, 1]")
        for name in ("alpha_prefill", "alpha_decode", "clamp_value"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UserError(f"{name}={v} must be a finite number >= 0")
        a, b = self.fixed_span
        if not (0 <= a < b):
            raise UserError(f"fixed_span=({a}, {b}) must satisfy 0 <= start < stop")
        if self.layers is not None and any(l < 0 for l in self.layers):
            raise UserError(f"layers={self.layers} contains a negative index")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


PRESETS: dict[str, BarrierConfig] = {
    # The researcher's experiment 6, knob for knob: gradient in the model dtype (fp16),
    # scale capped at 0.5, image span hard-coded to [1, 577), step on the residual
    # before the layer, last prompt token only.
    "seed-exp6": BarrierConfig(),
    "fixed": BarrierConfig(
        # float32: in fp16 ‖g‖² underflows to 0 and the scale is decided by the 1e-6
        # guard and the cap, not by the barrier.
        grad_dtype="float32",
        # Cap the step relative to the vector it perturbs: ‖α·θ*‖ ≤ 0.5·‖x‖. The seed's cap
        # on the scale (a number multiplying g, whose size ∝ 1/r) binds exactly when the
        # step is needed and leaves ‖θ*‖ ≪ ‖x‖; a cap relative to ‖x‖ does not depend on the
        # residual's scale, lets the step reach the target, and still keeps x in range.
        clamp="step_norm",
        clamp_value=0.5,
        # The image tokens, found in input_ids; [1, 577) is shifted by 4 in llava-hf.
        span="detected",
        # Edit the attention logits on image keys directly: the mass reaches τ exactly, no
        # linearisation, no RMSNorm in the way, and no step the fp16 residual rounds away.
        site="attn_logits",
        # The decision token, as in the seed, so the two presets stay comparable; the
        # knockout probe tells whether other tokens must be steered too.
        tokens="last",
    ),
}


def get_preset(name: str) -> BarrierConfig:
    """The named preset, or a UserError that lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def _parse_int(text: str, knob: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UserError(f"{knob}: {text.strip()!r} is not an integer") from None


def _parse_ints(text: str, knob: str) -> tuple[int, ...]:
    """'1,2,3' or 'a:b' (python-style, stop excluded), or a mix: '1,4:7'."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if ":" in part:
            a, _, b = part.partition(":")
            out.extend(range(_parse_int(a, knob), _parse_int(b, knob)))
        else:
            out.append(_parse_int(part, knob))
    return tuple(out)


def _parse_value(knob: str, text: str, hint) -> object:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if text not in args:
            raise UserError(f"{knob}={text!r} is not valid; choose one of {', '.join(args)}")
        return text
    if hint is float:
        try:
            v = float(text)
        except ValueError:
            raise UserError(f"{knob}={text!r} is not a number") from None
        return v
    if type(None) in args:  # tuple[int, ...] | None
        if text.strip().lower() in ("", "none", "auto"):
            return None
        inner = next(a for a in args if a is not type(None))
        return _parse_value(knob, text, inner)
    if origin is tuple:
        vals = _parse_ints(text, knob)
        if args and args[-1] is not Ellipsis:
            if ":" in text and len(args) == 2 and "," not in text:
                a, _, b = text.partition(":")
                vals = (_parse_int(a, knob), _parse_int(b, knob))
            if len(vals) != len(args):
                raise UserError(f"{knob}={text!r} needs {len(args)} integers, e.g. {knob}=5,581")
        elif not vals:
            raise UserError(f"{knob}={text!r} lists no integers; e.g. {knob}=10,11,12 or {knob}=10:28")
        return vals
    raise TypeError(f"no parser for knob {knob} of type {hint}")  # programming error


def apply_overrides(config: BarrierConfig, overrides: list[str] | tuple[str, ...]) -> BarrierConfig:
    """Apply ``knob=value`` strings to a config; types come from the field annotations.

    ``tau=`` and ``alpha=`` set both phases. Integer lists accept ``1,2,3`` and ``a:b``
    (stop excluded); ``layers=none`` restores the depth rule. Unknown knobs, missing '='
    and bad values raise UserError.
    """
    hints = typing.get_type_hints(BarrierConfig)
    aliases = {"tau": ("tau_prefill", "tau_decode"), "alpha": ("alpha_prefill", "alpha_decode")}
    valid = sorted([*hints, *aliases])
    changes: dict[str, object] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} has no '='; write knob=value, e.g. tau_prefill=0.5")
        knob, _, text = item.partition("=")
        knob, text = knob.strip(), text.strip()
        targets = aliases.get(knob, (knob,))
        if targets[0] not in hints:
            raise UserError(f"unknown knob {knob!r}; valid knobs: {', '.join(valid)}")
        value = _parse_value(knob, text, hints[targets[0]])
        for t in targets:
            changes[t] = value
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------- selection


def steered_layers(config: BarrierConfig, n_layers: int) -> tuple[int, ...]:
    """Layers to steer: ``config.layers`` if set (validated), else the seed's fraction.

    The seed steers 10..27 of 32 layers; for depth L the same fraction is
    ``range(round(10L/32), round(28L/32))`` with halves rounded up (L=4 → 1..3).
    """
    if config.layers is not None:
        bad = [l for l in config.layers if not 0 <= l < n_layers]
        if bad:
            raise UserError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
        return tuple(sorted(set(config.layers)))
    start = (20 * n_layers + 32) // 64  # floor(10L/32 + 1/2)
    stop = (56 * n_layers + 32) // 64  # floor(28L/32 + 1/2)
    return tuple(range(start, stop))


def image_span_mask(config: BarrierConfig, input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Bool [seq] marking the image keys: the fixed span clipped to seq, or detected tokens."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [seq] or [1, seq], got shape {tuple(ids.shape)}")
    seq = ids.shape[0]
    if config.span == "fixed":
        a, b = config.fixed_span
        mask = torch.zeros(seq, dtype=torch.bool, device=ids.device)
        mask[min(a, seq) : min(b, seq)] = True
        return mask
    mask = ids == image_token_id
    if not bool(mask.any()):
        raise UserError(
            f"no image token id {image_token_id} in the prompt ({seq} tokens); "
            "check the prompt contains the image placeholder, or use span=fixed"
        )
    return mask


def target_positions(config: BarrierConfig, image_mask: torch.Tensor) -> torch.Tensor:
    """Prefill target positions (long): the last token, or every token after the image."""
    seq = image_mask.shape[-1]
    if config.tokens == "last" or not bool(image_mask.any()):
        return torch.tensor([seq - 1], dtype=torch.long)
    last_img = int(torch.nonzero(image_mask).max())
    pos = torch.arange(last_img + 1, seq, dtype=torch.long)
    return pos if pos.numel() else torch.tensor([seq - 1], dtype=torch.long)


def phase_params(config: BarrierConfig, phase: Literal["prefill", "decode"]) -> tuple[float, float]:
    """``(tau, alpha)`` for a phase."""
    if phase == "prefill":
        return config.tau_prefill, config.alpha_prefill
    if phase == "decode":
        return config.tau_decode, config.alpha_decode
    raise ValueError(f"phase must be 'prefill' or 'decode', not {phase!r}")


def resolve_grad_dtype(config: BarrierConfig, model_dtype: torch.dtype) -> torch.dtype:
    return model_dtype if config.grad_dtype == "model" else torch.float32


# --------------------------------------------------------------------------- the step


@dataclass(frozen=True, eq=False)
class StepResult:
    """One controller step. ``theta = scale·g``; ``applied = α·theta`` is added to x."""

    active: bool  # h < tau
    h: float
    tau: float
    alpha: float
    grad_norm: float  # ‖g‖ of the g given (in float32 arithmetic)
    grad_norm_sq_dtype: float  # Σg² as computed in g's dtype (what the seed divides by)
    scale_unclamped: float  # (tau − h)/(‖g‖² + 1e-6), in g's dtype
    scale: float  # after the clamp; 0 when inactive
    clamp_active: bool
    theta: torch.Tensor
    applied: torch.Tensor
    theta_norm: float
    applied_norm: float
    theta_rel: float  # ‖theta‖/‖x‖
    predicted_delta_h: float  # first order: g·applied

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

    ``scale_unclamped = (τ − h)/(Σg² + 1e-6)``. Clamps: "scale" → ``min(clamp_value, ·)``;
    "step_norm" → ``min(·, c‖x‖/(α‖g‖))`` so that ``‖α·θ‖ ≤ c‖x‖``; "none" → as is.
    Inactive (h ≥ τ) → theta = 0, scale = 0. ``x_norm`` is ‖x‖ over the target tokens.
    """
    dt = g.dtype
    h_t = torch.as_tensor(h).to(dt)
    h_f = float(h_t)
    gsq = (g * g).sum()  # in g's dtype: may underflow in fp16
    unclamped = (tau - h_t) / (gsq + 1e-6)
    grad_norm = float(g.to(torch.float32).norm()) if dt != torch.float64 else float(g.norm())
    active = bool(h_t < tau)

    scale_t = torch.zeros((), dtype=dt, device=g.device)
    clamp_active = False
    if active:
        if config.clamp == "scale":
            scale_t = torch.clamp(unclamped, max=config.clamp_value)
        elif config.clamp == "step_norm":
            denom = alpha * grad_norm
            limit = config.clamp_value * x_norm / denom if denom > 0 else math.inf
            scale_t = torch.clamp(unclamped, max=limit) if math.isfinite(limit) else unclamped
        else:
            scale_t = unclamped
        clamp_active = bool(scale_t < unclamped)
        if grad_norm == 0.0:  # no direction to move in (avoids inf·0 = NaN)
            theta = torch.zeros_like(g)
        else:
            theta = scale_t * g
    else:
        theta = torch.zeros_like(g)
    applied = alpha * theta

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
    )


# --------------------------------------------------------------------------- attention edits


def logit_bias_for_target(per_head_mass: torch.Tensor, tau: float, max_delta: float = 30.0) -> torch.Tensor:
    """Per-head shift δ of the image-key logits that brings a head's image mass to τ.

    With image mass ``m = A/(A+B)`` (A, B the sums of exp-logits over image and other
    keys), adding δ to every image logit gives ``A e^δ/(A e^δ + B)``. Setting this to τ:
    ``e^δ = τB/((1−τ)A) = τ(1−m)/((1−τ)m)``, so ``δ = log(τ(1−m)/(m(1−τ)))``.
    Heads with m ≥ τ get 0. m = 0 (or tiny) would need δ = ∞: δ is capped at
    ``max_delta`` (e³⁰ ≈ 1e13, enough unless m < 1e-13). Returns float32, same shape.
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1) for a logit shift, got {tau}")
    m = per_head_mass.to(torch.float64)
    mc = m.clamp(min=1e-300, max=1.0)
    delta = torch.log(tau * (1 - mc)) - torch.log(mc * (1 - tau))
    delta = torch.where(m < tau, delta.clamp(max=max_delta), torch.zeros_like(delta))
    return delta.to(torch.float32)


def rescale_image_probs(
    probs_row: torch.Tensor,
    image_mask: torch.Tensor,
    target_mass: float | torch.Tensor,
) -> torch.Tensor:
    """Rescale softmax rows [..., keys] so the image mass equals ``target_mass``.

    Image probabilities are multiplied by ``t/m`` and the others by ``(1−t)/(1−m)``: the
    row still sums to one and keeps its shape within each group. This equals
    ``softmax(logits + δ·image_mask)`` with ``δ = log(t(1−m)/(m(1−t)))`` (see
    :func:`logit_bias_for_target`), so post-softmax and pre-softmax edits agree.
    ``t = 0`` is a knockout; doubling is ``t = min(2m, 1−ε)``. ``target_mass`` may be a
    scalar or broadcast against ``probs_row.shape[:-1]`` (e.g. per head). Rows with
    m = 0 or m = 1 cannot be rescaled and are returned unchanged.
    """
    p = probs_row.to(torch.float32)
    img = fit_mask(image_mask, p.shape[-1], p.device)
    imgf = img.to(p.dtype)
    m = (p * imgf).sum(-1, keepdim=True)
    t = torch.as_tensor(target_mass, dtype=p.dtype, device=p.device)
    if t.dim() > 0:
        t = t.unsqueeze(-1)
    ok = (m > 0) & (m < 1)
    c_img = torch.where(ok, t / torch.where(ok, m, torch.ones_like(m)), torch.ones_like(m))
    c_oth = torch.where(ok, (1 - t) / torch.where(ok, 1 - m, torch.ones_like(m)), torch.ones_like(m))
    out = p * (imgf * c_img + (1 - imgf) * c_oth)
    return out.to(probs_row.dtype)


def shift_image_logits(probs_rows: torch.Tensor, image_mask: torch.Tensor, tau: float, strength: float = 1.0):
    """The ``attn_logits`` site on softmax rows [H, n, K]: lift each head's image mass toward τ.

    Heads with image mass m < τ get the logit shift ``strength·δ`` on every image key, δ from
    :func:`logit_bias_for_target` (``strength`` = α, times a dose multiplier), applied
    post-softmax by :func:`rescale_image_probs`. Returns ``(new_rows, mass, delta, target)``:
    the edited rows, the per-head mass before [H, n], the shift applied and the mass after.
    """
    mask = fit_mask(image_mask, probs_rows.shape[-1], probs_rows.device)
    mass = probs_rows.float()[..., mask].sum(-1)
    delta = logit_bias_for_target(mass, tau) * strength
    m, e = mass.double(), torch.exp(delta.double())
    target = (m * e / (m * e + 1 - m)).float()
    return rescale_image_probs(probs_rows, mask, target), mass, delta, target

"""Measurements as pure tensor functions (no model, no nnsight).

Everything here takes plain tensors (a residual vector, a norm weight, a softmax row,
the unembedding matrix), so each quantity can be checked against an independent
reference without loading a model.

RMSNorm and its Jacobian
------------------------
Llama's RMSNorm maps a residual vector ``x`` (length ``d``) to ``y = γ ⊙ x / r`` with
``r = sqrt(mean(x²) + ε)``. Differentiating gives the exact Jacobian

    J = ∂y/∂x = diag(γ) · (I / r − x xᵀ / (d r³)).

Two directions tell the story of a perturbation ``v`` added to ``x``:

* radial, ``v ∥ x``: ``J x̂ = γ ⊙ x̂ · ε / r³``. Without ε this is exactly zero: RMSNorm
  removes any change of length, so a step along ``x`` is invisible to the next layer.
* orthogonal, ``v ⊥ x``: the second term vanishes and ``J v = γ ⊙ v / r``. Averaging
  ``‖γ ⊙ v‖²`` over unit vectors spread uniformly on the sphere of ``x⊥`` (dimension
  ``d − 1``) gives ``trace(P diag(γ²) P) / (d − 1) = Σᵢ γᵢ² (1 − x̂ᵢ²) / (d − 1)``, with
  ``P = I − x̂ x̂ᵀ``. Its square root divided by ``r`` is the root-mean-square gain a
  typical orthogonal step sees, roughly ``‖γ‖_rms / r``.

The backward pass multiplies by ``Jᵀ = (I / r − x xᵀ / (d r³)) · diag(γ)``, so a gradient
coming back through the norm is scaled by the same ``1 / r``: large residuals (Llama has
``r`` in the tens to hundreds in middle layers) get small gradients.

Other measurements: softmax mass split into image / attention-sink / text keys, the
logit lens (final norm + unembedding at any layer), how much of a step survives rounding
to a low-precision dtype, and the distance between steered and baseline residuals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "rms_norm",
    "rms_norm_jacobian",
    "rms_norm_jvp",
    "rms_norm_vjp",
    "rms_norm_gains",
    "attention_masses",
    "logit_lens",
    "yes_no_margin",
    "rounding_survival",
    "propagation_distance",
]


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- RMSNorm


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm over the last dim, with the same casts as transformers.

    The normalisation runs in float32 and is cast back to ``x``'s dtype before the
    multiplication by ``weight`` (so the result has the promoted dtype of the two).
    One deliberate difference: float64 input stays float64 (transformers would drop it
    to float32), so float64 finite-difference checks are meaningful.
    """
    input_dtype = x.dtype
    h = x.to(_math_dtype(x))
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def _rms(x: torch.Tensor, eps) -> torch.Tensor:
    """RMS over the last dim, keepdim; ``eps`` may be a float or a tensor per leading index."""
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps.reshape(*eps.shape, *[1] * (x.dim() - eps.dim())))


def _prep(x: torch.Tensor, weight: torch.Tensor):
    dt = _math_dtype(x)
    return x.to(dt), weight.to(dt)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)


def rms_norm_jacobian(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact Jacobian ``diag(γ)(I/r − x xᵀ/(d r³))`` of RMSNorm at a single vector x [d]."""
    if x.dim() != 1:
        raise ValueError(f"expected a single vector [d], got shape {tuple(x.shape)}")
    x, g = _prep(x, weight)
    d = x.numel()
    r = _rms(x, eps)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return g[:, None] * (eye / r - torch.outer(x, x) / (d * r**3))


def rms_norm_jvp(x: torch.Tensor, weight: torch.Tensor, eps, v: torch.Tensor) -> torch.Tensor:
    """``J v`` without forming J: ``γ ⊙ (v/r − x (x·v)/(d r³))``; any leading batch dims.

    Args:
        x: [..., d] where the Jacobian is taken.
        weight: the norm's gain γ ([d], or one per leading index).
        eps: the norm's ε (a float, or a tensor per leading index).
        v: [..., d] the tangent vector(s).

    Returns:
        [..., d] in float32 (float64 for a float64 ``x``).
    """
    x, g = _prep(x, weight)
    v = v.to(x.dtype)
    d = x.shape[-1]
    r = _rms(x, eps)
    return g * (v / r - x * _dot(x, v) / (d * r**3))


def rms_norm_vjp(x: torch.Tensor, weight: torch.Tensor, eps, u: torch.Tensor) -> torch.Tensor:
    """``Jᵀ u`` without forming J: ``w/r − x (x·w)/(d r³)`` with ``w = γ ⊙ u``; any leading batch dims.

    Args:
        x: [..., d] where the Jacobian is taken.
        weight: the norm's gain γ ([d], or one per leading index).
        eps: the norm's ε (a float, or a tensor per leading index).
        u: [..., d] the cotangent vector(s).

    Returns:
        [..., d] in float32 (float64 for a float64 ``x``), as :func:`rms_norm_jvp`'s.
    """
    x, g = _prep(x, weight)
    w = g * u.to(x.dtype)
    d = x.shape[-1]
    r = _rms(x, eps)
    return w / r - x * _dot(x, w) / (d * r**3)


def rms_norm_gains(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps,
    direction: torch.Tensor | None = None,
) -> dict:
    """Gains of RMSNorm at x [d] (floats) or at a batch x [n, d] (tensors [n]).

    Args:
        x: [d] or [n, d] where the gains are taken.
        weight: the norm's gain γ: [d], or [n, d] in a batch (one norm per row).
        eps: the norm's ε: a float, or [n] in a batch.
        direction: v, shaped like ``x``: the direction of ``gain_along`` and ``gain_along_backward``.

    Returns:
        ``gain_along`` (‖J v‖/‖v‖; NaN where ``direction`` is None, zero or not finite),
        ``gain_along_backward`` (‖Jᵀ v‖/‖v‖), ``gain_orthogonal`` (RMS gain over directions orthogonal
        to x), ``gain_radial`` (‖J x̂‖, about 0) and ``rms`` (r): floats for a single ``x``, tensors [n]
        for a batch.
    """
    single = x.dim() == 1
    xm, g = _prep(x.reshape(-1, x.shape[-1]), weight)
    if g.dim() == 1:
        g = g.expand_as(xm)
    d = xm.shape[-1]
    r = _rms(xm, eps)
    xnorm = xm.norm(dim=-1, keepdim=True)
    xhat = torch.where(xnorm > 0, xm / xnorm.clamp_min(torch.finfo(xm.dtype).tiny), torch.zeros_like(xm))

    gain_orth = torch.sqrt((g.pow(2) * (1 - xhat.pow(2))).sum(-1) / (d - 1)) / r[:, 0]
    gain_rad = torch.where(xnorm[:, 0] > 0, rms_norm_jvp(xm, g, eps, xhat).norm(dim=-1),
                           torch.full_like(xnorm[:, 0], math.nan))
    nan = torch.full_like(gain_orth, math.nan)
    along = along_b = nan
    if direction is not None:
        v = direction.to(xm.dtype).reshape(xm.shape)
        vn = v.norm(dim=-1)
        ok = (vn > 0) & torch.isfinite(vn)
        vs = torch.where(ok[:, None], v, torch.zeros_like(v))
        along = torch.where(ok, rms_norm_jvp(xm, g, eps, vs).norm(dim=-1) / vn, nan)
        along_b = torch.where(ok, rms_norm_vjp(xm, g, eps, vs).norm(dim=-1) / vn, nan)
    out = {"gain_along": along, "gain_along_backward": along_b, "gain_orthogonal": gain_orth,
           "gain_radial": gain_rad, "rms": r[:, 0]}
    return {k: float(v[0]) for k, v in out.items()} if single else out


# --------------------------------------------------------------------------- attention


def attention_masses(
    probs: torch.Tensor,
    image_mask: torch.Tensor,
    sink_positions: Sequence[int] = (0,),
) -> dict[str, torch.Tensor]:
    """Split one softmax row per head into image / sink / text mass.

    Args:
        probs: [heads, keys] one softmax row per head.
        image_mask: bool [keys] the image keys (a shorter mask is padded with False: keys past the prompt
            are generated text).
        sink_positions: the sink's key positions; one that is also an image position counts as image.

    Returns:
        ``{"image", "sink", "text"}``: each float32 [heads], the mass on those keys.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [heads, keys], got shape {tuple(probs.shape)}")
    n_keys = probs.shape[-1]
    img = fit_mask(image_mask, n_keys, probs.device)
    sink = torch.zeros(n_keys, dtype=torch.bool, device=probs.device)
    for p in sink_positions:
        if -n_keys <= p < n_keys:
            sink[p] = True
    sink &= ~img
    text = ~(img | sink)
    p = probs.to(torch.float32)
    return {
        "image": p[:, img].sum(-1),
        "sink": p[:, sink].sum(-1),
        "text": p[:, text].sum(-1),
    }


def fit_mask(mask: torch.Tensor, n_keys: int, device) -> torch.Tensor:
    """A key mask of exactly ``n_keys`` positions: flattened to bool and padded with False at the end.

    Args:
        mask: the mask over the prompt's positions (any shape, flattened).
        n_keys: the attention row's keys (the prompt so far; longer than the prompt while decoding).
        device: where the result lives.

    Returns:
        Bool [n_keys].

    Raises:
        ValueError: the mask is longer than ``n_keys``.
    """
    mask = mask.to(device=device, dtype=torch.bool).reshape(-1)
    if mask.numel() > n_keys:
        raise ValueError(f"image mask has {mask.numel()} positions but there are only {n_keys} keys")
    if mask.numel() < n_keys:
        pad = torch.zeros(n_keys - mask.numel(), dtype=torch.bool, device=device)
        mask = torch.cat([mask, pad])
    return mask


# --------------------------------------------------------------------------- logit lens


def logit_lens(
    resid: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    unembed: torch.Tensor,
    token_ids: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """Logits of ``token_ids`` read from a residual [..., d] through the final RMSNorm.

    The norm keeps the model's casts, the product runs in float32.

    Args:
        resid: [..., d] the residual stream.
        norm_weight: [d] the final norm's gain.
        eps: the final norm's ε.
        unembed: ``lm_head.weight`` [vocab, d] (no bias), or any rows of it that ``token_ids`` index.
        token_ids: the rows of ``unembed`` to read.

    Returns:
        float32 [..., n_ids].
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=unembed.device).reshape(-1)
    normed = rms_norm(resid, norm_weight, eps).to(torch.float32)
    return normed @ unembed[ids].to(torch.float32).T


def yes_no_margin(
    resid: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    unembed: torch.Tensor,
    yes_id: int,
    no_id: int,
) -> torch.Tensor:
    """Logit-lens margin ``logit[yes] − logit[no]``, shape ``resid.shape[:-1]``.

    Args:
        resid: [..., d] the residual stream.
        norm_weight: [d] the final norm's gain.
        eps: the final norm's ε.
        unembed: ``lm_head.weight`` [vocab, d], or any rows of it that the two ids index.
        yes_id: the Yes row of ``unembed``.
        no_id: the No row of ``unembed``.

    Returns:
        float32 ``resid.shape[:-1]`` (see :func:`logit_lens`).
    """
    logits = logit_lens(resid, norm_weight, eps, unembed, [yes_id, no_id])
    return logits[..., 0] - logits[..., 1]


# --------------------------------------------------------------------------- steps


def rounding_survival(x: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> float:
    """Fraction of a step that survives being added to ``x`` in ``dtype``.

    ``‖round_dtype(x + step) − x‖ / ‖step‖`` with ``x`` first rounded to ``dtype``, the sum
    taken in float32 and rounded once. 1 means the step arrives intact, 0 means it is
    rounded away entirely (fp16 keeps 11 significant bits, so a component smaller than
    about 2⁻¹¹·|xᵢ| vanishes).

    Args:
        x: the residual the step is added to (any shape).
        step: the step, shaped like ``x``.
        dtype: the dtype the sum is rounded to (the model's).

    Returns:
        The surviving fraction (≥ 0; may exceed 1 when rounding adds to it); NaN when ‖step‖ = 0.
    """
    step32 = step.to(torch.float32)
    sn = step32.norm()
    if not sn > 0:
        return math.nan
    x32 = x.to(dtype).to(torch.float32)
    new32 = (x32 + step32).to(dtype).to(torch.float32)
    return float((new32 - x32).norm() / sn)


def propagation_distance(x_steered: torch.Tensor, x_base: torch.Tensor) -> float:
    """L2 distance between two residuals, computed in float32."""
    return float((x_steered.to(torch.float32) - x_base.to(torch.float32)).norm())

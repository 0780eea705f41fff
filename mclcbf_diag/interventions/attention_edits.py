"""Edits of softmax rows as pure functions: move a row's image mass to a target.

With image mass ``m = A/(A+B)`` (A, B the sums of exp-logits over image and other keys),
adding δ to every image logit gives ``A e^δ/(A e^δ + B)``; the δ that reaches a target t is
``log(t(1−m)/(m(1−t)))``. Multiplying the image probabilities by ``t/m`` and the others by
``(1−t)/(1−m)`` gives exactly ``softmax(logits + δ·image)``, so an edit after the softmax
equals a logit shift before it, keeping each group's shape. Knockouts (t = 0), doubling,
the graded sweep's batched edit and the barrier's ``attn_logits`` site all use these functions.
``1 − m`` is taken as the other keys' own mass (:func:`mass_factors`): equal in exact
arithmetic, but only that keeps a float32 row summing to 1 when m is close to 1.
"""

from __future__ import annotations

import torch

from ..measurements.probes import fit_mask


def logit_bias_for_target(per_head_mass: torch.Tensor, tau: float, max_delta: float = 30.0) -> torch.Tensor:
    """Per-head shift δ of the image-key logits that brings a head's image mass to τ.

    Heads with m ≥ τ get 0. m = 0 (or tiny) would need δ = ∞: δ is capped at ``max_delta`` (e³⁰ ≈ 1e13).

    Args:
        per_head_mass: the heads' image mass m (any shape).
        tau: the target mass τ, in (0, 1).
        max_delta: the cap on δ.

    Returns:
        δ, float32, shaped as ``per_head_mass``.

    Raises:
        ValueError: τ outside (0, 1).
    """
    if not 0.0 < tau < 1.0:
        raise ValueError(f"tau must be in (0, 1) for a logit shift, got {tau}")
    m = per_head_mass.to(torch.float64)
    mc = m.clamp(min=1e-300, max=1.0)
    delta = torch.log(tau * (1 - mc)) - torch.log(mc * (1 - tau))
    delta = torch.where(m < tau, delta.clamp(max=max_delta), torch.zeros_like(delta))
    return delta.to(torch.float32)


def mass_factors(m: torch.Tensor, other: torch.Tensor, target: torch.Tensor):
    """The factors ``(t/m, (1 − t)/other)`` on image and on other keys that move image mass ``m`` to ``target``.

    1 and 1 where ``m`` or ``other`` is 0 (no mass to move, or none left elsewhere).

    The other keys are divided by their own mass, not by 1 − m: a float32 softmax row sums to 1 only up to rounding,
    and dividing that rounding by a small 1 − m (a head that puts 0.9998 on the image) would leave the edited row
    summing to 1 − 2·10⁻⁴ instead of to 1.

    Args:
        m: the rows' image mass.
        other: the rows' mass on the other keys.
        target: the image mass wanted, broadcast against ``m``.

    Returns:
        ``(image factor, other factor)``, broadcast shapes of the inputs.
    """
    ok = (m > 0) & (other > 0)
    one = torch.ones_like(m)
    return (torch.where(ok, target / torch.where(ok, m, one), one),
            torch.where(ok, (1 - target) / torch.where(ok, other, one), one))


def rescale_image_probs(probs_row: torch.Tensor, image_mask: torch.Tensor,
                        target_mass: float | torch.Tensor) -> torch.Tensor:
    """Rescale softmax rows [..., keys] so the image mass equals ``target_mass``.

    Rows with no image mass, or no mass on other keys, cannot be rescaled and are returned unchanged
    (:func:`mass_factors`).

    Args:
        probs_row: softmax rows [..., keys].
        image_mask: the image keys (bool, over the keys).
        target_mass: a scalar, or a tensor broadcast against ``probs_row.shape[:-1]`` (e.g. per head).

    Returns:
        The rescaled rows, in ``probs_row``'s dtype (computed in float32).
    """
    p = probs_row.to(torch.float32)
    img = fit_mask(image_mask, p.shape[-1], p.device)
    imgf = img.to(p.dtype)
    m = (p * imgf).sum(-1, keepdim=True)
    o = (p * (1 - imgf)).sum(-1, keepdim=True)
    t = torch.as_tensor(target_mass, dtype=p.dtype, device=p.device)
    if t.dim() > 0:
        t = t.unsqueeze(-1)
    c_img, c_oth = mass_factors(m, o, t)
    out = p * (imgf * c_img + (1 - imgf) * c_oth)
    return out.to(probs_row.dtype)


def shift_image_logits(probs_rows: torch.Tensor, image_mask: torch.Tensor, tau: float, strength: float = 1.0):
    """Lift each head's image mass toward τ on softmax rows [H, n, K].

    Heads with image mass m < τ get the logit shift ``strength·δ`` on every image key (δ from
    :func:`logit_bias_for_target`), applied post-softmax by :func:`rescale_image_probs`.

    Args:
        probs_rows: the softmax rows [H, n, K].
        image_mask: the image keys (bool, over the K keys).
        tau: the target image mass τ.
        strength: scales the shift δ (1: reach τ).

    Returns:
        ``(new_rows, mass, delta, target)``: the edited rows, the per-head mass before [H, n], the shift applied and
        the mass after.
    """
    mask = fit_mask(image_mask, probs_rows.shape[-1], probs_rows.device)
    mass = probs_rows.float()[..., mask].sum(-1)
    delta = logit_bias_for_target(mass, tau) * strength
    target = shifted_mass(mass, delta)
    return rescale_image_probs(probs_rows, mask, target), mass, delta, target


def shifted_mass(mass: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Image mass after adding ``delta`` to every image logit: ``m e^δ/(m e^δ + 1 − m)``.

    Computed as ``sigmoid(logit(m) + δ)`` in float64, which saturates at 0 and 1 instead of
    overflowing: ``e^δ`` is infinite past δ ≈ 709, and ∞/∞ would read as NaN. Returns float32.
    """
    m = mass.double().clamp(0.0, 1.0)
    return torch.sigmoid(torch.logit(m) + delta.double()).float()

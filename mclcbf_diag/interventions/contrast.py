"""The arithmetic of contrastive decoding: pure functions on next-token logits, no model.

Every function takes float logits ``[..., vocab]`` and returns scores of the same shape, from
which the answer is the argmax (the first token, greedily) or a sample:

* :func:`plausible`: the adaptive plausibility constraint shared by VCD, PAI and DoLa, the
  tokens whose probability is at least ``beta`` times the top one's (log p ≥ log β + max log p;
  on logits alike, as log p and the logits differ by one constant per row);
* :func:`cut`: scores with the implausible tokens at −inf (probability exactly 0);
* :func:`contrast`: (1 + α)·ℓ − α·ℓ', the contrast of a forward with an auxiliary one (VCD);
* :func:`guidance`: γ·log p + (1 − γ)·log p', classifier-free guidance (PAI's image-free contrast);
* :func:`js_divergence`: the Jensen–Shannon divergence of two next-token distributions (DoLa's
  choice of the premature layer);
* :func:`margin`: the Yes − No margin of scores, ±inf where the cutoff removed one of them.
"""

from __future__ import annotations

import math

import torch


def plausible(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Bool mask: the tokens whose probability is at least ``beta`` × the top token's (β = 0: every token)."""
    if beta <= 0:
        return torch.ones_like(logits, dtype=torch.bool)
    lg = logits.float()
    return lg >= math.log(beta) + lg.amax(-1, keepdim=True)


def cut(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``scores`` with every token outside ``keep`` at −inf."""
    return scores.float().masked_fill(~keep, -math.inf)


def contrast(logits: torch.Tensor, other: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 + α)·ℓ − α·ℓ': the forward's logits pushed away from the auxiliary forward's."""
    return (1 + alpha) * logits.float() - alpha * other.float()


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax in float32."""
    return torch.log_softmax(logits.float(), dim=-1)


def guidance(logits: torch.Tensor, other: torch.Tensor, gamma: float) -> torch.Tensor:
    """γ·log p + (1 − γ)·log p' = log p' + γ·(log p − log p'): guidance of the conditional (``logits``) over
    the unconditional (``other``) distribution; γ = 1 is the conditional alone."""
    lp, lq = log_probs(logits), log_probs(other)
    return lq + gamma * (lp - lq)


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """JSD(softmax a ‖ softmax b) per row (natural log), in float64: ½ KL(P‖M) + ½ KL(Q‖M), M = ½(P + Q)."""
    lp, lq = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    p, q = lp.exp(), lq.exp()
    lm = torch.log(0.5 * (p + q))
    kl_p = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1)
    kl_q = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_p + kl_q)


def margin(scores: torch.Tensor, yes_id: int, no_id: int) -> float:
    """score(Yes) − score(No) of one row [vocab]: ±inf when the cutoff removed one, NaN when it removed both.

    Args:
        scores: the row's scores [vocab].
        yes_id: the Yes token.
        no_id: the No token.

    Returns:
        The margin, computed in float64.
    """
    return float(scores[yes_id].double() - scores[no_id].double())

"""The information-flow map of one question: which edges carry the image to the answer, and where.

Following Zhang et al., "Cross-modal Information Flow in Multimodal Large Language Models"
(CVPR 2025): for each edge (image → question, image → last, question → last) and each window
of ``window`` consecutive layers, the edge's attention is blocked in that window
(:class:`~mclcbf_diag.interventions.block.AttentionBlock`) and the probability the model gives
its own answer token at the decision position is compared with the unblocked run:
``change = (p_blocked − p) / p``. A large drop means the information the answer needs
crosses that edge in those layers. For LLaVA-1.5 the paper reports that image information
first reaches the question tokens in lower layers, and the decision token mostly through
them (question → last in the middle layers), not directly from the image.
"""

from __future__ import annotations

import pandas as pd
import torch

from ..data import LLAVA_PROMPT
from ..engine.runner import Keep, forward, with_embeds
from ..interventions.block import AttentionBlock, BlockKnobs
from ..models import LoadedModel
from .trace import sample_inputs

EDGES = (("image", "question"), ("image", "last"), ("question", "last"))


def default_window(n_layers: int) -> int:
    """The paper's 9-of-32-layer window, mapped to the model's depth (at least 1)."""
    return max(1, round(9 * n_layers / 32))


def _answer_probability(lm: LoadedModel, logits: torch.Tensor, token: int) -> float:
    return float(torch.softmax(logits.float(), -1)[token])


def information_flow(lm: LoadedModel, question, image, *, window: int | None = None,
                     template: str = LLAVA_PROMPT) -> pd.DataFrame:
    """One row per (edge, window): the answer token's probability with that edge blocked there.

    Args:
        lm: the loaded model.
        question: a question (its ``text``) or a bare prompt text.
        image: the question's image (PIL).
        window: consecutive layers blocked at once; None: :func:`default_window` of the model's depth.
        template: the prompt template (``<image>`` and ``{question}``).

    Returns:
        One row per (edge, window): ``edge`` ("image→question" …), ``first_layer``, ``last_layer``, ``answer``
        (the unblocked answer token, ``"yes"`` or ``"no"``), ``p_base``, ``p_blocked``, ``change``
        (relative: ``(p_blocked − p_base) / p_base``).
    """
    text = getattr(question, "text", question)
    _, inputs = sample_inputs(lm, text, image, template)
    base = forward(lm, inputs, keep=Keep(embeds=True)).captures[0]
    inputs = with_embeds(inputs, base)
    logits = base.steps[0].final_logits
    token = lm.tokens.yes_id if logits[lm.tokens.yes_id] > logits[lm.tokens.no_id] else lm.tokens.no_id
    p_base = _answer_probability(lm, logits, token)
    k = window or default_window(lm.n_layers)
    rows = []
    for source, target in EDGES:
        for first in range(0, lm.n_layers - k + 1):
            layers = tuple(range(first, first + k))
            cap = forward(lm, inputs, AttentionBlock(BlockKnobs(source, target, layers))).captures[0]
            p = _answer_probability(lm, cap.steps[0].final_logits, token)
            rows.append({"edge": f"{source}→{target}", "first_layer": first, "last_layer": first + k - 1,
                         "answer": "yes" if token == lm.tokens.yes_id else "no", "p_base": p_base, "p_blocked": p,
                         "change": (p - p_base) / p_base if p_base > 0 else float("nan")})
    return pd.DataFrame(rows)


def flow_summary(flow: pd.DataFrame) -> list[str]:
    """Plain sentences: per edge, the window where blocking it changes the answer's probability most."""
    lines = []
    for edge, g in flow.groupby("edge", sort=False):
        top = g.loc[g.change.abs().idxmax()]
        verb = "lowers" if top.change < 0 else "raises"
        lines.append(f"{edge}: the largest effect is in layers {int(top.first_layer)}–{int(top.last_layer)}, where "
                     f"blocking it {verb} p({top.answer}) by {100 * abs(top.change):.1f}% (over all windows "
                     f"{100 * g.change.min():+.1f}% to {100 * g.change.max():+.1f}%).")
    return lines

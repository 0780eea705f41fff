"""What an intervention did to an answer: unchanged, fixed, broken, derailed or non_finite.

A Yes/No question is answered by the logits at the decision position (the last prompt
token). Reading the sign of ``logit(Yes) − logit(No)`` alone treats every output as an
answer; a run whose top token is "." or an object word has stopped answering, and a sign
change there is not a flip. So every reading carries, from the full-vocabulary logits:

* ``p_yes``, ``p_no``: the softmax probability mass on the Yes spellings and on the No
  spellings (every variant the tokenizer has, e.g. "▁Yes" and "Yes");
* ``top_yes_no``: whether the top token is one of those spellings;
* ``finite``: whether no logit is NaN or +inf (an overflow gives NaN/inf logits, whose
  margin means nothing); a token at −inf is one a decoding-level method ruled out (probability
  0), and the margin is then ±inf when exactly one of Yes and No was ruled out;
* ``margin`` and ``answer`` (``"yes"`` iff margin > 0, as POPE's first-token scoring).

A reading is *valid* (a Yes/No answer) when it is finite and its top token is a Yes/No
spelling. The outcome of one question under an intervention (:func:`outcome`):

* ``derailed``: the intervened reading is not valid while the baseline was (or it is
  non-finite, whatever the baseline);
* ``non_finite``: the logits are finite, but the intervention computed a non-finite edit
  somewhere and dropped it (an overflowing step is recorded, never applied: the records of
  :data:`DROPPED_EDIT_METRICS`), so what ran is not the configured intervention and an
  answer equal to the baseline's says nothing about it; never read as unchanged;
* with a label: ``fixed`` (wrong → right), ``broken`` (right → wrong), ``unchanged``;
* without a label: ``changed`` or ``unchanged`` (the answer's sign, nothing more).

When the baseline itself is not a Yes/No answer (rare greedily; common when answers are
sampled at a high temperature), it counts as wrong, as in the paired statistics: with a label
the question is ``fixed`` when the new answer is a valid right one and ``unchanged`` otherwise;
without a label the sign rule applies. Every function here is pure.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where logits are read: the outcome classes load without it
    import torch

OUTCOMES = ("unchanged", "fixed", "broken", "derailed", "non_finite")
UNLABELED_OUTCOMES = ("unchanged", "changed", "derailed", "non_finite")
# per-layer records an intervention writes (value > 0) when it computed a non-finite edit and did not
# apply it, or found the state it would edit already non-finite
DROPPED_EDIT_METRICS = ("step_nonfinite", "residual_nonfinite")


@dataclass(frozen=True)
class Reading:
    """The answer read from one run's logits at the decision position."""

    margin: float
    p_yes: float
    p_no: float
    top_yes_no: bool
    finite: bool
    top_id: int = -1

    @property
    def answer(self) -> str:
        return "yes" if self.margin > 0 else "no"

    @property
    def valid(self) -> bool:
        """A Yes/No answer: finite logits and a Yes/No spelling on top."""
        return self.finite and self.top_yes_no

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}margin": self.margin, f"{prefix}answer": self.answer, f"{prefix}p_yes": self.p_yes,
                f"{prefix}p_no": self.p_no, f"{prefix}top_yes_no": self.top_yes_no, f"{prefix}finite": self.finite,
                f"{prefix}valid": self.valid}


def answer_ids(tokens) -> tuple[list[int], list[int]]:
    """(Yes ids, No ids) of a tokenizer's AnswerTokens: the main ids and every variant."""
    yes = sorted({int(tokens.yes_id), *map(int, tokens.yes_variants.values())})
    no = sorted({int(tokens.no_id), *map(int, tokens.no_variants.values())})
    return yes, no


def read_logits(logits: torch.Tensor, yes_id: int, no_id: int, yes_ids, no_ids) -> Reading:
    """A :class:`Reading` of one row of full-vocabulary logits [vocab].

    Args:
        logits: [vocab] (any shape of ``vocab`` elements) the logits at the decision position.
        yes_id: the Yes token whose logit the margin reads.
        no_id: the No token whose logit the margin reads.
        yes_ids: every Yes spelling's id (the ``p_yes`` mass and the top-token check; :func:`answer_ids`).
        no_ids: every No spelling's id.

    Returns:
        The :class:`Reading`; a non-finite row reads NaN masses, ``valid`` False and a NaN margin unless
        the margin itself is finite.
    """
    return _read_rows(logits.detach().float().reshape(1, -1), yes_id, no_id, yes_ids, no_ids)[0]


def read_batch(logits, tokens) -> list[Reading]:
    """One :class:`Reading` per row of ``logits`` ([B, vocab], or a list of [vocab] rows; ids from ``lm.tokens``)."""
    import torch

    if isinstance(logits, (list, tuple)):
        if not logits:
            return []
        logits = torch.stack([x.detach().float().reshape(-1) for x in logits])
    yes, no = answer_ids(tokens)
    return _read_rows(logits.detach().float(), tokens.yes_id, tokens.no_id, yes, no)


def _read_rows(lg: torch.Tensor, yes_id: int, no_id: int, yes_ids, no_ids) -> list[Reading]:
    """Every row of float32 logits [B, vocab] at once: margins, Yes/No masses (softmax in float64), top ids."""
    import torch

    finite = (~(torch.isnan(lg) | (lg == math.inf)).any(-1) & torch.isfinite(lg).any(-1)).tolist()
    margin = (lg[:, yes_id] - lg[:, no_id]).tolist()
    p = torch.softmax(lg.double(), -1)
    p_yes, p_no = p[:, list(yes_ids)].sum(-1).tolist(), p[:, list(no_ids)].sum(-1).tolist()
    top = lg.argmax(-1).tolist()
    both = set(yes_ids) | set(no_ids)
    out = []
    for i, ok in enumerate(finite):
        if not ok:
            m = margin[i]
            out.append(Reading(m if math.isfinite(m) else math.nan, math.nan, math.nan, False, False, -1))
        else:
            out.append(Reading(margin[i], p_yes[i], p_no[i], top[i] in both, True, top[i]))
    return out


def dropped_edit(layer_metrics) -> bool:
    """Whether a run dropped a non-finite edit: any of :data:`DROPPED_EDIT_METRICS` > 0 in its per-layer
    records (an iterable of ``{metric: value}``, one per layer)."""
    return any((m.get(k) or 0) > 0 for m in layer_metrics for k in DROPPED_EDIT_METRICS)


def outcome(base_answer: str, base_valid: bool, new_answer: str, new_valid: bool, label: str | None = None,
            *, new_finite: bool = True, new_dropped: bool = False) -> str:
    """The outcome class of one question (see the module docstring).

    Args:
        base_answer: the baseline's answer (``"yes"`` or ``"no"``).
        base_valid: whether the baseline's reading is a Yes/No answer.
        new_answer: the intervened run's answer.
        new_valid: whether the intervened reading is a Yes/No answer.
        label: the ground truth (``"yes"`` or ``"no"``); anything else: unlabelled (changed/unchanged).
        new_finite: whether the intervened logits are finite (False: derailed).
        new_dropped: whether the intervened run dropped a non-finite edit (:func:`dropped_edit`).

    Returns:
        One of :data:`OUTCOMES` with a label, of :data:`UNLABELED_OUTCOMES` without.
    """
    if not new_finite or (base_valid and not new_valid):
        return "derailed"
    if new_dropped:
        return "non_finite"
    if label not in ("yes", "no"):
        return "changed" if new_answer != base_answer else "unchanged"
    if not base_valid:  # no Yes/No answer counts as wrong (the paired statistics read it so)
        return "fixed" if new_valid and new_answer == label else "unchanged"
    if base_answer == new_answer:
        return "unchanged"
    return "fixed" if new_answer == label else "broken"


def outcome_of(base: Reading, new: Reading, label: str | None = None, *, dropped: bool = False) -> str:
    """:func:`outcome` of two readings.

    Args:
        base: the baseline's reading.
        new: the intervened run's reading.
        label: the ground truth (``"yes"``, ``"no"`` or None).
        dropped: the new run dropped a non-finite edit (:func:`dropped_edit`).

    Returns:
        The outcome class (:func:`outcome`).
    """
    return outcome(base.answer, base.valid, new.answer, new.valid, label, new_finite=new.finite, new_dropped=dropped)


def counts(outcomes, labeled: bool = True) -> dict[str, int]:
    """Counts of every class (zeros included), in the canonical order."""
    c = Counter(outcomes)
    names = OUTCOMES if labeled else UNLABELED_OUTCOMES
    out = {k: int(c.get(k, 0)) for k in names}
    out.update({k: int(v) for k, v in c.items() if k not in out})
    return out


# what a verdict asks of a run, by the question the label sets for the baseline answer
GOALS = {"wrong": ("fixed",), "right": ("broken", "derailed"), "unlabeled": ("changed", "derailed")}


def kind(label: str | None, base_answer: str) -> str:
    """"wrong", "right" or "unlabeled": the question a label sets for the baseline answer."""
    return "unlabeled" if label not in ("yes", "no") else ("right" if base_answer == label else "wrong")


def question(label: str | None, base_answer: str) -> str:
    """What a verdict must answer for this question (the label decides it)."""
    if label not in ("yes", "no"):
        return "no label: did the answer change?"
    if base_answer == label:
        return "right answer: was it kept, broken or derailed, and how far is it from breaking?"
    return "wrong answer: why was it not fixed, and what would fix it?"


def is_right(label: str | None, answer: str) -> bool | None:
    return None if label not in ("yes", "no") else answer == label


__all__ = ["OUTCOMES", "UNLABELED_OUTCOMES", "DROPPED_EDIT_METRICS", "GOALS", "kind", "dropped_edit", "Reading",
           "answer_ids", "read_logits", "read_batch", "outcome", "outcome_of", "counts", "question", "is_right"]

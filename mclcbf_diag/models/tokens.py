"""Token ids and the prompt's layout: the image token, the answer tokens Yes/No, the sink, the image span.

The answer token is whatever the tokenizer produces right after ``ASSISTANT:`` for
" Yes" / " No": ``▁Yes`` (3869) and ``▁No`` (1939) for Llama-2's SentencePiece
vocabulary, ``Yes`` / ``No`` for the embedded model's word-level one. Other spellings
that exist in the vocabulary (``Yes`` 8241, ``No`` 3782, lower case, …) are reported as
variants so a logit lens can show them too.

Layout, as pure functions of ids and attention rows:

* :func:`find_sink`: the attention sink is the BOS token where the prompt starts with one;
  a prompt without a BOS (Qwen2 tokenizers: position 0 is ``USER``) gets the *measured sink*,
  the non-image key before the decision token with the largest attention from the decision
  token, averaged over the baseline's layers and heads.
* :func:`span_problem`: a configured image span (the seed's literal ``[1, 577)``) against the
  detected image tokens and the decision token; ``None`` when it only shows the seed's known
  4-token offset on llava-hf's layout (image at 5–580), else one line saying what it covers
  or misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError

_VARIANTS = {"yes": ("▁Yes", "Yes", "▁yes", "yes", "▁YES"), "no": ("▁No", "No", "▁no", "no", "▁NO")}


@dataclass(frozen=True)
class AnswerTokens:
    image_token_id: int
    yes_id: int
    no_id: int
    yes_variants: dict[str, int]
    no_variants: dict[str, int]
    bos_token_id: int | None = None  # the tokenizer's BOS (None: it has none); see find_sink


def _answer_id(tokenizer, word: str) -> int:
    prefix = tokenizer("ASSISTANT:", add_special_tokens=False).input_ids
    full = tokenizer(f"ASSISTANT: {word}", add_special_tokens=False).input_ids
    tail = full[len(prefix):] if full[: len(prefix)] == prefix else full[-1:]
    if not tail or tail[0] == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer has no token for the answer {word!r}; a POPE diagnosis "
                        "needs a Yes/No vocabulary (is this a LLaVA chat checkpoint?)")
    return tail[0]


def _variants(tokenizer, spellings) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    return {s: vocab[s] for s in spellings if s in vocab}


def answer_tokens(tokenizer, image_token_id: int | None, where: str) -> AnswerTokens:
    """The model's answer and image tokens, read from its tokenizer.

    Args:
        tokenizer: the checkpoint's tokenizer.
        image_token_id: the config's image token id.
        where: the model as the error names it.

    Returns:
        The :class:`AnswerTokens`: image token, Yes and No, their spelling variants, and the BOS (None: none).

    Raises:
        UserError: no image token in the vocabulary, or no token for the answer Yes or No.
    """
    vocab = tokenizer.get_vocab()
    if image_token_id is None or image_token_id not in vocab.values():
        raise UserError(f"model at {where} has no image token (config image_token_id="
                        f"{image_token_id}); pass a LLaVA-style checkpoint whose tokenizer has <image>")
    return AnswerTokens(
        image_token_id=int(image_token_id),
        yes_id=_answer_id(tokenizer, "Yes"), no_id=_answer_id(tokenizer, "No"),
        yes_variants=_variants(tokenizer, _VARIANTS["yes"]),
        no_variants=_variants(tokenizer, _VARIANTS["no"]),
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Positions of image tokens in one prompt (``input_ids`` of shape [seq] or [1, seq])."""
    ids = input_ids.reshape(-1)
    pos = torch.nonzero(ids == image_token_id).flatten()
    if pos.numel() == 0:
        raise UserError(f"no image token (id {image_token_id}) in the prompt: the prompt must "
                        "contain <image> so the processor can expand it")
    return pos


# ----------------------------------------------------------------------------- the sink
@dataclass(frozen=True)
class Sink:
    """Where the prompt's attention sink is, and how it was found."""

    position: int
    kind: str  # "BOS": the prompt's first token is the tokenizer's BOS | "measured sink": see find_sink

    def __str__(self) -> str:
        return f"{self.kind} (position {self.position})"


def find_sink(input_ids: torch.Tensor, bos_token_id: int | None, decision_rows: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> Sink:
    """The attention sink of one prompt.

    Position 0 when it holds the BOS token. Otherwise the measured sink: the key with the largest mean attention in
    ``decision_rows`` among those that are not image tokens and come before the decision token (the last position);
    ties go to the earliest.

    Args:
        input_ids: the prompt [seq] or [1, seq], no padding.
        bos_token_id: the tokenizer's BOS id (None: none).
        decision_rows: [..., seq] the decision token's softmax rows in the baseline, any leading dimensions such as
            layers × heads.
        image_mask: [seq] the image tokens, never the sink.

    Returns:
        The :class:`Sink` (position, ``"BOS"`` or ``"measured sink"``).

    Raises:
        ValueError: no BOS and no rows (such a sink can only be measured), or every earlier position is an image
            token.
    """
    ids = input_ids.reshape(-1)
    if bos_token_id is not None and len(ids) and int(ids[0]) == int(bos_token_id):
        return Sink(0, "BOS")
    if decision_rows is None:
        raise ValueError("the prompt has no BOS: pass the decision token's baseline attention rows to measure the sink")
    mean = decision_rows.reshape(-1, decision_rows.shape[-1]).float().mean(0)[: len(ids)]
    allowed = torch.ones(len(ids), dtype=torch.bool, device=mean.device)
    allowed[-1] = False  # the decision token itself
    if image_mask is not None:
        allowed &= ~image_mask.reshape(-1)[: len(ids)].to(mean.device, torch.bool)
    if not bool(allowed.any()):
        raise ValueError("no key is left to be the sink: every earlier position is an image token")
    mean = mean.masked_fill(~allowed, -1.0)
    return Sink(int(torch.argmax(mean)), "measured sink")  # argmax returns the first of equal maxima


# ----------------------------------------------------------------------------- the span check
SEED_OFFSET = 4
"""The seed's literal span ``[1, 577)`` against llava-hf's image at 5–580: 4 prefix tokens covered, 4 image tokens
missed. A configured span that deviates from the detected image by at most this many tokens each way is the
seed-faithful preset's known (documented) deviation, not a problem :func:`span_problem` reports."""


def ranges_text(positions: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1–3, 7"`` (layers or positions in a sentence; "" when empty)."""
    out, run = [], []
    for p in sorted(positions):
        if run and p != run[-1] + 1:
            out.append(run)
            run = []
        run.append(p)
    if run:
        out.append(run)
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in out)


def span_problem(span: tuple[int, int], image_positions: Sequence[int] | torch.Tensor, decision: int, *,
                 known_offset: int = SEED_OFFSET) -> str | None:
    """What a configured image span ``[a, b)`` gets wrong against the detected image tokens, in one line, or None.

    Problems, the worst first: the span covers the decision token (or tokens after it); it covers more than
    ``known_offset`` non-image tokens; it misses more than ``known_offset`` image tokens. The seed's ``[1, 577)`` on
    llava-hf's layout (image 5–580) covers 4 and misses 4: the known offset, so None.

    Args:
        span: the configured span ``(a, b)``, positions ``a … b − 1``.
        image_positions: the positions of the detected image tokens.
        decision: the decision token's position (the last prompt token's).
        known_offset: the non-image tokens covered, or image tokens missed, tolerated (the seed's offset).

    Returns:
        The problem and its fix in one line, or None.
    """
    a, b = int(span[0]), int(span[1])
    image = sorted({int(p) for p in (image_positions.tolist() if isinstance(image_positions, torch.Tensor)
                                     else image_positions)})
    where = f"the configured image span [{a}, {b})"
    detected = f"the detected image tokens are {ranges_text(image)}" if image else "no image token was detected"
    fix = "use the detected span (span=detected) or set fixed_span to the detected tokens"
    covered = range(a, min(b, decision + 1))
    image_set = set(image)
    extra = [p for p in covered if p not in image_set]
    missed = [p for p in image if not a <= p < b]
    if a <= decision < b:
        text = [p for p in extra if p != decision]
        return (f"{where} covers the decision token (position {decision})"
                + (f" and {len(text)} other non-image tokens ({ranges_text(text)})" if text else "")
                + f"; {detected}: {fix}")
    if len(extra) > known_offset:
        return (f"{where} covers {len(extra)} non-image tokens ({ranges_text(extra)}), more than the seed's known "
                f"{known_offset}-token offset; {detected}: {fix}")
    if len(missed) > known_offset:
        return (f"{where} misses {len(missed)} of the {len(image)} image tokens ({ranges_text(missed)}), more than the "
                f"seed's known {known_offset}-token offset; {detected}: {fix}")
    return None

"""Token ids the diagnostics need: the image token and the answer tokens Yes/No.

The answer token is whatever the tokenizer produces right after ``ASSISTANT:`` for
" Yes" / " No": ``▁Yes`` (3869) and ``▁No`` (1939) for Llama-2's SentencePiece
vocabulary, ``Yes`` / ``No`` for the embedded model's word-level one. Other spellings
that exist in the vocabulary (``Yes`` 8241, ``No`` 3782, lower case, …) are reported as
variants so a logit lens can show them too.
"""

from __future__ import annotations

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
    vocab = tokenizer.get_vocab()
    if image_token_id is None or image_token_id not in vocab.values():
        raise UserError(f"model at {where} has no image token (config image_token_id="
                        f"{image_token_id}); pass a LLaVA-style checkpoint whose tokenizer has <image>")
    return AnswerTokens(
        image_token_id=int(image_token_id),
        yes_id=_answer_id(tokenizer, "Yes"), no_id=_answer_id(tokenizer, "No"),
        yes_variants=_variants(tokenizer, _VARIANTS["yes"]),
        no_variants=_variants(tokenizer, _VARIANTS["no"]),
    )


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Positions of image tokens in one prompt (``input_ids`` of shape [seq] or [1, seq])."""
    ids = input_ids.reshape(-1)
    pos = torch.nonzero(ids == image_token_id).flatten()
    if pos.numel() == 0:
        raise UserError(f"no image token (id {image_token_id}) in the prompt: the prompt must "
                        "contain <image> so the processor can expand it")
    return pos

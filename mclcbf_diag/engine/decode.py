"""Generated text under a decoding-level method: a bounded loop of :func:`~.runner.forward` steps.

A decoding-level method (VCD, DoLa, CausalMM, PAI's contrast, VISTA's self-logits) changes the
distribution each token is drawn from, not only the first answer token's. transformers'
``generate`` cannot call it between steps, so :func:`generate` runs the loop itself:

1. **Prompt.** The runner's forward of the prompt under the intervention gives the first token's
   scores (the ``logits`` site's combined distribution, any activation edit included). Where the
   intervention cannot change the positions before its first edited one
   (:func:`~.batch.cached_prefix`: the decision token for a method that acts on the distribution
   alone), those come from a plain forward's KV cache, and the intervened forward is a
   :class:`~.runner.Continuation` over the rest, appending its own keys and values to that cache.
2. **Steps.** The chosen token is appended to every row and the next forward is a continuation of
   that one position over the cache (the runner's forward with ``use_cache=True``, so the cache
   grows by the position the intervened forward computed, as in ``generate``). The method's
   auxiliary forwards (the noised image, the image-free prompt …) are prepared again for the
   longer sequence: they are plain forwards of their own views of the whole sequence so far (not
   cached between steps; they cost one forward of the view per step). Where the intervention
   could change a position before an image token (``cached_prefix`` is 0) every step re-runs the
   whole sequence instead.
3. **Choice.** Greedy: the argmax of the scores. Sampled (:class:`~mclcbf_diag.measurements.sampling.Decoding`):
   temperature, top-k, top-p in transformers' order, then an inverse-CDF draw whose u comes from the
   run's seed and the question's key (step 0: the key itself, so the first token is the one a
   sampled first-token answer draws; step k: ``key#k``), the same in any batch. A token the method
   ruled out (−inf) is never chosen.
4. **End.** A row that chose the end-of-sequence token is finished: it is fed the pad token from
   then on (attention mask 1, as ``generate`` does) and its later steps are not read. The loop
   stops when every row is finished or after ``max_new_tokens`` steps.

Each step keeps every row's records of the ``logits`` site (its ``decoding_*`` terms, layer −1), so a
generated answer's contrast can be read token by token. With ``keep=Keep()`` (every layer) each step's forward
also keeps its captures of the last position, as a traced ``generate`` keeps them: step 0 is the prompt's
forward (phase ``prefill``), step k the one reading the k-th generated token (phase ``decode``, ``decode_step``
k); :meth:`Generation.captures` gives each row's :class:`~.runner.RunCapture` over its own steps (up to the one
that chose its end token), what ``trace --max-new-tokens`` measures under a decoding-level method. A beam search is
OPERA's own (:mod:`mclcbf_diag.interventions.opera_beam`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..interventions import as_intervention
from ..interventions.base import rows_of
from ..models import LoadedModel
from ..models.mrope import position_ids
from .runner import Continuation, Keep, RunCapture, RunResult, StepCapture, forward

# keys of model inputs that run along the sequence ([B, S]) and grow with it
GROWING = ("input_ids", "attention_mask", "token_type_ids")
NO_LAYERS = Keep(layers=False)  # a step keeps its scores and records only


@dataclass
class Generation:
    """What :func:`generate` gives back for a batch."""

    sequences: torch.Tensor  # [B, prompt + steps]: the prompt, then each row's tokens (pad after its end)
    first_scores: torch.Tensor  # [B, vocab] float32: the scores the first token was chosen from
    # per step: {"records": per row {layer: {metric}}, "scores"?, "captures"?: per row RunCapture (Keep.layers)}
    steps: list[dict] = field(default_factory=list)
    ends: list[int | None] = field(default_factory=list)  # per row: the step that chose its end token (None: none)

    @property
    def new_tokens(self) -> int:
        return len(self.steps)

    def captures(self) -> list[RunCapture]:
        """Per row, its run over every step it generated at (``generate(..., keep=Keep())``): the prompt's
        forward (``prefill``, step 0), then one ``decode`` step per generated token it read, up to the step that
        chose its end token; ``generated`` is the row's own sequence (no left padding), prompt first."""
        if not self.steps or "captures" not in self.steps[0]:
            raise ValueError("captures need generate(..., keep=Keep())")  # programming error
        out = []
        for b, first in enumerate(self.steps[0]["captures"]):
            last = len(self.steps) - 1 if self.ends[b] is None else self.ends[b]
            pad = self.sequences.shape[1] - len(self.steps) - first.prompt_len  # the row's left padding
            end = pad + first.prompt_len + last + 1  # the prompt and the tokens its steps chose
            out.append(RunCapture(first.prompt_len, [s["captures"][b].steps[0] for s in self.steps[:last + 1]],
                                  first.detected, first.row_records, self.sequences[b:b + 1, pad:end], None))
        return out


def cached_prefix(lm: LoadedModel, ids: torch.Tensor, attention_mask: torch.Tensor, intervention) -> int:
    """Padded positions ``[0, start)`` that the intervention cannot change (0: re-run the prompt).

    Args:
        lm: the loaded model.
        ids: the batch's input ids [B, S], left-padded.
        attention_mask: its attention mask [B, S].
        intervention: the intervention; its ``first_edited(row)`` gives each row's first changed position (None: it
            may change any).

    Returns:
        The earliest first edited position over the rows (padding included), or 0 when a row's is unknown or an image
        token lies at or after it.
    """
    rows = rows_of(ids, attention_mask, lm.tokens.image_token_id)
    firsts = [intervention.first_edited(row) for row in rows]
    if any(f is None for f in firsts):
        return 0
    start = min(row.pad + f for row, f in zip(rows, firsts))
    return 0 if bool((ids[:, start:] == lm.tokens.image_token_id).any()) else start


def end_ids(lm: LoadedModel) -> set[int]:
    """The end-of-sequence token ids of the model's generation config (or its tokenizer's)."""
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = lm.processor.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def choose(scores: torch.Tensor, decoding=None, keys=None, step: int = 0) -> torch.Tensor:
    """The next token of every row [B] from its scores [B, vocab]: the argmax, or a seeded draw.

    Args:
        scores: [B, vocab] the method's scores (−inf: ruled out).
        decoding: a :class:`~mclcbf_diag.measurements.sampling.Decoding`; None or not sampled: greedy.
        keys: per row, the question's key (the draw's u; required when sampling).
        step: the step (0: the first token, drawn as a sampled first-token answer draws it).
    """
    if decoding is None or not decoding.sampled:
        return scores.float().argmax(-1)
    from ..measurements.sampling import sample_token

    return torch.tensor([sample_token(row, decoding, str(key) if step == 0 else f"{key}#{step}")
                         for row, key in zip(scores, keys)], dtype=torch.long)


def extended(lm: LoadedModel, inputs: dict, tokens: torch.Tensor) -> dict:
    """``inputs`` with one more position per row: ``tokens`` [B] (mask 1, the family's positions recomputed).

    Args:
        lm: the loaded model (its positions, :func:`~mclcbf_diag.models.mrope.position_ids`).
        inputs: the batch's model inputs.
        tokens: [B] the token appended to each row (a text token).

    Returns:
        The model inputs one position longer.
    """
    out = dict(inputs)
    ids = inputs["input_ids"]
    out["input_ids"] = torch.cat([ids, tokens.to(ids.device, ids.dtype)[:, None]], -1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"].new_ones(len(ids), 1)], -1)
    if "token_type_ids" in inputs:  # Gemma 3: a generated token is text
        out["token_type_ids"] = torch.cat([inputs["token_type_ids"], inputs["token_type_ids"].new_zeros(len(ids), 1)],
                                          -1)
    if "position_ids" in inputs:
        out["position_ids"] = position_ids(lm, out)
    return out


def _step(lm: LoadedModel, full: dict, iv, start: int, cache, keep: Keep = NO_LAYERS,
          dose: float = 1.0) -> RunResult:
    """One intervened forward of ``full``'s positions from ``start`` on over ``cache`` (which it extends); ``start``
    0 and no cache: the whole sequence. Its :class:`~.runner.RunResult` (captures with ``keep.layers``)."""
    ids, mask = full["input_ids"], full["attention_mask"]
    if iv is not None:
        iv.prepare(lm, full, rows_of(ids, mask, lm.tokens.image_token_id))
    if cache is None:
        return forward(lm, full, iv, keep=keep, prepare=False, dose=dose)
    layers = iv.layers(lm.n_layers) if iv is not None else ()
    prefix_keys = {i: cache.layers[i].keys[..., :start, :] for i in layers}
    suffix = {"input_ids": ids[:, start:], "attention_mask": mask}
    if "position_ids" in full:
        suffix["position_ids"] = full["position_ids"][..., start:]  # [B, S] or Qwen-VL's [3, B, S]
    if "token_type_ids" in full:
        suffix["token_type_ids"] = full["token_type_ids"][:, start:]
    return forward(lm, suffix, iv, keep=keep, full_ids=ids, prepare=False, dose=dose,
                   continuation=Continuation(start=start, prefix_keys=prefix_keys), use_cache=True,
                   **lm.adapter.cache_kwargs(lm.model, cache))


def _prompt_cache(lm: LoadedModel, inputs: dict, start: int):
    """A plain forward's KV cache of the prompt's first ``start`` positions (None when ``start`` is 0)."""
    if start == 0:
        return None
    with torch.no_grad():
        out = lm.model(**inputs, logits_to_keep=1, use_cache=True)
    cache = lm.adapter.output_cache(lm.model, out)
    cache.crop(start - inputs["input_ids"].shape[1])  # a negative count: the positions removed
    return cache


def generate(lm: LoadedModel, inputs: dict, intervention=None, *, max_new_tokens: int, decoding=None, keys=None,
             steer: bool = True, keep_scores: bool = False, keep: Keep = NO_LAYERS, dose: float = 1.0) -> Generation:
    """Up to ``max_new_tokens`` tokens per row, each chosen from the intervention's combined scores.

    Args:
        lm: the loaded model.
        inputs: a left-padded batch (:func:`~.batch.batch_inputs`; shared image features or pixels).
        intervention: what acts on every step (None, or ``steer=False``: the model's own distribution).
        max_new_tokens: the bound on the loop (≥ 1).
        decoding: greedy (None) or sampled (:class:`~mclcbf_diag.measurements.sampling.Decoding`); not beam.
        keys: per row, the question's key for a sampled draw.
        steer: False: the baseline, nothing changed.
        keep_scores: keep every step's scores [B, vocab] in ``steps[k]["scores"]``.
        keep: what each step's forward keeps besides its scores and records (``Keep()``: every layer's captures,
            ``steps[k]["captures"]``, read with :meth:`Generation.captures`).
        dose: multiplies what the intervention changes at every step.

    Returns:
        A :class:`Generation`.
    """
    if max_new_tokens < 1:
        raise ValueError("generate needs max_new_tokens >= 1")  # programming error
    if decoding is not None and decoding.strategy == "beam":
        raise ValueError("a beam search is OPERA's (interventions.opera_beam)")  # programming error
    if decoding is not None and decoding.sampled and keys is None:
        raise ValueError("a sampled generation needs each row's key")  # programming error
    iv = as_intervention(intervention) if steer else None
    ids = inputs["input_ids"]
    B, S = ids.shape
    start = S - 1 if iv is None else cached_prefix(lm, ids, inputs["attention_mask"], iv)
    ends, pad = end_ids(lm), lm.processor.tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(ends), 0)
    done, ended = torch.zeros(B, dtype=torch.bool), [None] * B
    full, steps, first = inputs, [], None
    with torch.no_grad():
        cache = _prompt_cache(lm, inputs, start)
        for k in range(max_new_tokens):
            res = _step(lm, full, iv, start, cache, keep, dose)
            scores = res.logits.float().cpu()
            step = {"records": res.records}
            if keep_scores:
                step["scores"] = scores
            if keep.layers:
                for cap in res.captures:
                    for s in cap.steps:
                        label_step(s, k)
                step["captures"] = res.captures
            steps.append(step)
            first = scores if first is None else first
            token = choose(scores, decoding, keys, k)
            token = torch.where(done, torch.full_like(token, pad), token)
            hit = [t in ends for t in token.tolist()]  # a finished row, fed pad (maybe an end id), keeps its ended
            ended = [k if h and e is None else e for h, e in zip(hit, ended)]
            done |= torch.tensor(hit, dtype=torch.bool)
            full = extended(lm, full, token)
            start = full["input_ids"].shape[1] - 1 if cache is not None else 0
            if bool(done.all()):
                break
    return Generation(full["input_ids"], first, steps, ended)


def label_step(step: StepCapture, k: int) -> None:
    """Label a captured step as a traced ``generate`` labels its steps: step 0 ``prefill``, step k ``decode`` k."""
    step.phase, step.decode_step = ("prefill", 0) if k == 0 else ("decode", k)

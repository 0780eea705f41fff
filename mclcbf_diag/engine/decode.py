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
   grows by the position the intervened forward computed, as in ``generate``). An intervention prepared
   once from the prompt whose edit of a position reads only that position
   (:meth:`~mclcbf_diag.interventions.base.Intervention.prepares_from_prompt`: VISTA, whose steering vector
   is the prompt's and is added at every position, as its released code generates) edits every position,
   so its prompt's intervened forward runs whole, once, keeping its own KV cache (no plain prefix), and each
   step continues that cache by one position: a position's edited keys and values never change as the
   sequence grows, so this is what re-running the whole sequence under the same preparation gives. Any
   other intervention that could change a position before an image token (``cached_prefix`` is 0) re-runs
   the whole sequence at every step, prepared again for it.
3. **Auxiliary views.** The method's auxiliary forwards are plain forwards of other inputs of the same
   rows (:meth:`~mclcbf_diag.interventions.base.Intervention.decode_views`): VCD's noised image, CausalMM's
   counterfactual image features (its vision level), PAI's image-free prompt (VISTA runs none after the
   prompt: its vector's two forwards are the prompt's, step 0's ``prepare``). The generated tokens are the same text in
   every view, so each view continues a KV cache of its own as the main rows do
   (:class:`ViewStream`): its prompt runs once, then one position per step, and its output at the last
   position is handed to the method (``use_decode_views``) instead of its ``prepare`` re-running the view
   over the whole sequence. A view's cache is its own, not the main rows': its prompt differs from the
   question's before the decision token (another image, no image). Where the views cannot be continued
   (``decode_views`` None) the method's ``prepare`` re-runs them over the whole sequence at every step,
   one forward of each view per step: CausalMM's language level and ``both`` (the counterfactual
   attention edits every query of every layer and runs without a cache by design), HALC (its crops are
   HALC's for the first token only; ``--generate`` under it is refused) and OPERA (its beam search is
   :mod:`mclcbf_diag.interventions.opera_beam`), and every activation edit that prepares something
   (its ``prepare`` is run on the longer sequence). ``cache_views=False`` takes that route for every
   method with views (the tests' reference; VISTA is prepared on the prompt alone either way). Both routes
   give the same scores within the floor of two float32 routes to a view's logits
   (``tests/test_engine_decode_views.py``).
4. **Choice.** Greedy: the argmax of the scores. Sampled (:class:`~mclcbf_diag.measurements.sampling.Decoding`):
   temperature, top-k, top-p in transformers' order, then an inverse-CDF draw whose u comes from the
   run's seed and the question's key (step 0: the key itself, so the first token is the one a
   sampled first-token answer draws; step k: ``key#k``), the same in any batch. A token the method
   ruled out (−inf) is never chosen.
5. **End.** A row that chose the end-of-sequence token is finished: it is fed the pad token from
   then on (attention mask 1, as ``generate`` does) and its later steps are not read. The loop
   stops when every row is finished or after ``max_new_tokens`` steps.

Each step keeps every row's records of the ``logits`` site (its ``decoding_*`` terms, layer −1), so a
generated answer's contrast can be read token by token. With ``keep=Keep()`` (every layer) each step's forward
also keeps its captures of the last position, as a traced ``generate`` keeps them: step 0 is the prompt's
forward (phase ``prefill``), step k the one reading the k-th generated token (phase ``decode``, ``decode_step``
k); :meth:`Generation.captures` gives each row's :class:`~.runner.RunCapture` over its own steps (up to the one
that chose its end token), what ``trace --max-new-tokens`` measures under a decoding-level method. A continued view
that ``trace`` measures (``View.probed``: VCD's, CausalMM's vision level's) then runs through the runner's traced
forward, and its captures (``steps[k]["views"]``) are the step's ``view:NAME`` records: the view runs once per
step, its logits the ones the step combined. A beam search is OPERA's own
(:mod:`mclcbf_diag.interventions.opera_beam`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..interventions import as_intervention
from ..interventions.base import View, ViewOutput, auxiliary_forward, rows_of
from ..models import LoadedModel
from ..models.adapter import sequence_inputs
from ..models.mrope import position_ids
from .runner import Continuation, Keep, RunCapture, RunResult, StepCapture, forward

NO_LAYERS = Keep(layers=False)  # a step keeps its scores and records only


@dataclass
class Generation:
    """What :func:`generate` gives back for a batch."""

    sequences: torch.Tensor  # [B, prompt + steps]: the prompt, then each row's tokens (pad after its end)
    first_scores: torch.Tensor  # [B, vocab] float32: the scores the first token was chosen from
    # per step: {"records": per row {layer: {metric}}, "scores"?, "captures"?: per row RunCapture (Keep.layers),
    # "views"?: {name: per row RunCapture} of the views trace measures (Keep.layers, views continued by their caches)}
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
    out.update(sequence_inputs(inputs, extend=1))  # Gemma 3's token types: a generated token is text
    if "position_ids" in inputs:
        out["position_ids"] = position_ids(lm, out)
    return out


def suffix_inputs(full: dict, start: int) -> dict:
    """The model inputs of ``full``'s positions from ``start`` on, over a cache of the earlier ones (the whole mask)."""
    suffix = {"input_ids": full["input_ids"][:, start:], "attention_mask": full["attention_mask"]}
    if "position_ids" in full:
        suffix["position_ids"] = full["position_ids"][..., start:]  # [B, S] or Qwen-VL's [3, B, S]
    return {**suffix, **sequence_inputs(full, start=start)}


def _step(lm: LoadedModel, full: dict, iv, start: int, cache, keep: Keep = NO_LAYERS,
          dose: float = 1.0, prepare: bool = True) -> RunResult:
    """One intervened forward of ``full``'s positions from ``start`` on over ``cache`` (which it extends); ``start``
    0 and no cache: the whole sequence; ``start`` 0 and an empty cache: the whole sequence, kept in it. ``prepare``:
    run the intervention's ``prepare`` on ``full`` first (False: its views were continued and handed to it,
    :class:`ViewStream`, or it was prepared on the prompt for every step). Its :class:`~.runner.RunResult` (captures
    with ``keep.layers``)."""
    ids = full["input_ids"]
    if iv is not None and prepare:
        iv.prepare(lm, full, rows_of(ids, full["attention_mask"], lm.tokens.image_token_id))
    if cache is None:
        return forward(lm, full, iv, keep=keep, prepare=False, dose=dose)
    if start == 0:  # the whole sequence, filling ``cache`` (an empty one) for the steps that continue it
        return forward(lm, full, iv, keep=keep, prepare=False, dose=dose, use_cache=True,
                       **lm.adapter.cache_kwargs(lm.model, cache))
    layers = iv.layers(lm.n_layers) if iv is not None else ()
    prefix_keys = {i: cache.layers[i].keys[..., :start, :] for i in layers}
    return forward(lm, suffix_inputs(full, start), iv, keep=keep, full_ids=ids, prepare=False, dose=dose,
                   continuation=Continuation(start=start, prefix_keys=prefix_keys), use_cache=True,
                   **lm.adapter.cache_kwargs(lm.model, cache))


class ViewStream:
    """One auxiliary view of the intervention (:meth:`~mclcbf_diag.interventions.base.Intervention.decode_views`)
    continued by a KV cache of its own: the first :meth:`run` is the forward of the view's prompt, each later one the
    forward of the one position :meth:`extend` appended (the token the loop chose), as the main rows continue theirs.

    A view ``trace`` measures (``View.probed``) runs through the runner's traced forward where the loop keeps every
    layer (its captures are the step's ``view:NAME`` records); otherwise through the model itself.
    """

    def __init__(self, view: View):
        self.view, self.inputs, self.cache = view, view.inputs, None

    def run(self, lm: LoadedModel, keep: Keep) -> tuple[ViewOutput, list[RunCapture] | None]:
        """The view's output at its last position, and its captures where traced (None otherwise)."""
        if keep.layers and self.view.probed and not self.view.states:
            return self._traced(lm, keep)
        if self.cache is None:  # the prompt; with its embeddings, the image features merged already (CausalMM's)
            feed, kwargs = {k: v for k, v in self.inputs.items()
                            if k != "input_ids" or "inputs_embeds" not in self.inputs}, {}
        else:
            feed = suffix_inputs(self.inputs, self.inputs["input_ids"].shape[1] - 1)
            kwargs = lm.adapter.cache_kwargs(lm.model, self.cache)
        with torch.no_grad():
            out = lm.model(**feed, **kwargs, use_cache=True, logits_to_keep=1,
                           output_hidden_states=self.view.states)
        self.cache = lm.adapter.output_cache(lm.model, out)
        states = None
        if self.view.states:
            states = torch.stack([out.hidden_states[i][:, -1].float() for i in range(lm.n_layers)], dim=1)
        return ViewOutput(out.logits[:, -1].float(), states), None

    def _traced(self, lm: LoadedModel, keep: Keep) -> tuple[ViewOutput, list[RunCapture]]:
        """:meth:`run` through the runner's forward, every layer captured."""
        if self.cache is None:
            self.cache = _own_cache(lm)
            res = forward(lm, self.inputs, keep=keep, use_cache=True, **lm.adapter.cache_kwargs(lm.model, self.cache))
        else:
            ids = self.inputs["input_ids"]
            start = ids.shape[1] - 1
            res = forward(lm, suffix_inputs(self.inputs, start), keep=keep, full_ids=ids,
                          continuation=Continuation(start=start, prefix_keys={}), use_cache=True,
                          **lm.adapter.cache_kwargs(lm.model, self.cache))
        return ViewOutput(res.logits.float()), res.captures

    def extend(self, lm: LoadedModel, tokens: torch.Tensor) -> None:
        """Append ``tokens`` [B] (the loop's choice) to the view's sequence: its next :meth:`run` reads them."""
        self.inputs = extended(lm, self.inputs, tokens)


def view_streams(lm: LoadedModel, iv, inputs: dict) -> dict[str, ViewStream] | None:
    """The intervention's auxiliary views of the prompt ``inputs``, each to be continued by its own cache (name →
    :class:`ViewStream`; {} when it runs none); None when they cannot be (its ``prepare`` runs at every step)."""
    if iv is None:
        return None
    views = iv.decode_views(lm, inputs, rows_of(inputs["input_ids"], inputs["attention_mask"],
                                                lm.tokens.image_token_id))
    return None if views is None else {name: ViewStream(view) for name, view in views.items()}


def run_views(lm: LoadedModel, iv, full: dict, streams: dict[str, ViewStream], keep: Keep) -> dict:
    """One step of every view stream, handed to the intervention (``use_decode_views``) for the sequence ``full``
    holds; returns the traced views' captures by name (per row :class:`~.runner.RunCapture`)."""
    outputs, captures = {}, {}
    for name, stream in streams.items():
        with auxiliary_forward():  # a view's forward, not the question's own (pope's records skip it)
            outputs[name], caps = stream.run(lm, keep)
        if caps is not None:
            captures[name] = caps
    iv.use_decode_views(lm, rows_of(full["input_ids"], full["attention_mask"], lm.tokens.image_token_id), outputs)
    return captures


def _own_cache(lm: LoadedModel):
    """An empty KV cache for a prompt's forward to fill, which the steps continue (a traced view's, or the intervened
    forward's of an intervention that :meth:`prepares_from_prompt
    <mclcbf_diag.interventions.base.Intervention.prepares_from_prompt>`)."""
    from transformers import DynamicCache

    return DynamicCache(config=lm.model.config)


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
             steer: bool = True, keep_scores: bool = False, keep: Keep = NO_LAYERS, dose: float = 1.0,
             cache_views: bool = True) -> Generation:
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
        cache_views: continue each auxiliary view by its own KV cache where the intervention allows it
            (:func:`view_streams`); False: its ``prepare`` re-runs every view over the whole sequence at every step
            (the reference route of the tests). An intervention prepared from the prompt alone
            (``prepares_from_prompt``) runs no view after it either way.

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
    once = iv is not None and iv.prepares_from_prompt()  # prepared on the prompt, its own cache continued
    start = S - 1 if iv is None else 0 if once else cached_prefix(lm, ids, inputs["attention_mask"], iv)
    ends, pad = end_ids(lm), lm.processor.tokenizer.pad_token_id
    pad = pad if pad is not None else next(iter(ends), 0)
    done, ended = torch.zeros(B, dtype=torch.bool), [None] * B
    full, steps, first = inputs, [], None
    with torch.no_grad():
        streams = view_streams(lm, iv, inputs) if cache_views and not once else None
        cache = _own_cache(lm) if once else _prompt_cache(lm, inputs, start)
        for k in range(max_new_tokens):
            views = run_views(lm, iv, full, streams, keep) if streams is not None else None
            res = _step(lm, full, iv, start, cache, keep, dose, prepare=k == 0 if once else streams is None)
            scores = res.logits.float().cpu()
            steps.append(_kept(res, scores, k, keep_scores, keep, views))
            first = scores if first is None else first
            token = choose(scores, decoding, keys, k)
            token = torch.where(done, torch.full_like(token, pad), token)
            hit = [t in ends for t in token.tolist()]  # a finished row, fed pad (maybe an end id), keeps its ended
            ended = [k if h and e is None else e for h, e in zip(hit, ended)]
            done |= torch.tensor(hit, dtype=torch.bool)
            full = extended(lm, full, token)
            for stream in (streams or {}).values():
                stream.extend(lm, token)
            start = full["input_ids"].shape[1] - 1 if cache is not None else 0
            if bool(done.all()):
                break
    return Generation(full["input_ids"], first, steps, ended)


def _kept(res: RunResult, scores: torch.Tensor, k: int, keep_scores: bool, keep: Keep, views: dict | None) -> dict:
    """What :class:`Generation` keeps of step ``k``: its records, its scores with ``keep_scores``, its captures (every
    layer, labelled as a traced ``generate`` labels them) and, with ``keep.layers``, its traced views' captures (None:
    the views were not continued, ``prepare`` re-ran them; no ``"views"`` then)."""
    step = {"records": res.records}
    if keep_scores:
        step["scores"] = scores
    if keep.layers:
        for cap in [*res.captures, *(c for caps in (views or {}).values() for c in caps)]:
            for s in cap.steps:
                label_step(s, k)
        step["captures"] = res.captures
        if views is not None:
            step["views"] = views
    return step


def label_step(step: StepCapture, k: int) -> None:
    """Label a captured step as a traced ``generate`` labels its steps: step 0 ``prefill``, step k ``decode`` k."""
    step.phase, step.decode_step = ("prefill", 0) if k == 0 else ("decode", k)

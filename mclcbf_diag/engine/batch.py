"""Batched POPE answers: one forward per condition for a whole batch, steered row by row.

Mechanism
---------
* **Left padding.** The prompts of a batch are tokenised together with padding on the
  left, so the decision token (the last prompt token) is the last position of every row
  and the first-token logits of all rows are ``logits[:, -1]``.
* **Positions.** ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`` gives
  every row's real tokens the positions ``0 … L_b−1`` they have when run alone, so RoPE
  is unchanged by padding; the attention mask hides the pad keys (softmax weight exactly
  0). Each row computes what it computes alone, up to the summation order of batched
  matmuls (≪ 1e-4 in float32). Qwen2-VL/2.5-VL's positions are 3-D M-RoPE ids, ``[3, B, S]``,
  which the model's own ``get_rope_index`` computes per row (:func:`mclcbf_diag.models.mrope.position_ids`,
  which every position this module builds comes from).
* **Images.** :func:`batch_inputs` runs the vision tower once per *distinct* image of the
  batch (POPE asks ~6 questions per image) and hands the projected features to the
  model's own merge step (``mm_encoder_outputs``); both conditions reuse them. What an image is, and
  how its features are shared, is the family's image scheme (:mod:`mclcbf_diag.models.schemes`):
  LLaVA-NeXT's is its tiles and its ``image_sizes``; InternVL's several rows of ``pixel_values``, whose
  prompt the pixels kept beside the features record (``pixel_rows``), so a view of some rows takes their
  own tiles; Qwen-VL's flattened patches split by ``image_grid_thw``; Gemma 3's one image list per prompt,
  with ``token_type_ids`` padded like the ids and its features stacked.
* **Decision.** ``margin = logit[yes_id] − logit[no_id]`` at the last position; answer
  "yes" iff margin > 0 (as :mod:`mclcbf_diag.measurements.measure` does for one sample).
* **Baseline** is a plain HF forward (no nnsight, no intervention).
* **Intervened** runs go through :func:`mclcbf_diag.engine.runner.forward`, the same runner and
  the same intervention code as a single-sample trace (a sample is a batch of one): each
  row's sites see it in its own unpadded coordinates.
* **Cached prefix** (:func:`answer_pair`). An intervention edits positions from
  :meth:`~mclcbf_diag.interventions.base.Intervention.first_edited` on, and a causal model's
  earlier positions never see them: they are identical in both conditions. So the baseline
  forward keeps its KV cache, the cache is cut just before the batch's first edited
  position (the last token for a decision-token intervention), and the intervened run is a
  continuation over the remaining tokens only; look-ahead keys are the cached keys followed
  by those projected from the live residual. If an edited position could precede an image
  token it re-runs the prompt (the model merges image features only in a forward that sees
  the whole image).
* **Auxiliary forwards in the baseline's** (:func:`answer_pair`). A decoding-level method's view
  that changes only the image features (VCD's noised image, CausalMM's counterfactual features)
  runs as B more rows of the baseline's forward, stacked under the batch's rows with the same ids,
  mask and positions; their logits go to the method, and the cache keeps the batch's rows. A method
  that can use the baseline's forward (:meth:`~mclcbf_diag.interventions.base.Intervention.prepare_batched`)
  is prepared after it, from its cache (PAI's and VISTA's image-free prompts continue it from the
  first image token on, OPERA's candidates from the decision token), its logits and, where the
  intervened run re-runs the prompt (VISTA), the residual entering each layer at the last position.
* **Generation** (``max_new_tokens > 0``, :func:`answer_batch`): HF ``generate`` with the run's decoding;
  an activation edit then acts on the prefill forward only (``mclcbf-diag trace --max-new-tokens``
  studies the decode phase on one sample). Under a decoding-level method every token comes from its
  combined scores (:mod:`mclcbf_diag.engine.decode`'s loop), and OPERA with ``--decoding beam`` runs its
  beam search (:mod:`mclcbf_diag.interventions.opera_beam`). An edit prepared from the prompt alone
  (:meth:`~mclcbf_diag.interventions.base.Intervention.prepares_from_prompt`: VISTA, its ``steering-only``
  preset too) also runs the loop, greedy or sampled, so it steers every generated token as its released code
  does (with ``--decoding beam``: ``generate``, the prefill steered only).
"""

from __future__ import annotations

import inspect

import torch

from ..interventions import as_intervention
from ..interventions.base import Batched, Intervention, rows_of
from ..interventions.views import row_inputs, shares_image_features, with_aux_rows
from ..models import LoadedModel
from ..models.processing import padded_inputs
from ..models.schemes import PIXEL_ROWS
from .decode import cached_prefix, end_ids, generate, suffix_inputs
from .runner import Continuation, Keep, forward


def batch_inputs(lm: LoadedModel, prompts: list[str], images: list, *, share_images: bool = True) -> dict:
    """Model inputs for a batch: left-padded, with RoPE-correct ``position_ids``.

    With ``share_images`` (and a transformers whose LLaVA accepts ``mm_encoder_outputs``) the vision tower runs once
    per distinct image; ``generate`` needs ``share_images=False`` (pixel values), so that its decode steps see no
    features.

    Args:
        lm: the loaded model.
        prompts: one prompt a row, with the portable image placeholder.
        images: the rows' images (PIL), one per placeholder.
        share_images: pass the image features as ``mm_encoder_outputs`` (``{"image": features, "pixel_values": …}``,
            the pixels kept for methods that distort the image) instead of ``pixel_values``.

    Returns:
        The model's keyword inputs: ``input_ids``, ``attention_mask``, ``position_ids`` ([B, S], or M-RoPE's
        [3, B, S]) and the image inputs.
    """
    inputs = padded_inputs(lm, prompts, images)
    if share_images and "mm_encoder_outputs" in inspect.signature(lm.model.forward).parameters:
        pv = inputs.pop("pixel_values")
        with torch.no_grad():  # the tower once per distinct image, as the family's model merges the features
            image, owner = lm.image_scheme.encoder_output(lm, inputs, pv)
        # the pixels stay beside the features (the model reads only "image"), for methods that run the
        # question with the image distorted (mclcbf_diag.interventions.views); InternVL's tiles say whose they are
        inputs["mm_encoder_outputs"] = {"image": image, "pixel_values": pv}
        if owner is not None:
            inputs["mm_encoder_outputs"][PIXEL_ROWS] = owner
    return inputs


def _answers(lm: LoadedModel, last_logits: torch.Tensor, intervention=None, records=None, decoding=None,
             keys=None) -> list[dict]:
    """Per row: ``margin``, ``answer`` and the Yes/No reading (:mod:`mclcbf_diag.measurements.outcomes`): ``p_yes``,
    ``p_no`` (probability mass on every Yes/No spelling), ``top_yes_no``, ``finite``, ``valid``, and
    ``dropped``: the intervention computed a non-finite edit and did not apply it
    (:func:`~mclcbf_diag.measurements.outcomes.dropped_edit`). With a sampling ``decoding``
    (:class:`~mclcbf_diag.measurements.sampling.Decoding`) the answer is the token drawn for each row's
    question (``keys``), ``sampled_token`` beside it, and ``valid`` says whether it is a Yes/No spelling;
    the margin stays the greedy reading's."""
    from ..measurements.outcomes import answer_ids, dropped_edit, read_batch

    out = [{"margin": r.margin, "answer": r.answer, "p_yes": r.p_yes, "p_no": r.p_no, "top_yes_no": r.top_yes_no,
            "finite": r.finite, "valid": r.valid, "dropped": False} for r in read_batch(last_logits.float(), lm.tokens)]
    if decoding is not None and decoding.sampled:
        from ..measurements.sampling import sample_token

        yes, no = (set(ids) for ids in answer_ids(lm.tokens))
        for rec, row, key in zip(out, last_logits, keys):
            token = sample_token(row, decoding, str(key)) if rec["finite"] else -1
            rec["sampled_token"] = token
            if token in yes or token in no:
                rec["answer"] = "yes" if token in yes else "no"
            rec["valid"] = rec["finite"] and (token in yes or token in no)
    for rec, per_layer in zip(out, records or ()):
        rec.update(intervention.row_summary(per_layer))
        rec["dropped"] = dropped_edit(per_layer.values())
    return out


def answer_batch(lm: LoadedModel, prompts: list[str], images: list, intervention, steer: bool, *,
                 inputs: dict | None = None, max_new_tokens: int = 0, decoding=None, keys=None) -> list[dict]:
    """First-token answers for a batch, baseline (``steer=False`` or none) or intervened.

    With ``max_new_tokens`` > 0 each row's text is generated too: greedy, or as ``decoding`` says (sampled with
    ``torch.manual_seed(decoding.seed)`` before the batch's ``generate``, or a beam search); special tokens skipped.

    Args:
        lm: the loaded model.
        prompts: one prompt a row, with the portable image placeholder.
        images: the rows' images.
        intervention: an :class:`~mclcbf_diag.interventions.base.Intervention`, an MC-LCBF ``BarrierConfig``
            (wrapped) or None.
        steer: intervene (False: the baseline).
        inputs: :func:`batch_inputs` of these prompts, reused (None: built here; generation needs
            ``share_images=False``).
        max_new_tokens: tokens to generate after the prompt (0: the first token only).
        decoding: a sampling :class:`~mclcbf_diag.measurements.sampling.Decoding` draws each row's first-token answer
            (the margin stays the greedy reading's); None: greedy.
        keys: each row's question key, seeding its draw (the same draw for a question in every condition).

    Returns:
        One dict per row: ``margin`` (logit Yes − No), ``answer`` and the Yes/No reading (``p_yes``, ``p_no``,
        ``top_yes_no``, ``finite``, ``valid``, ``dropped``); when intervening also the intervention's
        :meth:`~mclcbf_diag.interventions.base.Intervention.row_summary` (for MC-LCBF: ``layers_fired``,
        ``h_mean``, ``mean_theta_rel``, ``max_dh_predicted``); with ``max_new_tokens`` > 0 also ``text``.

    Raises:
        ValueError: generation asked with ``inputs`` built with shared image features (a programming error).
    """
    iv = as_intervention(intervention)
    if inputs is None:
        inputs = batch_inputs(lm, prompts, images, share_images=max_new_tokens <= 0)
    if max_new_tokens > 0 and "pixel_values" not in inputs:
        raise ValueError("generation needs batch_inputs(..., share_images=False)")  # programming error
    steer = steer and iv is not None
    if steer:
        iv.sources(prompts, images)
    beam = decoding is not None and decoding.strategy == "beam"
    looped = loops_generation(iv, beam)
    if max_new_tokens > 0 and looped and (steer or not beam):
        return _generated(lm, inputs, iv, steer, max_new_tokens, decoding, keys)
    with torch.no_grad():
        if max_new_tokens <= 0:
            if not steer:
                return _answers(lm, lm.model(**inputs, logits_to_keep=1).logits[:, -1], decoding=decoding, keys=keys)
            res = forward(lm, inputs, iv, keep=Keep(layers=False))
            return _answers(lm, res.logits, iv, res.records, decoding, keys)
        kw = {k: v for k, v in inputs.items() if k != "position_ids"}  # generate derives its own
        gen = dict(max_new_tokens=max_new_tokens, pad_token_id=lm.processor.tokenizer.pad_token_id,
                   **(decoding.generate_kwargs() if decoding is not None else {"do_sample": False}))
        if decoding is not None and decoding.sampled:
            torch.manual_seed(decoding.seed)
        records = None
        if steer:
            # Outside ``tracer.iter`` nnsight reaches the first forward only: the prefill.
            res = forward(lm, kw, iv, keep=Keep(layers=False), generate=gen)
            last, records, sequences = res.logits, res.records, res.sequences
        else:
            out = lm.model.generate(**kw, **gen, return_dict_in_generate=True, output_logits=True)
            # a beam search's first logits are every beam's ([B·beams, vocab], all the prompt's): the first beam's
            sequences = out.sequences
            last = out.logits[0].reshape(len(sequences), -1, out.logits[0].shape[-1])[:, 0]
    out = _answers(lm, last, iv, records)  # the first token's greedy reading; the text is decoded as asked
    n = inputs["input_ids"].shape[1]
    for b, rec in enumerate(out):
        rec["text"] = lm.processor.tokenizer.decode(sequences[b, n:], skip_special_tokens=True)
    return out


def loops_generation(iv, beam: bool) -> bool:
    """Whether generated text under ``iv`` comes from :mod:`.decode`'s loop, which steers every token: a
    decoding-level method (it chooses each token), or an edit prepared once from the prompt (VISTA) unless a beam
    search runs. Otherwise :func:`answer_batch` runs transformers' ``generate``, with the prompt's forward steered
    and the tokens after the first answer token generated without the edit."""
    return iv is not None and ("logits" in iv.open_sites(True) or (iv.prepares_from_prompt() and not beam))


def _generated(lm: LoadedModel, inputs: dict, iv, steer: bool, max_new_tokens: int, decoding, keys) -> list[dict]:
    """Generated answers where a decoding-level method chooses every token, or an edit prepared from the prompt
    steers every token (VISTA; :mod:`.decode`'s loop, both conditions;
    the baseline of a beam search is ``generate``'s), or OPERA's beam search with ``--decoding beam``
    (:mod:`~mclcbf_diag.interventions.opera_beam`, question by question): the first token's greedy reading as
    :func:`answer_batch` gives it, ``text``, and for OPERA ``opera_penalty`` (per step, the best beam's top
    candidate's penalty), ``opera_columns`` (per step, the penalty's column) and ``opera_rollbacks``."""
    n, tok = inputs["input_ids"].shape[1], lm.processor.tokenizer
    if decoding is not None and decoding.strategy == "beam":
        from ..interventions.opera_beam import opera_search

        if iv.name != "opera":
            raise ValueError(f"no beam search under {iv.name}; OPERA has one")  # programming error: the CLI refuses
        with torch.no_grad():
            res = forward(lm, inputs, iv, keep=Keep(layers=False))
        out = _answers(lm, res.logits, iv, res.records)
        for row, rec in zip(rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id), out):
            one = {k: (v[:, row.pad:] if k in ("input_ids", "attention_mask") else v)  # the row alone, unpadded
                   for k, v in row_inputs(inputs, [row]).items() if k != "position_ids"}
            tokens, search = opera_search(lm, one, iv.knobs, num_beams=decoding.num_beams,
                                          max_new_tokens=max_new_tokens, ends=end_ids(lm))
            rec["text"] = tok.decode(tokens, skip_special_tokens=True)
            rec["opera_penalty"] = [e["penalty"][0][0] for e in search.events]
            rec["opera_columns"] = [e["column"] for e in search.events]
            rec["opera_rollbacks"] = [{"response": e["response"], **e["rollback"]} for e in search.events
                                      if e["rollback"] is not None]
        return out
    gen = generate(lm, inputs, iv, max_new_tokens=max_new_tokens, decoding=decoding, keys=keys, steer=steer)
    out = _answers(lm, gen.first_scores, iv if steer else None, gen.steps[0]["records"] if steer else None)
    for b, rec in enumerate(out):
        rec["text"] = tok.decode(gen.sequences[b, n:], skip_special_tokens=True)
    return out


def baseline_prefix(lm: LoadedModel, inputs: dict) -> tuple[torch.Tensor, object]:
    """The baseline forward of a batch, kept for many :func:`answer_pair` calls on the same
    inputs (``baseline=``): last-position logits and the whole KV cache."""
    with torch.no_grad():
        out = lm.model(**inputs, logits_to_keep=1, use_cache=True)
    return out.logits[:, -1], lm.adapter.output_cache(lm.model, out)


def _cut(cache, start: int):
    """A new cache holding the first ``start`` positions of ``cache`` (which stays as it is)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[..., :start, :], layer.values[..., :start, :], i)
    return out


def _states_forward(lm: LoadedModel, inputs: dict) -> tuple[torch.Tensor, Batched]:
    """The baseline's plain forward keeping its KV cache and, per decoder layer, the residual entering it at the last
    position: ``(logits [B, vocab], Batched(cache, logits, states [B, layers, d] float32))``."""
    states = []

    def grab(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        states.append(x[:, -1].detach().float())

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in lm.adapter.decoder_layers(lm.model)]
    try:
        logits, cache = baseline_prefix(lm, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, Batched(cache=cache, logits=logits, states=torch.stack([s.to(states[0].device) for s in states], 1))


def _baseline_forward(lm: LoadedModel, inputs: dict, rows: list, iv, baseline: tuple | None):
    """``(logits [B, vocab], KV cache of the whole prompts, Batched)``: the baseline's plain forward (``baseline``'s,
    when given), with the auxiliary rows of ``iv`` (:meth:`~mclcbf_diag.interventions.base.Intervention.aux_features`)
    stacked under the main rows where it has such rows and the inputs share image features: their logits go to
    ``Batched.aux_logits`` and the cache keeps the main rows only."""
    if baseline is not None:
        return baseline[0], baseline[1], Batched(cache=baseline[1], logits=baseline[0])
    features = None
    if iv is not None and shares_image_features(inputs):
        features = iv.aux_features(lm, inputs, rows)
    if features is None:
        logits, cache = baseline_prefix(lm, inputs)
        return logits, cache, Batched(cache=cache, logits=logits)
    n = len(rows)
    every, cache = baseline_prefix(lm, with_aux_rows(inputs, features))
    cache.batch_select_indices(torch.arange(n, device=every.device))  # the main rows' only
    return every[:n], cache, Batched(aux_logits=every[n:].float(), cache=cache, logits=every[:n])


def answer_pair(lm: LoadedModel, prompts: list[str], images: list, intervention, *,
                inputs: dict | None = None, baseline: tuple | None = None, decoding=None,
                keys=None):
    """Baseline and intervened first-token answers; the intervened run reuses the baseline's cache.

    The intervened run only recomputes the positions from the batch's first edited token on (see the module
    docstring); it falls back to a full forward when that is not exact.

    Args:
        lm: the loaded model.
        prompts: one prompt a row, with the portable image placeholder.
        images: the rows' images.
        intervention: an :class:`~mclcbf_diag.interventions.base.Intervention`, an MC-LCBF ``BarrierConfig``
            (wrapped) or None.
        inputs: :func:`batch_inputs` of these prompts, reused (None: built here).
        baseline: what :func:`baseline_prefix` returned for these ``inputs``, so that many interventions on the same
            batch share one baseline forward (None: run here).
        decoding: a sampling :class:`~mclcbf_diag.measurements.sampling.Decoding` draws each row's first-token answer,
            the same draw for a question in both conditions; or a list of decodings (one sampled setting at several
            seeds), all read from the same two forwards; None: greedy.
        keys: each row's question key, seeding its draw.

    Returns:
        ``(baseline records, intervened records)``, the records of :func:`answer_batch`; with a list of decodings a
        list of such pairs, one per decoding.
    """
    iv = as_intervention(intervention)
    inputs = batch_inputs(lm, prompts, images) if inputs is None else inputs
    ids = inputs["input_ids"]
    start = cached_prefix(lm, ids, inputs["attention_mask"], iv)
    rows = rows_of(ids, inputs["attention_mask"], lm.tokens.image_token_id)
    iv.sources(prompts, images)
    # an intervention that can use the baseline's forward (Intervention.prepare_batched) is prepared after it; any
    # other before it, as its own forwards are then never the last two over the whole prompt (pope's records)
    shared = type(iv).prepare_batched is not Intervention.prepare_batched and (start > 0 or baseline is None)
    if not shared:
        iv.prepare(lm, inputs, rows)
    with torch.no_grad():
        if start == 0:
            if shared:  # the baseline keeps its cache and each layer's last-position residual for the preparation
                base, batched = _states_forward(lm, inputs)
                iv.prepare_batched(lm, inputs, rows, batched)
            else:
                base = lm.model(**inputs, logits_to_keep=1).logits[:, -1] if baseline is None else baseline[0]
            res = forward(lm, inputs, iv, keep=Keep(layers=False), prepare=False)
            return _pair(lm, base, res, iv, decoding, keys)
        logits, cache, batched = _baseline_forward(lm, inputs, rows, iv if shared else None, baseline)
        if shared:
            iv.prepare_batched(lm, inputs, rows, batched)
        if baseline is None:
            cache.crop(start - ids.shape[1])  # keep the positions before the first edited one
        else:
            cache = _cut(cache, start)
        prefix_keys = {i: cache.layers[i].keys[..., :start, :] for i in iv.layers(lm.n_layers)}
        res = forward(lm, suffix_inputs(inputs, start), iv, keep=Keep(layers=False), full_ids=ids, prepare=False,
                      continuation=Continuation(start=start, prefix_keys=prefix_keys), use_cache=True,
                      **lm.adapter.cache_kwargs(lm.model, cache))
    return _pair(lm, logits, res, iv, decoding, keys)


def _pair(lm: LoadedModel, base: torch.Tensor, res, iv, decoding, keys):
    """The baseline's and the intervened run's answers (:func:`_answers`); with a sequence of decodings, one pair
    per decoding, read from the same logits."""
    if isinstance(decoding, (list, tuple)):
        return [_pair(lm, base, res, iv, d, keys) for d in decoding]
    return _answers(lm, base, decoding=decoding, keys=keys), _answers(lm, res.logits, iv, res.records, decoding, keys)

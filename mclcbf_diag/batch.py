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
  matmuls (≪ 1e-4 in float32).
* **Images.** :func:`batch_inputs` runs the vision tower once per *distinct* image of the
  batch (POPE asks ~6 questions per image) and hands the projected features to the
  model's own merge step (``mm_encoder_outputs``); both conditions reuse them.
* **Decision.** ``margin = logit[yes_id] − logit[no_id]`` at the last position; answer
  "yes" iff margin > 0 (as :mod:`mclcbf_diag.measure` does for one sample).
* **Baseline** is a plain HF forward (no nnsight, no barrier statistics).
* **Steering** (prefill only) runs inside ONE nnsight trace per batch with the ideas of
  :mod:`mclcbf_diag.intervene`: RoPE from ``rotary_emb.output``, the residual from
  ``layer.inputs`` edited in place (``resid_pre``), the ``input_layernorm`` output
  (``ln1_out``) or the eager softmax (``attn_logits``). At each steered layer the barrier
  is solved per row with the pure functions of :mod:`mclcbf_diag.barrier` on the row's
  *unpadded* view (``p_b`` = its pad count): keys, image span, targets and query
  positions are in unpadded coordinates, exactly as ``intervene.run`` computes them for
  the row alone, and the step is written back at ``p_b + targets``. Rows with the same
  structure (pad count, span, targets) get ``(h, ∇h)`` from one ``vmap`` call.
* **Image span per row.** ``span="detected"`` reads the row's own ``input_ids``;
  ``span="fixed"`` applies ``fixed_span`` to the unpadded prompt, i.e. it is shifted by
  ``p_b`` in the padded batch, because the seed's ``[1, 577)`` is relative to the prompt
  as the seed ran it (batch size 1, no padding).
* **Cached prefix** (:func:`answer_pair`). Steering edits only the target tokens, and a
  causal model's earlier positions never see them: every position before the first
  target is identical in both conditions. So the baseline forward keeps its KV cache,
  the cache is cut just before the first target of the batch (the last token for the
  seed's ``tokens="last"``), and the steered run is a continuation over the remaining
  tokens only; the barrier's keys are the cached keys followed by those the trace
  projects from the live residual. If a target could precede an image token (a fixed
  span that ends inside the image with ``tokens="after_image"``) it re-runs the prompt.
* **Generation** (``max_new_tokens > 0``, :func:`answer_batch`): HF ``generate``, greedy.
  Steering then acts on the prefill forward only; later tokens are not steered (the
  seed's decode phase is not reproduced here: ``mclcbf-diag trace --max-new-tokens``
  studies it on one sample).
"""

from __future__ import annotations

import inspect

import nnsight
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import barrier as B
from .errors import UserError
from .intervene import envoy_at, traced
from .models import LoadedModel
from .probes import rms_norm


def batch_inputs(lm: LoadedModel, prompts: list[str], images: list, *, share_images: bool = True) -> dict:
    """Model inputs for a batch: left-padded, with RoPE-correct ``position_ids``.

    With ``share_images`` (and a transformers whose LLaVA accepts ``mm_encoder_outputs``)
    the vision tower runs once per distinct image; ``generate`` needs
    ``share_images=False`` (pixel values), so that its decode steps see no features.
    """
    if len(prompts) != len(images) or not prompts:
        raise ValueError(f"need one image per prompt, got {len(prompts)} prompts and {len(images)} images")
    placeholder = getattr(lm.processor, "image_token", None) or "<image>"
    if any(p.count(placeholder) != 1 for p in prompts):
        raise UserError(f"every prompt needs exactly one {placeholder} placeholder "
                        "(e.g. 'USER: <image>\n{question}\nASSISTANT:')")
    tok = lm.processor.tokenizer
    if tok.pad_token_id is None:
        raise UserError("the tokenizer has no pad token, so prompts cannot be batched; use --batch-size 1")
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = lm.processor(text=list(prompts), images=list(images), return_tensors="pt", padding="longest")
    finally:
        tok.padding_side = side
    mask = enc["attention_mask"]
    pads = (mask == 0).sum(-1)
    if any(bool(mask[b, int(p):].eq(0).any()) for b, p in enumerate(pads)):
        raise RuntimeError("the processor did not pad on the left")  # programming error
    enc["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {k: (v.to(lm.device, lm.dtype) if v.is_floating_point() else v.to(lm.device)) for k, v in enc.items()}
    if share_images and "mm_encoder_outputs" in inspect.signature(lm.model.forward).parameters:
        pv = inputs.pop("pixel_values")
        uniq, inverse = torch.unique(pv.flatten(1), dim=0, return_inverse=True)
        with torch.no_grad():
            feats = lm.model.get_image_features(pixel_values=uniq.view(-1, *pv.shape[1:]), return_dict=True)
        per_row = [feats.pooler_output[j] for j in inverse.tolist()]
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_row)}
    return inputs


class _Row:
    """One row's unpadded view: pad count, image span, targets, and its barrier statistics."""

    def __init__(self, lm: LoadedModel, config: B.BarrierConfig, ids: torch.Tensor, pad: int):
        self.pad = pad
        ids = ids[pad:].cpu()
        self.image = ids == lm.tokens.image_token_id
        if not bool(self.image.any()):
            raise UserError(f"no image token (id {lm.tokens.image_token_id}) in a prompt; every prompt "
                            "must contain <image> (e.g. 'USER: <image>\\n{question}\\nASSISTANT:')")
        self.span = B.image_span_mask(config, ids, lm.tokens.image_token_id).cpu()
        self.targets = B.target_positions(config, self.span)
        self.key = (pad, tuple(self.targets.tolist()), tuple(torch.nonzero(self.span).flatten().tolist()))
        self.fired: list[int] = []
        self.h: list[float] = []
        self.theta_rel: list[float] = []
        self.dh: list[float] = []

    def summary(self) -> dict:
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        return {"layers_fired": self.fired, "h_mean": mean(self.h), "mean_theta_rel": mean(self.theta_rel),
                "max_dh_predicted": max(self.dh) if self.dh else None}


def _rows(lm, config, inputs) -> list[_Row]:
    pads = (inputs["attention_mask"] == 0).sum(-1).tolist()
    return [_Row(lm, config, inputs["input_ids"][b], p) for b, p in enumerate(pads)]


def _residual_steps(cfg, w, x, cos, sin, cached, rows: list[_Row], start: int, layer: int) -> list:
    """The barrier step of every row at one layer (as ``intervene._Run._barrier_step``).

    ``x``/``cos``/``sin`` cover padded positions ``start …`` (the whole batch when
    ``start`` is 0); ``cached`` [B, KV, start, hd] holds the keys of the positions before.
    Returns per row the tensor to add at its targets, or None when h ≥ τ.
    """
    tau, alpha = B.phase_params(cfg, "prefill")
    gdt = B.resolve_grad_dtype(cfg, x.dtype)
    normalized = cfg.site == "ln1_out"
    groups: dict[tuple, list[int]] = {}
    for b, row in enumerate(rows):
        groups.setdefault(row.key, []).append(b)
    adds: list = [None] * len(rows)
    for members in groups.values():
        first = rows[members[0]]
        p, t = first.pad, first.targets
        lo = max(p, start)  # first padded position of this row that the trace computes
        xs = x[members, lo - start:]  # [G, L-lo, d]
        cos_r = cos[members[0], lo - start:].to(xs.device)  # RoPE may live on another GPU (device_map)
        sin_r = sin[members[0], lo - start:].to(xs.device)
        keys = torch.func.vmap(lambda xr: B.project_keys(xr, w, cos_r, sin_r))(xs)  # [G, KV, L-lo, hd]
        if lo > p:
            keys = torch.cat([cached[members, :, p:lo].to(keys.dtype), keys], dim=-2)
        local = t + p - lo
        x_t = rms_norm(xs[:, local], w.ln_weight, w.ln_eps) if normalized else xs[:, local]

        def h_of(xt, k):
            return B.barrier_value(xt, k, w, cos_r[local], sin_r[local], first.span, t, normalized=normalized)[0]

        with torch.inference_mode(False):
            g, h = torch.func.vmap(torch.func.grad_and_value(h_of))(x_t.detach().to(gdt), keys.detach())
        if not torch.isfinite(g).all():
            raise UserError(f"the barrier gradient at layer {layer} is NaN or inf (dtype {gdt}); "
                            "try --set grad_dtype=float32 or a float32 model")
        for j, b in enumerate(members):
            st = B.step(h[j], g[j], float(x_t[j].float().norm()), tau, alpha, cfg)
            rows[b].h.append(st.h)
            if st.active:
                rows[b].fired.append(layer)
                rows[b].theta_rel.append(st.theta_rel)
                rows[b].dh.append(st.predicted_delta_h)
                adds[b] = st.applied.to(x.dtype)
    return adds


def _logit_step(cfg, probs, b: int, row: _Row, start: int, layer: int) -> None:
    """The ``attn_logits`` site for row ``b`` (as ``intervene._Run._steer_logits``)."""
    tau, alpha = B.phase_params(cfg, "prefill")
    q_rows = row.targets + row.pad - start
    mask = torch.cat([torch.zeros(row.pad, dtype=torch.bool), row.span])  # keys span the whole padded row
    edited, mass, _, target = B.shift_image_logits(probs[b][:, q_rows], mask, tau, alpha)
    h = float(mass.mean())
    row.h.append(h)
    if h >= tau:
        return
    probs[b][:, q_rows] = edited
    row.fired.append(layer)
    row.dh.append(float(target.mean()) - h)


def _steer_body(nm, lm: LoadedModel, cfg: B.BarrierConfig, rows: list[_Row], start: int = 0,
                cached: dict | None = None) -> None:
    """The trace body: steer every row at every steered layer, in forward order."""
    ad = lm.adapter
    layers = envoy_at(nm, ad.layers)
    residual = cfg.site in ("resid_pre", "ln1_out")
    if residual:
        cos, sin = envoy_at(nm, ad.rotary_emb).output
    for i in B.steered_layers(cfg, lm.n_layers):
        layer = layers[i]
        if residual:
            x = layer.inputs[0][0]
            adds = _residual_steps(cfg, lm.layer_weights(i), x, cos, sin, (cached or {}).get(i), rows, start, i)
            if cfg.site == "ln1_out":
                x = envoy_at(layer, ad.layer_input_norm).output
            for b, (row, add) in enumerate(zip(rows, adds)):
                if add is not None:
                    x[b, row.targets + row.pad - start] += add
        else:
            probs = envoy_at(layer, ad.layer_attention_softmax).output
            for b, row in enumerate(rows):
                _logit_step(cfg, probs, b, row, start, i)


def _answers(lm: LoadedModel, last_logits: torch.Tensor, rows: list[_Row] | None) -> list[dict]:
    margins = (last_logits[:, lm.tokens.yes_id] - last_logits[:, lm.tokens.no_id]).float().tolist()
    out = [{"margin": m, "answer": "yes" if m > 0 else "no"} for m in margins]
    for rec, row in zip(out, rows or ()):
        rec.update(row.summary())
    return out


def _steered_trace(lm, inputs, config, rows, start=0, cached=None, **model_kwargs) -> torch.Tensor:
    nm = traced(lm.model)
    with nm.trace(**inputs, logits_to_keep=1, **model_kwargs):
        _steer_body(nm, lm, config, rows, start, cached)
        last = nnsight.save(envoy_at(nm, lm.adapter.unembed).output[:, -1])
    return last


def answer_batch(lm: LoadedModel, prompts: list[str], images: list, config: B.BarrierConfig | None,
                 steer: bool, *, inputs: dict | None = None, max_new_tokens: int = 0) -> list[dict]:
    """First-token answers for a batch, baseline (``steer=False`` or no config) or steered.

    Returns one dict per row: ``margin`` (logit Yes − No) and ``answer``; when steering
    also ``layers_fired`` (steered layers where h < τ), ``h_mean`` (h before the step,
    mean over steered layers), ``mean_theta_rel`` (‖θ*‖/‖x‖ averaged over the fired
    layers; None if none fired or the site has no θ*) and ``max_dh_predicted`` (largest
    predicted Δh over fired layers). With ``max_new_tokens`` > 0 also ``text`` (greedy,
    special tokens skipped). ``inputs`` reuses :func:`batch_inputs` for these prompts.
    """
    if inputs is None:
        inputs = batch_inputs(lm, prompts, images, share_images=max_new_tokens <= 0)
    if max_new_tokens > 0 and "pixel_values" not in inputs:
        raise ValueError("generation needs batch_inputs(..., share_images=False)")  # programming error
    steer = steer and config is not None
    rows = _rows(lm, config, inputs) if steer else None
    with torch.no_grad():
        if max_new_tokens <= 0:
            last = _steered_trace(lm, inputs, config, rows) if steer else \
                lm.model(**inputs, logits_to_keep=1).logits[:, -1]
            return _answers(lm, last, rows)
        kw = {k: v for k, v in inputs.items() if k != "position_ids"}  # generate derives its own
        gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.processor.tokenizer.pad_token_id)
        if steer:
            nm = traced(lm.model)
            # Outside ``tracer.iter`` nnsight reaches the first forward only: the prefill.
            with nm.trace(**kw, fn=lm.model.generate, **gen) as tracer:
                _steer_body(nm, lm, config, rows)
                last = nnsight.save(envoy_at(nm, lm.adapter.unembed).output[:, -1])
                sequences = nnsight.save(tracer.result)
        else:
            out = lm.model.generate(**kw, **gen, return_dict_in_generate=True, output_logits=True)
            last, sequences = out.logits[0], out.sequences
    out = _answers(lm, last, rows)
    n = inputs["input_ids"].shape[1]
    for b, rec in enumerate(out):
        rec["text"] = lm.processor.tokenizer.decode(sequences[b, n:], skip_special_tokens=True)
    return out


def _cached_prefix(lm: LoadedModel, ids: torch.Tensor, rows: list[_Row]) -> int:
    """Padded positions ``[0, start)`` that steering cannot change (0: re-run the prompt).

    ``start`` is the batch's first target; the continuation must hold no image token,
    since the model merges image features only in a forward that sees the whole image.
    """
    start = min(row.pad + int(row.targets.min()) for row in rows)
    return 0 if bool((ids[:, start:] == lm.tokens.image_token_id).any()) else start


def answer_pair(lm: LoadedModel, prompts: list[str], images: list, config: B.BarrierConfig, *,
                inputs: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Baseline and steered first-token answers; the steered run reuses the baseline's cache.

    Same records as :func:`answer_batch` (baseline, then steered). The steered run only
    recomputes the positions from the batch's first target token on (see the module
    docstring); it falls back to a full steered forward when that is not exact.
    """
    inputs = batch_inputs(lm, prompts, images) if inputs is None else inputs
    rows = _rows(lm, config, inputs)
    ids = inputs["input_ids"]
    start = _cached_prefix(lm, ids, rows)
    with torch.no_grad():
        if start == 0:
            base = lm.model(**inputs, logits_to_keep=1).logits[:, -1]
            return _answers(lm, base, None), _answers(lm, _steered_trace(lm, inputs, config, rows), rows)
        out = lm.model(**inputs, logits_to_keep=1, use_cache=True)
        cache = lm.adapter.output_cache(lm.model, out)
        cache.crop(start - ids.shape[1])  # keep the positions before the first target
        steered = B.steered_layers(config, lm.n_layers)
        cached = {i: cache.layers[i].keys[..., :start, :] for i in steered}
        suffix = {"input_ids": ids[:, start:], "attention_mask": inputs["attention_mask"],
                  "position_ids": inputs["position_ids"][:, start:]}
        last = _steered_trace(lm, suffix, config, rows, start, cached, use_cache=True,
                              **lm.adapter.cache_kwargs(lm.model, cache))
    return _answers(lm, out.logits[:, -1], None), _answers(lm, last, rows)

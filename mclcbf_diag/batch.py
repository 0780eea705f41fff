"""Batched POPE answers: one forward per condition for a whole batch, steered row by row.

Mechanism
---------
* **Left padding.** The prompts of a batch are tokenised together with padding on the
  left, so the decision token (the last prompt token) is the last position of every row
  and the first-token logits of all rows are ``logits[:, -1]``.
* **Positions.** ``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`` gives
  every row's real tokens the positions ``0 … L_b−1`` they have when run alone, so RoPE
  is unchanged by padding; the attention mask hides the pad keys (their softmax weight
  is exactly 0). Each row therefore computes what it computes alone, up to the
  summation order of batched matmuls (≪ 1e-4 in float32).
* **Decision.** ``margin = logit[yes_id] − logit[no_id]`` at the last position;
  answer "yes" iff margin > 0 (as :mod:`mclcbf_diag.measure` does for one sample).
* **Baseline** is a plain HF forward (no nnsight, no barrier statistics).
* **Steering** (prefill only) runs inside ONE nnsight trace per batch, with the ideas of
  :mod:`mclcbf_diag.intervene`: RoPE from ``rotary_emb.output``, the residual from
  ``layer.inputs`` edited in place (``resid_pre``), the ``input_layernorm`` output
  (``ln1_out``) or the eager softmax (``attn_logits``). At each steered layer the
  barrier is solved per row with the pure functions of :mod:`mclcbf_diag.barrier` on
  that row's *unpadded* slice ``x[b, p_b:]`` (``p_b`` = its pad count): keys, image
  span, target tokens and query positions are all computed in unpadded coordinates,
  exactly as ``intervene.run`` computes them for the row alone, and the step is written
  back at ``p_b + targets``.
* **Image span per row.** ``span="detected"`` reads the row's own ``input_ids``;
  ``span="fixed"`` applies ``fixed_span`` to the unpadded prompt, i.e. it is shifted by
  ``p_b`` in the padded batch, because the seed's ``[1, 577)`` is relative to the prompt
  as the seed ran it (batch size 1, no padding).
* **Generation** (``max_new_tokens > 0``): HF ``generate``, greedy, in the same call;
  steering then acts on the prefill forward only (the first generated token is steered
  as above, later tokens are not: the seed's decode phase is not reproduced here — use
  ``mclcbf-diag trace --max-new-tokens`` to study it on one sample).
"""

from __future__ import annotations

import inspect
import math

import nnsight
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import barrier as B
from .errors import UserError
from .intervene import _envoy, traced
from .models import LoadedModel
from .probes import rms_norm


def batch_inputs(lm: LoadedModel, prompts: list[str], images: list, *, share_images: bool = True) -> dict:
    """Model inputs for a batch: left-padded, with RoPE-correct ``position_ids``.

    With ``share_images`` (and a transformers that accepts ``mm_encoder_outputs``) the
    vision tower runs once per *distinct* image of the batch (POPE asks ~6 questions per
    image) and its projected features are handed to the model's own merge step, so the
    baseline and steered forwards reuse them. ``generate`` needs ``share_images=False``
    (its decode steps must not see the features again).
    """
    if len(prompts) != len(images) or not prompts:
        raise ValueError(f"need one image per prompt, got {len(prompts)} prompts and {len(images)} images")
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
    """One row's unpadded view: pad count, image span, targets and barrier statistics."""

    def __init__(self, lm: LoadedModel, config: B.BarrierConfig, ids: torch.Tensor, pad: int):
        self.pad = pad
        ids = ids[pad:]
        if not bool((ids == lm.tokens.image_token_id).any()):
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


def _residual_steps(lm, cfg, w, x, cos, sin, rows: list[_Row], layer: int) -> list:
    """The barrier step of every row at one layer (as ``intervene._Run._barrier_step``).

    Rows with the same pad count, image span and targets share RoPE, masks and query
    positions, so their ``(h, ∇h)`` come from ONE ``vmap(grad_and_value(barrier_value))``
    call instead of one autograd pass per row (keys are constants, as in the seed).
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
        cos_r, sin_r = cos[members[0], p:], sin[members[0], p:]
        xs = x[members, p:]  # [G, L, d]: the rows without their padding
        keys = torch.func.vmap(lambda xr: B.project_keys(xr, w, cos_r, sin_r))(xs)
        x_t = xs[:, t]
        if normalized:
            x_t = rms_norm(x_t, w.ln_weight, w.ln_eps)

        def h_of(xt, k):
            return B.barrier_value(xt, k, w, cos_r[t], sin_r[t], first.span, t, normalized=normalized)[0]

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


def _logit_step(cfg, probs, b: int, row: _Row, layer: int) -> None:
    """The ``attn_logits`` site for row ``b`` (as ``intervene._Run._steer_logits``)."""
    tau, alpha = B.phase_params(cfg, "prefill")
    rows = row.targets + row.pad
    p = probs[b][:, rows]  # [H, n, K]
    mask = torch.cat([torch.zeros(row.pad, dtype=torch.bool), row.span]).to(p.device)
    mass = p.float()[..., mask].sum(-1)  # [H, n]
    h = float(mass.mean())
    row.h.append(h)
    if h >= tau:
        return
    delta = B.logit_bias_for_target(mass, tau) * alpha
    e = torch.exp(delta.double())
    target = (mass.double() * e / (mass.double() * e + 1 - mass.double())).float()
    probs[b][:, rows] = B.rescale_image_probs(p, mask, target)
    row.fired.append(layer)
    row.dh.append(float(target.mean()) - h)


def _steer_body(nm, lm: LoadedModel, cfg: B.BarrierConfig, rows: list[_Row]) -> None:
    """The trace body: steer every row at every steered layer, in forward order."""
    ad = lm.adapter
    layers = _envoy(nm, ad.layers)
    steered = B.steered_layers(cfg, lm.n_layers)
    residual = cfg.site in ("resid_pre", "ln1_out")
    if residual:
        cos, sin = _envoy(nm, ad.rotary_emb).output
    for i in steered:
        layer = layers[i]
        if residual:
            x = layer.inputs[0][0]
            w = lm.layer_weights(i)
            adds = _residual_steps(lm, cfg, w, x, cos, sin, rows, i)
            if cfg.site == "ln1_out":
                x = _envoy(layer, ad.layer_input_norm).output
            for b, (row, add) in enumerate(zip(rows, adds)):
                if add is not None:
                    x[b, row.targets + row.pad] += add
        else:
            probs = _envoy(layer, ad.layer_attention_softmax).output
            for b, row in enumerate(rows):
                _logit_step(cfg, probs, b, row, i)


def _answers(lm: LoadedModel, last_logits: torch.Tensor) -> list[dict]:
    margins = (last_logits[:, lm.tokens.yes_id] - last_logits[:, lm.tokens.no_id]).float().tolist()
    return [{"margin": m, "answer": "yes" if m > 0 else "no"} for m in margins]


def answer_batch(lm: LoadedModel, prompts: list[str], images: list, config: B.BarrierConfig | None,
                 steer: bool, *, inputs: dict | None = None, max_new_tokens: int = 0) -> list[dict]:
    """First-token answers for a batch, baseline (``steer=False`` or no config) or steered.

    Returns one dict per row: ``margin`` (logit Yes − No), ``answer``, and when steering
    ``layers_fired`` (steered layers where h < τ), ``h_mean`` (h before the step, mean
    over steered layers), ``mean_theta_rel`` (‖θ*‖/‖x‖ averaged over the fired layers;
    None if none fired or the site has no θ*) and ``max_dh_predicted`` (largest
    predicted Δh). With ``max_new_tokens`` > 0 also ``text`` (greedy, special tokens
    skipped). ``inputs`` reuses :func:`batch_inputs` output for the same prompts.
    """
    if inputs is None:
        inputs = batch_inputs(lm, prompts, images, share_images=max_new_tokens <= 0)
    if max_new_tokens > 0 and "pixel_values" not in inputs:
        raise ValueError("generation needs batch_inputs(..., share_images=False)")  # programming error
    steer = steer and config is not None
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=lm.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        if not steer:
            if max_new_tokens > 0:
                kw = {k: v for k, v in inputs.items() if k != "position_ids"}  # generate derives them
                out = lm.model.generate(**kw, **gen, return_dict_in_generate=True, output_logits=True)
                last, sequences = out.logits[0], out.sequences
            else:
                last, sequences = lm.model(**inputs, logits_to_keep=1).logits[:, -1], None
            rows = None
        else:
            pads = (inputs["attention_mask"] == 0).sum(-1).tolist()
            rows = [_Row(lm, config, inputs["input_ids"][b].cpu(), p) for b, p in enumerate(pads)]
            nm = traced(lm.model)
            if max_new_tokens > 0:
                kw = {k: v for k, v in inputs.items() if k != "position_ids"}
                # Outside ``tracer.iter`` nnsight reaches the first forward only: the prefill.
                with nm.trace(**kw, fn=lm.model.generate, **gen) as tracer:
                    _steer_body(nm, lm, config, rows)
                    last = nnsight.save(_envoy(nm, lm.adapter.unembed).output[:, -1])
                    sequences = nnsight.save(tracer.result)
            else:
                with nm.trace(**inputs, logits_to_keep=1):
                    _steer_body(nm, lm, config, rows)
                    last = nnsight.save(_envoy(nm, lm.adapter.unembed).output[:, -1])
                sequences = None
    out = _answers(lm, last)
    for b, rec in enumerate(out):
        if rows is not None:
            rec.update(rows[b].summary())
        if sequences is not None:
            new = sequences[b, inputs["input_ids"].shape[1]:]
            rec["text"] = lm.processor.tokenizer.decode(new, skip_special_tokens=True)
    return out


def finite_or_none(v):
    """JSON-safe float: None for None/NaN/inf."""
    return None if v is None or not math.isfinite(v) else float(v)

"""One run of the model through nnsight, optionally steered, capturing the decision token.

This is the only module that talks to nnsight. The HF model is never modified: steering
happens inside ``model.trace(...)`` by editing the values nnsight hands us, in forward
order, at each decoder layer:

1. ``layer.inputs``: the un-normalised residual ``x`` (``resid_pre``) and, in decode, the
   layer's KV cache before this token is appended. The barrier step is a pure function
   of ``x``, the layer's weights and the keys (:mod:`mclcbf_diag.barrier`); for the
   ``resid_pre`` site ``α·θ*`` is added to ``x`` in place, as the seed does.
2. ``input_layernorm.output``: the ``ln1_out`` site adds the step here instead.
3. the softmax inside eager attention: the ``attn_logits`` site rescales the target
   rows' image mass (equal to a logit shift on image keys); knockouts use the same place.
4. ``self_attn.output[1]``, ``post_attention_layernorm.input``, ``layer.output``: the
   attention pattern, ``resid_mid`` and ``resid_post`` of the decision token are saved.

Prefill is a plain forward; ``max_new_tokens > 0`` runs ``generate`` with a bounded
``tracer.iter`` and repeats the body for every generated token (the decode phase).
Gradients are computed inside the barrier functions under a local ``enable_grad``; the
trace itself runs under ``no_grad``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import reduce

import nnsight
import torch
from nnsight import NNsight

from . import barrier as B
from .errors import UserError
from .probes import fit_mask, rms_norm, rounding_survival
from .models import LoadedModel


@dataclass(frozen=True)
class AttentionEdit:
    """Rescale image attention mass in every layer: ``factor`` 0 = knockout, 2 = double.

    ``tokens`` is ``"decision"`` (the last prompt token only) or ``"after_image"`` (every
    text token after the image, the decision token included).
    """

    factor: float
    tokens: str = "decision"


@dataclass
class LayerCapture:
    resid_pre_in: torch.Tensor  # decision token, before any step
    resid_pre: torch.Tensor = None  # after the step (what the layer used)
    resid_mid: torch.Tensor = None
    resid_post: torch.Tensor = None
    attn: torch.Tensor = None  # [heads, keys] decision-query softmax row
    step: B.StepResult | None = None
    barrier_h: float | None = None  # head-mean image mass under the configured span
    extra: dict = field(default_factory=dict)  # grad_norm_f32, dh_recomputed, logit_shift …
    keys: torch.Tensor | None = None  # [kv_heads, seq, hd] the barrier used (tests)


@dataclass
class StepCapture:
    phase: str
    step: int
    n_keys: int
    layers: dict[int, LayerCapture] = field(default_factory=dict)
    final_logits: torch.Tensor | None = None


@dataclass
class RunCapture:
    prompt_len: int
    steps: list[StepCapture]
    span: torch.Tensor  # bool [prompt]: the image span the barrier was configured with
    detected: torch.Tensor  # bool [prompt]: input_ids == image token id
    generated: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None  # prompt embeddings, image features merged in


def envoy_at(root, path: str):
    """The nnsight envoy at a dotted adapter path (``"model.language_model.layers"``)."""
    return reduce(getattr, path.split("."), root)


_WRAPPED: "weakref.WeakKeyDictionary[torch.nn.Module, NNsight]" = weakref.WeakKeyDictionary()


def traced(model: torch.nn.Module) -> NNsight:
    """The nnsight wrapper of a model, built once (wrapping walks every module)."""
    if model not in _WRAPPED:
        _WRAPPED[model] = NNsight(model)
    return _WRAPPED[model]


class _Run:
    """State for one traced run; ``body`` is called once per forward (prefill, decode…)."""

    def __init__(self, lm: LoadedModel, inputs: dict, config: B.BarrierConfig | None, steer: bool,
                 multiplier: float, edit: AttentionEdit | None, keep_keys: bool, keep_embeds: bool):
        self.lm, self.config, self.multiplier, self.edit = lm, config, multiplier, edit
        self.keep_keys, self.keep_embeds, self.embeds = keep_keys, keep_embeds, None
        self.steer = steer and config is not None
        ids = inputs["input_ids"][0]
        self.prompt_len = ids.shape[0]
        self.detected = ids == lm.tokens.image_token_id
        if not bool(self.detected.any()):
            raise UserError(f"no image token (id {lm.tokens.image_token_id}) in the prompt; the prompt "
                            "must contain <image> (e.g. 'USER: <image>\\n{question}\\nASSISTANT:')")
        self.steered = set(B.steered_layers(config, lm.n_layers)) if config else set()
        self.span = B.image_span_mask(config, ids, lm.tokens.image_token_id) if config else self.detected
        self.weights = {i: lm.layer_weights(i) for i in self.steered}
        self.last_image = int(torch.nonzero(self.detected).max())
        self.steps: list[StepCapture] = []

    # -- helpers -------------------------------------------------------------------
    def _targets(self, phase: str, seq: int) -> torch.Tensor:
        if phase == "decode":
            return torch.tensor([seq - 1])
        return B.target_positions(self.config, self.span)

    def _edit_rows(self, phase: str, seq: int) -> torch.Tensor:
        if self.edit.tokens == "decision" or phase == "decode":
            return torch.tensor([seq - 1])
        return torch.arange(self.last_image + 1, seq)

    def _barrier_inputs(self, cap: LayerCapture, x, i, phase, cos, sin, past_keys, key_offset) -> dict:
        """What h(x) at layer ``i`` needs: target residuals, keys, RoPE and query positions."""
        w = self.weights[i]
        cos, sin = cos.to(x.device), sin.to(x.device)  # layers may sit on other GPUs (device_map)
        targets = self._targets(phase, x.shape[1])
        keys = B.project_keys(x[0], w, cos[0], sin[0]) if past_keys is None else past_keys
        if self.keep_keys:
            cap.keys = keys.clone()
        normalized = self.config.site == "ln1_out"
        x_t = x[0, targets]
        if not bool(torch.isfinite(x_t).all()):
            raise UserError(f"the residual stream entering layer {i} is NaN or inf at the steered token(s) "
                            f"(dtype {x.dtype}); the model overflowed or its weights hold NaN/inf: try "
                            "--dtype float32 or check the checkpoint")
        if normalized:
            x_t = rms_norm(x_t, w.ln_weight, w.ln_eps)
        return {"x_tok": x_t, "keys": keys, "w": w, "cos_tok": cos[0, targets], "sin_tok": sin[0, targets],
                "image_mask": self.span, "query_positions": targets + key_offset, "normalized": normalized}

    def _barrier_value(self, cap: LayerCapture, x, i, phase, cos, sin, past_keys, key_offset) -> None:
        """h only (no step), computed exactly as the steered run computes it."""
        a = self._barrier_inputs(cap, x, i, phase, cos, sin, past_keys, key_offset)
        a["x_tok"] = a["x_tok"].to(B.resolve_grad_dtype(self.config, x.dtype))
        cap.barrier_h = float(B.barrier_value(**a)[0])

    def _barrier_step(self, cap: LayerCapture, x, i, phase, cos, sin, past_keys, key_offset):
        """Compute the step at layer ``i``; returns (targets, tensor to add or None)."""
        cfg = self.config
        tau, alpha = B.phase_params(cfg, phase)
        a = self._barrier_inputs(cap, x, i, phase, cos, sin, past_keys, key_offset)
        x_t, gdt = a["x_tok"], B.resolve_grad_dtype(cfg, x.dtype)
        h, g = B.barrier_gradient(**a, dtype=gdt)
        g32 = g if gdt == torch.float32 else B.barrier_gradient(**a, dtype=torch.float32)[1]
        cap.extra["grad_norm_f32"] = float(g32.float().norm())
        if not torch.isfinite(g).all():
            raise UserError(f"the barrier gradient at layer {i} is NaN or inf (dtype {gdt}); "
                            "try --set grad_dtype=float32 or a float32 model")
        st = B.step(h, g, float(x_t.float().norm()), tau, alpha, cfg)
        applied = (st.applied * self.multiplier).to(x.dtype)
        cap.step, cap.barrier_h = st, st.h
        cap.extra["dh_predicted"] = st.predicted_delta_h * self.multiplier
        with torch.no_grad():
            h_after, _ = B.barrier_value(**{**a, "x_tok": x_t.to(gdt) + applied.to(gdt)})
        cap.extra["dh_recomputed"] = float(h_after) - st.h
        cap.extra["rounding_survival"] = rounding_survival(x_t, applied.float(), x.dtype)
        return self._targets(phase, x.shape[1]), applied if st.active else None

    # -- the body, run inside the trace ---------------------------------------------
    def body(self, nm, phase: str, step_index: int):
        lm, cfg, ad = self.lm, self.config, self.lm.adapter
        if phase == "prefill" and self.keep_embeds:
            self.embeds = envoy_at(nm, ad.language_model).inputs[1]["inputs_embeds"].detach().clone()
        cos, sin = envoy_at(nm, ad.rotary_emb).output
        layers = envoy_at(nm, ad.layers)
        cap_step = None
        for i in range(lm.n_layers):
            layer = layers[i]
            args, kwargs = layer.inputs
            x = args[0]
            seq = x.shape[1]
            if cap_step is None:
                offset = 0 if phase == "prefill" else self._past_len(kwargs, i)
                cap_step = StepCapture(phase, step_index, offset + seq)
            cap = LayerCapture(resid_pre_in=x[0, -1].detach().clone())
            add = None
            steer_here = self.steer and i in self.steered
            measure_here = cfg is not None and i in self.steered and cfg.site in ("resid_pre", "ln1_out")
            if measure_here:
                past = None if phase == "prefill" else self._past_keys(kwargs, i)
                offset = cap_step.n_keys - seq
                if steer_here:
                    targets, add = self._barrier_step(cap, x, i, phase, cos, sin, past, offset)
                else:
                    self._barrier_value(cap, x, i, phase, cos, sin, past, offset)
                if add is not None and cfg.site == "resid_pre":
                    x[0, targets] += add
            if add is not None and cfg.site == "ln1_out":
                y = envoy_at(layer, ad.layer_input_norm).output
                y[0, targets] += add
            cap.resid_pre = x[0, -1].detach().clone()
            if (steer_here and cfg.site == "attn_logits") or self.edit is not None:
                probs = envoy_at(layer, ad.layer_attention_softmax).output
                if steer_here and cfg.site == "attn_logits":
                    self._steer_logits(cap, probs, phase, seq)
                if self.edit is not None:
                    self._apply_edit(probs, phase, seq)
            attn = envoy_at(layer, ad.layer_attention).output[1]
            if attn is None:
                raise UserError("the model returned no attention probabilities; load it with "
                                "attn_implementation='eager' (load_model does this)")
            cap.attn = attn[0, :, -1, :].detach().float().clone()
            if cfg is not None and i in self.steered:
                mask = fit_mask(self.span, cap.attn.shape[-1], cap.attn.device)
                realised = float(cap.attn[:, mask].sum(-1).mean())  # the model's own h after any step
                if cap.barrier_h is None:
                    cap.barrier_h = realised
                elif steer_here:
                    cap.extra["dh_realised"] = realised - cap.barrier_h
            cap.resid_mid = envoy_at(layer, ad.layer_post_attention_norm).input[0, -1].detach().clone()
            cap.resid_post = layer.output[0, -1].detach().clone()
            cap_step.layers[i] = cap
        cap_step.final_logits = envoy_at(nm, ad.unembed).output[0, -1].detach().float().clone()
        self.steps.append(cap_step)

    def _cache_layer(self, kwargs, i):
        cache = self.lm.adapter.layer_cache(self.lm.model, kwargs)
        if cache is None or len(cache.layers) <= i or cache.layers[i].keys is None:
            return None
        return cache.layers[i]

    def _past_len(self, kwargs, i) -> int:
        layer = self._cache_layer(kwargs, i)
        return 0 if layer is None else layer.keys.shape[-2]

    def _past_keys(self, kwargs, i) -> torch.Tensor:
        layer = self._cache_layer(kwargs, i)
        if layer is None:
            raise UserError("decode-phase steering needs the KV cache; generation ran without one")
        return layer.keys[0].detach().clone()

    def _steer_logits(self, cap: LayerCapture, probs, phase: str, seq: int) -> None:
        tau, alpha = B.phase_params(self.config, phase)
        rows = self._targets(phase, seq)
        edited, mass, delta, target = B.shift_image_logits(probs[0][:, rows], self.span, tau,
                                                           alpha * self.multiplier)
        h = float(mass.mean())
        cap.barrier_h = h
        cap.extra["barrier_tau"] = tau
        cap.extra["barrier_active"] = float(h < tau)
        if h >= tau:
            return
        probs[0][:, rows] = edited
        cap.extra["logit_shift"] = delta.mean(-1)  # per head, averaged over target rows
        cap.extra["dh_predicted"] = float(target.mean()) - h

    def _apply_edit(self, probs, phase: str, seq: int) -> None:
        rows = self._edit_rows(phase, seq)
        p = probs[0][:, rows]
        mask = fit_mask(self.detected, p.shape[-1], p.device)
        m = p.float()[..., mask].sum(-1)
        target = (m * self.edit.factor).clamp(max=1 - 1e-4)
        probs[0][:, rows] = B.rescale_image_probs(p, mask, target)


def run(lm: LoadedModel, inputs: dict, config: B.BarrierConfig | None = None, *, steer: bool = True,
        max_new_tokens: int = 0, multiplier: float = 1.0, edit: AttentionEdit | None = None,
        keep_keys: bool = False, keep_embeds: bool = False) -> RunCapture:
    """Run the model once and capture the decision token.

    With ``steer=False`` (or no config) nothing is changed, but the barrier value h under
    the configured span is still measured at the steered layers ("h before").
    ``keep_embeds`` saves the prompt embeddings (image features merged in). When ``inputs``
    carries them as ``inputs_embeds`` (see :func:`with_embeds`), a prefill run feeds them to
    the language model directly, skipping the vision tower, whose output no intervention
    here can change.
    """
    state = _Run(lm, inputs, config, steer, multiplier, edit, keep_keys, keep_embeds)
    nm = traced(lm.model)
    feed = {k: v for k, v in inputs.items() if k != "inputs_embeds"}
    if "inputs_embeds" in inputs and max_new_tokens <= 0:
        feed = {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        if max_new_tokens <= 0:
            with nm.trace(**feed):
                state.body(nm, "prefill", 0)
            generated = None
        else:
            with nm.trace(**feed, fn=lm.model.generate, max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, do_sample=False) as tracer:
                for s in tracer.iter[:max_new_tokens]:
                    state.body(nm, "prefill" if s == 0 else "decode", s)
                generated = nnsight.save(tracer.result)
    return RunCapture(state.prompt_len, state.steps, state.span.cpu(), state.detected.cpu(), generated,
                      state.embeds)


def with_embeds(inputs: dict, capture: RunCapture) -> dict:
    """``inputs`` plus the prompt embeddings a ``keep_embeds`` run saved (if it saved any)."""
    if capture.inputs_embeds is None:
        return inputs
    return {**inputs, "inputs_embeds": capture.inputs_embeds}

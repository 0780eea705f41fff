"""Run the model through nnsight, with or without an intervention, and capture what it did.

This is the only module that talks to nnsight. The HF model is never modified: an
intervention acts inside ``model.trace(...)`` by editing the values nnsight hands over, in
forward order, at each decoder layer it targets (the sites of
:mod:`mclcbf_diag.interventions.base`):

1. ``layer.inputs``: the residual ``x`` entering the layer (the ``residual`` site) and, in
   decode, the layer's KV cache before the new token is appended (for look-ahead keys);
2. ``input_layernorm.output``: where :meth:`Site.add` with ``after_norm=True`` lands;
3. the softmax inside eager attention (the ``attention`` site);
4. ``self_attn.output[1]``, ``post_attention_layernorm.input``, ``layer.output``: with
   ``capture=True`` the decision token's attention row, ``resid_mid`` and ``resid_post`` are
   saved at every layer; the attention pattern is shown to the ``pattern`` site in captured
   runs and, with ``patterns=True``, in logits-only runs too.

One entry point, :func:`forward`, returns one result type, :class:`RunResult`. Every run is
batched: a single sample is a batch of one. A batch is left-padded (see
:mod:`mclcbf_diag.engine.batch`), so the last position is every row's decision token. What a
run keeps is a :class:`Keep` (every layer's capture of each row, the look-ahead's keys, the
embeddings, the components attribution needs). A run can continue (:class:`Continuation`) from
a cached prefix, where only the positions from ``start`` on are computed, the earlier keys come
from the cache, and the sites see padded positions ``start …``; or skip the layers before the
first edited one. With ``generate`` it runs ``generate``; a run keeping every layer repeats the
body for every generated token under a bounded ``tracer.iter`` (the decode phase). Gradients an
intervention needs are its own business (a local ``enable_grad``); the trace runs under
``no_grad``.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import reduce
from typing import NamedTuple

import nnsight
import torch
from nnsight import NNsight

from ..errors import UserError
from ..interventions import as_intervention
from ..interventions.base import Batched, Intervention, Readout, Row, Site, rows_of
from ..interventions.views import shares_image_features, with_aux_rows
from ..measurements.probes import rounding_survival
from ..models import LoadedModel
from ..models.adapter import sequence_inputs
from ..models.mrope import position_ids
from ..models.projection import project_keys


@dataclass
class LayerCapture:
    """The decision token at one layer (one row), and what the intervention recorded there."""

    resid_pre_in: torch.Tensor  # entering the layer, before any step
    resid_pre: torch.Tensor = None  # after the step (what the layer used)
    resid_mid: torch.Tensor = None
    resid_post: torch.Tensor = None
    attn: torch.Tensor = None  # [heads, keys] decision-query softmax row (the row's own keys)
    metrics: dict = field(default_factory=dict)  # the intervention's and the step's scalar records
    heads: dict = field(default_factory=dict)  # per-head records [H]
    added: torch.Tensor | None = None  # the vector added at the decision token [d], if any
    keys: torch.Tensor | None = None  # [kv_heads, n, hd] look-ahead keys (keep_keys, tests)
    # with ``components`` (prefill): "z" [H·hd] the heads' outputs before o_proj and "mlp" [d] the MLP's
    # output at the decision token, "normed" [keys, d] input_layernorm's output at every key (what v_proj
    # read; nnsight reaches the softmax inside attention only when nothing inside it was read first)
    parts: dict = field(default_factory=dict)


@dataclass
class StepCapture:
    phase: str
    decode_step: int  # 0: the prompt's forward; k: the one reading the k-th generated token
    n_keys: int
    layers: dict[int, LayerCapture] = field(default_factory=dict)
    final_logits: torch.Tensor | None = None  # what the answer is read from
    # the model's own final logits where a decoding-level method combined them into final_logits (None: the same)
    model_logits: torch.Tensor | None = None

    @property
    def own_logits(self) -> torch.Tensor:
        """The model's own final logits (what its activations computed, whatever the answer is read from)."""
        return self.final_logits if self.model_logits is None else self.model_logits


@dataclass
class RunCapture:
    """One row's run: every (phase, step), plus what identifies its prompt."""

    prompt_len: int
    steps: list[StepCapture]
    detected: torch.Tensor  # bool [prompt]: input_ids == image token id
    row_records: dict = field(default_factory=dict)  # whole-model records of the intervention
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
    """State of one traced run; :meth:`body` is called once per forward (prefill, decode …)."""

    def __init__(self, lm: LoadedModel, rows: list[Row], intervention: Intervention | None, *, steer: bool,
                 dose: float, capture: bool, start: int = 0, prefix_keys: dict | None = None,
                 prefix_rows: list[int] | None = None, keep_keys: bool = False, patterns: bool = False,
                 components: bool = False):
        self.lm, self.rows, self.iv = lm, rows, intervention
        self.components = components and capture
        self.patterns = patterns  # show the pattern site its layers' attention in a logits-only run too
        self.steer, self.dose = steer and intervention is not None, dose
        self.capture, self.keep_keys = capture, keep_keys
        self.prefix_start, self.prefix_keys = start, prefix_keys or {}
        self.prefix_rows = list(range(len(rows))) if prefix_rows is None else list(prefix_rows)
        self.targeted = set(intervention.layers(lm.n_layers)) if intervention is not None else set()
        self.read_layers = set(intervention.readout_layers(lm.n_layers)) if intervention is not None else set()
        self.layer_out: dict[int, torch.Tensor] = {}  # readout layer → [B, d] its output at the last position
        self.reading = False  # whether the last forward opened the logits site (set by body)
        self._weights: dict[int, object] = {}
        self.rotary = None  # (cos, sin) of the layer a residual site is at (see body and _layer)
        # records[row][(phase, step)][layer] = {metric: value}; heads likewise
        self.records = [dict() for _ in rows]
        self.heads = [dict() for _ in rows]
        self.added: list[dict] = [dict() for _ in rows]  # (phase, step, layer) → decision-token vector
        self.keys_seen: list[dict] = [dict() for _ in rows]
        self.steps: list[list[StepCapture]] = [[] for _ in rows]
        self.embeds = None
        self.skip = (0, None)  # (layers not run, the residual entering the first one run)
        if intervention is not None:
            intervention.begin(rows, lm.n_layers)

    # -- what sites ask for -----------------------------------------------------------------
    def layer_weights(self, i: int):
        if i not in self._weights:
            self._weights[i] = self.lm.layer_weights(i)
        return self._weights[i]

    def keys(self, site: Site, row: Row) -> torch.Tensor:
        i, x = site.layer, site.tensor
        if self.phase == "decode":  # the cache before the new token, then the new token's own key (from x)
            cache = self.lm.adapter.layer_cache(self.lm.model, self.layer_kwargs)
            if cache is None or len(cache.layers) <= i or cache.layers[i].keys is None:
                raise UserError("decode-phase steering needs the KV cache; generation ran without one")
            cos, sin = self.rotary
            w = self.layer_weights(i)
            dev = w.q_weight.device
            own = project_keys(x[row.index].to(dev), w, cos[row.index].to(dev), sin[row.index].to(dev))
            cached = cache.layers[i].keys[row.index, :, row.pad:].detach()
            keys = torch.cat([cached.to(dev, own.dtype), own], dim=-2)
        else:
            lo = max(self.start, row.pad)
            cos, sin = self.rotary
            sl = slice(lo - self.start, None)
            # on the layer's own device: under a device map, x arrives from the previous layer's
            w = self.layer_weights(i)
            dev = w.q_weight.device
            keys = project_keys(x[row.index, sl].to(dev), w, cos[row.index, sl].to(dev), sin[row.index, sl].to(dev))
            if lo > row.pad:
                cached = self.prefix_keys[i][self.prefix_rows[row.index], :, row.pad:lo]
                keys = torch.cat([cached.to(dev, keys.dtype), keys], dim=-2)
        if self.keep_keys:
            self.keys_seen[row.index][(self.phase, self.decode_step, i)] = keys.clone()
        return keys

    def add(self, site: Site, row: Row, positions: torch.Tensor, vector: torch.Tensor, after_norm: bool):
        """Add ``vector`` to the row's residual at ``positions``, for :meth:`~mclcbf_diag.interventions.base.Site.add`.

        Records the step's ``rounding_survival`` at the layer, and keeps the vector added at the row's current position
        (``added``, by phase, decode step and layer).

        Args:
            site: the residual site (its layer and tensor).
            row: the batch row.
            positions: [n] the row's own positions (padding not counted).
            vector: [n, d] the step, one per position.
            after_norm: add it to the layer's normalised input (the input norm's output, applied once the norm has run)
                instead of the residual.
        """
        x = site.tensor
        idx = site.query_index(row, positions)
        v = vector.reshape(len(idx), -1).to(x.device)
        before = x[row.index, idx]
        if after_norm:
            w = self.layer_weights(site.layer)
            before = w.norm(before.to(w.ln_weight.device)).to(x.device)
            self.pending_norm.append((row.index, idx, v.to(x.dtype)))
        else:
            x[row.index, idx] += v.to(x.dtype)
        self.record(row, site.layer, "rounding_survival", rounding_survival(before, v.float(), x.dtype))
        at = (positions == site.current(row)).nonzero().flatten()
        if at.numel():
            self.added[row.index][(self.phase, self.decode_step, site.layer)] = v[at[0]].detach().float().clone()

    def record(self, row: Row, layer: int, metric: str, value) -> None:
        """Keep a scalar record of ``row`` at ``layer`` (−1: whole-model) for this forward's phase and step.

        Args:
            row: the batch row.
            layer: the layer (−1: a whole-model record).
            metric: the record's name (a glossary metric).
            value: a number (kept as float) or None.
        """
        step = self.records[row.index].setdefault((self.phase, self.decode_step), {})
        step.setdefault(layer, {})[metric] = None if value is None else float(value)

    def record_heads(self, row: Row, layer: int, metric: str, values: torch.Tensor) -> None:
        """Keep a per-head record [H] of ``row`` at ``layer`` for this forward's phase and step (a float32 CPU copy).

        Args:
            row: the batch row.
            layer: the layer.
            metric: the record's name (a glossary metric).
            values: [H] one value per head.
        """
        step = self.heads[row.index].setdefault((self.phase, self.decode_step), {})
        step.setdefault(layer, {})[metric] = values.detach().float().cpu().clone()

    def whole_model(self, row: Row) -> dict:
        """The row's whole-model records of the prompt's forward (layer −1: the ``logits`` site's)."""
        return dict(self.records[row.index].get(("prefill", 0), {}).get(-1, {}))

    def recorded(self, row: Row, layer: int, metric: str):
        return self.records[row.index].get((self.phase, self.decode_step), {}).get(layer, {}).get(metric)

    # -- the body, run inside the trace -------------------------------------------------------
    def body(self, nm, phase: str, step: int, keep_embeds: bool = False) -> None:
        """One forward inside an nnsight trace: every visited layer in order (:meth:`_layer`), then the step's captures.

        Values are read in the model's forward order (:meth:`_captured` reads the captures).

        Args:
            nm: the traced model (nnsight envoy).
            phase: ``"prefill"`` or ``"decode"``; an intervention acts in decode only where it ``steers_decode()``.
            step: the decode step (0 for the prefill).
            keep_embeds: keep the language model's ``inputs_embeds`` of the prefill.
        """
        lm, ad = self.lm, self.lm.adapter
        self.phase, self.decode_step, self.pending_norm = phase, step, []
        acting = self.iv is not None and (phase == "prefill" or self.iv.steers_decode())
        sites = self.iv.open_sites(self.steer) if acting else frozenset()
        targeted = self.targeted if acting else set()
        if phase == "prefill" and keep_embeds:
            self.embeds = envoy_at(nm, ad.language_model).inputs[1]["inputs_embeds"].detach().clone()
        if "residual" in sites and targeted and ad.rotary_emb is not None:
            self.rotary = envoy_at(nm, ad.rotary_emb).output
        layers = envoy_at(nm, ad.layers)
        for i in range(self.skip[0]):
            layers[i].skip(self.skip[1])  # only the last one's output is used: by the first layer run
        self.reading = "logits" in sites
        read = {max(i, 0) for i in self.read_layers} if self.reading else set()  # −1: layer 0's input
        visit = range(lm.n_layers) if self.capture else sorted(targeted | read)
        caps: dict[int, list[LayerCapture]] = {}
        self.start = self.prefix_start
        self.layer_out = {}
        parts = self.components and phase == "prefill"
        for n, i in enumerate(visit):
            self._layer(layers[i], i, n, phase, i in targeted, sites, caps, parts)
        if self.capture:
            self._captured(nm, phase, step, visit, caps)

    def _layer(self, layer, i: int, n: int, phase: str, here: bool, sites, caps: dict, parts: bool) -> None:
        """Layer ``i`` of the forward (the ``n``-th visited): its sites, and its captures when capturing."""
        lm, ad = self.lm, self.lm.adapter
        if self.capture or (here and "residual" in sites) or n == 0:
            args, kwargs = layer.inputs
            x = args[0]
            if n == 0:
                self.seq = x.shape[1]  # the positions this forward runs
                if phase == "decode":
                    cache = ad.layer_cache(lm.model, kwargs)
                    self.start = 0 if cache is None else cache.get_seq_length()
            self.layer_kwargs = kwargs
            if i == 0 and self.reading and -1 in self.read_layers:
                self.layer_out[-1] = x[:, -1].detach().clone()
            if self.capture:
                caps[i] = [LayerCapture(resid_pre_in=x[r.index, -1].detach().clone()) for r in self.rows]
            if here and "residual" in sites:
                # the (cos, sin) this layer is called with: Gemma 3's layer types each have their own rotary base
                self.rotary = kwargs.get("position_embeddings", self.rotary)
                self.iv.residual(Site(self, "residual", i, x))
            if self.pending_norm or parts:
                y = envoy_at(layer, ad.layer_input_norm).output
                for b, idx, v in self.pending_norm:
                    y[b, idx] += v.to(y.device)
                self.pending_norm = []
            if self.capture:
                for r in self.rows:
                    caps[i][r.index].resid_pre = x[r.index, -1].detach().clone()
        if here and "attention" in sites:
            self.iv.attention(Site(self, "attention", i, envoy_at(layer, ad.layer_attention_softmax).output))
        if parts:
            z = envoy_at(layer, ad.layer_o_proj).input
        show = here and "pattern" in sites and (self.capture or self.patterns)
        if self.capture or show:
            attn = envoy_at(layer, ad.layer_attention).output[1]
            if attn is None:
                raise UserError("the model returned no attention probabilities; load it with "
                                "attn_implementation='eager' (load_model does this)")
            if show:
                self.iv.pattern(Site(self, "pattern", i, attn))
        if self.capture:
            mid = envoy_at(layer, ad.layer_post_attention_norm).input
            mlp = envoy_at(layer, ad.layer_mlp).output if parts else None
            post = layer.output
            for r in self.rows:
                c = caps[i][r.index]
                if parts:  # (the values are v_proj of "normed", at every key: see attribute.dla)
                    c.parts = {"z": z[r.index, -1].detach().clone(), "mlp": mlp[r.index, -1].detach().clone(),
                               "normed": y[r.index, r.pad:].detach().clone()}
                c.attn = attn[r.index, :, -1, r.pad:].detach().float().clone()
                c.resid_mid = mid[r.index, -1].detach().clone()
                c.resid_post = post[r.index, -1].detach().clone()
        if self.reading and i in self.read_layers:
            self.layer_out[i] = (post if self.capture else layer.output)[:, -1].detach().clone()

    # -- the logits site, after the forward ----------------------------------------------------
    def layer_logits(self, outputs: dict, layer: int, final_norm: bool) -> torch.Tensor:
        """[B, vocab] float32: a readout layer's output at the last position through the unembedding.

        Args:
            outputs: readout layer → [B, d] its output at the last position (−1: layer 0's input).
            layer: the readout layer.
            final_norm: apply the final norm before the unembedding.

        Returns:
            [B, vocab] float32.

        Raises:
            ValueError: ``layer`` is not among the intervention's readout layers (a programming error).
        """
        if layer not in outputs:
            raise ValueError(f"layer {layer} is not among the intervention's readout_layers")  # programming error
        ad = self.lm.adapter
        with torch.no_grad(), self.lm.onloaded(ad.final_norm, ad.unembed):
            norm, head = self.lm.final_norm(), self.lm.model.get_submodule(ad.unembed)
            x = outputs[layer]
            if final_norm:
                x = norm(x.to(next(norm.parameters()).device))
            return head(x.to(head.weight.device)).float()

    def decoded(self, logits: torch.Tensor) -> torch.Tensor:
        """The scores [B, vocab] the answer is read from: the intervention's ``logits`` site's, or ``logits``."""
        if not self.reading:
            return logits
        site = Readout(self, logits, self.layer_out)
        with torch.no_grad():
            self.iv.readout(site)
        return site.scores

    def _captured(self, nm, phase: str, step: int, visit, caps: dict) -> None:
        """The step's captures of every row: each visited layer's, its records, and the final logits."""
        logits = envoy_at(nm, self.lm.adapter.unembed).output[:, -1].detach().float().clone()
        if phase == "prefill":
            self.batch_logits = logits  # every row's, auxiliary rows included (see forward)
        for r in self.rows:
            cap = StepCapture(phase, step, self.start + self.seq - r.pad)
            for i in visit:
                c = caps[i][r.index]
                c.metrics = self.records[r.index].get((phase, step), {}).get(i, {})
                c.heads = self.heads[r.index].get((phase, step), {}).get(i, {})
                c.added = self.added[r.index].get((phase, step, i))
                c.keys = self.keys_seen[r.index].get((phase, step, i))
                cap.layers[i] = c
            cap.final_logits = logits[r.index]
            self.steps[r.index].append(cap)

def _refuse_generation(intervention: Intervention | None, steer: bool, generating: bool) -> None:
    """A UserError before any forward when a decoding-level method would have to act on generated tokens."""
    if generating and intervention is not None and steer and "logits" in intervention.open_sites(True):
        raise UserError(f"--intervention {intervention.name} chooses tokens from its own combined scores, which "
                        "transformers' generate cannot take: generate through mclcbf_diag.engine.decode.generate "
                        "(what pope --generate and trace --max-new-tokens do; OPERA generates by its beam search "
                        "instead: pope --decoding beam), or read a first-token answer")


def _aux_features(lm: LoadedModel, inputs: dict, rows: list[Row], intervention: Intervention | None, whole: bool):
    """The image features of the intervention's auxiliary rows (:meth:`Intervention.aux_features`) when they can be
    rows of this forward: a prepared steering run of whole prompts with shared image features (``whole``), by a
    method that changes no activation (so it may be prepared after the forward) and reads the ``logits`` site; else
    None."""
    if (not whole or intervention is None or "logits" not in intervention.open_sites(True)
            or intervention.activation_part() is not None or not shares_image_features(inputs)):
        return None
    return intervention.aux_features(lm, inputs, rows)


def _decoded_captures(state: "_Run", rows: list[Row], last: torch.Tensor) -> torch.Tensor:
    """The scores the answer is read from, set as each captured row's ``final_logits`` (its model's own kept in
    ``model_logits`` where a decoding-level method combined them)."""
    last = state.decoded(last.float())
    for r in rows:
        step = state.steps[r.index][0]
        if state.reading:
            step.model_logits = step.final_logits
        step.final_logits = last[r.index]
    return last


@dataclass(frozen=True)
class Keep:
    """What a forward keeps beyond the answer's scores and the intervention's per-row records."""

    layers: bool = True  # every layer's capture of each row's decision token (a RunCapture per row)
    keys: bool = False  # the keys a look-ahead saw (LayerCapture.keys)
    embeds: bool = False  # the prompt embeddings, image features merged in (RunCapture.inputs_embeds)
    components: bool = False  # what direct logit attribution needs (LayerCapture.parts), in the prefill
    patterns: bool = False  # without ``layers``: still show the ``pattern`` site its layers' attention


@dataclass(frozen=True)
class Continuation:
    """Where a forward picks up instead of computing every position from the first layer.

    ``start``/``prefix_keys``: the positions from ``start`` on are computed, the earlier keys come from a cached
    prefix (the caller passes the cache in the model kwargs and only those positions in the inputs);
    ``prefix_rows[b]``: the row of ``prefix_keys`` that row ``b`` continues (default ``b``); ``full_mask``: the
    rows' 2-D padding mask over the whole prompt, when the inputs carry a prepared 4-D mask
    (:mod:`mclcbf_diag.models.shared_prefix`). ``skip_to``/``entering``: layers ``0 … skip_to−1`` are not run
    and layer ``skip_to`` gets ``entering`` (``[B, s, d]``, the residual a plain forward had there; valid when
    nothing is edited or captured before that layer).
    """

    start: int = 0
    prefix_keys: dict | None = None
    prefix_rows: list[int] | None = None
    full_mask: torch.Tensor | None = None
    skip_to: int = 0
    entering: torch.Tensor | None = None


@dataclass
class RunResult:
    """What one traced forward of a batch gives back."""

    logits: torch.Tensor  # [B, vocab] float32: the scores each row's answer is read from, at its last position
    records: list[dict]  # per row: {layer: {metric: value}} of the prompt's forward (layer −1: whole model)
    captures: list[RunCapture] | None = None  # per row, with Keep.layers
    sequences: torch.Tensor | None = None  # [B, prompt + new] with ``generate``


def greedy(max_new_tokens: int) -> dict | None:
    """``generate`` kwargs for ``max_new_tokens`` greedy tokens, all of them generated (None for none)."""
    if max_new_tokens <= 0:
        return None
    return dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)


def _feed(lm: LoadedModel, inputs: dict, generating: bool) -> dict:
    """What the traced model is called with: saved embeddings replace the prompt's ids and pixels, except when
    generating (``generate`` embeds its own tokens). Without the ids the model cannot derive positions, so they are
    passed: the inputs' own, or the family's (Qwen-VL's 3-D M-RoPE ids, :func:`~mclcbf_diag.models.mrope.position_ids`).
    """
    if "inputs_embeds" not in inputs:
        return inputs
    if generating:
        return {k: v for k, v in inputs.items() if k != "inputs_embeds"}
    if "input_ids" in inputs:  # a prompt with its embeddings saved (with_embeds): the language model runs on them
        feed = {"inputs_embeds": inputs["inputs_embeds"], "attention_mask": inputs["attention_mask"],
                "position_ids": inputs["position_ids"] if "position_ids" in inputs else position_ids(lm, inputs)}
        return {**feed, **sequence_inputs(inputs)}  # Gemma 3's token types: an image's tokens attend both ways
    return inputs


def forward(lm: LoadedModel, inputs: dict, intervention: Intervention | None = None, *, steer: bool = True,
            dose: float = 1.0, keep: Keep = Keep(), full_ids: torch.Tensor | None = None,
            continuation: Continuation = Continuation(), generate: dict | None = None, prepare: bool = True,
            **model_kwargs) -> RunResult:
    """One traced forward of a left-padded batch (a single prompt: a batch of one), intervened or not.

    Args:
        inputs: the model's inputs (``input_ids`` or ``inputs_embeds``, ``attention_mask``, pixels …).
        intervention: what acts on the forward; with ``steer=False`` (or None) nothing is changed, but the
            intervention still measures what it would act on (its "before").
        dose: multiplies what the intervention changes (the dose-response).
        keep: what to keep besides the scores and records (:class:`Keep`).
        full_ids: the rows' whole prompts, when ``inputs`` holds embeddings or only a continuation's positions.
        continuation: a cached prefix or skipped layers to continue from (:class:`Continuation`).
        generate: kwargs of ``generate``. A run keeping every layer is traced at each of ``max_new_tokens``
            steps, so every one must be generated (:func:`greedy` builds such kwargs), and the decode-phase sites
            act where the intervention ``steers_decode()``; otherwise only the prompt's forward is traced.
        prepare: whether to call ``intervention.prepare`` (False: the caller did, with the full inputs).
        **model_kwargs: passed to the model (a cache, ``use_cache``).

    Returns:
        A :class:`RunResult`: the scores each answer is read from (a decoding-level method's, where it acts),
        the per-row records, the per-row captures with ``keep.layers`` and the generated sequences.
    """
    intervention, cont, generating = as_intervention(intervention), continuation, generate is not None
    ids = inputs["input_ids"] if full_ids is None else full_ids
    mask = cont.full_mask if cont.full_mask is not None else inputs.get("attention_mask", torch.ones_like(ids))
    rows = rows_of(ids, mask, lm.tokens.image_token_id)
    _refuse_generation(intervention, steer, generating)
    main = inputs
    whole = (steer and prepare and not generating and not cont.start and not cont.skip_to
             and "input_ids" in inputs and inputs["input_ids"].shape == ids.shape)
    features = _aux_features(lm, inputs, rows, intervention, whole)
    if features is not None:  # the auxiliary view's rows under the main rows: prepared from this forward's logits
        inputs = with_aux_rows(inputs, features)
    elif prepare and intervention is not None:
        intervention.prepare(lm, inputs, rows)
    state = _Run(lm, rows, intervention, steer=steer, dose=dose, capture=keep.layers, start=cont.start,
                 prefix_keys=cont.prefix_keys, prefix_rows=cont.prefix_rows, keep_keys=keep.keys,
                 patterns=keep.patterns, components=keep.components)
    if cont.skip_to:
        if keep.layers or cont.skip_to > min(state.targeted | {max(i, 0) for i in state.read_layers}, default=0):
            raise ValueError("skip_to must not pass a captured or edited layer")  # programming error
        state.skip = (cont.skip_to, cont.entering)
    last, sequences = _traced_forward(lm, state, _feed(lm, inputs, generating), keep, generate, model_kwargs)
    if features is not None:
        every = state.batch_logits if keep.layers else last
        intervention.prepare_batched(lm, main, rows, Batched(aux_logits=every[len(rows):].float()))
        last = None if last is None else last[:len(rows)]
    if keep.layers:
        last = _decoded_captures(state, rows, torch.stack([state.steps[r.index][0].final_logits for r in rows]))
    else:
        last = state.decoded(last.float())
    records = [state.records[r.index].get(("prefill", 0), {}) for r in rows]  # the logits site's too (layer −1)
    if not keep.layers:
        return RunResult(last, records, None, sequences)
    captures = [RunCapture(r.length, state.steps[r.index], r.image.clone(),
                           {**(intervention.row_records(r) if intervention is not None else {}),
                            **state.whole_model(r)},
                           None if sequences is None else sequences[r.index:r.index + 1],
                           None if state.embeds is None else state.embeds[r.index:r.index + 1]) for r in rows]
    return RunResult(last, records, captures, sequences)


def _traced_forward(lm: LoadedModel, state: _Run, feed: dict, keep: Keep, generate: dict | None,
                    model_kwargs: dict):
    """The nnsight trace itself: ``(last-position logits [B, vocab] or None when every layer is captured,
    generated sequences or None)``."""
    nm, last, sequences = traced(lm.model), None, None
    with torch.no_grad():
        if generate is None:
            with nm.trace(**feed, logits_to_keep=1, **model_kwargs):  # only the decision position is read
                state.body(nm, "prefill", 0, keep.embeds)
                if not keep.layers:
                    last = nnsight.save(envoy_at(nm, lm.adapter.unembed).output[:, -1])
        else:
            with nm.trace(**feed, fn=lm.model.generate, **generate, **model_kwargs) as tracer:
                if keep.layers:
                    for s in tracer.iter[:generate["max_new_tokens"]]:
                        state.body(nm, "prefill" if s == 0 else "decode", s, keep.embeds)
                else:
                    state.body(nm, "prefill", 0)
                    last = nnsight.save(envoy_at(nm, lm.adapter.unembed).output[:, -1])
                sequences = nnsight.save(tracer.result)
    return last, sequences


def with_embeds(inputs: dict, capture: RunCapture) -> dict:
    """``inputs`` plus the prompt embeddings a forward keeping ``Keep.embeds`` saved (if it saved any)."""
    if capture.inputs_embeds is None:
        return inputs
    return {**inputs, "inputs_embeds": capture.inputs_embeds}


class PrefixRun(NamedTuple):
    """What :func:`prefix_forward` keeps of a batch's plain forward."""

    logits: torch.Tensor  # [B, vocab] at the last position
    cache: object  # the KV cache of every position
    embeds: torch.Tensor  # [B, S, d] prompt embeddings, image features merged in
    layer_inputs: list | None  # per layer: [B, S − states_from, d] the residual entering it (or None)


def prefix_forward(lm: LoadedModel, inputs: dict, *, states_from: int | None = None) -> PrefixRun:
    """A plain forward of a batch that keeps what later runs continue from.

    The embeddings are read from the language model's input, so a continuation from any
    position needs neither the vision tower nor the image placeholders. With ``states_from``
    it also keeps the residual entering every decoder layer at positions ``states_from …``: a
    continuation whose edits all lie at layer L or later starts there (:class:`Continuation`'s
    ``skip_to``), since the layers before compute what this forward computed.
    """
    lang = reduce(getattr, lm.adapter.language_model.split("."), lm.model)
    got = {"states": []}

    def grab(module, args, kwargs):
        got["embeds"] = kwargs.get("inputs_embeds")

    def grab_state(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        got["states"].append(x[:, states_from:].detach().clone())

    hooks = [lang.register_forward_pre_hook(grab, with_kwargs=True)]
    if states_from is not None:
        hooks += [layer.register_forward_pre_hook(grab_state, with_kwargs=True)
                  for layer in lm.adapter.decoder_layers(lm.model)]
    try:
        with torch.no_grad():
            out = lm.model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return PrefixRun(out.logits[:, -1], lm.adapter.output_cache(lm.model, out), got["embeds"],
                     got["states"] if states_from is not None else None)


class Activations(NamedTuple):
    """What :func:`activations_forward` keeps of a batch's plain forward (every position)."""

    logits: torch.Tensor  # [B, vocab] at the last position (float32)
    cache: object  # the KV cache of every position (None without ``cache``)
    resid: list  # per layer: [B, T, d] the residual entering it
    z: list  # per layer: [B, T, H·hd] the heads' outputs before o_proj
    mlp: list  # per layer: [B, T, d] the MLP's output
    grads: dict | None  # with ``grad_of``: {"resid"|"z"|"mlp": per layer [B, T, …]} ∂margin/∂(that activation)


@contextmanager
def attention_implementation(lm: LoadedModel, name: str):
    """Within the block, the language model's attention runs as transformers' ``name`` (e.g. ``"sdpa"``).

    The model is loaded with eager attention, the only implementation that returns probabilities; a
    forward that reads none (no ``attention`` or ``pattern`` site, no captured attention row) may use a
    faster one. Set on the decoder's config, as :func:`mclcbf_diag.models.shared_prefix.continuing` does,
    so the causal mask is built for it too; restored on exit.
    """
    config = lm.adapter.layer_part(lm.model, 0, "layer_attention").config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def activations_forward(lm: LoadedModel, inputs: dict, *, cache: bool = False,
                        grad_of: tuple[int, int] | None = None, attention: str = "sdpa",
                        intervention: Intervention | None = None) -> Activations:
    """One plain forward of a batch keeping every layer's residual input, head outputs and MLP output.

    Plain PyTorch hooks, no edit: the model computes what it always computes, with transformers'
    ``attention`` implementation (default ``"sdpa"``: no probabilities are read here, and it is faster
    than eager attention forward and backward; the numbers agree to rounding). With ``grad_of =
    (yes_id, no_id)`` the forward records an autograd graph from the language model's input
    embeddings on (the vision tower stays outside it) and one backward of the summed margins
    ``logit(yes) − logit(no)`` at the last position gives ∂margin/∂activation for every row (rows
    do not interact, so each row's gradient is its own margin's). The model's weights get no
    gradient: ``torch.autograd.grad`` computes only the kept activations' (``requires_grad`` of the
    weights is left as it is).

    With ``intervention`` the forward is the intervened one, traced as :func:`forward` traces it (eager
    attention, the intervention's sites); the hooks keep the tensors the layers used, so an intervention's
    in-place edit of a layer's input is in what they keep. No gradient then.

    Args:
        inputs: a left-padded batch's model inputs (``input_ids``, ``attention_mask``, pixels …).
        cache: whether to keep the KV cache of every position (:attr:`Activations.cache`).
        grad_of: ``(yes_id, no_id)``: also the gradients of each row's margin (:attr:`Activations.grads`).
        attention: transformers' attention implementation for a plain forward (an intervened one is eager).
        intervention: an intervention to apply (prepared here on ``inputs``); None: the plain forward.

    Returns:
        An :class:`Activations`, every tensor detached.
    """
    if intervention is not None:
        if grad_of is not None:
            raise ValueError("activations_forward: no gradient through an intervened forward")  # programming error
        attention = "eager"
    n = len(lm.adapter.decoder_layers(lm.model))
    got = {"resid": [None] * n, "z": [None] * n, "mlp": [None] * n}
    want = grad_of is not None
    hooks = _keeping_hooks(lm, got, want)
    grads = None
    try:
        with torch.set_grad_enabled(want), attention_implementation(lm, attention):
            if intervention is None:
                out = lm.model(**inputs, use_cache=cache, logits_to_keep=1)
            else:
                rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)
                intervention.prepare(lm, inputs, rows)
                state = _Run(lm, rows, intervention, steer=True, dose=1.0, capture=False)
                nm = traced(lm.model)
                with nm.trace(**inputs, use_cache=cache, logits_to_keep=1):
                    state.body(nm, "prefill", 0)
                    out = nnsight.save(nm.output)
            last = out.logits[:, -1].float()
            if intervention is not None:
                last = state.decoded(last)
            if want:  # only these tensors' gradients: no weight gradient is computed or stored
                yes, no = grad_of
                kinds = list(got)
                flat = [t for k in kinds for t in got[k]]
                g = torch.autograd.grad((last[:, yes] - last[:, no]).sum(), flat)
                grads = {k: list(g[j * n:(j + 1) * n]) for j, k in enumerate(kinds)}
    finally:
        for hook in hooks:
            hook.remove()
    det = {k: [t.detach() for t in v] for k, v in got.items()}
    return Activations(last.detach(), lm.adapter.output_cache(lm.model, out) if cache else None,
                       det["resid"], det["z"], det["mlp"], grads)


def _keeping_hooks(lm: LoadedModel, got: dict, want_grad: bool) -> list:
    """Hooks that keep each layer's residual input, head outputs (o_proj's input) and MLP output in ``got``; with
    ``want_grad`` the language model's input embeddings start an autograd graph (the vision tower stays out)."""
    lang = reduce(getattr, lm.adapter.language_model.split("."), lm.model)

    def keep(kind, i, t):
        got[kind][i] = t

    def embeds(module, args, kwargs):
        if want_grad and kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"].detach().requires_grad_(True)
            return args, kwargs
        return None

    hooks = [lang.register_forward_pre_hook(embeds, with_kwargs=True)]
    for i, layer in enumerate(lm.adapter.decoder_layers(lm.model)):
        o_proj = layer.get_submodule(lm.adapter.layer_o_proj)
        mlp = layer.get_submodule(lm.adapter.layer_mlp)
        hooks += [
            layer.register_forward_pre_hook(
                lambda m, a, k, i=i: keep("resid", i, a[0] if a else k["hidden_states"]), with_kwargs=True),
            o_proj.register_forward_pre_hook(lambda m, a, i=i: keep("z", i, a[0])),
            mlp.register_forward_hook(lambda m, a, out, i=i: keep("mlp", i, out)),
        ]
    return hooks


def run_patched(lm: LoadedModel, feed: dict, *, layer: int, entering: torch.Tensor,
                z_source: torch.Tensor | None = None, z_mask: torch.Tensor | None = None,
                mlp_source: torch.Tensor | None = None, mlp_mask: torch.Tensor | None = None,
                **model_kwargs) -> torch.Tensor:
    """Last-position logits ``[B, vocab]`` of a batch that starts at decoder layer ``layer`` and patches it.

    Layers ``0 … layer−1`` are not run: layer ``layer`` gets ``entering`` ``[B, s, d]`` (with ``layer
    == 0``, ``feed``'s ``inputs_embeds`` play that part). In that layer, where ``z_mask`` is true the
    heads' outputs before ``o_proj`` (``[B, s, H·hd]``) are replaced by ``z_source``, and where
    ``mlp_mask`` is true the MLP's output by ``mlp_source`` (masks broadcast against the values).
    ``feed``/``model_kwargs`` are those of a continuation (:mod:`mclcbf_diag.models.shared_prefix`).

    Args:
        feed: the continuation's model inputs (``inputs_embeds`` of its positions, positions, mask).
        layer: the decoder layer the forward starts at, and the one it patches.
        entering: ``[B, s, d]`` the residual entering ``layer`` (unused with ``layer == 0``).
        z_source: ``[B, s, H·hd]`` the heads' outputs to put in before ``o_proj`` (None: no head patched).
        z_mask: where ``z_source`` replaces them.
        mlp_source: ``[B, s, d]`` the MLP output to put in (None: no MLP patched).
        mlp_mask: where ``mlp_source`` replaces it.
        **model_kwargs: passed to the model (the prefix's cache, ``use_cache``).

    Returns:
        ``[B, vocab]`` float32 logits at the last position.
    """
    ad = lm.adapter
    nm = traced(lm.model)
    with torch.no_grad():
        with nm.trace(**feed, logits_to_keep=1, **model_kwargs):
            layers = envoy_at(nm, ad.layers)
            for i in range(layer):
                layers[i].skip(entering)
            if z_source is not None:
                z = envoy_at(layers[layer], ad.layer_o_proj).input
                z[:] = torch.where(z_mask, z_source, z)
            if mlp_source is not None:
                out = envoy_at(layers[layer], ad.layer_mlp).output
                out[:] = torch.where(mlp_mask, mlp_source, out)
            last = nnsight.save(envoy_at(nm, ad.unembed).output[:, -1])
    return last.float()

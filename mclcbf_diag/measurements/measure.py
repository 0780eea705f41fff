"""Turn captured runs into tidy records: every probe family, per layer and head.

Pure post-processing: the tensors saved by :mod:`mclcbf_diag.engine.runner` plus the model's
weights go through the math in :mod:`mclcbf_diag.measurements.probes`; nothing here runs the model.
Attention masses always use the image span *detected* from ``input_ids`` (the truth),
whatever an intervention was configured with; the intervention's own records (its
``metrics`` glossary) are passed through as they were recorded. Every figure is computed in
float32 from the captured states (the model's forward keeps its dtype); the propagation
gets the noise floor of the model's dtype (``propagation_floor``, :mod:`mclcbf_diag.measurements.noise`).
"""

from __future__ import annotations

import math

import torch

from ..engine.runner import LayerCapture, RunCapture, StepCapture
from ..models import LoadedModel
from ..models.tokens import Sink
from . import noise
from . import probes as P
from .outcomes import read_batch
from .records import NO_HEAD, NO_LAYER, frame


class _Rows:
    """Column-wise accumulator for the records of one (question_id, condition, phase, decode_step)."""

    def __init__(self, question_id, condition, phase, decode_step):
        self.key = {"question_id": question_id, "condition": condition, "phase": phase, "decode_step": decode_step}
        self.layer, self.head, self.metric, self.value = [], [], [], []

    def add(self, layer: int, metric: str, value, head: int = NO_HEAD) -> None:
        """One row.

        Args:
            layer: the layer (−1: a whole-model record).
            metric: the metric's name.
            value: the value (None: NaN).
            head: the head (−1: a whole-layer record).
        """
        self.layer.append(layer)
        self.head.append(head)
        self.metric.append(metric)
        self.value.append(float(value) if value is not None else math.nan)

    def add_layers(self, layers: list[int], metric: str, values: torch.Tensor) -> None:
        """One row per layer (head −1)."""
        self.layer += layers
        self.head += [NO_HEAD] * len(layers)
        self.metric += [metric] * len(layers)
        self.value += values.tolist()

    def add_heads(self, layer: int, metric: str, values: torch.Tensor) -> None:
        """One row per head plus the head mean (head −1)."""
        vals = values.tolist()
        n = len(vals)
        self.layer += [layer] * (n + 1)
        self.head += list(range(n)) + [NO_HEAD]
        self.metric += [metric] * (n + 1)
        self.value += vals + [sum(vals) / n]

    @property
    def rows(self) -> dict[str, list]:
        n = len(self.value)
        return {**{k: [v] * n for k, v in self.key.items()}, "layer": self.layer, "head": self.head,
                "metric": self.metric, "value": self.value}


def _norm_stack(lm: LoadedModel, layers: list[int], part: str, device):
    """Gains [n, d] (the weight, or Gemma's 1 + w: ``adapter.norm_gain``) and eps [n] of one norm (``part``) across
    ``layers``, on ``device``, in float32."""
    path = f"{lm.adapter.layers}.{{}}.{getattr(lm.adapter, part)}"
    with lm.onloaded(*(path.format(i) for i in layers)):  # offloaded under a device map
        mods = [lm.adapter.layer_part(lm.model, i, part) for i in layers]
        weights = torch.stack([lm.adapter.norm_gain(lm.model, m).to(device) for m in mods])
    return weights, torch.tensor([lm.adapter.norm_eps(m) for m in mods], device=device)


def _step_rows(caps: list[LayerCapture], d: int, device) -> torch.Tensor | None:
    """The vector added at the decision token per layer [n, d]; zero rows where nothing was added."""
    if all(c.added is None for c in caps):
        return None
    return torch.stack([c.added.reshape(-1)[:d].to(device) if c.added is not None else torch.zeros(d, device=device)
                        for c in caps])


def _propagation_floors(dtype, dist: torch.Tensor, base_post: torch.Tensor, out_base: torch.Tensor):
    """Noise floors of the propagation per layer [n] and after the final norm (:mod:`mclcbf_diag.measurements.noise`).

    The two forwards are identical up to the first layer whose output differs; from there
    each layer adds its roundings (in the model's ``dtype``), so layer k counts the layers
    from that first one to k, and the final norm one rounding more.
    """
    changed = torch.nonzero(dist > 0).flatten()
    first = int(changed[0]) if changed.numel() else 0
    norms = base_post.norm(dim=-1).tolist()
    floors = torch.tensor([noise.propagation_floor(dtype, nb, max(k - first + 1, 1)) for k, nb in enumerate(norms)])
    final = noise.propagation_floor(dtype, float(out_base.float().norm()), len(norms) - first, final_norm=True)
    return floors, final


def run_sink(lm: LoadedModel, run: RunCapture, base: RunCapture | None = None) -> Sink | None:
    """The attention sink of a run's prompt: the BOS where the prompt starts with one, else the measured sink.

    The measured sink comes from the baseline's prefill rows of the decision token (``base``, or
    ``run`` itself when it is the baseline), averaged over the captured layers and heads
    (:func:`mclcbf_diag.models.tokens.find_sink`), so a baseline and its intervened run share one sink.
    None where there is no BOS and no captured row to measure it from.
    """
    ref = base if base is not None else run
    steps = [s for s in ref.steps if s.phase == "prefill" and s.layers] or [s for s in ref.steps if s.layers]
    rows = None
    if steps:
        caps = [steps[0].layers[i] for i in sorted(steps[0].layers)]
        rows = torch.stack([c.attn.float().cpu()[..., : run.prompt_len] for c in caps])  # [layers, heads, prompt]
    if rows is None and not lm.adds_bos:
        return None
    return lm.prompt_sink(run.prompt_len, rows, run.detected.cpu())


def step_records(lm: LoadedModel, cap: StepCapture, image_mask: torch.Tensor, *, question_id, condition: str,
                 base: StepCapture | None = None, sink: Sink | None = None) -> dict[str, list]:
    """Every probe at one forward (phase, decode step), all layers at once (batched over layers).

    Args:
        lm: the loaded model (its final norm, layer norms, unembedding and answer tokens are read).
        cap: the forward's captures (every captured layer, the final logits).
        image_mask: bool [prompt] the image-token positions (the attention masses' image keys).
        question_id: the records' ``question_id``.
        condition: the records' ``condition`` (``baseline`` or the intervened run's).
        base: the baseline's capture of the same forward, for the propagation records; None: none written.
        sink: the prompt's attention sink (:func:`run_sink`); None: position 0 (the BOS).

    Returns:
        The records as columns (one list per record key: the key fields, ``layer``, ``head``, ``metric``,
        ``value``), ready for :func:`~mclcbf_diag.measurements.records.frame`.
    """
    rows = _Rows(question_id, condition, cap.phase, cap.decode_step)
    layers = sorted(cap.layers)
    caps = [cap.layers[i] for i in layers]
    dev = caps[0].resid_pre_in.device  # under a device map the layers' captures may sit on several devices
    stack = lambda name: torch.stack([getattr(c, name).to(dev, torch.float32) for c in caps])  # noqa: E731
    pre_in, pre, mid, post = stack("resid_pre_in"), stack("resid_pre"), stack("resid_mid"), stack("resid_post")
    d = pre.shape[-1]
    fn = lm.final_norm()
    with lm.onloaded(lm.adapter.final_norm):
        final_w, final_eps = lm.adapter.norm_gain(lm.model, fn).to(dev), lm.adapter.norm_eps(fn)
    ln1 = _norm_stack(lm, layers, "layer_input_norm", dev)
    ln2 = _norm_stack(lm, layers, "layer_post_attention_norm", dev)
    theta = _step_rows(caps, d, pre.device)

    for site, x in (("resid_pre", pre), ("resid_mid", mid), ("resid_post", post)):
        rows.add_layers(layers, f"{site}_norm", x.norm(dim=-1))
    rows.add_layers(layers, "resid_pre_in_norm", pre_in.norm(dim=-1))
    for i, c in zip(layers, caps):
        if c.added is not None:
            rows.add(i, "added_norm", c.added.float().norm())
    norms = (("ln1", pre_in, ln1), ("ln2", mid, ln2), ("ln_final", post, (final_w, torch.full((len(layers),),
                                                                                           final_eps))))
    _gain_records(rows, layers, norms, pre, theta)
    attn = torch.stack([c.attn.to(dev) for c in caps])  # [n, H, K]
    masses = P.attention_masses(attn.reshape(-1, attn.shape[-1]), image_mask,
                                sink_positions=(sink.position if sink is not None else 0,))
    for kind, per_head in masses.items():
        for i, heads in zip(layers, per_head.reshape(len(layers), -1)):
            rows.add_heads(i, f"attn_{kind}_mass", heads)
    yes_no = lm.unembed_weight()[[lm.tokens.yes_id, lm.tokens.no_id]].to(dev)  # two rows, not the vocabulary
    rows.add_layers(layers, "logit_lens_margin", P.yes_no_margin(post, final_w, final_eps, yes_no, 0, 1))
    for i, c in zip(layers, caps):
        for metric, value in c.metrics.items():
            rows.add(i, metric, value)
        for metric, values in c.heads.items():
            rows.add_heads(i, metric, values)
    if base is not None:
        base_post = torch.stack([base.layers[i].resid_post.to(dev, torch.float32) for i in layers])
        _propagation_records(rows, layers, post, base_post, (final_w, final_eps), caps[0].resid_post.dtype)
    logits = cap.final_logits
    _answer_records(rows, read_batch(logits[None], lm.tokens)[0])
    if sink is not None:
        rows.add(NO_LAYER, "sink_is_bos", sink.kind == "BOS")
        rows.add(NO_LAYER, "sink_position", sink.position)
    states = torch.stack([pre, mid, post])
    # NaN/inf numbers, plus the states whose mean square overflows float32: there every RMSNorm of
    # the model divides by inf, its output is 0 and the logits no longer depend on the input
    overflow = int((~torch.isfinite(states.pow(2).mean(-1)) & torch.isfinite(states).all(-1)).sum())
    rows.add(NO_LAYER, "nonfinite_values",
             int((~torch.isfinite(states)).sum()) + overflow + int((torch.isnan(logits) | (logits == math.inf)).sum()))
    for token, tid in {**lm.tokens.yes_variants, **lm.tokens.no_variants}.items():
        rows.add(NO_LAYER, f"final_logit:{token}", logits[tid])
    return rows.rows


def _gain_records(rows, layers: list[int], norms, pre: torch.Tensor, theta) -> None:
    """Each RMSNorm's scale and Jacobian gains (along the step, orthogonal, radial) per layer; ln1 also before
    the step (what the barrier linearised at) and after it (what the layer used)."""
    for name, x, (w, eps) in norms:
        g = P.rms_norm_gains(x, w, eps, theta)
        rows.add_layers(layers, f"{name}_scale", g["rms"])
        rows.add_layers(layers, f"{name}_gain_theta", g["gain_along"])
        rows.add_layers(layers, f"{name}_gain_theta_backward", g["gain_along_backward"])
        rows.add_layers(layers, f"{name}_gain_orthogonal", g["gain_orthogonal"])
        rows.add_layers(layers, f"{name}_gain_radial", g["gain_radial"])
        if name == "ln1":
            rows.add_layers(layers, "ln1_out_norm", (w * x / g["rms"][:, None]).norm(dim=-1))
            rms_used = P.rms_norm_gains(pre, w, eps, None)["rms"]
            rows.add_layers(layers, "ln1_scale_post", rms_used)
            rows.add_layers(layers, "ln1_out_norm_post", (w * pre / rms_used[:, None]).norm(dim=-1))


def _propagation_records(rows, layers: list[int], post, base_post, final_norm, dtype) -> None:
    """‖x_steered − x_base‖ leaving each layer and after the final norm, with their noise floors."""
    final_w, final_eps = final_norm
    dist = (post - base_post).norm(dim=-1)
    rows.add_layers(layers, "propagation", dist)
    rows.add_layers(layers, "propagation_rel", dist / base_post.norm(dim=-1).clamp_min(1e-30))
    out_s, out_b = (P.rms_norm(x[-1], final_w, final_eps) for x in (post, base_post))
    rows.add(NO_LAYER, "propagation", P.propagation_distance(out_s, out_b))
    floors, final_floor = _propagation_floors(dtype, dist, base_post, out_b)
    rows.add_layers(layers, "propagation_floor", floors)
    rows.add(NO_LAYER, "propagation_floor", final_floor)


def _answer_records(rows, reading) -> None:
    """The run's Yes/No reading as whole-model records (layer −1)."""
    rows.add(NO_LAYER, "final_margin", reading.margin)
    rows.add(NO_LAYER, "answer_yes", reading.margin > 0)
    rows.add(NO_LAYER, "p_yes", reading.p_yes)
    rows.add(NO_LAYER, "p_no", reading.p_no)
    rows.add(NO_LAYER, "top_is_yes_no", reading.top_yes_no)
    rows.add(NO_LAYER, "top_token_id", reading.top_id)
    rows.add(NO_LAYER, "logits_finite", reading.finite)


def row_records(run: RunCapture, *, question_id, condition: str) -> dict[str, list]:
    """The intervention's whole-model records of the run (layer −1, prefill).

    Args:
        run: the run's capture (its ``row_records``: metric → value).
        question_id: the question's id, on every record.
        condition: the run's condition, on every record.

    Returns:
        Column name → list (tidy records, decode step 0).
    """
    rows = _Rows(question_id, condition, "prefill", 0)
    for metric, value in run.row_records.items():
        rows.add(NO_LAYER, metric, value)
    return rows.rows


def run_records(lm: LoadedModel, run: RunCapture, *, question_id, condition: str,
                base: RunCapture | None = None):
    """All records of one run (every phase and decode step) as a tidy frame.

    Args:
        lm: the loaded model.
        run: the run's captures.
        question_id: the records' ``question_id``.
        condition: the records' ``condition``.
        base: the baseline run of the same prompt, when ``run`` is intervened: adds the intervention's
            whole-model records (:func:`row_records`) and the propagation records, and supplies the sink.

    Returns:
        A tidy frame (:func:`~mclcbf_diag.measurements.records.frame`): one row per record.
    """
    image_mask = run.detected
    parts = [row_records(run, question_id=question_id, condition=condition)] if base is not None else []
    base_steps = {(s.phase, s.decode_step): s for s in base.steps} if base is not None else {}
    sink = run_sink(lm, run, base)
    for cap in run.steps:
        parts.append(step_records(lm, cap, image_mask, question_id=question_id, condition=condition,
                                  base=base_steps.get((cap.phase, cap.decode_step)), sink=sink))
    return frame({k: [v for part in parts for v in part[k]] for k in parts[0]})

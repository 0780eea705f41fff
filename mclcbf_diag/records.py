"""The one record shape every part of the toolkit shares.

A measurement is a row ``(sample, condition, phase, step, layer, head, metric, value)``:

* ``sample``: the POPE question id (or any label the caller picks);
* ``condition``: ``"baseline"`` or ``"steered"`` (explain adds e.g. ``"fix:span"``);
* ``phase``: ``"prefill"`` (the prompt, step 0) or ``"decode"`` (generated tokens, step ≥ 1);
* ``layer``: decoder layer index, or −1 for whole-model quantities (final logits, answer);
* ``head``: attention head, or −1 where the metric is not per head;
* ``metric``: a name from :data:`METRICS` (TransformerLens-style site names);
* ``value``: a float (booleans are 0/1).

Long ("tidy") frames of this shape feed the notebooks, plots, reports and batch runs alike;
``frame.pivot_table`` turns them into whatever wide view a figure needs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["sample", "condition", "phase", "step", "layer", "head", "metric", "value"]
NO_LAYER = -1
NO_HEAD = -1

METRICS = {
    # residual stream at the decision token
    "resid_pre_norm": "‖x‖ entering the layer (after any steering step)",
    "resid_mid_norm": "‖x‖ after attention, before the MLP",
    "resid_post_norm": "‖x‖ leaving the layer",
    "ln1_scale": "RMS r of resid_pre, the input_layernorm divisor",
    "ln2_scale": "RMS r of resid_mid, the post_attention_layernorm divisor",
    "ln_final_scale": "RMS r of resid_post seen by the final norm (logit lens)",
    "ln1_out_norm": "‖input_layernorm(resid_pre)‖, what the attention projections see",
    # RMSNorm Jacobian gains, for each norm: ln1, ln2, ln_final
    "{norm}_gain_theta": "‖J θ*‖/‖θ*‖: forward gain along the steering step",
    "{norm}_gain_theta_backward": "‖Jᵀ θ*‖/‖θ*‖",
    "{norm}_gain_orthogonal": "RMS gain over directions orthogonal to x (≈ ‖γ‖_rms / r)",
    "{norm}_gain_radial": "gain along x̂ (≈ 0: RMSNorm removes the radial direction)",
    # attention pattern of the decision query (per head; head −1 = mean over heads)
    "attn_image_mass": "softmax mass on image keys",
    "attn_sink_mass": "softmax mass on the first (BOS) key",
    "attn_text_mass": "softmax mass on all other keys",
    # logit lens
    "logit_lens_margin": "logit(Yes) − logit(No) of final_norm(resid_post) through lm_head",
    "final_margin": "logit(Yes) − logit(No) of the model's own final logits",
    "final_logit": "final logit of one Yes/No spelling (metric 'final_logit:<token>')",
    "answer_yes": "1 if the final margin is positive",
    # barrier internals (steered layers)
    "barrier_h": "h before the step", "barrier_tau": "τ", "barrier_active": "h < τ",
    "grad_norm": "‖g‖ in the gradient dtype", "grad_norm_f32": "‖g‖ in float32",
    "grad_norm_sq_dtype": "Σg² as computed in the gradient dtype",
    "scale_unclamped": "(τ − h)/(‖g‖² + 1e-6)", "scale": "applied scale", "clamp_active": "clamp bound",
    "theta_norm": "‖θ*‖", "theta_rel": "‖θ*‖/‖x‖", "applied_norm": "‖α θ*‖",
    "dh_predicted": "g·(α θ*)", "dh_recomputed": "h(x + αθ*) − h(x), same keys",
    "dh_realised": "model's own head-mean image mass after the step − h",
    "rounding_survival": "‖round(x + αθ*) − x‖/‖αθ*‖ in the model dtype",
    "logit_shift": "attn_logits site: logit bias added to image keys (per head)",
    # image span (layer −1): configured (barrier) vs detected from input_ids
    "span_configured_tokens": "positions in the configured span", "span_detected_tokens": "image tokens",
    "span_iou": "intersection over union", "span_precision": "share of the span that is image",
    "span_recall": "share of the image inside the span",
    # propagation (steered vs baseline)
    "propagation": "‖x_k^steered − x_k^base‖ at resid_post of layer k",
    "propagation_rel": "propagation / ‖x_k^base‖",
}


def frame(columns: dict[str, list]) -> pd.DataFrame:
    """Columns (one list per record key) → a tidy frame with the canonical column order."""
    typed = {k: np.asarray(columns[k], dtype=_DTYPES.get(k, object)) for k in COLUMNS}
    return pd.DataFrame(typed, columns=COLUMNS)


_DTYPES = {"step": np.int64, "layer": np.int64, "head": np.int64, "value": np.float64}

"""The one record shape every part of the toolkit shares.

A measurement is a row ``(question_id, condition, phase, decode_step, layer, head, metric, value)``:

* ``question_id``: the POPE question id (or any label the caller picks); not the 0-based
  index in the split that ``--sample N`` selects by;
* ``condition``: ``"baseline"`` or ``"steered"`` (explain adds e.g. ``"fix:span"``; trace under a decoding-level
  method adds its auxiliary forwards, ``"view:NAME"``, measured as the baseline is);
* ``phase``: ``"prefill"`` (the prompt) or ``"decode"`` (generated tokens);
* ``decode_step``: 0 for the prompt's (prefill) forward, k for the forward that reads the
  k-th generated token (phase ``"decode"``, k ≥ 1); not the intervention's step (θ*);
* ``layer``: decoder layer index, or −1 for whole-model quantities (final logits, answer);
* ``head``: attention head, or −1 where the metric is not per head;
* ``metric``: a name from :data:`METRICS` (TransformerLens-style site names) or from the
  intervention's own glossary (``Intervention.metrics``; :func:`glossary` joins them);
* ``value``: a float (booleans are 0/1).

A small difference (Δh, propagation, …) has a companion row ``<metric>_floor`` at the same
key: its noise floor in the dtype it was computed in (:mod:`mclcbf_diag.measurements.noise`). Under it the
figure is rounding, not an effect: summaries print "below noise" and no rule concludes from it.

Long ("tidy") frames of this shape feed the notebooks, plots, reports and batch runs alike;
``frame.pivot_table`` turns them into whatever wide view a figure needs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ["question_id", "condition", "phase", "decode_step", "layer", "head", "metric", "value"]
NO_LAYER = -1
NO_HEAD = -1

METRICS = {
    # residual stream at the decision token
    "resid_pre_norm": "‖x‖ entering the layer (after any steering step)",
    "resid_pre_in_norm": "‖x‖ entering the layer, before any steering step",
    "resid_mid_norm": "‖x‖ after attention, before the MLP",
    "resid_post_norm": "‖x‖ leaving the layer",
    "ln1_scale": "RMS r of the residual entering the layer BEFORE any steering step (where the step was linearised)",
    "ln1_scale_post": "RMS r of resid_pre AFTER the step: the input_layernorm divisor the layer used",
    "ln2_scale": "RMS r of resid_mid, the post_attention_layernorm divisor",
    "ln_final_scale": "RMS r of resid_post seen by the final norm (logit lens)",
    "ln1_out_norm": "‖input_layernorm(x)‖ of the residual BEFORE any steering step",
    "ln1_out_norm_post": "‖input_layernorm(resid_pre)‖ AFTER the step: what the attention projections saw",
    # RMSNorm Jacobian gains, for each norm: ln1, ln2, ln_final
    "{norm}_gain_theta": "‖J v‖/‖v‖ for the vector v added at the decision token (ln1: J at x before the step)",
    "{norm}_gain_theta_backward": "‖Jᵀ v‖/‖v‖ for the same v",
    "{norm}_gain_orthogonal": "RMS gain over directions orthogonal to x (≈ ‖γ‖_rms / r)",
    "{norm}_gain_radial": "gain along x̂ (≈ 0: RMSNorm removes the radial direction)",
    # attention pattern of the decision query (per head; head −1 = mean over heads)
    "attn_image_mass": "softmax mass on image keys",
    "attn_sink_mass": "softmax mass on the sink key (BOS, or the measured sink where the text model has no BOS)",
    "attn_text_mass": "softmax mass on all other keys",
    # logit lens
    "logit_lens_margin": "logit(Yes) − logit(No) of final_norm(resid_post) through lm_head",
    "final_margin": "logit(Yes) − logit(No) of the model's own final logits",
    "final_logit": "final logit of one Yes/No spelling (metric 'final_logit:<token>')",
    "answer_yes": "1 if the final margin is positive",
    "p_yes": "softmax probability mass on every Yes spelling at the decision position (full vocabulary)",
    "p_no": "softmax probability mass on every No spelling at the decision position",
    "top_is_yes_no": "1 if the top token at the decision position is a Yes/No spelling (a valid answer)",
    "top_token_id": "id of the top token at the decision position",
    "logits_finite": "1 if no final logit is NaN or +inf (−inf: a token a decoding-level method ruled out)",
    "nonfinite_values": "count of NaN/inf numbers in the decision token's residuals (every layer) and NaN/+inf "
                        "final logits, plus residual states whose mean square overflows float32 (RMSNorm divides by "
                        "inf there)",
    "sink_is_bos": "1 if the sink of attn_sink_mass is the prompt's BOS (position 0), 0 if the prompt has no BOS and "
                   "the sink is measured: the non-image key before the decision token with the largest baseline "
                   "attention from the decision token, averaged over layers and heads (layer −1)",
    "sink_position": "the prompt position of that sink key (layer −1)",
    "label_yes": "1 if the question's label is yes, 0 if no (condition baseline; absent without a label)",
    # fields of a POPE answers row (answers.jsonl, mclcbf_diag.pope.answer), one per language layer
    "baseline_image_mass_{layer}": "POPE answers field: the decision token's head-mean softmax mass on image keys "
                                   "at language layer {layer} in the baseline forward (attn_image_mass, head −1)",
    "steered_image_mass_{layer}": "POPE answers field: the same in the intervened forward, after the "
                                  "intervention's edits (intervened − baseline is compare's d_image_mass_L{layer})",
    # whatever an intervention adds through Site.add, measured by the runner (steered layers)
    "rounding_survival": "‖round(x + v) − x‖/‖v‖ in the model dtype, for the added vector v",
    "added_norm": "‖v‖ of the vector added at the decision token at this layer (before rounding)",
    # what any intervention records when it edits, or drops an edit (mclcbf_diag.measurements.outcomes)
    "logit_shift": "an attention-logit edit: the bias added to the image keys' logits (per head)",
    "step_nonfinite": "1 if the intervention's edit overflowed (NaN/inf); such an edit is not applied",
    "residual_nonfinite": "1 if the residual entering the layer was NaN/inf at the edited positions (not edited there)",
    # propagation (steered vs baseline)
    "propagation": "‖x_k^steered − x_k^base‖ at resid_post of layer k",
    "propagation_rel": "propagation / ‖x_k^base‖",
    "propagation_floor": "noise floor of propagation in the model dtype: eps·‖x_k^base‖·√(4·layers since the first "
                         "changed one) (layer −1: after the final norm, +1 rounding); "
                         "see mclcbf_diag.measurements.noise",
    # the localisation's other direction: the baseline's activation restored in the intervened run (attribute)
    **{f"restore_{k}": f"as local_{k}, the other way: the intervened run with the baseline's activation restored "
                       "there (the intervention acting on at every other site); the share of the intervention's "
                       "change of the margin that is left (1: the site is not needed, 0: all of the change goes "
                       "through it)" for k in ("resid_image", "resid_question", "resid_decision", "head", "mlp")},
    **{f"restore_{k}_margin": f"the intervened run's margin with the baseline's activation of restore_{k} restored"
       for k in ("resid_image", "resid_question", "resid_decision", "head", "mlp")},
    "restore_margin_clean": "the intervened run's margin (restore_*'s 1)",
    "restore_margin_corrupted": "the baseline's margin (restore_*'s 0)",
    "restore_margin_floor": "noise floor of a margin (as local_margin_floor)",
    # attribute --limit N: the components that carry each wrong Yes of a split
    "wrong_yes_margin": "a wrong Yes (label no, Yes/No on top): its margin logit(Yes) − logit(No) (layer −1)",
    "carry_patch_gap": "the clean − corrupted margin of the question's activation patching (layer −1)",
    "carry_dla_head": "a head's direct contribution to the wrong Yes's margin (as dla_head)",
    "carry_dla_mlp": "an MLP's direct contribution to the wrong Yes's margin (as dla_mlp)",
    "carries_dla_head": "1 when carry_dla_head is toward Yes and at least --share of the margin and above the "
                        "margin's noise floor, else 0",
    "carries_dla_mlp": "the same for carry_dla_mlp",
    "carry_patch_head": "a head's denoising recovery (as patch_head) of the wrong Yes against its corruption",
    "carry_patch_mlp": "an MLP's denoising recovery (as patch_mlp)",
    "carries_patch_head": "1 when the image raises the Yes (carry_patch_gap above twice the floor) and the head's "
                          "patch recovers at least --share of it, by more than twice the floor; 0 otherwise; NaN "
                          "when the image does not raise the Yes (patching names no carrier)",
    "carries_patch_mlp": "the same for carry_patch_mlp",
    # direct logit attribution of the margin at the decision token (attribute; mclcbf_diag.measurements.attribution)
    "dla_embed": "direct contribution of the embedding to logit(Yes) − logit(No): u · e, u = γ ⊙ (w_Yes − w_No) / r "
                 "with r the final norm's actual scale (layer −1)",
    "dla_step": "direct contribution of the intervention's edit of the residual entering the layer (0 in a baseline)",
    "dla_attn": "direct contribution of the layer's attention output (every head plus any o_proj bias)",
    "dla_head": "direct contribution of one head's output through its slice of o_proj (head −1: the layer's heads "
                "summed, not averaged)",
    "dla_head_image": "the part of dla_head read from image keys (Σ over image keys of p·v, through o_proj): the "
                      "margin flowing directly from the image through that head (head −1: summed over heads)",
    "dla_head_sink": "the part of dla_head read from the first (BOS) key, when it is not an image token",
    "dla_head_text": "the part of dla_head read from every other key",
    "dla_mlp": "direct contribution of the layer's MLP output",
    "dla_total": "the sum of every direct contribution (equals final_margin up to rounding; layer −1)",
    "dla_residual": "final_margin − dla_total: rounding only (layer −1)",
    "dla_final_scale": "r = √(mean(x²) + ε) of the final norm's input, held fixed by the attribution (layer −1)",
    **{f"d_{k}": f"intervened − baseline of {k}" for k in (
        "dla_embed", "dla_step", "dla_attn", "dla_head", "dla_head_image", "dla_head_sink", "dla_head_text",
        "dla_mlp", "dla_total")},
    # activation patching (condition: denoise = clean activation into the corrupted run, noise = the reverse)
    "patch_resid_image": "normalised recovery (m − m_corrupted)/(m_clean − m_corrupted) of the margin when the "
                         "residual entering the layer is patched at every image token (1: clean, 0: corrupted)",
    "patch_resid_question": "the same, patched at the text tokens after the image before the decision token",
    "patch_resid_decision": "the same, patched at the decision token",
    "patch_head": "the same, one head's output (before o_proj) patched at every text token after the image (with "
                  "--components-at decision: at the decision token only)",
    "patch_mlp": "the same, the layer's MLP output patched at every text token after the image (or the decision "
                 "token only)",
    **{f"patch_{k}_margin": f"logit(Yes) − logit(No) of the run patched as in patch_{k}" for k in (
        "resid_image", "resid_question", "resid_decision", "head", "mlp")},
    "patch_margin_clean": "the clean run's margin the recoveries are normalised by (layer −1)",
    "patch_margin_corrupted": "the corrupted run's margin the recoveries are normalised by (layer −1)",
    "patch_margin_floor": "noise floor of a margin: a clean − corrupted gap under it leaves nothing to recover "
                          "(recoveries are NaN)",
    # attribution patching: the same grid to first order, (a_source − a_dest) · ∂margin/∂a at the destination
    **{f"atp_{k}": f"attribution patching's estimate of patch_{k} (gradient × difference)" for k in (
        "resid_image", "resid_question", "resid_decision", "head", "mlp")},
    **{f"atp_{k}_margin": f"attribution patching's estimate of patch_{k}_margin" for k in (
        "resid_image", "resid_question", "resid_decision", "head", "mlp")},
    "atp_margin_clean": "the plain clean forward's margin (attribution patching's normaliser)",
    "atp_margin_corrupted": "the plain corrupted forward's margin",
    "atp_margin_floor": "noise floor of a margin (as patch_margin_floor)",
    # where the intervention acts: its activations patched into the baseline (condition steered)
    **{f"local_{k}": f"as patch_{k}, with the intervened run's activation put into the baseline run: the share of "
                     "the intervention's change of the margin that it carries (1: all, 0: none)" for k in (
        "resid_image", "resid_question", "resid_decision", "head", "mlp")},
    **{f"local_{k}_margin": f"the baseline's margin with the intervened activation of local_{k} patched in" for k in (
        "resid_image", "resid_question", "resid_decision", "head", "mlp")},
    "local_margin_clean": "the intervened run's margin (the localisation's 1)",
    "local_margin_corrupted": "the baseline's margin (the localisation's 0)",
    "local_margin_floor": "noise floor of a margin: an intervention that moves the margin less leaves nothing to "
                          "localise (NaN)",
    # a decoding-level method (the logits site), whole-model records of its steered run (at every step of a
    # generated trace: the margins at the position that step reads)
    "decoding_model_margin": "the Yes−No margin of the model's own final logits, before the method combined them "
                             "(final_margin is the combined distribution's: ±inf where its cutoff removed Yes or No)",
    "decoding_aux_margin": "the Yes−No margin of what the method contrasts with: the auxiliary forward (VCD: the "
                           "noised image; PAI: the image removed; CausalMM: the counterfactual attention) or the "
                           "early layers' readout (VISTA's SLA)",
    "decoding_contrast_margin": "the Yes−No margin of the combined scores before the plausibility cutoff",
    "decoding_cut_yes": "1 when the plausibility cutoff ruled the Yes token out (probability 0)",
    "decoding_cut_no": "1 when the plausibility cutoff ruled the No token out (probability 0)",
    "atp_spearman_{kind}": "Spearman rank correlation of atp_* and patch_* over the patches of one kind (resid, "
                           "heads, mlp)",
    "atp_failures_{kind}": "count of patches of one kind where atp_* and patch_* differ by more than 0.25: where "
                           "the first order fails",
}


def glossary(intervention=None) -> dict[str, str]:
    """Every metric's meaning: the shared ones and, if given, an intervention's own."""
    return {**METRICS, **(getattr(intervention, "metrics", None) or {})}


def documented(metric: str, intervention=None) -> bool:
    """Whether a record's metric name is in the glossary (``{norm}_…`` and ``final_logit:…`` patterns too)."""
    names = glossary(intervention)
    if metric in names or metric.split(":")[0] in names:
        return True
    if any(metric == key.replace("{kind}", k) for key in names if "{kind}" in key for k in ("resid", "heads", "mlp")):
        return True
    return any(metric == key.replace("{norm}", n) for key in names if "{norm}" in key for n in ("ln1", "ln2",
                                                                                                "ln_final"))


def frame(columns: dict[str, list]) -> pd.DataFrame:
    """Columns (one list per record key) → a tidy frame with the canonical column order."""
    typed = {k: np.asarray(columns[k], dtype=_DTYPES.get(k, object)) for k in COLUMNS}
    return pd.DataFrame(typed, columns=COLUMNS)


_DTYPES = {"decode_step": np.int64, "layer": np.int64, "head": np.int64, "value": np.float64}

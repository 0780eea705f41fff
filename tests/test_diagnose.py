"""diagnose.py: each rule detects its planted cause (and only it) on hand-built records."""

import json
import math

import pandas as pd
import pytest

from mclcbf_diag.diagnose import ORDER, Cause, causes_frame, diagnose, verdict
from mclcbf_diag.errors import UserError
from mclcbf_diag.records import COLUMNS

N_LAYERS, STEERED = 4, (1, 2, 3)
# Per steered layer, condition "steered": a healthy step (h < τ, active, no clamp, exact linear
# prediction that reaches τ, survives rounding, 30% of ‖x‖).
HEALTHY_STEP = {
    "barrier_h": 0.05, "barrier_tau": 0.2, "barrier_active": 1, "grad_norm": 2.0, "grad_norm_f32": 2.0,
    "grad_norm_sq_dtype": 4.0, "scale_unclamped": 0.0375, "scale": 0.0375, "clamp_active": 0,
    "theta_norm": 3.0, "theta_rel": 0.3, "applied_norm": 3.0, "dh_predicted": 0.15, "dh_recomputed": 0.15,
    "dh_realised": 0.15, "rounding_survival": 1.0, "ln1_gain_theta": 1.0,
}
# Per layer, every layer, both conditions.
HEALTHY_LAYER = {"resid_pre_norm": 10.0, "ln1_out_norm": 10.0, "ln1_gain_orthogonal": 0.1,
                 "logit_lens_margin": 0.0}
# Whole model (layer −1), by condition: the answer flips from No to Yes.
HEALTHY_FINAL = {
    ("baseline", "final_margin"): -2.0, ("baseline", "answer_yes"): 0,
    ("steered", "final_margin"): 1.0, ("steered", "answer_yes"): 1, ("steered", "propagation"): 0.5,
    ("steered", "span_iou"): 1.0, ("steered", "span_precision"): 1.0, ("steered", "span_recall"): 1.0,
    ("steered", "span_configured_tokens"): 576, ("steered", "span_detected_tokens"): 576,
}


def _row(cond, layer, metric, value, head=-1, sample="q1"):
    return {"sample": sample, "condition": cond, "phase": "prefill", "step": 0, "layer": layer,
            "head": head, "metric": metric, "value": float(value)}


def frame(rows):
    """Row dicts → a records-shaped frame (built here so the test does not track records.frame)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"step": "int64", "layer": "int64", "head": "int64", "value": "float64"})


def make(step=None, final=None, drop=(), keep=None, sample="q1", extra=()):
    """A records frame: healthy values, overridden by ``step`` (metric → value or {layer: value}) and
    ``final`` ((condition, metric) → value); ``drop`` removes metrics, ``keep`` keeps only these."""
    step = {**HEALTHY_STEP, **(step or {})}
    prop_rel = {layer: 0.3 * (layer >= STEERED[0]) for layer in range(N_LAYERS)}
    prop_rel.update(step.pop("propagation_rel", {}))
    rows = []
    for cond in ("baseline", "steered"):
        for layer in range(N_LAYERS):
            rows += [_row(cond, layer, metric, value, sample=sample) for metric, value in HEALTHY_LAYER.items()]
            if cond == "steered":
                rows.append(_row(cond, layer, "propagation_rel", prop_rel[layer], sample=sample))
                rows.append(_row(cond, layer, "propagation", 10 * prop_rel[layer], sample=sample))
            if layer in STEERED and cond == "baseline":
                rows.append(_row(cond, layer, "barrier_h", HEALTHY_STEP["barrier_h"], sample=sample))
            elif layer in STEERED:
                rows += [_row(cond, layer, metric, value, sample=sample) for metric, value in step.items()]
    for (cond, metric), value in {**HEALTHY_FINAL, **(final or {})}.items():
        if value is not None:
            rows.append(_row(cond, -1, metric, value, sample=sample))
    rows += list(extra)
    rows = [r for r in rows if r["metric"] not in drop and (keep is None or r["metric"] in keep)]
    return frame(rows)


def detected(causes):
    return [c.id for c in causes if c.detected]


PLANTED = {
    "not_applied": dict(step={"applied_norm": 0.0, "theta_norm": 0.0, "theta_rel": 0.0, "dh_predicted": 0.0,
                              "dh_recomputed": 0.0, "dh_realised": 0.0, "rounding_survival": math.nan}),
    "not_applied/no_rows": dict(drop=tuple(HEALTHY_STEP)),
    "span_mismatch": dict(final={("steered", "span_iou"): 572 / 580, ("steered", "span_precision"): 572 / 576,
                                 ("steered", "span_recall"): 572 / 576}),
    "barrier_inactive": dict(step={"barrier_h": 0.3, "barrier_active": 0, "scale": 0.0, "scale_unclamped": -0.025,
                                   "applied_norm": 0.0, "theta_norm": 0.0, "theta_rel": 0.0, "dh_predicted": 0.0,
                                   "dh_recomputed": 0.0, "dh_realised": 0.0, "rounding_survival": math.nan}),
    "gradient_underflow": dict(step={"grad_norm_sq_dtype": 0.0, "grad_norm": 0.0, "grad_norm_f32": 1e-5}),
    "gradient_underflow/rel_err": dict(step={"grad_norm": 1.9}),  # 5% off float32, Σg² nonzero
    "clamp_limited": dict(step={"clamp_active": 1, "scale": 0.5, "scale_unclamped": 127.0}),
    "rounding_absorbed": dict(step={"rounding_survival": 0.1}),
    "step_negligible": dict(step={"theta_rel": 0.001}),
    "step_negligible/normalised": dict(step={"ln1_gain_theta": 0.001}),
    "linearisation_failed": dict(step={"dh_recomputed": 0.02}),
    "damped_downstream": dict(step={"propagation_rel": {3: 0.01}}),
    "damped_downstream/final": dict(final={("steered", "propagation"): 0.0}),
    "margin_unmoved": dict(final={("steered", "final_margin"): -1.5, ("steered", "answer_yes"): 0}),
    "barrier_not_decisive": dict(final={("steered", "final_margin"): -1.99, ("steered", "answer_yes"): 0}),
}


def test_healthy_frame_detects_nothing():
    causes = diagnose(make())
    assert [c.id for c in causes] == list(ORDER)
    assert detected(causes) == []
    assert all(isinstance(c, Cause) and c.strength == 0.0 for c in causes)
    text = verdict(causes)
    assert text.startswith("No cause detected") and "answer_flipped: yes" in text


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_cause_is_the_only_one_detected_and_ranked_first(case):
    cid = case.split("/")[0]
    causes = diagnose(make(**PLANTED[case]))
    assert detected(causes) == [cid]
    assert causes[0].id == cid and causes[0].detected and 0 < causes[0].strength <= 1
    assert len(causes) == len(ORDER) and {c.id for c in causes} == set(ORDER)
    assert verdict(causes).splitlines()[0] == causes[0].sentence


def test_every_cause_has_a_planted_case():
    # decision_token_off_path needs knockout conditions; its cases are below
    assert {k.split("/")[0] for k in PLANTED} | {"decision_token_off_path"} == set(ORDER)


@pytest.mark.parametrize("case, needles", [
    ("clamp_limited", ["0.394%", "scale 0.5 vs 127", "3 of 3"]),
    ("rounding_absorbed", ["10%", "3 of 3"]),
    ("span_mismatch", ["0.986", "99.3%", "576"]),
    ("barrier_inactive", ["0.3", "3 of 3", "τ = 0.2"]),
    ("gradient_underflow", ["0 at 3", "1e-05", "100%"]),
    ("step_negligible", ["0.1%", "30%"]),
    ("linearisation_failed", ["0.15", "0.02", "86.7%"]),
    ("damped_downstream", ["30%", "1%", "layer 3"]),
    ("margin_unmoved", ["-2", "-1.5", "+0.5", "toward"]),
    ("barrier_not_decisive", ["0.2", "0.01", "0.5%"]),
])
def test_sentence_carries_the_measured_numbers(case, needles):
    top = diagnose(make(**PLANTED[case]))[0]
    for needle in needles:
        assert needle in top.sentence, (needle, top.sentence)


def test_not_applied_points_to_its_reason_and_yields_to_barrier_inactive():
    causes = {c.id: c for c in diagnose(make(**PLANTED["barrier_inactive"]))}
    assert not causes["not_applied"].detected
    assert causes["not_applied"].evidence["explained_by"] == "barrier_inactive"
    assert "h ≥ τ" in causes["not_applied"].sentence
    top = diagnose(make(**PLANTED["not_applied/no_rows"]))[0]
    assert "no barrier records" in top.sentence


def test_margin_unmoved_yields_to_barrier_not_decisive_but_keeps_evidence():
    causes = {c.id: c for c in diagnose(make(**PLANTED["barrier_not_decisive"]))}
    assert not causes["margin_unmoved"].detected
    assert causes["margin_unmoved"].evidence["answer_flipped"] == 0
    assert causes["barrier_not_decisive"].strength == pytest.approx(1 - 0.01 / 2)


def _knockouts(dec_margin, dec_yes, after_margin, after_yes):
    return [_row("knockout:decision", -1, "final_margin", dec_margin),
            _row("knockout:decision", -1, "answer_yes", dec_yes),
            _row("knockout:after_image", -1, "final_margin", after_margin),
            _row("knockout:after_image", -1, "answer_yes", after_yes)]


def test_knockout_evidence_says_image_reaches_answer_through_earlier_tokens():
    causes = diagnose(make(**PLANTED["barrier_not_decisive"], extra=_knockouts(-1.95, 0, 1.5, 1)))
    top = causes[0]
    assert top.id == "barrier_not_decisive"
    assert "earlier tokens" in top.sentence and "cannot flip" in top.sentence
    assert top.evidence["knockout_decision_flipped"] == 0 and top.evidence["knockout_after_image_flipped"] == 1
    assert top.evidence["knockout_after_image_margin"] == 1.5
    # the decision-token knockout flips the answer: the decision token *is* on the path
    other = diagnose(make(**PLANTED["barrier_not_decisive"], extra=_knockouts(0.5, 1, 1.5, 1)))[0]
    assert other.id == "barrier_not_decisive" and "earlier tokens" not in other.sentence
    assert "knockout_decision_margin" in other.evidence
    # neither knockout flips: the after-image knockout moving the margin ≥ 3× more still points upstream
    far = diagnose(make(**PLANTED["barrier_not_decisive"], extra=_knockouts(-1.9, 0, -0.5, 0)))[0]
    assert "earlier tokens" in far.sentence
    near = diagnose(make(**PLANTED["barrier_not_decisive"], extra=_knockouts(-1.5, 0, -1.2, 0)))[0]
    assert "earlier tokens" not in near.sentence and near.evidence["knockout_after_image_delta_m"] == pytest.approx(0.8)


@pytest.mark.parametrize("first, second, kwargs", [
    ("rounding_absorbed", "linearisation_failed",
     dict(step={"rounding_survival": 0.1, "dh_recomputed": 0.02})),
    ("span_mismatch", "margin_unmoved",
     dict(final={**PLANTED["span_mismatch"]["final"], **PLANTED["margin_unmoved"]["final"]})),
    ("clamp_limited", "damped_downstream",
     dict(step={"clamp_active": 1, "scale": 0.5, "scale_unclamped": 127.0, "propagation_rel": {3: 0.01}})),
])
def test_two_planted_causes_rank_upstream_first(first, second, kwargs):
    causes = diagnose(make(**kwargs))
    assert detected(causes) == [first, second]
    rest = [c.id for c in causes[2:]]
    assert rest == [cid for cid in ORDER if cid not in (first, second)]
    lines = verdict(causes).splitlines()
    assert lines[0] == causes[0].sentence and second in lines[1] and lines[-1].startswith("answer_flipped")


def test_attn_logits_site_missing_metrics_do_not_crash():
    keep = {"barrier_h", "barrier_active", "dh_predicted", "dh_realised", "final_margin", "answer_yes"}
    shifts = [_row("steered", layer, "logit_shift", 1.5, head=h) for layer in STEERED for h in range(2)]
    causes = diagnose(make(keep=keep | {"logit_shift"}, extra=shifts))
    by = {c.id: c for c in causes}
    assert len(causes) == len(ORDER) and detected(causes) == []
    for cid in ("span_mismatch", "gradient_underflow", "clamp_limited", "rounding_absorbed", "step_negligible",
                "linearisation_failed", "damped_downstream"):
        assert not by[cid].detected and "skipped" in by[cid].evidence
    assert by["not_applied"].evidence["n_fired"] == 3
    # no τ recorded at this site: the target is h + dh_predicted, which dh_realised reaches
    stuck = {("steered", "final_margin"): -1.99, ("steered", "answer_yes"): 0}
    causes = diagnose(make(keep=keep | {"logit_shift"}, extra=shifts, final=stuck))
    assert detected(causes) == ["barrier_not_decisive"] and causes[0].evidence["median_target"] == 0.2
    short = diagnose(make(keep=keep | {"logit_shift"}, extra=shifts, final=stuck, step={"dh_realised": 0.05}))
    assert detected(short) == ["margin_unmoved"]
    # no logit shift anywhere: nothing was applied
    zero = [_row("steered", layer, "logit_shift", 0.0, head=h) for layer in STEERED for h in range(2)]
    assert detected(diagnose(make(keep=keep | {"logit_shift"}, extra=zero))) == ["not_applied"]
    # only the answer is known
    causes = diagnose(make(keep={"final_margin", "answer_yes"}))
    assert detected(causes) == ["not_applied"] and "answer_flipped: yes" in verdict(causes)
    # no margins at all
    assert "unknown" in verdict(diagnose(make(drop=("final_margin", "answer_yes")))).splitlines()[-1]


def test_causes_frame_shape_and_json_evidence():
    causes = diagnose(make(**PLANTED["clamp_limited"]))
    df = causes_frame(causes)
    assert df.shape == (len(ORDER), 7)
    assert list(df.columns) == ["rank", "id", "detected", "strength", "sentence", "threshold", "evidence"]
    assert df["rank"].tolist() == list(range(1, len(ORDER) + 1)) and df["id"].iloc[0] == "clamp_limited"
    ev = json.loads(df["evidence"].iloc[0])
    assert ev["n_clamped"] == 3 and ev["median_scale_unclamped"] == 127.0
    assert all(isinstance(json.loads(s), dict) for s in df["evidence"])


def test_sample_selection():
    both = frame([*make().to_dict("records"), *make(**PLANTED["clamp_limited"], sample="q2").to_dict("records")])
    with pytest.raises(UserError, match="2 samples"):
        diagnose(both)
    assert detected(diagnose(both, sample="q2")) == ["clamp_limited"]
    assert detected(diagnose(both, sample="q1")) == []
    with pytest.raises(UserError, match="no records"):
        diagnose(both, sample="q1", phase="decode")


def _knockout_rows(margins: dict[str, float]) -> pd.DataFrame:
    rows = [{"sample": 0, "condition": c, "phase": "prefill", "step": 0, "layer": -1, "head": -1,
             "metric": m, "value": v} for c, mv in margins.items()
            for m, v in (("final_margin", mv), ("answer_yes", float(mv > 0)))]
    return pd.DataFrame(rows)


def test_decision_token_off_path_from_knockouts_alone():
    margins = {"baseline": 0.82, "steered": 0.82, "knockout:decision": 1.16, "double:decision": 0.96,
               "knockout:after_image": 2.2, "double:after_image": -0.09}
    cause = next(c for c in diagnose(_knockout_rows(margins)) if c.id == "decision_token_off_path")
    assert cause.detected
    assert cause.evidence["max_delta_decision"] == pytest.approx(0.34)
    assert "0.34" in cause.sentence and "1.38" in cause.sentence  # both measured moves
    margins["double:decision"] = -0.5  # a decision-token edit flips: the decision token is on the path
    cause = next(c for c in diagnose(_knockout_rows(margins)) if c.id == "decision_token_off_path")
    assert not cause.detected


def test_decision_token_off_path_skipped_without_knockouts():
    cause = next(c for c in diagnose(_knockout_rows({"baseline": 1.0, "steered": 1.0}))
                 if c.id == "decision_token_off_path")
    assert not cause.detected and "skipped" in cause.evidence


def test_step_negligible_judges_the_applied_step_not_theta():
    # θ* is 30% of ‖x‖, but α = 0.01 adds only 0.3%: negligible.
    causes = diagnose(make(step={"applied_norm": 0.03}))
    first = next(c for c in causes if c.detected)
    assert first.id == "step_negligible"
    assert first.evidence["median_step_rel"] == pytest.approx(0.003)

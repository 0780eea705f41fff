"""Check a diagnosis by experiment: knockouts, dose-response, counterfactual fixes.

* **Attention knockouts** (:func:`knockouts`): remove (factor 0) or double (factor 2) the
  image attention mass, renormalised, in every layer, either at the decision token only or
  at every text token after the image. If only the second moves the answer, the image
  reaches the answer through earlier tokens and steering the decision token's attention
  cannot work.
* **Dose-response** (:func:`dose_response`): the smallest multiplier k on θ* that flips the
  answer, on all steered layers together, or one layer at a time (:func:`per_layer_doses`). Doubling k from 1 brackets the first flip; bisection narrows it. Answers need not
  be monotone in k, so this finds *a* smallest flip on the doubling grid's first bracket.
* **Counterfactual fixes** (:func:`counterfactuals`): switch each suspected knob to its
  corrected value, one at a time and all together.
* **Cause chain** (:func:`cause_chain`): fix the top-ranked cause, diagnose again, repeat
  until the answer flips or no fix is left; causes hide behind each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from tqdm.auto import tqdm

from .data import LLAVA_PROMPT
from .diagnose import diagnose
from .interventions import AttentionKnockout, KnockoutKnobs, as_intervention
from .interventions.mclcbf import FIXES
from .knobs import changed
from .measure import run_records
from .models import LoadedModel
from .runner import RunCapture, run, with_embeds
from .trace import TraceResult, sample_inputs, trace_sample

KNOCKOUTS = {
    "knockout:decision": AttentionKnockout(KnockoutKnobs(0.0, tokens="decision")),
    "knockout:after_image": AttentionKnockout(KnockoutKnobs(0.0, tokens="after_image")),
    "double:decision": AttentionKnockout(KnockoutKnobs(2.0, tokens="decision")),
    "double:after_image": AttentionKnockout(KnockoutKnobs(2.0, tokens="after_image")),
}

# diagnosed cause -> the fix that addresses it (cause chain)
CAUSE_FIX = {
    "span_mismatch": "span",
    "gradient_underflow": "grad_dtype",
    "clamp_limited": "clamp",
    "rounding_absorbed": "site",
    "step_negligible": "clamp",
    "linearisation_failed": "site",
    "damped_downstream": "tokens",
    "margin_unmoved": "tokens",
    "barrier_not_decisive": "tokens",
    "decision_token_off_path": "tokens",
}


def _margin(lm: LoadedModel, capture: RunCapture) -> float:
    logits = capture.steps[0].final_logits
    return float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])


def _is_yes_no(lm: LoadedModel, capture: RunCapture) -> bool:
    """Whether the top token at the decision position is still a Yes/No spelling."""
    top = int(capture.steps[0].final_logits.argmax())
    ids = {lm.tokens.yes_id, lm.tokens.no_id, *lm.tokens.yes_variants.values(), *lm.tokens.no_variants.values()}
    return top in ids


def knockouts(lm: LoadedModel, inputs: dict, *, sample) -> pd.DataFrame:
    """Records (all metrics) of the four knockout/doubling conditions at prefill."""
    frames = [run_records(lm, run(lm, inputs, edit), sample=sample, condition=name)
              for name, edit in KNOCKOUTS.items()]
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class DoseResponse:
    curve: pd.DataFrame  # k, margin, answer_yes, h_mean, theta_rel_max, yes_no_top
    k_star: float | None  # smallest flipping multiplier found, None if none up to k_max
    k_max: float
    at_k_star: dict

    def sentence(self) -> str:
        if self.k_star is None:
            return f"No multiplier up to k = {self.k_max:g} on θ* flips the answer."
        a = self.at_k_star
        return (f"The answer flips at k* ≈ {self.k_star:.3g} × θ* (‖θ*‖/‖x‖ up to {a['theta_rel_max']:.3g}, "
                f"margin {a['margin']:+.3g}, h {a['h_mean']:.3g}); the output is "
                f"{'still' if a['yes_no_top'] else 'no longer'} a Yes/No answer.")


def _dose_point(lm, inputs, intervention, k) -> dict:
    cap = run(lm, inputs, intervention, dose=k)
    layers = [c.metrics for c in cap.steps[0].layers.values() if c.metrics.get("barrier_h") is not None]
    rel = [m["theta_rel"] * k for m in layers if m.get("barrier_active") and "theta_rel" in m]
    h_after = [m["barrier_h"] + (m.get("dh_realised") or 0.0) for m in layers]
    m = _margin(lm, cap)
    return {"k": k, "margin": m, "answer_yes": m > 0, "h_mean": sum(h_after) / len(h_after) if h_after else math.nan,
            "theta_rel_max": max(rel) if rel else 0.0, "yes_no_top": _is_yes_no(lm, cap)}


def dose_response(lm: LoadedModel, inputs: dict, config, base_margin: float, *,
                  k_max: float = 1024.0, bisect_steps: int = 8) -> DoseResponse:
    """Smallest k (on the doubling grid, then bisected) whose steered answer differs."""
    config = as_intervention(config)
    base_yes = base_margin > 0
    points, k, lo = [], 1.0, 0.0
    hi = None
    bar = tqdm(total=int(math.log2(k_max)) + 1 + bisect_steps, desc="dose-response", leave=False, mininterval=1)
    while k <= k_max:
        p = _dose_point(lm, inputs, config, k)
        points.append(p)
        bar.update()
        if p["answer_yes"] != base_yes:
            hi = k
            break
        lo, k = k, k * 2
    if hi is not None:
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            p = _dose_point(lm, inputs, config, mid)
            points.append(p)
            bar.update()
            if p["answer_yes"] != base_yes:
                hi = mid
            else:
                lo = mid
    bar.close()
    curve = pd.DataFrame(points).sort_values("k").reset_index(drop=True)
    at = curve[curve.k == hi].iloc[0].to_dict() if hi is not None else {}
    return DoseResponse(curve, hi, k_max, at)


def per_layer_doses(lm: LoadedModel, inputs: dict, config, base_margin: float, *,
                    k_max: float = 1024.0, bisect_steps: int = 8) -> pd.DataFrame:
    """The dose-response with only one steered layer at a time: where θ* could matter most."""
    config, rows = as_intervention(config), []
    for layer in tqdm(config.layers(lm.n_layers), desc="per-layer dose", leave=False, mininterval=1):
        d = dose_response(lm, inputs, config.replace(layers=(layer,)), base_margin,
                          k_max=k_max, bisect_steps=bisect_steps)
        rows.append({"layer": layer, "k_star": d.k_star, **{k: d.at_k_star.get(k) for k in
                                                          ("margin", "theta_rel_max", "yes_no_top")}})
    return pd.DataFrame(rows)


def counterfactuals(lm: LoadedModel, inputs: dict, config, base_margin: float) -> pd.DataFrame:
    """Each of the intervention's fixes alone, then all together: answer, margin, flipped."""
    config = as_intervention(config)
    fixes = config.fixes()
    variants = {name: config.replace(**change) for name, change in fixes.items()}
    everything = {k: v for change in fixes.values() for k, v in change.items()}
    if fixes:
        variants["all"] = config.replace(**everything)
    rows = []
    for name, cfg in tqdm(variants.items(), desc="counterfactual fixes", leave=False, mininterval=1):
        diff = changed(cfg.knobs, config.knobs)
        if not diff:
            rows.append({"fix": name, "change": "(already set)", "margin": base_margin,
                         "answer": "yes" if base_margin > 0 else "no", "flipped": False})
            continue
        cap = run(lm, inputs, cfg)
        m = _margin(lm, cap)
        rows.append({"fix": name, "change": ", ".join(f"{k}={v}" for k, v in diff.items()), "margin": m,
                     "answer": "yes" if m > 0 else "no", "flipped": (m > 0) != (base_margin > 0),
                     "yes_no_top": _is_yes_no(lm, cap)})
    return pd.DataFrame(rows)


def cause_chain(lm: LoadedModel, question, image, config, first: TraceResult,
                knockout_records: pd.DataFrame | None = None, max_links: int = 6,
                template: str = LLAVA_PROMPT) -> pd.DataFrame:
    """Fix the top detected cause, re-diagnose, repeat until the answer flips or no fix is left."""
    cfg = as_intervention(config)
    fixes = cfg.fixes()
    rows, used, result = [], set(), first
    for link in range(max_links):
        records = result.records if knockout_records is None else pd.concat([result.records, knockout_records])
        causes = [c for c in diagnose(records, intervention=cfg) if c.detected]
        summary = result.summary()
        fix = next((CAUSE_FIX[c.id] for c in causes if CAUSE_FIX.get(c.id) in fixes and CAUSE_FIX[c.id] not in used),
                   None)
        rows.append({"link": link, "config": ", ".join(f"{k}={v}" for f in sorted(used) for k, v in fixes[f].items())
                     or "(as configured)", "top_cause": causes[0].id if causes else "(none)",
                     "margin": summary["margin_after"], "flipped": summary["flipped"],
                     "next_fix": fix or "(none left)"})
        if summary["flipped"] or fix is None:
            break
        used.add(fix)
        cfg = cfg.replace(**fixes[fix])
        result = trace_sample(lm, question, image, cfg, baseline=first.baseline, template=template)
    return pd.DataFrame(rows)


@dataclass
class Explanation:
    trace: TraceResult
    knockout_records: pd.DataFrame
    causes: list
    dose: DoseResponse
    fixes: pd.DataFrame
    chain: pd.DataFrame
    layer_doses: pd.DataFrame | None = None

    @property
    def records(self) -> pd.DataFrame:
        return pd.concat([self.trace.records, self.knockout_records], ignore_index=True)


def explain_sample(lm: LoadedModel, question, image, config, *, k_max: float = 1024.0,
                   bisect_steps: int = 8, per_layer: bool = False, template: str = LLAVA_PROMPT) -> Explanation:
    """Trace, knockouts, diagnosis, dose-response, counterfactual fixes and cause chain.

    ``config`` is the intervention (an MC-LCBF ``BarrierConfig`` is accepted as such).
    """
    config = as_intervention(config)
    result = trace_sample(lm, question, image, config, template=template)
    text = getattr(question, "text", question)
    _, inputs = sample_inputs(lm, text, image, template)
    inputs = with_embeds(inputs, result.baseline)  # every run below skips the vision tower
    ko = knockouts(lm, inputs, sample=result.sample)
    causes = diagnose(pd.concat([result.records, ko], ignore_index=True), intervention=config)
    base_margin = result.summary()["margin_before"]
    dose = dose_response(lm, inputs, config, base_margin, k_max=k_max, bisect_steps=bisect_steps)
    fixes = counterfactuals(lm, inputs, config, base_margin)
    chain = cause_chain(lm, question, image, config, result, ko, template=template)
    layer_doses = per_layer_doses(lm, inputs, config, base_margin, k_max=k_max,
                                  bisect_steps=bisect_steps) if per_layer else None
    return Explanation(result, ko, causes, dose, fixes, chain, layer_doses)


__all__ = ["KNOCKOUTS", "FIXES", "CAUSE_FIX", "knockouts", "DoseResponse", "dose_response", "per_layer_doses",
           "counterfactuals",
           "cause_chain", "Explanation", "explain_sample"]

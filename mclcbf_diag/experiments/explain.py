"""Check a diagnosis by experiment: counterfactuals per cause, graded sweeps, dose-response, fixes.

Every run here is read as an *outcome* (:mod:`mclcbf_diag.measurements.outcomes`: unchanged, fixed,
broken, derailed; changed/unchanged without a label), never as a bare sign change, and every
conclusion depends on the label: for a wrong answer "why not fixed, and what would fix it",
for a right one "kept, broken or derailed, and how far from breaking".

* **Cause tests** (:func:`cause_tester`): each detected cause's own counterfactual (undo just
  that cause, keep everything else; see :mod:`mclcbf_diag.diagnosis.rulebook`) is run and compared with
  the *unfixed* intervention: the size of its step (``step_size``, Σ‖v‖/‖x‖ added at the
  decision token), the decision token's image mass (mean over layers), the margin and the outcome.
* **Graded image-mass sweep** (:mod:`mclcbf_diag.experiments.sweep`): the only evidence allowed for
  "no steering of the decision token's image attention can change this".
* **Attention knockouts** (:func:`knockouts`): remove (×0) or double (×2) the image mass at
  the decision token or at every text token after the image, in every layer (a table only;
  two edits support no negative claim).
* **Dose-response** (:func:`dose_response`): the smallest multiplier k on the intervention's
  change that reaches the goal the label sets: *fixed* for a wrong answer, *broken or
  derailed* for a right one, *changed or derailed* without a label. Doubling from 1 brackets
  the first hit; bisection narrows it. Answers need not be monotone in k: this finds *a*
  smallest hit on the doubling grid's first bracket.
* **Counterfactual fixes** (:func:`counterfactuals`): each fix (one knob) alone and all
  together, compared with the baseline *and* with the unfixed intervention; a fix that cannot
  apply (a gradient dtype on a float32 model) is marked, not run; only a fix that turns a
  wrong answer right with a valid Yes/No output counts.
* **Cause chain** (:func:`cause_chain`): for a wrong (or unlabeled) answer, apply the fix of
  the top-ranked decisive cause, diagnose again, repeat until fixed or no fix is left. A right
  answer has nothing to fix: no chain.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..data import LLAVA_PROMPT
from ..diagnosis.diagnose import diagnose
from ..engine.runner import RunCapture, run, with_embeds
from ..errors import UserError
from ..interventions import AttentionKnockout, KnockoutKnobs, as_intervention
from ..interventions.mclcbf import FIXES
from ..knobs import changed
from ..measurements.measure import run_records
from ..measurements.outcomes import GOALS as OUTCOME_GOALS
from ..measurements.outcomes import Reading, dropped_edit, kind, outcome_of, read_batch
from ..models import LoadedModel
from ..progress import tqdm
from .sweep import image_mass_sweep, sweep_records, sweep_sentence
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
    "guard_dominates": "guard",
    "margin_unmoved": "tokens",
    "barrier_not_decisive": "tokens",
    "decision_token_off_path": "tokens",
}


GOALS = OUTCOME_GOALS  # what a run must reach, by the question the label sets (mclcbf_diag.measurements.outcomes)


def reading(lm: LoadedModel, capture: RunCapture) -> Reading:
    """The Yes/No reading of a run's first (prefill) step."""
    return read_batch(capture.steps[0].final_logits[None], lm.tokens)[0]


def _kind(label: str | None, base: Reading) -> str:
    return kind(label, base.answer)


kind_of = _kind  # "wrong", "right" or "unlabeled": the question a label sets for the baseline answer


def effect(lm: LoadedModel, capture: RunCapture, base: Reading, label: str | None) -> dict:
    """What a run did, in the terms a cause test compares (see :func:`mclcbf_diag.diagnosis.rulebook.decisiveness`)."""
    prefill = capture.steps[0]
    rel, mass = 0.0, []
    for c in prefill.layers.values():
        if c.added is not None:
            xn = float(c.resid_pre_in.float().norm())
            rel += float(c.added.float().norm()) / xn if xn > 0 else math.inf
        if c.attn is not None:
            mass.append(float(c.attn[:, capture.detected[: c.attn.shape[-1]]].sum(-1).mean()))
    r = reading(lm, capture)
    dropped = dropped_edit(c.metrics for c in prefill.layers.values())
    return {"step_size": rel, "mass": sum(mass) / len(mass) if mass else math.nan, "margin": r.margin,
            "outcome": outcome_of(base, r, label, dropped=dropped), "valid": r.valid, "finite": r.finite,
            "dropped": dropped}


def _variant(iv, spec):
    if spec is None:
        return iv, 1.0
    if "dtype" in spec:  # needs a copy of the model: cause_tester runs it (_in_dtype), a batch cannot
        raise ValueError(f"a counterfactual in {spec['dtype']} runs on a copy of the model")
    if "intervention" in spec:
        variant = spec["intervention"]
    else:  # a knob function (what it reads) first, then fixed knob values: a joint cause may carry both
        changes = {**(spec["knobs_fn"](iv.knobs) if "knobs_fn" in spec else {}), **spec.get("knobs", {})}
        variant = iv.replace(**changes) if changes else iv
    return variant, float(spec.get("dose", 1.0))


def spec_key(spec: dict | None) -> str | None:
    """What identifies a cause test's counterfactual (``None``: the unfixed intervention)."""
    return None if spec is None else repr(sorted((k, v) for k, v in spec.items() if k != "knobs_fn"))


def dtype_untestable(lm: LoadedModel, spec: dict) -> str:
    """Why a counterfactual in ``spec["dtype"]`` cannot run on ``lm`` ("" where it can)."""
    name = spec["dtype"]
    if lm.dtype == getattr(torch, name):
        return f"the model already computes in {name}, so nothing wider can be tried"
    if len({str(d) for d in (getattr(lm.model, "hf_device_map", None) or {}).values()}) > 1:
        return (f"the model is split over devices (--device-map), so no {name} copy is made; rerun explain with "
                f"--dtype {name} and compare")
    return ""


def _in_dtype(lm: LoadedModel, inputs: dict, iv, spec: dict, base: Reading, label, copies: dict) -> dict:
    """A counterfactual on a copy of the model in ``spec["dtype"]`` (the rounding test): the same weights (as
    loaded), the same pixels and prompt, the same intervention, computed in the wider dtype from the image
    on. Its outcome is read against the copy's own unsteered answer, which must be the model's; otherwise the
    wider dtype alone changes the answer, and the run would test more than the step's rounding."""
    name = spec["dtype"]
    dtype = getattr(torch, name)
    if reason := dtype_untestable(lm, spec):
        return {"untestable": reason}
    if name not in copies:
        try:
            copies[name] = dataclasses.replace(lm, model=copy.deepcopy(lm.model).to(dtype))
        except torch.OutOfMemoryError:
            copies[name] = None
    wide = copies[name]
    if wide is None:
        return {"untestable": f"a {name} copy of the model does not fit in memory beside it; rerun explain with "
                              f"--dtype {name} and compare"}
    feed = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items() if k != "inputs_embeds"}
    variant, dose = _variant(iv, {k: v for k, v in spec.items() if k not in ("dtype", "goal_only")})
    plain = reading(wide, run(wide, feed, variant, steer=False))
    if plain.answer != base.answer or plain.valid != base.valid:
        return {"untestable": f"in {name} the model, unsteered, already answers {plain.answer} (margin "
                              f"{plain.margin:+.3g}; {base.margin:+.3g} in {str(lm.dtype).removeprefix('torch.')}), "
                              "so that run would test more than the step's rounding"}
    return effect(wide, run(wide, feed, variant, dose=dose), plain, label)


def cause_tester(lm: LoadedModel, inputs: dict, intervention, base: Reading, label: str | None):
    """``tester(spec)`` for :func:`mclcbf_diag.diagnosis.diagnose.diagnose`: run a counterfactual, return its effect
    (a spec with a ``dtype`` runs on a copy of the model in that dtype, made once: :func:`_in_dtype`)."""
    iv = as_intervention(intervention)
    memo: dict = {}
    copies: dict = {}

    def test(spec):
        key = spec_key(spec)
        if key not in memo:
            try:
                if spec is not None and "dtype" in spec:
                    memo[key] = _in_dtype(lm, inputs, iv, spec, base, label, copies)
                else:
                    variant, dose = _variant(iv, spec)
                    memo[key] = effect(lm, run(lm, inputs, variant, dose=dose), base, label)
            except (UserError, TypeError, ValueError):
                memo[key] = None
        return memo[key]

    return test


def knockouts(lm: LoadedModel, inputs: dict, *, question_id) -> pd.DataFrame:
    """Records (all metrics) of the four knockout/doubling conditions at prefill."""
    frames = [run_records(lm, run(lm, inputs, edit), question_id=question_id, condition=name)
              for name, edit in KNOCKOUTS.items()]
    return pd.concat(frames, ignore_index=True)


@dataclass(frozen=True)
class DoseResponse:
    curve: pd.DataFrame  # k, margin, answer_yes, valid, outcome, h_mean, theta_rel_max, yes_no_top
    k_star: float | None  # smallest multiplier reaching the goal, None if none up to k_max
    k_max: float
    at_k_star: dict
    goal: tuple[str, ...] = ("changed", "derailed")
    kind: str = "unlabeled"  # wrong / right / unlabeled
    k_derail: float | None = None  # smallest multiplier on the grid that derailed the output
    k_nonfinite: float | None = None  # smallest multiplier on the grid whose step overflowed and was dropped

    def sentence(self) -> str:
        goal = " or ".join(self.goal)
        if self.k_star is None:
            tail = (f" (it derails the output from k = {self.k_derail:.3g})" if self.k_derail is not None else "")
            if self.k_nonfinite is not None:  # a dropped step says nothing: no survival claim past it
                return (f"No multiplier up to k = {self.k_max:g} on the step makes the answer {goal}; from k = "
                        f"{self.k_nonfinite:.3g} the step overflows and is not applied, so those multipliers were "
                        f"not tested{tail}.")
            if self.kind == "right":
                return f"The right answer survives every multiplier up to k = {self.k_max:g} on the step{tail}."
            return f"No multiplier up to k = {self.k_max:g} on the step makes the answer {goal}{tail}."
        a = self.at_k_star
        what = {"right": f"The right answer is {a['outcome']}", "wrong": "The wrong answer is fixed"}.get(
            self.kind, f"The answer is {a['outcome']}")
        return (f"{what} from k* ≈ {self.k_star:.3g} × the step (‖θ*‖/‖x‖ up to "
                f"{a['theta_rel_max']:.3g}, margin {a['margin']:+.3g}, h {a['h_mean']:.3g}); the output is "
                f"{'still' if a['valid'] else 'no longer'} a Yes/No answer.")


def _dose_point(lm, inputs, intervention, k, base: Reading, label) -> dict:
    return dose_point(lm, run(lm, inputs, intervention, dose=k), k, base, label)


def dose_point(lm: LoadedModel, cap: RunCapture, k: float, base: Reading, label) -> dict:
    """One point of the dose-response curve, read off the run at dose ``k``."""
    return dose_point_of([c.metrics for c in cap.steps[0].layers.values()], reading(lm, cap), k, base, label)


def dose_point_of(layer_metrics: list[dict], r: Reading, k: float, base: Reading, label) -> dict:
    """:func:`dose_point` from the run's per-layer records (``{metric: value}`` per layer) and its reading."""
    layers = [m for m in layer_metrics if m.get("barrier_h") is not None]
    rel = [m["theta_rel"] * k for m in layers if m.get("barrier_active") and m.get("theta_rel") is not None]
    h_after = [m["barrier_h"] + (m.get("dh_realised") or 0.0) for m in layers]
    return {"k": k, "margin": r.margin, "answer_yes": r.margin > 0, "valid": r.valid, "p_yes": r.p_yes,
            "p_no": r.p_no, "outcome": outcome_of(base, r, label, dropped=dropped_edit(layer_metrics)),
            "h_mean": sum(h_after) / len(h_after) if h_after else math.nan,
            "theta_rel_max": max(rel) if rel else 0.0, "yes_no_top": r.top_yes_no}


def _base_reading(lm, inputs, iv, base_margin) -> Reading:
    try:
        return reading(lm, run(lm, inputs, iv, steer=False))
    except Exception:  # pragma: no cover - a measuring run failing means the steered one fails too
        return Reading(base_margin, math.nan, math.nan, True, True)


def doubling_grid(k_max: float) -> list[float]:
    """The dose-response's first multipliers: 1, 2, 4, … up to ``k_max``."""
    out, k = [], 1.0
    while k <= k_max:
        out.append(k)
        k *= 2
    return out


def dose_result(points: list[dict], hi: float | None, k_max: float, goal: tuple, kind: str) -> DoseResponse:
    """The :class:`DoseResponse` of the computed ``points`` whose smallest hit is ``hi``."""
    curve = pd.DataFrame(points).sort_values("k").reset_index(drop=True)
    at = curve[curve.k == hi].iloc[0].to_dict() if hi is not None else {}
    der, lost = curve[curve.outcome == "derailed"], curve[curve.outcome == "non_finite"]
    return DoseResponse(curve, hi, k_max, at, goal, kind, float(der.k.min()) if len(der) else None,
                        float(lost.k.min()) if len(lost) else None)


def dose_response(lm: LoadedModel, inputs: dict, config, base_margin: float, *, label: str | None = None,
                  base: Reading | None = None, k_max: float = 1024.0, bisect_steps: int = 8) -> DoseResponse:
    """Smallest k (doubling grid from 1, then bisection) whose outcome reaches the label's goal."""
    config = as_intervention(config)
    base = base if base is not None else _base_reading(lm, inputs, config, base_margin)
    kind = _kind(label, base)
    goal = GOALS[kind]
    points, k, lo = [], 1.0, 0.0
    hi = None
    bar = tqdm(total=int(math.log2(k_max)) + 1 + bisect_steps, desc="dose-response", leave=False, mininterval=1)
    while k <= k_max:
        p = _dose_point(lm, inputs, config, k, base, label)
        points.append(p)
        bar.update()
        if p["outcome"] in goal:
            hi = k
            break
        lo, k = k, k * 2
    if hi is not None:
        for _ in range(bisect_steps):
            mid = (lo + hi) / 2
            p = _dose_point(lm, inputs, config, mid, base, label)
            points.append(p)
            bar.update()
            if p["outcome"] in goal:
                hi = mid
            else:
                lo = mid
    bar.close()
    return dose_result(points, hi, k_max, goal, kind)


def per_layer_doses(lm: LoadedModel, inputs: dict, config, base_margin: float, *, label: str | None = None,
                    k_max: float = 1024.0, bisect_steps: int = 8) -> pd.DataFrame:
    """The dose-response with only one steered layer at a time: where the step could matter most."""
    config, rows = as_intervention(config), []
    base = _base_reading(lm, inputs, config, base_margin)
    for layer in tqdm(config.layers(lm.n_layers), desc="per-layer dose", leave=False, mininterval=1):
        d = dose_response(lm, inputs, config.replace(layers=(layer,)), base_margin, label=label, base=base,
                          k_max=k_max, bisect_steps=bisect_steps)
        rows.append({"layer": layer, "k_star": d.k_star, **{k: d.at_k_star.get(k) for k in
                                                          ("margin", "outcome", "theta_rel_max", "valid")}})
    return pd.DataFrame(rows)


FIX_COLUMNS = ["fix", "change", "applicable", "margin", "answer", "valid", "outcome", "vs_unfixed", "counts"]


def fix_plan(config, model_dtype) -> list[dict]:
    """Each fix alone, then all together: ``fix``, ``change``, ``applicable`` and ``run`` (the
    variant to run; None where it cannot apply or changes nothing). Pure."""
    config = as_intervention(config)
    fixes = config.fixes()
    applies = getattr(config, "fix_applies", None)
    variants = {name: change for name, change in fixes.items()}
    if fixes:
        variants["all"] = {k: v for change in fixes.values() for k, v in change.items()}
    plan = []
    for name, change in variants.items():
        try:
            cfg = config.replace(**change)
        except (UserError, TypeError, ValueError) as exc:
            plan.append({"fix": name, "change": str(change), "applicable": f"no: {exc}", "run": None, "same": False})
            continue
        diff = changed(cfg.knobs, config.knobs)
        why = applies(name, model_dtype) if applies is not None and name != "all" else None
        if applies is not None and name == "all":  # drop the parts that cannot apply
            diff = {k: v for k, v in diff.items()
                    if not any(applies(n, model_dtype) and k in fixes[n] for n in fixes)}
        row = {"fix": name, "change": ", ".join(f"{k}={v}" for k, v in diff.items()) or "(already set)"}
        if not diff or why:
            plan.append({**row, "applicable": why or "already set: nothing to change", "run": None, "same": True})
        else:
            plan.append({**row, "applicable": "yes", "run": cfg, "same": False})
    return plan


def fix_row(entry: dict, r: Reading | None, base: Reading, unfixed: Reading, label: str | None) -> dict:
    """One row of :func:`counterfactuals` from a :func:`fix_plan` entry and the reading of its run (if run)."""
    row = {k: entry[k] for k in ("fix", "change", "applicable")}
    if entry["same"]:
        return {**row, "margin": unfixed.margin, "answer": unfixed.answer, "valid": unfixed.valid,
                "outcome": outcome_of(base, unfixed, label), "vs_unfixed": "same run", "counts": False}
    if r is None:
        return row
    out = outcome_of(base, r, label)
    vs = outcome_of(unfixed, r, label)
    return {**row, "margin": r.margin, "answer": r.answer, "valid": r.valid, "outcome": out,
            "vs_unfixed": f"Δm {r.margin - unfixed.margin:+.3g}; {vs}",
            "counts": _kind(label, base) == "wrong" and out == "fixed" and r.valid}


def counterfactuals(lm: LoadedModel, inputs: dict, config, base_margin: float, *, label: str | None = None,
                    base: Reading | None = None, unfixed: Reading | None = None) -> pd.DataFrame:
    """Each of the intervention's fixes alone, then all together, against the baseline and the unfixed run.

    Columns: fix, change, applicable, margin, answer, valid, outcome (vs the baseline),
    vs_unfixed (Δmargin and outcome change against the intervention as configured), counts
    (True only for a wrong answer fixed with a valid Yes/No output).
    """
    config = as_intervention(config)
    base = base if base is not None else _base_reading(lm, inputs, config, base_margin)
    unfixed = unfixed if unfixed is not None else reading(lm, run(lm, inputs, config))
    rows = []
    for entry in tqdm(fix_plan(config, lm.dtype), desc="counterfactual fixes", leave=False, mininterval=1):
        r = reading(lm, run(lm, inputs, entry["run"])) if entry["run"] is not None else None
        rows.append(fix_row(entry, r, base, unfixed, label))
    return pd.DataFrame(rows, columns=FIX_COLUMNS)


def cause_chain(lm: LoadedModel, question, image, config, first: TraceResult,
                extra_records: pd.DataFrame | None = None, max_links: int = 6,
                template: str = LLAVA_PROMPT, label: str | None = None, inputs: dict | None = None) -> pd.DataFrame:
    """Fix the top detected (decisive first) cause, re-diagnose, repeat until fixed or no fix is left.

    A right answer has nothing to fix: the chain is one row saying so.
    """
    cfg = as_intervention(config)
    label = label if label is not None else getattr(question, "label", None)
    base = reading(lm, first.baseline)
    kind = _kind(label, base)
    if kind == "right":
        return pd.DataFrame([{"link": 0, "config": "(as configured)", "top_cause": "(answer right: nothing to fix)",
                              "status": "", "margin": first.summary()["margin_after"],
                              "outcome": first.summary()["outcome"], "next_fix": "(none)"}])
    fixes = cfg.fixes()
    applies = getattr(cfg, "fix_applies", None)
    goal = GOALS[kind][:1]  # fixed, or changed
    rows, used, result = [], set(), first
    for link in range(max_links):
        records = result.records if extra_records is None else pd.concat([result.records, extra_records])
        tester = cause_tester(lm, inputs, cfg, base, label) if inputs is not None else None
        causes = [c for c in diagnose(records, intervention=cfg, tester=tester) if c.detected]
        summary = result.summary()
        fix = next((CAUSE_FIX[c.id] for c in causes if CAUSE_FIX.get(c.id) in fixes and CAUSE_FIX[c.id] not in used
                    and c.decisive is not False and not (applies and applies(CAUSE_FIX[c.id], lm.dtype))), None)
        rows.append({"link": link, "config": ", ".join(f"{k}={v}" for f in sorted(used) for k, v in fixes[f].items())
                     or "(as configured)", "top_cause": causes[0].id if causes else "(none)",
                     "status": causes[0].status if causes else "", "margin": summary["margin_after"],
                     "outcome": summary["outcome"], "next_fix": fix or "(none left)"})
        if summary["outcome"] in goal or fix is None:
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
    sweep: pd.DataFrame | None = None
    sweep_text: str = ""

    @property
    def records(self) -> pd.DataFrame:
        return pd.concat([self.trace.records, self.knockout_records], ignore_index=True)


def explain_sample(lm: LoadedModel, question, image, config, *, k_max: float = 1024.0,
                   bisect_steps: int = 8, per_layer: bool = False, template: str = LLAVA_PROMPT,
                   sweep: bool = True) -> Explanation:
    """Trace, knockouts, graded sweep, tested diagnosis, dose-response, fixes and cause chain.

    ``config`` is the intervention (an MC-LCBF ``BarrierConfig`` is accepted as such).
    """
    config = as_intervention(config)
    result = trace_sample(lm, question, image, config, template=template)
    label = getattr(question, "label", None)
    text = getattr(question, "text", question)
    prompt, inputs = sample_inputs(lm, text, image, template)
    inputs = with_embeds(inputs, result.baseline)  # every run below skips the vision tower
    base, unfixed = reading(lm, result.baseline), reading(lm, result.steered)
    ko = knockouts(lm, inputs, question_id=result.question_id)
    extra = [ko]
    sw, sw_text = None, ""
    if sweep:
        sw = image_mass_sweep(lm, prompt, image, label)
        sw_text = sweep_sentence(sw, label, base.answer)
        extra.append(sweep_records(sw, question_id=result.question_id))
    extra_records = pd.concat(extra, ignore_index=True)
    tester = cause_tester(lm, inputs, config, base, label)
    causes = diagnose(pd.concat([result.records, extra_records], ignore_index=True), intervention=config,
                      tester=tester)
    base_margin = base.margin
    dose = dose_response(lm, inputs, config, base_margin, label=label, base=base, k_max=k_max,
                         bisect_steps=bisect_steps)
    fixes = counterfactuals(lm, inputs, config, base_margin, label=label, base=base, unfixed=unfixed)
    chain = cause_chain(lm, question, image, config, result, extra_records, template=template, label=label,
                        inputs=inputs)
    layer_doses = per_layer_doses(lm, inputs, config, base_margin, label=label, k_max=k_max,
                                  bisect_steps=bisect_steps) if per_layer else None
    return Explanation(result, pd.concat([ko, *(extra[1:])], ignore_index=True), causes, dose, fixes, chain,
                       layer_doses, sw, sw_text)


__all__ = ["KNOCKOUTS", "FIXES", "CAUSE_FIX", "GOALS", "reading", "kind_of", "effect", "spec_key", "cause_tester",
           "knockouts",
           "DoseResponse", "dose_point", "dose_point_of", "doubling_grid", "dose_result", "dose_response",
           "per_layer_doses",
           "FIX_COLUMNS", "fix_plan", "fix_row", "counterfactuals", "cause_chain", "Explanation", "explain_sample"]

"""What one run shows, in the terms a verdict compares: pure pieces shared by every stage.

* :func:`reading` and :func:`effect`: a run's Yes/No reading, and what a cause test compares
  (step size, the decision token's image mass, margin, outcome; see
  :func:`mclcbf_diag.diagnosis.rulebook.decisiveness`).
* :func:`run_in_dtype` runs a :class:`~mclcbf_diag.diagnosis.counterfactual.Counterfactual` with a
  ``dtype`` on a copy of the model in that dtype (the rounding test); the others are variants of
  the intervention (:meth:`Counterfactual.variant`), run as rows of a batch.
* :class:`DoseResponse`, :func:`dose_point_of`, :func:`doubling_grid`, :func:`dose_result`: the
  dose-response's points and its smallest multiplier reaching the label's goal.
* :func:`fix_plan` and :func:`fix_row`: each fix alone and all together, and how its run reads
  against the baseline and the unfixed intervention.

Nothing here batches or loops over questions: :mod:`mclcbf_diag.experiments.verdict` does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..diagnosis.counterfactual import Counterfactual
from ..engine.runner import RunCapture, forward
from ..errors import UserError
from ..interventions import AttentionKnockout, KnockoutKnobs, as_intervention
from ..knobs import changed
from ..measurements.outcomes import GOALS as OUTCOME_GOALS
from ..measurements.outcomes import Reading, dropped_edit, kind, outcome_of, read_batch
from ..models import LoadedModel

KNOCKOUTS = {
    "knockout:decision": AttentionKnockout(KnockoutKnobs(0.0, tokens="decision")),
    "knockout:after_image": AttentionKnockout(KnockoutKnobs(0.0, tokens="after_image")),
    "double:decision": AttentionKnockout(KnockoutKnobs(2.0, tokens="decision")),
    "double:after_image": AttentionKnockout(KnockoutKnobs(2.0, tokens="after_image")),
}

GOALS = OUTCOME_GOALS  # what a run must reach, by the question the label sets (mclcbf_diag.measurements.outcomes)


def reading(lm: LoadedModel, capture: RunCapture) -> Reading:
    """The Yes/No reading of a run's first (prefill) step."""
    return read_batch(capture.steps[0].final_logits[None], lm.tokens)[0]


def kind_of(label: str | None, base: Reading) -> str:
    """The question a label sets for the baseline answer: "wrong", "right" or "unlabeled"."""
    return kind(label, base.answer)


def effect(lm: LoadedModel, capture: RunCapture, base: Reading, label: str | None) -> dict:
    """What a run did, in the terms a cause test compares (see :func:`mclcbf_diag.diagnosis.rulebook.decisiveness`).

    Args:
        lm: the loaded model (its Yes/No tokens).
        capture: the run's capture; its prefill step is read.
        base: the baseline's reading, which the outcome is judged against.
        label: the question's label (``"yes"``/``"no"``); None: unlabeled.

    Returns:
        ``{"step_size": Σ‖v‖/‖x‖ over the layers at the decision token, "mass": image attention mass (mean over
        layers and heads; NaN without attention), "margin", "outcome", "valid", "finite", "dropped"}``.
    """
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


def dtype_untestable(lm: LoadedModel, spec: Counterfactual) -> str:
    """Why a counterfactual in ``spec.dtype`` cannot run on ``lm`` ("" where it can)."""
    name = spec.dtype
    if lm.dtype == getattr(torch, name):
        return f"the model already computes in {name}, so nothing wider can be tried"
    if len({str(d) for d in (getattr(lm.model, "hf_device_map", None) or {}).values()}) > 1:
        return (f"the model is split over devices (--device-map), so no {name} copy is made; rerun explain with "
                f"--dtype {name} and compare")
    return ""


def run_in_dtype(lm: LoadedModel, inputs: dict, iv, spec: Counterfactual, base: Reading, label, copies: dict) -> dict:
    """A counterfactual on a copy of the model in ``spec.dtype`` (the rounding test): the same weights (as
    loaded), the same pixels and prompt, the same intervention, computed in the wider dtype from the image
    on. Its outcome is read against the copy's own unsteered answer, which must be the model's; otherwise the
    wider dtype alone changes the answer, and the run would test more than the step's rounding.

    Args:
        lm: the loaded model.
        inputs: the question's model inputs.
        iv: the unfixed intervention (the spec's variant is built from it).
        spec: the counterfactual; ``spec.dtype`` names the wider dtype (``"float32"``, ...).
        base: the baseline's reading in the model's own dtype.
        label: the question's label (``"yes"``/``"no"``); None: unlabeled.
        copies: dtype name → the model's copy in it (None: it did not fit), filled here and reused across calls.

    Returns:
        The run's :func:`effect`, or ``{"untestable": reason}``.
    """
    name = spec.dtype
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
    variant, dose = spec.in_model_dtype().variant(iv)
    plain = reading(wide, forward(wide, feed, variant, steer=False).captures[0])
    if plain.answer != base.answer or plain.valid != base.valid:
        return {"untestable": f"in {name} the model, unsteered, already answers {plain.answer} (margin "
                              f"{plain.margin:+.3g}; {base.margin:+.3g} in {str(lm.dtype).removeprefix('torch.')}), "
                              "so that run would test more than the step's rounding"}
    return effect(wide, forward(wide, feed, variant, dose=dose).captures[0], plain, label)


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
    detail: str = ""  # the run at k*, in the intervention's words (Intervention.dose_detail)

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
        detail = self.detail or f"margin {a['margin']:+.3g}"
        return (f"{what} from k* ≈ {self.k_star:.3g} × the step ({detail}); the output is "
                f"{'still' if a['valid'] else 'no longer'} a Yes/No answer.")


@dataclass(frozen=True)
class DosePoint:
    """One point of the dose-response curve: the run at multiplier ``k`` on the intervention's step."""

    k: float
    margin: float  # logit Yes − No
    valid: bool  # the top token is a Yes/No spelling
    p_yes: float
    p_no: float
    outcome: str  # against the baseline (mclcbf_diag.measurements.outcomes)
    yes_no_top: bool
    step: dict = dataclasses.field(default_factory=dict)  # the intervention's own figures (Intervention.dose_fields)

    @property
    def answer_yes(self) -> bool:
        return self.margin > 0

    def row(self) -> dict:
        """The point as a row of :attr:`DoseResponse.curve`."""
        return {"k": self.k, "margin": self.margin, "answer_yes": self.answer_yes, "valid": self.valid,
                "p_yes": self.p_yes, "p_no": self.p_no, "outcome": self.outcome, **self.step,
                "yes_no_top": self.yes_no_top}


def dose_point(lm: LoadedModel, iv, cap: RunCapture, k: float, base: Reading, label) -> DosePoint:
    """One point of the dose-response curve, read off the run of ``iv`` at dose ``k``.

    Args:
        lm: the loaded model (its Yes/No tokens).
        iv: the intervention run (its own figures of the step, ``dose_fields``).
        cap: the run's capture at dose ``k``; its prefill step is read.
        k: the multiplier on the intervention's step.
        base: the baseline's reading, which the outcome is judged against.
        label: the question's label (``"yes"``/``"no"``); None: unlabeled.

    Returns:
        The :class:`DosePoint`.
    """
    return dose_point_of(iv, [c.metrics for c in cap.steps[0].layers.values()], reading(lm, cap), k, base, label)


def dose_point_of(iv, layer_metrics: list[dict], r: Reading, k: float, base: Reading, label) -> DosePoint:
    """:func:`dose_point` from the run's per-layer records and its reading.

    Args:
        iv: the intervention run; it adds its own figures of the step
            (:meth:`~mclcbf_diag.interventions.base.Intervention.dose_fields`).
        layer_metrics: the run's ``{metric: value}`` per layer (a dropped edit makes the outcome ``non_finite``).
        r: the run's Yes/No reading.
        k: the multiplier on the intervention's step.
        base: the baseline's reading, which the outcome is judged against.
        label: the question's label (``"yes"``/``"no"``); None: unlabeled.

    Returns:
        The :class:`DosePoint`.
    """
    outcome = outcome_of(base, r, label, dropped=dropped_edit(layer_metrics))
    return DosePoint(k, r.margin, r.valid, r.p_yes, r.p_no, outcome, r.top_yes_no, iv.dose_fields(layer_metrics, k))


def doubling_grid(k_max: float) -> list[float]:
    """The dose-response's first multipliers: 1, 2, 4, … up to ``k_max``."""
    out, k = [], 1.0
    while k <= k_max:
        out.append(k)
        k *= 2
    return out


def dose_result(iv, points: list[DosePoint], hi: float | None, k_max: float, goal: tuple, kind: str) -> DoseResponse:
    """The :class:`DoseResponse` of ``iv``'s computed ``points`` whose smallest hit is ``hi``.

    Args:
        iv: the intervention (its ``dose_detail`` words the run at ``hi``).
        points: the computed points, any order (sorted by ``k`` here).
        hi: the smallest multiplier reaching the goal (one of the points' ``k``); None: none did.
        k_max: the largest multiplier tried.
        goal: the outcomes the run must reach.
        kind: the question the label sets: ``"wrong"``, ``"right"`` or ``"unlabeled"``.

    Returns:
        The :class:`DoseResponse`; its ``k_derail`` and ``k_nonfinite`` are the smallest points that derailed
        or whose step was dropped.
    """
    curve = pd.DataFrame([p.row() for p in points]).sort_values("k").reset_index(drop=True)
    at = curve[curve.k == hi].iloc[0].to_dict() if hi is not None else {}
    der, lost = curve[curve.outcome == "derailed"], curve[curve.outcome == "non_finite"]
    return DoseResponse(curve, hi, k_max, at, goal, kind, float(der.k.min()) if len(der) else None,
                        float(lost.k.min()) if len(lost) else None, iv.dose_detail(at) if at else "")


FIX_COLUMNS = ["fix", "change", "applicable", "margin", "answer", "valid", "outcome", "vs_unfixed", "counts"]


@dataclass(frozen=True)
class PlannedFix:
    """One fix of :func:`fix_plan`: its name, the knob change it makes, whether it applies, and the variant to run."""

    fix: str
    change: str
    applicable: str  # "yes", or why not
    run: object = None  # the intervention to run (None where it cannot apply or changes nothing)
    same: bool = False  # the change is already set, or cannot apply: its run is the unfixed one


def fix_plan(config, model_dtype) -> list[PlannedFix]:
    """Each fix alone, then all together (``all``, without the parts that cannot apply). Pure."""
    config = as_intervention(config)
    fixes = config.fixes()
    variants = dict(fixes)
    if fixes:
        variants["all"] = {k: v for change in fixes.values() for k, v in change.items()}
    plan = []
    for name, change in variants.items():
        try:
            cfg = config.replace(**change)
        except (UserError, TypeError, ValueError) as exc:
            plan.append(PlannedFix(name, str(change), f"no: {exc}"))
            continue
        diff = changed(cfg.knobs, config.knobs)
        why = config.fix_applies(name, model_dtype) if name != "all" else None
        if name == "all":  # drop the parts that cannot apply
            diff = {k: v for k, v in diff.items()
                    if not any(config.fix_applies(n, model_dtype) and k in fixes[n] for n in fixes)}
        text = ", ".join(f"{k}={v}" for k, v in diff.items()) or "(already set)"
        if not diff or why:
            plan.append(PlannedFix(name, text, why or "already set: nothing to change", same=True))
        else:
            plan.append(PlannedFix(name, text, "yes", run=cfg))
    return plan


def fix_row(entry: PlannedFix, r: Reading | None, base: Reading, unfixed: Reading, label: str | None) -> dict:
    """One row of the fixes table from a :func:`fix_plan` entry and the reading of its run (if run).

    Args:
        entry: the planned fix.
        r: the reading of the fix's run; None: not run (the row has the plan's columns only).
        base: the baseline's reading (the outcome is judged against it).
        unfixed: the unfixed intervention's reading (``vs_unfixed`` compares with it; an entry that changes
            nothing reports it).
        label: the question's label (``"yes"``/``"no"``); None: unlabeled.

    Returns:
        A row with the :data:`FIX_COLUMNS` present; ``counts`` is True only for a valid run that fixes a wrong
        answer.
    """
    row = {"fix": entry.fix, "change": entry.change, "applicable": entry.applicable}
    if entry.same:
        return {**row, "margin": unfixed.margin, "answer": unfixed.answer, "valid": unfixed.valid,
                "outcome": outcome_of(base, unfixed, label), "vs_unfixed": "same run", "counts": False}
    if r is None:
        return row
    out = outcome_of(base, r, label)
    vs = outcome_of(unfixed, r, label)
    return {**row, "margin": r.margin, "answer": r.answer, "valid": r.valid, "outcome": out,
            "vs_unfixed": f"Δm {r.margin - unfixed.margin:+.3g}; {vs}",
            "counts": kind_of(label, base) == "wrong" and out == "fixed" and r.valid}


__all__ = ["FIX_COLUMNS", "GOALS", "KNOCKOUTS", "DosePoint", "DoseResponse", "PlannedFix", "dose_point",
           "dose_point_of", "dose_result", "doubling_grid", "dtype_untestable", "effect", "fix_plan", "fix_row",
           "kind_of", "reading", "run_in_dtype"]

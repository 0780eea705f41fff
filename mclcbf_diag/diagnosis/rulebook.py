"""The diagnosis engine: a table of rules over tidy records → ranked causes.

A :class:`Rule` is ``(id, title, rank, threshold, check)``. ``check(ev)`` reads the records of
one question at one (phase, decode step) through :class:`Evidence` and returns a :class:`Cause` (made
with :meth:`Evidence.make`, or :meth:`Evidence.skip` when its evidence is missing; a rule
never raises on missing records). ``rank`` is the rule's place in the causal order a step
lives through (it exists → targets the image → is asked for → is computed → is scaled →
survives rounding → is large next to x → does what was predicted → is carried by the
residual → moves the margin → acts on the answer's path): a failure early in that chain
hides everything after it, so detected causes are ranked by it. A rule may read the cause
another rule found (:meth:`Evidence.cause`), evaluated on demand.

A detected cause is a *claim tested by intervention*: it is reported **decisive** only when its
own counterfactual (undo just that cause, keep everything else: :attr:`Rule.counterfactual`)
changes the step size, the decision token's image mass, the margin or the outcome by the amounts of
:func:`decisiveness`, compared with the *unfixed* intervention; otherwise "present, not
decisive". "Decisive" always carries the run that showed it (:class:`CounterfactualRun`; a
:class:`Cause` refuses to be decisive without one). A counterfactual
(:class:`~mclcbf_diag.diagnosis.counterfactual.Counterfactual`) may be a ``search`` (runs tried in
order, smallest change first; only a run that reaches the label's goal decides it; a single run may
ask for the same, ``goal_only``), or ``untestable`` (no run can succeed by construction:
"untestable here", with the reason; the tester may also find it so, running). A
non-finite counterfactual run shows no effect; against a non-finite unfixed run only a run that
reaches the goal counts. Causes read off the run itself (non-finite values, a derailed output)
are "observed". When no single cause's run reaches the label's goal, sets of causes are undone together
(:func:`joint_causes`). Without a tester (records only) the others stay "not tested". Detected
causes are ranked decisive first (those whose run reaches the goal before the others), then
untested, then not decisive, each group in causal order.

**Noise floors.** A difference recorded with a floor (``<metric>_floor``, see
:mod:`mclcbf_diag.measurements.noise`) is rounding, not an effect, below it: a rule never detects a cause
from such a figure (it skips the layer, reads it as 0, or uses it only as a bound together
with its floor), so a bfloat16 run and a float32 run of the same case give the same verdict
unless a dtype effect (rounding of the step, an inexact gradient) is real.

The layer sets every rule shares are computed once per diagnosis by the rules' ``layers``
function: *steered* (layers the intervention acted on or measured), *active* (where it asked
to act) and *fired* (where it changed the model). Generic rules live in
:mod:`mclcbf_diag.diagnosis.diagnose`; an intervention brings its own (``Intervention.rules()``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import UserError
from ..measurements.records import NO_HEAD, NO_LAYER
from .counterfactual import Counterfactual, joint

KNOCKOUT_DOMINANCE = 3.0  # |Δm_after_image| ≥ this × |Δm_decision|: the after-image path dominates


@dataclass(frozen=True)
class CounterfactualRun:
    """One recorded counterfactual run: what it changed and what came out (compared with the unfixed run)."""

    change: str  # what undoing the cause changed, in words ("clamp = none", "the same step × 40")
    margin: float  # logit Yes − No of the counterfactual run
    outcome: str  # its outcome against the baseline (mclcbf_diag.measurements.outcomes)
    step_size: float = math.nan  # Σ‖v‖/‖x‖ of its step at the decision token
    mass: float = math.nan  # the decision token's image mass (mean over layers)
    finite: bool = True  # finite logits, and no edit dropped as non-finite


@dataclass(frozen=True)
class Cause:
    id: str
    title: str
    detected: bool
    strength: float  # 0..1, how strongly present
    evidence: dict[str, float | int | str]
    threshold: str  # the rule and its threshold, human-readable
    sentence: str  # one plain sentence with the measured numbers
    decisive: bool | None = None  # None: not tested (no counterfactual run, or not detected)
    test: str = ""  # what undoing the cause alone did (the counterfactual), in one sentence
    run: CounterfactualRun | None = None  # the run that decided ``decisive`` (required when True)
    untestable: str = ""  # why no run can test this cause here (its test cannot succeed by construction)
    members: tuple[str, ...] = ()  # a joint cause: the causes undone together

    def __post_init__(self):
        if self.decisive and self.run is None:
            raise ValueError(f"cause {self.id!r}: 'decisive' needs the recorded counterfactual run that showed it")

    @property
    def status(self) -> str:
        if not self.detected:
            return "absent"
        if self.untestable:
            return "untestable here"
        if self.decisive is None and self.test.startswith("observed"):
            return "observed"
        return {True: "decisive", False: "present, not decisive", None: "present, not tested"}[self.decisive]


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    rank: float  # place in the causal order (see the module docstring)
    threshold: str
    check: Callable[["Evidence", "Rule"], Cause]
    # the counterfactual that undoes just this cause: (evidence, cause) → the run for the tester, or None
    # (mclcbf_diag.diagnosis.counterfactual). A tester may answer a run with {"untestable": reason} when
    # running shows it cannot test the cause.
    counterfactual: Callable[["Evidence", Cause], Counterfactual | None] | None = None
    # "step_size": judged on the size of the intervention's step (Σ‖v‖/‖x‖), image mass, margin and
    # outcome; "answer": on margin and outcome (a counterfactual that enlarges the step changes its
    # size by construction)
    judged_on: str = "step_size"


# ----------------------------------------------------------------------- decisiveness
DECISIVE_STEP_REL = 0.01  # |Δ Σ‖v‖/‖x‖| at the decision token ≥ 1% of ‖x‖
DECISIVE_MASS = 0.05  # |Δ image mass| of the decision token (mean over layers) ≥ 0.05
DECISIVE_MARGIN = 0.1  # |Δm| ≥ 10% of |m_base| (and ≥ 0.01)

DECISIVE_RULE = (f"undoing it alone (everything else kept) changes the step size by ≥ {DECISIVE_STEP_REL:.0%} "
                 f"of ‖x‖, the decision token's image mass by ≥ {DECISIVE_MASS}, the margin by ≥ "
                 f"{DECISIVE_MARGIN:.0%} of |m_base|, or the outcome (a search over sizes, or a run compared with a "
                 "non-finite unfixed run, counts only when it reaches what the label asks)")


def decisiveness(ref: dict, cf: dict, m_base: float, judged_on: str = "step_size") -> tuple[bool, list[str]]:
    """Whether a counterfactual run ``cf`` differs from the unfixed run ``ref`` enough to call the cause decisive.

    Pure.

    Args:
        ref: the unfixed run's effect ``{"step_size": Σ‖v‖/‖x‖, "mass": image mass, "margin": m,
            "outcome": str}`` (``step_size``: the size of the intervention's step at the decision token,
            not a decode step); a missing or non-finite entry is not compared.
        cf: the counterfactual run's effect, the same keys.
        m_base: the baseline (unsteered) margin; a margin change counts from
            :data:`DECISIVE_MARGIN` × ``|m_base|`` (and at least 0.01).
        judged_on: ``"step_size"``: step size and image mass count too; ``"answer"``: only margin and
            outcome (see :attr:`Rule.judged_on`).

    Returns:
        ``(decisive, what changed)``: whether anything changed enough, and one phrase per change.
    """
    changed = []

    def num(k):
        a, b = ref.get(k), cf.get(k)
        return (a, b) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) else None

    if judged_on == "step_size":
        if (p := num("step_size")) and abs(p[1] - p[0]) >= DECISIVE_STEP_REL:
            changed.append(f"step size {fmt(p[0])} → {fmt(p[1])} of ‖x‖")
        if (p := num("mass")) and abs(p[1] - p[0]) >= DECISIVE_MASS:
            changed.append(f"image mass {fmt(p[0])} → {fmt(p[1])}")
    a, b = ref.get("margin"), cf.get("margin", math.nan)
    if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)):
        # ±inf: a decoding method's cutoff ruled Yes or No out; going to or from it is a change
        if a != b and (math.isinf(a) or math.isinf(b) or abs(b - a) >= max(DECISIVE_MARGIN * abs(m_base), 0.01)):
            changed.append(f"margin {a:+.3g} → {b:+.3g}")
    elif a is not None and math.isnan(a) != (b is None or math.isnan(b)):
        changed.append("margin a number ↔ not a number")
    if ref.get("outcome") != cf.get("outcome"):
        changed.append(f"outcome {ref.get('outcome')} → {cf.get('outcome')}")
    return bool(changed), changed


def fmt(x: float) -> str:
    return f"{x:.3g}" if not math.isnan(x) else "n/a"


def pct(x: float) -> str:
    return f"{100 * x:.3g}%" if math.isfinite(x) else "n/a"


def median(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.median(vals)) if vals else math.nan


def fired_by_step(ev: "Evidence") -> tuple[list[int], list[int], list[int]]:
    """Default layer sets: layers where the intervention changed the model (a step or an attention edit)."""
    changed = sorted(set(ev.layers("rounding_survival")) | {ly for ly, on in ev.shift.items() if on})
    return changed, changed, changed


# the answer's margin: ±inf by construction where a decoding-level method's cutoff ruled out Yes or No, NaN where
# no answer was read; every other metric is kept only where finite
ANSWER_MARGIN = "final_margin"


class Evidence:
    """One question at one (phase, decode step): {layer: value} per (condition, metric), head −1, finite."""

    def __init__(self, df: pd.DataFrame, rules: list[Rule], layer_sets=fired_by_step):
        head = df[df["head"] == NO_HEAD]
        # a NaN margin: no answer was read (±inf is one of Yes and No ruled out by a decoding method's cutoff)
        raw = head[(head["metric"] == ANSWER_MARGIN) & np.isnan(head["value"].to_numpy(dtype=float))]
        self._raw_nonfinite = {c: True for c in raw["condition"]}
        # {(condition, metric): {layer: finite value}}, later rows overriding earlier ones; plain
        # loops over the columns (a pandas groupby here was most of a population diagnosis)
        self._t: dict[tuple, dict[int, float]] = {}
        for c, m, layer, v in zip(head["condition"].tolist(), head["metric"].tolist(), head["layer"].tolist(),
                                  head["value"].to_numpy(dtype=float).tolist()):
            if isinstance(c, str) and isinstance(m, str):  # groupby's keys: NaN keys dropped
                d = self._t.setdefault((c, m), {})
                if math.isfinite(v) or (m == ANSWER_MARGIN and not math.isnan(v)):
                    d[int(layer)] = v
        shift = df[(df["metric"] == "logit_shift") & (df["condition"] == "steered") & (df["layer"] >= 0)]
        self.shift = {int(layer): bool((g["value"].abs() > 0).any()) for layer, g in shift.groupby("layer")}
        self.conditions = set(df["condition"])
        self._rules = {r.id: r for r in rules}
        self._causes: dict[str, Cause] = {}
        self.steered, self.active, self.fired = layer_sets(self)

    # -- the answer ---------------------------------------------------------------------
    def label(self) -> str | None:
        """The question's label from the records (``label_yes``), or None."""
        v = next((self.scalar("label_yes", c) for c in ("baseline", "steered") if self.scalar("label_yes", c)
                  is not None), None)
        return None if v is None else ("yes" if v > 0.5 else "no")

    def answer(self, cond: str) -> str | None:
        y, m = self.scalar("answer_yes", cond), self.scalar("final_margin", cond)
        if y is None and m is None:
            return None
        return "yes" if (y > 0.5 if y is not None else m > 0) else "no"

    def valid(self, cond: str) -> bool:
        """A Yes/No answer: finite logits and a Yes/No spelling on top (True when not recorded)."""
        top, fin = self.scalar("top_is_yes_no", cond), self.scalar("logits_finite", cond)
        return (top is None or top > 0.5) and (fin is None or fin > 0.5) and self.finite(cond)

    def finite(self, cond: str) -> bool:
        fin, bad = self._t.get((cond, "logits_finite"), {}).get(NO_LAYER), self.scalar("nonfinite_values", cond)
        raw = self._raw_nonfinite.get(cond, False)
        return (fin is None or fin > 0.5) and (bad is None or bad == 0) and not raw

    def outcome(self, cond: str = "steered") -> str | None:
        """unchanged / fixed / broken / derailed / non_finite (changed / unchanged without a label)."""
        from ..measurements.outcomes import DROPPED_EDIT_METRICS, outcome

        base, new = self.answer("baseline"), self.answer(cond)
        if base is None or new is None:
            return None if self.finite(cond) else "derailed"
        dropped = any(v > 0 for m in DROPPED_EDIT_METRICS for v in self.layers(m, cond).values())
        return outcome(base, self.valid("baseline"), new, self.valid(cond), self.label(), new_finite=self.finite(cond),
                       new_dropped=dropped)

    def goal(self) -> tuple[str, ...]:
        """The outcomes that answer the label's question.

        (:data:`mclcbf_diag.measurements.outcomes.GOALS`; none without an answer.)"""
        from ..measurements.outcomes import GOALS, kind

        base = self.answer("baseline")
        return () if base is None else GOALS[kind(self.label(), base)]

    def layers(self, metric: str, cond: str = "steered") -> dict[int, float]:
        return {k: v for k, v in self._t.get((cond, metric), {}).items() if k >= 0}

    def scalar(self, metric: str, cond: str = "steered") -> float | None:
        return self._t.get((cond, metric), {}).get(NO_LAYER)

    def per_fired(self, metric: str) -> dict[int, float]:
        vals = self.layers(metric)
        return {ly: vals[ly] for ly in self.fired if ly in vals}

    def floors(self, metric: str, cond: str = "steered") -> dict[int, float]:
        """The noise floor recorded next to ``metric`` per layer (``<metric>_floor``; none recorded: empty)."""
        return self.layers(f"{metric}_floor", cond)

    def floor(self, metric: str, layer: int = NO_LAYER, cond: str = "steered") -> float:
        """``metric``'s noise floor at ``layer`` (0.0 where none is recorded: the figure is taken as exact)."""
        return self._t.get((cond, f"{metric}_floor"), {}).get(layer, 0.0)

    def cause(self, rule_id: str) -> Cause | None:
        """The cause rule ``rule_id`` finds (evaluated once; None if no such rule)."""
        if rule_id not in self._causes:
            rule = self._rules.get(rule_id)
            if rule is None:
                return None
            self._causes[rule_id] = rule.check(self, rule)
        return self._causes[rule_id]

    @staticmethod
    def make(rule: Rule, detected: bool, strength: float, evidence: dict, sentence: str,
             decisive: bool | None = None, test: str = "", run: CounterfactualRun | None = None) -> Cause:
        """A rule's :class:`Cause`, its evidence made JSON-safe.

        Args:
            rule: the rule whose cause this is (its id, title and threshold are copied).
            detected: whether the cause is present.
            strength: how strongly present, clipped to [0, 1]; 0 when not detected or not finite.
            evidence: the numbers read, by name; bools and integers become ``int``, strings are kept,
                other values become ``float``; NaN entries are dropped (±inf kept).
            sentence: one plain sentence with the measured numbers.
            decisive: whether the cause's counterfactual was decisive; None: not tested. Kept only when
                detected.
            test: what undoing the cause alone did, in one sentence; kept only when detected.
            run: the counterfactual run that decided ``decisive`` (required when it is True); kept only
                when detected.

        Returns:
            The cause.
        """
        ev = {k: int(x) if isinstance(x, (bool, np.bool_, int, np.integer)) else x if isinstance(x, str) else float(x)
              for k, x in evidence.items()}
        # NaN dropped; ±inf kept (a margin a decoding method's cutoff made infinite; Python's json round-trips it)
        ev = {k: x for k, x in ev.items() if not isinstance(x, float) or not math.isnan(x)}
        s = float(np.clip(strength, 0.0, 1.0)) if detected and math.isfinite(strength) else 0.0
        return Cause(rule.id, rule.title, bool(detected), s, ev, rule.threshold, sentence,
                     decisive if detected else None, test if detected else "", run if detected else None)

    def skip(self, rule: Rule, why: str) -> Cause:
        return self.make(rule, False, 0.0, {"skipped": why}, f"Not assessed: {why}.")


def select(records: pd.DataFrame, question_id, phase: str, decode_step: int) -> pd.DataFrame:
    """The records of one question at (phase, decode step).

    Args:
        records: tidy records (columns ``question_id``, ``phase``, ``decode_step``, ...).
        question_id: the question kept; None: the only question in ``records``.
        phase: the phase kept (``"prefill"`` or ``"decode"``).
        decode_step: the decode step kept.

    Returns:
        The matching rows.

    Raises:
        UserError: ``records`` hold several questions and ``question_id`` is None, or no row matches.
    """
    if question_id is None:
        ids = list(dict.fromkeys(records["question_id"]))
        if len(ids) > 1:
            raise UserError(f"records hold {len(ids)} questions; pass question_id= one of {ids[:5]}")
        question_id = ids[0] if ids else None
    df = records[(records["question_id"] == question_id) & (records["phase"] == phase)
                 & (records["decode_step"] == decode_step)]
    if df.empty:
        raise UserError(f"no records for question_id {question_id!r}, phase {phase!r}, decode_step {decode_step}")
    return df


def run_rules(df: pd.DataFrame, rules: list[Rule], layer_sets=fired_by_step, *, tester=None,
              intervention=None) -> list[Cause]:
    """Every rule's cause, tested by its counterfactual where a ``tester`` is given, and ranked.

    When no single cause's
    run reaches the label's goal and a wrong (or unlabeled) answer was not fixed (changed), sets of the detected
    causes are undone together (:func:`joint_causes`); the smallest decisive set is one more
    cause. Ranking: detected first; among them decisive (those whose run reached what the label asks,
    such as fixed for a wrong answer, before the others), then untested, then not decisive; each
    group in causal order, ties by strength.

    Args:
        df: the records of one question at one (phase, decode step) (:func:`select`).
        rules: the rule table.
        layer_sets: ``layer_sets(evidence) → (steered, active, fired)`` layer lists the rules read
            (default :func:`fired_by_step`; an intervention's own is its ``layer_sets``).
        tester: ``tester(cf)`` runs one :class:`Counterfactual` (from :attr:`Rule.counterfactual`, or from
            the intervention's own ``counterfactual(cause)`` hook, which wins) and returns its effect
            (see :func:`decisiveness`); ``tester(None)`` is the unfixed intervention. None: nothing is run
            and the causes that need a run stay "not tested".
        intervention: the intervention whose ``counterfactual(cause)`` hook is asked first; None: the
            rules' own counterfactuals only.

    Returns:
        Every rule's :class:`Cause` (and a joint cause when one was found), ranked.
    """
    ev = Evidence(df, rules, layer_sets)
    causes = [ev.cause(r.id) for r in rules]
    by_id = {r.id: r for r in rules}
    rank = {r.id: r.rank for r in rules}
    goal = ev.goal()
    if tester is not None:
        specs = {c.id: _spec(ev, by_id[c.id], c, intervention) for c in causes}
        causes = [_tested(ev, by_id[c.id], c, specs[c.id], tester) for c in causes]
        joint = joint_causes(ev, causes, specs, tester, rank)
        if joint is not None:
            rank[joint.id] = min(rank[m] for m in joint.members)
            causes.append(joint)
    order = {True: 0, None: 1, False: 2}
    return sorted(causes, key=lambda c: (not c.detected, order[c.decisive], not reaches_goal(c, goal),
                                         rank[c.id], -c.strength))


def reaches_goal(cause: Cause, goal: tuple[str, ...]) -> bool:
    """A decisive cause whose run reached what the label asks (fixed for a wrong answer; broken or derailed
    for a right one; changed or derailed without a label): such causes rank first among the decisive ones."""
    return bool(cause.decisive) and cause.run is not None and cause.run.outcome in goal


def _spec(ev: Evidence, rule: Rule, cause: Cause, intervention) -> Counterfactual | None:
    """The counterfactual that undoes ``cause`` alone (the intervention's hook wins), or None."""
    if not cause.detected or cause.decisive is not None:
        return None
    hook = getattr(intervention, "counterfactual", None)
    spec = hook(cause) if hook is not None else None
    if spec is None and rule.counterfactual is not None:
        spec = rule.counterfactual(ev, cause)
    if spec is not None and not isinstance(spec, Counterfactual):  # programming error in a rule
        raise TypeError(f"rule {rule.id!r}: a counterfactual is a Counterfactual "
                        f"(mclcbf_diag.diagnosis.counterfactual), not {type(spec).__name__}")
    return spec


def _run_of(spec: Counterfactual, cf: dict) -> CounterfactualRun:
    def num(key):
        v = cf.get(key)
        return math.nan if v is None else float(v)

    return CounterfactualRun(spec.why, num("margin"), str(cf.get("outcome")), num("step_size"), num("mass"),
                             _finite(cf))


def _finite(effect: dict) -> bool:
    """A run that shows an effect: finite logits and no edit dropped as non-finite."""
    m = effect.get("margin", math.nan)
    return (effect.get("finite", True) and not effect.get("dropped", False) and m is not None
            and not math.isnan(m))  # ±inf: a decoding method's cutoff, an answer all the same


def _judged(ref: dict, cf: dict, mb: float, judged_on: str, goal: tuple, searched: bool) -> tuple[bool, list[str]]:
    """Whether a finite counterfactual run decides its cause.

    Against a finite unfixed run: :func:`decisiveness`. Against an unfixed run that is itself
    non-finite (a dropped step, NaN logits) nothing can be compared, and a search enlarges its change
    until something moves: in both cases only a run that reaches the label's goal counts.
    """
    if _finite(ref) and not searched:
        return decisiveness(ref, cf, mb, judged_on)
    if cf.get("outcome") not in goal:
        return False, []
    return True, [f"margin {ref.get('margin', math.nan):+.3g} → {cf.get('margin', math.nan):+.3g}",
                  f"outcome {ref.get('outcome')} → {cf.get('outcome')}"]


def _tested(ev: Evidence, rule: Rule, cause: Cause, spec: Counterfactual | None, tester) -> Cause:
    if spec is None:
        return cause
    if spec.untestable:
        return dataclasses.replace(cause, untestable=spec.untestable, test=f"untestable here: {spec.untestable}")
    runs = spec.runs()
    ref, goal, searched = tester(None), ev.goal(), bool(spec.search) or spec.goal_only
    mb = ev.scalar("final_margin", "baseline")
    ran = []
    for one in runs:
        cf = tester(one)
        if cf is None:  # this setting could not run: the next may
            continue
        if cf.get("untestable"):  # the tester found, running it, that this run cannot test the cause here
            return dataclasses.replace(cause, untestable=cf["untestable"], test=f"untestable here: {cf['untestable']}")
        ran.append((one, cf))
        if not _finite(cf):  # non-finite is never an effect: nothing is read from this run
            continue
        ok, what = _judged(ref, cf, mb if mb is not None else 0.0, rule.judged_on, goal, searched)
        if ok:
            return _with_run(cause, True, f"undoing it alone ({one.why}) changes " + ", ".join(what),
                             one, cf)
    why = spec.why
    if not ran:
        return dataclasses.replace(cause, test=f"counterfactual ({why}) could not run")
    finite = [(one, cf) for one, cf in ran if _finite(cf)]
    if not finite:
        one, cf = ran[-1]
        return _with_run(cause, None, f"undoing it alone ({one.why}) gives a non-finite run (margin "
                                      f"{fmt(cf.get('margin', math.nan))}, outcome {cf.get('outcome')}): no effect "
                                      "can be read from it", one, cf)
    one, cf = finite[-1]
    last = f"margin {ref.get('margin', math.nan):+.3g} → {cf.get('margin', math.nan):+.3g}, outcome {cf.get('outcome')}"
    if not _finite(ref):
        return _with_run(cause, None, f"the unfixed run is non-finite, so only a run that reaches "
                                      f"{' or '.join(goal)} could decide it; undoing it alone ({one.why}) "
                                      f"does not ({last})", one, cf)
    if searched and len(runs) == 1:
        return _with_run(cause, False, f"undoing it alone ({why}) does not make the answer {' or '.join(goal)} "
                                       f"({last})", one, cf)
    if searched:
        skipped = len(runs) - len(finite)
        return _with_run(cause, False, f"undoing it alone at any of {len(runs)} settings ({why}) reaches no "
                                       f"{' or '.join(goal)} outcome" + (f" ({skipped} of them non-finite or not run)"
                                                                         if skipped else "") + f" (last: {last})",
                         one, cf)
    return _with_run(cause, False, f"undoing it alone ({why}) changes none of step size, image mass, margin or "
                                   f"outcome by the stated amount ({last})", one, cf)


def _with_run(cause: Cause, decisive, test: str, spec: Counterfactual, cf: dict) -> Cause:
    ev_ = {**cause.evidence, "cf_margin": cf.get("margin", math.nan), "cf_outcome": str(cf.get("outcome")),
           "cf_step_size": cf.get("step_size", math.nan), "cf_mass": cf.get("mass", math.nan)}
    ev_ = {k: v for k, v in ev_.items() if not isinstance(v, float) or math.isfinite(v)}
    return dataclasses.replace(cause, decisive=decisive, test=test, evidence=ev_, run=_run_of(spec, cf))


# ----------------------------------------------------------------------- joint causes
JOINT_MAX_SIZE = 3  # causes undone together at most
JOINT_MAX_RUNS = 8  # counterfactual runs spent on sets at most, per question


def joint_causes(ev: Evidence, causes: list[Cause], specs: dict, tester, rank: dict) -> Cause | None:
    """The smallest set of detected causes whose counterfactuals together change the result, as one cause.

    Tried only when no single cause's run reaches what the label asks (a cause may be decisive by
    the step or the margin it changes and still leave the answer wrong) and a wrong (or unlabeled)
    answer is not what the label asks: sets of 2, then 3 causes (:data:`JOINT_MAX_SIZE`), each in
    causal order, at most :data:`JOINT_MAX_RUNS` runs. A set counts only when undoing it reaches the
    label's goal.

    Args:
        ev: the question's evidence.
        causes: every rule's cause, each already tested alone.
        specs: cause id → the :class:`Counterfactual` that undoes it alone (None: none).
        tester: runs one counterfactual and returns its effect (see :func:`run_rules`).
        rank: cause id → its place in the causal order (sets are built in that order).

    Returns:
        The joint cause (decisive, with the run that showed it; ``members``: the causes undone), or None
        when no set reaches the goal, the runs are spent, or the answer needs no fixing.
    """
    import itertools

    goal = ev.goal()
    if any(reaches_goal(c, goal) for c in causes):
        return None
    label, base = ev.label(), ev.answer("baseline")
    if base is None or (label is not None and base == label) or ev.outcome() in goal:
        return None
    pool = sorted((c for c in causes if c.detected and joint([specs.get(c.id)]) is not None),
                  key=lambda c: rank[c.id])
    ref, mb, runs = tester(None), ev.scalar("final_margin", "baseline"), 0
    for size in range(2, JOINT_MAX_SIZE + 1):
        for group in itertools.combinations(pool, size):
            if runs >= JOINT_MAX_RUNS:
                return None
            merged = joint([specs[c.id] for c in group])
            if merged is None:
                continue
            for spec in merged.runs():  # a set holding a search: its settings in order, each a run
                if runs >= JOINT_MAX_RUNS:
                    return None
                cf = tester(spec)
                runs += 1
                if cf is None or not _finite(cf) or cf.get("untestable"):
                    continue
                ok, what = _judged(ref, cf, mb if mb is not None else 0.0, "answer", goal, True)
                if ok:
                    break
            else:
                continue
            ids = tuple(c.id for c in group)
            alone = "; ".join(f"{c.id}: {c.status}" for c in group)
            s = (f"Undoing {' + '.join(ids)} together changes {', '.join(what)}, while none of them alone made "
                 f"the answer {' or '.join(goal)} ({alone}).")
            return Cause("joint:" + "+".join(ids), "Joint cause: " + " + ".join(c.title for c in group), True,
                         min(c.strength for c in group), {"members": ",".join(ids), "n_members": len(ids),
                                                          "cf_margin": cf.get("margin", math.nan),
                                                          "cf_outcome": str(cf.get("outcome"))},
                         "undoing every member together reaches what the label asks",
                         s, True, f"undoing them together ({spec.why}) changes " + ", ".join(what),
                         _run_of(spec, cf), members=ids)
    return None

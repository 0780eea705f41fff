"""The diagnosis engine: a table of rules over tidy records → ranked causes.

A :class:`Rule` is ``(id, title, rank, threshold, check)``. ``check(ev)`` reads the records of
one sample at one (phase, step) through :class:`Evidence` and returns a :class:`Cause` (made
with :meth:`Evidence.make`, or :meth:`Evidence.skip` when its evidence is missing; a rule
never raises on missing records). ``rank`` is the rule's place in the causal order a step
lives through (it exists → targets the image → is asked for → is computed → is scaled →
survives rounding → is large next to x → does what was predicted → is carried by the
residual → moves the margin → acts on the answer's path): a failure early in that chain
hides everything after it, so detected causes are ranked by it. A rule may read the cause
another rule found (:meth:`Evidence.cause`), evaluated on demand.

The layer sets every rule shares are computed once per diagnosis by the rules' ``layers``
function: *steered* (layers the intervention acted on or measured), *active* (where it asked
to act) and *fired* (where it changed the model). Generic rules live in
:mod:`mclcbf_diag.diagnose`; an intervention brings its own (``Intervention.rules()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import UserError
from .records import NO_HEAD, NO_LAYER


KNOCKOUT_DOMINANCE = 3.0  # |Δm_after_image| ≥ this × |Δm_decision|: the after-image path dominates


@dataclass(frozen=True)
class Cause:
    id: str
    title: str
    detected: bool
    strength: float  # 0..1, how strongly present
    evidence: dict[str, float | int | str]
    threshold: str  # the rule and its threshold, human-readable
    sentence: str  # one plain sentence with the measured numbers


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    rank: int  # place in the causal order (see the module docstring)
    threshold: str
    check: Callable[["Evidence", "Rule"], Cause]


def fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else "n/a"


def pct(x: float) -> str:
    return f"{100 * x:.3g}%" if math.isfinite(x) else "n/a"


def median(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.median(vals)) if vals else math.nan


def fired_by_step(ev: "Evidence") -> tuple[list[int], list[int], list[int]]:
    """Default layer sets: layers where the intervention changed the model (a step or an attention edit)."""
    changed = sorted(set(ev.layers("rounding_survival")) | {ly for ly, on in ev.shift.items() if on})
    return changed, changed, changed


class Evidence:
    """One sample at one (phase, step): {layer: value} per (condition, metric), head −1, finite."""

    def __init__(self, df: pd.DataFrame, rules: list[Rule], layer_sets=fired_by_step):
        head = df[df["head"] == NO_HEAD]
        self._t = {k: {int(layer): float(v) for layer, v in zip(g["layer"], g["value"]) if math.isfinite(v)}
                   for k, g in head.groupby(["condition", "metric"])}
        shift = df[(df["metric"] == "logit_shift") & (df["condition"] == "steered") & (df["layer"] >= 0)]
        self.shift = {int(layer): bool((g["value"].abs() > 0).any()) for layer, g in shift.groupby("layer")}
        self.conditions = set(df["condition"])
        self._rules = {r.id: r for r in rules}
        self._causes: dict[str, Cause] = {}
        self.steered, self.active, self.fired = layer_sets(self)

    def layers(self, metric: str, cond: str = "steered") -> dict[int, float]:
        return {k: v for k, v in self._t.get((cond, metric), {}).items() if k >= 0}

    def scalar(self, metric: str, cond: str = "steered") -> float | None:
        return self._t.get((cond, metric), {}).get(NO_LAYER)

    def per_fired(self, metric: str) -> dict[int, float]:
        vals = self.layers(metric)
        return {ly: vals[ly] for ly in self.fired if ly in vals}

    def cause(self, rule_id: str) -> Cause | None:
        """The cause rule ``rule_id`` finds (evaluated once; None if no such rule)."""
        if rule_id not in self._causes:
            rule = self._rules.get(rule_id)
            if rule is None:
                return None
            self._causes[rule_id] = rule.check(self, rule)
        return self._causes[rule_id]

    @staticmethod
    def make(rule: Rule, detected: bool, strength: float, evidence: dict, sentence: str) -> Cause:
        ev = {k: int(x) if isinstance(x, (bool, np.bool_, int, np.integer)) else x if isinstance(x, str) else float(x)
              for k, x in evidence.items()}
        ev = {k: x for k, x in ev.items() if not isinstance(x, float) or math.isfinite(x)}  # JSON-safe
        s = float(np.clip(strength, 0.0, 1.0)) if detected and math.isfinite(strength) else 0.0
        return Cause(rule.id, rule.title, bool(detected), s, ev, rule.threshold, sentence)

    def skip(self, rule: Rule, why: str) -> Cause:
        return self.make(rule, False, 0.0, {"skipped": why}, f"Not assessed: {why}.")


def select(records: pd.DataFrame, sample, phase: str, step: int) -> pd.DataFrame:
    """The records of one sample at (phase, step); a UserError when there are none or several samples."""
    if sample is None:
        samples = list(dict.fromkeys(records["sample"]))
        if len(samples) > 1:
            raise UserError(f"records hold {len(samples)} samples; pass sample= one of {samples[:5]}")
        sample = samples[0] if samples else None
    df = records[(records["sample"] == sample) & (records["phase"] == phase) & (records["step"] == step)]
    if df.empty:
        raise UserError(f"no records for sample {sample!r}, phase {phase!r}, step {step}")
    return df


def run_rules(df: pd.DataFrame, rules: list[Rule], layer_sets=fired_by_step) -> list[Cause]:
    """Every rule's cause, ranked: detected first, each group in causal order, ties by strength."""
    ev = Evidence(df, rules, layer_sets)
    causes = [ev.cause(r.id) for r in rules]
    rank = {r.id: r.rank for r in rules}
    return sorted(causes, key=lambda c: (not c.detected, rank[c.id], -c.strength))

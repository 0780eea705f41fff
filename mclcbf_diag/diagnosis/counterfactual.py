"""A cause test's counterfactual: the one run that undoes a cause with everything else kept.

A rule (or an intervention's ``counterfactual`` hook) names the run as a :class:`Counterfactual`:

* knob changes: fixed values (``knobs``) and values computed from the intervention's own knobs
  (``knobs_of``, e.g. "the prefill thresholds set to the decode ones"), applied in that order;
* or a whole other intervention (``intervention``);
* a dose multiplier (``dose``): what the intervention changes, scaled;
* a wider dtype (``dtype``): the same run on a copy of the model in that dtype, the rounding test;
* a graded search (``search``): several counterfactuals in order, the smallest change first, of
  which the first that decides the cause counts;
* or why no run can test the cause here (``untestable``), decided before running.

``goal_only``: only a run that reaches the label's goal counts (the dtype alone moves every margin
a little). :attr:`Counterfactual.key` identifies the run, so testers run each once; :func:`joint`
undoes several causes in one run (a joint cause). Nothing here runs a model: the experiments do
(:mod:`mclcbf_diag.experiments.evidence`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Counterfactual:
    """One cause test's run (see the module docstring for the fields)."""

    why: str = ""  # what it undoes, in words ("τ_prefill = 0.5"): printed with the test's outcome
    knobs: Mapping[str, object] = field(default_factory=dict)
    knobs_of: Callable[[object], dict] | None = None  # the intervention's knobs → knob changes
    intervention: object | None = None  # another intervention, run instead
    dose: float = 1.0
    dtype: str | None = None  # "float32": on a copy of the model in that dtype
    search: tuple[Counterfactual, ...] = ()
    untestable: str = ""  # why it cannot be tested here (nothing runs)
    goal_only: bool = False

    def __post_init__(self):
        object.__setattr__(self, "knobs", dict(self.knobs))
        object.__setattr__(self, "search", tuple(self.search))

    @property
    def key(self) -> str:
        """What identifies the run: equal keys, equal runs (``knobs_of`` is told apart by ``why``)."""
        return repr((self.why, sorted(self.knobs.items()), self.knobs_of is not None, self.intervention, self.dose,
                     self.dtype, tuple(s.key for s in self.search), self.untestable, self.goal_only))

    def __hash__(self) -> int:  # the fields hold a dict; equal fields give equal keys, so this agrees with ==
        return hash(self.key)

    def runs(self) -> list[Counterfactual]:
        """The runs it asks for: itself, or its search's settings in order."""
        return list(self.search) if self.search else [self]

    def variant(self, intervention) -> tuple[object, float]:
        """``(intervention, dose)`` this counterfactual runs, from the intervention as configured.

        Raises:
            ValueError: for a ``dtype`` run (on a copy of the model, not a variant) or a search (run each setting).
        """
        if self.dtype is not None or self.search:
            raise ValueError("a counterfactual in another dtype, or a search, is not one variant")
        if self.intervention is not None:
            return self.intervention, self.dose
        changes = {**(self.knobs_of(intervention.knobs) if self.knobs_of is not None else {}), **self.knobs}
        return (intervention.replace(**changes) if changes else intervention), self.dose

    def in_model_dtype(self) -> Counterfactual:
        """The same run on the model as loaded (the dtype and the goal-only reading dropped)."""
        return dataclasses.replace(self, dtype=None, goal_only=False)


def joint(parts: list[Counterfactual | None]) -> Counterfactual | None:
    """One counterfactual that undoes every one of ``parts`` together (None: they cannot be combined).

    Knob changes are joined (a knob two parts set differently: None), knob functions applied in
    turn, doses multiplied. One search among them becomes a search whose every setting carries the
    others' changes; two searches, a whole replacement intervention, a run in another dtype or an
    untestable part do not combine.
    """
    if any(p is None for p in parts):
        return None
    searches = [p for p in parts if p.search]
    if len(searches) > 1:
        return None
    if searches:
        rest = [p for p in parts if not p.search]
        items = [joint([one, *rest]) for one in searches[0].search]
        if any(i is None for i in items):
            return None
        return Counterfactual(why=" and ".join(p.why for p in [searches[0], *rest]), search=tuple(items))
    knobs, fns, dose = {}, [], 1.0
    for p in parts:
        if p.intervention is not None or p.untestable or p.dtype is not None:
            return None
        for k, v in p.knobs.items():
            if k in knobs and knobs[k] != v:
                return None
            knobs[k] = v
        if p.knobs_of is not None:
            fns.append(p.knobs_of)
        dose *= p.dose
    knobs_of = (lambda k: {key: v for fn in fns for key, v in fn(k).items()}) if fns else None
    return Counterfactual(why=" and ".join(p.why for p in parts), knobs=knobs, knobs_of=knobs_of, dose=dose)


__all__ = ["Counterfactual", "joint"]

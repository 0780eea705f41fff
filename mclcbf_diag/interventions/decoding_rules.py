"""Why a decoding-level method leaves an answer as it was: rules over its ``decoding_*`` records.

A contrastive method reads the answer from s = (1 + α)·ℓ − α·ℓ' (or its log-probability
forms) on the tokens that pass a plausibility cutoff. With m the model's own Yes − No margin,
m' the contrasted distribution's and m_c = (1 + α)·m − α·m' the contrast's before the cutoff:

* ``contrast_cancels``: the contrast's shift α·(m − m') leaves the margin's sign: the other view
  answers about as the clean one does (or leans the same way harder, and the shift points away
  from the other answer); undone by a stronger contrast, a graded search over α × 2 … × 64 (a
  negative claim needs the whole sweep; a shift away from the other answer grows away with it);
* ``cutoff_removes_flip``: m_c has the other sign than m, but the cutoff ruled out the token
  m_c favours, so the answer stays; undone by the same run without the cutoff;
* ``premature_agrees`` (DoLa): the chosen premature layer's distribution is within
  :data:`JSD_AGREES` nats of the final one's, so log p_final − log p_premature has little to
  contrast; undone by the other bucket of candidate layers.

Each rule reads whole-model records (layer −1) of condition ``steered``; none fires on a run that
has no ``decoding_model_margin`` (a method that did not read the answer's distribution).
"""

from __future__ import annotations

import math

from ..diagnosis.counterfactual import Counterfactual
from ..diagnosis.rulebook import Cause, Evidence, Rule, fmt

CONTRAST_SEARCH = (2, 4, 8, 16, 32, 64)  # the contrast strength × these, smallest first
JSD_AGREES = 1e-3  # nats: the premature and final distributions nearly the same


def _kept_right(ev: Evidence) -> bool:
    """A right answer the method kept is no failure: these rules explain answers it left wrong (or unchanged)."""
    label = ev.label()
    return label is not None and ev.answer("baseline") == label


def _terms(ev: Evidence):
    return (ev.scalar("decoding_model_margin"), ev.scalar("decoding_aux_margin"),
            ev.scalar("decoding_contrast_margin"))


def contrast_cancels(ev: Evidence, rule: Rule) -> Cause:
    m, aux, mc = _terms(ev)
    if m is None or aux is None or mc is None:
        return ev.skip(rule, "no decoding_model_margin / decoding_aux_margin (not a contrastive method's run)")
    flips = mc == mc and mc != 0 and m != 0 and math.copysign(1, mc) != math.copysign(1, m)
    shift = mc - m  # α·(m − m'): what the contrast added to the model's margin
    toward = m != 0 and math.copysign(1, shift) != math.copysign(1, m)
    e = {"model_margin": m, "aux_margin": aux, "contrast_margin": mc, "contrast_shift": shift}
    how = (f"toward the other answer, but only {fmt(abs(shift))} of the {fmt(abs(m))} a change needs" if toward else
           "away from the other answer")
    s = (f"The contrast moved the margin by {shift:+.3g} ({fmt(m)} → {fmt(mc)}; the contrasted view's margin is "
         f"{fmt(aux)}), {how}.")
    return ev.make(rule, m != 0 and not flips and not _kept_right(ev), 1.0 - (abs(shift) / abs(m) if toward else 0.0),
                   e, s)


def cutoff_removes_flip(ev: Evidence, rule: Rule) -> Cause:
    m, mc = ev.scalar("decoding_model_margin"), ev.scalar("decoding_contrast_margin")
    cut_yes, cut_no = ev.scalar("decoding_cut_yes"), ev.scalar("decoding_cut_no")
    if m is None or mc is None or cut_yes is None or cut_no is None:
        return ev.skip(rule, "no decoding_contrast_margin / decoding_cut_* records")
    flips = mc == mc and mc != 0 and m != 0 and math.copysign(1, mc) != math.copysign(1, m)
    favoured_cut = (cut_yes > 0.5) if mc > 0 else (cut_no > 0.5)
    e = {"model_margin": m, "contrast_margin": mc, "cut_yes": cut_yes, "cut_no": cut_no}
    token = "Yes" if mc > 0 else "No"
    s = (f"Before the plausibility cutoff the contrast answers {token} (margin {fmt(mc)}, the model's {fmt(m)}), but "
         f"the cutoff ruled {token} out.")
    return ev.make(rule, flips and favoured_cut and not _kept_right(ev), 1.0, e, s)


def premature_agrees(ev: Evidence, rule: Rule) -> Cause:
    jsd, layer = ev.scalar("dola_jsd"), ev.scalar("dola_premature_layer")
    if jsd is None:
        return ev.skip(rule, "no dola_jsd record")
    e = {"jsd": jsd, "premature_layer": layer if layer is not None else math.nan}
    s = (f"The premature layer ({fmt(layer) if layer is not None else '?'}) already agrees with the final one: "
         f"their Jensen–Shannon divergence is {jsd:.3g} nats.")
    return ev.make(rule, jsd < JSD_AGREES and not _kept_right(ev), 1 - jsd / JSD_AGREES, e, s)


def _cf_stronger(ev: Evidence, cause):
    return Counterfactual(why="a stronger contrast, × " + ", ".join(str(k) for k in CONTRAST_SEARCH),
                          search=tuple(Counterfactual(why=f"the contrast × {k}", dose=k) for k in CONTRAST_SEARCH))


def _cf_no_cutoff(knob: str):
    def spec(ev: Evidence, cause):
        return Counterfactual(why=f"{knob} = 0 (no plausibility cutoff)", knobs={knob: 0.0})
    return spec


def _cf_other_bucket(ev: Evidence, cause):
    def other(knobs):
        return {"bucket": "high" if knobs.bucket == "low" else "low", "layers": None}
    return Counterfactual(why="the other bucket of candidate premature layers", knobs_of=other)


def contrast_rules(cutoff_knob: str | None) -> list[Rule]:
    """The rules of a contrastive method whose cutoff is knob ``cutoff_knob`` (None: it has none)."""
    rules = [Rule("contrast_cancels", "The contrast is too weak to change the answer", 6.5,
                  "the contrast's margin keeps the model's sign", contrast_cancels,
                  _cf_stronger, judged_on="answer")]
    if cutoff_knob is not None:
        rules.append(Rule("cutoff_removes_flip", "The plausibility cutoff removed the flipped token", 7,
                          "the contrast before the cutoff favours the other answer, whose token the cutoff ruled "
                          "out", cutoff_removes_flip, _cf_no_cutoff(cutoff_knob), judged_on="answer"))
    return rules


def dola_rules() -> list[Rule]:
    """DoLa's: the cutoff rule and the premature layer that agrees with the final one."""
    return [Rule("premature_agrees", "The premature layer agrees with the final layer", 6.5,
                 f"JSD(final, premature) < {JSD_AGREES} nats", premature_agrees, _cf_other_bucket,
                 judged_on="answer"),
            *contrast_rules("cutoff")[1:]]

"""One question's verdict, checked by experiment, and what only one question has: the cause chain and
per-layer doses.

:func:`explain_sample` is a batch of one through the verdict's stages
(:mod:`mclcbf_diag.experiments.verdict`: baseline, captured trace, graded sweep, counterfactual
tests, dose-response, fixes, diagnosis); ``explain --split`` runs the same stages over many
questions. Every run is read as an *outcome* (:mod:`mclcbf_diag.measurements.outcomes`:
unchanged, fixed, broken, derailed; changed/unchanged without a label), never as a bare sign
change, and every conclusion depends on the label: for a wrong answer "why not fixed, and what
would fix it", for a right one "kept, broken or derailed, and how far from breaking".

After the stages, for one question:

* **Cause chain** (:func:`chain_of`): for a wrong (or unlabeled) answer, apply the fix of the
  top-ranked decisive cause, diagnose again (the counterfactual-tests stage, for the fixed
  intervention), repeat until fixed or no fix is left. A right answer has nothing to fix.
* **Per-layer doses** (:func:`layer_doses_of`): the dose-response stage with one steered layer
  at a time, every layer's grid and bisection batched: where the step could matter most.

The single-question helpers (:func:`cause_tester`, :func:`dose_response`, :func:`counterfactuals`,
:func:`cause_chain`, :func:`per_layer_doses`) run only the stages they need, for notebooks and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..data import LLAVA_PROMPT, PopeQuestion
from ..measurements.measure import run_records
from ..measurements.outcomes import GOALS, dropped_edit, outcome_of
from ..models import LoadedModel
from .evidence import (  # noqa: F401  (the pieces explain's verdict is made of, importable from here too)
    FIX_COLUMNS,
    KNOCKOUTS,
    DoseResponse,
    dose_point,
    dose_point_of,
    dose_result,
    doubling_grid,
    effect,
    fix_plan,
    fix_row,
    kind_of,
    reading,
)
from .trace import TraceResult
from .verdict import (
    QuestionVerdict,
    Settings,
    VerdictBatch,
    baseline,
    captured_trace,
    counterfactual_runs,
    diagnose_jobs,
    dose_jobs,
    fixes,
    graded_sweep,
    run_stages,
    steered_runs,
)


@dataclass
class Explanation:
    trace: TraceResult
    knockout_records: pd.DataFrame  # the knockouts' and the sweep's records
    causes: list
    dose: DoseResponse
    fixes: pd.DataFrame
    chain: pd.DataFrame
    layer_doses: pd.DataFrame | None = None
    sweep: pd.DataFrame | None = None
    sweep_text: str = ""
    localisation: object = None  # LocalSummary, where a detected cause asks for it (:func:`localised`)

    @property
    def records(self) -> pd.DataFrame:
        return pd.concat([self.trace.records, self.knockout_records], ignore_index=True)


def as_question(question, question_id=None) -> PopeQuestion:
    """A POPE question as is; a bare prompt text as an unlabeled question (id ``question_id`` or 0)."""
    if isinstance(question, PopeQuestion):
        return question
    return PopeQuestion(0 if question_id is None else question_id, "", str(question), None, 0)


def explain_sample(lm: LoadedModel, question, image, config, *, k_max: float = 1024.0,
                   bisect_steps: int = 8, per_layer: bool = False, template: str = LLAVA_PROMPT,
                   sweep: bool = True) -> Explanation:
    """Every stage of the verdict for one question, then its cause chain (and per-layer doses).

    Args:
        lm: the loaded model.
        question: a :class:`PopeQuestion`, or a bare prompt text (an unlabeled question, :func:`as_question`).
        image: the question's image (PIL).
        config: the intervention (an MC-LCBF ``BarrierConfig`` is accepted as such).
        k_max: the largest multiplier on the step the dose-response tries.
        bisect_steps: the dose-response's bisection steps inside the first bracket that reaches the goal.
        per_layer: also the dose-response with one steered layer at a time (:func:`layer_doses_of`).
        template: the prompt template (``<image>`` and ``{question}``).
        sweep: run the graded image-mass sweep (its records join the diagnosis).

    Returns:
        The :class:`Explanation`: the trace, the knockouts' and the sweep's records, the ranked causes, the
        dose-response, the fixes, the cause chain, the per-layer doses (None without ``per_layer``), the sweep
        and its sentence, and the localisation where a detected cause asks for it.

    Raises:
        UserError: the prompt is one the model cannot take (longer than its context or than a sliding window
            keeps); raised before any run.
    """
    from ..data import build_prompt
    from ..models.loading import check_prompt_lengths

    check_prompt_lengths(lm, [build_prompt(as_question(question).text, template)])
    b = VerdictBatch(lm, [as_question(question)], [image], config, Settings(k_max, bisect_steps, sweep, template))
    qv = run_stages(b)[0]
    local_records, local = localised(b, qv)
    return Explanation(trace_result(b, qv), pd.concat([*qv.experiment_parts, local_records], ignore_index=True),
                       qv.causes, qv.dose, qv.fixes, chain_of(b, qv), layer_doses_of(b, qv) if per_layer else None,
                       qv.sweep, qv.sweep_text, local)


def localised(b: VerdictBatch, qv: QuestionVerdict):
    """``(records, summary)`` of the intervention localised by patching (both directions), when a detected cause
    asks for it (:attr:`~mclcbf_diag.interventions.base.Intervention.localised_causes`); its words join that
    cause's sentence. ``(None, None)`` when none does."""
    import dataclasses

    from .attribute import localise

    asks = set(b.iv.localised_causes)
    if not any(c.detected and c.id in asks for c in qv.causes):
        return None, None
    records, found = localise(b.lm, b.model_inputs(qv), b.iv, question_id=qv.question_id, components_at="decision")
    words = local_words(found)
    qv.causes = [dataclasses.replace(c, sentence=f"{c.sentence} {words}") if c.detected and c.id in asks else c
                 for c in qv.causes]
    return records, found


def local_words(found) -> str:
    """A :class:`~mclcbf_diag.experiments.attribute.LocalSummary` in one sentence: how much of the margin's change
    the decision token's residual carries along the depth (patched into the baseline), and which components
    work against it."""
    carried = [e for e in found.decision if e.direction == "denoise" and e.effect == e.effect]
    if not carried:
        return "Localised by patching: no layer's decision-token residual could be patched."
    top = max(carried, key=lambda e: abs(e.effect))
    after = [e for e in carried if e.layer > top.layer]
    gone = next((e.layer for e in after if all(abs(x.effect) <= found.threshold for x in after
                                               if x.layer >= e.layer)), None)
    fate = (f"and nothing beyond twice the noise floor ({found.threshold:.2g}) from layer {gone} on" if gone is not None
            else f"and {carried[-1].effect:+.3g} entering layer {carried[-1].layer}")
    text = (f"Localised by patching the intervened run's decision-token residual into the baseline: it carries "
            f"{top.effect:+.3g} of the margin entering layer {top.layer} {fate} (the whole change of the margin: "
            f"{found.gap:+.3g})")
    against = [e for e in found.cancels if e.direction == "denoise"][:3]
    names = ", ".join(f"{'head ' + str(e.layer) + '.' + str(e.head) if e.site == 'head' else 'MLP ' + str(e.layer)}"
                      f" ({e.effect:+.3g})" for e in against)
    return text + (f"; working against it: {names}." if names else ".")


def trace_result(b: VerdictBatch, qv: QuestionVerdict) -> TraceResult:
    """The captured-trace stage's two runs as a :class:`~mclcbf_diag.experiments.trace.TraceResult`."""
    from ..data import build_prompt

    tok = b.lm.processor.tokenizer
    question = qv.question if qv.question.image else None  # a bare prompt has no POPE question behind it
    return TraceResult(pd.concat(qv.trace_parts, ignore_index=True), b.iv, qv.question_id,
                       build_prompt(qv.question.text, b.settings.template), qv.base_capture, qv.steer_capture,
                       question, b.lm.tokens, lambda i: tok.decode([i]))


def chain_of(b: VerdictBatch, qv: QuestionVerdict, max_links: int = 6) -> pd.DataFrame:
    """Fix the top detected (decisive first) cause, re-diagnose, repeat until fixed or no fix is left.

    A right answer has nothing to fix: the chain is one row saying so.

    Args:
        b: the question's verdict batch.
        qv: the question, its causes diagnosed.
        max_links: the most fixes applied in turn (a fix is applied only when its cause is not shown
            non-decisive and it can apply to the model's dtype).

    Returns:
        One row per link: ``link``, ``config`` (the fixes applied so far), ``top_cause``, ``status``, ``margin``,
        ``outcome``, ``next_fix``.
    """
    outcome = outcome_of(qv.base, qv.unfixed, qv.label, dropped=_dropped(qv.steer_capture))
    if qv.kind == "right":
        return pd.DataFrame([{"link": 0, "config": "(as configured)", "top_cause": "(answer right: nothing to fix)",
                              "status": "", "margin": qv.unfixed.margin, "outcome": outcome, "next_fix": "(none)"}])
    iv, fixes_of = b.iv, b.iv.fixes()
    rows, used, causes, margin = [], [], qv.causes, qv.unfixed.margin
    for link in range(max_links):
        detected = [c for c in causes if c.detected]
        fix = next((iv.cause_fix(c.id) for c in detected if iv.cause_fix(c.id) in fixes_of
                    and iv.cause_fix(c.id) not in used and c.decisive is not False
                    and not iv.fix_applies(iv.cause_fix(c.id), b.lm.dtype)), None)
        rows.append({"link": link, "config": ", ".join(f"{k}={v}" for f in sorted(used) for k, v in
                                                     fixes_of[f].items()) or "(as configured)",
                     "top_cause": detected[0].id if detected else "(none)",
                     "status": detected[0].status if detected else "", "margin": margin, "outcome": outcome,
                     "next_fix": fix or "(none left)"})
        if outcome in GOALS[qv.kind][:1] or fix is None:  # fixed (or, unlabeled, changed)
            break
        used.append(fix)
        iv = iv.replace(**fixes_of[fix])
        causes, margin, outcome = _rediagnosed(b, qv, iv)
    return pd.DataFrame(rows)


def _rediagnosed(b: VerdictBatch, qv: QuestionVerdict, iv) -> tuple[list, float, str]:
    """The causes, margin and outcome of ``iv`` on the question: its captured run, then its tested diagnosis."""
    (r, cap), = steered_runs(b, [(qv, iv)])
    steered = run_records(b.lm, cap, question_id=qv.question_id, condition="steered", base=qv.base_capture)
    records = pd.concat([qv.trace_parts[0], steered, *qv.trace_parts[2:], *qv.experiment_parts], ignore_index=True)
    causes, = diagnose_jobs(b, [(qv, iv, records, effect(b.lm, cap, qv.base, qv.label))])
    return causes, r.margin, outcome_of(qv.base, r, qv.label, dropped=_dropped(cap))


def _dropped(capture) -> bool:
    return dropped_edit(c.metrics for c in capture.steps[0].layers.values())


def layer_doses_of(b: VerdictBatch, qv: QuestionVerdict) -> pd.DataFrame:
    """The dose-response with only one steered layer at a time: where the step could matter most."""
    layers = b.iv.layers(b.lm.n_layers)
    doses = dose_jobs(b, [(qv, b.iv.replace(layers=(layer,))) for layer in layers])
    return pd.DataFrame([{"layer": layer, "k_star": d.k_star,
                          **{k: d.at_k_star.get(k) for k in ("margin", "outcome", "theta_rel_max", "valid")}}
                         for layer, d in zip(layers, doses)])


# ------------------------------------------------------------------------- single-question helpers
def _traced(lm, question, image, config, settings: Settings) -> tuple[VerdictBatch, QuestionVerdict]:
    b = VerdictBatch(lm, [as_question(question)], [image], config, settings)
    baseline(b)
    captured_trace(b)
    return b, b.questions[0]


def cause_tester(lm: LoadedModel, question, image, intervention, *, template: str = LLAVA_PROMPT):
    """``tester(spec)`` for :func:`~mclcbf_diag.diagnosis.diagnose.diagnose`: each counterfactual of one question,
    run as the counterfactual-tests stage runs it.

    Args:
        lm: the loaded model.
        question: a :class:`PopeQuestion`, or a bare prompt text (an unlabeled question, :func:`as_question`).
        image: the question's image (PIL).
        intervention: the intervention as configured.
        template: the prompt template (``<image>`` and ``{question}``).

    Returns:
        ``test(spec)``: the effect (:func:`~mclcbf_diag.experiments.evidence.effect`) of the run of one
        :class:`~mclcbf_diag.diagnosis.counterfactual.Counterfactual` (``None``: the intervention as configured),
        each run once (memoised by the spec's key).
    """
    b, qv = _traced(lm, question, image, intervention, Settings(sweep=False, template=template))
    memo: dict = {None: effect(lm, qv.steer_capture, qv.base, qv.label)}

    def test(spec):
        key = None if spec is None else spec.key
        if key not in memo:
            memo[key] = counterfactual_runs(b, [(qv, b.iv)], {0: spec})[0]
        return memo[key]

    return test


def dose_response(lm: LoadedModel, question, image, config, *, k_max: float = 1024.0, bisect_steps: int = 8,
                  template: str = LLAVA_PROMPT) -> DoseResponse:
    """The dose-response stage for one question: the smallest k reaching the label's goal.

    Args:
        lm: the loaded model.
        question: a :class:`PopeQuestion`, or a bare prompt text (an unlabeled question, :func:`as_question`).
        image: the question's image (PIL).
        config: the intervention.
        k_max: the largest multiplier on the step tried (doublings from 1).
        bisect_steps: bisection steps inside the first bracket that reaches the goal.
        template: the prompt template (``<image>`` and ``{question}``).

    Returns:
        The :class:`~mclcbf_diag.experiments.evidence.DoseResponse`.
    """
    b, qv = _traced(lm, question, image, config, Settings(k_max, bisect_steps, False, template))
    return dose_jobs(b, [(qv, b.iv)])[0]


def counterfactuals(lm: LoadedModel, question, image, config, *, template: str = LLAVA_PROMPT) -> pd.DataFrame:
    """The fixes stage for one question: each fix alone, then all together, against the baseline and the
    unfixed run.

    Args:
        lm: the loaded model.
        question: a :class:`PopeQuestion`, or a bare prompt text (an unlabeled question, :func:`as_question`).
        image: the question's image (PIL).
        config: the intervention whose fixes are run.
        template: the prompt template (``<image>`` and ``{question}``).

    Returns:
        One row per fix (columns: :data:`~mclcbf_diag.experiments.evidence.FIX_COLUMNS`).
    """
    b, qv = _traced(lm, question, image, config, Settings(sweep=False, template=template))
    fixes(b)
    return qv.fixes


def cause_chain(lm: LoadedModel, question, image, config, *, sweep: bool = False, max_links: int = 6,
                template: str = LLAVA_PROMPT) -> pd.DataFrame:
    """The cause chain of one question (:func:`chain_of`).

    Args:
        lm: the loaded model.
        question: a :class:`PopeQuestion`, or a bare prompt text (an unlabeled question, :func:`as_question`).
        image: the question's image (PIL).
        config: the intervention.
        sweep: run the graded image-mass sweep, its records in the diagnoses.
        max_links: the most fixes applied in turn.
        template: the prompt template (``<image>`` and ``{question}``).

    Returns:
        One row per link: ``link``, ``config`` (the fixes applied so far), ``top_cause``, ``status``, ``margin``,
        ``outcome``, ``next_fix``.
    """
    b, qv = _traced(lm, question, image, config, Settings(sweep=sweep, template=template))
    graded_sweep(b)
    qv.causes, = diagnose_jobs(b, [(qv, b.iv, qv.joined_records(), effect(lm, qv.steer_capture, qv.base,
                                                                          qv.label))])
    return chain_of(b, qv, max_links)


def per_layer_doses(lm: LoadedModel, question, image, config, *, k_max: float = 1024.0, bisect_steps: int = 8,
                    template: str = LLAVA_PROMPT) -> pd.DataFrame:
    """:func:`layer_doses_of` for one question.

    Args:
        lm: the loaded model.
        question: a :class:`PopeQuestion`, or a bare prompt text (an unlabeled question, :func:`as_question`).
        image: the question's image (PIL).
        config: the intervention; each of its layers is steered alone.
        k_max: the largest multiplier on the step tried.
        bisect_steps: bisection steps inside the first bracket that reaches the goal.
        template: the prompt template (``<image>`` and ``{question}``).

    Returns:
        One row per steered layer: ``layer``, ``k_star`` (None: no multiplier reached the goal), and at k*
        ``margin``, ``outcome``, ``theta_rel_max`` and ``valid``.
    """
    b, qv = _traced(lm, question, image, config, Settings(k_max, bisect_steps, False, template))
    return layer_doses_of(b, qv)


__all__ = ["Explanation", "as_question", "cause_chain", "cause_tester", "chain_of", "counterfactuals",
           "dose_response", "explain_sample", "layer_doses_of", "local_words", "localised", "per_layer_doses",
           "trace_result"]

"""The verdict: one algorithm, named stages over a typed per-question state, batched over questions.

``explain --sample`` is a batch of one through these stages (:mod:`.explain` adds what is
single-question by nature after: the cause chain and the per-layer doses); ``explain --split``
runs batches of many. Each stage reads and fills :class:`QuestionVerdict` fields, for every
question of the batch at once (:data:`STAGES`, in order):

1. **baseline**: one forward of the question batch (:class:`~mclcbf_diag.engine.units.Prefix`):
   logits, KV cache and embeddings every later run continues from.
2. **captured trace**: the measuring baseline and the intervened run, with every probe
   captured; their tidy records (:func:`~mclcbf_diag.measurements.measure.run_records`).
3. **graded sweep**: every setting of the image-mass sweep (:mod:`.sweep`), answers only; the
   four knockouts are its all-layer settings with the same edit (run apart when the sweep is off).
4. **counterfactual tests**: each question's diagnosis (:func:`~mclcbf_diag.diagnosis.diagnose.diagnose`),
   every detected cause tested by its own counterfactual. The diagnoses run side by side
   (:func:`diagnose_jobs`): the counterfactuals they ask for are one batched run; one in
   another dtype runs on a copy of the model (:func:`~.evidence.run_in_dtype`).
5. **dose-response**: the doubling grid from k = 1, cut after the first multiplier that reaches
   the label's goal, then bisection, every question's step in one batched run (:func:`dose_jobs`).
6. **fixes**: each of the intervention's fixes alone and all together (:func:`~.evidence.fix_plan`).
7. **diagnosis**: the records joined and the verdict written as one flat row (:func:`question_row`).

Every run is a unit (:class:`~mclcbf_diag.engine.units.Unit`): a row of a batched continuation
of the baseline forward. A stage names its units by a key and reads its results by that key
(:meth:`VerdictBatch.run`), never by position. A unit's answer equals a separate forward of its
question alone up to the summation order of batched matmuls.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field

import pandas as pd

from ..data import LLAVA_PROMPT, PopeQuestion, build_prompt
from ..diagnosis.diagnose import diagnose
from ..engine.runner import RunCapture
from ..engine.units import Prefix, SweepKnockout, Unit, run_units
from ..errors import UserError
from ..interventions import as_intervention
from ..measurements.measure import run_records
from ..measurements.outcomes import DROPPED_EDIT_METRICS, Reading, outcome_of, read_batch
from ..measurements.records import NO_HEAD, NO_LAYER, frame
from .evidence import (
    FIX_COLUMNS,
    GOALS,
    KNOCKOUTS,
    DosePoint,
    DoseResponse,
    dose_point,
    dose_point_of,
    dose_result,
    doubling_grid,
    effect,
    fix_plan,
    fix_row,
    kind_of,
    run_in_dtype,
)
from .sweep import sweep_records, sweep_row, sweep_sentence, sweep_settings, sweep_summary

READING_METRICS = ("final_margin", "answer_yes", "p_yes", "p_no", "top_is_yes_no", "top_token_id", "logits_finite")
CODES = {"unchanged": "u", "fixed": "f", "broken": "b", "derailed": "d", "changed": "c", "non_finite": "n"}
FAILURES = (UserError, TypeError, ValueError)  # a counterfactual that cannot run is "not run", not a crash


@dataclass(frozen=True)
class Settings:
    """What a verdict runs (explain's defaults)."""

    k_max: float = 1024.0
    bisect_steps: int = 8
    sweep: bool = True
    template: str = LLAVA_PROMPT


@dataclass
class QuestionVerdict:
    """One question's state as the stages fill it; after the last stage, its verdict."""

    index: int  # the question's row in the batch (its prefix row)
    question: PopeQuestion
    image: object
    question_id: object  # what the records' question_id column holds
    plain: Reading | None = None  # the baseline forward's answer
    base: Reading | None = None  # the measuring baseline (the intervention's sites open, not steering)
    unfixed: Reading | None = None  # the intervention as configured
    base_capture: RunCapture | None = None
    steer_capture: RunCapture | None = None
    trace_parts: list = field(default_factory=list)  # the two runs' records (and the label)
    experiment_parts: list = field(default_factory=list)  # knockouts and sweep records
    sweep: pd.DataFrame | None = None
    sweep_text: str = ""
    sweep_summary: dict = field(default_factory=dict)
    causes: list = field(default_factory=list)
    dose: DoseResponse | None = None
    fixes: pd.DataFrame | None = None
    records: pd.DataFrame | None = None
    row: dict = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        return self.question.label if self.question.label in ("yes", "no") else None

    @property
    def kind(self) -> str:
        return kind_of(self.label, self.base)

    def joined_records(self) -> pd.DataFrame:
        return pd.concat([*self.trace_parts, *self.experiment_parts], ignore_index=True)


class VerdictBatch:
    """The questions of one batch, the intervention and what the stages share: the prefix, the variants
    of the intervention (one object per counterfactual, so each is one group of rows) and model copies."""

    def __init__(self, lm, questions: list, images: list, intervention, settings: Settings = Settings(), *,
                 question_ids: list | None = None):
        self.lm, self.iv, self.settings = lm, as_intervention(intervention), settings
        ids = [q.question_id for q in questions] if question_ids is None else question_ids
        self.questions = [QuestionVerdict(i, q, im, qid) for i, (q, im, qid) in
                          enumerate(zip(questions, images, ids))]
        self.sweeps = sweep_settings(lm.n_layers) if settings.sweep else []
        self.prefix: Prefix | None = None
        self.variants: dict = {}
        self.copies = model_copies(lm)  # dtype name → a copy of the model in it (made once per model, not per batch)

    def run(self, units: dict, *, capture: bool, patterns: bool = False, alone_on_failure: bool = False) -> dict:
        """``{key: (logits, capture or per-layer records)}`` of ``{key: Unit}``, one batched continuation.

        Args:
            units: key → the :class:`~mclcbf_diag.engine.units.Unit` run (a question's row and its intervention).
            capture: keep a :class:`~mclcbf_diag.engine.runner.RunCapture` per unit; else its per-layer records.
            patterns: also the records the interventions' ``pattern`` sites make (e.g. MC-LCBF's Δh realised).
            alone_on_failure: if the batch raises one of :data:`FAILURES`, run each unit alone; a unit that
                still fails maps to None (a counterfactual that cannot run). False: the failure is raised.

        Returns:
            Key → ``(logits [vocab], capture or records)``, or None for a unit that could not run.
        """
        keys = list(units)
        try:
            return dict(zip(keys, run_units(self.prefix, [units[k] for k in keys], capture=capture,
                                            patterns=patterns)))
        except FAILURES:
            if not alone_on_failure:
                raise
        out = {}
        for k in keys:
            try:
                out[k] = run_units(self.prefix, [units[k]], capture=capture, patterns=patterns)[0]
            except FAILURES:
                out[k] = None
        return out

    def variant(self, iv, spec):
        """``(intervention, dose)`` of a counterfactual (None where it cannot be built), one object per spec."""
        key = (id(iv), spec.key)
        if key not in self.variants:
            try:
                self.variants[key] = spec.variant(iv)
            except FAILURES:
                self.variants[key] = None
        return self.variants[key]

    def model_inputs(self, qv: QuestionVerdict) -> dict:
        """The question's own inputs (a run on a copy of the model starts from them)."""
        return self.lm.inputs(build_prompt(qv.question.text, self.settings.template), qv.image)


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_copies(lm) -> dict:
    """The copies of ``lm``'s model in other dtypes (the rounding test's), shared by every batch of one run: a copy
    is made once while the model lives, not once per batch of questions."""
    return _COPIES.setdefault(lm.model, {})


def read(lm, logits) -> Reading:
    return read_batch([logits], lm.tokens)[0]


# ----------------------------------------------------------------------------------------------- stages
def baseline(b: VerdictBatch) -> None:
    prompts = [build_prompt(qv.question.text, b.settings.template) for qv in b.questions]
    b.prefix = Prefix(b.lm, prompts, [qv.image for qv in b.questions])
    for qv, r in zip(b.questions, read_batch(list(b.prefix.logits.float()), b.lm.tokens)):
        qv.plain = r


def captured_trace(b: VerdictBatch) -> None:
    units = {(qv.index, steer): Unit(qv.index, b.iv, 1.0, steer) for qv in b.questions for steer in (False, True)}
    runs = b.run(units, capture=True)
    for qv in b.questions:
        (base_logits, qv.base_capture), (steer_logits, qv.steer_capture) = runs[qv.index, False], runs[qv.index, True]
        qv.base, qv.unfixed = read_batch([base_logits, steer_logits], b.lm.tokens)
        qv.trace_parts = [run_records(b.lm, qv.base_capture, question_id=qv.question_id, condition="baseline"),
                          run_records(b.lm, qv.steer_capture, question_id=qv.question_id, condition="steered",
                                      base=qv.base_capture), *label_records(qv.question_id, qv.label)]


def graded_sweep(b: VerdictBatch) -> None:
    sweepers = {}
    for tokens, window, _, _ in b.sweeps:
        sweepers.setdefault((tokens, window), SweepKnockout(tokens, window))
    # a knockout is the sweep's all-layer setting with the same edit: read from it when the sweep runs
    in_sweep = {name: sweep_index(ko, b.sweeps) for name, ko in KNOCKOUTS.items()}
    units = {(qv.index, "sweep", i): Unit(qv.index, sweepers[t, w], setting=(k, v))
             for qv in b.questions for i, (t, w, k, v) in enumerate(b.sweeps)}
    units |= {(qv.index, "knockout", name): Unit(qv.index, KNOCKOUTS[name])
              for qv in b.questions for name, i in in_sweep.items() if i is None}
    runs = b.run(units, capture=False)
    answers = dict(zip(runs, read_batch([logits for logits, _ in runs.values()], b.lm.tokens)))
    for qv in b.questions:
        for name, i in in_sweep.items():
            r = answers[qv.index, "knockout", name] if i is None else answers[qv.index, "sweep", i]
            qv.experiment_parts.append(reading_records(r, question_id=qv.question_id, condition=name))
        if b.sweeps:
            plain = qv.plain.as_dict()
            qv.sweep = pd.DataFrame([sweep_row(*s, plain, answers[qv.index, "sweep", i].as_dict(), qv.label)
                                     for i, s in enumerate(b.sweeps)])
            qv.sweep_summary = sweep_summary(qv.sweep)
            qv.sweep_text = sweep_sentence(qv.sweep, qv.label, qv.base.answer, qv.sweep_summary)
            qv.experiment_parts.append(sweep_records(qv.sweep, question_id=qv.question_id, summary=qv.sweep_summary))


def counterfactual_tests(b: VerdictBatch) -> None:
    jobs = [(qv, b.iv, qv.joined_records(), effect(b.lm, qv.steer_capture, qv.base, qv.label))
            for qv in b.questions]
    for qv, causes in zip(b.questions, diagnose_jobs(b, jobs)):
        qv.causes = causes


def dose_response(b: VerdictBatch) -> None:
    for qv, dose in zip(b.questions, dose_jobs(b, [(qv, b.iv) for qv in b.questions])):
        qv.dose = dose


def fixes(b: VerdictBatch) -> None:
    plan = fix_plan(b.iv, b.lm.dtype)
    units = {(qv.index, i): Unit(qv.index, e.run) for qv in b.questions for i, e in enumerate(plan)
             if e.run is not None}
    runs = b.run(units, capture=False)
    answers = dict(zip(runs, read_batch([logits for logits, _ in runs.values()], b.lm.tokens)))
    for qv in b.questions:
        qv.fixes = pd.DataFrame([fix_row(e, answers.get((qv.index, i)), qv.base, qv.unfixed, qv.label)
                                 for i, e in enumerate(plan)], columns=FIX_COLUMNS)


def diagnosis(b: VerdictBatch) -> None:
    for qv in b.questions:
        qv.records = qv.joined_records()
        qv.row = question_row(qv, bool(b.sweeps))


STAGES = (("baseline", baseline), ("captured trace", captured_trace), ("graded sweep", graded_sweep),
          ("counterfactual tests", counterfactual_tests), ("dose-response", dose_response), ("fixes", fixes),
          ("diagnosis", diagnosis))


def run_stages(b: VerdictBatch, stages=STAGES, timings: dict | None = None) -> list[QuestionVerdict]:
    """Every stage in order over the batch.

    Args:
        b: the batch (its questions are filled in place).
        stages: ``(name, stage)`` pairs, each ``stage(b)`` run in order (default :data:`STAGES`).
        timings: accumulates each stage's seconds by name, when given.

    Returns:
        The batch's :class:`QuestionVerdict`s.
    """
    for name, stage in stages:
        start = time.perf_counter()
        stage(b)
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    return b.questions


def explain_batch(lm, questions: list, images: list, config, settings: Settings = Settings(), *,
                  question_ids: list | None = None, timings: dict | None = None) -> list[QuestionVerdict]:
    """The verdict of every question (``PopeQuestion``s with their images): all :data:`STAGES`.

    Args:
        lm: the loaded model.
        questions: the ``PopeQuestion``s.
        images: their images (PIL), one per question.
        config: the intervention (an MC-LCBF ``BarrierConfig`` is accepted as such).
        settings: what the verdict runs (the dose-response's range, the sweep, the prompt template).
        question_ids: label the records; None: each question's own id.
        timings: filled with seconds per stage name (added to what it holds), when given.

    Returns:
        One :class:`QuestionVerdict` per question, in order, every stage filled in (causes, dose-response,
        fixes, sweep, records).
    """
    return run_stages(VerdictBatch(lm, questions, images, config, settings, question_ids=question_ids),
                      timings=timings)


# ------------------------------------------------------------------------------ the batched experiments
def diagnose_jobs(b: VerdictBatch, jobs: list) -> list[list]:
    """:func:`~mclcbf_diag.diagnosis.diagnose.diagnose` of every ``(question, intervention, records,
    effect of the intervention)`` job, the cause tests of all jobs batched.

    Each diagnosis runs in its own greenlet; its tester answers the intervention as given from the
    job's effect and a counterfactual it has already seen from a memo, else it pauses the diagnosis.
    When every diagnosis is paused or done, the requested counterfactuals run as one batch
    (:func:`counterfactual_runs`) and the paused diagnoses resume with their effects.
    """
    import greenlet

    main = greenlet.getcurrent()
    memo: list[dict] = [{} for _ in jobs]

    def body(j):
        qv, iv, records, steered = jobs[j]

        def tester(spec):
            if spec is None:
                return steered
            key = spec.key
            if key not in memo[j]:
                memo[j][key] = main.switch((j, spec))
            return memo[j][key]

        return diagnose(records, intervention=iv, tester=tester)

    lets = [greenlet.greenlet(lambda j=j: body(j), parent=main) for j in range(len(jobs))]
    results: list = [None] * len(jobs)
    waiting = {j: let.switch() for j, let in enumerate(lets)}
    while True:
        for j in [j for j in waiting if lets[j].dead]:
            results[j] = waiting.pop(j)
        if not waiting:
            return results
        effects = counterfactual_runs(b, jobs, {j: spec for j, (_, spec) in waiting.items()})
        waiting = {j: lets[j].switch(effects[j]) for j in sorted(waiting)}


def counterfactual_runs(b: VerdictBatch, jobs: list, requests: dict) -> dict:
    """``{job: effect}`` of each job's requested counterfactual, every in-dtype run batched.

    Args:
        b: the batch.
        jobs: ``(question verdict, intervention, …)`` per job, indexed by position.
        requests: job index → the :class:`~mclcbf_diag.diagnosis.counterfactual.Counterfactual` to run for it.

    Returns:
        Job index → the run's :func:`~mclcbf_diag.experiments.evidence.effect` (or ``{"untestable": reason}``
        for a run in another dtype that cannot be made), None where the run could not be built or failed.
    """
    units, out = {}, {}
    for j, spec in requests.items():
        qv, iv = jobs[j][0], jobs[j][1]
        if spec.dtype is not None:  # on a copy of the model in that dtype, from the question's own inputs
            try:
                out[j] = run_in_dtype(b.lm, b.model_inputs(qv), iv, spec, qv.base, qv.label, b.copies)
            except FAILURES:
                out[j] = None
        elif (variant := b.variant(iv, spec)) is None:
            out[j] = None
        else:
            units[j] = Unit(qv.index, *variant)
    for j, res in b.run(units, capture=True, alone_on_failure=True).items():
        qv = jobs[j][0]
        out[j] = None if res is None else effect(b.lm, res[1], qv.base, qv.label)
    return out


def dose_jobs(b: VerdictBatch, jobs: list) -> list[DoseResponse]:
    """The dose-response of every ``(question, intervention)`` job: the doubling grid from k = 1 up to
    ``k_max`` (cut after the first multiplier that reaches the label's goal), then ``bisect_steps``
    bisection steps inside that bracket, each step one batched run over the jobs.

    The intervention's own run of a question (k = 1 of the batch's intervention) is read from its
    captured trace. A point reads the answer and the intervention's per-layer records (the step's
    size, h and, from the ``pattern`` site, Δh realised)."""
    grid = doubling_grid(b.settings.k_max)
    units = {(j, k): Unit(qv.index, iv, k) for j, (qv, iv) in enumerate(jobs) for k in grid
             if not (k == 1.0 and iv is b.iv and qv.steer_capture is not None)}
    runs = b.run(units, capture=False, patterns=True)
    curves, brackets = [], {}
    for j, (qv, iv) in enumerate(jobs):
        points = [_point(b, qv, iv, runs[j, k], k) if (j, k) in runs else dose_point(b.lm, iv, qv.steer_capture, k,
                                                                                   qv.base, qv.label) for k in grid]
        hit = next((i for i, p in enumerate(points) if p.outcome in GOALS[qv.kind]), None)
        curves.append(points[:hit + 1] if hit is not None else points)
        if hit is not None:
            brackets[j] = [grid[hit - 1] if hit > 0 else 0.0, grid[hit]]
    for _ in range(b.settings.bisect_steps if brackets else 0):
        steps = {j: Unit(jobs[j][0].index, jobs[j][1], sum(brackets[j]) / 2) for j in sorted(brackets)}
        for j, res in b.run(steps, capture=False, patterns=True).items():
            qv = jobs[j][0]
            p = _point(b, qv, jobs[j][1], res, steps[j].dose)
            curves[j].append(p)
            brackets[j][1 if p.outcome in GOALS[qv.kind] else 0] = steps[j].dose
    return [dose_result(iv, curves[j], brackets[j][1] if j in brackets else None, b.settings.k_max,
                        GOALS[qv.kind], qv.kind) for j, (qv, iv) in enumerate(jobs)]


def _point(b: VerdictBatch, qv: QuestionVerdict, iv, run, k: float) -> DosePoint:
    logits, per_layer = run
    return dose_point_of(iv, list(per_layer.values()), read(b.lm, logits), k, qv.base, qv.label)


def steered_runs(b: VerdictBatch, jobs: list) -> list[tuple[Reading, RunCapture]]:
    """The captured run of every ``(question, intervention)`` job (a variant of the batch's intervention)."""
    runs = b.run({j: Unit(qv.index, iv) for j, (qv, iv) in enumerate(jobs)}, capture=True)
    return [(read(b.lm, runs[j][0]), runs[j][1]) for j in range(len(jobs))]


# ------------------------------------------------------------------------------------ records and rows
def reading_records(r: Reading, *, question_id, condition: str) -> pd.DataFrame:
    """The answer of a run as records (layer −1): what the diagnosis reads of a knockout.

    Args:
        r: the run's Yes/No reading.
        question_id: the question's id, on every record.
        condition: the run's condition (e.g. the knockout's name).

    Returns:
        Tidy records, prefill, one per :data:`READING_METRICS` entry (margin, answer Yes, p(Yes), p(No), Yes/No
        on top, top token id, finite).
    """
    values = (r.margin, r.margin > 0, r.p_yes, r.p_no, r.top_yes_no, r.top_id, r.finite)
    n = len(values)
    return frame({"question_id": [question_id] * n, "condition": [condition] * n, "phase": ["prefill"] * n,
                  "decode_step": [0] * n, "layer": [NO_LAYER] * n, "head": [NO_HEAD] * n,
                  "metric": list(READING_METRICS), "value": [float(v) for v in values]})


def label_records(question_id, label) -> list[pd.DataFrame]:
    """The label as a record (``label_yes``), which the rules read; none without a yes/no label."""
    if label not in ("yes", "no"):
        return []
    return [frame({"question_id": [question_id], "condition": ["baseline"], "phase": ["prefill"],
                   "decode_step": [0], "layer": [NO_LAYER], "head": [NO_HEAD], "metric": ["label_yes"],
                   "value": [float(label == "yes")]})]


def sweep_index(knockout, sweeps: list) -> int | None:
    """The index in ``sweeps`` of the setting that makes ``knockout``'s edit (None: none does).

    A knockout scales the image mass of its queries by its factor (0: removes it) in every
    layer, capped below 1 as the sweep caps it; the sweep's ``("target", 0)`` and ``("factor",
    f)`` settings in window None (all layers) make the same edit on the same queries."""
    k = knockout.knobs
    if k.target is not None or k.layers is not None:
        return None
    want = (k.tokens, None, "target", 0.0) if k.factor == 0 else (k.tokens, None, "factor", float(k.factor))
    return next((i for i, s in enumerate(sweeps) if tuple(s) == want), None)


def steered_dropped(records: pd.DataFrame) -> bool:
    """Whether the intervened run dropped a non-finite edit.

    (:data:`~mclcbf_diag.measurements.outcomes.DROPPED_EDIT_METRICS`.)"""
    r = records[(records.condition == "steered") & records.metric.isin(DROPPED_EDIT_METRICS)]
    return bool((r.value > 0).any())


def _num(x):
    # NaN → None; ±inf kept (a margin a decoding method's cutoff made infinite; the answers file's json reads it back)
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def question_row(qv: QuestionVerdict, swept: bool) -> dict:
    """The verdict as one flat, JSON-safe row (see :mod:`mclcbf_diag.population`)."""
    q, base, new = qv.question, qv.base, qv.unfixed
    detected = [c for c in qv.causes if c.detected]
    decisive = [c for c in detected if c.decisive]
    at = qv.dose.at_k_star
    row = {"question_id": q.question_id, "label": qv.label, "text": q.text, "image": q.image, "kind": qv.dose.kind,
           "baseline_answer": base.answer, "baseline_margin": _num(base.margin), "baseline_valid": base.valid,
           "baseline_p_yes": _num(base.p_yes), "baseline_p_no": _num(base.p_no),
           "steered_answer": new.answer, "steered_margin": _num(new.margin), "steered_valid": new.valid,
           "steered_p_yes": _num(new.p_yes), "steered_p_no": _num(new.p_no), "flipped": base.answer != new.answer,
           "outcome": outcome_of(base, new, qv.label, dropped=steered_dropped(qv.records)),
           "top_cause": decisive[0].id if decisive else "", "top_cause_title": decisive[0].title if decisive else "",
           "decisive_causes": [c.id for c in decisive], "detected_causes": [c.id for c in detected],
           "top_detected": detected[0].id if detected else "", "top_status": detected[0].status if detected else "",
           "dose_goal": " or ".join(qv.dose.goal), "dose_k_star": _num(qv.dose.k_star),
           "dose_outcome": at.get("outcome"), "dose_margin": _num(at.get("margin")),
           "dose_valid": bool(at["valid"]) if at else None,
           "dose_k_derail": _num(qv.dose.k_derail), "dose_k_max": float(qv.dose.k_max)}
    return {**row, **_sweep_fields(qv.sweep_summary),
            "sweep": "".join(CODES.get(o, "?") for o in qv.sweep.outcome) if swept else "", **_fix_fields(qv.fixes)}


def _sweep_fields(summary: dict) -> dict:
    row = {}
    for tokens in ("decision", "after_image"):
        s = summary.get(tokens)
        row[f"sweep_{tokens}_runs"] = s["runs"] if s else 0
        row[f"sweep_{tokens}_changes"] = s["changes"] if s else 0
        row[f"sweep_{tokens}_derailed"] = s["derailed"] if s else 0
        row[f"sweep_{tokens}_min_mass"] = _num(s["min_target"]) if s else None
    row["sweep_after_image_changes_it"] = bool(summary.get("after_image", {}).get("changes", 0))
    return row


def _fix_fields(fx: pd.DataFrame) -> dict:
    row = {f"fix:{r.fix}": r.outcome if r.applicable == "yes" else "n/a" for r in fx.itertuples()}
    ran = fx[fx.applicable == "yes"] if len(fx) else fx
    for what in ("fixed", "broken", "derailed"):
        row[f"fixes_{what}"] = [str(f) for f in ran.fix[ran.outcome == what]] if len(ran) else []
    return row


__all__ = ["CODES", "READING_METRICS", "STAGES", "QuestionVerdict", "Settings", "VerdictBatch", "diagnose_jobs",
           "dose_jobs", "explain_batch", "label_records", "question_row", "reading_records", "run_stages",
           "steered_runs"]

"""``explain``'s per-question verdict for a batch of questions at once.

For every question of a batch this computes what :func:`mclcbf_diag.experiments.explain.explain_sample`
computes (the cause chain and the per-layer doses left out): the baseline and intervened
runs with every probe (trace records), the four knockouts, the graded image-mass sweep, the
ranked causes each tested by its own counterfactual, the dose-response and the
counterfactual fixes. The decisions are explain's own pure pieces
(:func:`~mclcbf_diag.experiments.explain.effect`, :func:`~mclcbf_diag.experiments.explain.dose_point`,
:func:`~mclcbf_diag.experiments.explain.fix_plan`, :func:`~mclcbf_diag.experiments.sweep.sweep_row`,
:func:`mclcbf_diag.diagnosis.diagnose.diagnose`); only the runs differ: they are rows of a few batched
continuations of one baseline forward (:mod:`.units`).

* **Stages.** (1) every run that needs no earlier answer: the measuring baseline and the
  intervened run (captured: the diagnosis reads their probes), the dose-response's doubling
  grid (its answers and the intervention's records, which a dose point reads: the step's size,
  h and, from the ``pattern`` site, Δh realised), the sweep and the fixes (logits only), and the
  knockouts when the sweep is off (see below); (2) a first
  diagnosis with a tester that only collects each detected cause's counterfactual; (3) those
  counterfactuals, batched; (4) the diagnosis again, now with their effects, exactly as
  explain's tester would have returned them; (5) the dose-response's bisection, one batched
  run per step (answers and records, as the grid) for every question whose goal was reached
  on the grid.
* **Knockouts from the sweep.** Each knockout is one of the sweep's all-layer settings (remove
  = target 0, double = factor 2, the same edit of the same queries), so with the sweep on its
  answer is read from that setting's row instead of being run again.
* **Same answers as explain.** The doubling grid is run whole, then cut after the first
  multiplier that reaches the label's goal, so the curve, k* and the derailing multiplier are
  those of explain's early-stopping loop. Knockouts keep only their answer records (the
  diagnosis reads nothing else of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from ..data import LLAVA_PROMPT, build_prompt
from ..diagnosis.diagnose import diagnose
from ..engine.units import Prefix, SweepKnockout, Unit, run_units
from ..errors import UserError
from ..interventions import as_intervention
from ..measurements.measure import run_records
from ..measurements.outcomes import DROPPED_EDIT_METRICS, Reading, outcome_of, read_batch
from ..measurements.records import NO_HEAD, NO_LAYER, frame
from .explain import (
    FIX_COLUMNS,
    GOALS,
    KNOCKOUTS,
    DoseResponse,
    _variant,
    dose_point,
    dose_point_of,
    dose_result,
    doubling_grid,
    dtype_untestable,
    effect,
    fix_plan,
    fix_row,
    kind_of,
    spec_key,
)
from .sweep import (
    sweep_records,
    sweep_row,
    sweep_sentence,
    sweep_settings,
    sweep_summary,
)

READING_METRICS = ("final_margin", "answer_yes", "p_yes", "p_no", "top_is_yes_no", "top_token_id", "logits_finite")
CODES = {"unchanged": "u", "fixed": "f", "broken": "b", "derailed": "d", "changed": "c", "non_finite": "n"}


@dataclass(frozen=True)
class Settings:
    """What a verdict runs (explain's defaults)."""

    k_max: float = 1024.0
    bisect_steps: int = 8
    sweep: bool = True
    template: str = LLAVA_PROMPT


@dataclass
class Verdict:
    """One question's verdict: its row, its records and the pieces explain shows."""

    row: dict
    records: pd.DataFrame
    causes: list
    dose: DoseResponse
    fixes: pd.DataFrame
    sweep: pd.DataFrame | None
    sweep_text: str = ""
    extra: dict = field(default_factory=dict)


def _read(lm, logits) -> Reading:
    return read_batch(logits[None], lm.tokens)[0]


def read_rows(lm, logits: list) -> list[Reading]:
    """:func:`mclcbf_diag.measurements.outcomes.read_logits` of many rows at once (the same arithmetic, row-wise)."""
    import torch

    from ..measurements.outcomes import answer_ids

    if not logits:
        return []
    lg = torch.stack([x.detach().float().reshape(-1) for x in logits])
    yes, no = answer_ids(lm.tokens)
    finite = torch.isfinite(lg).all(-1)
    margin = (lg[:, lm.tokens.yes_id] - lg[:, lm.tokens.no_id]).tolist()
    p = torch.softmax(lg.double(), -1)
    p_yes, p_no = p[:, yes].sum(-1).tolist(), p[:, no].sum(-1).tolist()
    top = lg.argmax(-1).tolist()
    both = set(yes) | set(no)
    out = []
    for i, ok in enumerate(finite.tolist()):
        if not ok:
            m = margin[i]
            out.append(Reading(m if math.isfinite(m) else math.nan, math.nan, math.nan, False, False, -1))
        else:
            out.append(Reading(margin[i], p_yes[i], p_no[i], top[i] in both, True, top[i]))
    return out


def reading_records(r: Reading, *, question_id, condition: str) -> pd.DataFrame:
    """The answer of a run as records (layer −1): what the diagnosis reads of a knockout."""
    values = (r.margin, r.margin > 0, r.p_yes, r.p_no, r.top_yes_no, r.top_id, r.finite)
    n = len(values)
    return frame({"question_id": [question_id] * n, "condition": [condition] * n, "phase": ["prefill"] * n,
                  "decode_step": [0] * n, "layer": [NO_LAYER] * n, "head": [NO_HEAD] * n,
                  "metric": list(READING_METRICS),
                  "value": [float(v) for v in values]})


def _label_records(question_id, label) -> list[pd.DataFrame]:
    if label not in ("yes", "no"):
        return []
    return [frame({"question_id": [question_id], "condition": ["baseline"], "phase": ["prefill"],
                   "decode_step": [0], "layer": [NO_LAYER], "head": [NO_HEAD], "metric": ["label_yes"],
                   "value": [float(label == "yes")]})]


def _safe(prefix: Prefix, units: list[Unit], capture: bool) -> list:
    """Run units; where a batch fails as explain's tester would catch, run its units alone (None: failed)."""
    try:
        return run_units(prefix, units, capture=capture)
    except (UserError, TypeError, ValueError):
        out = []
        for u in units:
            try:
                out.append(run_units(prefix, [u], capture=capture)[0])
            except (UserError, TypeError, ValueError):
                out.append(None)
        return out


def explain_batch(lm, questions: list, images: list, config, settings: Settings = Settings(), *,
                  question_ids: list | None = None, timings: dict | None = None) -> list[Verdict]:
    """The verdict of every question (``PopeQuestion``s with their images), batched.

    ``question_ids`` label the records (default: each question's own id). ``timings`` (a dict)
    accumulates the seconds each stage took (the benchmark reads it).
    """
    import time

    clock = [time.perf_counter()]

    def lap(stage):
        if timings is not None:
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock[0]
            clock[0] = now

    iv = as_intervention(config)
    n = len(questions)
    question_ids = [q.question_id for q in questions] if question_ids is None else question_ids
    labels = [getattr(q, "label", None) for q in questions]
    prefix = Prefix(lm, [build_prompt(q.text, settings.template) for q in questions], images)
    grid = doubling_grid(settings.k_max)
    more = [k for k in grid if k != 1.0]
    plan = fix_plan(iv, lm.dtype)
    runs = [e for e in plan if e["run"] is not None]
    sweeps = sweep_settings(lm.n_layers) if settings.sweep else []
    sweepers = {}
    for tokens, window, _, _ in sweeps:
        sweepers.setdefault((tokens, window), SweepKnockout(tokens, window))
    # a knockout is the sweep's all-layer setting with the same edit (target 0 removes the image
    # mass, factor 2 doubles it): read from the sweep's row when the sweep runs, run otherwise
    ko_setting = {name: _sweep_index(ko, sweeps) for name, ko in KNOCKOUTS.items()}
    kos = [ko for name, ko in KNOCKOUTS.items() if ko_setting[name] is None]
    lap("baseline forward (prefix, vision tower)")

    # (1) everything that needs no earlier answer
    caps = run_units(prefix, [u for q in range(n) for u in (Unit(q, iv, 1.0, False), Unit(q, iv))], capture=True)
    # the dose grid's points read only the answer and the intervention's records (h, Δh realised, the step)
    grid_runs = run_units(prefix, [Unit(q, iv, k) for q in range(n) for k in more], capture=False, patterns=True)
    lap("trace (captured) and dose grid (answers, records)")
    logit_units = [Unit(q, x) for q in range(n) for x in (*kos, *(e["run"] for e in runs))]
    logit_units += [Unit(q, sweepers[(t, w)], setting=(k, v)) for q in range(n) for t, w, k, v in sweeps]
    lo_per = len(kos) + len(runs)
    answers = run_units(prefix, logit_units, capture=False)
    lap("answer-only runs: graded sweep (knockouts), fixes")
    plain = [_read(lm, prefix.logits[q].float()) for q in range(n)]

    out = []
    for q in range(n):
        c = caps[2 * q:2 * q + 2]
        base_cap, steer_cap = c[0][1], c[1][1]
        base, unfixed = _read(lm, c[0][0]), _read(lm, c[1][0])
        grid_q = dict(zip(more, grid_runs[q * len(more):(q + 1) * len(more)]))
        a = read_rows(lm, [logits for logits, _ in answers[q * lo_per:(q + 1) * lo_per]])
        ns, off = len(sweeps), n * lo_per
        sweep_r = read_rows(lm, [logits for logits, _ in answers[off + q * ns:off + (q + 1) * ns]])
        ran, fix_r = iter(a[:len(kos)]), a[len(kos):]
        ko_r = [next(ran) if i is None else sweep_r[i] for i in ko_setting.values()]
        qid, label = question_ids[q], labels[q]
        parts = [run_records(lm, base_cap, question_id=qid, condition="baseline"),
                 run_records(lm, steer_cap, question_id=qid, condition="steered", base=base_cap),
                 *_label_records(qid, label)]
        parts += [reading_records(r, question_id=qid, condition=name) for name, r in zip(KNOCKOUTS, ko_r)]
        sw, sw_text, summ = None, "", {}
        if sweeps:
            b = plain[q].as_dict()
            sw = pd.DataFrame([sweep_row(*s, b, r.as_dict(), label) for s, r in zip(sweeps, sweep_r)])
            summ = sweep_summary(sw)
            sw_text = sweep_sentence(sw, label, base.answer, summ)
            parts.append(sweep_records(sw, question_id=qid, summary=summ))
        records = pd.concat(parts, ignore_index=True)
        it = iter(fix_r)
        fixes = pd.DataFrame([fix_row(e, next(it) if e["run"] is not None else None, base, unfixed, label)
                              for e in plan], columns=FIX_COLUMNS)
        points = [dose_point(lm, steer_cap, k, base, label) if k == 1.0 else
                  dose_point_of(list(grid_q[k][1].values()), _read(lm, grid_q[k][0]), k, base, label) for k in grid]
        out.append({"q": q, "base": base, "unfixed": unfixed, "records": records, "fixes": fixes,
                    "sweep": sw, "sweep_text": sw_text, "summary": summ, "points": points, "steer_cap": steer_cap})

    lap("records and sweep tables")
    # (2) the diagnoses, each cause test a row of a batched run (see _diagnose_all)
    variants: dict = {}

    def run_tests(requests):
        units = []
        for q, spec in requests:
            key = spec_key(spec)
            if key not in variants:
                try:
                    variants[key] = _variant(iv, spec)
                except (UserError, TypeError, ValueError):
                    variants[key] = None
            if variants[key] is not None:
                units.append(Unit(q, *variants[key]))
        results = iter(_safe(prefix, units, True))
        out_ = []
        for q, spec in requests:
            if variants[spec_key(spec)] is None:  # a dtype counterfactual runs on a model copy: explain --sample
                why = dtype_untestable(lm, spec) if "dtype" in spec else ""
                out_.append({"untestable": why} if why else None)
                continue
            res = next(results)
            out_.append(None if res is None else effect(lm, res[1], out[q]["base"], labels[q]))
        return out_

    steered = [effect(lm, v["steer_cap"], v["base"], labels[v["q"]]) for v in out]
    causes = _diagnose_all([v["records"] for v in out], iv, steered, run_tests)

    lap("diagnosis with its cause tests")
    # (5) the dose-response's bisection
    state = {}
    for v in out:
        kind = kind_of(labels[v["q"]], v["base"])
        goal = GOALS[kind]
        pts = v["points"]
        hit = next((i for i, p in enumerate(pts) if p["outcome"] in goal), None)
        v["kind"], v["goal"] = kind, goal
        v["points"] = pts[:hit + 1] if hit is not None else pts
        if hit is not None:
            state[v["q"]] = [grid[hit - 1] if hit > 0 else 0.0, grid[hit]]
    for _ in range(settings.bisect_steps if state else 0):
        qs = sorted(state)
        units = [Unit(q, iv, (state[q][0] + state[q][1]) / 2) for q in qs]
        for q, u, (logits, per_layer) in zip(qs, units, run_units(prefix, units, capture=False, patterns=True)):
            p = dose_point_of(list(per_layer.values()), _read(lm, logits), u.dose, out[q]["base"], labels[q])
            out[q]["points"].append(p)
            state[q][1 if p["outcome"] in out[q]["goal"] else 0] = u.dose

    lap("dose-response bisection")
    verdicts = []
    for v in out:
        q = v["q"]
        dose = dose_result(v["points"], state[q][1] if q in state else None, settings.k_max, v["goal"], v["kind"])
        verdicts.append(Verdict(None, v["records"], causes[q], dose, v["fixes"], v["sweep"], v["sweep_text"],
                                {"base": v["base"], "unfixed": v["unfixed"], "plain": plain[q],
                                 "summary": v["summary"]}))
    for q, vd in enumerate(verdicts):
        vd.row = question_row(questions[q], vd, sweeps)
    lap("rows")
    return verdicts


def _sweep_index(knockout, sweeps: list) -> int | None:
    """The index in ``sweeps`` of the setting that makes ``knockout``'s edit (None: none does).

    A knockout scales the image mass of its queries by its factor (0: removes it) in every
    layer, capped below 1 as the sweep caps it; the sweep's ``("target", 0)`` and ``("factor",
    f)`` settings in window None (all layers) make the same edit on the same queries."""
    k = knockout.knobs
    if k.target is not None or k.layers is not None:
        return None
    want = (k.tokens, None, "target", 0.0) if k.factor == 0 else (k.tokens, None, "factor", float(k.factor))
    return next((i for i, s in enumerate(sweeps) if tuple(s) == want), None)


def _diagnose_all(records: list, iv, steered: list, run_tests) -> list:
    """:func:`~mclcbf_diag.diagnosis.diagnose.diagnose` of every question, its cause tests batched across questions.

    Each diagnosis runs in its own greenlet; its tester answers the unfixed intervention from
    ``steered`` and a counterfactual it has not seen from a memo, else it pauses the diagnosis.
    When every diagnosis is paused or done, ``run_tests([(question, spec), …])`` runs the
    requested counterfactuals as one batch and the paused diagnoses resume with their effects.
    Each diagnosis thus sees exactly what :func:`mclcbf_diag.experiments.explain.cause_tester` returns.
    """
    import greenlet

    main = greenlet.getcurrent()
    memo: list[dict] = [{} for _ in records]

    def body(q):
        def tester(spec):
            if spec is None:
                return steered[q]
            key = spec_key(spec)
            if key not in memo[q]:
                memo[q][key] = main.switch((q, spec))
            return memo[q][key]

        return diagnose(records[q], intervention=iv, tester=tester)

    lets = [greenlet.greenlet(lambda q=q: body(q), parent=main) for q in range(len(records))]
    results: list = [None] * len(records)
    waiting = {}
    for q, g in enumerate(lets):
        r = g.switch()
        if g.dead:
            results[q] = r
        else:
            waiting[q] = r[1]
    while waiting:
        qs = sorted(waiting)
        effects = run_tests([(q, waiting[q]) for q in qs])
        waiting = {}
        for q, eff in zip(qs, effects):
            r = lets[q].switch(eff)
            if lets[q].dead:
                results[q] = r
            else:
                waiting[q] = r[1]
    return results


def _dropped(records: pd.DataFrame) -> bool:
    """Whether the intervened run dropped a non-finite edit.

    (:data:`~mclcbf_diag.measurements.outcomes.DROPPED_EDIT_METRICS`.)"""
    r = records[(records.condition == "steered") & records.metric.isin(DROPPED_EDIT_METRICS)]
    return bool((r.value > 0).any())


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def question_row(question, v: Verdict, sweeps: list) -> dict:
    """The verdict as one flat, JSON-safe row (see :mod:`mclcbf_diag.population`)."""
    base, new = v.extra["base"], v.extra["unfixed"]
    label = getattr(question, "label", None)
    detected = [c for c in v.causes if c.detected]
    decisive = [c for c in detected if c.decisive]
    row = {"question_id": question.question_id, "label": label, "text": question.text, "image": question.image,
           "kind": v.dose.kind,
           "baseline_answer": base.answer, "baseline_margin": _num(base.margin), "baseline_valid": base.valid,
           "baseline_p_yes": _num(base.p_yes), "baseline_p_no": _num(base.p_no),
           "steered_answer": new.answer, "steered_margin": _num(new.margin), "steered_valid": new.valid,
           "steered_p_yes": _num(new.p_yes), "steered_p_no": _num(new.p_no),
           "flipped": base.answer != new.answer, "outcome": outcome_of(base, new, label, dropped=_dropped(v.records)),
           "top_cause": decisive[0].id if decisive else "", "top_cause_title": decisive[0].title if decisive else "",
           "decisive_causes": [c.id for c in decisive], "detected_causes": [c.id for c in detected],
           "top_detected": detected[0].id if detected else "", "top_status": detected[0].status if detected else "",
           "dose_goal": " or ".join(v.dose.goal), "dose_k_star": _num(v.dose.k_star),
           "dose_outcome": v.dose.at_k_star.get("outcome"), "dose_margin": _num(v.dose.at_k_star.get("margin")),
           "dose_valid": bool(v.dose.at_k_star["valid"]) if v.dose.at_k_star else None,
           "dose_k_derail": _num(v.dose.k_derail), "dose_k_max": float(v.dose.k_max)}
    summ = v.extra.get("summary", {})
    for tokens in ("decision", "after_image"):
        s = summ.get(tokens)
        row[f"sweep_{tokens}_runs"] = s["runs"] if s else 0
        row[f"sweep_{tokens}_changes"] = s["changes"] if s else 0
        row[f"sweep_{tokens}_derailed"] = s["derailed"] if s else 0
        row[f"sweep_{tokens}_min_mass"] = _num(s["min_target"]) if s else None
    row["sweep_after_image_changes_it"] = bool(summ.get("after_image", {}).get("changes", 0))
    row["sweep"] = "".join(CODES.get(o, "?") for o in v.sweep.outcome) if v.sweep is not None else ""
    fx = v.fixes
    for r in fx.itertuples():
        row[f"fix:{r.fix}"] = r.outcome if r.applicable == "yes" else "n/a"
    ran = fx[fx.applicable == "yes"] if len(fx) else fx
    for what in ("fixed", "broken", "derailed"):
        row[f"fixes_{what}"] = [str(f) for f in ran.fix[ran.outcome == what]] if len(ran) else []
    return row


__all__ = ["CODES", "READING_METRICS", "Settings", "Verdict", "explain_batch", "question_row", "reading_records"]

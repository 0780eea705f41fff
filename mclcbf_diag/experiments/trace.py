"""One POPE sample, run twice (baseline and steered), measured layer by layer.

:func:`trace_sample` is the toolkit's core call. It runs the unmodified model once without
and once with an intervention (MC-LCBF by default), through nnsight (:mod:`mclcbf_diag.engine.runner`),
and returns every probe family as tidy records (:mod:`mclcbf_diag.measurements.records`), with the
steered run's propagation measured against the baseline. :meth:`TraceResult.summary`
condenses the records into the few numbers a user reads first, led by the *outcome*
(:mod:`mclcbf_diag.measurements.outcomes`: unchanged, fixed, broken or derailed, from the label; without
one, changed or unchanged; non_finite when the intervention dropped an overflowing step), the Yes/No probability
masses and the top token before and after.
A question's label, when known, is a record too (``label_yes``), so a diagnosis can ask the
question the label sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..data import LLAVA_PROMPT, PopeQuestion, build_prompt
from ..engine.decode import extended, label_step
from ..engine.runner import Keep, RunCapture, StepCapture, forward, greedy, with_embeds
from ..errors import UserError
from ..interventions import Intervention, as_intervention
from ..interventions.base import rows_of
from ..measurements.measure import run_records
from ..measurements.outcomes import DROPPED_EDIT_METRICS, Reading, outcome_of, read_batch
from ..measurements.records import NO_HEAD, NO_LAYER, frame
from ..models import LoadedModel


@dataclass
class TraceResult:
    records: pd.DataFrame
    intervention: Intervention
    question_id: object  # the records' question_id column (the POPE question id, or 0 for a bare prompt)
    prompt: str
    baseline: RunCapture
    steered: RunCapture
    question: PopeQuestion | None = None
    _tokens: object = None  # lm.tokens (Yes/No ids)
    _decode: object = None  # token id → text

    @property
    def config(self):
        """The intervention's knobs (for MC-LCBF its ``BarrierConfig``)."""
        return self.intervention.knobs

    def value(self, metric: str, condition: str = "steered", layer: int = -1, phase: str = "prefill",
              decode_step: int = 0, head: int = -1) -> float:
        """One record's value.

        Args:
            metric: the metric's name.
            condition: ``"baseline"`` or ``"steered"`` (or another condition in the records).
            layer: the layer; −1: a whole-model record.
            phase: ``"prefill"`` or ``"decode"``.
            decode_step: the decode step (0 for the prefill).
            head: the head; −1: a whole-layer record.

        Returns:
            The first matching record's value; NaN when none matches.
        """
        r = self.records
        sel = r[(r.metric == metric) & (r.condition == condition) & (r.layer == layer) & (r.phase == phase)
                & (r.decode_step == decode_step) & (r["head"] == head)]
        return float(sel.value.iloc[0]) if len(sel) else math.nan

    def summary(self) -> dict:
        """Answers, margins and Yes/No masses before and after, at prefill, and the intervention's own figures
        (:meth:`~mclcbf_diag.interventions.base.Intervention.trace_summary`: for MC-LCBF the barrier and the step;
        :meth:`~mclcbf_diag.interventions.base.Intervention.decode_summary`: its checks at the generated tokens)."""
        r = self.records[(self.records.phase == "prefill") & (self.records["head"] == -1)]
        wide = {c: r[r.condition == c].pivot_table(index="layer", columns="metric", values="value")
                for c in ("baseline", "steered")}
        per_layer = wide["steered"]
        base, new = self.reading("baseline"), self.reading("steered")
        marks = per_layer.reindex(columns=list(DROPPED_EDIT_METRICS)).fillna(0)
        dropped = [int(i) for i in marks.index[(marks > 0).any(axis=1)] if i >= 0]
        label = self.question.label if self.question is not None else None
        nonfinite = self.value("nonfinite_values")
        out = {
            "question_id": self.question_id,
            "answer_before": base.answer,
            "answer_after": new.answer,
            "outcome": outcome_of(base, new, label, dropped=bool(dropped)),
            "margin_before": base.margin,
            "margin_after": new.margin,
            "p_yes_before": base.p_yes, "p_no_before": base.p_no,
            "p_yes_after": new.p_yes, "p_no_after": new.p_no,
            "top_before": self.top_token("baseline"), "top_after": self.top_token("steered"),
            "valid_before": base.valid, "valid_after": new.valid,
            "nonfinite_values": int(nonfinite) if nonfinite == nonfinite else 0,
            "layers_dropped": dropped,
            **self.intervention.trace_summary(per_layer, wide["baseline"]),
            **self.intervention.decode_summary(self._decode_baselines()),
            **_propagation(per_layer),
        }
        if self.question is not None:
            out["index"] = self.question.index
            out["label"] = self.question.label
            out["question"] = self.question.text
        out["answer_changed"] = out["answer_before"] != out["answer_after"]
        return out

    def _decode_baselines(self) -> dict[int, pd.DataFrame]:
        """The measuring baseline run's records at each generated token, ``{decode_step: layer × metric}``."""
        r = self.records
        r = r[(r.phase == "decode") & (r.condition == "baseline") & (r["head"] == -1)]
        return {int(k): g.pivot_table(index="layer", columns="metric", values="value")
                for k, g in r.groupby("decode_step")}

    def reading(self, condition: str = "steered") -> Reading:
        """The Yes/No reading of the run's prefill step (see :mod:`mclcbf_diag.measurements.outcomes`)."""
        cap = self.baseline if condition == "baseline" else self.steered
        return read_batch(cap.steps[0].final_logits[None], self._tokens)[0]

    def top_token(self, condition: str = "steered") -> str:
        """The top token at the decision position (decoded), e.g. "Yes" or "."."""
        cap = self.baseline if condition == "baseline" else self.steered
        logits = cap.steps[0].final_logits
        if bool((torch.isnan(logits) | (logits == torch.inf)).any()):  # −inf: a token ruled out, not an overflow
            return "(non-finite)"
        tid = int(logits.argmax())
        return self._decode(tid) if self._decode is not None else str(tid)


def _propagation(per_layer: pd.DataFrame) -> dict:
    """The change after the final norm and its noise floor (:mod:`mclcbf_diag.measurements.noise` prints
    "below noise" under it)."""
    out = {}
    for metric in ("propagation", "propagation_floor"):
        col = per_layer.get(metric)
        out[f"{metric}_final" if metric == "propagation" else metric] = (
            float(col.get(NO_LAYER, math.nan)) if col is not None else math.nan)
    return out


def sample_inputs(lm: LoadedModel, question_text: str, image, template: str = LLAVA_PROMPT):
    """The prompt of one question and its model inputs.

    Args:
        lm: the loaded model (its processor builds the inputs).
        question_text: the question.
        image: the question's image (PIL).
        template: the prompt template (``<image>`` and ``{question}``).

    Returns:
        ``(prompt, inputs)``: the prompt text and the model inputs of it with the image.

    Raises:
        UserError: the template lacks ``<image>`` or ``{question}``.
    """
    prompt = build_prompt(question_text, template)
    return prompt, lm.inputs(prompt, image)


def trace_sample(lm: LoadedModel, question: PopeQuestion | str, image, intervention, *,
                 max_new_tokens: int = 0, question_id=None, multiplier: float = 1.0,
                 template: str = LLAVA_PROMPT) -> TraceResult:
    """Baseline and steered runs of one sample → :class:`TraceResult` with tidy records.

    With ``max_new_tokens`` under a decoding-level method (one that reads the ``logits`` site) both runs are
    :mod:`mclcbf_diag.engine.decode`'s loop (:func:`_generated_runs`): every token from the method's scores.

    Args:
        lm: the loaded model.
        question: a POPE question, or a bare prompt text (unlabeled).
        image: the question's image (PIL).
        intervention: any :class:`~mclcbf_diag.interventions.Intervention` (an MC-LCBF ``BarrierConfig`` is
            accepted as such).
        max_new_tokens: tokens generated after the prompt (greedy); 0: the prefill only.
        question_id: labels the records; None: the question's own id, 0 for a bare prompt.
        multiplier: scales what the intervention changes (the dose).
        template: the prompt around the question (with ``<image>`` and ``{question}``).

    Returns:
        The :class:`TraceResult`: tidy records of both runs (conditions ``baseline`` and ``steered``, the
        method's views, ``label_yes`` for a labeled question), the runs' captures and the question.

    Raises:
        UserError: the template lacks ``<image>`` or ``{question}``; OPERA with ``max_new_tokens`` (it generates by
            its beam search, which is not a loop of one sequence trace can record).
    """
    iv = as_intervention(intervention)
    if max_new_tokens > 0 and iv.name == "opera":
        raise UserError(f"--intervention opera --max-new-tokens {max_new_tokens}: OPERA generates by its beam "
                        "search, which trace does not record; drop --max-new-tokens (its first-token penalty), or "
                        "generate with: mclcbf-diag pope --intervention opera --decoding beam --num-beams 5 "
                        "--generate N")
    text = question.text if isinstance(question, PopeQuestion) else question
    if question_id is None:
        question_id = question.question_id if isinstance(question, PopeQuestion) else 0
    prompt, extra = build_prompt(text, template), []
    if max_new_tokens > 0 and "logits" in iv.open_sites(True):
        baseline, steered, extra = _generated_runs(lm, prompt, image, iv, max_new_tokens, question_id, multiplier)
    else:
        inputs = lm.inputs(prompt, image)
        baseline = forward(lm, inputs, iv, steer=False, generate=greedy(max_new_tokens),
                           keep=Keep(embeds=True)).captures[0]
        steered = forward(lm, with_embeds(inputs, baseline), iv, generate=greedy(max_new_tokens),
                          dose=multiplier).captures[0]
        extra = _view_records(lm, inputs, iv, question_id)  # the prompt's views: here max_new_tokens > 0 opens none
    base_records = run_records(lm, baseline, question_id=question_id, condition="baseline")
    steer_records = run_records(lm, steered, question_id=question_id, condition="steered", base=baseline)
    parts = [base_records, steer_records, *extra]
    label = question.label if isinstance(question, PopeQuestion) else None
    if label in ("yes", "no"):
        parts.append(frame({"question_id": [question_id], "condition": ["baseline"], "phase": ["prefill"],
                            "decode_step": [0], "layer": [NO_LAYER], "head": [NO_HEAD], "metric": ["label_yes"],
                            "value": [float(label == "yes")]}))
    records = pd.concat(parts, ignore_index=True)
    tok = lm.processor.tokenizer
    return TraceResult(records, iv, question_id, prompt, baseline, steered,
                       question if isinstance(question, PopeQuestion) else None, lm.tokens,
                       lambda i: tok.decode([i]))


def _generated_runs(lm: LoadedModel, prompt: str, image, iv, max_new_tokens: int, question_id,
                    dose: float) -> tuple[RunCapture, RunCapture, list]:
    """Baseline and intervened generation under a decoding-level method, as ``pope --generate`` runs it.

    Both are :func:`~mclcbf_diag.engine.decode.generate`'s loop over the prompt as ``pope`` batches it (a batch of
    one), every step captured: the intervened run chooses each token from the method's combined scores, the
    baseline from the model's own. Besides the two runs: per decode step the method's own terms at the step's
    position (its ``logits`` site's records, layer −1; step 0's are the run's whole-model records), and every step's
    auxiliary forwards (conditions ``view:NAME``: the method's views of the sequence that step read). Where the loop
    continued a view by its own cache, its records are that forward's captures, the one whose logits the step
    combined (the view runs once per step); a view the loop re-ran whole is run here again.

    Returns:
        ``(baseline, intervened, [records frames])``.
    """
    from ..engine.batch import batch_inputs
    from ..engine.decode import generate

    inputs = batch_inputs(lm, [prompt], [image], share_images=False)
    baseline = generate(lm, inputs, iv, max_new_tokens=max_new_tokens, steer=False, keep=Keep()).captures()[0]
    iv.sources([prompt], [image])
    gen = generate(lm, inputs, iv, max_new_tokens=max_new_tokens, keep=Keep(), dose=dose)
    steered = gen.captures()[0]
    extra = []
    for step in steered.steps[1:]:
        terms = gen.steps[step.decode_step]["records"][0].get(NO_LAYER, {})
        if terms:
            extra.append(frame({"question_id": [question_id] * len(terms), "condition": ["steered"] * len(terms),
                                "phase": ["decode"] * len(terms), "decode_step": [step.decode_step] * len(terms),
                                "layer": [NO_LAYER] * len(terms), "head": [NO_HEAD] * len(terms),
                                "metric": list(terms), "value": [math.nan if v is None else v
                                                                  for v in terms.values()]}))
    full = inputs
    for step in steered.steps:
        if step.decode_step:
            full = extended(lm, full, steered.generated[:, steered.prompt_len + step.decode_step - 1])
        views = gen.steps[step.decode_step].get("views")
        if views is None:  # views the loop re-ran over the whole sequence (not continued): run them again here
            extra += _view_records(lm, full, iv, question_id, step)
        else:  # the loop's own forwards of its views at this step, which its combined scores read
            extra += [_view_frame(lm, caps[0], name, question_id, step) for name, caps in views.items()]
    return baseline, steered, extra


def _view_records(lm: LoadedModel, inputs: dict, iv, question_id, step: StepCapture | None = None) -> list:
    """Records of the auxiliary forwards the intervention contrasts with (condition ``view:NAME``), measured as the
    baseline is: the same probes on the question as the method's other view shows it (VCD: the noised image).
    ``step``: the generation step whose sequence ``inputs`` holds (the records take its phase and decode step)."""
    if iv is None or "logits" not in iv.open_sites(True):
        return []
    rows = rows_of(inputs["input_ids"], inputs["attention_mask"], lm.tokens.image_token_id)
    return [_view_frame(lm, forward(lm, view).captures[0], name, question_id, step)
            for name, view in iv.views(lm, inputs, rows).items()]


def _view_frame(lm: LoadedModel, cap: RunCapture, name: str, question_id, step: StepCapture | None):
    """The records of view ``name``'s capture ``cap`` of the sequence generation step ``step`` read (None: the
    prompt's first-token forward), labelled with the step's phase and decode step."""
    if step is not None:
        label_step(cap.steps[0], step.decode_step)
        cap.prompt_len = cap.prompt_len - step.decode_step  # the prompt's length (the sink, the image mask)
        cap.detected = cap.detected[:cap.prompt_len]
    return run_records(lm, cap, question_id=question_id, condition=f"view:{name}")


@torch.no_grad()
def decoded(lm: LoadedModel, capture: RunCapture) -> str | None:
    """Generated text of a run (None for prefill-only runs)."""
    if capture.generated is None:
        return None
    return lm.processor.tokenizer.decode(capture.generated[0, capture.prompt_len:], skip_special_tokens=True)

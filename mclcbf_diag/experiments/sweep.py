"""Graded experiments behind negative claims: an image-mass sweep at the decision token and after the image.

"Steering the decision token's image attention cannot fix this" is a negative claim; two
edits (remove, double) cannot support it. :func:`image_mass_sweep` sets the image attention
mass of the chosen queries, renormalised (the knockout edit of
:mod:`mclcbf_diag.interventions.knockout`, which equals a shift of the image-key logits), to

* every target mass in :data:`TARGETS` (0, 0.1, …, 0.9), and
* the mass × each of :data:`FACTORS` (0.5, 2),

at the decision token in all layers and in each layer window of :func:`layer_windows`, and,
separately, at every text token after the image in all layers at once (:func:`sweep_windows`).
Each setting's answer is read with its
Yes/No mass (:mod:`mclcbf_diag.measurements.outcomes`) and classed against the baseline: a setting
*changes* the answer only with a valid Yes/No output (fixed or broken with a label, changed
without); derailed settings are counted apart. :func:`sweep_summary` gives, per token set,
the number of settings, how many change the answer, the smallest target mass that does and
how many derail; :func:`sweep_records` turns that into the tidy records the rule
``decision_token_off_path`` reads.

The text after the image gets one window, all layers at once: what that token set answers is
whether the decision token is the wrong place to act (a change at every text token after the image
fixes what no decision-token setting does). Why not one window per layer range, and what that
cost: the docs' performance page.

Speed: all settings of one (token set, window) are one batch of copies of the same prompt
(one edit per row, :class:`GradedKnockout`), answered by :func:`mclcbf_diag.engine.batch.answer_pair`,
which reuses the baseline's KV cache up to the first edited token.
"""

from __future__ import annotations

import math

import pandas as pd

from ..interventions.attention_edits import rescale_image_probs
from ..interventions.knockout import AttentionKnockout, KnockoutKnobs
from ..measurements.outcomes import outcome
from ..measurements.records import COLUMNS, NO_HEAD, NO_LAYER, frame

TARGETS = tuple(round(0.1 * i, 1) for i in range(10))  # 0, 0.1, …, 0.9
FACTORS = (0.5, 2.0)
TOKEN_SETS = ("decision", "after_image")


def layer_windows(n_layers: int) -> list[tuple[int, ...] | None]:
    """None (all layers), then contiguous windows: every single layer and every pair (small
    models), or quarters and halves of the depth (deep models)."""
    out: list[tuple[int, ...] | None] = [None]
    if n_layers <= 8:
        sizes = [1, 2] if n_layers > 2 else [1]
    else:
        sizes = [max(1, n_layers // 4), max(1, n_layers // 2)]
    for size in sizes:
        step = 1 if n_layers <= 8 else max(1, size // 2)
        for start in range(0, n_layers - size + 1, step):
            w = tuple(range(start, start + size))
            if len(w) < n_layers and w not in out:
                out.append(w)
    return out


def edits() -> list[tuple[str, float]]:
    """The settings of one window: ("target", t) for every target, ("factor", f) for every factor."""
    return [("target", t) for t in TARGETS] + [("factor", f) for f in FACTORS]


class GradedKnockout(AttentionKnockout):
    """A knockout whose batch rows each get their own edit: ``edits[row.index]`` = ("target"|"factor", value)."""

    name = "graded_knockout"

    def __init__(self, settings: list[tuple[str, float]], tokens: str = "decision", layers=None):
        super().__init__(KnockoutKnobs(0.0, tokens=tokens, layers=layers))
        self.settings = list(settings)

    def attention(self, site) -> None:
        probs = site.tensor
        for row in site.rows:
            kind, value = self.settings[row.index]
            q = [site.current(row)] if self.knobs.tokens == "decision" or site.phase == "decode" else row.after_image()
            p = probs[row.index][:, site.query_index(row, q)]
            mask = site.key_mask(row, row.image)
            if kind == "target":
                target = min(value, 1 - 1e-4)
            else:
                target = (p.float()[..., mask].sum(-1) * value).clamp(max=1 - 1e-4)
            site.set_rows(row, q, rescale_image_probs(p, mask, target))


def window_name(window) -> str:
    return "all" if window is None else ",".join(map(str, window))


def sweep_windows(tokens: str, n_layers: int) -> list[tuple[int, ...] | None]:
    """The layer windows swept for a token set: every window of :func:`layer_windows` at the
    decision token; all layers at once (``[None]``) at the text after the image (see the module)."""
    return layer_windows(n_layers) if tokens == "decision" else [None]


def sweep_settings(n_layers: int, token_sets=TOKEN_SETS, windows=None) -> list[tuple[str, object, str, float]]:
    """Every ``(tokens, window, edit, value)`` of the sweep, in the order of :func:`image_mass_sweep`'s rows.

    Args:
        n_layers: the model's layers.
        token_sets: the token sets swept (:data:`TOKEN_SETS`).
        windows: the same layer windows for every token set; None: :func:`sweep_windows` per token set.

    Returns:
        The settings: token set, window (None: all layers), ``"target"`` or ``"factor"``, and its value.
    """
    return [(tokens, window, kind, value) for tokens in token_sets
            for window in (sweep_windows(tokens, n_layers) if windows is None else windows)
            for kind, value in edits()]


def sweep_edit(tokens: str, window, kind: str, value: float) -> AttentionKnockout:
    """One setting as a knockout of its own (the edit :class:`GradedKnockout` makes in that setting's row).

    Args:
        tokens: the queries edited: ``"decision"`` (the decision token) or ``"after_image"`` (every text token
            after the image).
        window: the layers edited (a tuple of layer indices); None: all layers.
        kind: ``"target"`` (set the image mass to ``value``) or ``"factor"`` (multiply it by ``value``).
        value: the target mass (0..1) or the factor.

    Returns:
        The :class:`~mclcbf_diag.interventions.knockout.AttentionKnockout` making that edit.
    """
    if kind == "target":
        return AttentionKnockout(KnockoutKnobs(0.0, target=value, tokens=tokens, layers=window))
    return AttentionKnockout(KnockoutKnobs(value, tokens=tokens, layers=window))


def sweep_row(tokens: str, window, kind: str, value: float, b: dict, r: dict, label: str | None) -> dict:
    """One row of the sweep frame: the setting, its answer ``r`` and the baseline ``b``.

    Args:
        tokens: the queries edited: ``"decision"`` (the decision token) or ``"after_image"`` (every text token
            after the image).
        window: the layers edited (a tuple of layer indices); None: all layers.
        kind: ``"target"`` (set the image mass to ``value``) or ``"factor"`` (multiply it by ``value``).
        value: the target mass (0..1) or the factor.
        b: the baseline's answer dict (``margin``, ``answer``, ``valid``).
        r: the setting's answer dict (``margin``, ``answer``, ``valid``, ``p_yes``, ``p_no``, ``finite``).
        label: the question's label (``"yes"``/``"no"``); None: unlabeled.

    Returns:
        The row: ``tokens``, ``window`` (:func:`window_name`), ``edit``, ``value``, ``margin``, ``answer``,
        ``valid``, ``p_yes``, ``p_no``, ``base_margin``, ``base_answer``, ``outcome`` (against the baseline).
    """
    return {"tokens": tokens, "window": window_name(window), "edit": kind, "value": value, "margin": r["margin"],
            "answer": r["answer"], "valid": r["valid"], "p_yes": r["p_yes"], "p_no": r["p_no"],
            "base_margin": b["margin"], "base_answer": b["answer"],
            "outcome": outcome(b["answer"], b["valid"], r["answer"], r["valid"], label, new_finite=r["finite"])}


def image_mass_sweep(lm, prompt: str, image, label: str | None = None, *, token_sets=TOKEN_SETS,
                     windows=None) -> pd.DataFrame:
    """Every setting's answer (see the module docstring).

    Args:
        lm: the loaded model.
        prompt: the full prompt text (with ``<image>``).
        image: the question's image (PIL).
        label: the question's label (``"yes"``/``"no"``); None: unlabeled (outcomes are "changed" or not).
        token_sets: the token sets swept (:data:`TOKEN_SETS`).
        windows: the same layer windows for every token set (tuples of layer indices, None for all layers);
            None: :func:`sweep_windows` per token set.

    Returns:
        One row per setting (:func:`sweep_row`): columns tokens, window, edit, value, margin, answer, valid,
        p_yes, p_no, base_margin, base_answer, outcome.
    """
    from ..engine.batch import answer_pair, baseline_prefix, batch_inputs

    settings = edits()
    inputs = batch_inputs(lm, [prompt] * len(settings), [image] * len(settings))
    baseline = baseline_prefix(lm, inputs)  # one baseline forward; every setting continues from it
    rows = []
    for tokens in token_sets:
        for window in sweep_windows(tokens, lm.n_layers) if windows is None else windows:
            base, new = answer_pair(lm, [prompt] * len(settings), [image] * len(settings),
                                    GradedKnockout(settings, tokens, window), inputs=inputs, baseline=baseline)
            rows += [sweep_row(tokens, window, kind, value, base[0], r, label)
                     for (kind, value), r in zip(settings, new)]
    return pd.DataFrame(rows)


def _changes(df: pd.DataFrame) -> pd.Series:
    return df.outcome.isin(["fixed", "broken", "changed"]) & df.valid


def sweep_summary(sweep: pd.DataFrame) -> dict[str, dict]:
    """Per token set: runs, changes (valid), fixes, smallest target mass that changes the answer, derailed."""
    out = {}
    for tokens, d in sweep.groupby("tokens", sort=False):
        ch = d[_changes(d)]
        targets = ch[ch.edit == "target"]
        best = targets.sort_values("value").iloc[0] if len(targets) else (ch.iloc[0] if len(ch) else None)
        out[tokens] = {
            "runs": len(d), "changes": len(ch), "fixes": int((ch.outcome == "fixed").sum()),
            "derailed": int((d.outcome == "derailed").sum()),
            "min_target": float(targets.value.min()) if len(targets) else math.nan,
            "example": None if best is None else
            f"{best.edit} {best.value:g} in layers {best.window} → {best.answer} (margin {best.margin:+.3g})",
            "example_margin": math.nan if best is None else float(best.margin),
        }
    return out


def sweep_records(sweep: pd.DataFrame, *, question_id, phase: str = "prefill", decode_step: int = 0,
                  summary: dict | None = None) -> pd.DataFrame:
    """The sweep summary as tidy records (condition ``sweep:<tokens>``, layer −1).

    Args:
        sweep: the frame of :func:`image_mass_sweep`.
        question_id: the question's id, on every record.
        phase: the records' phase.
        decode_step: the records' decode step.
        summary: its :func:`sweep_summary`, if already computed; None: computed here.

    Returns:
        Tidy records, per token set the metrics ``sweep_runs``, ``sweep_changes``, ``sweep_fixes``,
        ``sweep_derailed``, ``sweep_min_target`` and ``sweep_example_margin``.
    """
    cols = {k: [] for k in COLUMNS}
    for tokens, summ in (sweep_summary(sweep) if summary is None else summary).items():
        for metric, key in (("sweep_runs", "runs"), ("sweep_changes", "changes"), ("sweep_fixes", "fixes"),
                            ("sweep_derailed", "derailed"), ("sweep_min_target", "min_target"),
                            ("sweep_example_margin", "example_margin")):
            for k, v in (("question_id", question_id), ("condition", f"sweep:{tokens}"), ("phase", phase),
                         ("decode_step", decode_step), ("layer", NO_LAYER), ("head", NO_HEAD), ("metric", metric),
                         ("value", float(summ[key]))):
                cols[k].append(v)
    return frame(cols)


def sweep_sentence(sweep: pd.DataFrame, label: str | None, base_answer: str, summary: dict | None = None) -> str:
    """One line per token set: the smallest image mass that fixes (or changes) the answer, or that none does.

    Args:
        sweep: the frame of :func:`image_mass_sweep`.
        label: the question's label (``"yes"``/``"no"``); None: unlabeled (the verb is "change").
        base_answer: the baseline's answer; equal to ``label`` the verb is "break", else "fix".
        summary: its :func:`sweep_summary`, if already computed; None: computed here.

    Returns:
        One sentence, ``"Graded sweep: …"``, a clause per token set.
    """
    verb = "fix" if label is not None and base_answer != label else "break" if label is not None else "change"
    parts = []
    for tokens, s in (sweep_summary(sweep) if summary is None else summary).items():
        where = "the decision token" if tokens == "decision" else "every text token after the image"
        if s["changes"]:
            m = f"smallest target mass {s['min_target']:g}; " if math.isfinite(s["min_target"]) else ""
            parts.append(f"at {where}, {s['changes']} of {s['runs']} image-mass settings {verb} the answer "
                         f"with a valid Yes/No output ({m}e.g. {s['example']})")
        else:
            parts.append(f"at {where}, none of {s['runs']} image-mass settings {verb}s the answer"
                         f" ({s['derailed']} derail it)")
    return "Graded sweep: " + "; ".join(parts) + "."


__all__ = ["TARGETS", "FACTORS", "layer_windows", "sweep_windows", "edits", "GradedKnockout", "window_name",
           "sweep_settings",
           "sweep_edit", "sweep_row", "image_mass_sweep", "sweep_summary", "sweep_records", "sweep_sentence"]

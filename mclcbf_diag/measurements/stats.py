"""When is a difference real (DESIGN §10): paired tests and the bias control, from stored answers.

Everything here is a pure function of per-question arrays (numpy only, no model, no torch):
the label, and for each condition the answer (``"yes"``/``"no"``), whether it is a Yes/No
answer (``valid``) and the Yes − No logit margin. Nothing is re-run: the statistics of a
``pope`` run come from ``answers.jsonl``.

**Scoring.** An answer that is not a Yes/No answer (derailed: the top token is no Yes/No
spelling, or the logits are non-finite) is *neither* yes nor no: it is wrong, it is not a
"yes" in the yes-ratio, and in F1 it is a negative prediction (a false negative where the
label is yes). So accuracy here is ``accuracy_valid`` of ``metrics.csv``; yes-ratio and F1
equal ``metrics.csv``'s whenever every answer is valid.

**McNemar.** The exact two-sided test on the discordant pairs: b questions wrong at baseline
and right under the intervention (fixed), c right and then wrong (broken, or derailed: a
derailed answer counts as wrong); under H0 b ~ Binomial(b + c, 1/2), and
``p = min(1, 2 · P(X ≤ min(b, c)))`` (1 when b + c = 0), computed with exact integers.

**Paired bootstrap.** ``resamples`` (10,000 by default) resamples of the questions with
replacement, each drawn as ``rng.integers(0, n, size=n)`` in turn from
``numpy.random.default_rng(seed)`` (seed 0 by default), the same resample for every
condition (paired); each statistic's 95% interval is the 2.5th and 97.5th percentile of its
resampled values (numpy's linear interpolation). A pooled "all" row resamples the pooled
questions. Vectorised: each block of resamples becomes a matrix of multiplicities.

**Holm.** Step-down adjustment of m p-values: sort ascending, adjusted p_(i) =
max over j ≤ i of min(1, (m − j + 1) · p_(j)), returned in the input order.

**The bias control.** The intervention may only move the answers toward Yes or toward No.
Its control adds one constant b to every baseline margin and answers yes iff
``margin + b > 0`` (a margin of exactly −b is "no", as a margin of exactly 0 is at
baseline). b is chosen so that the control gives as many valid yes answers as the
intervention (the same yes-ratio): with the baseline's valid, finite margins sorted in
decreasing order m(1) ≥ m(2) ≥ … ≥ m(v), and K the target count,
``b = −(m(K) + m(K+1)) / 2`` (the midpoint of the gap), where m(0) = m(1) + 1 and
m(v+1) = m(v) − 1 (one logit beyond the ends). When tied margins make K unreachable, the
reachable count nearest to K is used (on equal distance, the smaller one), so the control's
yes-ratio is stated beside it. A baseline answer that is not a Yes/No answer (or has a
non-finite margin) stays invalid in the control: wrong, never yes. The offset is fitted once
on the whole sample and held fixed in the bootstrap.

Reported: the control's accuracy and F1; the intervention's gain in accuracy over the
control with its paired interval; the share of the intervention's fixes that the control
also makes (right where the intervention fixed a wrong baseline answer). **One rule labels
it** (:func:`bias_label`): "no change" when the intervention changes no answer's
correctness and no yes/no answer; otherwise "explained by a yes/no shift" when the lower
end of the 95% interval of its gain over the control is ≤ 0 (its gain is not significantly
larger than a yes/no shift's), else "beyond a yes/no shift". Where no baseline margin is usable
(text answers have none; or every baseline answer derailed) there is no control: its columns
are empty and a changed run is labelled "no bias control (no usable baseline margin)".

The best-accuracy offset (:func:`best_offset`) picks b from the labels themselves: a ceiling
for any constant shift, labelled as using the labels, never a method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
BLOCK = 500  # resamples per block of the vectorised bootstrap (a block × n multiplicity matrix)

NO_CHANGE = "no change"
EXPLAINED = "explained by a yes/no shift"
BEYOND = "beyond a yes/no shift"
NO_CONTROL = "no bias control (no usable baseline margin)"
BEST_OFFSET_NOTE = "uses the labels: a ceiling for a constant yes/no shift, not a method"


# --------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Answers:
    """One condition's answers over n questions: ``yes`` (a valid yes) and ``no`` (a valid no), bool [n]."""

    yes: np.ndarray
    no: np.ndarray

    @classmethod
    def of(cls, answers, valid=None) -> "Answers":
        a = np.asarray(answers, dtype=object)
        v = np.ones(len(a), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        return cls((a == "yes") & v, (a == "no") & v)

    def right(self, label_yes: np.ndarray) -> np.ndarray:
        return np.where(label_yes, self.yes, self.no)


def _labels(labels) -> np.ndarray:
    lab = np.asarray(labels, dtype=object)
    bad = [x for x in lab if x not in ("yes", "no")]
    if bad:
        raise ValueError(f"label {bad[0]!r} is not 'yes'/'no'")
    return lab == "yes"


def scores(label_yes: np.ndarray, a: Answers) -> dict:
    """accuracy, F1 and yes-ratio (fractions; 0.0 on an empty denominator, as :func:`~.data.pope_metrics`)."""
    n = len(label_yes)
    if not n:
        return {"accuracy": math.nan, "f1": math.nan, "yes_ratio": math.nan}
    tp, n_yes, pos = int((a.yes & label_yes).sum()), int(a.yes.sum()), int(label_yes.sum())
    return {"accuracy": float(a.right(label_yes).mean()), "f1": 2 * tp / (n_yes + pos) if n_yes + pos else 0.0,
            "yes_ratio": n_yes / n}


# --------------------------------------------------------------------------- McNemar, Holm
def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value of ``b`` and ``c`` discordant pairs (see the module docstring)."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be ≥ 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def discordant(right_before: np.ndarray, right_after: np.ndarray) -> tuple[int, int]:
    """(b, c): wrong → right and right → wrong."""
    return int((~right_before & right_after).sum()), int((right_before & ~right_after).sum())


def holm(pvalues) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN stays NaN and does not count in m)."""
    p = [float(x) for x in pvalues]
    idx = sorted((i for i in range(len(p)) if not math.isnan(p[i])), key=lambda i: p[i])
    m, out, running = len(idx), [math.nan] * len(p), 0.0
    for j, i in enumerate(idx):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


# --------------------------------------------------------------------------- the bias control
def _usable(margins, valid) -> np.ndarray:
    """Baseline rows the control can answer: a valid Yes/No answer (``valid`` None: every row) with a finite margin."""
    m = np.asarray(margins, dtype=float)
    v = np.ones(len(m), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    return v & np.isfinite(m)


def bias_offset(margins, valid, target_yes: int) -> float:
    """The constant b on the baseline margins whose control (yes iff margin + b > 0) answers yes ``target_yes``
    times, or the nearest reachable count (see the module docstring).

    Args:
        margins: the baseline's margins logit(Yes) − logit(No), one per question.
        valid: whether each baseline answer was a valid Yes/No one; None: all valid. Invalid or non-finite
            margins are not used.
        target_yes: the number of yes answers the control should give (the intervened run's).

    Returns:
        b = −(the midpoint of the two sorted margins the count falls between); NaN when no margin is usable.
    """
    use = _usable(margins, valid)
    m = np.sort(np.asarray(margins, dtype=float)[use])[::-1]
    v = len(m)
    if not v:
        return math.nan
    padded = np.concatenate([[m[0] + 1.0], m, [m[-1] - 1.0]])  # padded[k] = m(k), k = 0 … v + 1
    reachable = [k for k in range(v + 1) if padded[k] > padded[k + 1]]  # a gap after the k-th largest
    k = min(reachable, key=lambda r: (abs(r - int(target_yes)), r))
    return float(-(padded[k] + padded[k + 1]) / 2)


def control_answers(margins, valid, offset: float) -> Answers:
    """The bias control's answers: yes iff margin + offset > 0, where the baseline answer was a valid one."""
    use = _usable(margins, valid)
    m = np.where(use, np.asarray(margins, dtype=float), 0.0)
    if math.isnan(offset):
        z = np.zeros(len(m), dtype=bool)
        return Answers(z, z.copy())
    return Answers(use & (m + offset > 0), use & ~(m + offset > 0))


def best_offset(labels, margins, valid) -> tuple[float, float]:
    """(b, accuracy): the constant offset that maximises the baseline's accuracy, **using the labels** (a ceiling
    for a yes/no shift, not a method). Ties: the smallest |b|. (NaN, NaN) when nothing is usable."""
    label_yes = _labels(labels)
    use = _usable(margins, valid)
    m = np.asarray(margins, dtype=float)[use]
    if not len(m):
        return math.nan, math.nan
    order = np.argsort(-m, kind="stable")
    ms, ly = m[order], label_yes[use][order]
    v = len(ms)
    # accuracy with the k largest answered yes: yes-labels among them + no-labels among the rest
    yes_in = np.concatenate([[0], np.cumsum(ly)])
    no_out = (~ly).sum() - np.concatenate([[0], np.cumsum(~ly)])
    right = yes_in + no_out
    padded = np.concatenate([[ms[0] + 1.0], ms, [ms[-1] - 1.0]])
    best = None
    for k in range(v + 1):
        if padded[k] > padded[k + 1]:
            b = float(-(padded[k] + padded[k + 1]) / 2)
            key = (-int(right[k]), abs(b))
            if best is None or key < best[0]:
                best = (key, b, int(right[k]))
    return best[1], best[2] / len(label_yes)


def bias_label(changed: bool, gain_lo: float) -> str:
    """The one rule (module docstring): no change / explained by a yes/no shift / beyond a yes/no shift."""
    if not changed:
        return NO_CHANGE
    return BEYOND if gain_lo > 0 else EXPLAINED


# --------------------------------------------------------------------------- the paired bootstrap
def resample_blocks(n: int, resamples: int = RESAMPLES, seed: int = SEED, block: int = BLOCK):
    """Yield index matrices [≤ block, n]: the resamples in order, each ``rng.integers(0, n, size=n)``.

    Args:
        n: how many questions each resample draws (with replacement) from.
        resamples: how many resamples in all.
        seed: the seed of one ``np.random.default_rng`` for every block (the same resamples for any ``block``).
        block: at most this many resamples per yielded matrix.

    Returns:
        A generator of int arrays [k, n], k ≤ ``block``, ``resamples`` rows in all.
    """
    rng = np.random.default_rng(seed)
    done = 0
    while done < resamples:
        k = min(block, resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def bootstrap_sums(columns: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Each resample's sums of the k ``columns`` (the resampled questions' totals).

    Args:
        columns: [n, k] per question, the k quantities summed.
        resamples: how many resamples (:func:`resample_blocks`).
        seed: the resamples' seed (the same resamples as every other bootstrap with that seed).

    Returns:
        [resamples, k] float sums.
    """
    n, k = columns.shape
    out = np.empty((resamples, k))
    at = 0
    cols = columns.astype(float)
    for idx in resample_blocks(n, resamples, seed):
        rows = idx.shape[0]
        counts = np.bincount((idx + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n)
        out[at:at + rows] = counts @ cols
        at += rows
    return out


def interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval (numpy's linear interpolation) of a statistic's resampled values."""
    a = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [a, 100 - a])
    return float(lo), float(hi)


def _f1(tp, n_yes, pos):
    den = n_yes + pos
    return np.divide(2 * tp, den, out=np.zeros_like(den, dtype=float), where=den > 0)


# --------------------------------------------------------------------------- one record per comparison
COLUMNS = ("n", "fixed_valid", "broken_valid", "mcnemar_p",
           "d_accuracy", "d_accuracy_lo", "d_accuracy_hi", "d_f1", "d_f1_lo", "d_f1_hi",
           "d_yes_ratio", "d_yes_ratio_lo", "d_yes_ratio_hi",
           "bias_offset", "control_yes_ratio", "control_accuracy", "control_f1",
           "gain_over_control", "gain_over_control_lo", "gain_over_control_hi", "control_mcnemar_p",
           "control_shares_fixes", "bias_label", "explained_by_yes_shift",
           "best_offset", "best_offset_accuracy", "resamples", "seed")


def paired(labels, base_answer, base_valid, base_margin, new_answer, new_valid, *,
           resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """Every paired statistic of one intervention against its baseline, as one flat record (:data:`COLUMNS`).

    Args:
        labels: the ground truth per question, ``"yes"`` or ``"no"`` (anything else raises ValueError).
        base_answer: the baseline's answer per question (``"yes"``/``"no"``).
        base_valid: whether each baseline answer is a Yes/No answer (None: all are).
        base_margin: the baseline's logit(Yes) − logit(No) per question (the bias control's input; NaN:
            unusable).
        new_answer: the intervened run's answer per question.
        new_valid: whether each intervened answer is a Yes/No answer (None: all are).
        resamples: bootstrap resamples of the questions.
        seed: the bootstrap's seed.
        level: the intervals' confidence level.

    Returns:
        The flat record: ``fixed_valid``/``broken_valid`` are McNemar's b and c (a derailed answer counted as
        wrong, so an answer right at baseline and derailed is in c); ``d_*`` are intervened − baseline with
        their intervals; the control's columns are described in the module docstring; ``control_mcnemar_p``
        is the exact McNemar test of the intervention against its control (for reading; the label follows
        the interval). With no question, NaN everywhere and ``n`` 0.
    """
    label_yes = _labels(labels)
    n = len(label_yes)
    if not n:
        return {**{c: math.nan for c in COLUMNS}, "n": 0, "bias_label": NO_CHANGE, "explained_by_yes_shift": False,
                "resamples": resamples, "seed": seed}
    base, new = Answers.of(base_answer, base_valid), Answers.of(new_answer, new_valid)
    offset = bias_offset(base_margin, base_valid, int(new.yes.sum()))
    ctrl = control_answers(base_margin, base_valid, offset)
    rb, rn, rc = base.right(label_yes), new.right(label_yes), ctrl.right(label_yes)
    b, c = discordant(rb, rn)
    cols = np.stack([label_yes, rb, base.yes, base.yes & label_yes, rn, new.yes, new.yes & label_yes,
                     rc, ctrl.yes, ctrl.yes & label_yes], axis=1)
    s = bootstrap_sums(cols, resamples, seed)
    pos = s[:, 0]
    acc = {k: s[:, j] / n for k, j in (("base", 1), ("new", 4), ("ctrl", 7))}
    f1 = {k: _f1(s[:, j + 2], s[:, j + 1], pos) for k, j in (("base", 1), ("new", 4), ("ctrl", 7))}
    yes = {k: s[:, j + 1] / n for k, j in (("base", 1), ("new", 4), ("ctrl", 7))}
    sb, sn, sc = scores(label_yes, base), scores(label_yes, new), scores(label_yes, ctrl)
    fixes = ~rb & rn
    gain_lo, gain_hi = interval(acc["new"] - acc["ctrl"], level)
    changed = bool(b or c or (base.yes != new.yes).any() or (base.no != new.no).any())
    label = bias_label(changed, gain_lo)
    best_b, best_acc = best_offset(labels, base_margin, base_valid)
    control = {"bias_offset": offset, "control_yes_ratio": sc["yes_ratio"], "control_accuracy": sc["accuracy"],
               "control_f1": sc["f1"], "gain_over_control": sn["accuracy"] - sc["accuracy"],
               "gain_over_control_lo": gain_lo, "gain_over_control_hi": gain_hi,
               "control_mcnemar_p": mcnemar_exact(*discordant(rc, rn)),
               "control_shares_fixes": float((fixes & rc).sum() / fixes.sum()) if fixes.any() else math.nan}
    if math.isnan(offset):  # no usable baseline margin (text answers, or every baseline answer derailed)
        control = {k: math.nan for k in control}
        label = NO_CONTROL if changed else NO_CHANGE
    return {
        "n": n, "fixed_valid": b, "broken_valid": c, "mcnemar_p": mcnemar_exact(b, c),
        "d_accuracy": sn["accuracy"] - sb["accuracy"],
        **_named("d_accuracy", interval(acc["new"] - acc["base"], level)),
        "d_f1": sn["f1"] - sb["f1"], **_named("d_f1", interval(f1["new"] - f1["base"], level)),
        "d_yes_ratio": sn["yes_ratio"] - sb["yes_ratio"],
        **_named("d_yes_ratio", interval(yes["new"] - yes["base"], level)),
        **control, "bias_label": label, "explained_by_yes_shift": label == EXPLAINED,
        "best_offset": best_b, "best_offset_accuracy": best_acc, "resamples": resamples, "seed": seed,
    }


def _named(name: str, lo_hi: tuple[float, float]) -> dict:
    return {f"{name}_lo": lo_hi[0], f"{name}_hi": lo_hi[1]}


def paired_records(records: list[dict], base: str = "baseline", new: str = "steered", **kw) -> dict:
    """:func:`paired` of answers rows.

    Args:
        records: ``answers.jsonl`` rows: ``label``, ``{cond}_answer``, ``{cond}_valid``, ``{cond}_margin``
            (rows written before the validity flags are taken as valid; a missing margin is NaN).
        base: the baseline condition's prefix.
        new: the intervened condition's prefix.
        **kw: passed to :func:`paired` (``resamples``, ``seed``, ``level``).

    Returns:
        :func:`paired`'s flat record.
    """
    return paired([r["label"] for r in records], [r[f"{base}_answer"] for r in records],
                  [answer_valid(r, base) for r in records], [_margin(r, base) for r in records],
                  [r[f"{new}_answer"] for r in records], [answer_valid(r, new) for r in records], **kw)


def control_of_records(records: list[dict], base: str = "baseline", new: str = "steered") -> tuple[float, list]:
    """The bias control of answers rows, as :func:`paired` fits it.

    Args:
        records: answers rows (``<cond>_margin``, ``<cond>_answer`` and ``<cond>_valid`` per condition).
        base: the condition whose margins are shifted (the baseline).
        new: the condition whose count of yes answers the control matches.

    Returns:
        ``(offset, answers)``: the offset b (:func:`bias_offset`) and per row the control's answer: ``"yes"``,
        ``"no"`` or ``"invalid"``.
    """
    base_valid = [answer_valid(r, base) for r in records]
    margins = [_margin(r, base) for r in records]
    target = int(Answers.of([r[f"{new}_answer"] for r in records], [answer_valid(r, new) for r in records]).yes.sum())
    offset = bias_offset(margins, base_valid, target)
    ctrl = control_answers(margins, base_valid, offset)
    return offset, ["yes" if y else "no" if n else "invalid" for y, n in zip(ctrl.yes, ctrl.no)]


def answer_valid(r: dict, cond: str) -> bool:
    v = r.get(f"{cond}_valid", True)
    return True if v is None else bool(v)


def _margin(r: dict, cond: str) -> float:
    m = r.get(f"{cond}_margin")
    return math.nan if m is None else float(m)


def describe(rec: dict) -> str:
    """One sentence of a :func:`paired` record (for pages and the population answer)."""
    if not rec.get("n"):
        return "No questions."
    pct = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    s = (f"Paired against its baseline ({rec['n']} questions): {rec['fixed_valid']} fixed and {rec['broken_valid']} "
         f"broken or derailed (a derailed answer counts as wrong), exact McNemar p = {rec['mcnemar_p']:.3g}; "
         f"Δ accuracy {pct(rec['d_accuracy'])} points (95% paired bootstrap interval {pct(rec['d_accuracy_lo'])} to "
         f"{pct(rec['d_accuracy_hi'])}), Δ F1 {pct(rec['d_f1'])} ({pct(rec['d_f1_lo'])} to {pct(rec['d_f1_hi'])}), "
         f"Δ yes-ratio {pct(rec['d_yes_ratio'])} ({pct(rec['d_yes_ratio_lo'])} to {pct(rec['d_yes_ratio_hi'])}).")
    return s + " " + control_sentence(rec)


def control_sentence(rec: dict) -> str:
    """The bias control's part of :func:`describe`: the control, the gain over it and the label."""
    pct = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    if math.isnan(rec["bias_offset"]):
        return "No bias control: no baseline answer is a Yes/No answer with a finite margin."
    s = (f"Bias control (the baseline's Yes − No margin + {rec['bias_offset']:.4g}, the intervention's yes-ratio: "
         f"{100 * rec['control_yes_ratio']:.1f}%): accuracy {100 * rec['control_accuracy']:.1f}%, F1 "
         f"{100 * rec['control_f1']:.1f}%; the intervention's gain over it {pct(rec['gain_over_control'])} points "
         f"({pct(rec['gain_over_control_lo'])} to {pct(rec['gain_over_control_hi'])})")
    if not math.isnan(rec["control_shares_fixes"]):
        s += f"; the control also makes {100 * rec['control_shares_fixes']:.0f}% of its fixes"
    if rec["bias_label"] == EXPLAINED and rec["gain_over_control_hi"] < 0:
        s += " (it does worse than its control)"
    return s + f": {rec['bias_label']}. Best constant offset ({BEST_OFFSET_NOTE}): {rec['best_offset']:.4g}, " \
               f"accuracy {100 * rec['best_offset_accuracy']:.1f}%."


__all__ = ["BEST_OFFSET_NOTE", "BEYOND", "COLUMNS", "EXPLAINED", "NO_CHANGE", "NO_CONTROL", "RESAMPLES", "SEED",
           "Answers",
           "best_offset", "bias_label", "bias_offset", "bootstrap_sums", "control_answers", "control_of_records",
           "describe", "discordant", "holm", "interval", "mcnemar_exact", "paired", "paired_records",
           "resample_blocks", "scores"]

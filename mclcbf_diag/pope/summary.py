"""The comparison in one row per setting and split: the greedy run beside the same setting's sampled runs.

:func:`~mclcbf_diag.pope.compare.compare_runs` gives one row per run, so a method run greedy and with three
sampling seeds fills four rows of a split, sorted apart from each other by their intervals. :func:`decoding_summary`
folds them back together. A run's *setting* is its ``settings`` cell with the decoding options taken out
(``--decoding``, ``--temperature``, ``--top-p``, ``--top-k``, ``--num-beams``, ``--seed``); its *decoding* is those
options without the seed. One row per (intervention, setting, split, decoding other than greedy):

* the greedy run of the setting (none: empty cells): accuracy, Δ accuracy with its 95% paired interval,
  fixed/broken(+derailed), McNemar's p after Holm, and the gain over the bias control with its interval, as the
  full table has them;
* the runs of the other decoding, over their seeds: how many, the accuracy's and Δ accuracy's mean ± standard
  deviation (n − 1; a single seed has no spread), fixed/broken per seed, how many seeds gain and how many lose
  (interval beside 0 *and* Holm-adjusted p below :data:`~mclcbf_diag.pope.compare.ALPHA`, as the findings count
  them), and how many a constant yes/no shift explains.

A setting run greedy only gives one row with empty sampled cells. Every number is one of the table's, so the
summary says nothing the table does not; it only puts the seeds of one setting side by side.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from .compare import ALPHA

_DECODING = re.compile(r" ?--(decoding|temperature|top-p|top-k|num-beams) \S+")
_SEED = re.compile(r" ?--seed (-?\d+)")

COLUMNS = ["intervention", "setting", "split", "greedy_accuracy", "greedy_d_accuracy", "greedy_d_accuracy_lo",
           "greedy_d_accuracy_hi", "greedy_fixed", "greedy_broken", "greedy_derailed", "greedy_mcnemar_p_holm",
           "greedy_gain_over_control", "greedy_gain_over_control_lo", "greedy_gain_over_control_hi", "decoding",
           "seeds", "accuracy_mean", "accuracy_sd", "d_accuracy_mean", "d_accuracy_sd", "fixed_broken",
           "seeds_gaining", "seeds_losing", "seeds_explained_by_shift"]


def setting_of(settings: str) -> tuple[str, str, str | None]:
    """``(setting, decoding, seed)`` of a ``settings`` cell: ``"--preset x --decoding sample --seed 2"`` →
    ``("--preset x", "--decoding sample", "2")``; a greedy run's decoding is ``""``, its seed None."""
    seed = _SEED.search(settings)
    rest = _SEED.sub("", settings)
    decoding = " ".join(m.group(0).strip() for m in _DECODING.finditer(rest))
    setting = _DECODING.sub("", rest).strip()
    return setting or "(defaults)", decoding, seed.group(1) if seed else None


def decoding_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (intervention, setting, split, non-greedy decoding) of ``table`` (its first label set), the
    greedy run's cells beside the other decoding's mean ± standard deviation over its seeds (module docstring)."""
    if table.empty:
        return pd.DataFrame(columns=COLUMNS)
    first = table[table.label_set == table.label_set.iloc[0]].copy()
    first["setting"], first["decoding"], first["seed"] = zip(*first.settings.map(setting_of))
    rows = []
    for (name, setting, split), g in first.groupby(["intervention", "setting", "split"], sort=False):
        greedy = g[g.decoding == ""]
        base = _greedy_cells(greedy.iloc[0]) if len(greedy) else {}
        others = g[g.decoding != ""]
        if others.empty:
            rows.append({"intervention": name, "setting": setting, "split": split, **base})
            continue
        for decoding, h in others.groupby("decoding", sort=False):
            h = h.sort_values("seed", key=lambda s: s.fillna("-1").astype(int))
            held = h.mcnemar_p_holm < ALPHA
            acc, gain = 100 * h.accuracy, 100 * h.d_accuracy
            rows.append({"intervention": name, "setting": setting, "split": split, **base, "decoding": decoding,
                         "seeds": ", ".join(s for s in h.seed if s is not None) or "none",
                         "accuracy_mean": acc.mean(), "accuracy_sd": _sd(acc),
                         "d_accuracy_mean": gain.mean(), "d_accuracy_sd": _sd(gain),
                         "fixed_broken": ", ".join(_counts(r) for r in h.itertuples()),
                         "seeds_gaining": int(((h.d_accuracy_lo > 0) & held).sum()),
                         "seeds_losing": int(((h.d_accuracy_hi < 0) & held).sum()),
                         "seeds_explained_by_shift": int(h.explained_by_yes_shift.astype(bool).sum())})
    order = list(dict.fromkeys(table.split))
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.sort_values("split", key=lambda s: s.map(order.index), kind="stable").reset_index(drop=True)


def _greedy_cells(r) -> dict:
    return {"greedy_accuracy": 100 * r.accuracy, "greedy_d_accuracy": 100 * r.d_accuracy,
            "greedy_d_accuracy_lo": 100 * r.d_accuracy_lo, "greedy_d_accuracy_hi": 100 * r.d_accuracy_hi,
            "greedy_fixed": int(r.fixed), "greedy_broken": int(r.broken), "greedy_derailed": int(r.derailed),
            "greedy_mcnemar_p_holm": r.mcnemar_p_holm, "greedy_gain_over_control": 100 * r.gain_over_control,
            "greedy_gain_over_control_lo": 100 * r.gain_over_control_lo,
            "greedy_gain_over_control_hi": 100 * r.gain_over_control_hi}


def _sd(x: pd.Series) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


def _counts(r) -> str:
    return f"{r.fixed}/{r.broken}" + (f"+{r.derailed}" if r.derailed else "")


def summary_markdown(summary: pd.DataFrame) -> str:
    """:func:`decoding_summary` as a Markdown table (points; ``–`` where a setting has no such run)."""
    head = ["intervention", "setting", "split", "greedy: accuracy", "Δ accuracy [95%]", "fixed/broken",
            "McNemar p (Holm)", "gain over bias control [95%]", "sampled: decoding (seeds)",
            "accuracy mean ± sd", "Δ accuracy mean ± sd", "fixed/broken per seed", "seeds gaining / losing",
            "seeds a yes/no shift explains"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.itertuples():
        greedy = ["–"] * 5 if _nan(r.greedy_accuracy) else [
            f"{r.greedy_accuracy:.1f}", _span(r.greedy_d_accuracy, r.greedy_d_accuracy_lo, r.greedy_d_accuracy_hi),
            f"{int(r.greedy_fixed)}/{int(r.greedy_broken)}"
            + (f"+{int(r.greedy_derailed)}" if r.greedy_derailed else ""),
            "n/a" if _nan(r.greedy_mcnemar_p_holm) else f"{r.greedy_mcnemar_p_holm:.2g}",
            _span(r.greedy_gain_over_control, r.greedy_gain_over_control_lo, r.greedy_gain_over_control_hi)]
        sampled = ["–"] * 6 if not isinstance(r.decoding, str) or not r.decoding else [
            f"{r.decoding.replace('--decoding ', '')} ({r.seeds})", _mean_sd(r.accuracy_mean, r.accuracy_sd, "{:.1f}"),
            _mean_sd(r.d_accuracy_mean, r.d_accuracy_sd, "{:+.1f}"), r.fixed_broken,
            f"{int(r.seeds_gaining)} / {int(r.seeds_losing)}", str(int(r.seeds_explained_by_shift))]
        cells = [f"`{r.intervention}`", r.setting.replace("|", "/"), r.split, *greedy, *sampled]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _span(est: float, lo: float, hi: float) -> str:
    return "n/a" if _nan(est) else f"{est:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _mean_sd(mean: float, sd: float, fmt: str) -> str:
    return fmt.format(mean) + ("" if _nan(sd) else f" ± {sd:.1f}")

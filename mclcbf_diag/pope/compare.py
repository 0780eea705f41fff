"""Interventions side by side: one row per finished POPE run (and split), outcome classes included.

:func:`compare_runs` reads each run folder's ``run.json``, ``metrics.csv`` and ``flips.csv``
(written by ``mclcbf-diag pope``) and lays them out as one table: the intervention, its preset
and overrides, steered accuracy (and over valid Yes/No outputs only), F1 and yes-ratio, the
unchanged / fixed / broken / derailed counts and the net change in accuracy. Beside each
intervention, :data:`REPORTED` gives what its paper reports on the real LLaVA-1.5-7B (DESIGN §6),
labelled as reported, not measured here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..storage import show

REPORTED = {
    "mclcbf": "POPE answers identical to the baseline (the researcher's report)",
    "pai": "≈ +1 accuracy point, greedy (Liu et al., ECCV 2024)",
    "vaf": "random split 87.8 → 89.7 accuracy (Yin et al., CVPR 2025)",
    "vista": "≈ +1.4 accuracy points (Li et al., ICML 2025)",
    "adhh": "evaluated mainly on CHAIR (ICLR 2025)",
    "var": "POPE gain not verified here (ICLR 2025)",
}


def _reported(name: str, run: dict) -> str:
    """The paper's figure, for the paper's own settings only (MC-LCBF: the researcher's seed-exp6)."""
    if name == "mclcbf" and (run.get("preset") not in (None, "seed-exp6", "original") or run.get("overrides")):
        return ""
    return REPORTED.get(name, "")


def _read(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        raise UserError(f"{show(path)} is missing: is {show(folder)} a finished `mclcbf-diag pope` run? "
                        "Run pope into it first")
    return json.loads(path.read_text(encoding="utf-8")) if name.endswith(".json") else pd.read_csv(path)


def compare_runs(folders) -> pd.DataFrame:
    """One row per (run, split): intervention, settings, metrics and outcome counts."""
    rows = []
    for folder in map(Path, folders):
        run, metrics, flips = _read(folder, "run.json"), _read(folder, "metrics.csv"), _read(folder, "flips.csv")
        name = run.get("intervention", "mclcbf")
        settings = " ".join([*([f"--preset {run['preset']}"] if run.get("preset") else []),
                             *(f"--set {o}" for o in run.get("overrides", []))]) or "(defaults)"
        logit = flips[flips["answer"] == "logit"] if "answer" in flips else flips
        for split, m in metrics.groupby("split", sort=False):
            base = m[m.condition == "baseline"].iloc[0]
            st = m[m.condition == "steered"].iloc[0]
            f = logit[logit.split == split]
            f = f.iloc[0] if len(f) else {}
            rows.append({
                "intervention": name, "settings": settings, "split": split, "n": int(st.n),
                "baseline_accuracy": float(base.accuracy), "accuracy": float(st.accuracy),
                "accuracy_valid": float(st.get("accuracy_valid", st.accuracy)), "f1": float(st.f1),
                "yes_ratio": float(st.yes_ratio),
                **{k: int(f.get(k, 0)) for k in ("unchanged", "fixed", "broken", "derailed")},
                "net_accuracy_points": 100 * (float(st.accuracy) - float(base.accuracy)),
                "reported_on_llava_1_5_7b": _reported(name, run), "run": str(folder),
            })
    return pd.DataFrame(rows)


def markdown_table(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table (accuracy in %, the reported column last)."""
    head = ["intervention", "settings", "split", "accuracy", "F1", "yes-ratio", "unchanged", "fixed", "broken",
            "derailed", "reported on LLaVA-1.5-7B (not measured here)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        lines.append(f"| `{r.intervention}` | {r.settings.replace('|', '/')} | {r.split} | {100 * r.accuracy:.1f} | "
                     f"{100 * r.f1:.1f} | {100 * r.yes_ratio:.1f} | {r.unchanged} | {r.fixed} | {r.broken} | "
                     f"{r.derailed} | {r.reported_on_llava_1_5_7b} |")
    return "\n".join(lines)

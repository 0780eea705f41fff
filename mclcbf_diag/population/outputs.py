"""A population run's files: the per-batch records parts, and the tables, parquet files and page at the end.

Folder layout (beside ``run.json`` and ``answers.jsonl`` of :mod:`mclcbf_diag.pope.store`,
whose rows here are the per-question verdict rows):

* ``records/part-<digest>.parquet``: the records of one batch (the tidy shape with a
  ``split`` column in front), written atomically *before* the batch's rows are appended; a
  part whose rows never reached ``answers.jsonl`` (a kill in between) is ignored, and a
  question found in several parts is taken from the first. Parts written before the records
  columns were named ``question_id``/``decode_step`` (``sample``/``step``) are read under
  the new names, so resuming such a run never mixes the two;
* ``questions.parquet`` / ``questions.csv``: one row per question;
* ``causes.csv``, ``doses.csv``, ``masses.csv``, ``fixes.csv``, ``settings.csv``: the aggregate
  (:mod:`.aggregate`); ``paired.csv``: the paired statistics and the bias control per split
  (:func:`.aggregate.paired_table`);
* ``records.parquet``: every question's records; ``population.html``: the page;
* with ``--pages``: ``pages/explain-<split>-<question_id>.html``, the explain page of each selected
  question from its row and records (no second forward), linked from ``population.html``; every
  page then loads the one ``plotly.min.js`` of the folder instead of inlining it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..measurements.records import COLUMNS
from ..storage import atomic_write_text, atomic_write_with, digest, make_dir
from . import aggregate as A

PARTS = "records"
PAGE = "population.html"
QUESTION_PAGES = "pages"  # --pages: the questions' explain pages, beside the shared plotly.js
LISTED = 200  # question commands listed per table on the page
_OLD_NAMES = {"sample": "question_id", "step": "decode_step"}  # records columns of parts from earlier versions


def write_part(out: Path, keys: list[tuple[str, str]], records: pd.DataFrame) -> Path:
    """Write one part of the run's records, atomically, under ``out/records``.

    Args:
        out: the run's folder.
        keys: ``(split, question_id)`` of the questions the part holds; the file is named by their digest.
        records: the questions' tidy records (with a ``split`` column).

    Returns:
        The part's path, ``out/records/part-<digest>.parquet``.
    """
    folder = make_dir(out / PARTS)
    path = folder / f"part-{digest(sorted(keys))[:16]}.parquet"
    atomic_write_with(path, lambda tmp: records.to_parquet(tmp, index=False))
    return path


def read_parts(dirs: list[Path], keys: set[tuple[str, str]]) -> pd.DataFrame:
    """The records of the questions ``keys`` from every part in ``dirs`` (first part wins)."""
    seen, frames = set(), []
    for d in dirs:
        for part in sorted((Path(d) / PARTS).glob("part-*.parquet")):
            df = pd.read_parquet(part)
            if "question_id" not in df.columns:
                df = df.rename(columns=_OLD_NAMES)
            k = list(zip(df["split"].astype(str), df["question_id"].astype(str)))
            here = {x for x in set(k) if x in keys and x not in seen}
            if here:
                frames.append(df[[x in here for x in k]])
                seen |= here
    if not frames:
        return pd.DataFrame(columns=["split", *COLUMNS])
    return pd.concat(frames, ignore_index=True)


def explain_command(identity: dict, split: str, question_id) -> str:
    """The ``mclcbf-diag explain`` command that explains one question of the run alone.

    Args:
        identity: the run's identity (its model, dtype, intervention, preset, overrides, data options).
        split: the question's split.
        question_id: the question's id.

    Returns:
        The command line, shell-quoted.
    """
    import shlex

    parts = ["mclcbf-diag", "explain"]
    files = identity.get("pope_files", [])
    splits = identity.get("splits", [])
    if identity.get("embedded_data", True):
        parts += ["--split", split]
    else:
        path = files[splits.index(split)] if split in splits else files[0]
        parts += ["--pope-file", path]
        if identity.get("image_dir_option"):
            parts += ["--image-dir", identity["image_dir_option"]]
    parts += ["--question-id", str(question_id)]
    if identity.get("model") not in (None, "embedded"):
        parts += ["--model", identity["model"]]
    if identity.get("dtype", "float32") != "float32":
        parts += ["--dtype", identity["dtype"]]
    if identity.get("intervention", "mclcbf") != "mclcbf":
        parts += ["--intervention", identity["intervention"]]
    if identity.get("preset"):
        parts += ["--preset", identity["preset"]]
    for o in identity.get("overrides", []):
        parts += ["--set", o]
    if identity.get("prompt_option"):
        parts += ["--prompt", identity["prompt"]]
    if identity.get("k_max", 1024.0) != 1024.0:
        parts += ["--k-max", f"{identity['k_max']:g}"]
    if isinstance(identity.get("labels"), dict) and identity["labels"].get("file"):  # a relabelled run (--labels)
        parts += ["--labels", str(identity["labels"]["file"])]
    return " ".join(shlex.quote(p) for p in parts)


def tables(rows: list[dict], identity: dict, titles: dict | None = None) -> dict:
    """Every table of the run, and its answer.

    Args:
        rows: the run's question rows.
        identity: the run's ``run.json`` (``k_max``, ``sweep``, the intervention's name and settings).
        titles: rule id → title, to name the causes; None: the ids alone.

    Returns:
        ``questions`` (the question frame), ``causes``, ``doses``, ``masses``, ``fixes``, ``settings`` and
        ``paired`` (frames of :mod:`~mclcbf_diag.population.aggregate`), and ``answer`` (its sentences).
    """
    df = A.frame(rows)
    k_max = float(identity.get("k_max", 1024.0))
    settings = [tuple(s) if s[1] is None else (s[0], tuple(s[1]), s[2], s[3]) for s in identity.get("sweep", [])]
    out = {"questions": df, "causes": A.cause_table(df, titles), "doses": A.dose_table(df, k_max),
           "masses": A.mass_table(df), "fixes": A.fix_table(df), "settings": A.setting_table(df, settings),
           "paired": A.paired_table(df)}
    what = f"the intervention ({identity.get('intervention', 'mclcbf')}" + (
        f" --preset {identity['preset']}" if identity.get("preset") else "") + "".join(
        f" --set {o}" for o in identity.get("overrides", [])) + ")"
    out["answer"] = A.answer(df, out["causes"], out["doses"], out["fixes"], out["settings"], k_max, what,
                             paired=out["paired"])
    return out


def _titles(identity: dict) -> dict:
    try:
        from ..diagnosis.diagnose import rules_for
        from ..interventions import resolve

        iv = resolve(identity.get("intervention", "mclcbf"), identity.get("preset"), identity.get("overrides", []))
        return {r.id: r.title for r in rules_for(iv)[0]}
    except (UserError, TypeError, ValueError, KeyError):  # a title is a nicety: the ids stay
        return {}


def write_outputs(out: Path, rows: list[dict], identity: dict, part_dirs: list[Path] | None = None,
                  pages: str | None = None) -> dict:
    """Every output file of the run in ``out`` from its rows (and the records parts in ``part_dirs``); with
    ``pages`` (``--pages``: wrong, changed, all or N) also those questions' explain pages (:func:`write_question_pages`)
    and one shared plotly.js for every page of the folder.

    Args:
        out: the run folder.
        rows: the run's question rows.
        identity: the run's ``run.json``.
        part_dirs: the folders whose records parts hold the questions' records (the first part holding a
            question wins); None: ``out``'s.
        pages: ``--pages`` (:func:`page_selection`); None: no question pages.

    Returns:
        The run's tables (:func:`tables`).
    """
    t = tables(rows, identity, _titles(identity))
    df = t["questions"]
    flat = df.copy()
    for col in flat.columns:
        if flat[col].map(lambda v: isinstance(v, list)).any():
            flat[col] = flat[col].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    atomic_write_with(out / "questions.parquet", lambda tmp: flat.to_parquet(tmp, index=False))
    atomic_write_text(out / "questions.csv", flat.to_csv(index=False))
    for name in ("causes", "doses", "masses", "fixes", "settings", "paired"):
        atomic_write_text(out / f"{name}.csv", t[name].to_csv(index=False))
    keys = {(str(r["split"]), str(r["question_id"])) for r in rows}
    records = read_parts(part_dirs or [out], keys)
    atomic_write_with(out / "records.parquet", lambda tmp: records.to_parquet(tmp, index=False))
    atomic_write_text(out / "answer.txt", t["answer"] + "\n")
    from .page import write_page

    links, plotlyjs = None, None
    if pages is not None:
        from ..report.html import PLOTLY_JS, write_plotlyjs

        write_plotlyjs(out)
        links, plotlyjs = write_question_pages(out, df, records, identity, pages), PLOTLY_JS
    write_page(out / PAGE, t, identity, lambda s, q: explain_command(identity, s, q), LISTED, links, plotlyjs)
    return t


def page_selection(df: pd.DataFrame, pages: str) -> pd.DataFrame:
    """The questions ``--pages`` names: ``wrong`` answers, those the intervention or a fix ``changed`` (any
    outcome but unchanged, or a fix that fixes, breaks or derails it), ``all``, or the first N."""
    if pages == "all":
        return df
    if pages == "wrong":
        return df[df.kind == "wrong"]
    if pages == "changed":
        moved = [bool(a) or bool(b) or bool(c) for a, b, c in zip(df.fixes_fixed, df.fixes_broken, df.fixes_derailed)]
        return df[(df.outcome != "unchanged") | pd.Series(moved, index=df.index)]
    return df.head(int(pages))


def write_question_pages(out: Path, df: pd.DataFrame, records: pd.DataFrame, identity: dict, pages: str) -> dict:
    """The explain page of each question ``pages`` selects (:func:`page_selection`), from its row and records (no
    forward), in ``out/pages/``, loading the folder's shared plotly.js.

    Args:
        out: the run folder.
        df: the question frame.
        records: the questions' records (:func:`read_parts`).
        identity: the run's ``run.json`` (the intervention, the explain commands).
        pages: ``--pages``: ``wrong``, ``changed``, ``all`` or a count.

    Returns:
        ``split:question_id`` → the page's path relative to ``out``.
    """
    from ..report.html import PLOTLY_JS, write_page
    from ..report.pages import question_sections
    from ..storage import safe_name

    folder = make_dir(out / QUESTION_PAGES)
    intervention = _intervention(identity)
    keys = list(zip(records["split"].astype(str), records["question_id"].astype(str)))
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    links = {}
    for row in page_selection(df, pages).to_dict("records"):
        split, qid = str(row["split"]), str(row["question_id"])
        name = f"explain-{safe_name(split)}-{safe_name(qid)}.html"
        recs = records.iloc[groups.get((split, qid), [])]
        write_page(folder / name, f"mclcbf-diag explain: {row.get('text', '')}",
                   question_sections(row, recs, explain_command(identity, split, qid), intervention),
                   plotlyjs=f"../{PLOTLY_JS}")
        links[f"{split}:{qid}"] = f"{QUESTION_PAGES}/{name}"
    return links


def _intervention(identity: dict):
    """The run's intervention, for the figures of its own on the pages (None where it no longer resolves)."""
    from ..errors import UserError
    from ..interventions import resolve

    try:
        return resolve(identity.get("intervention", "mclcbf"), identity.get("preset"), identity.get("overrides", []))
    except (UserError, TypeError, ValueError):
        return None


__all__ = ["PAGE", "PARTS", "QUESTION_PAGES", "explain_command", "page_selection", "read_parts", "tables",
           "write_outputs", "write_part", "write_question_pages"]

"""Interventions side by side: one row per finished POPE run (and split), outcome classes included.

:func:`compare_runs` reads each run folder's ``run.json``, ``metrics.csv``, ``flips.csv``,
``answers.jsonl`` and ``timing.json`` (written by ``mclcbf-diag pope``) and lays them out as
one table: the intervention, its preset and overrides, steered accuracy (and over valid Yes/No
outputs only), F1 and yes-ratio, the unchanged / fixed / broken / derailed / non_finite counts, the net
change in accuracy, and two columns on how the intervention acts:

* **Δ image mass per layer**: the decision token's head-mean attention mass on the image,
  intervened minus baseline, averaged over the split's questions (``d_image_mass_L<layer>``,
  from each answers row's ``steered_image_mass_<layer>`` − ``baseline_image_mass_<layer>``).
  In short: the mean over the layers the intervention acts on (``edited_layers``, its
  ``layers()`` at the model's depth) and the layer of the largest |Δ|.
* **cost per question**: the run's answering seconds per question and their ratio to the bare
  forward's (the inputs plus the baseline's plain forward, timed in the same batches; see
  :mod:`mclcbf_diag.pope.answer`), from ``timing.json``, summed over a merged run's parts.
  Rows of runs written before these records existed leave the columns empty.

Beside each intervention, :data:`REPORTED` gives what its paper reports on the real
LLaVA-1.5-7B (DESIGN §6), labelled as reported, not measured here, and only beside a run of the paper's
own settings (:data:`FIGURE_SETTINGS`: its preset, no overrides, the default prompt, and the figure's
decoding: a greedy row of a method whose figure was sampled says so instead of showing it).

**Is the difference real** (DESIGN §10, :mod:`mclcbf_diag.measurements.stats`): every row carries the paired
statistics of its run against its own baseline, recomputed from ``answers.jsonl`` (exact McNemar
``mcnemar_p``; the seeded paired bootstrap's 95% intervals ``d_accuracy_lo/hi``, ``d_f1_lo/hi``,
``d_yes_ratio_lo/hi``; the bias control's ``bias_offset``, ``control_accuracy``, ``control_f1``,
``gain_over_control`` with ``_lo/hi``, ``control_shares_fixes``, ``bias_label``; the
label-using ``best_offset_accuracy``), and ``mcnemar_p_holm``: Holm's adjustment over the rows
of the same split (and label set): every run, and every prompt control's pairing. Rows are sorted
per split by the lower end of the Δaccuracy interval (then its upper end), not by the point estimate;
``rank`` is that order.

**Label sets.** With ``labels`` (:func:`~mclcbf_diag.data.labels.load_labels`), every run is shown
twice: under its own labels (``label_set`` "question file"; a run made with ``--labels`` says so
in ``settings``) and re-scored under the relabelled file, with ``rank_change`` (the relabelled
rank minus the original rank; negative moves up).

**Shards and partial merges.** A folder whose ``run.json`` has ``"shard": "i/n"`` is one shard of
a run and is refused (merge the shards first); a merge with ``"partial"`` (expected, present,
missing_shards) is compared but marked in ``partial`` ("M of N questions").
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from ..errors import UserError
from ..measurements.outcomes import OUTCOMES
from ..storage import show
from .answer import TIMING
from .store import ANSWERS, read_records

_MASS = re.compile(r"^baseline_image_mass_(\d+)$")

REPORTED = {  # the intervention's name → what its paper reports; HALC's also beside ``dola --preset halc-first-token``
    # (the first token of HALC's released generation loop, where its focal contrast does not fire)
    "mclcbf": "POPE answers identical to the baseline (the researcher's report)",
    "pai": "≈ +1 accuracy point, greedy (Liu et al., ECCV 2024)",
    "vaf": "random split 87.8 → 89.7 accuracy (Yin et al., CVPR 2025)",
    "vista": "≈ +1.4 accuracy points (Li et al., ICML 2025)",
    "adhh": "evaluated mainly on CHAIR (ICLR 2025)",
    "var": "POPE gain not verified here (ICLR 2025)",
    # Table 1 (MSCOCO, LLaVA-1.5; also the released README's figs/exp1.png): "Regular decoding denotes direct
    # sampling" (the released POPE script: T = 1, top-p 1, no top-k); accuracy random 83.29 → 87.73, popular
    # 81.88 → 85.38, adversarial 78.96 → 80.88 (F1 77.57 → 81.33); means over runs, spread ±0.3–0.5
    "vcd": "adversarial split 78.96 → 80.88 accuracy, sampled (Leng et al., CVPR 2024)",
    # text-only: LLaMA on TruthfulQA, FACTOR, StrategyQA, GSM8K (+12–17 points on TruthfulQA, its abstract)
    "dola": "a text-only paper: no LLaVA POPE figure (Chuang et al., ICLR 2024)",
    # the released README's POPE tables (MSCOCO, LLaVA-1.5 7B, --beam 5): random 89.4 accuracy / 89.6 F1,
    # popular 86.0 / 86.4, adversarial 79.1 / 81.0; no baseline beside them
    "opera": "adversarial split 79.1 accuracy, F1 81.0, beam search (Huang et al., CVPR 2024)",
    # its project page's OPOPE table (github.com/BillChan226/BillChan226.github.io, images/halc/opope_result.png,
    # the paper's OPOPE table; the author's issue #11 on BillChan226/HALC: "table.2 is the OPOPE (offline POPE)"):
    # POPE's objects scored on generated captions (CHAIR's caption procedure), one figure over MSCOCO (no
    # split), mean ± spread over runs; LLaVA-1.5 greedy 70.56 ± 1.51 accuracy, 91.08 precision, 87.72 F(β=0.2);
    # HALC 70.59 ± 0.82, 92.94, 89.22. Its POPE (yes/no) figures were not found
    "halc": "OPOPE, not POPE (objects scored on generated captions, no split): accuracy 70.56 → 70.59, "
            "F(β=0.2) 87.72 → 89.22 over greedy (Chen et al., ICML 2024)",
    # its README gives no figure; its released POPE script samples (T = 1, top-p 1, γ = 1, ε = 0.6, the prompt
    # asking for one word); the paper's POPE table (Table 1, visual, language and multimodal levels) was not
    # available to read here, so no figure is quoted
    "causalmm": "POPE gain not verified here (Zhou et al., ICLR 2025)",
}

_SAMPLED = {"strategy": "sample", "temperature": 1.0, "top_p": 1.0, "top_k": 0}
FIGURE_SETTINGS = {  # a figure's own settings: the presets that are the paper's, and its decoding (run.json's form)
    "mclcbf": (("seed-exp6", "original"), None),
    "pai": (("paper",), None),  # greedy
    "vaf": (("paper",), None),  # the released infer_pope.py: generate() without sampling
    "vista": (("pope",), None),  # the released run_pope.sh: no --do-sample, one beam
    "vcd": (("pope",), _SAMPLED),
    "opera": (("paper",), {"strategy": "beam", "num_beams": 5}),
}


def _reported(name: str, run: dict) -> str:
    """The paper's figure, for the paper's own settings only.

    A figure (:data:`FIGURE_SETTINGS`) shows beside a run of the paper's preset (or the default) without
    overrides, on the default prompt, whose answers are drawn the way the figure's were
    (:func:`_same_decoding`); a run decoded otherwise says which decoding the figure is for instead. An entry
    that is no figure (what a paper evaluates instead, or that its gain is not verified) shows beside every run
    on the default prompt."""
    paper = "halc" if name == "dola" and run.get("preset") == "halc-first-token" else name
    if _prompt_setting(run) or paper not in REPORTED:  # the papers report their own prompt
        return ""
    if paper not in FIGURE_SETTINGS:
        return REPORTED[paper]
    presets, decoding = FIGURE_SETTINGS[paper]
    if run.get("preset") not in (None, *presets) or run.get("overrides"):
        return ""
    if not _same_decoding(decoding, run.get("decoding")):
        return f"the paper's figure is for {_decoding_words(decoding)}, not this run's decoding"
    return REPORTED[paper]


def _same_decoding(paper: dict | None, run: dict | None) -> bool:
    """Whether a run's answers are drawn as a figure's were: both sampled with the same temperature, top-p and
    top-k (the seed aside), or neither sampled (greedy or beam: a beam search's first token is the greedy one's,
    :mod:`~mclcbf_diag.measurements.sampling`). None: greedy."""
    sampled = [bool(d) and d.get("strategy") == "sample" for d in (paper, run)]
    if not all(sampled):
        return sampled[0] == sampled[1]
    return all(paper.get(k, v) == run.get(k, v) for k, v in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0)))


def _decoding_words(decoding: dict | None) -> str:
    """``greedy decoding``, ``sampling at T = 1``, ``beam search (5 beams)``."""
    if not decoding or decoding.get("strategy") == "greedy":
        return "greedy decoding"
    if decoding["strategy"] == "beam":
        return f"beam search ({decoding.get('num_beams', 2)} beams)"
    words = f"sampling at T = {decoding.get('temperature', 1.0):g}"
    if decoding.get("top_p", 1.0) != 1.0:
        words += f", top-p {decoding['top_p']:g}"
    if decoding.get("top_k", 0):
        words += f", top-k {decoding['top_k']}"
    return words


def _prompt_setting(run: dict) -> str:
    """``--prompt NAME`` (a prompt control) or ``--prompt (custom)`` for a run not on the default prompt; ""."""
    from ..data.prompts import LLAVA_PROMPT, control_name

    prompt = run.get("prompt", LLAVA_PROMPT)
    return "" if prompt == LLAVA_PROMPT else f"--prompt {control_name(prompt) or '(custom)'}"


def _read(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        raise UserError(f"{show(path)} is missing: is {show(folder)} a finished `mclcbf-diag pope` run? "
                        "Run pope into it first")
    if not name.endswith(".json"):
        return pd.read_csv(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{show(path)} is not readable JSON ({type(exc).__name__}): the run in {show(folder)} "
                        "was interrupted while writing it; rerun the same `mclcbf-diag pope` command into it") from None
    return data


def _layer_deltas(rows: list[dict]) -> dict[int, tuple[float, float]]:
    """Per layer: (mean baseline image mass, mean intervened − baseline) over ``rows`` (with both fields)."""
    layers = sorted({int(m.group(1)) for r in rows for k in r if (m := _MASS.match(k))})
    out = {}
    for i in layers:
        pairs = [(r[f"baseline_image_mass_{i}"], r[f"steered_image_mass_{i}"]) for r in rows
                 if r.get(f"baseline_image_mass_{i}") is not None and r.get(f"steered_image_mass_{i}") is not None]
        if pairs:
            out[i] = (sum(b for b, _ in pairs) / len(pairs), sum(s - b for b, s in pairs) / len(pairs))
    return out


def _edited_layers(run: dict, n_layers: int) -> tuple[int, ...]:
    """The layers the run's intervention acts on at this depth (every layer if it cannot be rebuilt here)."""
    from ..interventions import resolve

    try:
        return tuple(resolve(run.get("intervention", "mclcbf"), run.get("preset"), run.get("overrides", []))
                     .layers(n_layers))
    except (UserError, ValueError, TypeError):
        return tuple(range(n_layers))


def _sessions(folder: Path, run: dict, seen: tuple = ()) -> list[dict]:
    """The sessions of ``timing.json`` (of a merged run without one: of its parts)."""
    path = folder / TIMING
    if not path.is_file():
        parts = [Path(d) for d in run.get("merged_from", []) if Path(d) not in seen]
        return [s for d in parts for s in _sessions(d, _load(d / "run.json"), (*seen, folder))]
    sessions = _load(path).get("sessions", [])
    keys = ("questions", "seconds", "inputs_seconds", "baseline_seconds")
    return [s for s in sessions if isinstance(s, dict) and all(isinstance(s.get(k), (int, float)) for k in keys)] \
        if isinstance(sessions, list) else []


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _timing(folder: Path, run: dict) -> dict | None:
    """The run's sessions summed, with the machines they ran on; None if nothing was timed."""
    sessions = _sessions(folder, run)
    if not sum(s["questions"] for s in sessions):
        return None
    total = {k: sum(s[k] for s in sessions) for k in ("questions", "seconds", "inputs_seconds", "baseline_seconds")}
    machines = sorted({f"{s.get('device', '?')} {s.get('machine', '')}, {s.get('torch_threads', '?')} torch "
                       f"thread(s), batch {s.get('batch_size', '?')}" for s in sessions})
    return {**total, "timed_on": "; ".join(machines)}


def _cost(timing: dict | None) -> dict:
    if timing is None:
        return {"seconds_per_question": math.nan, "bare_seconds_per_question": math.nan, "cost_vs_bare": math.nan,
                "timed_on": ""}
    n, bare = timing["questions"], timing["inputs_seconds"] + timing["baseline_seconds"]
    return {"seconds_per_question": timing["seconds"] / n, "bare_seconds_per_question": bare / n,
            "cost_vs_bare": timing["seconds"] / bare if bare > 0 else math.nan, "timed_on": timing["timed_on"]}


def _mass_columns(deltas: dict[int, tuple[float, float]], edited: tuple[int, ...]) -> dict:
    if not deltas:
        return {"edited_layers": "", "d_image_mass_edited": math.nan, "d_image_mass_max": math.nan,
                "d_image_mass_max_layer": -1}
    on = [deltas[i][1] for i in edited if i in deltas]
    top = max(deltas, key=lambda i: (abs(deltas[i][1]), -i))
    return {"edited_layers": _span(edited), "d_image_mass_edited": sum(on) / len(on) if on else math.nan,
            "d_image_mass_max": deltas[top][1], "d_image_mass_max_layer": top,
            **{f"d_image_mass_L{i}": d for i, (_, d) in deltas.items()},
            **{f"baseline_image_mass_L{i}": b for i, (b, _) in deltas.items()}}


def _span(layers) -> str:
    """``(1, 2, 3, 7)`` → ``"1–3, 7"``."""
    out, layers = [], sorted(layers)
    for i in layers:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in out)


def _unspan(text) -> set[int]:
    """``"1–3, 7"`` → ``{1, 2, 3, 7}`` (the inverse of :func:`_span`)."""
    bounds = [part.split("–") for part in str(text or "").split(", ") if part]
    return {i for b in bounds for i in range(int(b[0]), int(b[-1]) + 1)}


def _check_run(folder: Path, run) -> None:
    if not isinstance(run, dict):
        raise UserError(f"{show(folder / 'run.json')} is not a JSON object: is {show(folder)} a finished "
                        "`mclcbf-diag pope` run? Run pope into it first")
    if run.get("shard") is not None:
        raise UserError(f"{show(folder)} is shard {run['shard']} of a run, not a whole run: merge its shards first "
                        "(`mclcbf-diag merge OUT SHARD_DIR…`) and compare the merged folder")


def _partial(run: dict) -> str:
    part = run.get("partial")
    if not part:
        return ""
    if not isinstance(part, dict):
        return "partial"
    return f"{part.get('present', '?')} of {part.get('expected', '?')} questions"


def _relabelled(folder: Path, run: dict, answers: list[dict], labels):
    """The run's rows, metrics and flips re-scored under ``labels`` (ids checked against its question files), and
    how many of the file's entries apply to the run."""
    from ..data.labels import check_known, known_ids, relabel_records
    from .metrics import flips_table, metrics_table

    try:
        known = known_ids(run)
    except UserError:  # the question files moved: the ids the run answered are what can be checked
        known = {}
    for r in answers:
        known.setdefault(r["split"], set()).add(str(r["question_id"]))
    try:
        applied = check_known(labels, known, require_some=False)
    except UserError as err:
        raise UserError(f"{show(folder)}: {err}") from None
    rows = relabel_records(answers, labels)
    splits = run.get("splits", [])
    return rows, metrics_table(rows, splits), flips_table(rows, splits), applied


def compare_runs(folders, labels=None, *, resamples: int | None = None, seed: int | None = None) -> pd.DataFrame:
    """One row per (run, split): intervention, settings, metrics, outcome counts, the paired statistics and the bias
    control, Δ image mass and cost; with ``labels`` each run twice (its own labels, then relabelled), ranked.

    Args:
        folders: finished (merged) ``mclcbf-diag pope`` run folders.
        labels: a labels file (:func:`~mclcbf_diag.data.labels.load_labels`) to re-score every run under as well;
            None: the question files' labels only.
        resamples: bootstrap resamples of the paired statistics; None: the default.
        seed: the bootstrap's seed; None: the default.

    Returns:
        The ranked table (empty when no row came out), per-layer image-mass columns last.

    Raises:
        UserError: a folder is not a finished whole run (a file missing or unreadable, or a shard), or
            ``labels`` relabels no question of the runs compared.
    """
    from ..measurements import stats as S
    from .metrics import paired_table

    kw = {"resamples": S.RESAMPLES if resamples is None else resamples, "seed": S.SEED if seed is None else seed}
    rows, applied, runs = [], 0, []
    for folder in map(Path, folders):
        run = _read(folder, "run.json")
        _check_run(folder, run)
        runs.append((folder, run, read_records(folder / ANSWERS)[0]))
    for folder, run, answers in runs:
        metrics, flips = _read(folder, "metrics.csv"), _read(folder, "flips.csv")
        sets = [("question file", answers, metrics, flips)]
        if labels is not None:
            *relabelled, n = _relabelled(folder, run, answers, labels)
            applied += n
            sets.append((f"relabelled ({Path(labels.path).name}, sha256 {labels.sha256[:12]})", *relabelled))
        for label_set, recs, m, f in sets:
            paired = paired_table(recs, run.get("splits", []), **kw).set_index("split")
            rows += _run_rows(folder, run, recs, m, f, paired, label_set)
    rows += _prompt_control_rows(runs, kw)
    if labels is not None and rows and not applied:
        raise UserError(f"labels file {show(labels.path)} relabels no question of the runs compared (its splits: "
                        f"{', '.join(sorted({str(s) for s, _ in labels.entries if s is not None})) or 'none'}); "
                        "fix the split names or the ids")
    table = pd.DataFrame(rows)
    if not rows:
        return table
    table = _ranked(table)
    per_layer = [c for prefix in ("d_image_mass_L", "baseline_image_mass_L") for c in _layer_columns(table, prefix)]
    rest = [c for c in table.columns if c not in per_layer and c not in ("reported_on_llava_1_5_7b", "run")]
    return table[[*rest, *per_layer, "reported_on_llava_1_5_7b", "run"]]


def _prompt_control_rows(runs: list, kw: dict) -> list[dict]:
    """A run made with a prompt control (``--prompt lean-no``, …: :data:`~mclcbf_diag.data.prompts.PROMPT_CONTROLS`)
    adds one more row per split: its *baseline* answers paired against the baseline answers of a run of the same model
    and decoding (a sampled one: the same seed, so the same draw per question) with the default prompt among those
    compared, question by question (what the wording alone does). No such run: no row."""
    from ..data.prompts import LLAVA_PROMPT, control_name
    from ..measurements.outcomes import outcome
    from .metrics import flips_table, metrics_table, paired_table
    from .store import model_key

    plain = {}
    for _, run, answers in runs:
        if run.get("prompt", LLAVA_PROMPT) == LLAVA_PROMPT:
            same = (model_key(run), _key(run.get("decoding")))
            for r in answers:
                plain.setdefault((*same, r["split"], str(r["question_id"])), r)
    rows = []
    for folder, run, answers in runs:
        name = control_name(run.get("prompt", LLAVA_PROMPT))
        if name is None:
            continue
        recs, same = [], (model_key(run), _key(run.get("decoding")))
        for r in answers:
            b = plain.get((*same, r["split"], str(r["question_id"])))
            if b is None:
                continue
            bv, rv = b.get("baseline_valid", True) is not False, r.get("baseline_valid", True) is not False
            recs.append({"split": r["split"], "question_id": r["question_id"], "label": r["label"],
                         "baseline_answer": b["baseline_answer"], "baseline_margin": b.get("baseline_margin"),
                         "baseline_valid": bv, "steered_answer": r["baseline_answer"],
                         "steered_margin": r.get("baseline_margin"), "steered_valid": rv,
                         "outcome": outcome(b["baseline_answer"], bv, r["baseline_answer"], rv, r["label"])})
        if not recs:
            continue
        splits = [s for s in run.get("splits", []) if any(x["split"] == s for x in recs)]
        paired = paired_table(recs, splits, **kw)
        control = {**run, "intervention": "prompt control", "preset": None, "overrides": [], "labels": None,
                   "prompt": LLAVA_PROMPT}
        for row in _run_rows(folder, control, [], metrics_table(recs, splits, paired), flips_table(recs, splits),
                             paired.set_index("split"), "question file"):
            rows.append({**row, "settings": f"--prompt {name}, baseline vs the default prompt's",
                         "reported_on_llava_1_5_7b": "", "run": f"{folder}#prompt-control"})
    return rows


def _key(decoding: dict | None) -> str:
    """A run's decoding as a comparable key ("" for greedy)."""
    return json.dumps(decoding, sort_keys=True) if decoding else ""


_STATS = ("mcnemar_p", "d_accuracy", "d_accuracy_lo", "d_accuracy_hi", "d_f1", "d_f1_lo", "d_f1_hi", "d_yes_ratio",
          "d_yes_ratio_lo", "d_yes_ratio_hi", "bias_offset", "control_yes_ratio", "control_accuracy", "control_f1",
          "gain_over_control", "gain_over_control_lo", "gain_over_control_hi", "control_shares_fixes", "bias_label",
          "explained_by_yes_shift", "best_offset", "best_offset_accuracy")


def _ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Holm per (label set, split); rows sorted per (label set, split) by the Δaccuracy interval's lower end, then
    its upper end (not the point estimate); ``rank`` 1 = best; ``rank_change`` under a second label set."""
    from ..measurements.stats import holm

    table = table.copy()
    table["mcnemar_p_holm"] = float("nan")
    sets = list(dict.fromkeys(table.label_set))
    groups = sorted(dict.fromkeys(zip(table.label_set, table.split)), key=lambda g: sets.index(g[0]))  # stable
    order = []
    for ls, split in groups:
        sel = table[(table.label_set == ls) & (table.split == split)]
        table.loc[sel.index, "mcnemar_p_holm"] = holm(sel.mcnemar_p.tolist())
        ranked = sel.sort_values(["d_accuracy_lo", "d_accuracy_hi"], ascending=False, kind="stable")
        table.loc[ranked.index, "rank"] = range(1, len(ranked) + 1)
        order += list(ranked.index)
    table = table.loc[order].reset_index(drop=True)
    table["rank"] = table["rank"].astype(int)
    table["rank_change"] = float("nan")
    if len(sets) > 1:
        first = {(r.run, r.split): r.rank for r in table[table.label_set == sets[0]].itertuples()}
        later = table.label_set != sets[0]
        table.loc[later, "rank_change"] = [r.rank - first[(r.run, r.split)] for r in table[later].itertuples()]
    return table


def _run_rows(folder: Path, run: dict, answers: list[dict], metrics, flips, paired, label_set: str) -> list[dict]:
    rows = []
    cost = _cost(_timing(folder, run))
    name = run.get("intervention", "mclcbf")
    own = run.get("labels") if isinstance(run.get("labels"), dict) else None  # a run made with --labels FILE
    settings = " ".join([*([f"--preset {run['preset']}"] if run.get("preset") else []),
                         *(f"--set {o}" for o in run.get("overrides", [])),
                         *([p] if (p := _prompt_setting(run)) else []),
                         *([f"--labels {Path(str(own.get('file', '?'))).name}"] if own else []),
                         *_decoding_setting(run.get("decoding"))]) or "(defaults)"
    logit = flips[flips["answer"] == "logit"] if "answer" in flips else flips
    for split, m in metrics.groupby("split", sort=False):
        base = m[m.condition == "baseline"].iloc[0]
        st = m[m.condition == "steered"].iloc[0]
        f = logit[logit.split == split]
        f = f.iloc[0] if len(f) else {}
        deltas = _layer_deltas(answers if split == "all" else [r for r in answers if r["split"] == split])
        edited = _edited_layers(run, max(deltas) + 1) if deltas else ()
        rows.append({
            "intervention": name, "settings": settings, "split": split, "n": int(st.n),
            "baseline_accuracy": float(base.accuracy), "accuracy": float(st.accuracy),
            "accuracy_valid": float(st.get("accuracy_valid", st.accuracy)), "f1": float(st.f1),
            "yes_ratio": float(st.yes_ratio),
            **{k: int(f.get(k, 0)) for k in OUTCOMES},
            "net_accuracy_points": 100 * (float(st.accuracy) - float(base.accuracy)),
            "label_set": label_set, "partial": _partial(run),
            **{k: paired.loc[split, k] if split in paired.index else float("nan") for k in _STATS},
            **_mass_columns(deltas, edited), **cost,
            "reported_on_llava_1_5_7b": _reported(name, run), "run": str(folder),
        })
    return rows


def _decoding_setting(decoding: dict | None) -> list[str]:
    """The command-line options of a run's decoding (none for greedy, the default); the seed last."""
    if not decoding:
        return []
    out = [f"--decoding {decoding['strategy']}"]
    for key, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("num_beams", 1)):
        if decoding.get(key, default) != default:
            out.append(f"--{key.replace('_', '-')} {decoding[key]:g}")
    return out + ([f"--seed {decoding['seed']}"] if decoding["strategy"] == "sample" else [])


def seed_spread(table: pd.DataFrame) -> list[str]:
    """One sentence per setting run with several seeds (the same settings but ``--seed``), per split: the
    accuracy's and Δ accuracy's mean ± standard deviation over the seeds, with their range."""
    if table.empty:
        return []
    first = table[table.label_set == table.label_set.iloc[0]].copy()
    first["unseeded"] = first.settings.str.replace(r" ?--seed -?\d+", "", regex=True)
    first["seed"] = first.settings.str.extract(r"--seed (-?\d+)", expand=False)
    out = []
    for (name, settings), g in first[first.seed.notna()].groupby(["intervention", "unseeded"], sort=False):
        seeds = sorted(set(g.seed), key=int)
        if len(seeds) < 2:
            continue
        parts = []
        for split, h in g.groupby("split", sort=False):
            acc, gain = 100 * h.accuracy, 100 * h.d_accuracy  # Δ: the paired one of the table
            parts.append(f"{split} accuracy {acc.mean():.1f} ± {acc.std(ddof=1):.1f} ({acc.min():.1f}–"
                         f"{acc.max():.1f}), Δ accuracy {gain.mean():+.1f} ± {gain.std(ddof=1):.1f} points")
        out.append(f"`{name}` {settings} over seeds {', '.join(seeds)} (mean ± standard deviation, range): "
                   + "; ".join(parts) + ".")
    return out


ALPHA = 0.05  # the findings' significance level for McNemar after Holm


def findings(table: pd.DataFrame) -> list[str]:
    """One sentence per run setting (intervention and settings, over its splits, under the first label set),
    generated from the table: what it did to accuracy with the paired interval, the fixed/broken counts with
    McNemar's p (Holm-adjusted), and the bias-control verdict. "gains" or "loses" on a split whose 95% interval
    lies above or below 0 *and* whose Holm-adjusted McNemar p is below :data:`ALPHA`; a split with only the
    first is said so; "no change beyond chance" where the interval holds 0; "changes no answer" where no
    answer moved."""
    if table.empty:
        return []
    first = table[table.label_set == table.label_set.iloc[0]]
    out = []
    for (name, settings), g in first.groupby(["intervention", "settings"], sort=False):
        g = g.sort_values("split")
        moved = int(sum(g[c].sum() for c in ("fixed", "broken", "derailed", "non_finite") if c in g))
        held = g.mcnemar_p_holm < ALPHA  # significant after Holm over the runs on the split
        gains = list(g.split[(g.d_accuracy_lo > 0) & held])
        losses = list(g.split[(g.d_accuracy_hi < 0) & held])
        unsure = list(g.split[((g.d_accuracy_lo > 0) | (g.d_accuracy_hi < 0)) & ~held])
        rest = [x for x in g.split if x not in gains + losses + unsure]
        if not moved:
            word = "changes no answer"
        elif len(gains) == len(g) or len(losses) == len(g):
            where = "every split" if len(g) > 1 else g.split.iloc[0]
            word = ("gains" if gains else "loses") + " accuracy on " + where
        else:
            word = "; ".join(part for part in (
                "gains accuracy on " + ", ".join(gains) if gains else "",
                "loses accuracy on " + ", ".join(losses) if losses else "",
                "an interval that excludes 0 but no significance after Holm on " + ", ".join(unsure) if unsure else "",
                "no change beyond chance on " + ", ".join(rest) if rest else "") if part)
        splits = ", ".join(f"{r.split} {_points(r.d_accuracy)} [{_points(r.d_accuracy_lo)}, "
                           f"{_points(r.d_accuracy_hi)}]" for r in g.itertuples())
        counts = ", ".join(f"{r.fixed}/{r.broken}" + (f"+{r.derailed}" if r.derailed else "") for r in g.itertuples())
        holm = ", ".join(_p(r.mcnemar_p_holm) for r in g.itertuples())
        from ..measurements.stats import EXPLAINED

        said = [lab + (" (doing worse than that shift)" if lab == EXPLAINED and hi < 0 else "")
                for lab, hi in zip(g.bias_label, g.gain_over_control_hi)]
        labels = sorted(set(said))
        s = (f"`{name}` {settings}: {word}. Δ accuracy per split, points with the 95% paired bootstrap interval: "
             f"{splits}; fixed/broken(+derailed) {counts}; McNemar p (Holm) {holm}")
        if moved:
            s += "; bias control: " + (labels[0] + (" on every split" if len(g) > 1 else "") if len(labels) == 1 else
                                       "; ".join(f"{split} {lab}" for split, lab in zip(g.split, said)))
        out.append(s + ".")
    return out + seed_spread(table)


def _layer_columns(table: pd.DataFrame, prefix: str) -> list[str]:
    return sorted((c for c in table.columns if c.startswith(prefix)), key=lambda c: int(c[len(prefix):]))


def layer_table(table: pd.DataFrame) -> pd.DataFrame:
    """The per-layer image mass, tidy: one row per (run, split, layer), baseline and Δ, edited or not."""
    rows = []
    for r in table.to_dict("records"):
        edited = _unspan(r["edited_layers"])
        for c in _layer_columns(table, "d_image_mass_L"):
            layer, d = int(c[14:]), r[c]
            if not math.isnan(d):  # this run has the layer
                base = r[f"baseline_image_mass_L{layer}"]
                rows.append({"intervention": r["intervention"], "settings": r["settings"], "split": r["split"],
                             "layer": layer, "edited": layer in edited, "baseline_image_mass": base,
                             "steered_image_mass": base + d, "d_image_mass": d, "run": r["run"]})
    return pd.DataFrame(rows, columns=["intervention", "settings", "split", "layer", "edited", "baseline_image_mass",
                                       "steered_image_mass", "d_image_mass", "run"])


def _signed(x: float) -> str:
    """``+0.0123``; ``0.0000`` when it rounds to zero (no sign), ``n/a`` for NaN."""
    return "n/a" if math.isnan(x) else "0.0000" if abs(x) < 5e-5 else f"{x:+.4f}"


def _non_finite(n: int) -> str:
    """The derailed cell's note on questions whose step overflowed and was dropped (none: nothing)."""
    return f" (+{n} non-finite: step not applied)" if n else ""


def _points(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def _interval(r, name: str) -> str:
    """``+1.2 [−0.3, +2.8]`` in points: the estimate and its 95% paired bootstrap interval."""
    lo, hi, est = (getattr(r, f"{name}_lo", math.nan), getattr(r, f"{name}_hi", math.nan),
                   getattr(r, name, math.nan))
    return "n/a" if math.isnan(est) else f"{_points(est)} [{_points(lo)}, {_points(hi)}]"


def _p(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2g}"


def markdown_table(table: pd.DataFrame) -> str:
    """The comparison as a Markdown table (accuracy in %, the reported column last).

    Beside the counts: Δ accuracy in points with its 95% paired bootstrap interval, the exact McNemar p with its
    Holm-adjusted value, the bias control's accuracy and the gain over it (interval), and the label. A partial
    merge says so in its split cell; with a second label set, a label-set column and the rank change lead."""
    sets = list(dict.fromkeys(table.label_set)) if "label_set" in table else []
    lead = ["labels", "rank (change)"] if len(sets) > 1 else []
    head = [*lead, "intervention", "settings", "split", "accuracy", "F1", "yes-ratio", "unchanged", "fixed", "broken",
            "derailed", "Δ image mass: edited layers (largest, layer)", "s/question (× bare)",
            "Δ accuracy [95%]", "McNemar p (Holm)", "bias control accuracy; gain over it [95%]", "yes/no shift?",
            "reported on LLaVA-1.5-7B (not measured here)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        mass = "n/a" if math.isnan(r.d_image_mass_max) else _signed(r.d_image_mass_edited) + (
            " (no layer moves)" if abs(r.d_image_mass_max) < 5e-5
            else f" ({_signed(r.d_image_mass_max)}, L{r.d_image_mass_max_layer})")
        cost = "n/a" if math.isnan(r.seconds_per_question) else (
            f"{r.seconds_per_question:.4f} ({r.cost_vs_bare:.1f}×)")
        split = r.split + (f" (partial: {r.partial})" if getattr(r, "partial", "") else "")
        control = "n/a" if math.isnan(getattr(r, "control_accuracy", math.nan)) else (
            f"{100 * r.control_accuracy:.1f}; {_interval(r, 'gain_over_control')}")
        cells = []
        if lead:
            change = "" if math.isnan(r.rank_change) else f" ({int(r.rank_change):+d})"
            cells = [r.label_set.replace("|", "/"), f"{r.rank}{change}"]
        cells += [f"`{r.intervention}`", r.settings.replace("|", "/"), split, f"{100 * r.accuracy:.1f}",
                  f"{100 * r.f1:.1f}", f"{100 * r.yes_ratio:.1f}", str(r.unchanged), str(r.fixed), str(r.broken),
                  f"{r.derailed}{_non_finite(r.non_finite)}", mass, cost, _interval(r, "d_accuracy"),
                  f"{_p(getattr(r, 'mcnemar_p', math.nan))} ({_p(getattr(r, 'mcnemar_p_holm', math.nan))})", control,
                  str(getattr(r, "bias_label", "n/a")), r.reported_on_llava_1_5_7b]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

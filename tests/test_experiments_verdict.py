"""The verdict's stages over a batch (mclcbf_diag.experiments.verdict), and the population's tables.

A verdict must not depend on which questions share its batch: each question of a batch of three
gets the causes, doses, sweep outcomes and fix outcomes it gets alone (a batch of one, as
``explain --sample`` runs it), and the aggregate's counts equal those counted here from the
batches of one. The aggregate's tables are also checked on hand-made rows.
"""

import math
from collections import Counter

import pandas as pd
import pytest

from mclcbf_diag import shipped
from mclcbf_diag.data import load_image, load_pope, resolve_image
from mclcbf_diag.experiments.evidence import KNOCKOUTS
from mclcbf_diag.experiments.sweep import sweep_summary
from mclcbf_diag.experiments.verdict import STAGES, Settings, explain_batch
from mclcbf_diag.interventions import resolve
from mclcbf_diag.population import aggregate as A

PICK = (2, 0, 1)  # fixed subset of the embedded adversarial split: one wrong answer, two right
K_MAX, BISECT = 4.0, 2


@pytest.fixture(scope="module", params=[[], ["span=detected", "clamp=none"]], ids=["seed-exp6", "unclamped"])
def pair(request, embedded_model):
    qs = load_pope(shipped.pope_file("adversarial"))
    sel = [qs[i] for i in PICK]
    images = [load_image(resolve_image(q, shipped.IMAGES)) for q in sel]
    iv = resolve("mclcbf", None, request.param)
    settings = Settings(k_max=K_MAX, bisect_steps=BISECT)
    alone = [explain_batch(embedded_model, [q], [im], iv, settings)[0] for q, im in zip(sel, images)]
    timings: dict = {}
    batch = explain_batch(embedded_model, sel, images, iv, settings, timings=timings)
    assert list(timings) == [name for name, _ in STAGES]  # every stage ran, in order
    return sel, alone, batch


def _top(causes):
    return next((c.id for c in causes if c.detected and c.decisive), "")


def test_a_question_gets_the_same_verdict_in_any_batch(pair):
    _, alone, batch = pair
    for one, v in zip(alone, batch):
        assert [(c.id, c.status, c.decisive) for c in one.causes] == [(c.id, c.status, c.decisive) for c in v.causes]
        assert one.row["top_cause"] == v.row["top_cause"] and one.row["outcome"] == v.row["outcome"]
        assert one.dose.k_star == v.dose.k_star and one.dose.k_derail == v.dose.k_derail
        assert list(one.dose.curve.k) == list(v.dose.curve.k)
        assert list(one.dose.curve.outcome) == list(v.dose.curve.outcome)
        # the same runs laid out in other batches: a batched matmul's summation order (tests/test_engine_units.py
        # bounds one step by its floor); the dose grid's unclamped step at up to k = 4 amplifies one float32
        # step of h near τ by 1/|τ − h| (up to ~1e4 here), the sweep's edits divide by masses down to 2e-4
        assert one.dose.curve.h_mean.to_numpy() == pytest.approx(v.dose.curve.h_mean.to_numpy(), abs=1e-4)
        assert one.dose.curve.theta_rel_max.to_numpy() == pytest.approx(v.dose.curve.theta_rel_max.to_numpy(),
                                                                        rel=1e-3, abs=1e-9)
        assert list(one.sweep.outcome) == list(v.sweep.outcome) and one.sweep_text == v.sweep_text
        assert one.sweep.margin.to_numpy() == pytest.approx(v.sweep.margin.to_numpy(), abs=1e-3)
        pd.testing.assert_frame_equal(one.fixes[["fix", "applicable", "outcome"]].astype(str),
                                      v.fixes[["fix", "applicable", "outcome"]].astype(str))
        for name in KNOCKOUTS:
            for metric in ("final_margin", "p_yes", "p_no"):
                want = one.records.query("condition == @name and metric == @metric").value
                got = v.records.query("condition == @name and metric == @metric").value
                assert len(want) == len(got) == 1 and got.iloc[0] == pytest.approx(want.iloc[0], abs=1e-3), name


def test_aggregate_counts_equal_the_single_runs(pair):
    sel, singles, batch = pair
    rows = [{**v.row, "split": "adversarial"} for v in batch]
    df = A.frame(rows)
    kinds = [one.kind for one in singles]
    causes = A.cause_table(df)
    for group in A.GROUPS:
        want = Counter(_top(ex.causes) or A.NONE_DECISIVE for ex, k in zip(singles, kinds) if k == group)
        got = {r.cause: r["count"] for _, r in causes[causes.group == group].iterrows()}
        assert got == dict(want)
        doses = A.dose_table(df, K_MAX)
        d = doses[doses.group == group]
        ks = [ex.dose.k_star for ex, k in zip(singles, kinds) if k == group]
        assert int(d[d.k_star.str.startswith("none")]["count"].sum()) == sum(k is None for k in ks)
        assert int(d["count"].sum()) == len(ks)
        masses = A.mass_table(df)
        m = masses[masses.group == group]
        mins = [sweep_summary(ex.sweep)["decision"]["min_target"] for ex, k in zip(singles, kinds) if k == group]
        for value, n in Counter(x for x in mins if math.isfinite(x)).items():
            assert int(m[m.decision_min_mass == f"{value:g}"]["count"].sum()) == n
    fixes = A.fix_table(df)
    for name in singles[0].fixes.fix:
        row = fixes[fixes.fix == name].iloc[0]
        for group in A.GROUPS:
            for o in A.OUTCOME_COLS:
                want = sum(ex.fixes.set_index("fix").loc[name, "outcome"] == o
                           and ex.fixes.set_index("fix").loc[name, "applicable"] == "yes"
                           for ex, k in zip(singles, kinds) if k == group)
                assert row[f"{group}_{o}"] == want, (name, group, o)


def _row(qid, kind, top="", k=None, mass=None, changes=0, after=False, outcome="unchanged", fixes=None, sweep=""):
    return {"split": "s", "question_id": qid, "kind": kind, "top_cause": top, "dose_k_star": k,
            "sweep_decision_min_mass": mass, "sweep_decision_changes": changes, "sweep_after_image_changes_it": after,
            "outcome": outcome, "sweep": sweep, **{f"fix:{f}": o for f, o in (fixes or {}).items()}}


def test_tables_on_hand_made_rows():
    rows = [_row(1, "wrong", "span_mismatch", 2.0, 0.3, 5, True, fixes={"span": "fixed"}, sweep="fu"),
            _row(2, "wrong", "span_mismatch", None, None, 0, True, fixes={"span": "unchanged"}, sweep="uu"),
            _row(3, "wrong", "", 0.5, None, 0, False, outcome="fixed", fixes={"span": "derailed"}, sweep="fd"),
            _row(4, "right", "clamp_limited", 1.0, 0.1, 2, False, fixes={"span": "broken"}, sweep="bu"),
            _row(5, "right", "", None, None, 0, False, outcome="derailed", fixes={"span": "n/a"}, sweep="ud")]
    df = A.frame(rows)
    c = A.cause_table(df)
    w = c[c.group == "wrong"].set_index("cause")
    assert w.loc["span_mismatch", "count"] == 2 and w.loc["span_mismatch", "share"] == pytest.approx(2 / 3)
    assert w.loc[A.NONE_DECISIVE, "count"] == 1 and w.loc["span_mismatch", "questions"] == "s:1, s:2"
    d = A.dose_table(df, 4.0).set_index(["group", "k_star"])["count"]
    assert d[("wrong", "0 < k ≤ 1")] == 1 and d[("wrong", "1 < k ≤ 2")] == 1 and d[("wrong", "none up to 4")] == 1
    assert d[("right", "0 < k ≤ 1")] == 1 and d[("right", "none up to 4")] == 1
    m = A.mass_table(df).set_index(["group", "decision_min_mass"])["count"]
    assert m[("wrong", "0.3")] == 1 and m[("wrong", "none")] == 2
    assert m[("wrong", "none at the decision token, some after the image")] == 1
    f = A.fix_table(df).set_index("fix")
    assert f.loc["(as configured)", "wrong_fixed"] == 1 and f.loc["(as configured)", "right_derailed"] == 1
    assert f.loc["(as configured)", "net"] == 0  # +1 fixed, −1 derailed right answer
    assert f.loc["span", "wrong_fixed"] == 1 and f.loc["span", "wrong_derailed"] == 1
    assert f.loc["span", "right_broken"] == 1 and f.loc["span", "right_n/a"] == 1 and f.loc["span", "net"] == 0
    s = A.setting_table(df, [("decision", None, "target", 0.3), ("decision", (1,), "factor", 2.0)])
    assert list(s.fixed) == [2, 0] and list(s.broken) == [1, 0] and list(s.derailed) == [0, 2]
    assert list(s.net) == [1, -1]  # setting 2 derails one right answer (question 5)
    text = A.answer(df, c, A.dose_table(df, 4.0), A.fix_table(df), s, 4.0)
    assert "3 wrong" in text and "fixes 1" in text and "to 0.3 in all layers would fix 2 and break 1" in text
    assert "1 of the wrong answers are fixed only when every text token after the image is steered" in text


# --------------------------------------------------------------------------- is the difference real (issue #31)
def _paired_rows(rng_seed=0, n=120, shift=None):
    """Hand-made verdict rows over two splits: a baseline margin per question, the intervention's answer either a
    constant shift of it (``shift``) or an oracle that fixes every third wrong answer."""
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    rows = []
    for i in range(n):
        label = "yes" if rng.random() < 0.5 else "no"
        m = float(rng.normal(1.0 if label == "yes" else -1.0, 1.5))
        base = "yes" if m > 0 else "no"
        new_m = m + shift if shift is not None else (m if base == label or i % 3 else (5.0 if label == "yes" else -5.0))
        new = "yes" if new_m > 0 else "no"
        rows.append({"split": "random" if i % 2 else "popular", "question_id": i, "label": label,
                     "kind": "right" if base == label else "wrong", "baseline_answer": base, "baseline_margin": m,
                     "baseline_valid": True, "steered_answer": new, "steered_margin": new_m, "steered_valid": True,
                     "outcome": "unchanged" if new == base else ("fixed" if new == label else "broken")})
    return rows


def test_paired_table_equals_the_stats_of_its_rows_and_lists_the_questions():
    from scipy.stats import binomtest

    from mclcbf_diag.measurements import stats as S

    rows = _paired_rows()
    p = A.paired_table(A.frame(rows)).set_index("split")
    assert list(p.index) == ["popular", "random", "all"]
    for split in ("popular", "random"):
        sel = [r for r in rows if r["split"] == split]
        want = S.paired_records(sel)
        assert {k: p.loc[split, k] for k in ("fixed_valid", "broken_valid", "d_accuracy_lo", "bias_label")} == \
            {k: want[k] for k in ("fixed_valid", "broken_valid", "d_accuracy_lo", "bias_label")}
        fixed = [f"{split}:{r['question_id']}" for r in sel if r["outcome"] == "fixed"]
        assert p.loc[split, "fixed_questions"] == ", ".join(fixed) and len(fixed) == want["fixed_valid"]
    b, c = int(p.loc["all", "fixed_valid"]), int(p.loc["all", "broken_valid"])
    assert (b, c) == (sum(r["outcome"] == "fixed" for r in rows), 0)
    assert p.loc["all", "mcnemar_p"] == pytest.approx(binomtest(b, b + c).pvalue, rel=1e-12)


def test_the_population_answer_states_significance_and_the_bias_control():
    from mclcbf_diag.measurements import stats as S

    for rows, label in ((_paired_rows(), S.BEYOND), (_paired_rows(shift=1.2), S.EXPLAINED)):
        df = A.frame(rows).assign(top_cause="", dose_k_star=None, sweep_decision_changes=0,
                                  sweep_after_image_changes_it=False)
        text = A.answer(df, A.cause_table(df), A.dose_table(df, 4.0), A.fix_table(df), pd.DataFrame(), 4.0,
                        paired=A.paired_table(df))
        pooled = A.paired_table(df).iloc[-1]
        assert "Is it real: paired over the 120 questions" in text and f": {label}." in text
        assert f"exact McNemar p = {pooled.mcnemar_p:.3g}" in text and pooled.bias_label == label


def test_population_page_links_the_paired_counts_to_their_questions(tmp_path):
    from mclcbf_diag.population import outputs as O
    from mclcbf_diag.population.page import write_page

    rows = [{**r, "top_cause": "", "dose_k_star": None, "sweep_decision_changes": 0, "sweep_decision_min_mass": None,
             "sweep_after_image_changes_it": False, "sweep": "", "fixes_fixed": [], "fixes_broken": [],
             "fixes_derailed": []} for r in _paired_rows()]
    rows[0]["split"] = "<b>odd</b>"
    t = O.tables(rows, {"k_max": 4.0, "sweep": [], "splits": ["popular", "random"]})
    assert "Is it real: paired over the 120 questions" in t["answer"]
    page = write_page(tmp_path / "p.html", t, {"splits": ["popular", "random"]}, lambda s, q: f"explain {q}", 5)
    text = page.read_text()
    p = t["paired"].set_index("split")
    assert "Is the difference real?" in text and "<b>odd</b>" not in text and "&lt;b&gt;odd&lt;/b&gt;" in text
    for i, split in enumerate(p.index):
        if p.loc[split, "fixed_valid"]:
            assert f'<a href="#paired-{i}-0">{p.loc[split, "fixed_valid"]}</a>' in text
            assert f'<details id="paired-{i}-0">' in text
            first = p.loc[split, "fixed_questions"].split(", ")[0]
            assert first.replace("<", "&lt;").replace(">", "&gt;") in text


def test_the_count_tables_fold_and_link_their_questions(tmp_path):
    """Each count table's questions (a cause shared by many wrong answers) are listed under the table, folded past
    the first few and linked to their pages; the table keeps the counts only."""
    from mclcbf_diag.population import outputs as O
    from mclcbf_diag.population.page import FIRST_IDS, write_page

    n = FIRST_IDS + 3
    rows = [_row(i, "wrong", "span_mismatch", None, None, 0, False, fixes={"span": "unchanged"}, sweep="u")
            for i in range(n)]
    rows = [{**r, "label": "no", "baseline_answer": "yes", "steered_answer": "yes", "baseline_margin": 1.0,
             "steered_margin": 1.0, "baseline_valid": True, "steered_valid": True, "fixes_fixed": [],
             "fixes_broken": [], "fixes_derailed": [], "sweep_decision_runs": 1} for r in rows]
    t = O.tables(rows, {"k_max": 4.0, "sweep": [], "splits": ["s"]})
    links = {"s:11": "pages/explain-s-11.html"}
    text = write_page(tmp_path / "p.html", t, {"splits": ["s"]}, lambda s, q: f"explain {q}", 5, links).read_text()
    causes = text[text.index("Decisive causes"):text.index("Dose-response")]
    assert "<th>questions</th>" not in causes  # the ids left the table
    assert f"<b>wrong · span_mismatch</b> ({n}):" in causes and "… and 3 more" in causes
    assert f"show all {n}</summary>" in causes and '<a href="pages/explain-s-11.html">s:11</a>' in causes


def test_id_lists_link_each_question_and_fold_past_the_first_few():
    from mclcbf_diag.population.page import FIRST_IDS, id_list

    ids = [f"adversarial:{i}" for i in range(FIRST_IDS + 5)]
    links = {"adversarial:1": "pages/explain-adversarial-1.html", "adversarial:14": "pages/x<&.html"}
    text = id_list(ids, links)
    head, _, rest = text.partition("<details>")
    assert head.startswith("<p>adversarial:0, <a href=\"pages/explain-adversarial-1.html\">adversarial:1</a>, ")
    assert head.endswith(f"adversarial:{FIRST_IDS - 1}, … and 5 more</p>")
    assert rest.startswith(f"<summary>show all {FIRST_IDS + 5}</summary>")
    assert '<a href="pages/x&lt;&amp;.html">adversarial:14</a>' in rest and "adversarial:13" not in head
    assert id_list(ids[:3]) == "<p>adversarial:0, adversarial:1, adversarial:2</p>"  # short: no fold, no links


def test_pages_select_wrong_changed_all_or_the_first_n():
    from mclcbf_diag.population.outputs import page_selection

    def row(qid, kind, outcome="unchanged", fixed=(), broken=(), derailed=()):
        return {"split": "s", "question_id": qid, "kind": kind, "outcome": outcome, "fixes_fixed": list(fixed),
                "fixes_broken": list(broken), "fixes_derailed": list(derailed)}

    df = A.frame([row(1, "wrong"), row(2, "right"), row(3, "right", "broken"), row(4, "wrong", fixed=["span"]),
                  row(5, "right", derailed=["site"]), row(6, "right")])
    picked = {p: list(page_selection(df, p).question_id) for p in ("wrong", "changed", "all", "2")}
    assert picked == {"wrong": [1, 4], "changed": [3, 4, 5], "all": [1, 2, 3, 4, 5, 6], "2": [1, 2]}


def test_the_best_fix_carries_its_paired_statistics():
    from scipy.stats import binomtest

    from mclcbf_diag.measurements import stats as S

    # ten labelled questions: the baseline gets 0–5 right; under fix "f" question 6 is fixed, 1 and 2 are broken,
    # 3 derails, 9 cannot run it (n/a); a fix "g" changes nothing
    rows = []
    for i in range(10):
        label = "yes" if i % 2 else "no"
        right = i < 6
        base = label if right else ("no" if label == "yes" else "yes")
        fx = {6: "fixed", 1: "broken", 2: "broken", 3: "derailed", 9: "n/a"}.get(i, "unchanged")
        rows.append({"split": "adversarial", "question_id": i, "label": label, "baseline_answer": base,
                     "baseline_valid": True, "baseline_margin": 2.0 if base == "yes" else -2.0, "fix:f": fx,
                     "fix:g": "unchanged"})
    df = pd.DataFrame(rows)
    got = A.fix_paired(df, "f")
    # by hand: nine questions it applies to; 1 fixed, 3 broken or derailed (a derailed answer counts as wrong)
    assert (got["n"], got["fixed_valid"], got["broken_valid"]) == (9, 1, 3)
    assert got["d_accuracy"] == pytest.approx(-2 / 9)
    assert got["mcnemar_p"] == pytest.approx(binomtest(1, 4).pvalue, rel=1e-12)
    new = ["no" if r["baseline_answer"] == "yes" and r["fix:f"] in ("fixed", "broken") else
           "yes" if r["fix:f"] in ("fixed", "broken") else r["baseline_answer"] for r in rows[:9]]
    want = S.paired([r["label"] for r in rows[:9]], [r["baseline_answer"] for r in rows[:9]], [True] * 9,
                    [r["baseline_margin"] for r in rows[:9]], new, [r["fix:f"] != "derailed" for r in rows[:9]])
    assert {k: got[k] for k in ("d_accuracy_lo", "d_accuracy_hi", "bias_label")} == \
        {k: want[k] for k in ("d_accuracy_lo", "d_accuracy_hi", "bias_label")}
    assert A.fix_paired(df, "g")["fixed_valid"] == 0 and A.fix_paired(df, "missing") is None

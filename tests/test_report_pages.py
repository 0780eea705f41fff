"""pages.py and the pope page helpers: what the pages say, in words and rounded numbers."""

import pandas as pd
import pytest

from mclcbf_diag import shipped
from mclcbf_diag.interventions.mclcbf import MCLCBF
from mclcbf_diag.pope import metrics as M
from mclcbf_diag.report import pages

SUMMARY = {"question_id": 26, "answer_before": "yes", "answer_after": "yes", "outcome": "unchanged",
           "margin_before": 0.8208501935005188, "margin_after": 0.8208501935005188, "p_yes_before": 0.6938,
           "p_no_before": 0.3053, "p_yes_after": 0.6938, "p_no_after": 0.3053, "top_before": "Yes", "top_after": "Yes",
           "valid_before": True, "valid_after": True, "nonfinite_values": 0, "layers_steered": [1, 2, 3],
           "layers_fired": [], "h_before_mean": 0.99839812, "h_after_mean": 0.99839812, "max_theta_rel": 0.0,
           "index": 25, "label": "no", "question": "Is there a truck in the image?"}


def test_headline_rounds_to_three_digits_and_says_right_or_wrong():
    lines = pages.headline(SUMMARY, intervention=MCLCBF())  # the barrier's lines are MC-LCBF's
    assert lines[0].startswith("Outcome: unchanged (the answer stays yes). Label: no; baseline answer yes (wrong)")
    assert "+0.821 → +0.821" in lines[1] and "0.999 → 0.999" in lines[1]  # 0.6938 + 0.3053
    assert "0.998 → 0.998" in lines[2] and "fired at layers: none" in lines[2] and "1, 2, 3" in lines[2]
    assert lines[3] == "Largest step ‖θ*‖/‖x‖: 0 (no step was taken)."
    assert not any("0.82085" in x for x in lines)


def test_summary_frame_pairs_baseline_and_intervened():
    f = pages.summary_frame(SUMMARY, MCLCBF())
    row = f[f.quantity == "margin logit(Yes) − logit(No)"].iloc[0]
    assert row.baseline == row.intervened == SUMMARY["margin_before"]  # full precision; the page rounds
    assert list(f.columns) == ["quantity", "baseline", "intervened"] and "generated text" not in set(f.quantity)
    assert f[f.quantity == "layers that fired"].baseline.iloc[0] == []
    # the question's id and its index in the split (what --sample selects) are two rows
    single = f.set_index("quantity").baseline
    assert single["question_id"] == 26 and single["index in the split (--sample)"] == 25


def test_verdict_items_join_a_cause_and_its_test():
    text = "Q line\n[observed] A.\n  margin_unmoved, strength 1; test: observed.\nRanking: x.\noutcome: unchanged"
    assert pages.verdict_items(text) == ["Q line", "[observed] A. — margin_unmoved, strength 1; test: observed.",
                                         "Ranking: x.", "outcome: unchanged"]


def _fixes(counts):
    return pd.DataFrame({"fix": ["grad_dtype", "span", "all"],
                         "applicable": ["not applicable: float32 already", "yes", "yes"],
                         "outcome": ["unchanged", "unchanged", "fixed" if counts else "unchanged"],
                         "counts": [False, False, counts]})


def test_fixes_sentence_never_reads_all_as_every_fix():
    assert pages.fixes_sentence(_fixes(True), "wrong") == (
        "1 of the 2 fixes that ran fix the answer (wrong → right, a valid Yes/No output): all fixes together. "
        "Not applicable (not run): grad_dtype.")
    none = pages.fixes_sentence(_fixes(False), "wrong")
    assert none.startswith("None of the 2 fixes that ran fixes the answer") and ": all" not in none
    right = _fixes(False).assign(outcome=["unchanged", "broken", "unchanged"])
    assert "would break or derail it: span (broken)" in pages.fixes_sentence(right, "right")


def test_causes_table_keeps_detected_causes_with_readable_headers():
    frame = pd.DataFrame([{"rank": 1, "id": "a", "detected": True, "status": "observed", "strength": 1.0,
                           "sentence": "s", "test": "t", "threshold": "th", "evidence": "{\"x\": 1}"},
                          {"rank": 2, "id": "b", "detected": False, "status": "absent", "strength": 0.0,
                           "sentence": "s", "test": "", "threshold": "th", "evidence": "{}"}])
    t = pages.causes_table(frame)
    assert list(t.cause) == ["a"] and "strength (0–1)" in t.columns and "threshold" not in t.columns


# ----------------------------------------------------------------------------- pope page
def _row(qid, dm, fired=(), outcome="unchanged", split="adversarial"):
    return {"split": split, "question_id": qid, "text": f"q{qid}", "label": "yes", "baseline_answer": "yes",
            "steered_answer": "yes" if outcome == "unchanged" else "no", "baseline_margin": 1.0,
            "steered_margin": 1.0 + dm, "outcome": outcome, "layers_fired": list(fired)}


def test_noise_level_margin_changes_are_flagged_not_plotted():
    text, fig = M.margin_changes([_row(1, 4e-6), _row(2, -2e-7), _row(3, 0.0)])
    assert fig is None
    assert text == ("Every margin change is below 0.0001 (largest |Δ margin| 4e-06): changes below 0.0001 are "
                    "floating-point noise; nothing fired at any question.")
    text, fig = M.margin_changes([_row(1, 4e-6), _row(2, -0.5, fired=[1]), _row(3, 0.25, fired=[2])])
    assert fig is not None and sorted(fig.data[0].x) == [-0.5, 0.25]  # the noise row is left out
    assert "1 of 3 margin changes are below 0.0001" in text and "fired at 2 questions" in text


def test_accuracy_axes_zoom_to_the_values():
    metrics = pd.DataFrame({"split": ["adversarial"] * 2, "condition": ["baseline", "steered"],
                            "accuracy": [0.931, 0.926], "f1": [0.935, 0.93], "yes_ratio": [0.553, 0.568]})
    fig = M.metrics_figure(metrics)
    lo, hi = fig.layout.yaxis.range
    assert 90 < lo < 92.6 and 93.1 < hi < 95  # not 0–100: a 0.5-point change stays visible
    assert list(fig.data[0].y) == pytest.approx([93.1])


def test_one_flip_partition_at_a_time():
    flips = pd.DataFrame({"split": ["adversarial"] * 2, "answer": ["logit", "text"], "n": [10, 10],
                          "unchanged": [7, 8], "fixed": [1, 1], "broken": [1, 1], "derailed": [1, 0],
                          "flipped": [3, 2], "yes_to_no": [2, 1], "no_to_yes": [1, 1]})
    fig = M.partition_figure(flips)
    visible = [t for t in fig.data if t.visible]
    assert [t.name for t in visible] == ["unchanged", "fixed", "broken", "derailed"]
    assert sum(t.y[0] for t in visible) == 10  # one partition: every question once
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["outcome (logit answers)", "sign change (logit answers)",
                                          "outcome (text answers)", "sign change (text answers)"]
    for b in buttons:
        shown = [t for t, v in zip(fig.data, b.args[0]["visible"]) if v]
        assert sum(t.y[0] for t in shown) == 10


def test_changed_questions_with_their_explain_command():
    identity = {"model": "embedded", "dtype": "float32", "intervention": "mclcbf", "preset": "fixed",
                "overrides": ["tau=0.6", "tokens=after_image"], "splits": ["adversarial", "random"],
                "pope_files": [str(shipped.pope_file("adversarial")), "/data/my pope.json"],
                "prompt": "USER: <image>\n{question}\nASSISTANT:"}
    rows = [_row(1, 0.0), _row(2, -3.0, fired=[1], outcome="fixed"),
            _row(9, -2.0, fired=[1], outcome="broken", split="random")]
    table = M.changed_questions(rows, identity)
    assert list(table.question_id) == [2, 9]
    assert table["explain it"].iloc[0] == ("mclcbf-diag explain --question-id 2 --preset fixed --set tau=0.6 "
                                           "--set tokens=after_image")
    assert table["explain it"].iloc[1].startswith("mclcbf-diag explain --question-id 9 --pope-file "
                                                  "'/data/my pope.json' --image-dir /data --preset fixed")
    assert table["margin (baseline → steered)"].iloc[0] == "+1 → -2"


def test_overlay_token_checked_before_the_weights_load(monkeypatch, capsys):
    from mclcbf_diag.cli import common, main

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the --overlay-token check")

    monkeypatch.setattr(common, "weights_from_args", no_weights)
    for bad, why in (("  ", "overlay-token"), ("5000", "outside the prompt"), ("0", "not after the image"),
                     ("zebra-crossing", "no token after the image")):
        assert main(["trace", "--sample", "42", "--overlay-token", bad]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1


def test_trace_page_names_each_steps_tokens_and_sums_up_the_steps(embedded_model):
    from mclcbf_diag import barrier as B
    from mclcbf_diag.data import load_image, load_pope, resolve_image
    from mclcbf_diag.experiments.trace import trace_sample
    from mclcbf_diag.report.html import NoFigure, Section

    q = load_pope(shipped.pope_file("adversarial"))[42]
    image = load_image(resolve_image(q, shipped.IMAGES))
    import dataclasses

    never = dataclasses.replace(B.get_preset("seed-exp6"), tau_prefill=0.0, tau_decode=0.0)  # h ≥ 0 = τ: never fires
    result = trace_sample(embedded_model, q, image, never, max_new_tokens=2)
    sections = pages.trace_sections(embedded_model, result, image, "USER: <image>\n{question}\nASSISTANT:")
    assert all(isinstance(s, Section) for s in sections)
    heads = [s.heading for s in sections]
    assert heads[:4] == ["Outcome", "Where the decision token looks", "Summary", "Across generation steps"]
    gen = [embedded_model.processor.tokenizer.decode([int(t)]).strip()
           for t in result.baseline.generated[0, result.baseline.prompt_len:]]
    assert heads[4].endswith(f"generates {gen[0]!r}") and not sections[4].collapsed
    assert heads[5] == f"Per-layer plots, decode step 1: reads {gen[0]!r}, generates {gen[1]!r}"
    assert sections[5].collapsed
    table = sections[3].table
    assert list(table["decode step"]) == [0, 1] and list(table["generates (baseline)"].str.strip()) == gen
    # the barrier never fires (τ = 0): the empty plots carry their reason
    empties = [f for f in sections[4].figures if isinstance(f, NoFigure)]
    assert empties and all("did not fire" in f.reason for f in empties)

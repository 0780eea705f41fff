"""Why a decoding-level method left an answer: its rules on hand-made records, and one real explain run."""

import math

from test_diagnosis_diagnose import LABEL_NO, LABEL_YES, _row, frame

from mclcbf_diag.diagnosis.counterfactual import Counterfactual
from mclcbf_diag.diagnosis.diagnose import diagnose, verdict_text
from mclcbf_diag.diagnosis.rulebook import decisiveness
from mclcbf_diag.interventions.vcd import VCD


def records(model, aux, contrast, final, cut_yes=0, cut_no=0, label=LABEL_YES):
    """One question's records as a decoding method writes them (no layer records: it changed no activation)."""
    rows = [_row("baseline", -1, "final_margin", model), _row("baseline", -1, "answer_yes", model > 0),
            _row("steered", -1, "final_margin", final), _row("steered", -1, "answer_yes", final > 0),
            _row("steered", -1, "decoding_model_margin", model), _row("steered", -1, "decoding_aux_margin", aux),
            _row("steered", -1, "decoding_contrast_margin", contrast),
            _row("steered", -1, "decoding_cut_yes", cut_yes), _row("steered", -1, "decoding_cut_no", cut_no), label]
    return frame(rows)


def found(causes):
    return [c.id for c in causes if c.detected]


def test_a_contrast_that_leaves_the_sign_is_found_with_its_direction():
    # wrong No (label yes): the noised view says No less firmly (−1 against −2), so the contrast
    # 2·(−2) − (−1) = −3 pushes further to No, away from the right answer
    causes = diagnose(records(-2.0, -1.0, -3.0, -3.0), intervention=VCD())
    assert found(causes) == ["contrast_cancels", "margin_unmoved"]
    c = causes[0]
    assert c.evidence["contrast_shift"] == -1.0 and "away from the other answer" in c.sentence
    assert "present, not tested" in verdict_text(causes)
    # the view says No more firmly (−3): the contrast moves toward Yes, by 1 of the 2 needed
    toward = next(c for c in diagnose(records(-2.0, -3.0, -1.0, -1.0), intervention=VCD())
                  if c.id == "contrast_cancels")
    assert toward.detected and "toward the other answer, but only 1 of the 2 a change needs" in toward.sentence
    assert toward.strength == 0.5
    # a right answer kept is no failure; a contrast that flips the sign is no failure of the contrast
    assert "contrast_cancels" not in found(diagnose(records(-2.0, -1.0, -3.0, -3.0, label=LABEL_NO),
                                                    intervention=VCD()))
    assert "contrast_cancels" not in found(diagnose(records(-2.0, -5.0, 1.0, 1.0), intervention=VCD()))


def test_a_cutoff_that_rules_out_the_flipped_token_is_found_and_undone_by_removing_it():
    # the contrast favours Yes (+1.5) but the cutoff ruled Yes out: the answer stays No (−inf)
    df = records(-2.0, -6.0, 1.5, -math.inf, cut_yes=1)
    causes = diagnose(df, intervention=VCD())
    assert "cutoff_removes_flip" in found(causes)
    assert "ruled Yes out" in next(c for c in causes if c.id == "cutoff_removes_flip").sentence
    # its counterfactual is the run without the cutoff, judged on the answer
    seen = []

    def tester(spec):
        seen.append(spec)
        if spec is None:
            return {"margin": -math.inf, "outcome": "unchanged", "finite": True}
        fixed = spec.knobs == {"beta": 0.0}
        return {"margin": 1.5 if fixed else -math.inf, "outcome": "fixed" if fixed else "unchanged", "finite": True}

    tested = diagnose(df, intervention=VCD(), tester=tester)
    cut = next(c for c in tested if c.id == "cutoff_removes_flip")
    assert cut.decisive is True and Counterfactual(why="beta = 0 (no plausibility cutoff)", knobs={"beta": 0.0}) in seen
    assert verdict_text(tested).splitlines()[1].startswith("[decisive]")


def test_the_contrast_search_is_graded_and_a_negative_claim_names_every_strength():
    df = records(-2.0, -1.0, -3.0, -3.0)

    def tester(spec):
        return {"margin": -3.0, "outcome": "unchanged", "finite": True}

    c = next(c for c in diagnose(df, intervention=VCD(), tester=tester) if c.id == "contrast_cancels")
    assert c.decisive is False and "× 2, 4, 8, 16, 32, 64" in c.test


def test_an_infinite_margin_is_an_answer_and_going_to_or_from_it_is_a_change():
    assert decisiveness({"margin": -math.inf, "outcome": "unchanged"}, {"margin": -4.0, "outcome": "unchanged"},
                        -2.0, "answer") == (True, ["margin -inf → -4"])
    assert decisiveness({"margin": -math.inf, "outcome": "unchanged"}, {"margin": -math.inf, "outcome": "unchanged"},
                        -2.0, "answer") == (False, [])


def test_a_split_explained_under_a_decoding_method_keeps_its_infinite_margins(tmp_path, capsys):
    import json

    from mclcbf_diag.cli import main

    assert main(["explain", "--split", "adversarial", "--limit", "3", "--intervention", "vcd", "--out",
                 str(tmp_path / "e")]) == 0
    assert "the intervention (vcd) fixes" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "e" / "answers.jsonl").read_text().splitlines()]
    # VCD's cutoff (β 0.2) rules the losing answer out on these confident questions: ±inf, kept as a margin
    assert all(r["steered_margin"] is not None for r in rows)
    assert any(math.isinf(r["steered_margin"]) for r in rows)
    assert all(math.copysign(1, r["steered_margin"]) == math.copysign(1, r["baseline_margin"]) for r in rows)

"""Sampled first-token answers: the warping against transformers' own, the draw, and seeded POPE runs."""

import json
import math

import pytest
import torch
from cli_refusals import refused, refused_here
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mclcbf_diag.cli import main
from mclcbf_diag.errors import UserError
from mclcbf_diag.measurements.sampling import Decoding, sample_token, uniform, warp


@pytest.mark.parametrize("t, k, p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8), (2.0, 20, 0.5),
                                     (0.5, 3, 0.95)])
def test_warping_is_transformers_own(t, k, p):
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 3
    ref = scores.clone()
    ids = torch.zeros(3, 1, dtype=torch.long)
    if t != 1.0:
        ref = TemperatureLogitsWarper(t)(ids, ref)
    if k:
        ref = TopKLogitsWarper(k)(ids, ref)
    if p < 1:
        ref = TopPLogitsWarper(p)(ids, ref)
    got = warp(scores, t, k, p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.allclose(got[torch.isfinite(got)], ref[torch.isfinite(ref)], atol=1e-6)


def test_the_draw_follows_the_distribution_and_never_a_ruled_out_token():
    scores = torch.tensor([0.0, 1.0, -math.inf, 2.0, -1.0])
    p = torch.softmax(scores, -1)
    n = 4000
    draws = torch.tensor([sample_token(scores, Decoding("sample", seed=7), f"q{i}") for i in range(n)])
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[2] == 0
    # within 4 standard errors of each probability
    assert bool(((freq - p.double()).abs() <= 4 * (p.double() * (1 - p.double()) / n).sqrt() + 1e-9).all()), freq


def test_one_question_draws_the_same_u_everywhere():
    assert uniform(3, "adversarial:7") == uniform(3, "adversarial:7") != uniform(4, "adversarial:7")
    scores = torch.randn(30, generator=torch.Generator().manual_seed(0))
    d = Decoding("sample", temperature=1.5, seed=3)
    # common random numbers: the same distribution gives the same token in both conditions
    assert sample_token(scores, d, "k") == sample_token(scores.clone(), d, "k")
    # a temperature near 0 is the greedy token
    assert sample_token(scores, Decoding("sample", temperature=1e-4, seed=3), "k") == int(scores.argmax())


@pytest.mark.parametrize("kwargs, fragment", [
    ({"strategy": "sample", "temperature": 0.0}, "--temperature 0.0"),
    ({"strategy": "sample", "top_p": 0.0}, "--top-p 0.0"),
    ({"strategy": "sample", "top_k": -1}, "--top-k -1"),
    ({"strategy": "beam", "num_beams": 1}, "needs --num-beams 2"),
    ({"strategy": "sample", "num_beams": 3}, "applies to --decoding beam only"),
    ({"strategy": "greedy", "temperature": 0.5}, "apply to --decoding sample only"),
])
def test_settings_that_do_not_fit_are_refused(kwargs, fragment):
    with pytest.raises(UserError, match=fragment.replace("-", r"\-").replace(".", r"\.")):
        Decoding(**kwargs)
    assert Decoding().identity() is None and Decoding("sample").identity()["seed"] == 0
    assert Decoding().describe() == "greedy first token"


def test_refusals_arrive_before_the_model(tmp_path, capsys):
    refused(["pope", "--decoding", "beam", "--num-beams", "3", "--out", str(tmp_path / "p")], tmp_path,
            "--decoding beam chooses generated text", "--generate N")
    refused(["pope", "--decoding", "sample", "--temperature", "0", "--out", str(tmp_path / "p")], tmp_path,
            "--temperature 0.0: must be > 0")
    # refused once the intervention is known (not timed): in this process, its imports already warm
    refused_here(capsys, ["pope", "--intervention", "opera", "--generate", "4", "--out", str(tmp_path / "p")],
                 "OPERA generates by its beam search", "--decoding beam --num-beams 5")
    refused_here(capsys, ["pope", "--intervention", "dola", "--generate", "4", "--decoding", "beam", "--num-beams", "3",
                          "--out", str(tmp_path / "p")], "a beam search is OPERA's alone")
    assert not (tmp_path / "p").exists()


def _answers(folder):
    rows = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
    return sorted((r["question_id"], r["baseline_answer"], r["steered_answer"], r["baseline_sampled_token"],
                   r["steered_sampled_token"], r["outcome"]) for r in rows)


def test_sampled_pope_runs_are_reproducible_and_a_seed_gives_a_spread(tmp_path, capsys):
    def pope(seed, name):
        assert main(["pope", "--split", "adversarial", "--limit", "12", "--batch-size", "5", "--intervention", "vcd",
                     "--decoding", "sample", "--temperature", "3", "--seed", str(seed), "--out",
                     str(tmp_path / name)]) == 0
        return _answers(tmp_path / name)

    a, again, other = pope(1, "a"), pope(1, "b"), pope(2, "c")
    assert a == again  # the same seed: the same answers, whatever the batch (5 here, so batches differ in size)
    assert a != other  # another seed draws otherwise at temperature 3
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["decoding"] == {"strategy": "sample", "temperature": 3.0, "top_p": 1.0, "top_k": 0, "num_beams": 1,
                               "seed": 1}
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "`vcd` --decoding sample --temperature 3 over seeds 1, 2 (mean ± standard deviation, range)" in out


def test_an_intervention_that_changes_nothing_leaves_every_sampled_answer(tmp_path):
    # common random numbers: both conditions draw with the question's u, so a ×1 knockout changes no token
    assert main(["pope", "--split", "adversarial", "--limit", "12", "--batch-size", "6", "--intervention", "knockout",
                 "--set", "factor=1", "--decoding", "sample", "--temperature", "3", "--seed", "5", "--out",
                 str(tmp_path / "k")]) == 0
    rows = _answers(tmp_path / "k")
    assert all(r[3] == r[4] and r[5] == "unchanged" for r in rows)
    assert any(r[3] != rows[0][3] for r in rows)  # and the draws are not all one token


def _rows(folder):
    return sorted((json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()),
                  key=lambda r: r["question_id"])


def test_seeds_from_one_pass_write_what_each_seed_alone_writes(tmp_path):
    common = ["pope", "--split", "adversarial", "--limit", "12", "--batch-size", "5", "--intervention", "vcd",
              "--decoding", "sample", "--temperature", "3"]
    for s in (1, 2, 3):
        assert main([*common, "--seed", str(s), "--out", str(tmp_path / f"alone-{s}")]) == 0
    assert main([*common, "--seeds", "1,2", "--out", str(tmp_path / "together-{seed}")]) == 0
    for s in (1, 2):  # every field of every row, run_id and image masses included; and the identity
        assert _rows(tmp_path / f"together-{s}") == _rows(tmp_path / f"alone-{s}")
        assert (json.loads((tmp_path / f"together-{s}" / "run.json").read_text())
                == json.loads((tmp_path / f"alone-{s}" / "run.json").read_text()))
    assert _rows(tmp_path / "together-1") != _rows(tmp_path / "together-2")
    before = {s: (tmp_path / f"together-{s}" / "answers.jsonl").read_bytes() for s in (1, 2)}
    # resumed with a third seed: only seed 3 lacks answers; the finished folders are left as they were
    assert main([*common, "--seeds", "1,2,3", "--out", str(tmp_path / "together-{seed}")]) == 0
    assert _rows(tmp_path / "together-3") == _rows(tmp_path / "alone-3")
    assert all((tmp_path / f"together-{s}" / "answers.jsonl").read_bytes() == before[s] for s in (1, 2))
    timing = json.loads((tmp_path / "together-3" / "timing.json").read_text())["sessions"]
    assert sum(t["questions"] for t in timing) == 12


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "1,2", "--out", "x"], "put {seed} in --out"),
    (["--seeds", "1", "--out", "x-{seed}"], "two or more different seeds"),
    (["--seeds", "1,1", "--out", "x-{seed}"], "two or more different seeds"),
    (["--seeds", "1,b", "--out", "x-{seed}"], "comma-separated integers"),
    (["--seeds", "1,2", "--seed", "3", "--out", "x-{seed}"], "give one of them"),
    (["--seeds", "1,2", "--generate", "4", "--out", "x-{seed}"], "run one pope per --seed S"),
])
def test_seeds_that_do_not_fit_are_refused_before_the_model_loads(tmp_path, capsys, extra, message):
    args = ["pope", "--split", "adversarial", "--limit", "4", "--decoding", "sample", *extra]
    args = [a if a not in ("x", "x-{seed}") else str(tmp_path / a) for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_seeds_need_sampling(capsys):
    assert main(["pope", "--split", "adversarial", "--seeds", "1,2", "--out", "x-{seed}"]) == 2
    assert "add --decoding sample" in capsys.readouterr().err


def test_seeds_read_the_questions_once_and_check_each_seeds_folder(tmp_path, capsys, monkeypatch):
    """The model-free checks of the questions (files, images, prompts) run once for all seeds; each seed's folder is
    checked on its own: a later seed's folder holding another command's run is refused before the model loads."""
    from mclcbf_diag.pope import jobs

    read = []
    files = jobs.question_files
    monkeypatch.setattr(jobs, "question_files", lambda *a: read.append(a) or files(*a))
    (tmp_path / "o-2").mkdir()
    (tmp_path / "o-2" / "trace.html").write_text("a trace")
    assert main(["pope", "--split", "adversarial", "--limit", "4", "--decoding", "sample", "--seeds", "1,2,3",
                 "--out", str(tmp_path / "o-{seed}")]) == 2
    assert "o-2 holds a trace" in capsys.readouterr().err
    assert len(read) == 1 and not (tmp_path / "o-1").exists() and not (tmp_path / "o-3").exists()

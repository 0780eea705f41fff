"""What the commands share (mclcbf_diag.cli.common): checks that run before any model loads."""

import argparse
import json

import pandas as pd
import pytest

from mclcbf_diag.cli import common as C
from mclcbf_diag.errors import UserError


def test_parser_errors_are_one_line_with_the_attach_hint(capsys):
    p = C.Parser(prog="mclcbf-diag x")
    p.add_argument("--shard")
    with pytest.raises(SystemExit):
        p.parse_args(["--shard", "-1/2"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be attached: --shard=VALUE" in err and "usage:" not in err


@pytest.mark.parametrize("item, fragment", [
    ("layers=0:100000000000", "is too large (integers here are at most 1000000)"),
    ("fixed_span=1,99999999", "is too large"),
    ("layers=0:5000", "lists 5000 layers, more than 4096"),
])
def test_override_sizes_are_bounded_before_parsing(item, fragment):
    with pytest.raises(UserError, match=r"--set " + item.split("=")[0]) as info:
        C.check_override_sizes([item])
    assert fragment in str(info.value)
    C.check_override_sizes(["layers=0:4096", "tau=1e30", "fixed_span=1,20"])  # within the bounds: no error


def test_local_depth_reads_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 7}}))
    assert C.local_depth(str(tmp_path)) == 7
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 5}))
    assert C.local_depth(str(tmp_path)) == 5
    for broken in ("{", "[1]", json.dumps({"num_hidden_layers": 0})):
        (tmp_path / "config.json").write_text(broken)
        assert C.local_depth(str(tmp_path)) is None  # left to the loader's own error
    assert C.local_depth(str(tmp_path / "missing")) is None
    shipped = json.loads((C.shipped.WEIGHTS / "config.json").read_text())
    assert C.local_depth(None) == shipped["text_config"]["num_hidden_layers"]


def _args(**kw):
    base = {"overrides": [], "intervention": "mclcbf", "preset": None, "model": None, "threads": None}
    return argparse.Namespace(**{**base, **kw})


def test_early_checks_layers_against_the_depth(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 3}}))
    with pytest.raises(UserError, match=r"layers \[3, 4\] out of range: the model has layers 0..2"):
        C.early_checks(_args(model=str(tmp_path), overrides=["layers=1:5"]))
    C.early_checks(_args(model=str(tmp_path), overrides=["layers=0:3"]))
    with pytest.raises(UserError, match="unknown preset 'x' for mclcbf; valid presets: "):
        C.early_checks(_args(preset="x"))
    with pytest.raises(UserError, match="--threads 0: give a positive number"):
        C.check_threads(_args(threads=0))


def test_prompt_and_question_selection():
    with pytest.raises(UserError, match="lacks <image>"):
        C.check_prompt(argparse.Namespace(prompt="USER: {question}"))
    args = argparse.Namespace(pope_file=None, image_dir=None, split="random", sample=None, question_id=None)
    q, image_dir = C.question_from_args(args)
    assert args.sample == 0 and image_dir == C.shipped.IMAGES  # the first question by default
    from mclcbf_diag.data import load_pope

    assert q == load_pope(C.shipped.pope_file("random"))[0]


def test_sample_is_documented_as_an_index_and_grouped_as_the_question_selection():
    p = argparse.ArgumentParser()
    C.sample_options(p)
    group = next(g for g in p._action_groups if any("--sample" in a.option_strings for a in g._group_actions))
    assert group.title == "question selection"
    assert {"--split", "--pope-file", "--question-id"} <= {o for a in group._group_actions for o in a.option_strings}
    sample = next(a for a in group._group_actions if "--sample" in a.option_strings)
    assert "0-based index" in sample.help and "question_id" in sample.help


def test_max_new_tokens_limit_follows_the_environment(monkeypatch):
    monkeypatch.delenv("MCLCBF_DIAG_MAX_NEW_TOKENS", raising=False)
    assert C.max_new_tokens_limit() == C.MAX_NEW_TOKENS
    monkeypatch.setenv("MCLCBF_DIAG_MAX_NEW_TOKENS", "7")
    assert C.max_new_tokens_limit() == 7


def test_write_frame_round_trips_and_one_line(tmp_path):
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    C.write_frame(frame, tmp_path / "f.parquet", "parquet")
    C.write_frame(frame, tmp_path / "f.csv", "csv")
    assert pd.read_parquet(tmp_path / "f.parquet").equals(frame)
    assert pd.read_csv(tmp_path / "f.csv").equals(frame)
    assert C.one_line("first\n   second  \n\nthird") == "first second third"
    assert C.summary_table({"k": 1.5}).to_dict("list") == {"quantity": ["k"], "value": ["1.5"]}


def test_early_checks_read_every_interventions_presets_and_knobs_without_torch(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'x' for vaf; valid presets: paper, image-only"):
        C.early_checks(_args(intervention="vaf", preset="x"))
    with pytest.raises(UserError, match="unknown knob 'tau_prefill'; valid knobs: "):
        C.early_checks(_args(intervention="pai", overrides=["tau_prefill=0.3"]))
    with pytest.raises(UserError, match="threshold=2.0 is not a probability mass"):
        C.early_checks(_args(intervention="adhh", overrides=["threshold=2"]))
    C.early_checks(_args(intervention="var", preset="llama-2-7b-dims", overrides=["p=0.5"]))
    from cli_refusals import refused

    _, torch_loaded = refused(["trace", "--intervention", "vista", "--set", "lam=x"], tmp_path,
                              "lam='x' is not a number")
    assert not torch_loaded

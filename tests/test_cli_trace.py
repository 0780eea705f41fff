"""``mclcbf-diag trace`` (mclcbf_diag.cli.trace): refusals in a fresh process, and one real run.

The run's printed and saved margins are checked against a plain HF forward of the same
prompt and image (not against the toolkit's own records).
"""

from __future__ import annotations

import json

import floors
import pandas as pd
import pytest
import torch
from cli_refusals import FAST, refused, refused_here  # noqa: F401

from mclcbf_diag import shipped
from mclcbf_diag.cli import main
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image


@pytest.mark.parametrize("argv, fragments", [
    (["trace", "--max-new-tokens", "-1"], ["--max-new-tokens -1", "give 0 (prefill only) or a positive count"]),
    (["trace", "--max-new-tokens", "100000"], ["--max-new-tokens 100000", "more than the limit",
                                              "MCLCBF_DIAG_MAX_NEW_TOKENS"]),
    (["trace", "--sample", "5000"], ["--sample 5000 is out of range", "valid samples are 0.."]),
    (["trace", "--question-id", "no-such-id"], ["no-such-id"]),
])
def test_trace_refusals_are_one_fast_line(tmp_path, argv, fragments):
    _, torch_loaded = refused(argv, tmp_path, *fragments)
    assert not (tmp_path / "reports").exists()
    if "--max-new-tokens" in argv:
        assert not torch_loaded, "a bad number is refused before torch loads"


def test_trace_refuses_an_unknown_intervention_in_one_line(tmp_path):
    refused(["trace", "--intervention", "bogus"], tmp_path, "unknown intervention 'bogus'", "choose one of",
             "mclcbf", fast=False)


def test_trace_refuses_an_unknown_intervention_before_torch_loads(tmp_path):
    _, torch_loaded = refused(["trace", "--intervention", "bogus"], tmp_path, fast=False)
    assert not torch_loaded


def test_trace_writes_its_outputs_with_the_margin_of_a_plain_forward(tmp_path, capsys, embedded_model):
    out = tmp_path / "t"
    assert main(["trace", "--sample", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".mclcbf-diag.lock", "config.json", "records.csv",
                                                    "records.parquet", "trace.html"]  # written under the lock
    meta = json.loads((out / "config.json").read_text())
    q = load_pope(shipped.pope_file("adversarial"))[3]
    assert meta["question"]["question_id"] == q.question_id and meta["intervention"] == "mclcbf"
    lm = embedded_model
    with torch.no_grad():
        logits = lm.model(**lm.inputs(build_prompt(q.text), load_image(resolve_image(q, shipped.IMAGES)))).logits[0, -1]
    margin = float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])
    tol = floors.margin_floor(lm, lm.tokens.yes_id, lm.tokens.no_id)  # the runner against a plain forward
    assert meta["summary"]["margin_before"] == pytest.approx(margin, rel=0, abs=tol)
    records = pd.read_parquet(out / "records.parquet")
    final = records[(records.metric == "final_margin") & (records.phase == "prefill")].set_index("condition").value
    assert final["baseline"] == pytest.approx(margin, rel=0, abs=tol)
    assert final["steered"] == meta["summary"]["margin_after"]  # exact: one reading of the same final logits
    csv = pd.read_csv(out / "records.csv")
    assert len(csv) == len(records) and csv.value.fillna(0).tolist() == pytest.approx(records.value.fillna(0).tolist())
    assert f"outcome  {meta['summary']['outcome'].upper()}" in printed
    assert f"baseline {margin:+.4f}" in printed

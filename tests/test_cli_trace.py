"""``mclcbf-diag trace`` (mclcbf_diag.cli.trace): refusals in a fresh process, and one real run.

The run's printed and saved margins are checked against a plain HF forward of the same
prompt and image (not against the toolkit's own records).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from mclcbf_diag import shipped
from mclcbf_diag.cli import main
from mclcbf_diag.data import build_prompt, load_image, load_pope, resolve_image

FAST = 5.0  # seconds: a refusal comes before the model (and, for plain argument checks, before torch) loads
_PROBE = ("import json, sys\nfrom mclcbf_diag.cli import main\nrc = main(json.loads(sys.argv[1]))\n"
          "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\nsys.exit(rc)")


def _refused(argv, cwd, *fragments, fast: bool = True, **env) -> tuple[str, bool]:
    """Run the CLI in a fresh process; expect status 2 and one line holding ``fragments`` (the input, the
    problem, the fix), without a traceback, in under FAST seconds unless ``fast=False``. Returns the line and
    whether torch had been imported."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv)], capture_output=True, text=True, check=False,
                          cwd=cwd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env})
    took = time.monotonic() - start
    err = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + err, (argv, proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("mclcbf-diag: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert took < FAST or not fast, f"{argv}: refused after {took:.1f} s"
    return err.strip(), proc.stdout.strip().splitlines()[-1:] == ["torch loaded"]


@pytest.mark.parametrize("argv, fragments", [
    (["trace", "--max-new-tokens", "-1"], ["--max-new-tokens -1", "give 0 (prefill only) or a positive count"]),
    (["trace", "--max-new-tokens", "100000"], ["--max-new-tokens 100000", "more than the limit",
                                              "MCLCBF_DIAG_MAX_NEW_TOKENS"]),
    (["trace", "--sample", "5000"], ["--sample 5000 is out of range", "valid samples are 0.."]),
    (["trace", "--question-id", "no-such-id"], ["no-such-id"]),
])
def test_trace_refusals_are_one_fast_line(tmp_path, argv, fragments):
    _, torch_loaded = _refused(argv, tmp_path, *fragments)
    assert not (tmp_path / "reports").exists()
    if "--max-new-tokens" in argv:
        assert not torch_loaded, "a bad number is refused before torch loads"


def test_trace_refuses_an_unknown_intervention_in_one_line(tmp_path):
    _refused(["trace", "--intervention", "bogus"], tmp_path, "unknown intervention 'bogus'", "choose one of",
             "mclcbf", fast=False)


def test_trace_refuses_an_unknown_intervention_before_torch_loads(tmp_path):
    _, torch_loaded = _refused(["trace", "--intervention", "bogus"], tmp_path, fast=False)
    assert not torch_loaded


def test_trace_writes_its_outputs_with_the_margin_of_a_plain_forward(tmp_path, capsys, embedded_model):
    out = tmp_path / "t"
    assert main(["trace", "--sample", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "records.csv", "records.parquet", "trace.html"]
    meta = json.loads((out / "config.json").read_text())
    q = load_pope(shipped.pope_file("adversarial"))[3]
    assert meta["question"]["question_id"] == q.question_id and meta["intervention"] == "mclcbf"
    lm = embedded_model
    with torch.no_grad():
        logits = lm.model(**lm.inputs(build_prompt(q.text), load_image(resolve_image(q, shipped.IMAGES)))).logits[0, -1]
    margin = float(logits[lm.tokens.yes_id] - logits[lm.tokens.no_id])
    assert meta["summary"]["margin_before"] == pytest.approx(margin, abs=1e-4)
    records = pd.read_parquet(out / "records.parquet")
    final = records[(records.metric == "final_margin") & (records.phase == "prefill")].set_index("condition").value
    assert final["baseline"] == pytest.approx(margin, abs=1e-4)
    assert final["steered"] == pytest.approx(meta["summary"]["margin_after"], abs=1e-6)
    csv = pd.read_csv(out / "records.csv")
    assert len(csv) == len(records) and csv.value.fillna(0).tolist() == pytest.approx(records.value.fillna(0).tolist())
    assert f"outcome  {meta['summary']['outcome'].upper()}" in printed
    assert f"baseline {margin:+.4f}" in printed

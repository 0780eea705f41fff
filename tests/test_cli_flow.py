"""``mclcbf-diag flow`` (mclcbf_diag.cli.flow): refusals in a fresh process

(the run: tests/test_experiments_flow.py)."""

from __future__ import annotations

from cli_refusals import FAST, refused, refused_here  # noqa: F401

from mclcbf_diag.cli import main


def test_flow_refuses_a_window_below_one_in_one_line(tmp_path, capsys):
    refused_here(capsys, ["flow", "--window", "0", "--out", str(tmp_path / "o")], "--window 0",
                  "positive number of layers", "--window 2")
    assert not (tmp_path / "o").exists()


def test_flow_refuses_a_window_below_one_before_torch_loads(tmp_path):
    _, torch_loaded = refused(["flow", "--window", "0"], tmp_path, fast=False)
    assert not torch_loaded


def test_flow_refuses_a_window_deeper_than_the_model_before_reading_the_weights(capsys, monkeypatch):
    from mclcbf_diag.models import loading

    def no_weights(*a, **k):
        raise AssertionError("the weights were read before the mistake was reported")

    monkeypatch.setattr(loading, "load_weights", no_weights)
    assert main(["flow", "--window", "99"]) == 2
    assert "deeper than the model" in capsys.readouterr().err


def test_flow_window_deeper_than_the_model_names_the_depth(tmp_path, capsys):
    from mclcbf_diag.cli.common import local_depth

    n = local_depth(None)
    refused_here(capsys, ["flow", "--window", "99", "--out", str(tmp_path / "o")],
                  f"--window 99 is deeper than the model ({n} layers); give at most {n}")
    assert not (tmp_path / "o").exists()

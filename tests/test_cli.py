"""The entry point (mclcbf_diag.cli): every command registered; how each kind of failure reaches the user."""

import pytest

from mclcbf_diag import cli
from mclcbf_diag.cli import trace as trace_cli
from mclcbf_diag.errors import UserError


def test_every_command_is_registered():
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert {"trace", "explain", "flow", "pope", "merge", "compare", "zoo", "embedded"} <= set(sub.choices)


@pytest.mark.parametrize("exc, status, message", [
    (UserError("--thing 3 is wrong;\n  give 4"), 2, "mclcbf-diag: error: --thing 3 is wrong; give 4"),
    (KeyboardInterrupt(), 130, "mclcbf-diag: interrupted (pope: rerun the same command to resume"),
    (MemoryError(), 2, "mclcbf-diag: error: out of memory; lower --batch-size"),
])
def test_failures_become_one_line_and_a_status(monkeypatch, capsys, exc, status, message):
    def fail(args):
        raise exc

    monkeypatch.setattr(trace_cli, "cmd_trace", fail)
    assert cli.main(["trace"]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_debug_lets_the_exception_through(monkeypatch):
    def fail(args):
        raise UserError("boom")

    monkeypatch.setattr(trace_cli, "cmd_trace", fail)
    with pytest.raises(UserError, match="boom"):
        cli.main(["--debug", "trace"])


def test_a_missing_command_is_one_argparse_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "see `mclcbf-diag --help`" in err


def test_a_reader_that_goes_away_is_no_error(monkeypatch, capsys):
    # `mclcbf-diag interventions | head -1`: the pipe's reader is gone; no traceback, exit status 0
    import os
    import sys

    read, write = os.pipe()
    os.close(read)
    gone = os.fdopen(write, "w", buffering=1)  # line-buffered: the first line already meets the closed pipe
    monkeypatch.setattr(sys, "stdout", gone)
    assert cli.main(["interventions"]) == 0
    gone.close()

"""mclcbf_diag.errors: the one-line error and the first line of another exception it quotes.

The error's contract at the command line (one line on stderr, status 2) is checked by tests/test_cli*.py."""

from mclcbf_diag.errors import UserError, first_line


def test_first_line_quotes_the_first_non_empty_line_or_the_class():
    assert first_line(OSError("no such file\nTraceback details")) == "no such file"
    assert first_line(ValueError("  \n  padded first\nsecond")) == "padded first"
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(UserError("one line")) == "one line"

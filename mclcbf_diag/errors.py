"""User-facing errors.

Every mistake a user can make (a wrong path, a bad sample index, an unknown knob) is
raised as :class:`UserError`. Its message is one line that says what was wrong, where,
and how to fix it. The CLI prints that line and exits with status 2; it prints a
traceback only with ``--debug``. Library callers get an ordinary exception.
"""


class UserError(Exception):
    """A mistake in the user's input, explained in one line."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its class name when it has none (what a one-line error quotes)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Errors a person can act on.

Anything raised as `UserError` is printed by the CLI as one line and exits with code 2:
a bad recipe key, a missing folder, an unsupported model. Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user passed in; the message names the field or file."""

    exit_code = 2


def first_line(error: BaseException) -> str:
    """An exception as one line: its message's first line, or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

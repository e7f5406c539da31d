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


ECHO_LIMIT = 200  # characters of an outside value echoed back in an error or a log line


def shorten(value, limit: int = ECHO_LIMIT) -> str:
    """`value` as text of at most `limit` characters: errors never echo a 5 MB field back."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

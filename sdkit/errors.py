"""Errors a person can act on.

Anything raised as `UserError` is printed by the CLI as one line and exits with code 2:
a bad recipe key, a missing folder, an unsupported model. Everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user passed in; the message names the field or file."""

    exit_code = 2

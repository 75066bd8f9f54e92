"""The one exception type for bad user input.

The CLI turns a `UserError` into one line on stderr and exit code 2, never a traceback. Raise it
wherever the fix is on the user's side (unknown task, malformed config, out-of-range value) and say
what to do in the message.
"""


class UserError(Exception):
    """Bad input from the user: the message names the problem and what to do about it."""

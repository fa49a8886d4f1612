"""The one exception type that means "the user gave us something we cannot use".

The CLI prints it as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and what to do about it."""

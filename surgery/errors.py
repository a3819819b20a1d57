"""Errors that the command line reports as one line with exit code 2.

Library code raises :class:`BadInput` for anything the user can fix (a malformed file, a missing tensor, a bad
option). The message names the file, tensor or option and the reason; the CLI prints it without a traceback.
"""


class BadInput(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


class CheckFailed(Exception):
    """A check of a result failed (an output its loader would reject, a verification below its threshold): one line,
    exit code 1, and nothing written."""

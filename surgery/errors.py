"""Errors that the command line reports as one line, without a traceback.

Library code raises :class:`BadInput` for anything the user can fix (a malformed file, a missing tensor, a bad
option): exit code 2. An operation that ran and failed (:class:`Failed`: the Hub unreachable during a push) or a
check that found the result wanting (:class:`CheckFailed`: ``surgery verify`` over its thresholds): exit code 1.
The message names the file, tensor, option or threshold and the reason::

    raise CheckFailed("verify failed: model.layers.3.mlp.down_proj output cosine 0.41 < --min-cosine 0.9")
"""


class BadInput(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


class Failed(Exception):
    """An operation ran and failed for a reason outside the input (rerunning may succeed): one line, exit code 1."""


class CheckFailed(Failed):
    """A check of a result failed (an output its loader would reject, a verification below its threshold): one line,
    exit code 1, and nothing written."""


def one_line(err: object, limit: int = 300) -> str:
    """An exception (or any text) as one line for a message: whitespace collapsed, at most ``limit`` characters,
    prefixed by the exception's type when it is one (not for BadInput or Failed).

    Args:
        err: an exception, or any object whose text is wanted.
        limit: the most characters returned (longer text is cut and ends in ``...``).

    Returns:
        The one-line text, e.g. ``"OSError: disk full"``.

    Example::

        raise BadInput(f"{path}: not a readable GGUF file ({one_line(err)})")
    """
    text = " ".join(str(err).split())
    if isinstance(err, Exception) and not isinstance(err, (BadInput, Failed)):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."

"""Exceptions and warnings shared by the library and the command line."""

from __future__ import annotations

__all__ = ["PosvitError", "PosvitWarning"]


class PosvitError(ValueError):
    """An error caused by the user's input (a bad path, a wrong option, a file that does not fit).

    The command line prints its message as one line on stderr and exits with status 2, so the message must
    say what is wrong and, where it can, what to do instead. It is a :class:`ValueError` so that callers
    used to NumPy and scikit-image (which raise ``ValueError`` for bad arguments) catch it as such.
    """


class PosvitWarning(UserWarning):
    """Something the user should know but that does not stop the job (a skipped corrupt image, a rounding)."""

"""Progress reporting from the library without printing.

Long-running functions in :mod:`posvit_cli.core` take an optional ``progress`` callable and call it as
``progress(task, completed, total)``: ``task`` names the stage (``"extract"``, ``"kmeans k=100"``),
``completed`` counts finished units and ``total`` is the number of units or ``None`` when unknown. The command
line turns these calls into Rich progress bars on stderr; library users can pass any callable or nothing.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["ProgressCallback", "no_progress", "report"]


class ProgressCallback(Protocol):
    def __call__(self, task: str, completed: int, total: int | None = None) -> None: ...


def no_progress(task: str, completed: int, total: int | None = None) -> None:
    """A progress callback that does nothing."""


def report(progress: ProgressCallback | None) -> ProgressCallback:
    """Return ``progress`` or a no-op, so library code can call the result unconditionally."""
    return progress if progress is not None else no_progress

"""Progress reporting from the library without printing.

Long-running functions in :mod:`posvit_cli.core` take an optional ``progress`` callable and call it as
``progress(task, completed, total)``: ``task`` names the stage (``"extract"``, ``"kmeans k=100"``),
``completed`` counts finished units and ``total`` is the number of units or ``None`` when unknown. The command
line turns these calls into Rich progress bars on a terminal, and into plain lines at a bounded rate (every 5 %
or 30 s) when stderr is a file; library users can pass any callable or nothing.

Report in units a user can wait on: a stage that can take minutes on one item (one huge image) reports its
sub-units as their own task (``"extract tiles"``), at most once per piece of real work (a forward pass, a tile),
so the caller sees a rate and an eta. A total may grow as work is discovered; ``completed`` should not go back.
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

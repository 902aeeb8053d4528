"""Conventions shared by every posvit command.

- Data (stores, JSON with ``--json``) goes to stdout; progress, tables, warnings and errors go to stderr.
- A binary store is written to stdout only when stdout is a pipe or a socket, or the output is ``-``; a store is
  never written into a terminal or into a file that stdout was redirected to (``> run.log 2>&1`` would bury it
  in the log): that asks for ``-o``.
- JSON on stdout is strict: NaN and infinities are written as ``null``.
- User errors (:class:`PosvitError`, and a file that cannot be written for permissions or a full or read-only
  disk) print one line and exit 2; other failures print one line and exit 1;
  ``--debug`` (or ``POSVIT_DEBUG=1``) shows the traceback instead.
- Rich honours ``NO_COLOR``; ``--quiet`` silences progress and tables (warnings and errors still show).
- Progress is a live Rich bar on a terminal; when stderr is not a terminal (a log file) it is plain lines at
  every 5 % step or 30 s of each task, whichever comes first, and a final line (:class:`RichProgress`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import TyperException
from typer.core import TyperCommand, TyperGroup
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.fileio import json_text

__all__ = [
    "DebugOpt",
    "DeviceOpt",
    "JsonOpt",
    "QuietOpt",
    "RichProgress",
    "cli_context",
    "console",
    "PosvitCommand",
    "PosvitGroup",
    "emit_json",
    "filesystem_error_line",
    "parse_class_names",
    "parse_csv",
    "parse_seeds",
    "sigterm_as_interrupt",
    "store_input",
    "store_output",
]

#: Width of tables written into a log (stderr redirected to a file, no COLUMNS): Rich's 80 columns would cut
#: numbers to "0.914±0.…", which a log is read for.
LOG_WIDTH = 160


def _stderr_width() -> int | None:
    """Rich's own choice on a terminal or with COLUMNS set; :data:`LOG_WIDTH` when stderr is a file or pipe."""
    try:
        interactive = os.isatty(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        interactive = False
    return None if interactive or os.environ.get("COLUMNS") else LOG_WIDTH


console = Console(stderr=True, highlight=False, width=_stderr_width())

# The shared option types are defined once in posvit_cli.options; these names stay importable from here.
from posvit_cli.options import DebugOpt, DeviceOpt, JsonOpt, QuietOpt  # noqa: E402


def _error_line(message: str) -> None:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "error"
    console.print(f"[bold red]error:[/] {first}", markup=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def cli_context(debug: bool = False, quiet: bool = False) -> Iterator[None]:
    """Run a command body with posvit's error and warning conventions.

    PosvitError → one line, exit 2. An OSError the user can fix (permission denied, read-only file system, no
    space left: see :func:`filesystem_error_line`) → one line naming the file, exit 2. KeyboardInterrupt → exit
    130. Any other exception → one line naming it, exit 1 (the traceback with ``--debug``). Warnings from the library print as one ``warning:`` line each.
    """
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PosvitWarning) or not quiet:
            if issubclass(category, (PosvitWarning, UserWarning)):
                console.print(f"[yellow]warning:[/] {message}", markup=True, highlight=False, soft_wrap=True)

    old_show = warnings.showwarning
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PosvitWarning)
            warnings.showwarning = show
            yield
    except typer.Exit:
        raise
    except PosvitError as exc:
        if debug:
            console.print_exception()
        _error_line(str(exc))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _error_line("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`): not an error of ours.
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")
        raise typer.Exit(0) from None
    except OSError as exc:
        message = filesystem_error_line(exc)
        if debug:
            console.print_exception()
        if message is None:  # not a permission or full-disk error: reported as any other failure
            _error_line(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
            raise typer.Exit(1) from None
        _error_line(message)
        raise typer.Exit(2) from None
    except Exception as exc:
        if debug:
            console.print_exception()
        _error_line(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)")
        raise typer.Exit(1) from None
    finally:
        warnings.showwarning = old_show


_FILESYSTEM_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
}
# atomic_path's temporary names: ".NAME.<8 random characters>.tmp[.suffix]" beside NAME.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)?$")


def filesystem_error_line(exc: OSError) -> str | None:
    """One error line for an OSError the user can fix (permissions, a read-only or full disk), else None.

    The line names the file: the error's filename, or the one HDF5 quotes in its message (``name = '...'``),
    with a temporary name of :func:`~posvit_cli.core.fileio.atomic_path` turned back into the file it was for.

    Parameters
    ----------
    exc : OSError

    Returns
    -------
    str or None
        ``cannot write 'out/x.h5': permission denied (...)``, or None for other errors.
    """
    code = exc.errno
    if code is None and isinstance(exc, PermissionError):
        code = errno.EACCES
    reason = _FILESYSTEM_ERRNOS.get(code)
    if reason is None:
        return None
    path = exc.filename
    if path is None:
        quoted = re.search(r"name = '([^']*)'", str(exc))
        path = quoted.group(1) if quoted else None
    if path is None:
        return f"cannot write: {reason} (choose another output location)"
    path = os.fsdecode(path)
    temp = _TEMP_NAME.match(os.path.basename(path))
    if temp:
        path = os.path.join(os.path.dirname(path), temp.group("name"))
    # Permission errors also come from reading: an existing file we may not read is an input.
    unreadable = code in (errno.EACCES, errno.EPERM) and os.path.isfile(path) and not os.access(path, os.R_OK)
    if unreadable:
        return f"cannot read '{path}': {reason}"
    fix = "free some space or choose another output location" if code in (errno.ENOSPC, errno.EDQUOT) \
        else "check the folder's permissions or choose another output location"
    return f"cannot write '{path}': {reason} ({fix})"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Handle SIGTERM (a scheduler or `kill` stopping the job) like Ctrl-C inside the block.

    The KeyboardInterrupt unwinds through the writers, which keep their partial outputs resumable, and
    :func:`cli_context` turns it into exit status 130. Only the main thread can install signal handlers; elsewhere
    this does nothing.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclasses.dataclass
class _LineTask:
    """What :class:`RichProgress` knows of one task when it writes plain lines (clock times in seconds)."""

    start: float  # clock time of the task's first call
    start_completed: int  # units done at the first call (a resumed run starts part-way): the rate counts from here
    last_line: float  # clock time of the last line written, or of the first call
    last_step: int  # the percent step (see RichProgress) last written, or reached when the total changed
    completed: int
    total: int | None
    written: tuple[int, int | None] | None = None  # (completed, total) of the last line written


def _hms(seconds: float) -> str:
    """``H:MM:SS`` of a duration in seconds, like Rich's elapsed and remaining columns."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RichProgress:
    """A :class:`~posvit_cli.core.progress.ProgressCallback` reporting progress on stderr.

    On a terminal (or in Jupyter) it draws Rich's live bars. Elsewhere (stderr redirected to a file, a scheduler's
    log) a live bar writes nothing until the end, so it writes plain lines instead, one per task at every
    ``step_percent`` % step or after ``every_seconds`` s without a line, whichever comes first, and the last state of
    every task whose last state was not written when the block ends::

        extract: 12/40 (30%), 0:01:10 elapsed, eta 0:02:43
        kmeans: 7 done, 0:00:30 elapsed          (a task whose total is unknown)

    The eta is the time left at the task's average rate since its first call. ``quiet`` writes nothing.

    Parameters
    ----------
    quiet : bool
        Write nothing.
    live : bool or None
        Draw live bars (True) or write lines (False); None decides from stderr (Rich's terminal detection, which
        honours ``TTY_COMPATIBLE`` and ``FORCE_COLOR``).
    step_percent : int
        Percent of a task's total between lines.
    every_seconds : float
        Longest time between two lines of a task that is still reporting, in seconds of ``clock``.
    clock : callable
        Time in seconds (monotonic); tests pass a fake clock.
    stream : text file or None
        Where lines go; None is the console's stderr at the time of writing.
    """

    def __init__(self, quiet: bool = False, *, live: bool | None = None, step_percent: int = 5,
                 every_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic, stream: Any = None):
        if step_percent < 1:
            raise ValueError(f"step_percent must be a positive integer, got {step_percent}")
        self.quiet = quiet
        self.live = live
        self.step_percent = int(step_percent)
        self.every_seconds = every_seconds
        self._clock = clock
        self._stream = stream
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._lines: dict[str, _LineTask] | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> RichProgress:
        if self.quiet:
            return self
        live = self.live
        if live is None:
            live = (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter
        if not live:
            self._lines = {}
            return self
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
        if self._lines is not None:
            # The final line of every task whose last state is unwritten (an unknown total, an interrupted run).
            now = self._clock()
            with self._lock:
                for task, state in self._lines.items():
                    if state.written != (state.completed, state.total):
                        self._write(task, state, now)
            self._lines = None

    def __call__(self, task: str, completed: int, total: int | None = None) -> None:
        if self._progress is not None:
            if task not in self._tasks:
                self._tasks[task] = self._progress.add_task(task, total=total)
            self._progress.update(self._tasks[task], completed=completed, total=total)
        elif self._lines is not None:
            with self._lock:
                self._line_update(task, completed, total)

    def _step(self, completed: int, total: int | None) -> int:
        """How many whole ``step_percent`` steps of ``total`` are done (0 for an unknown total)."""
        if total is None:
            return 0
        if total <= 0:
            return 100 // self.step_percent
        return (completed * 100) // (total * self.step_percent)

    def _line_update(self, task: str, completed: int, total: int | None) -> None:
        now = self._clock()
        state = self._lines.get(task)
        if state is None:
            # The first call only starts the clocks: nothing has been done yet that a line could report.
            self._lines[task] = _LineTask(start=now, start_completed=completed, last_line=now,
                                          last_step=self._step(completed, total), completed=completed, total=total)
            return
        if total != state.total:
            # A grown total (tiles of one more image) lowers the percentage: steps count on from there.
            state.total = total
            state.last_step = self._step(completed, total)
        state.completed = completed
        finished = total is not None and completed >= total
        if (self._step(completed, total) > state.last_step or now - state.last_line >= self.every_seconds
                or (finished and state.written != (completed, total))):
            self._write(task, state, now)

    def _write(self, task: str, state: _LineTask, now: float) -> None:
        elapsed = now - state.start
        done, total = state.completed, state.total
        if total is None:
            line = f"{task}: {done} done, {_hms(elapsed)} elapsed"
        else:
            percent = min(100, 100 * done // total) if total > 0 else 100
            rate = (done - state.start_completed) / elapsed if elapsed > 0 else 0.0
            if done >= total:
                eta = _hms(0)
            else:
                eta = _hms((total - done) / rate) if rate > 0 else "-:--:--"
            line = f"{task}: {done}/{total} ({percent}%), {_hms(elapsed)} elapsed, eta {eta}"
        stream = self._stream if self._stream is not None else console.file
        stream.write(line + "\n")
        stream.flush()
        state.last_line = now
        state.last_step = self._step(done, total)
        state.written = (done, total)


def emit_json(obj: Any) -> None:
    """Write one strict JSON document to stdout (NaN and ±Inf as ``null``, NumPy values as numbers)."""
    sys.stdout.write(json_text(obj, default=str) + "\n")
    sys.stdout.flush()


def stdout_is_pipe() -> bool:
    """True when stdout is a pipe or a socket, i.e. another program reads what we write.

    A terminal is not, and neither is a regular file or ``/dev/null``: ``posvit extract imgs/ > run.log 2>&1``
    redirects stdout to a file, where a binary store would be mixed with the log (and lost as a store).
    """
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        # No real file descriptor (an in-process test runner, a closed stream): nobody can read a store there.
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def store_output(output: str | None, what: str = "store") -> str:
    """Resolve ``-o``: a path, ``-`` (stdout), or, when omitted, stdout if it is a pipe or socket.

    Raises
    ------
    PosvitError
        When no output is named and stdout is a terminal or a file (binary data would garble the terminal or be
        buried in a log).
    """
    if output:
        return output
    if stdout_is_pipe():
        return "-"
    raise PosvitError(f"no output named: pass -o FILE (.h5, .zarr, .zarr.zip), -o - for stdout, or pipe the {what} "
                      f"into another command")


def store_input(source: str | None) -> str:
    """Resolve a store argument: a path, ``-``, or, when omitted, stdin if it is a pipe."""
    if source:
        return source
    if not sys.stdin.isatty():
        return "-"
    raise PosvitError("no feature store named: pass a store path or pipe one in (posvit extract imgs/ | posvit ...)")


def parse_csv(value: str | None, cast=str) -> list:
    """Split a comma-separated option value into a list (empty for None or '')."""
    if value is None or str(value).strip() == "":
        return []
    try:
        return [cast(v.strip()) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise PosvitError(f"cannot read '{value}' as a comma-separated list of {cast.__name__}") from None


def parse_seeds(value: str | None, option: str = "--seeds") -> list[int]:
    """Read a seed list: comma-separated integers and ascending ranges, e.g. ``0-4``, ``1,3`` or ``0-2,7``.

    Parameters
    ----------
    value : str
        The option's text.
    option : str
        The option's name, for messages.

    Returns
    -------
    list of int
        Seeds in the order given (a range expands low to high), duplicates dropped.

    Raises
    ------
    PosvitError
        For an empty list, a value that is not an integer or range, a negative seed, or a descending range
        (``3-1``: the message suggests ``1-3``).
    """
    seeds: list[int] = []
    for part in parse_csv(value):
        lo, sep, hi = part.partition("-")
        try:
            first, last = (int(lo), int(hi)) if sep and lo.strip() else (int(part), int(part))
        except ValueError:
            raise PosvitError(f"cannot read {option} '{value}': use integers such as 0,1,2 or a range such as 0-4") \
                from None
        if last < first:  # PosvitError is a ValueError: raised outside the try so it is not reworded
            raise PosvitError(f"{option} range '{part}' runs backwards: did you mean {last}-{first}?")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise PosvitError(f"{option} is empty: give seeds such as 0,1,2 or a range such as 0-4")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise PosvitError(f"{option} '{value}' holds the negative seed {negative[0]}: seeds are 0 or more")
    return list(dict.fromkeys(seeds))


def parse_class_names(value: str | None, option: str = "--class-names") -> list[str] | None:
    """Class names from a comma-separated list or a text file with one name per line (None when not given).

    Raises
    ------
    PosvitError
        If the list or the file holds no names.
    """
    if value is None:
        return None
    path = Path(value)
    names = ([ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file()
             else parse_csv(value))
    if not names:
        raise PosvitError(f"{option} is empty: give names such as background,cell or a file with one name per line")
    return names


class _PosvitConventions:
    """What every posvit command and group does beyond Typer's defaults.

    - Flags show no ``<bool>`` type in ``--help``, since they take no value: Typer's Rich help prints every
      option's value type, which for an on/off flag reads as if it wanted one (``--quiet <bool>``). An empty
      metavar is Click's way to print no value placeholder.
    - A bad option value (an unknown choice, a number out of its range, an unknown option) is one ``error:``
      line and exit status 2, like every other user error, instead of a usage box.
    """

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except TyperException as exc:
            if not hasattr(exc, "format_message"):
                raise
            message = " ".join(str(exc.format_message()).replace("Value error, ", "").split())
            _error_line(f"{message} (see {ctx.command_path} -h)")
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None


class PosvitCommand(_PosvitConventions, TyperCommand):
    """The Click command class of every posvit command (``app.command(..., cls=PosvitCommand)``)."""


class PosvitGroup(_PosvitConventions, TyperGroup):
    """The Click group class of posvit and its command groups (``typer.Typer(cls=PosvitGroup)``)."""


def command_line() -> str:
    """The command line as typed, for provenance."""
    import shlex

    return " ".join(shlex.quote(a) for a in ["posvit", *sys.argv[1:]])

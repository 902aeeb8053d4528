"""Atomic file output and tagged JSON documents, shared by every command that writes a file.

Every output is written beside its target under a temporary name and renamed over it when complete, so a reader
(or an interrupted run) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posvit_cli.core.errors import PosvitError

__all__ = [
    "atomic_path",
    "file_mode",
    "json_clean",
    "json_default",
    "json_text",
    "read_tagged_json",
    "sha256_file",
    "tagged_header",
    "write_json_atomic",
    "write_text_atomic",
]


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


def file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give (mkstemp's own 0600 is for secrets)."""
    return _FILE_MODE


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, keep_suffix: bool = False, make_parents: bool = True, durable: bool = False
) -> Iterator[str]:
    """A temporary file name beside ``path`` that becomes ``path`` when the block completes.

    Parameters
    ----------
    path : path-like
        The final file.
    keep_suffix : bool
        End the temporary name with ``path``'s suffix too, for writers that pick the format by suffix.
    make_parents : bool
        Create missing parent folders (otherwise a missing folder is an error).
    durable : bool
        Flush the temporary file to the disk (``fsync``) before the rename, for checkpoints that must survive a
        power cut, not only a killed process.

    Yields
    ------
    str
        The temporary file (created empty, closed). On an exception it is removed and ``path`` is untouched.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise PosvitError(f"output folder '{path.parent}' does not exist")
    suffix = ".tmp" + (path.suffix if keep_suffix else "")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns the path."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def json_clean(obj: Any) -> Any:
    """A strict-JSON copy of ``obj``: the one cleaner every JSON document posvit writes goes through.

    NaN and ±inf become ``None`` (``null``), NumPy scalars and arrays become Python numbers and (nested) lists,
    tuples and sets become lists, paths become strings and mapping keys become strings. Other objects are
    returned unchanged, so ``json.dumps`` still refuses what has no JSON form.

    Parameters
    ----------
    obj : any
        Nested dicts, lists, tuples, sets, NumPy values, paths and JSON scalars.

    Returns
    -------
    any
        An object that ``json.dumps(..., allow_nan=False)`` accepts when ``obj`` held only the types above.
    """
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [json_clean(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, np.generic) or (getattr(obj, "ndim", None) == 0 and callable(getattr(obj, "item", None))):
        obj = obj.item()  # NumPy scalars, and 0-d arrays or tensors from other libraries
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def json_text(obj: Any, *, indent: int | None = 2, default=None, ensure_ascii: bool = True) -> str:
    """``obj`` as strict JSON text after :func:`json_clean` (no NaN literals, which other readers reject).

    ``default`` is passed to ``json.dumps`` for objects :func:`json_clean` leaves alone (``str`` to write
    their text instead of refusing them).
    """
    return json.dumps(json_clean(obj), indent=indent, allow_nan=False, default=default, ensure_ascii=ensure_ascii)


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: NumPy scalars and arrays as Python numbers and lists, anything else as ``str``.

    Prefer :func:`json_text` (or ``json.dumps(json_clean(obj))``): a ``default`` hook never sees Python floats,
    so it cannot turn NaN into ``null``.
    """
    import numpy as np

    if isinstance(o, (np.generic, np.ndarray)):
        return json_clean(o)
    return str(o)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (:func:`json_clean`) to ``path`` atomically. Returns the path."""
    return write_text_atomic(path, json_text(obj, default=str) + "\n")


def tagged_header(schema: str, version: int) -> dict:
    """The first keys of every result document posvit writes: its schema tag and version (what
    :func:`read_tagged_json` checks), the posvit version and the UTC creation time."""
    import datetime

    from posvit_cli import __version__

    return {
        "schema": schema,
        "schema_version": version,
        "posvit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def read_tagged_json(path: str | os.PathLike, schema: str, max_version: int, what: str, hint: str = "") -> dict:
    """Read a JSON document tagged ``{"schema": schema, "schema_version": v}`` with ``v <= max_version``.

    Parameters
    ----------
    what : str
        What the document is, for messages ("probe result").
    hint : str
        Appended to the missing-file message (how to make one).

    Raises
    ------
    PosvitError
        If the file is missing, is not JSON, carries another schema tag, or a newer version than this posvit
        reads.
    """
    p = Path(path)
    if not p.exists():
        raise PosvitError(f"{what} '{path}' does not exist" + (f" ({hint})" if hint else ""))
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PosvitError(f"cannot read '{path}' as a {what} ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise PosvitError(f"'{path}' is not a posvit {what} (no '{schema}' schema tag)")
    try:
        version = int(doc.get("schema_version", 0))
    except (TypeError, ValueError):
        raise PosvitError(f"'{path}' has an unreadable schema_version {doc.get('schema_version')!r}") from None
    if version > max_version:
        raise PosvitError(f"'{path}' uses {what} schema {version}: upgrade posvit")
    return doc


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MB blocks (weights, heads: what provenance records)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

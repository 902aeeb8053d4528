"""Atomic file output and tagged JSON documents, shared by every command that writes a file.

Every output is written beside its target under a temporary name and renamed over it when complete, so a reader
(or an interrupted run) never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posvit_cli.core.errors import PosvitError

__all__ = ["atomic_path", "file_mode", "json_default", "read_tagged_json", "write_json_atomic", "write_text_atomic"]


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


def file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` would give (mkstemp's own 0600 is for secrets)."""
    return _FILE_MODE


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False, make_parents: bool = True) -> Iterator[str]:
    """A temporary file name beside ``path`` that becomes ``path`` when the block completes.

    Parameters
    ----------
    path : path-like
        The final file.
    keep_suffix : bool
        End the temporary name with ``path``'s suffix too, for writers that pick the format by suffix.
    make_parents : bool
        Create missing parent folders (otherwise a missing folder is an error).

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


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: NumPy scalars and arrays as Python numbers and lists, anything else as ``str``."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def json_clean(obj: Any) -> Any:
    """``obj`` with NaN and ±Inf replaced by ``None`` (JSON ``null``) and NumPy values made Python, recursively.

    ``json.dumps`` writes non-finite floats as the bare tokens ``NaN``/``Infinity``, which are not JSON: strict
    parsers (jq, JavaScript, most languages' standard libraries) reject the whole document.
    """
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(json_clean(k))): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj``: NaN/Inf as ``null``, NumPy values as numbers, other objects as ``str``."""
    return json.dumps(json_clean(obj), indent=indent, default=json_default, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (see :func:`dumps_json`) to ``path`` atomically. Returns the path."""
    return write_text_atomic(path, dumps_json(obj) + "\n")


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

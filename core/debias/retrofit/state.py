"""Training states (student, optimiser, RNG, counters, log) and the log file, written atomically; resuming from a
state continues the run exactly (bit-exact on CPU). States load with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import atomic_path
from posvit_cli.core.measure.probe import RAMP_TARGETS

STATE_FORMAT = "posvit-retrofit-state"
STATE_VERSION = 1
LOG_COLUMNS = (
    "step", "stage", "epoch", "size", "lr", "train_loss", "val_loss", "val_cosine",
    *(f"r2_{t}" for t in RAMP_TARGETS), "images_per_s", "elapsed_s",
)


def state_meta(state: dict) -> dict:
    """The JSON metadata (format, version, recipe, counters) of a loaded training state."""
    return json.loads(state["meta"])


def read_training_state(path: str | os.PathLike) -> dict:
    """Load a training state written by :func:`train_retrofit` (a file, or a run folder holding ``last.pt``).

    Loaded with ``weights_only=True``: a state file cannot run code.

    Raises
    ------
    PosvitError
        If the path is missing or is not a posvit training state (an encoder checkpoint, another file).
    """
    import torch

    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise PosvitError(f"--resume: '{path}' has no training state (looked for {p})")
    if p.suffix == ".safetensors":
        raise PosvitError(
            f"--resume: '{path}' is an encoder checkpoint, not a training state; resume from the run folder "
            "(the .train folder next to the output) or its last.pt"
        )
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PosvitError(f"--resume: '{p}' is not a readable posvit training state ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or "meta" not in state:
        raise PosvitError(f"--resume: '{p}' is not a posvit training state")
    meta = state_meta(state)
    if meta.get("format") != STATE_FORMAT:
        raise PosvitError(f"--resume: '{p}' is not a posvit debias-train state (format {meta.get('format')!r})")
    state["_path"] = str(p)
    return state


def save_torch_atomic(obj, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically and durably (fsync before the rename)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def write_log_csv(rows: list[dict], path: Path) -> None:
    """The training log (one row per event, columns :data:`LOG_COLUMNS`), rewritten atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in LOG_COLUMNS})


def rng_state() -> dict:
    """Torch's CPU (and, once initialised, CUDA) random states, for a training state."""
    import torch

    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore random states saved by :func:`rng_state` (CUDA states only where CUDA is available)."""
    import torch

    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def sha_of_paths(paths: Sequence[Path]) -> str:
    """SHA-256 of the absolute image paths in order: a resumed run must train on the same images."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.abspath(p).encode() + b"\0")
    return h.hexdigest()

"""Result documents of the positional probe: strict JSON out, tagged JSON back in, and the readers other commands
use (:func:`positional_channels` for channel blanking, :func:`fingerprint` for plots, the per-channel CSV).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import json_text, read_tagged_json, write_text_atomic
from posvit_cli.core.measure.probe.settings import POSITIONAL_RAMPS, PROBE_SCHEMA, PROBE_SCHEMA_VERSION

__all__ = [
    "channel_r2_table",
    "fingerprint",
    "positional_channels",
    "probe_result_json",
    "read_probe_result",
    "top_channels",
    "write_channel_csv",
    "write_probe_result",
]


# Reading results back


def top_channels(mean_r2: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores of ``mean_r2`` (shape (C,)), NaN ranked last, ties by index."""
    order = np.argsort(-np.where(np.isfinite(mean_r2), mean_r2, -np.inf), kind="stable")
    return [int(c) for c in order[:k]]


def probe_result_json(result: dict) -> str:
    """The result document as strict JSON text (NaN written as null)."""
    return json_text(result, indent=1)


def write_probe_result(path: str | os.PathLike, result: dict) -> Path:
    """Write a probe result as JSON, atomically (temporary file, then rename). Returns the path."""
    return write_text_atomic(path, probe_result_json(result) + "\n")


def read_probe_result(path: str | os.PathLike) -> dict:
    """Read a result written by :func:`write_probe_result` (or ``posvit probe -o``).

    Raises
    ------
    PosvitError
        If the file is missing, is not JSON, or is not a posvit probe result of a readable schema version.
    """
    return read_tagged_json(path, PROBE_SCHEMA, PROBE_SCHEMA_VERSION, "probe result",
                            hint=f"write one with `posvit probe STORE -o {Path(path).name}`")


def _result_block(result: dict, layer: str | None) -> tuple[str, dict]:
    if not isinstance(result, dict) or "results" not in result:
        raise PosvitError("not a probe result document (no 'results')")
    layer = layer or result.get("primary_layer") or result["layers"][-1]
    if layer not in result["results"]:
        raise PosvitError(f"layer '{layer}' was not probed (probed: {', '.join(result['results'])})")
    return layer, result["results"][layer]


def _channel_means(block: dict, target: str, layer: str) -> np.ndarray:
    if "channel_r2" not in block:
        raise PosvitError(f"the probe result of layer '{layer}' has no per-channel scores (probed without them)")
    if target not in block["channel_r2"]:
        raise PosvitError(
            f"target '{target}' was not probed (probed: {', '.join(block['channel_r2'])}); "
            "re-run `posvit probe` with it in --targets"
        )
    return np.array([np.nan if v is None else v for v in block["channel_r2"][target]["mean"]], dtype=np.float64)


def positional_channels(
    result: dict, k: int = 2, ramps: Sequence[str] = POSITIONAL_RAMPS, *, layer: str | None = None
) -> list[int]:
    """The most positional channels: the union of the top-``k`` channels of each ramp, sorted.

    Ranks by the dataset-mean per-channel R² (NaN last), as the published channel-blanking selection does
    (top-2 of lr, ud, diag, radial).

    Parameters
    ----------
    result : dict
        A probe result (:func:`probe_store` or :func:`read_probe_result`).
    k : int
        Channels per ramp.
    ramps : sequence of str
        Targets to rank (any probed target).
    layer : str, optional
        Defaults to the result's primary layer.

    Returns
    -------
    list of int
        Channel indices, ascending.

    Raises
    ------
    PosvitError
        If a ramp or the layer was not probed, or ``k < 1``.
    """
    if k < 1:
        raise PosvitError(f"k must be at least 1, got {k}")
    layer, block = _result_block(result, layer)
    chosen: set[int] = set()
    for r in ramps:
        chosen.update(top_channels(_channel_means(block, r, layer), k))
    return sorted(chosen)


def fingerprint(result: dict, target: str = "lr") -> tuple[list[str], np.ndarray]:
    """The layers × channels matrix of dataset-mean per-channel R² for one target.

    Returns
    -------
    layers : list of str
        Rows, in probing order.
    matrix : ndarray, shape (len(layers), C)
    """
    layers = list(result["layers"])
    rows = [_channel_means(result["results"][ly], target, ly) for ly in layers]
    return layers, np.stack(rows)


def channel_r2_table(result: dict) -> tuple[list[str], list[list]]:
    """Rows of per-channel scores: ``layer, channel, <target>_mean, <target>_std ..., top_for``."""
    targets = list(result["settings"]["targets"])
    header = ["layer", "channel"] + [f"{t}_{s}" for t in targets for s in ("mean", "std")] + ["top_for"]
    rows: list[list] = []
    for ly in result["layers"]:
        block = result["results"][ly]
        if "channel_r2" not in block:
            continue
        top = block.get("top_channels", {})
        C = len(next(iter(block["channel_r2"].values()))["mean"])
        for c in range(C):
            row: list[Any] = [ly, c]
            for t in targets:
                d = block["channel_r2"][t]
                row += [d["mean"][c], d["std"][c]]
            row.append(";".join(r for r, chs in top.items() if c in chs))
            rows.append(row)
    return header, rows


def write_channel_csv(path: str | os.PathLike, result: dict) -> Path:
    """Write the per-channel R² of every probed layer as CSV, atomically."""
    import csv
    import io

    header, rows = channel_r2_table(result)
    if not rows:
        raise PosvitError("the probe result has no per-channel scores to write")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v))
                         else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return write_text_atomic(path, buf.getvalue())

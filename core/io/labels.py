"""Label images (masks, scribbles): matching them to images by file stem, colour tables, resizing.

Class masks are integer arrays ``(H, W)``. Palette PNGs (VOC) decode to palette indices, greyscale and integer
TIFFs to their values; RGB label images are mapped to classes by colour (:func:`rgb_to_classes`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.io.images import IMAGE_SUFFIXES, read_label_image

__all__ = [
    "find_label_files", "load_label_image", "nearest_indices", "resize_labels_nearest", "rgb_to_classes", "stem",
]


def stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``a.ome.tif`` → ``a``), the key that pairs images and labels."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def label_files_by_stem(label_dir: str | os.PathLike) -> dict[str, list[Path]]:
    """The image files of ``label_dir`` grouped by file stem (several when extensions differ), sorted by name.

    Raises
    ------
    PosvitError
        If ``label_dir`` is not a folder.
    """
    d = Path(label_dir)
    if not d.is_dir():
        raise PosvitError(f"label folder '{label_dir}' does not exist")
    files: dict[str, list[Path]] = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            files.setdefault(stem(f), []).append(f)
    return files


def find_label_files(
    names: Iterable[str], label_dir: str | os.PathLike, suffixes: Sequence[str] = ("",)
) -> tuple[dict[str, Path], list[str]]:
    """Pair image stems with label files in ``label_dir``.

    A label file matches image stem ``s`` if its stem is ``s`` or ``s`` followed by one of ``suffixes``
    (e.g. ``_labels``, ``_mask``).

    Returns
    -------
    found : dict of stem to Path
    missing : list of str
        Stems without a label file.

    Raises
    ------
    PosvitError
        If ``label_dir`` is not a folder.
    """
    files = label_files_by_stem(label_dir)
    found, missing = {}, []
    for n in names:
        hit = next((files[n + s][0] for s in suffixes if n + s in files), None)
        if hit is None:
            missing.append(n)
        else:
            found[n] = hit
    return found, missing


def check_label_range(labels: np.ndarray, source, num_classes: int | None, ignore_index: int | None) -> tuple[int, int]:
    """Validate a mask's class values; return (largest label, number of labelled pixels), ignored pixels excluded.

    The largest label is -1 for a mask with no labelled pixel.

    Raises
    ------
    PosvitError
        For a negative label, or one ≥ ``num_classes`` that is not the ignore index (naming ``source``).
    """
    kept = labels if ignore_index is None else labels[labels != ignore_index]
    if not kept.size:
        return -1, 0
    lo, hi = int(kept.min()), int(kept.max())
    if lo < 0:
        raise PosvitError(f"mask '{source}' holds the negative label {lo}")
    if num_classes is not None and hi >= num_classes:
        ign = f" and is not the ignore index {ignore_index}" if ignore_index is not None else ""
        raise PosvitError(f"mask '{source}' holds label {hi}, which is ≥ --num-classes {num_classes}{ign}")
    return hi, int(kept.size)


def rgb_to_classes(rgb: np.ndarray, colours: Sequence[tuple[int, int, int]] | None = None):
    """Map an RGB label image to class indices by colour.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3) or (H, W, 4)
    colours : sequence of (r, g, b), optional
        The colour of class i at position i. By default the distinct colours are sorted, black first.

    Returns
    -------
    labels : ndarray of int64, shape (H, W)
    colours : list of (r, g, b)
        The colour table used, so it can be printed and reused for other images.

    Raises
    ------
    PosvitError
        If ``colours`` is given and the image holds a colour that is not in it.
    """
    rgb = np.asarray(rgb)[..., :3].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    if colours is None:
        uniq = np.unique(codes)
        table = [(int(c >> 16) & 255, int(c >> 8) & 255, int(c) & 255) for c in uniq]
    else:
        table = [tuple(int(v) for v in c) for c in colours]
        uniq = np.array([(r << 16) | (g << 8) | b for r, g, b in table], dtype=np.int64)
    order = np.argsort(uniq)
    pos = np.searchsorted(uniq[order], codes)
    pos = np.clip(pos, 0, len(uniq) - 1)
    found = uniq[order][pos] == codes
    if not found.all():
        c = int(codes[~found][0])
        raise PosvitError(f"colour {(c >> 16) & 255, (c >> 8) & 255, c & 255} is not in the label colour table")
    return order[pos].astype(np.int64), table


def load_label_image(path: str | os.PathLike, colours=None, allow_rgb: bool = False):
    """Read a label image as class indices ``(H, W)``; RGB images map by colour only with ``allow_rgb``.

    Returns
    -------
    labels : ndarray of int64, shape (H, W)
    colours : list of (r, g, b) or None
        The colour table when the file was an RGB image.
    """
    try:
        return read_label_image(path), None
    except PosvitError as exc:
        if not allow_rgb or "colour image" not in str(exc):
            raise
    from posvit_cli.core.io.images import read_image

    return rgb_to_classes(read_image(path), colours)


def resize_labels_nearest(labels: np.ndarray, out_hw: tuple[int, int], sampling: str = "centre") -> np.ndarray:
    """Nearest-neighbour resize of a label map to ``out_hw`` (no new values).

    Parameters
    ----------
    labels : ndarray, shape (H, W, ...)
    out_hw : (int, int)
    sampling : {"centre", "floor"}
        ``centre`` samples the source pixel under each output pixel's centre (PIL's NEAREST);
        ``floor`` takes source index ``floor(i · H / oh)`` (torch's ``F.interpolate(mode="nearest")``, which the
        overclustering references use to resize masks and cluster maps).
    """
    labels = np.asarray(labels)
    H, W = labels.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (H, W) == (oh, ow):
        return labels
    return labels[nearest_indices(H, oh, sampling)[:, None], nearest_indices(W, ow, sampling)[None, :]]


def nearest_indices(n_in: int, n_out: int, sampling: str = "centre") -> np.ndarray:
    """Source index of each of ``n_out`` output positions for a nearest-neighbour resize of ``n_in`` positions.

    See :func:`resize_labels_nearest` for ``sampling``. Returns int64 indices in ``[0, n_in)``.
    """
    if sampling == "centre":
        idx = ((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64)
    elif sampling == "floor":
        # torch computes the scale in float32 as in/out and floors out_index · scale.
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    else:
        raise ValueError(f"sampling must be 'centre' or 'floor', not {sampling!r}")
    return np.minimum(idx, n_in - 1)

"""Applying a trained segmenter to many images, and reading ground truth in a model's class values.

The command line (``posvit segment apply`` / ``eval`` / ``bench``) only parses options and prints; the loop over
images, the choice of label-image format and the mapping of ground-truth files to class values live here.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, no_progress

__all__ = [
    "apply_segmenter",
    "check_outputs",
    "label_suffix",
    "read_ground_truth",
    "read_probabilities",
    "readable_images",
]

LABEL_FORMATS = ("auto", "png", "tif")


def label_suffix(fmt: str, class_values: Sequence[int]) -> str:
    """File suffix of the label images: ``.png`` for class values ≤ 255 (``auto`` or ``png``), else ``.tif``.

    Raises
    ------
    PosvitError
        For an unknown format, or ``png`` with class values above 255 (8-bit palette PNGs cannot hold them).
    """
    if fmt not in LABEL_FORMATS:
        raise PosvitError(f"unknown label format '{fmt}': use {', '.join(LABEL_FORMATS)}")
    fits_png = max(class_values) <= 255
    if fmt == "png" and not fits_png:
        raise PosvitError("class values above 255 do not fit a PNG: use --format tif")
    return ".png" if fmt == "png" or (fmt == "auto" and fits_png) else ".tif"


def readable_images(paths: Sequence[str], strict: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    """Split ``paths`` into images whose header can be read and skipped ``{"path", "reason"}`` entries.

    Each skipped image raises a :class:`~posvit_cli.core.errors.PosvitWarning`; with ``strict`` the first
    unreadable image raises its :class:`PosvitError` instead.
    """
    from posvit_cli.core.segment.segmenter import warn
    from posvit_cli.core.segment.training_labels import image_hw

    good, skipped = [], []
    for p in paths:
        try:
            image_hw(p)
            good.append(p)
        except PosvitError as exc:
            if strict:
                raise
            warn(f"skipped: {exc}")
            skipped.append({"path": p, "reason": str(exc)})
    return good, skipped


def check_outputs(paths: Sequence[str], output_dir: str | os.PathLike, *, suffix: str = ".png",
                  probabilities: bool = False, overwrite: bool = False) -> list[Path]:
    """The files :func:`apply_segmenter` will write, checked before anything is written.

    Parameters
    ----------
    paths : sequence of str
        The images to segment.
    output_dir : path
        The output folder (it need not exist yet).
    suffix : str
        Label image suffix (:func:`label_suffix`).
    probabilities : bool
        Whether ``STEM_probs.tif`` files are written too.
    overwrite : bool
        Whether existing output files may be replaced.

    Returns
    -------
    list of Path
        Every output file, in image order (label image, then probabilities).

    Raises
    ------
    PosvitError
        When an output would overwrite one of the input images, or (without ``overwrite``) naming the first
        output file that already exists.
    """
    from posvit_cli.core.io.labels import stem

    output_dir = Path(output_dir)
    inputs = {str(Path(p).resolve()) for p in paths}
    planned = []
    for p in paths:
        planned.append(output_dir / (stem(p) + suffix))
        if probabilities:
            planned.append(output_dir / f"{stem(p)}_probs.tif")
    for out in planned:
        if str(out.resolve()) in inputs:
            raise PosvitError(f"writing '{out}' would overwrite an input image: choose another output folder")
    if not overwrite:
        for out in planned:
            if out.exists():
                raise PosvitError(f"'{out}' already exists: pass --overwrite to replace it (or -o another folder)")
    return planned


def apply_segmenter(
    segmenter: Any,
    paths: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    token_source: Any = None,
    suffix: str = ".png",
    probabilities: bool = False,
    crf: Any = None,
    tile: int = 1024,
    device: str = "cpu",
    threads: int | None = None,
    progress: ProgressCallback = no_progress,
) -> list[dict[str, Any]]:
    """Segment every image and write ``OUTPUT_DIR/STEM{suffix}`` (and ``STEM_probs.tif`` with ``probabilities``).

    Parameters
    ----------
    segmenter : Segmenter
        A trained model (:func:`~posvit_cli.core.segment.segmenter.load_segmenter`).
    paths : sequence of str
        Readable image files (see :func:`readable_images`).
    output_dir : path
        Existing folder for the label images.
    token_source : TokenSource, optional
        ViT tokens of the images, when the model uses ViT features.
    suffix : str
        ``.png`` (palette PNG) or ``.tif`` (integer TIFF); see :func:`label_suffix`.
    probabilities : bool
        Also write the float32 ``(K, H, W)`` class probabilities, filled tile by tile through a memory map.
    crf : CrfConfig, optional
        Mean-field CRF refinement.
    tile : int
        Tile side in pixels (bounded memory for images of any size).
    device, threads
        Where the classifier and feature filters run.
    progress : ProgressCallback
        Called per tile within each image (task ``segment i/n``).

    Returns
    -------
    list of dict
        Per image: ``image``, ``labels`` (path written), ``probabilities`` (path or None), ``size`` ``[H, W]``,
        ``pixels_per_class`` ``{class name: count}`` and ``seconds``.

    Raises
    ------
    PosvitError
        When an output file would overwrite one of the input images. Files already written stay (each one is
        complete: they are written atomically).
    """
    from posvit_cli.core.io.labels import stem
    from posvit_cli.core.segment.segmenter import ProbabilityWriter, load_grey, segment_image, write_label_image

    output_dir = Path(output_dir)
    classes = segmenter.classes
    inputs = {str(Path(p).resolve()) for p in paths}
    results = []
    for i, p in enumerate(paths):
        t0 = time.perf_counter()
        out_path = output_dir / (stem(p) + suffix)
        if str(out_path.resolve()) in inputs:
            raise PosvitError(f"writing '{out_path}' would overwrite an input image: choose another output folder")
        grey = load_grey(p, segmenter.spec.intensity)
        reduced = (token_source.reduced(p, grey.shape, segmenter.spec.vit.dims, segmenter.shared_pca)
                   if token_source is not None else None)
        H, W = grey.shape
        probs_path = output_dir / f"{stem(p)}_probs.tif" if probabilities else None
        with contextlib.ExitStack() as stack:
            buffer: Any = False
            if probs_path is not None:
                buffer = stack.enter_context(ProbabilityWriter(probs_path, (len(classes), H, W), classes.names)).array
            labels, _ = segment_image(segmenter, grey, reduced, tile=tile, crf=crf, probabilities=buffer,
                                      device=device, threads=threads, progress=progress,
                                      task=f"segment {i + 1}/{len(paths)}")
        write_label_image(out_path, labels, classes)
        # One bincount over the value range instead of one comparison pass per class, in row bands: an int64
        # copy of a 10,000² px label image would be 800 MB.
        values = np.asarray(classes.values, dtype=np.int64)
        counts = np.zeros(int(values.max()) + 1, np.int64)
        for r in range(0, H, 512):
            counts += np.bincount(labels[r : r + 512].ravel(), minlength=counts.size)
        results.append({
            "image": p,
            "labels": str(out_path),
            "probabilities": str(probs_path) if probs_path else None,
            "size": [H, W],
            "pixels_per_class": {n: int(counts[v]) for v, n in zip(classes.values, classes.names)},
            "seconds": round(time.perf_counter() - t0, 3),
        })
    return results


def read_probabilities(path: str | os.PathLike, hw: tuple[int, int]) -> np.ndarray:
    """A ``(K, H, W)`` probability TIFF (``segment apply --probabilities``) as an ``(H, W, K)`` array.

    Raises
    ------
    PosvitError
        If the file cannot be read or its image size is not ``hw``.
    """
    import tifffile

    try:
        arr = tifffile.imread(str(path))
    except Exception as exc:
        raise PosvitError(f"cannot read probabilities '{path}' ({type(exc).__name__}: {exc})") from exc
    if arr.ndim != 3 or tuple(arr.shape[1:]) != tuple(hw):
        raise PosvitError(f"probabilities '{path}' have shape {arr.shape}; expected (K, {hw[0]}, {hw[1]})")
    return np.moveaxis(arr, 0, -1)


def read_ground_truth(path: str | os.PathLike, classes: Any = None, *, ignore_index: int | None = 255,
                      offset: int | None = None, check: Any = None) -> np.ndarray:
    """Ground truth in the scores' value space, shape ``(H, W)``: 0 = unlabelled (not scored), class k = k + 1.

    Ground truth is a dense mask (``docs/labels.md``): classes ``0 .. K-1`` and ``ignore_index`` for unlabelled
    pixels. Colour (RGB) masks are mapped through the model's colour table when ``classes`` has one, otherwise by
    the file's sorted colours (black = unlabelled).

    Parameters
    ----------
    path : path
        A PNG/TIFF mask.
    classes : ClassTable, optional
        The model's classes (``segmenter.classes``), for colour masks and models whose class values skip numbers.
    ignore_index : int, optional
        Mask value of unlabelled pixels; None (or negative) for none.
    offset : int, optional
        The reading of the last release (deprecated ``--gt-offset``): stored values plus ``offset``, 0 =
        unlabelled. None for the 0-based convention.
    check : LabelCheck, optional
        Collects the off-by-one evidence of every mask read (0-based convention only).
    """
    from posvit_cli.core.io.labels import read_label_image

    table = list(classes.colours) if classes is not None and classes.colours else "sorted"
    if offset is not None:
        old = read_label_image(path, "scribbles", colours=table)
        values = old.values if old.colours is None else _model_values(old.values, old.ignored, classes)
        return values + offset
    ignore = None if ignore_index is None or ignore_index < 0 else ignore_index
    mask = read_label_image(path, "mask", ignore_index=ignore, colours=table)
    if check is not None:
        check.add(mask)
    if mask.colours is not None:
        return _model_values(mask.values + 1, mask.ignored, classes)
    values = mask.values              # the mask is this function's own: edited in place, no copy of a huge mask
    values += 1
    values[mask.ignored] = 0
    return values


def _model_values(positions: np.ndarray, ignored: np.ndarray, classes: Any) -> np.ndarray:
    """Colour-table positions 1..K (0 = unlabelled) as the model's class values (its table may skip values)."""
    if classes is None or not classes.colours:
        return np.where(ignored, 0, positions)
    lut = np.asarray([0, *classes.values])
    return np.where(ignored, 0, lut[np.where(ignored, 0, positions)])

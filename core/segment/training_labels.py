"""Scribble label images for training: pairing with images, colour labels, validation, the class table.

Conventions (``docs/labels.md``): a scribble image has the image's size; 0 means unlabelled and value ``k + 1`` is
class ``k``. Colour (RGB) label images are mapped to classes by colour: black is unlabelled and the other colours,
sorted over the whole training set, are values 1, 2, ... (the table is returned so it can be printed). Label files are matched to images by file stem, optionally followed by a suffix such as ``_labels``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.io.images import image_size
from posvit_cli.core.io.labels import (
    decode_labels, label_files_by_stem, rgb_to_classes, sorted_colours, stem, warn_rare_colours,
)
from posvit_cli.core.segment.classes import ClassTable, LabelledImage

__all__ = [
    "LABEL_SUFFIXES",
    "TrainingLabels",
    "image_hw",
    "load_training_labels",
    "pair_label_files",
]

#: Suffixes tried after an image's stem when looking for its label file.
LABEL_SUFFIXES = ("", "_labels", "_label", "_scribbles", "_scribble", "_biased_labels", "_mask", "_gt")


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """Height and width of an image file without decoding its pixels (:func:`~posvit_cli.core.io.images.image_size`).

    Raises
    ------
    PosvitError
        If the file cannot be read as an image.
    """
    return image_size(path)


def pair_label_files(
    image_paths: Sequence[str], label_dir: str | os.PathLike, suffixes: Sequence[str] = LABEL_SUFFIXES
) -> dict[str, Path]:
    """Label file of each image: ``label_dir/STEM{suffix}.{png,tif,...}``, trying ``suffixes`` in order.

    An image is never its own label file, so labels may live in the image folder (``NAME_labels.png``).

    Raises
    ------
    PosvitError
        If ``label_dir`` is not a folder.
    """
    files = label_files_by_stem(label_dir)
    out = {}
    for p in image_paths:
        me = os.path.realpath(p)
        s = stem(p)
        for suffix in suffixes:
            hit = next((f for f in files.get(s + suffix, []) if os.path.realpath(f) != me), None)
            if hit is not None:
                out[p] = hit
                break
    return out


@dataclasses.dataclass
class TrainingLabels:
    """Training images with their scribbles, and what was found on the way.

    Attributes
    ----------
    images : list of LabelledImage
        Images that have at least one labelled pixel.
    classes : ClassTable
    unlabelled_images : list of str
        Images whose label file has no labelled pixel (left out of training).
    missing : list of str
        Images without a label file (left out).
    colour_table : list of ((r, g, b), int) or None
        Colour → class value, when the labels were colour images.
    """

    images: list[LabelledImage]
    classes: ClassTable
    unlabelled_images: list[str]
    missing: list[str]
    colour_table: list[tuple[tuple[int, int, int], int]] | None


def load_training_labels(
    image_paths: Sequence[str | os.PathLike],
    label_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    suffixes: Sequence[str] = LABEL_SUFFIXES,
) -> TrainingLabels:
    """Pair images with label files, check them, and build the class table.

    Parameters
    ----------
    image_paths : sequence of path
    label_dir : path
        Folder of label images named like the images (stem, optionally + a suffix of ``suffixes``).
    class_names : sequence of str, optional
        Names of the classes with values 1, 2, ...; by default the classes are the label values found.

    Raises
    ------
    PosvitError
        No image has a label file; a label image differs in size from its image; labels mix colour and
        index images; no labelled pixel at all; a named class has no labelled pixel; fewer than two classes.
    """
    paths = [str(p) for p in image_paths]
    found_by_path = pair_label_files(paths, label_dir, suffixes)
    # Label files kept next to their images (NAME_labels.png beside NAME.png) are not images to train on.
    label_files = {os.path.realpath(f) for f in found_by_path.values()}
    paths = [p for p in paths if os.path.realpath(p) not in label_files]
    stems = [stem(p) for p in paths]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise PosvitError(f"two images share the name '{dup}': label files are matched by name")
    found = {stem(p): found_by_path[p] for p in paths if p in found_by_path}
    missing_stems = [stem(p) for p in paths if p not in found_by_path]
    by_stem = dict(zip(stems, paths))
    if not found:
        raise PosvitError(
            f"no label file in '{label_dir}' matches the images (looked for NAME{{{','.join(s or '' for s in suffixes)}}}"
            f" with an image suffix, e.g. '{stems[0] if stems else 'NAME'}.png')"
        )
    raw: dict[str, np.ndarray] = {}
    kinds = set()
    for s, lab_path in found.items():
        img_path = by_stem[s]
        labels = decode_labels(lab_path)
        is_rgb = labels.ndim == 3
        if not is_rgb and labels.size and labels.min() >= 0 and labels.max() < 2**16:
            labels = labels.astype(np.uint16)  # int64 label maps of huge images would cost 8 bytes a pixel
        kinds.add(is_rgb)
        ih, iw = image_hw(img_path)
        if labels.shape[:2] != (ih, iw):
            raise PosvitError(
                f"labels '{lab_path}' are {labels.shape[0]}×{labels.shape[1]} px but image '{img_path}' is "
                f"{ih}×{iw} px: label images must have their image's size"
            )
        raw[s] = labels
    if len(kinds) > 1:
        raise PosvitError("the label images mix colour (RGB) and class-index images: use one kind")
    colour_table = None
    if kinds == {True}:
        # One table for the whole set: a colour missing from one image must not shift the others' classes.
        warn_rare_colours({str(found[s]): raw[s] for s in raw})
        colours = sorted_colours(raw.values())
        for s in raw:
            raw[s] = rgb_to_classes(raw[s], [(0, 0, 0)] + colours)  # black → 0, colour k → k + 1
        colour_table = [(tuple(int(v) for v in c), i + 1) for i, c in enumerate(colours)]

    values_per_image = {s: np.unique(v) for s, v in raw.items()}
    for s, vals in values_per_image.items():
        if vals.min() < 0:
            raise PosvitError(f"labels '{found[s]}' hold negative values")
    all_values = sorted(set(int(v) for vals in values_per_image.values() for v in vals) - {0})
    if not all_values:
        raise PosvitError("the label images hold no labelled pixel (0 means unlabelled; classes are 1, 2, ...)")
    if class_names:
        names = list(class_names)
        values = list(range(1, len(names) + 1))
        beyond = [v for v in all_values if v > len(names)]
        if beyond:
            raise PosvitError(f"label value {beyond[0]} has no name: {len(names)} class names were given")
        absent = [n for v, n in zip(values, names) if v not in all_values]
        if absent:
            v = values[names.index(absent[0])]
            shifted = ""
            if v == len(names) and len(absent) == 1:
                # 0..C-1 scribbles: the first class was painted as 0, which means unlabelled.
                shifted = (f"; if the scribbles hold 0..{len(names) - 1} they are 0-based: add 1 (0 = unlabelled, "
                           f"1..{len(names)} = classes)")
            raise PosvitError(f"class '{absent[0]}' (value {v}) has no labelled pixel in any label image{shifted}")
    else:
        values = all_values
        if colour_table:
            names = ["#%02x%02x%02x" % c for c, _ in colour_table]
        else:
            names = [f"class{v}" for v in values]
    colours = [c for c, _ in colour_table] if colour_table else None
    classes = ClassTable(values=values, names=names, colours=colours)
    images, empty = [], []
    for s, lab in raw.items():
        if not (lab != 0).any():
            empty.append(by_stem[s])
            continue
        images.append(LabelledImage(path=by_stem[s], labels=classes.to_index(lab)))
    missing = [by_stem[s] for s in missing_stems]
    return TrainingLabels(images, classes, empty, missing, colour_table)

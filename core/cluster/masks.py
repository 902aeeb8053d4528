"""Ground-truth masks of a store's images on the evaluation grid, mapped through the frame the encoder saw."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "MASK_SUFFIXES",
    "MaskSet",
    "labels_to_processed_frame",
    "load_masks",
    "store_size_mode",
]


@dataclasses.dataclass
class MaskSet:
    """Ground-truth masks of a store's images, resampled to the evaluation grid.

    Attributes
    ----------
    labels : ndarray of int32, shape (n_images, H, W)
        Class per evaluation pixel (``ignore_index`` where ignored), in store order.
    num_classes : int
    ignore_index : int or None
    class_names : list of str
    files : list of str
        The mask file of each image.
    resized : list of str
        Masks whose size differed from their image's (resized nearest, with a warning).
    """

    labels: np.ndarray
    num_classes: int
    ignore_index: int | None
    class_names: list
    files: list
    resized: list

    @property
    def eval_size(self) -> tuple[int, int]:
        return int(self.labels.shape[1]), int(self.labels.shape[2])

    def present_classes(self) -> np.ndarray:
        """Classes that occur in at least one kept pixel."""
        lab = self.labels.ravel()
        if self.ignore_index is not None:
            lab = lab[lab != self.ignore_index]
        return np.unique(lab)


MASK_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_gt", "_seg")


def load_masks(store, mask_dir, *, eval_size=(100, 100), ignore_index: int | None = 255,
               num_classes: int | None = None, class_names: Sequence[str] | None = None,
               progress: ProgressCallback | None = None) -> MaskSet:
    """Read every image's mask (matched by file stem) and bring it to the evaluation grid.

    A mask is first mapped onto the frame the encoder saw (the store's ``--size`` resize, and centre crop for
    ``crop:N``; nearest neighbour, pixel centres), then nearest-resized to ``eval_size`` the way the references do
    (``F.interpolate(mode="nearest")``). VOC palette PNGs decode to class indices.

    Raises
    ------
    PosvitError
        If masks are missing for some images (they are named), a mask holds a value ≥ ``num_classes`` that is not
        ``ignore_index``, or the class names do not fit.
    """
    from posvit_cli.core.io.labels import (
        LabelCheck, check_label_range, read_label_image, resize_labels_nearest,
    )

    records = store.records
    found = dict(zip((r.name for r in records), store_mask_files(store, mask_dir)))
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise PosvitError(f"{len(class_names)} class names given for {num_classes} classes")
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    eh, ew = (int(v) for v in eval_size)
    out = np.empty((len(records), eh, ew), dtype=np.int32)
    prog = report(progress)
    size_mode, patch = store_size_mode(store)
    resized, files = [], []
    max_label = -1
    check = LabelCheck("mask", num_classes)
    for i, r in enumerate(records):
        path = found[r.name]
        files.append(str(path))
        mask = read_label_image(path, "mask", ignore_index=ignore_index)
        _check_in_bands(check, mask)
        lab = mask.values
        if tuple(lab.shape) != tuple(r.orig_size):
            resized.append(str(path))
            warnings.warn(
                f"mask '{Path(path).name}' is {lab.shape[0]}×{lab.shape[1]} px but its image is "
                f"{r.orig_size[0]}×{r.orig_size[1]}: resized to the image (nearest)",
                PosvitWarning, stacklevel=2,
            )
            lab = resize_labels_nearest(lab, r.orig_size)
        lab = labels_to_processed_frame(lab, r, size_mode, patch)
        lab = resize_labels_nearest(lab, (eh, ew), sampling="floor")
        max_label = max(max_label, check_label_range(lab, path, num_classes, ignore_index)[0])
        out[i] = lab
        prog("read masks", i + 1, len(records))
    check.finish()
    if num_classes is None:
        num_classes = max_label + 1
        if num_classes < 1:
            raise PosvitError(f"every mask pixel in '{mask_dir}' is the ignore index {ignore_index}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    return MaskSet(out, int(num_classes), ignore_index, names, files, resized)


#: Mask rows per band of the off-by-one check: its copies stay small on a 10,000² px mask (0.8 GB as int64).
CHECK_BAND_ROWS = 512


def _check_in_bands(check, mask) -> None:
    """``check.add(mask)`` band by band: the same values and first files found, without whole-mask copies."""
    for r0 in range(0, mask.values.shape[0], CHECK_BAND_ROWS):
        check.add(mask.values[r0 : r0 + CHECK_BAND_ROWS], mask.source, mask.ignored[r0 : r0 + CHECK_BAND_ROWS])


def store_mask_files(store, mask_dir) -> list[Path]:
    """The mask file of every image of ``store``, in store order, matched by file stem (:data:`MASK_SUFFIXES`).

    Raises
    ------
    PosvitError
        If the folder does not exist or some images have no mask (the first five are named).
    """
    from posvit_cli.core.io.labels import find_label_files

    names = [r.name for r in store.records]
    found, missing = find_label_files(names, mask_dir, MASK_SUFFIXES)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PosvitError(
            f"no mask in '{mask_dir}' for {len(missing)} of {len(names)} images of '{store.source}': {shown} "
            "(masks are matched by file stem, e.g. img1.jpg ↔ img1.png)"
        )
    return [found[n] for n in names]


def store_size_mode(store):
    """How the store's images were resized for the encoder, and its patch size.

    Returns
    -------
    mode : SizeMode
        The store's ``--size`` (from its provenance; ``native`` when absent or unreadable).
    patch : int
        Patch size in pixels (1 when the store does not record one).
    """
    from posvit_cli.core.io.preprocess import parse_size

    try:
        mode = store.resize_mode
    except PosvitError:
        mode = parse_size("native")
    return mode, int(store.patch_size or 1)


def labels_to_processed_frame(lab, record, mode, patch):
    """Map a label image at the source image's size onto the image the encoder saw (same crop, same size).

    Parameters
    ----------
    lab : ndarray (H, W) of int
        Labels at the source image's size ``record.orig_size``.
    record : ImageRecord
        The store's record of that image (``proc_size``, ``orig_size``, ``meta``).
    mode, patch
        From :func:`store_size_mode`.

    Returns
    -------
    ndarray (h, w) of int
        Labels at ``record.proc_size`` (nearest neighbour, pixel centres).
    """
    from posvit_cli.core.io.labels import resize_labels_nearest
    from posvit_cli.core.io.preprocess import plan_resize

    ph, pw = record.proc_size
    if record.meta.get("tiles"):
        # Tiled extraction crops the remainder beyond the last whole patch at the bottom and right.
        return lab[:ph, :pw]
    if mode.kind == "crop":
        try:
            resize_hw, crop = plan_resize(tuple(record.orig_size), mode, patch)
        except PosvitError:
            resize_hw, crop = (ph, pw), None
        lab = resize_labels_nearest(lab, resize_hw)
        if crop is not None:
            top = (resize_hw[0] - crop[0]) // 2
            left = (resize_hw[1] - crop[1]) // 2
            lab = lab[top : top + crop[0], left : left + crop[1]]
        return resize_labels_nearest(lab, (ph, pw))
    return resize_labels_nearest(lab, (ph, pw))

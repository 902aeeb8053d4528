"""Label images (dense masks, scribbles, predictions): one reader, one convention, one value check.

The convention (``docs/labels.md`` has the full text):

- **dense masks** (ground truth: ``--masks``, ``--gt``, ``--truth``) store the class index ``0 .. C-1`` per
  pixel; the ignore value (``--ignore-index``, 255 by default) means unlabelled and is never scored;
- **scribbles** (``segment train --labels``) and the **predictions** ``segment apply`` writes store ``0`` for
  unlabelled and ``k + 1`` for class ``k``, so that class ``k`` of a mask is value ``k + 1`` of a scribble.

Greyscale and palette PNGs and integer TIFFs (8/16/32-bit) decode to their stored values; RGB label images are
mapped to values through an explicit colour table (black is unlabelled). :func:`read_label_image` is the reader
every command uses; :class:`LabelCheck` looks at the values of a whole run and warns once when they look shifted
by one against the convention.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.io.images import IMAGE_SUFFIXES

__all__ = [
    "ColourLabelsError",
    "LabelCheck",
    "LabelImage",
    "LabelImageError",
    "ROLES",
    "UnknownColourError",
    "check_label_range",
    "colour_codes",
    "as_label_values",
    "decode_labels",
    "find_label_files",
    "label_files_by_stem",
    "nearest_indices",
    "rare_colours",
    "read_label_image",
    "resize_labels_nearest",
    "rgb_to_classes",
    "sorted_colours",
    "stem",
    "warn_rare_colours",
]

#: What a label image is: a dense ``mask`` (0..C-1 and an ignore value), ``scribbles`` or a ``prediction``
#: (0 = unlabelled, value k + 1 = class k).
ROLES = ("mask", "scribbles", "prediction")


class LabelImageError(PosvitError):
    """A label image that cannot be read as labels."""


class ColourLabelsError(LabelImageError):
    """An RGB label image was given where no colour table says which colour is which class."""


class UnknownColourError(LabelImageError):
    """An RGB label image holds a colour that is not in the colour table."""


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
    """Validate a dense mask's class values; return (largest label, number of labelled pixels), ignored excluded.

    The largest label is -1 for a mask with no labelled pixel.

    Raises
    ------
    PosvitError
        For a negative label, or one ≥ ``num_classes`` that is not the ignore index (naming ``source``, and
        saying so when the mask looks 1-based).
    """
    kept = labels if ignore_index is None else labels[labels != ignore_index]
    if not kept.size:
        return -1, 0
    lo, hi = int(kept.min()), int(kept.max())
    if lo < 0:
        raise PosvitError(f"mask '{source}' holds the negative label {lo}")
    if num_classes is not None and hi >= num_classes:
        ign = f" and is not the ignore index {ignore_index}" if ignore_index is not None else ""
        hint = ""
        if hi == num_classes:
            hint = (f": labels look 1-based (classes are 0..{num_classes - 1}); subtract 1"
                    + (" (unlabelled pixels stay the ignore value)" if ignore_index is not None else ""))
        raise PosvitError(f"mask '{source}' holds label {hi}, which is ≥ --num-classes {num_classes}{ign}{hint}")
    return hi, int(kept.size)


# --------------------------------------------------------------------------------------------------------------
# Decoding


def decode_labels(path: str | os.PathLike) -> np.ndarray:
    """Decode a label file to its stored values ``(H, W)`` int32, or its colours ``(H, W, 3)`` uint8.

    Palette PNGs give their palette indices (VOC), greyscale PNGs and integer TIFFs (8/16/32-bit, first page)
    their values; an RGB(A) image whose three channels are equal is greyscale. Any other colour image comes
    back as colours, for :func:`rgb_to_classes`.

    Raises
    ------
    LabelImageError
        If the file cannot be decoded, holds non-integer values, or has an unsupported shape.
    """
    p = Path(path)
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(str(p), key=0)
            if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] > 4:
                arr = np.moveaxis(arr, 0, -1)
        else:
            from PIL import Image

            with Image.open(p) as im:
                im.load()
                if im.mode in ("P", "L", "I", "I;16", "1"):
                    arr = np.asarray(im)
                elif im.mode in ("LA", "PA"):
                    arr = np.asarray(im)[..., 0]
                else:
                    arr = np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise LabelImageError(f"cannot read label image '{path}' ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        if arr.shape[-1] not in (3, 4):
            raise LabelImageError(f"label image '{path}' has shape {arr.shape}; expected (H, W) or (H, W, 3)")
        arr = arr[..., :3]
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
            arr = arr[..., 0]
        else:
            return np.ascontiguousarray(arr.astype(np.uint8))
    if arr.ndim != 2:
        raise LabelImageError(f"label image '{path}' has shape {arr.shape}; expected (H, W)")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise LabelImageError(f"label image '{path}' holds non-integer values; store class indices as integers")
    return as_label_values(arr)


def as_label_values(arr: np.ndarray) -> np.ndarray:
    """Integer label values as int32, or int64 when a value does not fit in int32.

    int32 rather than int64 halves what a 10,000² px label image costs (400 MB, not 800 MB) and keeps the
    arithmetic of the convention (``-1`` for unlabelled, ``value - 1``) safe, which uint8/uint16 would not.
    """
    arr = np.asarray(arr)
    info = np.iinfo(np.int32)
    if arr.dtype.kind in "biu" and arr.dtype.itemsize <= 2:
        return arr.astype(np.int32)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        return arr.astype(np.int64)
    return arr.astype(np.int32)


def colour_codes(rgb: np.ndarray) -> np.ndarray:
    """``0xRRGGBB`` integer code of each pixel of an ``(..., 3)`` colour array, int64."""
    rgb = np.asarray(rgb)[..., :3].astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def sorted_colours(rgb_images: Iterable[np.ndarray]) -> list[tuple[int, int, int]]:
    """The distinct colours other than black of some RGB label images, sorted by ``0xRRGGBB`` code.

    This is the default colour table: the ``k``-th colour is class ``k`` (mask value ``k``, scribble value
    ``k + 1``). Build it once over every image of a run, so that all images share it.
    """
    codes = np.unique(np.concatenate([np.unique(colour_codes(a)).ravel() for a in rgb_images] or [np.zeros(0, int)]))
    return [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in codes.tolist() if c != 0]


def rare_colours(rgb_images: Mapping[str, np.ndarray], *, max_pixels: int = 20,
                 max_fraction: float = 0.001) -> list[tuple[tuple[int, int, int], int, str]]:
    """Colours other than black that cover only a handful of the labelled pixels of some RGB label images.

    Such colours are almost always painting accidents (an anti-aliased brush edge, a JPEG round trip) that
    :func:`sorted_colours` would make classes of their own, shifting the values of the real classes.

    Parameters
    ----------
    rgb_images : mapping of str to ndarray, shape (H, W, 3) or (H, W, 4)
        Label images by file name.
    max_pixels : int
        A colour is rare when it covers fewer pixels than this, summed over all images, ...
    max_fraction : float
        ... and less than this fraction of all labelled (non-black) pixels.

    Returns
    -------
    list of ((r, g, b), int, str)
        Each rare colour, its pixel count and the file holding most of them, fewest pixels first.
    """
    counts: dict[int, int] = {}
    where: dict[int, tuple[int, str]] = {}
    for name, rgb in rgb_images.items():
        codes, n = np.unique(colour_codes(rgb), return_counts=True)
        for c, k in zip(codes.tolist(), n.tolist()):
            if c == 0:
                continue
            counts[c] = counts.get(c, 0) + k
            if k > where.get(c, (0, ""))[0]:
                where[c] = (k, name)
    labelled = sum(counts.values())
    rare = sorted((k, c) for c, k in counts.items() if k < max_pixels and k < max_fraction * labelled)
    return [(((c >> 16) & 255, (c >> 8) & 255, c & 255), k, where[c][1]) for k, c in rare]


def warn_rare_colours(rgb_images: Mapping[str, np.ndarray], **limits) -> list[tuple[tuple[int, int, int], int, str]]:
    """Issue one :class:`PosvitWarning` naming the colours :func:`rare_colours` finds (and return them)."""
    rare = rare_colours(rgb_images, **limits)
    if rare:
        (r, g, b), k, name = rare[0]
        more = f" and {len(rare) - 1} more colour(s) with as few pixels" if len(rare) > 1 else ""
        warnings.warn(
            f"colour #{r:02x}{g:02x}{b:02x} labels only {k} px (in '{name}'){more}: every colour is a class of its "
            "own, so these shift the class values; paint the labels with exact colours and no anti-aliasing, or "
            "save them as an indexed (palette) PNG",
            PosvitWarning, stacklevel=2,
        )
    return rare


def rgb_to_classes(rgb: np.ndarray, colours: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """Map an RGB label image to colour-table positions: ``colours[i]`` → ``i``.

    Parameters
    ----------
    rgb : ndarray, shape (H, W, 3) or (H, W, 4)
    colours : sequence of (r, g, b)

    Returns
    -------
    ndarray of int64, shape (H, W)

    Raises
    ------
    UnknownColourError
        If the image holds a colour that is not in ``colours``.
    """
    codes = colour_codes(rgb)
    table = np.array([(int(r) << 16) | (int(g) << 8) | int(b) for r, g, b in colours], dtype=np.int64)
    order = np.argsort(table, kind="stable")
    pos = np.clip(np.searchsorted(table[order], codes), 0, max(len(table) - 1, 0))
    found = table[order][pos] == codes if len(table) else np.zeros(codes.shape, bool)
    if not found.all():
        c = int(codes[~found].flat[0])
        raise UnknownColourError(f"colour {((c >> 16) & 255, (c >> 8) & 255, c & 255)} is not in the label colour "
                                 f"table ({len(table)} colours)")
    return order[pos].astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# The reader


@dataclasses.dataclass(frozen=True)
class LabelImage:
    """A label image read under the convention of its role.

    Attributes
    ----------
    values : ndarray of int32 (int64 for values beyond int32), shape (H, W)
        Stored values in the role's convention: for a ``mask`` the class index (or the ignore value), for
        ``scribbles`` and ``prediction`` 0 (unlabelled) or ``class + 1``.
    ignored : ndarray of bool, shape (H, W)
        Pixels that are unlabelled (the ignore value of a mask, 0 of scribbles and predictions).
    role : str
    source : str
        The file, for messages.
    colours : list of (r, g, b) or None
        The colour table used when the file was an RGB image (class ``k`` at position ``k``).
    """

    values: np.ndarray
    ignored: np.ndarray
    role: str
    source: str
    colours: list | None = None

    @property
    def classes(self) -> np.ndarray:
        """Class indices ``0 .. C-1`` per pixel, ``-1`` where unlabelled; the dtype of ``values``, ``(H, W)``."""
        idx = self.values.copy()        # one array, edited in place: a 10,000² px image costs 400 MB, not 1.6 GB
        if self.role != "mask":
            idx -= 1
        idx[self.ignored] = -1
        return idx


def read_label_image(
    path: str | os.PathLike,
    role: str = "mask",
    *,
    ignore_index: int | None = 255,
    colours: Sequence[tuple[int, int, int]] | str | None = None,
) -> LabelImage:
    """Read a mask, scribble or prediction image under the label convention.

    Parameters
    ----------
    path : path-like
        Greyscale or palette PNG, integer TIFF, or an RGB image with ``colours``.
    role : {"mask", "scribbles", "prediction"}
        ``mask``: values are class indices ``0 .. C-1`` and ``ignore_index`` is unlabelled; ``scribbles`` and
        ``prediction``: 0 is unlabelled and value ``k + 1`` is class ``k``.
    ignore_index : int or None
        The unlabelled value of a mask (``None``: every pixel counts). Not used for the other roles.
    colours : sequence of (r, g, b), "sorted" or None
        Colour table of RGB label images: colour ``k`` is class ``k``; black, when not in the table, is
        unlabelled. ``"sorted"`` takes this file's own colours (:func:`sorted_colours`) -- only safe when every
        file holds every class. ``None`` rejects RGB images.

    Returns
    -------
    LabelImage

    Raises
    ------
    ColourLabelsError
        An RGB image without a colour table.
    UnknownColourError
        An RGB image with a colour outside the table.
    LabelImageError
        The file cannot be decoded, or holds negative values.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    raw = decode_labels(path)
    table = None
    if raw.ndim == 3:
        if colours is None:
            raise ColourLabelsError(
                f"label image '{path}' is a colour (RGB) image: save class indices as a greyscale or palette "
                "PNG or an integer TIFF (see docs/labels.md), or give the colour table"
            )
        table = sorted_colours([raw]) if isinstance(colours, str) else [tuple(int(v) for v in c) for c in colours]
        black = (0, 0, 0)
        if black in table:
            pos = rgb_to_classes(raw, table)
            unlabelled = np.zeros(pos.shape, bool)
        else:
            pos = rgb_to_classes(raw, [black] + table) - 1
            unlabelled = pos < 0
        if role == "mask":
            fill = ignore_index if ignore_index is not None else -1
            values = np.where(unlabelled, fill, pos)
            ignored = unlabelled
        else:
            values = np.where(unlabelled, 0, pos + 1)
            ignored = unlabelled
        return LabelImage(as_label_values(values), ignored, role, str(path), table)
    if raw.size and raw.min() < 0:
        raise LabelImageError(f"label image '{path}' holds the negative value {int(raw.min())}")
    if role == "mask":
        ignored = np.zeros(raw.shape, bool) if ignore_index is None else raw == ignore_index
    else:
        ignored = raw == 0
    return LabelImage(raw, ignored, role, str(path), None)


# --------------------------------------------------------------------------------------------------------------
# The off-by-one check


#: Rows of a label image the off-by-one check reads at once.
LABEL_BAND_ROWS = 512


class LabelCheck:
    """Watches the values of every label image of a run and warns once when they look shifted by one.

    The rules (``C`` = number of classes when known from ``--num-classes``, ``--class-names`` or the model):

    - ``mask`` (classes ``0 .. C-1``): with ``C`` known, the masks look **1-based** when no mask holds 0 and
      the values found are ``{1 .. C}`` or a subset holding ``C``; or when they hold exactly ``0 .. C`` (1-based
      with 0 as unlabelled, the scribble convention). With ``C`` unknown: no mask holds 0 and the values found
      are exactly ``{1 .. M}``, ``M ≥ 2`` (class 0 would be empty).
    - ``prediction`` (values ``1 .. C``, 0 = unlabelled): a posvit prediction labels every pixel, so predictions
      look **0-based** when some pixel holds 0 and (``C`` known) no prediction holds ``C``, or (``C`` unknown)
      when some pixel holds 0 at all.
    - ``scribbles``: 0 is normal there (most of the image); with ``C`` known they look 0-based when value ``C``
      never occurs but 0 .. C-1 all do. Without ``C`` nothing can be told.

    Parameters
    ----------
    role : {"mask", "scribbles", "prediction"}
    num_classes : int, optional
    fix : str, optional
        How the user fixes it on this command (e.g. ``"pass --gt-offset -1"``); a generic hint by default.
    """

    def __init__(self, role: str = "mask", num_classes: int | None = None, fix: str | None = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.role = role
        self.num_classes = num_classes
        self.fix = fix
        self.present: set[int] = set()
        self.first_with: dict[int, str] = {}
        self.warned: str | None = None

    def add(self, image: LabelImage | np.ndarray, source: str | os.PathLike | None = None,
            ignored: np.ndarray | None = None) -> None:
        """Record the labelled values of one image (a :class:`LabelImage`, or values with their ignore mask)."""
        if isinstance(image, LabelImage):
            values, ignored, source = image.values, image.ignored, source or image.source
        else:
            values = np.asarray(image)
        if self.role != "mask":
            ignored = None  # 0 is evidence here, not something to drop
        found: set[int] = set()
        for r in range(0, values.shape[0] if values.ndim else 0, LABEL_BAND_ROWS):  # bands: a huge mask costs a band
            band = values[r : r + LABEL_BAND_ROWS]
            kept = band if ignored is None else band[~ignored[r : r + LABEL_BAND_ROWS]]
            if kept.size:
                lo, hi = int(kept.min()), int(kept.max())
                found.update((np.flatnonzero(np.bincount(kept.ravel() - lo)) + lo).tolist() if hi - lo < 1 << 20
                             else np.unique(kept).tolist())
        for v in sorted(found):
            if v not in self.present:
                self.present.add(int(v))
                self.first_with[int(v)] = str(source)

    def verdict(self) -> str | None:
        """The warning the values so far deserve, or None."""
        P, C = self.present, self.num_classes
        if not P:
            return None
        top = max(P)
        if self.role == "mask":
            generic = "subtract 1 from the mask values (keep unlabelled pixels at the ignore value)"
            if C is not None and C >= 1:
                if 0 not in P and C in P and P <= set(range(1, C + 1)):
                    why = ""
                elif C >= 2 and P == set(range(0, C + 1)):
                    why = " with 0 as unlabelled (the scribble convention)"
                    generic = "subtract 1 and store unlabelled pixels as the ignore value (255)"
                else:
                    return None
                return (f"{self.first_with[C]} holds {_span(P)} but classes are 0..{C - 1}: labels look 1-based"
                        f"{why}; {self.fix or generic}")
            if 0 not in P and top >= 2 and P == set(range(1, top + 1)):
                return (f"{self.first_with[top]} holds {_span(P)} and no mask holds 0, so class 0 would be empty: "
                        f"labels look 1-based; {self.fix or generic}, or give --num-classes/--class-names if "
                        "class 0 is really absent")
            return None
        generic = "add 1 (classes are values 1..C, 0 = unlabelled)"
        if self.role == "prediction":
            if 0 in P and (C is None or C not in P):
                classes = f"classes are 1..{C}" if C is not None else "predictions label classes 1..C"
                return (f"{self.first_with[0]} holds {_span(P)} but {classes} (0 = unlabelled): values look "
                        f"0-based; {self.fix or generic}")
            return None
        if C is not None and C >= 2 and C not in P and P == set(range(0, C)):
            return (f"{self.first_with[C - 1]} holds {_span(P)} and never {C}, but classes are 1..{C} "
                    f"(0 = unlabelled): scribbles look 0-based; {self.fix or generic}")
        return None

    def finish(self) -> str | None:
        """Warn (one :class:`PosvitWarning`) if the run's values look shifted; return the message or None."""
        msg = self.verdict()
        if msg and not self.warned:
            self.warned = msg
            warnings.warn(msg, PosvitWarning, stacklevel=2)
        return msg


def _span(values: set[int]) -> str:
    v = sorted(values)
    if v == list(range(v[0], v[-1] + 1)) and len(v) >= 2:
        return f"{v[0]}..{v[-1]}"
    return ", ".join(str(x) for x in v[:8]) + (", …" if len(v) > 8 else "")


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

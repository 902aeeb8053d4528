"""Where a store's tokens lie on the source image, and the source image as a figure shows it.

A token grid ``(h, w)`` covers a rectangle of the original image, its *footprint*: the whole image for the
``native``, ``short:N``, ``long:N`` and ``square:N`` resize rules (the image was resized, not cut), the centre crop
for ``crop:N``, and the top-left ``proc_size`` pixels for images tiled at native size (the remainder beyond the
last whole patch is dropped). Token ``(r, c)`` covers footprint pixels ``[top + r·Δy, top + (r+1)·Δy) ×
[left + c·Δx, left + (c+1)·Δx)`` with ``Δy = height / h`` and ``Δx = width / w``, in original pixels; for
``square:N`` Δy ≠ Δx, and figures stretch the token grid back to the image's true aspect ratio.

Coordinates follow images: ``x`` is the column (left → right), ``y`` the row (top → bottom), in pixels of the
original image; a pixel ``(x, y)`` covers ``[x, x+1) × [y, y+1)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning

__all__ = [
    "Footprint",
    "find_source_image",
    "fit_size",
    "load_display_image",
    "parse_point",
    "query_token",
    "token_footprint",
]

UNITS = ("px", "token", "frac")


@dataclasses.dataclass(frozen=True)
class Footprint:
    """The rectangle of the original image that a token grid covers, in original pixels.

    Attributes
    ----------
    top, left, bottom, right : float
        Edges in pixels of the original image (``bottom`` and ``right`` exclusive).
    grid : (int, int)
        The token grid ``(h, w)`` laid over the rectangle.
    image_size : (int, int)
        ``(height, width)`` of the original image in pixels.
    cropped : bool
        True when the rectangle is smaller than the image (centre crop or tiled remainder).
    """

    top: float
    left: float
    bottom: float
    right: float
    grid: tuple[int, int]
    image_size: tuple[int, int]

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def aspect(self) -> float:
        """Width over height of the covered rectangle (the true aspect ratio of the pictures drawn)."""
        return self.width / self.height

    @property
    def cropped(self) -> bool:
        H, W = self.image_size
        return self.top > 0 or self.left > 0 or self.bottom < H or self.right < W

    def pixel_to_token(self, x: float, y: float) -> tuple[int, int] | None:
        """The token ``(row, col)`` holding original pixel ``(x, y)``, or None outside the footprint."""
        if not (self.left <= x < self.right and self.top <= y < self.bottom):
            return None
        h, w = self.grid
        col = min(int(math.floor((x - self.left) / self.width * w)), w - 1)
        row = min(int(math.floor((y - self.top) / self.height * h)), h - 1)
        return row, col

    def token_centre(self, row: int, col: int) -> tuple[float, float]:
        """Centre ``(x, y)`` of token ``(row, col)`` in original pixels."""
        h, w = self.grid
        return (self.left + (col + 0.5) * self.width / w, self.top + (row + 0.5) * self.height / h)


def token_footprint(record, preprocessing: dict | None = None) -> Footprint:
    """The footprint of one stored image's token grid.

    Parameters
    ----------
    record : ImageRecord
        From :attr:`FeatureStore.records` (``orig_size``, ``proc_size``, ``grid``, ``meta``).
    preprocessing : dict, optional
        The store provenance's ``preprocessing`` (its ``size`` rule). Missing or unreadable: the grid is taken
        to cover the whole image.

    Returns
    -------
    Footprint
    """
    from posvit_cli.core.io.preprocess import parse_size, plan_resize

    H, W = (int(v) for v in record.orig_size)
    ph, pw = (int(v) for v in record.proc_size)
    gh, gw = (int(v) for v in record.grid)
    full = Footprint(0.0, 0.0, float(H), float(W), (gh, gw), (H, W))
    spec = (preprocessing or {}).get("size", "native")
    try:
        mode = parse_size(spec)
    except PosvitError:
        return full
    if mode.kind == "native" and "tiles" in (record.meta or {}):
        # Tiling at native size feeds the decoded pixels 1:1 and drops the remainder beyond whole patches.
        return Footprint(0.0, 0.0, float(min(ph, H)), float(min(pw, W)), (gh, gw), (H, W))
    if mode.kind == "crop" and gh and gw and ph % gh == 0:
        patch = ph // gh
        try:
            resize_hw, crop = plan_resize((H, W), mode, patch)
        except PosvitError:
            return full
        if crop is None or tuple(crop) != (ph, pw):
            return full
        top = (resize_hw[0] - crop[0]) // 2
        left = (resize_hw[1] - crop[1]) // 2
        sy, sx = H / resize_hw[0], W / resize_hw[1]
        return Footprint(top * sy, left * sx, (top + crop[0]) * sy, (left + crop[1]) * sx, (gh, gw), (H, W))
    return full


def fit_size(height: float, width: float, long_side: int) -> tuple[int, int]:
    """``(h, w)`` in whole pixels with the aspect of ``height × width`` and the longer side ``long_side``."""
    if height <= 0 or width <= 0:
        raise PosvitError(f"cannot draw an image of {height}×{width} px")
    s = long_side / max(height, width)
    return max(1, int(round(height * s))), max(1, int(round(width * s)))


def parse_point(text: str) -> tuple[float, float]:
    """Read ``"X,Y"`` (column, row) as two numbers.

    Raises
    ------
    PosvitError
        If the text is not two comma-separated numbers.
    """
    parts = [p.strip() for p in str(text).replace(";", ",").split(",")]
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise PosvitError(f"cannot read query point '{text}': write X,Y (column, row), e.g. --at 120,64") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise PosvitError(f"query point '{text}' is not finite")
    return x, y


def query_token(point: tuple[float, float], units: str, footprint: Footprint, name: str) -> tuple[int, int]:
    """The token ``(row, col)`` a query point names.

    Parameters
    ----------
    point : (float, float)
        ``(x, y)``: column and row.
    units : {"px", "token", "frac"}
        ``px``: pixels of the original image; ``token``: token column and row (whole numbers from 0);
        ``frac``: fractions of the footprint's width and height in [0, 1) (the same place on images of any size).
    footprint : Footprint
    name : str
        Image name for the error message.

    Raises
    ------
    PosvitError
        If the point lies outside the image (or outside the part of it the features cover).
    """
    x, y = point
    h, w = footprint.grid
    if units == "token":
        if x != int(x) or y != int(y) or not (0 <= x < w and 0 <= y < h):
            raise PosvitError(
                f"query point {x:g},{y:g} (tokens) is outside image '{name}': its grid is {w} columns × {h} rows "
                f"(x in 0..{w - 1}, y in 0..{h - 1})"
            )
        return int(y), int(x)
    if units == "frac":
        if not (0 <= x <= 1 and 0 <= y <= 1):
            raise PosvitError(f"query point {x:g},{y:g} (fractions) is outside image '{name}': use values in [0, 1]")
        return min(int(y * h), h - 1), min(int(x * w), w - 1)
    if units != "px":
        raise PosvitError(f"unknown units '{units}': use {', '.join(UNITS)}")
    hit = footprint.pixel_to_token(x, y)
    if hit is None:
        H, W = footprint.image_size
        if 0 <= x < W and 0 <= y < H:
            raise PosvitError(
                f"query point {x:g},{y:g} px lies in image '{name}' but outside the part its features cover "
                f"(x in [{footprint.left:g}, {footprint.right:g}), y in [{footprint.top:g}, {footprint.bottom:g}))"
            )
        raise PosvitError(
            f"query point {x:g},{y:g} px is outside image '{name}' ({W}×{H} px: x in [0, {W}), y in [0, {H}))"
        )
    return hit


def find_source_image(path: str, store_source: str | None = None, image_dir: str | os.PathLike | None = None) -> Path | None:
    """Locate the source image of a stored record.

    Tries, in order: ``image_dir / basename`` (when given), the path as stored, the path relative to the
    store's folder, and ``basename`` in the store's folder. Returns None when none exists.
    """
    p = Path(path)
    candidates: list[Path] = []
    if image_dir is not None:
        candidates.append(Path(image_dir) / p.name)
    candidates.append(p)
    if store_source and store_source != "-":
        base = Path(store_source).resolve().parent
        if not p.is_absolute():
            candidates.append(base / p)
        candidates.append(base / p.name)
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_display_image(
    path: str | os.PathLike, footprint: Footprint, out_hw: tuple[int, int], intensity: str = "auto"
) -> np.ndarray:
    """The source image cut to the footprint and resized for a figure.

    Parameters
    ----------
    path : path-like
        The source image (any format :func:`~posvit_cli.core.io.images.read_image` reads).
    footprint : Footprint
        The rectangle to show, in original pixels.
    out_hw : (int, int)
        Output ``(height, width)`` in pixels.
    intensity : str
        Intensity rule of :func:`~posvit_cli.core.io.images.to_float` (the store's, so 16-bit micrographs look as
        the encoder saw them).

    Returns
    -------
    ndarray of uint8, shape (out_h, out_w, 3)
        Greyscale images are repeated to three channels; alpha is dropped.
    """
    from PIL import Image

    from posvit_cli.core.io.images import read_image

    raw = read_image(path)
    levels = _display_levels(raw, intensity)  # over every channel, alpha included, as to_float takes them
    if raw.ndim == 3 and raw.shape[-1] not in (1, 3):
        raw = raw[..., :1] if raw.shape[-1] == 2 else raw[..., :3]
    H, W = raw.shape[:2]
    if (H, W) != tuple(footprint.image_size):
        warnings.warn(
            f"'{path}' is {W}×{H} px but was {footprint.image_size[1]}×{footprint.image_size[0]} px when its "
            "features were extracted; the features are stretched over the image as it is now",
            PosvitWarning,
            stacklevel=2,
        )
        sy, sx = H / footprint.image_size[0], W / footprint.image_size[1]
    else:
        sy = sx = 1.0
    t, b = int(round(footprint.top * sy)), int(round(footprint.bottom * sy))
    l, r = int(round(footprint.left * sx)), int(round(footprint.right * sx))
    crop = raw[max(t, 0): max(b, t + 1), max(l, 0): max(r, l + 1)]
    # Grey stays one channel until after the resize (LANCZOS treats channels alike, so repeating it afterwards
    # gives the same picture); the crop is brought to uint8 in row bands. A 10,000² px micrograph then costs its
    # decoded pixels and one uint8 copy, not float32 RGB copies of several GB.
    u8 = np.empty(crop.shape[:2] + crop.shape[2:3], np.uint8)
    step = max(1, DISPLAY_BAND_PIXELS // max(crop.shape[1] * (crop.shape[2] if crop.ndim == 3 else 1), 1))
    for a in range(0, crop.shape[0], step):
        u8[a : a + step] = np.clip(np.round(levels(crop[a : a + step]) * 255.0), 0, 255).astype(np.uint8)
    pil = Image.fromarray(u8[..., 0] if u8.ndim == 3 and u8.shape[-1] == 1 else u8)
    if pil.size != (out_hw[1], out_hw[0]):
        pil = pil.resize((out_hw[1], out_hw[0]), Image.Resampling.LANCZOS)
    out = np.asarray(pil)
    return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out


#: Pixels (times channels) per band when a source image is brought to uint8 for display.
DISPLAY_BAND_PIXELS = 1 << 22


def _display_levels(raw: np.ndarray, intensity: str):
    """The intensity mapping of :func:`~posvit_cli.core.io.images.to_float` for ``raw`` as a function of a band of
    its pixels: per-image statistics (min-max, percentiles) are taken once over the whole image, then every band
    maps to the same float32 values the whole-image ``to_float`` gives (``read_image`` already replaced
    non-finite pixels)."""
    from posvit_cli.core.io.images import parse_intensity, to_float

    rule, pct = parse_intensity(intensity)
    if raw.dtype == np.bool_ or rule == "dtype" or (rule == "auto" and raw.dtype == np.uint8):
        return lambda band: to_float(band, "dtype")  # elementwise: a band maps as it would in the whole image
    if rule in ("auto", "minmax"):
        # min/max commute with the monotonic float32 cast: the same numbers without a float32 copy.
        lo, hi = float(np.float32(raw.min())), float(np.float32(raw.max()))
    else:
        lo, hi = (float(v) for v in np.percentile(raw.astype(np.float32), pct))
    if hi <= lo:
        return lambda band: np.zeros(band.shape, np.float32)
    return lambda band: np.clip((band.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)

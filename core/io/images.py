"""Finding and decoding images: PNG, JPEG, TIFF (8/16-bit, float, multi-page), RGBA and palette images.

Images are returned as NumPy arrays in their own dtype; :func:`to_float` maps them to ``float32`` in [0, 1] with
an explicit intensity rule, because 16-bit and float micrographs rarely use their type's full range.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = [
    "IMAGE_SUFFIXES",
    "list_images",
    "parse_intensity",
    "read_image",
    "to_float",
    "to_channels",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
LIST_SUFFIXES = (".txt", ".lst", ".list")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_images(inputs: Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Expand files, folders and text lists of paths into a sorted, de-duplicated list of image files.

    Parameters
    ----------
    inputs : sequence of path-like
        Image files, folders (their image files; with ``recursive`` also sub-folders), or ``.txt`` files
        listing one path per line (relative paths are taken relative to the list file; ``#`` comments).
    recursive : bool
        Descend into sub-folders.

    Raises
    ------
    PosvitError
        If an input does not exist or no image is found.
    """
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise PosvitError(f"input '{item}' does not exist")
        if p.is_dir():
            it: Iterable[Path] = p.rglob("*") if recursive else p.iterdir()
            found.extend(sorted(q for q in it if q.is_file() and _is_image(q)))
        elif p.suffix.lower() in LIST_SUFFIXES:
            for line in p.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                q = Path(line)
                if not q.is_absolute():
                    q = p.parent / q
                if not q.is_file():
                    raise PosvitError(f"'{line}' listed in '{p}' does not exist")
                found.append(q)
        elif p.is_file():
            found.append(p)
    seen: set[str] = set()
    out = []
    for q in found:
        key = str(q.resolve())
        if key not in seen:
            seen.add(key)
            out.append(q)
    if not out:
        where = ", ".join(str(i) for i in inputs)
        hint = " (sub-folders are searched only with --recursive)" if not recursive else ""
        raise PosvitError(f"no images found in {where}{hint}; looked for {', '.join(IMAGE_SUFFIXES)}")
    return out


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to an array of shape ``(H, W)`` or ``(H, W, C)`` in its stored dtype.

    TIFF files are read with tifffile (first page of a stack; channel-first ``(C, H, W)`` with C ≤ 4 is moved
    last). Other formats go through Pillow; palette images are expanded to RGB(A).

    Raises
    ------
    PosvitError
        If the file cannot be decoded.
    """
    p = Path(path)
    try:
        if p.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(str(p), key=0)
            if arr.ndim == 3 and arr.shape[0] <= 4 and arr.shape[-1] > 4:
                arr = np.moveaxis(arr, 0, -1)
        else:
            from PIL import Image

            with Image.open(p) as im:
                im.load()
                if im.mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode in ("LA", "PA"):
                    im = im.convert("L")
                elif im.mode == "CMYK" or im.mode == "YCbCr":
                    im = im.convert("RGB")
                elif im.mode == "1":
                    im = im.convert("L")
                arr = np.asarray(im)
    except PosvitError:
        raise
    except Exception as exc:
        raise PosvitError(f"cannot decode image '{path}' ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] > 4):
        raise PosvitError(f"image '{path}' has shape {arr.shape}; expected (H, W) or (H, W, C) with C <= 4")
    return arr


def parse_intensity(spec: str) -> tuple[str, tuple[float, float] | None]:
    """Parse an intensity rule: ``auto``, ``dtype``, ``minmax`` or ``percentile:LO,HI``."""
    s = spec.strip().lower()
    if s in ("auto", "dtype", "minmax"):
        return s, None
    if s.startswith("percentile:"):
        try:
            lo, hi = (float(v) for v in s.split(":", 1)[1].split(","))
        except ValueError:
            raise PosvitError(f"intensity '{spec}': write percentile:LO,HI, e.g. percentile:0.5,99.5") from None
        if not 0 <= lo < hi <= 100:
            raise PosvitError(f"intensity '{spec}': need 0 <= LO < HI <= 100")
        return "percentile", (lo, hi)
    raise PosvitError(f"unknown intensity rule '{spec}': use auto, dtype, minmax or percentile:LO,HI")


def to_float(img: np.ndarray, intensity: str = "auto") -> np.ndarray:
    """Map an image to ``float32`` in [0, 1].

    Parameters
    ----------
    img : ndarray, shape (H, W) or (H, W, C)
    intensity : str
        ``auto``: 8-bit images are divided by 255, every other dtype (16-bit, 32-bit, float micrographs) is
        min-max scaled per image; ``dtype``: divide by the dtype's maximum (floats are clipped to [0, 1]);
        ``minmax``: per-image min-max; ``percentile:LO,HI``: per-image percentile stretch, clipped.

    Returns
    -------
    ndarray of float32, same shape as ``img``
    """
    rule, pct = parse_intensity(intensity)
    if img.dtype == np.bool_:
        return img.astype(np.float32)
    if rule == "auto":
        rule = "dtype" if img.dtype == np.uint8 else "minmax"
    if rule == "dtype":
        if np.issubdtype(img.dtype, np.integer):
            info = np.iinfo(img.dtype)
            out = (img.astype(np.float32) - info.min) / float(info.max - info.min)
        else:
            out = np.clip(img.astype(np.float32), 0.0, 1.0)
        return out
    x = img.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.nanmin(np.where(finite, x, np.nan)) if finite.any() else 0.0)
    if rule == "minmax":
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = (float(v) for v in np.percentile(x, pct))
    if hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Return a float image ``(H, W, channels)``: greyscale is replicated, alpha dropped, RGB → luminance for 1.

    Raises
    ------
    PosvitError
        For a two-channel image that is not grey + alpha.
    """
    if img.ndim == 2:
        img = img[..., None]
    c = img.shape[-1]
    if c == 2:  # grey + alpha
        img = img[..., :1]
    elif c == 4:
        img = img[..., :3]
    c = img.shape[-1]
    if channels == c:
        return img
    if channels == 3 and c == 1:
        return np.repeat(img, 3, axis=-1)
    if channels == 1 and c == 3:
        lum = img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114
        return lum[..., None].astype(np.float32)
    raise PosvitError(f"cannot feed a {c}-channel image to a {channels}-channel encoder")

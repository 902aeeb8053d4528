"""Finding and decoding images: PNG, JPEG, TIFF (8/16-bit, float, multi-page), RGBA and palette images.

Images are returned as NumPy arrays in their own dtype; :func:`to_float` maps them to ``float32`` in [0, 1] with
an explicit intensity rule, because 16-bit and float micrographs rarely use their type's full range.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning

__all__ = [
    "IMAGE_SUFFIXES",
    "PAGE_MARK",
    "image_size",
    "list_images",
    "page_entry",
    "parse_intensity",
    "read_image",
    "split_page",
    "tiff_pages",
    "to_float",
    "to_channels",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
LIST_SUFFIXES = (".txt", ".lst", ".list")
PAGE_MARK = "#page="  # ``stack.tif#page=2``: page 2 (0-based) of a multi-page TIFF, as its own image


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_images(inputs: Sequence[str | os.PathLike], recursive: bool = False, tiff_pages: str = "first") -> list[Path]:
    """Expand files, folders and text lists of paths into a sorted, de-duplicated list of image entries.

    Parameters
    ----------
    inputs : sequence of path-like
        Image files, folders (their image files; with ``recursive`` also sub-folders), or ``.txt`` files
        listing one path per line (relative paths are taken relative to the list file; ``#`` comments).
        One page of a multi-page TIFF is named ``stack.tif#page=N`` (0-based).
    recursive : bool
        Descend into sub-folders.
    tiff_pages : {"first", "all"}
        ``first``: a multi-page TIFF is one image, its first page (:func:`read_image` warns);
        ``all``: every page of a multi-page TIFF is its own image entry ``stack.tif#page=N``.

    Raises
    ------
    PosvitError
        If an input does not exist, no image is found, or ``tiff_pages`` is unknown.
    """
    if tiff_pages not in ("first", "all"):
        raise PosvitError(f"unknown TIFF page rule '{tiff_pages}': use first or all")
    found: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists() and split_page(p)[1] is not None and split_page(p)[0].is_file():
            found.append(p)
        elif not p.exists():
            raise PosvitError(f"input '{item}' does not exist")
        elif p.is_dir():
            it: Iterable[Path] = p.rglob("*") if recursive else p.iterdir()
            found.extend(sorted(q for q in it if q.is_file() and _is_image(q)))
        elif p.suffix.lower() in LIST_SUFFIXES:
            found.extend(_listed_paths(p))
        elif p.is_file():
            found.append(p)
    if tiff_pages == "all":
        found = [e for q in found for e in _page_entries(q)]
    seen: set[str] = set()
    out = []
    for q in found:
        file, page = split_page(q)
        key = f"{file.resolve()}{'' if page is None else PAGE_MARK + str(page)}"
        if key not in seen:
            seen.add(key)
            out.append(q)
    if not out:
        where = ", ".join(str(i) for i in inputs)
        hint = " (sub-folders are searched only with --recursive)" if not recursive else ""
        raise PosvitError(f"no images found in {where}{hint}; looked for {', '.join(IMAGE_SUFFIXES)}")
    return out


def _listed_paths(list_file: Path) -> list[Path]:
    """The image entries named in a text list, one a line, relative to the list's folder; ``#`` comments."""
    out = []
    for line in list_file.read_text().splitlines():
        line = re.split(r"#(?!page=\d)", line, maxsplit=1)[0].strip()  # a comment, not a page mark
        if not line:
            continue
        q = Path(line)
        if not q.is_absolute():
            q = list_file.parent / q
        if not split_page(q)[0].is_file():
            raise PosvitError(f"'{line}' listed in '{list_file}' does not exist")
        out.append(q)
    return out


def _page_entries(entry: Path) -> list[Path]:
    """A multi-page TIFF as one entry per page (``stack.tif#page=N``); any other entry as itself."""
    if split_page(entry)[1] is not None or not _is_tiff(entry):
        return [entry]
    n_pages, _ = tiff_pages(entry)
    return [page_entry(entry, i) for i in range(n_pages)] if n_pages > 1 else [entry]


def split_page(path: str | os.PathLike) -> tuple[Path, int | None]:
    """Split an image entry into its file and, for one page of a multi-page TIFF (``stack.tif#page=2``), the page.

    Returns
    -------
    file : Path
    page : int or None
        0-based page index; ``None`` when the entry names a whole file.
    """
    base, sep, num = str(path).rpartition(PAGE_MARK)
    if sep and num.isdigit() and base.lower().endswith((".tif", ".tiff")):
        return Path(base), int(num)
    return Path(path), None


def page_entry(path: str | os.PathLike, page: int) -> Path:
    """The image entry of page ``page`` (0-based) of a multi-page TIFF: ``stack.tif#page=2``."""
    return Path(f"{path}{PAGE_MARK}{page}")


def _is_tiff(p: Path) -> bool:
    return p.suffix.lower() in (".tif", ".tiff")


def _tiff_page_hw(shape: Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` of a TIFF page of ``shape`` ``(H, W)``, ``(H, W, C)`` or channel-first ``(C, H, W)``."""
    if len(shape) == 3 and shape[0] <= 4 and shape[-1] > 4:
        return int(shape[1]), int(shape[2])
    return int(shape[0]), int(shape[1])


def tiff_pages(path: str | os.PathLike) -> tuple[int, tuple[int, ...]]:
    """The number of image planes of a TIFF's first series and the series' shape, read from the header only.

    Reduced-resolution pages of a pyramid and thumbnails are not counted (they are not in the first series).

    Raises
    ------
    PosvitError
        If the file is not a readable TIFF.
    """
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            return len(series.pages), tuple(int(v) for v in series.shape)
    except Exception as exc:
        raise PosvitError(f"cannot decode image '{path}' ({type(exc).__name__}: {exc})") from exc


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` in pixels of an image entry, read from the file's header without decoding its pixels.

    Lets a caller refuse an image too large to decode (a small compressed TIFF can declare 30000×30000 px)
    before :func:`read_image` allocates it.

    Raises
    ------
    PosvitError
        If the file cannot be read as an image, or names a page it does not have.
    """
    p, page = split_page(path)
    try:
        if _is_tiff(p):
            import tifffile

            with tifffile.TiffFile(str(p)) as tf:
                pages = tf.series[0].pages
                if page is not None and page >= len(pages):
                    raise PosvitError(f"'{path}': the TIFF has {len(pages)} pages (0 to {len(pages) - 1})")
                return _tiff_page_hw(pages[page or 0].shape)
        from PIL import Image

        with Image.open(p) as im:  # lazy: reads the header only
            w, h = im.size
        return int(h), int(w)
    except PosvitError:
        raise
    except Exception as exc:
        raise PosvitError(f"cannot decode image '{path}' ({type(exc).__name__}: {exc})") from exc


def _read_tiff(p: Path, page: int | None, entry: str) -> np.ndarray:
    """One page of a TIFF (the first unless ``page`` is given), warning when a stack is cut to its first page."""
    import tifffile

    with tifffile.TiffFile(str(p)) as tf:
        series = tf.series[0]
        n_pages = len(series.pages)
        if page is not None and page >= n_pages:
            raise PosvitError(f"'{entry}': the TIFF has {n_pages} pages (0 to {n_pages - 1})")
        if page is None and n_pages > 1:
            warnings.warn(
                f"'{entry}' is a stack of {n_pages} pages (shape {tuple(series.shape)}); only the first page is "
                "read (posvit extract --tiff-pages all takes every page as its own image)",
                PosvitWarning, stacklevel=3,
            )
        arr = series.pages[page or 0].asarray()
    if arr.ndim == 3 and arr.shape[0] <= 4 and arr.shape[-1] > 4:
        arr = np.moveaxis(arr, 0, -1)
    return arr


def _read_pil(p: Path) -> np.ndarray:
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
        return np.asarray(im)


def _replace_non_finite(arr: np.ndarray, entry: str) -> np.ndarray:
    """Replace NaN and ±inf pixels of a float image by its lowest finite value (0 if none), with a warning."""
    if not np.issubdtype(arr.dtype, np.floating):
        return arr
    finite = np.isfinite(arr)
    if finite.all():
        return arr
    n_bad = int(arr.size - np.count_nonzero(finite))
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    fill = float(arr[finite].min()) if finite.any() else 0.0
    what = f"{n_nan} NaN" + (f" and {n_bad - n_nan} infinite" if n_bad > n_nan else "")
    warnings.warn(
        f"'{entry}': {what} of {arr.size} pixel values replaced with "
        + (f"the image's lowest finite value {fill:g}" if finite.any() else "0 (no pixel is finite)"),
        PosvitWarning, stacklevel=3,
    )
    return np.where(finite, arr, np.asarray(fill, arr.dtype))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image to an array of shape ``(H, W)`` or ``(H, W, C)`` in its stored dtype.

    TIFF files are read with tifffile: the first page of a stack (with a :class:`PosvitWarning` naming the
    page count), or page ``N`` (0-based) of an entry ``stack.tif#page=N`` (see :func:`list_images`);
    channel-first ``(C, H, W)`` with C ≤ 4 is moved last. Other formats go through Pillow; palette images are
    expanded to RGB(A). NaN and infinite pixels of float images are replaced by the image's lowest finite value,
    with a :class:`PosvitWarning` saying how many.

    Raises
    ------
    PosvitError
        If the file cannot be decoded.
    """
    p, page = split_page(path)
    try:
        arr = _read_tiff(p, page, str(path)) if _is_tiff(p) else _read_pil(p)
    except PosvitError:
        raise
    except Exception as exc:
        raise PosvitError(f"cannot decode image '{path}' ({type(exc).__name__}: {exc})") from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] > 4):
        raise PosvitError(f"image '{path}' has shape {arr.shape}; expected (H, W) or (H, W, C) with C <= 4")
    return _replace_non_finite(arr, str(path))


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
        # In place on our own float32 copy: a 10,000² px image costs one 400 MB array, not three.
        out = img.astype(np.float32)
        if np.issubdtype(img.dtype, np.integer):
            info = np.iinfo(img.dtype)
            out -= info.min
            out /= float(info.max - info.min)
        else:
            np.clip(out, 0.0, 1.0, out=out)
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
    x -= lo
    x /= hi - lo
    return np.clip(x, 0.0, 1.0, out=x)


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

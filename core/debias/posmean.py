"""Per-position mean removal (``posmean``) and the dataset means of ``blank --fill mean``: one bounded pass.

The positional part of a token that is the same in every image is, averaged over a dataset of varied content, the
mean token at its grid position. :func:`store_means` reads every image of a store once, in row bands, resamples it
to one **reference grid** (the store's most common token grid, shrunk to at most :data:`MAX_FIELD_TOKENS`
positions keeping its aspect ratio) and adds it to a float64 sum per position; it also sums every stored token
(not resampled) for the per-channel dataset mean. The ``posmean`` head subtracts the mean field *minus its own mean
over positions*, so each image keeps the dataset's global mean token: only what varies with position is removed,
and a store without a positional field is left unchanged up to float rounding.

Resampling (:func:`resample_grid`) is bilinear with the token *centres* aligned: token ``i`` of an ``n``-token
axis sits at ``(i + 0.5) / n`` of the image, so dst token ``i`` reads the source at ``(i + 0.5)·n_src/n_dst − 0.5``
(clamped to the first/last token: constant beyond the outer centres). The same grid is returned unchanged.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["MAX_FIELD_TOKENS", "axis_weights", "reference_grid", "resample_grid", "store_means"]

#: Most positions of the reference grid (128 × 128): bounds the float64 sum (C·8 bytes a position) and the head file.
MAX_FIELD_TOKENS = 16384


def axis_weights(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear weights along one axis with token centres aligned.

    Returns
    -------
    lo, hi : ndarray of int64, shape (n_dst,)
        The two source tokens each dst token reads.
    frac : ndarray of float64, shape (n_dst,)
        Weight of ``hi`` (``lo`` gets ``1 − frac``).
    """
    pos = (np.arange(n_dst, dtype=np.float64) + 0.5) * (n_src / n_dst) - 0.5
    pos = np.clip(pos, 0.0, n_src - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_src - 1)
    return lo, hi, pos - lo


def resample_grid(field: np.ndarray, size: tuple[int, int], rows: tuple[int, int] | None = None) -> np.ndarray:
    """Resample a token field bilinearly to another grid, token centres aligned (see the module docstring).

    Parameters
    ----------
    field : ndarray, shape (h, w, C)
    size : (int, int)
        The new grid ``(H, W)``.
    rows : (int, int), optional
        Only dst rows ``start:stop`` (for row bands of huge grids).

    Returns
    -------
    ndarray of field's float dtype, shape (stop − start, W, C)
    """
    h, w = field.shape[:2]
    H, W = int(size[0]), int(size[1])
    start, stop = rows if rows is not None else (0, H)
    if (h, w) == (H, W):
        return field[start:stop]
    ylo, yhi, fy = (a[start:stop] for a in axis_weights(h, H))
    xlo, xhi, fx = axis_weights(w, W)
    dtype = field.dtype if field.dtype in (np.float32, np.float64) else np.float32
    fy = fy.astype(dtype)[:, None, None]
    fx = fx.astype(dtype)[None, :, None]
    band = field[ylo] * (1 - fy) + field[yhi] * fy
    return (band[:, xlo] * (1 - fx) + band[:, xhi] * fx).astype(dtype, copy=False)


def reference_grid(store, max_tokens: int = MAX_FIELD_TOKENS) -> tuple[int, int]:
    """The grid the mean field is kept on: the most common token grid, shrunk to ``max_tokens`` positions."""
    h, w = Counter(tuple(r.grid) for r in store.records).most_common(1)[0][0]
    if h * w > max_tokens:
        scale = (max_tokens / (h * w)) ** 0.5
        h, w = max(1, int(h * scale)), max(1, int(w * scale))
    return int(h), int(w)


def _add_image(store, index: int, acc, channel_sum, band_bytes: int) -> None:
    """Add one image, resampled to ``acc``'s grid, to ``acc`` (skipped when None), and its tokens to ``channel_sum``.

    Source rows are read in bands ``[start − 1, stop)``: the extra row lets a dst row whose two source rows straddle
    the band boundary be interpolated in the band where its lower source row ``hi`` falls, so each dst row is added
    once and each source token counted once.
    """
    h, w = store.record(index).grid
    C = channel_sum.shape[0]
    rows = max(2, int(band_bytes // max(1, w * C * 4)))
    if acc is not None:
        H, W = acc.shape[:2]
        ylo, yhi, fy = axis_weights(h, H)
        xlo, xhi, fx = axis_weights(w, W)
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        first = max(0, start - 1)
        band = store.feature_rows(index, "final", first, stop).astype(np.float64)
        channel_sum += band[start - first:].sum(axis=(0, 1))
        if acc is None:
            continue
        mine = np.nonzero((yhi >= start) & (yhi < stop))[0]
        if mine.size == 0:
            continue
        f = fy[mine][:, None, None]
        part = band[ylo[mine] - first] * (1 - f) + band[yhi[mine] - first] * f
        acc[mine] += part[:, xlo] * (1 - fx[None, :, None]) + part[:, xhi] * fx[None, :, None]


def store_means(store, grid: tuple[int, int] | None = None, *, band_bytes: int = 32 * 2**20,
                progress: ProgressCallback | None = None) -> dict:
    """One bounded pass over a store's ``final`` tokens: the mean token field on ``grid`` and the channel means.

    Parameters
    ----------
    store : FeatureStore
    grid : (int, int), optional
        The reference grid (:func:`reference_grid`); None: channel means only.
    band_bytes : int
        Upper bound of one row band's float32 size (the band is held as float64, twice that).
    progress : callable, optional
        ``progress("mean tokens", done, total)``.

    Returns
    -------
    dict
        ``field``: float64 ``(H, W, C)`` mean token at each reference position (None without ``grid``);
        ``channel_mean``: float64 ``(C,)`` mean of every stored token; ``images``, ``tokens``, ``grids``
        (distinct source grids).

    Raises
    ------
    PosvitError
        For a store without images or ``final`` tokens.
    """
    progress = report(progress)
    if len(store) == 0:
        raise PosvitError(f"'{store.source}' holds no images")
    C = int(store.channels)
    acc = None if grid is None else np.zeros((int(grid[0]), int(grid[1]), C), dtype=np.float64)
    channel_sum = np.zeros(C, dtype=np.float64)
    tokens = 0
    grids = set()
    progress("mean tokens", 0, len(store))
    for rec in store.records:
        _add_image(store, rec.index, acc, channel_sum, band_bytes)
        tokens += rec.grid[0] * rec.grid[1]
        grids.add(tuple(int(v) for v in rec.grid))
        progress("mean tokens", rec.index + 1, len(store))
    return {"field": None if acc is None else acc / len(store), "channel_mean": channel_sum / max(1, tokens),
            "images": len(store), "tokens": int(tokens), "grids": sorted(grids)}

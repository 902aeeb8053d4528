"""The numbers behind the pictures: PCA colourings, similarity maps, label statistics, upsampling and colour.

Pure functions on NumPy arrays. Token grids are ``(h, w, C)`` with row 0 at the top: an array, or a lazy grid
(an object with ``shape`` and ``rows(start, stop)``, such as :class:`~posvit_cli.core.viz.pictures.StoreGrid`) that
the PCA and similarity passes read in bands of whole token rows (:data:`CHUNK_TOKENS`), so a huge image is never
held whole. Maps are ``(h, w)``; colour images are ``(H, W, 3)`` ``uint8``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = [
    "CHUNK_TOKENS",
    "PCABasis",
    "blend",
    "colormap_rgb",
    "cosine_similarity_map",
    "fit_pca",
    "foreground_mask",
    "grid_bands",
    "grid_channels",
    "grid_rows",
    "grid_shape",
    "label_palette",
    "labels_rgb",
    "pca_rgb",
    "position_eta_squared",
    "similarity_distance_correlation",
    "to_uint8",
    "upsample",
]

UPSAMPLE_METHODS = ("nearest", "bilinear")


# --------------------------------------------------------------------------------------------------------------
# PCA → RGB


#: Tokens per float64 block of the PCA and similarity passes: memory stays bounded on a huge image's grid (a
#: 625×625×384 grid is 1.2 GB in float64; a block of it, whole token rows, about 50 MB).
CHUNK_TOKENS = 16_384


def grid_shape(tokens) -> tuple[int, int, int]:
    """``(h, w, C)`` of a token grid: an array or a lazy grid (an object with ``shape`` and ``rows(start, stop)``)."""
    shape = tuple(int(v) for v in np.shape(tokens))
    if len(shape) != 3:
        raise PosvitError(f"features must be a token grid (h, w, C), got shape {shape}")
    return shape


def grid_rows(tokens, start: int, stop: int) -> np.ndarray:
    """Token rows ``start:stop`` of a grid, shape ``(stop - start, w, C)``.

    A lazy grid (such as :class:`~posvit_cli.core.viz.pictures.StoreGrid`) reads only those rows from its store,
    so a huge image is never held whole.
    """
    read = getattr(tokens, "rows", None)
    return np.asarray(read(start, stop)) if callable(read) else np.asarray(tokens)[start:stop]


def grid_bands(tokens):
    """``(start, stop, rows)`` bands of whole token rows, about :data:`CHUNK_TOKENS` tokens each (one row at least)."""
    h, w, _ = grid_shape(tokens)
    step = max(1, CHUNK_TOKENS // max(w, 1))
    for a in range(0, h, step):
        b = min(h, a + step)
        yield a, b, grid_rows(tokens, a, b)


def grid_channels(tokens, channels: Sequence[int]) -> np.ndarray:
    """Only the given channels of a token grid, shape ``(h, w, len(channels))``, read band by band."""
    h, w, _ = grid_shape(tokens)
    chans = list(channels)
    parts = [band[..., chans] for _, _, band in grid_bands(tokens)]
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, w, len(chans)), np.float32)


def _blocks(tokens, rows: np.ndarray | None = None):
    """``(h·w, C)`` tokens as float64 blocks of whole token rows (only ``rows`` when given)."""
    _, w, C = grid_shape(tokens)
    for a, b, band in grid_bands(tokens):
        X = band.reshape(-1, C).astype(np.float64)
        if not np.isfinite(X).all():
            raise PosvitError("features hold NaN or inf values: cannot compute a PCA")
        yield X if rows is None else X[rows[a * w : b * w]]


def _zscore_stats(tokens: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and divisor (the standard deviation, 1 for a constant channel) over ``rows``, in two
    block passes (mean, then squared deviations) as exact as a whole-array ``std``."""
    n, s1 = 0, 0.0
    for X in _blocks(tokens, rows):
        n += X.shape[0]
        s1 = s1 + X.sum(0)
    mu = s1 / max(n, 1)
    ss = 0.0
    for X in _blocks(tokens, rows):
        ss = ss + ((X - mu) ** 2).sum(0)
    sd = np.sqrt(ss / max(n, 1))
    # A constant channel carries nothing; dividing it by 1 keeps it at zero instead of NaN.
    return mu, np.where(sd > 0, sd, 1.0)


def _prepared_blocks(tokens: np.ndarray, mask: np.ndarray | None, standardise: bool):
    """The float64 blocks a PCA sees: the ``mask`` tokens, z-scored over them when ``standardise``."""
    rows = None if mask is None else np.asarray(mask, bool).ravel()
    stats = _zscore_stats(tokens, rows) if standardise else None
    for X in _blocks(tokens, rows):
        yield X if stats is None else (X - stats[0]) / stats[1]


@dataclasses.dataclass
class PCABasis:
    """Principal axes of patch features and the colour range of their scores.

    Attributes
    ----------
    mean : ndarray, shape (C,)
        Mean of the (standardised) features the axes were fitted on.
    components : ndarray, shape (k, C)
        Unit principal axes, largest variance first. Signs are fixed so that each axis's largest-magnitude
        loading is positive (the same features give the same colours on every run).
    explained : ndarray, shape (k,)
        Fraction of the total variance along each axis.
    low, high : ndarray, shape (k,)
        Score range mapped to colour intensities 0 and 1 (min-max, or percentiles with ``clip_percentile``).
    standardise : bool
        Whether every image's channels are z-scored (over its own, foreground, tokens) before projection.
    """

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    low: np.ndarray
    high: np.ndarray
    standardise: bool

    def scores(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Principal scores of one token grid, shape ``(h, w, k)``."""
        h, w, _ = np.shape(tokens)
        if mask is None or not self.standardise:
            blocks = _prepared_blocks(tokens, None, self.standardise)
        else:  # z-scored over the foreground, applied to every token (the background is blacked out later)
            stats = _zscore_stats(tokens, np.asarray(mask, bool).ravel())
            blocks = ((X - stats[0]) / stats[1] for X in _blocks(tokens))
        return np.concatenate([(X - self.mean) @ self.components.T for X in blocks], axis=0).reshape(h, w, -1)

    def to_rgb(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Colour image of one token grid, shape ``(h, w, 3)``, float in [0, 1].

        Component ``i`` drives channel ``i`` (PC1 red, PC2 green, PC3 blue); tokens outside ``mask`` are black.
        """
        s = self.scores(tokens, mask)
        span = np.where(self.high > self.low, self.high - self.low, 1.0)
        rgb = np.clip((s - self.low) / span, 0.0, 1.0)
        if rgb.shape[-1] < 3:
            rgb = np.concatenate([rgb, np.zeros(rgb.shape[:2] + (3 - rgb.shape[-1],))], axis=-1)
        if mask is not None:
            rgb = rgb * np.asarray(mask, bool)[..., None]
        return rgb


def fit_pca(
    grids: Sequence[np.ndarray],
    k: int = 3,
    *,
    standardise: bool = False,
    masks: Sequence[np.ndarray | None] | None = None,
    clip_percentile: float = 0.0,
) -> PCABasis:
    """Fit principal axes on the tokens of one or several images (a shared PCA when several).

    Parameters
    ----------
    grids : sequence of ndarray or lazy grids, each (h, w, C)
        Token grids (grids may differ in size; channels must agree); lazy grids are read in row bands. Indexed twice each, so a lazy sequence
        that reads images on demand keeps memory bounded.
    k : int
        Number of components (3 for RGB).
    standardise : bool
        Z-score every channel per image (over its foreground tokens) before pooling. The reference figures use
        both settings: without it, a few high-variance channels (often the positional ones) dominate the
        colours; with it, every channel weighs the same, which can reveal or hide a positional ramp.
    masks : sequence of (h, w) bool or None, optional
        Foreground tokens per image; only these are fitted and coloured.
    clip_percentile : float
        Map the ``p``-th and ``(100 − p)``-th percentile of each score to 0 and 1 instead of its min and max
        (0 = min-max, as the references do; a few outlier tokens otherwise wash the colours out).

    Returns
    -------
    PCABasis
        The score range is taken over all images together, so a shared PCA colours every image alike.

    Raises
    ------
    PosvitError
        For no tokens, mismatched channels or non-finite features.
    """
    if not grids:
        raise PosvitError("no images to fit a PCA on")
    masks = list(masks) if masks is not None else [None] * len(grids)
    if not (0.0 <= clip_percentile < 50.0):
        raise PosvitError(f"clip percentile must be in [0, 50), got {clip_percentile}")
    def prepared(j):
        t = grids[j]
        if np.shape(t)[-1] != C:
            raise PosvitError(f"images have {C} and {np.shape(t)[-1]} channels: a shared PCA needs the same encoder")
        return _prepared_blocks(t, masks[j], standardise)

    C = int(np.shape(grids[0])[-1])
    # Two passes over the grids (sums, then scores) keep a shared PCA over many images in O(C² + 3·tokens)
    # memory: ``grids`` may be a lazy sequence reading each image from a store when indexed.
    n = 0
    s1 = np.zeros(C)
    s2 = np.zeros((C, C))
    for j in range(len(grids)):
        for X in prepared(j):
            n += X.shape[0]
            s1 += X.sum(0)
            s2 += X.T @ X
    if n < 2:
        raise PosvitError("fewer than 2 tokens to fit a PCA on (an empty foreground mask?)")
    mean = s1 / n
    cov = s2 / n - np.outer(mean, mean)
    kk = max(1, min(k, C))
    if C > 32:
        from scipy.sparse.linalg import eigsh

        # Only the top k eigenpairs (Lanczos): ~20× faster than a full eigh of a 384² covariance. A fixed start
        # vector keeps the result identical from run to run.
        evals, evecs = eigsh(cov, k=kk, which="LA", v0=np.ones(C))
    else:
        evals, evecs = np.linalg.eigh(cov)
        evals, evecs = evals[C - kk:], evecs[:, C - kk:]
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)
    comps = evecs[:, order].T
    big = np.argmax(np.abs(comps), axis=1)
    comps = comps * np.sign(comps[np.arange(kk), big])[:, None]
    total = float(np.clip(np.trace(cov), 1e-300, None))
    scores = np.concatenate([(X - mean) @ comps.T for j in range(len(grids)) for X in prepared(j)], axis=0)
    if clip_percentile > 0:
        low, high = np.percentile(scores, [clip_percentile, 100 - clip_percentile], axis=0)
    else:
        low, high = scores.min(0), scores.max(0)
    return PCABasis(mean, comps, evals / total, low, high, bool(standardise))


def pca_rgb(
    tokens: np.ndarray,
    *,
    standardise: bool = False,
    mask: np.ndarray | None = None,
    clip_percentile: float = 0.0,
) -> tuple[np.ndarray, PCABasis]:
    """Per-image PCA of a token grid coloured as RGB (PC1 → red, PC2 → green, PC3 → blue).

    The published recipe: flatten ``(h, w, C)`` to ``(h·w, C)``, optionally z-score each channel, fit a
    3-component PCA on the image's tokens, and min-max each component to [0, 1].

    Returns
    -------
    rgb : ndarray of float, shape (h, w, 3)
        In [0, 1]; black outside ``mask``.
    basis : PCABasis
        Its ``explained`` gives the variance fractions shown in figure titles.
    """
    basis = fit_pca([tokens], 3, standardise=standardise, masks=[mask], clip_percentile=clip_percentile)
    return basis.to_rgb(tokens, mask), basis


def foreground_mask(tokens: np.ndarray, *, standardise: bool = True, threshold: float = 0.5) -> np.ndarray:
    """Foreground tokens by thresholding the first principal component of one image.

    The first component is min-max scaled to [0, 1] and cut at ``threshold``. A PCA's sign is arbitrary, so
    the side that holds more of the grid's border tokens is taken as background (objects rarely fill the
    border of a photograph).

    Returns
    -------
    ndarray of bool, shape (h, w)
    """
    if not (0.0 < threshold < 1.0):
        raise PosvitError(f"foreground threshold must be between 0 and 1, got {threshold}")
    basis = fit_pca([tokens], 1, standardise=standardise)
    pc1 = basis.scores(tokens)[..., 0]
    lo, hi = float(pc1.min()), float(pc1.max())
    v = (pc1 - lo) / (hi - lo) if hi > lo else np.zeros_like(pc1)
    fg = v > threshold
    border = np.zeros(fg.shape, bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    if fg[border].mean() > (~fg)[border].mean():
        fg = ~fg
    return fg


# --------------------------------------------------------------------------------------------------------------
# Similarity and label statistics


def cosine_similarity_map(tokens: np.ndarray, row: int, col: int, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity of one query token to every token of the same image.

    ``sim = ⟨f_q, f_ij⟩ / (‖f_q‖ ‖f_ij‖ + eps)`` on the raw features, as in the reference figures. The query
    token is set to exactly 1 (its similarity with itself, free of rounding).

    Parameters
    ----------
    tokens : ndarray, shape (h, w, C)
    row, col : int
        Query token.

    Returns
    -------
    ndarray of float64, shape (h, w)
        Values in [-1, 1].
    """
    h, w, _ = grid_shape(tokens)
    if not (0 <= row < h and 0 <= col < w):
        raise PosvitError(f"query token ({row}, {col}) is outside the {h}×{w} grid")
    q = grid_rows(tokens, row, row + 1)[0, col].astype(np.float64)
    q_norm = np.linalg.norm(q)
    sim = np.empty(h * w)
    # Band by band: a huge grid is never copied whole (as float64 it would be 1.2 GB for 625×625×384).
    start = 0
    for X in _blocks(tokens):
        sim[start : start + X.shape[0]] = (X @ q) / (np.linalg.norm(X, axis=1) * q_norm + eps)
        start += X.shape[0]
    sim = np.clip(sim, -1.0, 1.0).reshape(h, w)
    sim[row, col] = 1.0
    return sim


def similarity_distance_correlation(sim: np.ndarray, row: int, col: int) -> float:
    """Pearson correlation of similarity with closeness (−distance in tokens) to the query, query excluded.

    Near 1 when similarity simply falls off with distance, as it does for features dominated by position;
    near 0 when it follows content spread over the image. NaN when either is constant.
    """
    h, w = sim.shape
    yy, xx = np.mgrid[0:h, 0:w]
    closeness = -np.hypot(yy - row, xx - col)
    keep = np.ones((h, w), bool)
    keep[row, col] = False
    a, b = sim[keep].astype(np.float64), closeness[keep].astype(np.float64)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def position_eta_squared(labels: np.ndarray) -> tuple[float, float]:
    """How much of a token's column and row a label map explains: the correlation ratios η²(x), η²(y).

    ``η² = Σ_k n_k (m_k − m)² / Σ_i (x_i − m)²``, the between-label share of the variance of the coordinate.
    1 when every label sits in one column (x) or row (y), as positional clusters of homogeneous images do; 0
    when every label spreads over all columns (rows) alike.

    Returns
    -------
    (float, float)
        η² of the column (x) and of the row (y); NaN for a grid of one column (row).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise PosvitError(f"a label map must be (h, w), got shape {lab.shape}")
    h, w = lab.shape
    _, inv = np.unique(lab.ravel(), return_inverse=True)
    n_k = np.bincount(inv).astype(np.float64)
    out = []
    for coord in (np.tile(np.arange(w, dtype=np.float64), h), np.repeat(np.arange(h, dtype=np.float64), w)):
        total = ((coord - coord.mean()) ** 2).sum()
        if total == 0:
            out.append(float("nan"))
            continue
        m_k = np.bincount(inv, weights=coord) / n_k
        out.append(float((n_k * (m_k - coord.mean()) ** 2).sum() / total))
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------------------
# Upsampling and colour


def upsample(values: np.ndarray, out_hw: tuple[int, int], method: str = "nearest") -> np.ndarray:
    """Resize a token map ``(h, w)`` or ``(h, w, k)`` to pixels ``out_hw``.

    ``nearest``: every output pixel takes the token under its centre (the patch grid stays visible; labels stay
    labels). ``bilinear``: linear interpolation between token centres (a token's value sits at the centre of its
    patch; beyond the outer centres values are held constant), the smooth look of the papers' similarity maps.

    Returns
    -------
    ndarray of float64 (bilinear) or the input dtype (nearest), shape ``out_hw + values.shape[2:]``
    """
    v = np.asarray(values)
    h, w = v.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if method == "nearest":
        rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
        return v[rows[:, None], cols[None, :]]
    if method != "bilinear":
        raise PosvitError(f"unknown upsampling '{method}': use {' or '.join(UPSAMPLE_METHODS)}")

    def axis(n_out, n_in):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, fr = axis(oh, h)
    c0, c1, fc = axis(ow, w)
    v = v.astype(np.float64)
    fcx = fc.reshape((1, ow) + (1,) * (v.ndim - 2))
    frx = fr.reshape((oh, 1) + (1,) * (v.ndim - 2))
    a = v[r0][:, c0] * (1 - fcx) + v[r0][:, c1] * fcx
    b = v[r1][:, c0] * (1 - fcx) + v[r1][:, c1] * fcx
    return a * (1 - frx) + b * frx


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float colours in [0, 1] → ``uint8`` (rounded, clipped)."""
    return np.clip(np.round(np.asarray(rgb, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def colormap_rgb(values: np.ndarray, cmap: str = "coolwarm", vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Colour a map with a matplotlib colormap on a fixed scale (values outside it take the end colours).

    Returns
    -------
    ndarray of uint8, shape ``values.shape + (3,)``
    """
    from matplotlib import colormaps

    if not vmax > vmin:
        raise PosvitError(f"colour scale needs vmax > vmin, got {vmin}..{vmax}")
    norm = np.clip((np.asarray(values, dtype=np.float64) - vmin) / (vmax - vmin), 0.0, 1.0)
    return to_uint8(colormaps[cmap](norm)[..., :3])


def blend(base: np.ndarray, top: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 − alpha)·base + alpha·top`` of two ``uint8`` colour images (an overlay at opacity ``alpha``)."""
    out = (1.0 - alpha) * np.asarray(base, np.float64) + alpha * np.asarray(top, np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def label_palette(n: int) -> np.ndarray:
    """``n`` distinct colours, ``(n, 3)`` uint8: tab10 up to 10 labels, tab20 up to 20, then evenly spaced hues."""
    from matplotlib import colormaps

    if n <= 10:
        cols = colormaps["tab10"](np.arange(n))[:, :3]
    elif n <= 20:
        cols = colormaps["tab20"](np.arange(n))[:, :3]
    else:
        import colorsys

        # Golden-ratio hue steps keep neighbouring label ids far apart in colour.
        cols = np.array([colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65 + 0.35 * (i % 2), 0.95 - 0.25 * (i % 3 == 2))
                         for i in range(n)])
    return to_uint8(cols)


def labels_rgb(labels: np.ndarray, values: Sequence[int], palette: np.ndarray) -> np.ndarray:
    """Colour a label map: label ``values[i]`` gets ``palette[i]``; labels not listed are black.

    Returns
    -------
    ndarray of uint8, shape ``labels.shape + (3,)``
    """
    lab = np.asarray(labels)
    vals = np.asarray(values)
    out = np.zeros(lab.shape + (3,), np.uint8)
    if vals.size == 0:
        return out
    order = np.argsort(vals)
    pos = np.clip(np.searchsorted(vals[order], lab), 0, len(vals) - 1)
    hit = vals[order][pos] == lab
    out[hit] = np.asarray(palette)[order[pos[hit]]]
    return out

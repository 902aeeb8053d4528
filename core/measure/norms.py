"""Token-norm artefacts: the few very high-norm patch tokens of ViTs trained without registers.

Darcet et al. ("Vision Transformers Need Registers", ICLR 2024) found that large ViTs without register tokens
(DINOv2 without ``_reg``, DeiT-III, OpenCLIP) repurpose a few patch tokens in low-information background regions
as global scratch space: their L2 norm is several times the bulk's (a bimodal norm histogram; for ViT-L the paper
cuts at norm > 150), they carry little local information, and they show up as bright dots in attention and
feature maps. This module measures them on a feature store, per image and per store.

The outlier rule, scale-free
----------------------------
The paper's cut (150) only holds for one model and layer; here the cut is relative to each image's own bulk:
a token is an outlier when its log norm lies more than ``k`` robust standard deviations above the image's median
log norm,

    log ‖t‖ > median(log ‖t‖) + k · max(1.4826 · MAD(log ‖t‖), MIN_LOG_SPREAD),

i.e. ``‖t‖ > median_norm · exp(k · σ̂)``. Why this rule:

- *Robust*: the median and the median absolute deviation (MAD; × 1.4826 is the standard deviation of a normal
  bulk) ignore the outliers themselves, which a mean and standard deviation would not (a few tokens of norm 20 in
  256 tokens of norm 1 inflate the standard deviation until they hide themselves).
- *Scale-free*: multiplying the features by any constant leaves every flag unchanged, so no model's norm scale is
  needed, and on log norms the cut is a ratio to the median norm, which suits the right-skewed norm distribution
  of ViT tokens better than a linear cut (artefact norms are a multiple of the bulk's, not an offset).
- ``k`` = :data:`DEFAULT_K` = 6 by default: a normal bulk exceeds 6 σ̂ with probability 1e-9, so even a 625 × 625
  grid (390 625 tokens) shows no false outlier from the bulk alone, while register-like artefacts (3-10 × the
  median norm) lie far beyond it unless the bulk itself spreads over a factor of e^(6σ̂). Lower ``k`` (e.g. 4) to
  catch milder artefacts; raise it when a busy image's bulk is wide.
- ``MIN_LOG_SPREAD`` (0.01: a 1 % spread of the norms) floors σ̂ so that features of constant norm (e.g.
  L2-normalised features, σ̂ = 0) flag nothing rather than every rounding difference.

Norms are computed in float64 from float32 token rows read in bands of whole rows
(:meth:`FeatureStore.feature_rows`), so a huge grid (625 × 625 × 384) is never held whole; only its ``h × w``
norm map is (1.5 MB as float32 there).

Where the outliers lie
----------------------
The paper places them in redundant background, which in many images is the border. Each outlier's distance to
the border of the grid (``min(row, col, h-1-row, w-1-col)`` in tokens) is averaged and compared with the mean of
the same distance over all tokens (where uniformly placed outliers would lie): ``border_ratio`` = outlier mean /
uniform mean is about 1 for outliers spread like the content, below 1 near the border, 0 all on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "DEFAULT_K",
    "MAX_POSITIONS",
    "MIN_LOG_SPREAD",
    "NORMS_SCHEMA_VERSION",
    "TokenNorms",
    "border_distance",
    "image_norms",
    "norm_map",
    "outlier_mask",
    "store_token_norms",
]

#: Robust standard deviations of log norm above the median beyond which a token is an outlier.
DEFAULT_K = 6.0
#: Floor of the robust spread of log norms (0.01 = 1 % of the norm), so constant-norm features flag nothing.
MIN_LOG_SPREAD = 0.01
#: Outlier positions kept per image in the result (the highest norms first); the count is always complete.
MAX_POSITIONS = 32
#: Tokens per band when reading a grid (whole rows, at least one).
BAND_TOKENS = 16_384
NORMS_SCHEMA_VERSION = 1
# Norms below this count as this (log of an all-zero token).
_TINY = 1e-30


def norm_map(store, index: int, layer: str | None = None, *, band_tokens: int = BAND_TOKENS) -> np.ndarray:
    """L2 norm of every token of one stored image, shape ``(h, w)``, float64.

    Token rows are read as float32 in bands of about ``band_tokens`` tokens (whole rows, one at least) and
    squared and summed in float64 per token, so the result does not depend on the band size.
    """
    h, w = (int(v) for v in store.record(index).grid)
    out = np.empty((h, w), dtype=np.float64)
    step = max(1, int(band_tokens) // max(w, 1))
    for a in range(0, h, step):
        b = min(h, a + step)
        band = store.feature_rows(index, layer, a, b, dtype=np.float32).astype(np.float64)
        if not np.isfinite(band).all():
            raise PosvitError(f"image '{store.record(index).name}' in '{store.source}' holds NaN or inf features: "
                              "its token norms are undefined (re-extract it)")
        out[a:b] = np.sqrt(np.einsum("ijc,ijc->ij", band, band))
    return out


def outlier_mask(norms: np.ndarray, k: float = DEFAULT_K) -> tuple[np.ndarray, float, float]:
    """The outlier tokens of a norm map by the robust log-norm rule (module docstring).

    Parameters
    ----------
    norms : ndarray, shape (h, w)
        Token L2 norms (any scale).
    k : float
        Robust standard deviations of log norm above the median (> 0).

    Returns
    -------
    mask : ndarray of bool, shape (h, w)
    threshold : float
        The norm above which tokens are outliers (``median · exp(k · σ̂)``).
    log_spread : float
        σ̂, the robust standard deviation of the log norms (floored at :data:`MIN_LOG_SPREAD`).
    """
    if not k > 0:
        raise PosvitError(f"the outlier cut k must be positive, got {k}")
    logn = np.log(np.maximum(np.asarray(norms, dtype=np.float64), _TINY))
    med = float(np.median(logn))
    spread = max(1.4826 * float(np.median(np.abs(logn - med))), MIN_LOG_SPREAD)
    cut = med + k * spread
    return logn > cut, float(np.exp(cut)), spread


def border_distance(h: int, w: int) -> np.ndarray:
    """Distance of every token to the grid border in tokens, ``min(row, col, h-1-row, w-1-col)``, shape (h, w)."""
    r = np.arange(h)[:, None]
    c = np.arange(w)[None, :]
    return np.minimum(np.minimum(r, h - 1 - r), np.minimum(c, w - 1 - c))


@dataclasses.dataclass
class TokenNorms:
    """Token norms of one image and its outliers.

    Attributes
    ----------
    name : str
    index : int
        The image's index in the store.
    norms : ndarray, shape (h, w)
        L2 norm of every token (float64).
    outliers : ndarray of bool, shape (h, w)
    threshold : float
        Norm above which a token is an outlier.
    log_spread : float
        Robust standard deviation of the log norms.
    k : float
    """

    name: str
    index: int
    norms: np.ndarray
    outliers: np.ndarray
    threshold: float
    log_spread: float
    k: float

    @property
    def count(self) -> int:
        return int(self.outliers.sum())

    @property
    def share(self) -> float:
        """Fraction of the image's tokens that are outliers."""
        return self.count / max(1, self.outliers.size)

    def positions(self, limit: int | None = MAX_POSITIONS) -> list[list[int]]:
        """``[row, col]`` of the outliers, highest norm first (ties row-major), at most ``limit``."""
        rows, cols = np.nonzero(self.outliers)
        order = np.argsort(-self.norms[rows, cols], kind="stable")
        if limit is not None:
            order = order[:limit]
        return [[int(rows[i]), int(cols[i])] for i in order]

    def border(self) -> dict:
        """Mean border distance of the outliers against all tokens' (where uniform outliers would lie)."""
        d = border_distance(*self.norms.shape)
        uniform = float(d.mean())
        if not self.count:
            return {"mean_distance": None, "uniform_distance": uniform, "ratio": None, "on_border": None,
                    "uniform_on_border": float(np.mean(d == 0))}
        dist = float(d[self.outliers].mean())
        return {"mean_distance": dist, "uniform_distance": uniform,
                "ratio": dist / uniform if uniform > 0 else None,
                "on_border": float(np.mean(d[self.outliers] == 0)), "uniform_on_border": float(np.mean(d == 0))}

    def summary(self, max_positions: int | None = MAX_POSITIONS) -> dict:
        """The image's numbers as JSON-ready values (no maps)."""
        n = self.norms
        pos = self.positions(max_positions)
        return {"name": self.name, "index": self.index, "grid": [int(v) for v in n.shape], "n_outliers": self.count,
                "share": self.share, "threshold": self.threshold, "log_spread": self.log_spread,
                "median": float(np.median(n)), "p99": float(np.percentile(n, 99)), "max": float(n.max()),
                "outlier_median": float(np.median(n[self.outliers])) if self.count else None,
                "positions": pos, "positions_truncated": self.count > len(pos), "border": self.border()}


def image_norms(store, index: int, layer: str | None = None, *, k: float = DEFAULT_K,
                band_tokens: int = BAND_TOKENS) -> TokenNorms:
    """Token norms and outliers of one stored image (:func:`norm_map`, :func:`outlier_mask`)."""
    norms = norm_map(store, index, layer, band_tokens=band_tokens)
    mask, threshold, spread = outlier_mask(norms, k)
    return TokenNorms(store.record(index).name, int(index), norms, mask, threshold, spread, float(k))


def _store_border(per_image: list[TokenNorms]) -> dict:
    """Border distances pooled over every outlier of every image."""
    dist = uniform = 0.0
    n = 0
    for t in per_image:
        if t.count:
            b = t.border()
            dist += b["mean_distance"] * t.count
            uniform += b["uniform_distance"] * t.count
            n += t.count
    if not n:
        return {"mean_distance": None, "uniform_distance": None, "ratio": None}
    return {"mean_distance": dist / n, "uniform_distance": uniform / n,
            "ratio": dist / uniform if uniform > 0 else None}


def store_token_norms(
    store,
    *,
    layer: str | None = None,
    indices: Sequence[int] | None = None,
    k: float = DEFAULT_K,
    max_positions: int | None = MAX_POSITIONS,
    band_tokens: int = BAND_TOKENS,
    progress: ProgressCallback | None = None,
) -> dict:
    """Token-norm outliers of a store: per image and summarised.

    Parameters
    ----------
    store : FeatureStore
    layer : str, optional
        Default: the store's default layer.
    indices : sequence of int, optional
        Images to measure (default: all).
    k : float
        The outlier cut (module docstring; default :data:`DEFAULT_K`).
    max_positions : int or None
        Outlier positions kept per image (highest norms first).
    band_tokens : int
        Tokens per band read.

    Returns
    -------
    dict
        ``version``, ``layer``, ``rule`` (the cut in words), ``k``, ``min_log_spread``, ``n_images``,
        ``images_with_outliers``, ``mean_share`` (mean over images of the outlier share), ``max_share``,
        ``border`` (pooled over all outliers: mean distance to the border in tokens, its uniform value, their
        ratio) and ``images`` (one :meth:`TokenNorms.summary` each, no maps).
    """
    layer = store.check_layer(layer)
    idx = list(range(len(store))) if indices is None else [int(i) for i in indices]
    if not idx:
        raise PosvitError(f"'{store.source}' holds no images: no token norms to measure")
    run = report(progress)
    per_image = []
    for j, i in enumerate(idx):
        per_image.append(image_norms(store, i, layer, k=k, band_tokens=band_tokens))
        run("token norms", j + 1, len(idx))
    shares = [t.share for t in per_image]
    return {
        "version": NORMS_SCHEMA_VERSION,
        "layer": layer,
        "rule": f"log norm > median + {k:g} x max(1.4826 MAD, {MIN_LOG_SPREAD:g}) of the image's log norms",
        "k": float(k),
        "min_log_spread": MIN_LOG_SPREAD,
        "n_images": len(per_image),
        "images_with_outliers": sum(1 for t in per_image if t.count),
        "mean_share": float(np.mean(shares)),
        "max_share": float(np.max(shares)),
        "border": _store_border(per_image),
        "images": [t.summary(max_positions) for t in per_image],
    }

"""A dependency-free mean-field CRF for refining per-pixel class probabilities.

Why not pydensecrf: the original ``pydensecrf`` (1.0rc3, 2018) no longer builds (its Cython sources fail under
Cython 3) and its maintained fork ``pydensecrf2`` ships only a source archive that needs a C++ compiler (about
two minutes to build on two cores); neither is something a user can ``pip install`` everywhere. This module
implements the same model with NumPy/SciPy.

Model: a fully factorised mean-field approximation of a CRF with unary ``−log p`` (``p`` clamped to
``[min_prob, 1]`` so that a zero probability is a large finite cost, not infinity) and a Potts pairwise term with
two kernels:

- a Gaussian spatial kernel (``spatial_sigma`` px), which removes isolated pixels, and
- an edge-aware kernel approximating the bilateral (appearance) kernel of Krähenbühl & Koltun (2011) by a
  guided filter (He, Sun & Tang, 2013) of radius ``bilateral_radius`` guided by the greyscale image:
  smoothing stops at intensity edges whose local variance exceeds ``bilateral_eps``.

Both kernels are normalised, so a weight is the log-odds bonus a label gets when all its neighbours agree.
With a Potts compatibility the update is ``Q ← softmax(log p + w_s·G∗Q + w_b·GF(Q))``; every operation is a
linear filter with a finite reach, so tiles with :func:`crf_halo` pixels of context give the untiled result.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = ["CrfConfig", "crf_halo", "mean_field_crf"]


@dataclasses.dataclass
class CrfConfig:
    """Mean-field CRF settings.

    Attributes
    ----------
    iterations : int
        Mean-field updates.
    spatial_sigma : float
        Gaussian kernel σ in pixels.
    spatial_weight : float
        Weight of the Gaussian kernel.
    bilateral_radius : int
        Guided-filter window radius in pixels.
    bilateral_eps : float
        Guided-filter regularisation (intensity² units, intensities in [0, 1]); smaller keeps more edges.
    bilateral_weight : float
        Weight of the edge-aware kernel.
    min_prob : float
        Probabilities are clamped below at this value before ``−log``.
    """

    iterations: int = 5
    spatial_sigma: float = 3.0
    spatial_weight: float = 3.0
    bilateral_radius: int = 8
    bilateral_eps: float = 1e-3
    bilateral_weight: float = 5.0
    min_prob: float = 1e-5

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.spatial_sigma <= 0 or self.bilateral_radius < 1 or self.bilateral_eps <= 0:
            raise PosvitError("CRF: iterations, sigma, radius and eps must be positive")
        if not 0 < self.min_prob < 1:
            raise PosvitError("CRF: min_prob must be in (0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def crf_halo(config: CrfConfig) -> int:
    """Pixels of context that make a tile's CRF output equal to the whole image's.

    Each iteration reaches ``int(4σ + 0.5)`` pixels through the Gaussian and ``2r`` through the guided filter.
    """
    return config.iterations * (int(4.0 * config.spatial_sigma + 0.5) + 2 * config.bilateral_radius)


def _box(x: np.ndarray, r: int) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    size = (2 * r + 1, 2 * r + 1) + (1,) * (x.ndim - 2)
    return uniform_filter(x, size=size, mode="reflect")


def mean_field_crf(probs: np.ndarray, guide: np.ndarray, config: CrfConfig | None = None) -> np.ndarray:
    """Refine class probabilities with a mean-field CRF.

    Parameters
    ----------
    probs : ndarray, shape (H, W, K)
        Per-pixel class probabilities (rows need not sum exactly to 1).
    guide : ndarray, shape (H, W)
        Greyscale image in [0, 1] that steers the edge-aware kernel.
    config : CrfConfig, optional

    Returns
    -------
    ndarray of float32, shape (H, W, K)
        Refined probabilities, summing to 1 per pixel.
    """
    from scipy.ndimage import gaussian_filter

    cfg = config or CrfConfig()
    p = np.asarray(probs, np.float32)
    if p.ndim != 3 or p.shape[:2] != np.shape(guide):
        raise PosvitError(f"CRF needs probabilities (H, W, K) and a guide (H, W); got {p.shape} and {np.shape(guide)}")
    log_p = np.log(np.clip(p, cfg.min_prob, 1.0))
    I = np.asarray(guide, np.float32)
    r = cfg.bilateral_radius
    mean_i = _box(I, r)
    var_i = _box(I * I, r) - mean_i * mean_i
    denom = (var_i + cfg.bilateral_eps)[..., None]
    q = _softmax(log_p)
    for _ in range(cfg.iterations):
        spatial = gaussian_filter(q, sigma=(cfg.spatial_sigma, cfg.spatial_sigma, 0), mode="reflect", truncate=4.0)
        mean_q = _box(q, r)
        cov = _box(q * I[..., None], r) - mean_i[..., None] * mean_q
        a = cov / denom
        b = mean_q - a * mean_i[..., None]
        edge = _box(a, r) * I[..., None] + _box(b, r)
        q = _softmax(log_p + cfg.spatial_weight * spatial + cfg.bilateral_weight * edge)
    return q


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)

"""The old spatial entropy of a clustering, kept for the ``spatial_entropy`` JSON keys.

Use :mod:`~posvit_cli.core.cluster.position_dependence` instead: the spatial entropy below mixes position with
cluster size and blob shape, and its shuffled reference destroys the blobs, so it never separates a position split
from a content split (on scikit-image's coins as a 20 × 24 token grid, a top/bottom k=2 split and a k-means split
of the intensities both score 0.888, and 0.888 shuffled).

Spatial entropy of a clustering (a position-bias measure, after Franca's Fig. 6)
    For cluster ``j`` on images with an ``h × w`` token grid, let ``p_j(r, c)`` be the fraction of cluster ``j``'s
    tokens at grid cell ``(r, c)``, pooled over images. Its entropy ``H_j = −Σ p log p`` divided by
    ``log(h·w)`` is 1 when the cluster is spread uniformly over the grid and 0 when it sits on one cell. The
    reported value is the token-weighted mean ``Σ_j n_j H_j / (N log(h·w))`` (clusters on stores with several
    grid sizes are pooled per grid size). For per-image decompositions the distributions are per image and
    positions are counted in 4 × 4 blocks of the grid (within one image each cell holds a single token, so cell
    counts would only measure cluster sizes); the normaliser is then log 16. Low values mean clusters that follow
    position rather than content. ``spatial_entropy_shuffled`` is the same
    measure after shuffling each image's labels over its grid: what clusters of the same sizes would score if
    they ignored position (small clusters cannot reach 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "spatial_entropy",
]


def spatial_entropy(labels_per_image: Sequence[np.ndarray], k: int, *, per_image: bool = False,
                    shuffle_seed: int | None = None, bins: int = 4) -> float:
    """Token-weighted mean normalised entropy of each cluster's grid positions (see the module docstring).

    Parameters
    ----------
    labels_per_image : sequence of ndarray (h, w) of int
        Cluster label of every token; images may have different grids.
    k : int
        Number of clusters (labels in ``[0, k)``).
    per_image : bool
        Measure each cluster's positions within each image separately (per-image decompositions, whose cluster
        ids mean nothing across images) instead of pooled over all images with the same grid. Within one image
        every cell holds one token, so positions are counted in ``bins × bins`` blocks of the grid instead of
        cells (a quadrant cluster then scores log 4 / log 16 = 0.5).
    bins : int
        Blocks per side for ``per_image`` (at most the grid size).
    shuffle_seed : int, optional
        Shuffle each image's labels over its grid first (the position-blind reference value).

    Returns
    -------
    float in [0, 1]: 1 = every cluster spread uniformly over the grid, 0 = every cluster on one cell.
    """
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    by_grid: dict[tuple[int, int], list[np.ndarray]] = {}
    for lab in labels_per_image:
        lab = np.asarray(lab)
        if rng is not None:
            lab = rng.permutation(lab.ravel()).reshape(lab.shape)
        by_grid.setdefault(lab.shape, []).append(lab.ravel())
    total_weighted = 0.0
    total_tokens = 0
    for (h, w), labs in by_grid.items():
        cells = h * w
        if cells < 2:
            continue
        lab = np.stack(labs).astype(np.int64)  # (n_img, cells)
        n_img = lab.shape[0]
        cell = np.broadcast_to(np.arange(cells), lab.shape)
        if per_image:
            bh, bw = min(bins, h), min(bins, w)
            block = (np.arange(h)[:, None] * bh // h) * bw + np.arange(w)[None, :] * bw // w
            cell = np.broadcast_to(block.ravel(), lab.shape)
            cells = bh * bw
            if cells < 2:
                continue
            key = (np.arange(n_img)[:, None] * k + lab) * cells + cell
            counts = np.bincount(key.ravel(), minlength=n_img * k * cells).reshape(n_img * k, cells)
        else:
            counts = np.bincount((lab * cells + cell).ravel(), minlength=k * cells).reshape(k, cells)
        sizes = counts.sum(1)
        keep = sizes > 0
        counts, sizes = counts[keep].astype(np.float64), sizes[keep].astype(np.float64)
        p = counts / sizes[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            h_j = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
        total_weighted += float((sizes * h_j).sum() / math.log(cells))
        total_tokens += int(sizes.sum())
    return total_weighted / total_tokens if total_tokens else float("nan")

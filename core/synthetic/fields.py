"""Periodic building blocks of the synthetic micrographs: random fields from FFTs and geometry on a torus.

Distances wrap around the edges, so no position in a generated image is special.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "gaussian_field",
    "grow_region",
    "label_edges",
    "periodic_edt",
    "relaxed_seeds",
    "smooth_amplitude",
    "voronoi_labels",
]


def gaussian_field(shape, rng: np.random.Generator, amplitude) -> np.ndarray:
    """A periodic Gaussian random field with a given radial amplitude spectrum, standardised.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` in pixels.
    rng : numpy Generator
    amplitude : callable
        ``amplitude(k)`` for radial frequency ``k`` in cycles per pixel (an ndarray); the square root of the
        power spectrum. Its value at ``k = 0`` is ignored (the field has zero mean).

    Returns
    -------
    ndarray of float32, shape (H, W)
        Zero mean, unit standard deviation; periodic in both axes.
    """
    import scipy.fft

    H, W = shape
    white = rng.standard_normal((H, W), dtype=np.float32)
    ky = np.fft.fftfreq(H).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(W).astype(np.float32)[None, :]
    k = np.sqrt(ky * ky + kx * kx)
    amp = np.asarray(amplitude(np.maximum(k, 1e-6)), dtype=np.float32)
    amp[0, 0] = 0.0
    field = scipy.fft.irfft2(scipy.fft.rfft2(white) * amp, s=(H, W)).astype(np.float32)
    sd = float(field.std())
    return field / sd if sd > 0 else field


def smooth_amplitude(corr_length: float):
    """Amplitude spectrum of white noise blurred by a Gaussian of ``corr_length`` px."""
    c = 2.0 * math.pi**2 * corr_length**2
    return lambda k: np.exp(-c * k * k)


def periodic_edt(sources: np.ndarray, pad: int):
    """Euclidean distance to the nearest ``True`` pixel of ``sources`` on the torus, and that pixel's index.

    Exact for every pixel whose nearest source lies within ``pad`` pixels (the caller checks ``dist <= pad``).

    Returns
    -------
    dist : ndarray of float32, shape (H, W)
    iy, ix : ndarray of intp, shape (H, W)
        Row and column of the nearest source pixel.
    """
    from scipy import ndimage as ndi

    H, W = sources.shape
    padded = np.pad(sources, pad, mode="wrap")
    dist, (iy, ix) = ndi.distance_transform_edt(~padded, return_indices=True)
    sl = (slice(pad, pad + H), slice(pad, pad + W))
    return dist[sl].astype(np.float32), (iy[sl] - pad) % H, (ix[sl] - pad) % W


def voronoi_labels(shape, seeds: np.ndarray) -> np.ndarray:
    """Label each pixel with the index of its nearest seed on the torus (Voronoi cells).

    ``seeds`` are ``(n, 2)`` (row, col) pixel positions; seeds on the same pixel merge into the first one.
    """
    H, W = shape
    iy = np.floor(seeds[:, 0]).astype(np.intp) % H
    ix = np.floor(seeds[:, 1]).astype(np.intp) % W
    ids = np.full((H, W), -1, np.int32)
    ids[iy[::-1], ix[::-1]] = np.arange(len(seeds), dtype=np.int32)[::-1]  # the first seed wins a shared pixel
    spacing = math.sqrt(H * W / max(len(seeds), 1))
    pad = int(min(max(H, W), math.ceil(3 * spacing) + 2))
    while True:
        dist, ny, nx = periodic_edt(ids >= 0, pad)
        if dist.max() <= pad or pad >= max(H, W):
            return ids[ny, nx]
        pad = min(max(H, W), 2 * pad)


def relaxed_seeds(shape, n: int, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """``n`` seed positions, made more even by Lloyd iterations (cell centroids on the torus, on a coarse grid)."""
    H, W = shape
    seeds = rng.random((n, 2)) * np.array([H, W])
    if iterations <= 0:
        return seeds
    # Centroids need only a few pixels per cell: iterate on a coarse copy of the torus.
    scale = min(1.0, math.sqrt(64.0 * n / (H * W)) if n else 1.0)
    h, w = max(8, round(H * scale)), max(8, round(W * scale))
    yy, xx = np.mgrid[0:h, 0:w]
    ang_y = 2 * np.pi * (yy + 0.5) / h
    ang_x = 2 * np.pi * (xx + 0.5) / w
    cy, sy, cx, sx = np.cos(ang_y).ravel(), np.sin(ang_y).ravel(), np.cos(ang_x).ravel(), np.sin(ang_x).ravel()
    for _ in range(iterations):
        small = seeds * np.array([h / H, w / W])
        lab = voronoi_labels((h, w), small).ravel()
        # Circular means: the centroid of a cell that wraps around an edge is still inside the cell.
        my = np.arctan2(np.bincount(lab, sy, n), np.bincount(lab, cy, n))
        mx = np.arctan2(np.bincount(lab, sx, n), np.bincount(lab, cx, n))
        empty = np.bincount(lab, minlength=n) == 0
        new = np.stack([(my % (2 * np.pi)) / (2 * np.pi) * H, (mx % (2 * np.pi)) / (2 * np.pi) * W], axis=1)
        seeds = np.where(empty[:, None], seeds, new)
    return seeds


def label_edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every cell boundary), wrapping at the edges."""
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        for step in (1, -1):
            edge |= labels != np.roll(labels, step, axis=axis)
    return edge


def grow_region(region: np.ndarray, radius: float) -> np.ndarray:
    """Dilate a boolean image by a disk of ``radius`` px, wrapping at the edges."""
    from scipy import ndimage as ndi

    if radius <= 0:
        return region
    return ndi.maximum_filter(region, footprint=_disk(radius), mode="wrap")


def _disk(r: float) -> np.ndarray:
    n = int(math.ceil(r))
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    return (yy * yy + xx * xx) <= r * r + 1e-9

"""Sparse training scribbles drawn inside the classes of a synthetic mask."""

from __future__ import annotations

import numpy as np

from posvit_cli.core.synthetic.fields import grow_region

__all__ = [
    "scribbles",
]


def scribbles(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    strokes_per_class: int | None = None,
    length: int = 48,
    width: int = 3,
    margin: float = 4.0,
) -> np.ndarray:
    """Sparse training labels: thin strokes inside each class, away from its boundaries.

    Each stroke is a persistent walk that stays on pixels at least ``margin`` pixels (Chebyshev distance on the
    torus) from any other class; for classes too thin for that (grain boundaries, crack tips) the margin shrinks
    until a quarter of the class qualifies. Strokes are then thickened to ``width`` pixels without leaving the
    class.

    Parameters
    ----------
    mask : ndarray of int, shape (H, W)
        Class indices ``0..K-1``.
    rng : numpy Generator
    strokes_per_class : int, optional
        Strokes drawn per class present in the mask; by default one per 20,000 pixels of image (at least 2), so
        about 1-2 % of the pixels end up labelled at any image size.
    length : int
        Maximum stroke length in pixels (a stroke ends early where its class ends).
    width : int
        Stroke thickness in pixels (odd numbers give symmetric strokes).
    margin : float
        Minimum distance in pixels from a stroke's centre line to another class.

    Returns
    -------
    ndarray of uint8, shape (H, W)
        0 = unlabelled, ``k + 1`` = class ``k``.
    """
    mask = np.asarray(mask)
    H, W = mask.shape
    out = np.zeros((H, W), np.uint8)
    n_strokes = strokes_per_class if strokes_per_class is not None else max(2, round(H * W / 20000))
    for k in np.unique(mask):
        inside = mask == k
        allowed = _interior(inside, margin)
        cand = np.flatnonzero(allowed)
        if not cand.size:
            continue
        centre = np.zeros((H, W), bool)
        for _ in range(n_strokes):
            y, x = divmod(int(rng.choice(cand)), W)
            d = int(rng.integers(8))
            signs = rng.choice([-1, 1], size=(length, 3))
            wobble = rng.random(length) < 0.15
            for i in range(length):
                centre[y, x] = True
                # Keep going straight when the class allows (sometimes veer by 45°); otherwise turn as little
                # as possible, never straight back.
                s1, s2, s3 = signs[i]
                turns = (s1, 0, -s1, 2 * s2, -2 * s2, 3 * s3, -3 * s3) if wobble[i] else (
                    0, s1, -s1, 2 * s2, -2 * s2, 3 * s3, -3 * s3)
                for t in turns:
                    nd = (d + t) % 8
                    ny, nx = (y + _STEPS[nd][0]) % H, (x + _STEPS[nd][1]) % W
                    if allowed[ny, nx] and not centre[ny, nx]:
                        y, x, d = ny, nx, nd
                        break
                else:
                    break
        if width > 1:
            centre = grow_region(centre, (width - 1) / 2.0) & inside
        out[centre] = k + 1
    return out


_STEPS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _interior(inside: np.ndarray, margin: float) -> np.ndarray:
    """Pixels of a class at least ``margin`` px (Chebyshev, on the torus) from other classes.

    For a class too thin to have such pixels in bulk (grain boundaries, crack tips) the margin shrinks until at
    least a quarter of the class qualifies; at margin 0 that is the whole class.
    """
    from scipy import ndimage as ndi

    total = int(inside.sum())
    m = int(margin)
    while m > 0:
        core = ndi.minimum_filter(inside, size=2 * m + 1, mode="wrap")
        if core.sum() >= 0.25 * total:
            return core
        m -= 1
    return inside

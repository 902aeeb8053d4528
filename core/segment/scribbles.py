"""Synthetic scribbles from dense ground truth, for benchmarks of trainable segmentation.

:func:`draw_scribbles` draws, for every class of an image, a few thin random walks inside the class and away
from its boundary, as a person with a brush would. :func:`correction_scribbles` adds scribbles inside the
largest wrongly predicted regions: one "round" of interactive correction.

Label maps use the training convention: 0 = unlabelled, other values = classes. Ground-truth pixels equal to
``ignore_value`` never receive a scribble.
"""

from __future__ import annotations

import numpy as np

__all__ = ["correction_scribbles", "draw_scribbles", "random_walk"]


def _allowed_region(mask: np.ndarray, margin: float) -> np.ndarray:
    """Pixels of ``mask`` at least ``margin`` px from its boundary (the deepest ones if none are)."""
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if not mask.any():
        return mask
    deep = dist > margin
    if deep.any():
        return deep
    return dist >= dist.max()


def random_walk(allowed: np.ndarray, length: int, rng: np.random.Generator, turn: float = 0.35) -> np.ndarray:
    """A smooth random walk of up to ``length`` one-pixel steps inside ``allowed``.

    Parameters
    ----------
    allowed : ndarray of bool, shape (H, W)
    length : int
        Steps.
    rng : numpy Generator
    turn : float
        Standard deviation of the heading change per step, in radians.

    Returns
    -------
    ndarray of int, shape (n, 2)
        Visited ``(row, col)`` pixels (n ≥ 1 when ``allowed`` has a pixel, else 0).
    """
    ys, xs = np.nonzero(allowed)
    if ys.size == 0:
        return np.zeros((0, 2), np.int64)
    k = rng.integers(ys.size)
    pos = np.array([ys[k], xs[k]], np.float64)
    heading = rng.uniform(0, 2 * np.pi)
    H, W = allowed.shape
    path = [(int(ys[k]), int(xs[k]))]
    for _ in range(length - 1):
        for _attempt in range(8):
            h = heading + rng.normal(0, turn)
            nxt = pos + (np.sin(h), np.cos(h))
            r, c = int(round(nxt[0])), int(round(nxt[1]))
            if 0 <= r < H and 0 <= c < W and allowed[r, c]:
                pos, heading = nxt, h
                if (r, c) != path[-1]:
                    path.append((r, c))
                break
            heading += np.pi / 2 * rng.choice([-1, 1])
        else:
            break
    return np.asarray(path, np.int64)


def _paint(labels: np.ndarray, path: np.ndarray, value: int, width: int, inside: np.ndarray) -> None:
    if path.size == 0:
        return
    stroke = np.zeros(labels.shape, bool)
    stroke[path[:, 0], path[:, 1]] = True
    if width > 1:
        from scipy.ndimage import binary_dilation

        r = (width - 1) / 2
        yy, xx = np.mgrid[-int(np.ceil(r)) : int(np.ceil(r)) + 1, -int(np.ceil(r)) : int(np.ceil(r)) + 1]
        stroke = binary_dilation(stroke, structure=(yy**2 + xx**2) <= r * r + 1e-9)
    stroke &= inside
    labels[stroke & (labels == 0)] = value


def draw_scribbles(
    gt: np.ndarray,
    per_class: int = 3,
    *,
    length: int | None = None,
    width: int = 1,
    margin: float = 3.0,
    ignore_value: int | None = 0,
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """Draw thin random-walk scribbles inside every class of a dense ground truth.

    Parameters
    ----------
    gt : ndarray of int, shape (H, W)
        Dense ground truth (class values).
    per_class : int
        Scribbles per class present in ``gt``.
    length : int, optional
        Steps per scribble (default: a quarter of the shorter image side, at least 8).
    width : int
        Brush diameter in pixels.
    margin : float
        Minimum distance from a class boundary in pixels (relaxed to the deepest pixels of thin regions).
    ignore_value : int or None
        Ground-truth value that is never scribbled (unlabelled regions).
    seed : int or Generator

    Returns
    -------
    ndarray, shape (H, W), dtype of ``gt``
        0 where unlabelled, the class value on scribbles.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    gt = np.asarray(gt)
    H, W = gt.shape
    length = length or max(8, min(H, W) // 4)
    labels = np.zeros_like(gt)
    for value in np.unique(gt):
        if ignore_value is not None and value == ignore_value:
            continue
        mask = gt == value
        allowed = _allowed_region(mask, margin)
        for _ in range(per_class):
            _paint(labels, random_walk(allowed, length, rng), int(value), width, mask)
    return labels


def correction_scribbles(
    gt: np.ndarray,
    pred: np.ndarray,
    labels: np.ndarray,
    regions: int = 2,
    *,
    length: int | None = None,
    width: int = 1,
    margin: float = 2.0,
    ignore_value: int | None = 0,
    min_size: int = 4,
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """Add scribbles inside the largest regions where the prediction is wrong.

    Parameters
    ----------
    gt, pred : ndarray of int, shape (H, W)
        Ground truth and prediction (class values).
    labels : ndarray, shape (H, W)
        Current scribbles; existing labels are kept.
    regions : int
        Number of wrong regions (connected components of ``pred != gt`` within one true class, largest
        first) that receive a scribble.
    min_size : int
        Smaller wrong regions are ignored.

    Returns
    -------
    ndarray
        A new label map.
    """
    from scipy.ndimage import distance_transform_edt
    from scipy.ndimage import label as connected

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.array(labels, copy=True)
    wrong = gt != pred
    if ignore_value is not None:
        wrong &= gt != ignore_value
    # Rank wrong regions by their interior (pixels deeper than the margin), as a person corrects blatant
    # blobs rather than the thin band of boundary errors every classifier leaves.
    candidates = []
    for value in np.unique(gt[wrong]):
        mask = wrong & (gt == value)
        comp, n = connected(mask)
        if n == 0:
            continue
        depth = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        interior = np.bincount(comp[depth > margin], minlength=n + 1)[1:]
        for i in np.flatnonzero(sizes >= min_size):
            candidates.append((int(interior[i]), int(sizes[i]), int(value), comp, depth, i + 1))
    candidates.sort(key=lambda c: (-c[0], -c[1]))
    H, W = gt.shape
    length = length or max(8, min(H, W) // 4)
    for interior, size, value, comp, depth, idx in candidates[:regions]:
        region = comp == idx
        allowed = region & (depth > margin) if interior else region & (depth >= depth[region].max())
        _paint(out, random_walk(allowed, length, rng), value, width, region)
    return out

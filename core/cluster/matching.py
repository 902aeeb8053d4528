"""Matching clusters to classes from a confusion matrix (Hungarian, or greedy many-to-one) and the matched IoU."""

from __future__ import annotations

import numpy as np

__all__ = [
    "apply_matching",
    "match_clusters",
    "matched_iou",
]


def match_clusters(conf: np.ndarray, method: str) -> np.ndarray:
    """Map each cluster to a class from a ``(classes, clusters)`` confusion matrix.

    Parameters
    ----------
    conf : ndarray (C, k)
        Pixel counts: ground-truth class × cluster (ignored pixels already left out).
    method : {"hungarian", "precision", "iou"}
        ``hungarian``: one-to-one assignment maximising the summed IoU (scipy's ``linear_sum_assignment`` on
        ``1 − IoU``); clusters left unmatched (k > C) go to class 0, as in the references.
        ``precision``: each cluster goes to the class that maximises TP/(TP+FP), i.e. the majority class of its
        pixels. ``iou``: each cluster goes to the class whose IoU with it is largest. For both greedy rules the
        first class wins ties and an empty cluster goes to class 0.

    Returns
    -------
    ndarray of int64, shape (k,)
        Class of each cluster.
    """
    conf = np.asarray(conf, dtype=np.float64)
    n_cls, k = conf.shape
    gt = conf.sum(1, keepdims=True)
    pred = conf.sum(0, keepdims=True)
    if method == "hungarian":
        from scipy.optimize import linear_sum_assignment

        union = gt + pred - conf
        iou = np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)
        rows, cols = linear_sum_assignment(1.0 - iou)
        mapping = np.zeros(k, dtype=np.int64)
        mapping[cols] = rows
        return mapping
    if method == "precision":
        score = np.divide(conf, pred, out=np.zeros_like(conf), where=pred > 0)
    elif method == "iou":
        union = gt + pred - conf
        score = np.divide(conf, union, out=np.zeros_like(conf), where=union > 0)
    else:
        raise ValueError(f"unknown matching '{method}': use hungarian, precision or iou")
    return score.argmax(0).astype(np.int64)


def apply_matching(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """The ``(C, C)`` confusion matrix after relabelling clusters with ``mapping`` (no pass over pixels)."""
    conf = np.asarray(conf)
    n_cls, k = conf.shape
    onehot = np.zeros((k, n_cls), dtype=conf.dtype)
    onehot[np.arange(k), mapping] = 1
    return conf @ onehot


def matched_iou(conf: np.ndarray, method: str) -> tuple[float, np.ndarray, np.ndarray]:
    """mIoU after matching clusters to classes with ``method`` (see :func:`match_clusters`).

    Returns
    -------
    miou : float
        Mean over classes of the per-class IoU (a class with an empty union counts 0).
    iou : ndarray of float64, shape (C,)
    mapping : ndarray of int64, shape (k,)
        Class of each cluster.
    """
    from posvit_cli.core.measure.metrics import iou_per_class

    mapping = match_clusters(conf, method)
    cc = apply_matching(conf, mapping)
    iou = np.nan_to_num(iou_per_class(cc), nan=0.0)
    return float(iou.mean()), iou, mapping

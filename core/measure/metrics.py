"""Segmentation metrics from one confusion matrix (one ``np.bincount`` over all pixels).

Conventions: rows of a confusion matrix are ground-truth classes, columns predicted labels; pixels whose
ground truth equals ``ignore_index`` never count. ``miou`` averages IoU over *all* ground-truth classes, counting
a class with an empty union as 0 (the Ziegler & Asano / Leopart convention) unless ``absent="skip"``.
"""

from __future__ import annotations

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = ["accumulate_confusion", "class_average_miou", "confusion_matrix", "iou_per_class", "miou"]


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, num_pred: int | None = None, ignore_index: int | None = None
) -> np.ndarray:
    """Confusion counts of integer label arrays.

    Parameters
    ----------
    gt : ndarray of int, any shape
        Ground-truth classes in ``[0, num_classes)``, or ``ignore_index``.
    pred : ndarray of int, same shape
        Predicted labels in ``[0, num_pred)`` (cluster ids may outnumber classes).
    num_classes : int
    num_pred : int, optional
        Number of predicted labels; defaults to ``num_classes``.
    ignore_index : int, optional
        Ground-truth value to leave out.

    Returns
    -------
    ndarray of int64, shape (num_classes, num_pred)

    Raises
    ------
    PosvitError
        If shapes differ or a value is out of range (the message names the offending value).
    """
    gt = np.asarray(gt).ravel()
    pred = np.asarray(pred).ravel()
    if gt.shape != pred.shape:
        raise PosvitError(f"prediction has {pred.size} pixels, ground truth {gt.size}: they must match")
    num_pred = num_classes if num_pred is None else num_pred
    keep = np.ones(gt.shape, bool) if ignore_index is None else gt != ignore_index
    g = gt[keep].astype(np.int64)
    p = pred[keep].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        bad = g[(g < 0) | (g >= num_classes)][0]
        raise PosvitError(f"ground-truth value {bad} is outside 0..{num_classes - 1} (and is not the ignore index)")
    if p.size and (p.min() < 0 or p.max() >= num_pred):
        bad = p[(p < 0) | (p >= num_pred)][0]
        raise PosvitError(f"predicted label {bad} is outside 0..{num_pred - 1}")
    return np.bincount(g * num_pred + p, minlength=num_classes * num_pred).reshape(num_classes, num_pred)


def accumulate_confusion(total: np.ndarray | None, conf: np.ndarray) -> np.ndarray:
    """Add a confusion matrix to a running total (``None`` starts one)."""
    return conf.copy() if total is None else total + conf


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class from a square confusion matrix; NaN where a class has an empty union.

    Returns
    -------
    ndarray of float64, shape (C,)
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"IoU needs a square confusion matrix, got shape {conf.shape}")
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def miou(conf: np.ndarray, absent: str = "zero") -> float:
    """Mean IoU over classes.

    Parameters
    ----------
    conf : ndarray, shape (C, C)
    absent : {"zero", "skip"}
        A class with an empty union (never in ground truth, never predicted) counts as 0 (``zero``) or is left
        out of the mean (``skip``).
    """
    iou = iou_per_class(conf)
    if absent == "zero":
        return float(np.nan_to_num(iou, nan=0.0).mean())
    if absent == "skip":
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
    raise ValueError(f"absent must be 'zero' or 'skip', not {absent!r}")


def class_average_miou(gt: np.ndarray, pred: np.ndarray, ignore_index: int | None = None) -> float:
    """The per-image score of the trainable-segmentation reference: mean IoU over classes present in ``gt``.

    False positives of classes absent from the ground truth are not penalised (as in the reference); use
    :func:`confusion_matrix` + :func:`miou` for the dataset-wide score.
    """
    gt = np.asarray(gt).ravel()
    pred = np.asarray(pred).ravel()
    if ignore_index is not None:
        keep = gt != ignore_index
        gt, pred = gt[keep], pred[keep]
    classes = np.unique(gt)
    if classes.size == 0:
        return float("nan")
    ious = []
    for c in classes:
        g, p = gt == c, pred == c
        ious.append(np.logical_and(g, p).sum() / np.logical_or(g, p).sum())
    return float(np.mean(ious))

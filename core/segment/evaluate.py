"""Scores of segmentations: mIoU two ways, per-class IoU, and a positional-bias diagnostic.

mIoU conventions (label values as in training: 0 = unlabelled and ignored):

- **per-image class average** (the reference's ``class_avg_miou``): for each image, the mean IoU over the classes
  present in its ground truth; classes that appear only in the prediction are not penalised. The dataset
  score is the mean (± std) over images.
- **dataset mIoU**: one confusion matrix over all pixels of all images, IoU per class, mean over classes. A class
  predicted somewhere but absent from every ground truth has IoU 0 (its false positives count); a class that
  appears in neither is not listed.

Positional diagnostic: the predicted class maps (probabilities, or the fraction of pixels of each class) are
averaged over blocks to a grid of at most ``grid × grid`` cells and probed for the positional ramps with
:func:`posvit_cli.core.measure.probe.stack_r2`. A classifier that learned position shows ramps in its output. Because
content can correlate with position too, the same probe is run on the ground truth when it is given, and the
excess R² (prediction minus ground truth) is what is compared with the threshold.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.metrics import confusion_matrix, iou_per_class, miou
from posvit_cli.core.measure.probe import stack_r2

__all__ = [
    "DIAGNOSTIC_TARGETS",
    "SegmentationScores",
    "block_average",
    "class_fractions",
    "positional_r2",
]

DIAGNOSTIC_TARGETS = ("lr", "ud", "diag", "radial", "xy")


def _grid_shape(H: int, W: int, grid: int) -> tuple[int, int]:
    if H >= W:
        h = min(grid, H)
        w = max(2, min(W, int(round(grid * W / H))))
    else:
        w = min(grid, W)
        h = max(2, min(H, int(round(grid * H / W))))
    return max(2, h), max(2, w)


#: Label-image rows scored at once: the scores of a 10,000² px image cost a band of it, not copies of it.
BAND_ROWS = 512


def _band_block_ids(r0: int, r1: int, H: int, W: int, h: int, w: int) -> np.ndarray:
    """Block index of each pixel of rows ``r0:r1`` of an ``(H, W)`` image cut into ``h × w`` blocks."""
    rows = (np.arange(r0, r1) * h) // H
    cols = (np.arange(W) * w) // W
    return (rows[:, None] * w + cols[None, :]).ravel()


def block_average(maps: np.ndarray, grid: int = 64) -> np.ndarray:
    """Average ``(H, W, K)`` maps over blocks to at most ``grid`` cells along the longer side.

    Returns
    -------
    ndarray of float64, shape (h, w, K)
    """
    H, W, K = maps.shape
    h, w = _grid_shape(H, W, grid)
    counts = np.zeros(h * w)
    out = np.zeros((h * w, K))
    for r0 in range(0, H, BAND_ROWS):
        r1 = min(H, r0 + BAND_ROWS)
        ids = _band_block_ids(r0, r1, H, W, h, w)
        counts += np.bincount(ids, minlength=h * w)
        flat = maps[r0:r1].reshape(-1, K)
        for k in range(K):
            out[:, k] += np.bincount(ids, weights=flat[:, k], minlength=h * w)
    return (out / counts[:, None]).reshape(h, w, K)


def class_fractions(labels: np.ndarray, values, grid: int = 64) -> np.ndarray:
    """Fraction of each block's pixels that carry each class value, shape ``(h, w, len(values))``.

    Pixels whose value is not in ``values`` count in the block size but in no class.
    """
    labels = np.asarray(labels)
    H, W = labels.shape
    h, w = _grid_shape(H, W, grid)
    counts = np.zeros(h * w)
    out = np.zeros((h * w, len(values)))
    for r0 in range(0, H, BAND_ROWS):
        r1 = min(H, r0 + BAND_ROWS)
        ids = _band_block_ids(r0, r1, H, W, h, w)
        flat = labels[r0:r1].ravel()
        counts += np.bincount(ids, minlength=h * w)
        for k, v in enumerate(values):
            out[:, k] += np.bincount(ids[flat == v], minlength=h * w)
    return (out / counts[:, None]).reshape(h, w, len(values))


def _kept_values(gt: np.ndarray | None, pred: np.ndarray, ignore_value: int | None) -> tuple[list, list]:
    """Sorted values of the scored ground-truth pixels and of the prediction's scored pixels and all pixels."""
    scored, everywhere = set(), set()
    for r0 in range(0, pred.shape[0], BAND_ROWS):
        p = pred[r0 : r0 + BAND_ROWS]
        everywhere.update(np.unique(p).tolist())
        if gt is not None:
            g = gt[r0 : r0 + BAND_ROWS]
            keep = g != ignore_value if ignore_value is not None else slice(None)
            scored.update(np.unique(g[keep]).tolist())
            scored.update(np.unique(p[keep]).tolist())
    return sorted(scored), sorted(everywhere)


def _image_confusion(gt: np.ndarray, pred: np.ndarray, values: list, ignore_value: int | None) -> np.ndarray:
    """``(V, V)`` confusion counts over ``values`` of the scored pixels of one image, in row bands."""
    lut = np.zeros(max(values) - min(values) + 1, np.int64)
    lut[np.asarray(values) - min(values)] = np.arange(len(values))
    conf = np.zeros((len(values), len(values)), np.int64)
    for r0 in range(0, gt.shape[0], BAND_ROWS):
        g, p = gt[r0 : r0 + BAND_ROWS], pred[r0 : r0 + BAND_ROWS]
        if ignore_value is not None:
            keep = g != ignore_value
            g, p = g[keep], p[keep]
        conf += confusion_matrix(lut[g - min(values)], lut[p - min(values)], len(values))
    return conf


def _class_average_miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes present in the ground truth (rows) of a confusion matrix, as
    :func:`~posvit_cli.core.measure.metrics.class_average_miou` computes it from pixels."""
    tp = np.diag(conf)
    present = conf.sum(1) > 0
    union = conf.sum(1) + conf.sum(0) - tp
    return float(np.mean(tp[present] / union[present])) if present.any() else float("nan")


def positional_r2(coarse: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Held-out R² of the positional ramps from coarse class maps ``(h, w, K)``; ``"max"`` is the largest."""
    scores = stack_r2(np.asarray(coarse, np.float64), DIAGNOSTIC_TARGETS, seed=seed)
    scores = {k: float(v) for k, v in scores.items()}
    scores["max"] = max(scores.values())
    return scores


class _Confusion:
    """A confusion matrix over label values that grows as new values appear."""

    def __init__(self):
        self.values: list[int] = []
        self.matrix = np.zeros((0, 0), np.int64)

    def add(self, values: list, matrix: np.ndarray) -> None:
        """Add one image's confusion counts ``matrix`` over its label ``values`` (rows: truth)."""
        new = sorted(set(values) - set(self.values))
        if new:
            old_values = self.values
            self.values = sorted(set(old_values) | set(new))
            grown = np.zeros((len(self.values), len(self.values)), np.int64)
            pos = [self.values.index(v) for v in old_values]
            if pos:
                grown[np.ix_(pos, pos)] = self.matrix
            self.matrix = grown
        pos = [self.values.index(v) for v in values]
        self.matrix[np.ix_(pos, pos)] += matrix


@dataclasses.dataclass
class SegmentationScores:
    """Accumulates per-image scores of a set of segmentations.

    Parameters
    ----------
    ignore_value : int or None
        Ground-truth value that is not scored (unlabelled pixels).
    grid : int
        Longer side of the coarse grid of the positional diagnostic.
    threshold : float
        Excess R² above which an image's prediction is flagged as positionally biased.
    class_names : dict of int to str, optional
    """

    ignore_value: int | None = 0
    grid: int = 64
    threshold: float = 0.3
    class_names: dict | None = None

    def __post_init__(self):
        self._confusion = _Confusion()
        self.images: list[dict] = []

    def add(self, name: str, pred: np.ndarray, gt: np.ndarray | None = None, probs: np.ndarray | None = None,
            class_values=None) -> dict:
        """Score one image.

        Parameters
        ----------
        name : str
        pred : ndarray of int, shape (H, W)
            Predicted label values.
        gt : ndarray of int, shape (H, W), optional
            Ground truth label values.
        probs : ndarray, shape (H, W, K), optional
            Class probabilities (for the diagnostic; otherwise the predicted labels' class fractions are used).
        class_values : sequence of int, optional
            The class value of each probability channel / the classes to probe.

        Returns
        -------
        dict
            ``name``, ``class_avg_miou`` (None without ground truth), ``positional_r2`` (dict),
            ``positional_r2_gt`` (dict or None), ``positional_excess`` and ``positionally_biased``.
        """
        pred = np.asarray(pred)
        entry: dict = {"name": name, "class_avg_miou": None}
        values = list(class_values) if class_values is not None else None
        if gt is not None:
            gt = np.asarray(gt)
            if gt.shape != pred.shape:
                raise PosvitError(
                    f"'{name}': prediction is {pred.shape[0]}×{pred.shape[1]} px, ground truth "
                    f"{gt.shape[0]}×{gt.shape[1]} px"
                )
            scored, everywhere = _kept_values(gt, pred, self.ignore_value)
            if scored:
                conf = _image_confusion(gt, pred, scored, self.ignore_value)
                entry["class_avg_miou"] = _class_average_miou(conf)
                self._confusion.add(scored, conf)
            if values is None:
                values = sorted(set(scored) | set(everywhere))
        if values is None:
            values = _kept_values(None, pred, self.ignore_value)[1]
        if probs is not None:
            coarse = block_average(np.asarray(probs, np.float32), self.grid)
        else:
            coarse = class_fractions(pred, values, self.grid)
        entry["positional_r2"] = positional_r2(coarse)
        entry["positional_r2_gt"] = None
        excess = entry["positional_r2"]["max"]
        if gt is not None:
            gt_coarse = class_fractions(gt, values, self.grid)
            entry["positional_r2_gt"] = positional_r2(gt_coarse)
            excess -= max(0.0, entry["positional_r2_gt"]["max"])
        entry["positional_excess"] = float(excess)
        entry["positionally_biased"] = bool(excess > self.threshold)
        self.images.append(entry)
        return entry

    def summary(self) -> dict:
        """Dataset scores: per-image class-average mIoU (mean, std), dataset mIoU, per-class IoU, bias flags."""
        scored = [e["class_avg_miou"] for e in self.images if e["class_avg_miou"] is not None]
        out: dict = {
            "images": len(self.images),
            "class_avg_miou_mean": float(np.mean(scored)) if scored else None,
            "class_avg_miou_std": float(np.std(scored)) if scored else None,
            "dataset_miou": None,
            "per_class_iou": {},
            "positional_r2_mean": float(np.mean([e["positional_r2"]["max"] for e in self.images]))
            if self.images else None,
            "positionally_biased_images": [e["name"] for e in self.images if e["positionally_biased"]],
            "bias_threshold": self.threshold,
        }
        conf = self._confusion
        if conf.values:
            iou = iou_per_class(conf.matrix)
            names = self.class_names or {}
            out["per_class_iou"] = {
                names.get(v, str(v)): (None if np.isnan(x) else float(x)) for v, x in zip(conf.values, iou)
            }
            out["dataset_miou"] = miou(conf.matrix, absent="skip")
            out["confusion"] = {"values": conf.values, "matrix": conf.matrix.tolist()}
        return out

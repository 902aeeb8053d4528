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
from posvit_cli.core.measure.metrics import class_average_miou, confusion_matrix, iou_per_class, miou
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


def _block_ids(H: int, W: int, h: int, w: int) -> np.ndarray:
    rows = (np.arange(H) * h) // H
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
    ids = _block_ids(H, W, h, w)
    counts = np.bincount(ids, minlength=h * w).astype(np.float64)
    flat = maps.reshape(-1, K)
    out = np.stack([np.bincount(ids, weights=flat[:, k], minlength=h * w) for k in range(K)], axis=-1)
    return (out / counts[:, None]).reshape(h, w, K)


def class_fractions(labels: np.ndarray, values, grid: int = 64) -> np.ndarray:
    """Fraction of each block's pixels that carry each class value, shape ``(h, w, len(values))``.

    Pixels whose value is not in ``values`` count in the block size but in no class.
    """
    labels = np.asarray(labels)
    H, W = labels.shape
    h, w = _grid_shape(H, W, grid)
    ids = _block_ids(H, W, h, w)
    flat = labels.ravel()
    counts = np.bincount(ids, minlength=h * w).astype(np.float64)
    out = np.stack([np.bincount(ids[flat == v], minlength=h * w) for v in values], axis=-1)
    return (out / counts[:, None]).reshape(h, w, len(values))


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

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        new = sorted(set(np.unique(gt).tolist()) | set(np.unique(pred).tolist()) - set(self.values))
        if new:
            old_values = self.values
            self.values = sorted(set(old_values) | set(new))
            grown = np.zeros((len(self.values), len(self.values)), np.int64)
            pos = [self.values.index(v) for v in old_values]
            if pos:
                grown[np.ix_(pos, pos)] = self.matrix
            self.matrix = grown
        lut = np.zeros(max(self.values) + 1, np.int64)
        lut[self.values] = np.arange(len(self.values))
        n = len(self.values)
        self.matrix += confusion_matrix(lut[gt.astype(np.int64)], lut[pred.astype(np.int64)], n)


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
            keep = np.ones(gt.shape, bool) if self.ignore_value is None else gt != self.ignore_value
            if keep.any():
                entry["class_avg_miou"] = class_average_miou(gt[keep], pred[keep])
                self._confusion.add(gt[keep], pred[keep])
            if values is None:
                values = sorted(set(np.unique(gt[keep]).tolist()) | set(np.unique(pred).tolist()))
        if values is None:
            values = sorted(np.unique(pred).tolist())
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

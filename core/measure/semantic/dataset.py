"""The data side of the semantic probe: class masks matched to a store's images and brought onto the encoder's
frame, the seeded split of images, the training samples (tokens, or pixels with bilinear features) and the
dataset-wide confusion matrix of a head on a store."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.cluster.masks import MASK_SUFFIXES
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.io.labels import LabelCheck, check_label_range
from posvit_cli.core.measure.semantic.heads import AffineHead, bilinear_taps, upsample_argmax
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["MASK_SUFFIXES", "MaskScan", "MaskSource", "gather_samples", "image_split", "scan_masks", "score_store",
           "scores_from_confusion"]


# --------------------------------------------------------------------------------------------------------------
# Masks


class MaskSource:
    """The class masks of a store's images, matched by file stem, read on demand.

    Parameters
    ----------
    store : FeatureStore
    mask_dir : str or path-like
        Folder of label images (palette PNG, greyscale, integer TIFF): class indices per pixel.

    Raises
    ------
    PosvitError
        If the folder does not exist or images have no mask (they are named).
    """

    def __init__(self, store, mask_dir):
        from posvit_cli.core.cluster.masks import store_mask_files, store_size_mode

        self.store = store
        self.mask_dir = str(mask_dir)
        self.files = store_mask_files(store, mask_dir)
        self.size_mode, self.patch = store_size_mode(store)
        self.resized: list[str] = []

    def processed(self, index: int) -> np.ndarray:
        """The mask of image ``index`` in the frame the encoder saw, shape ``proc_size``, int64.

        The same mapping as the overclustering evaluation (:mod:`posvit_cli.core.cluster.overclustering`): resized to the
        image if its size differs (nearest, with a warning), then through the store's resize and crop.
        """
        from posvit_cli.core.cluster.masks import labels_to_processed_frame
        from posvit_cli.core.io.labels import read_label_image, resize_labels_nearest

        r = self.store.record(index)
        path = self.files[index]
        lab = read_label_image(path, "mask", ignore_index=None).values
        if tuple(lab.shape) != tuple(r.orig_size) and r.orig_size[0] > 0:
            if str(path) not in self.resized:
                self.resized.append(str(path))
                warnings.warn(
                    f"mask '{Path(path).name}' is {lab.shape[0]}×{lab.shape[1]} px but its image is "
                    f"{r.orig_size[0]}×{r.orig_size[1]}: resized to the image (nearest)", PosvitWarning, stacklevel=2,
                )
            lab = resize_labels_nearest(lab, r.orig_size)
        return labels_to_processed_frame(lab, r, self.size_mode, self.patch)

    def tokens(self, index: int, processed: np.ndarray | None = None) -> np.ndarray:
        """The mask on the token grid ``(h, w)``: the class under each patch centre."""
        from posvit_cli.core.io.labels import resize_labels_nearest

        lab = self.processed(index) if processed is None else processed
        return resize_labels_nearest(lab, tuple(self.store.record(index).grid))


@dataclasses.dataclass
class MaskScan:
    """What one pass over the masks of some images found.

    Attributes
    ----------
    tokens : dict of int to ndarray (h, w) int64
        Token-grid masks by store index.
    valid_pixels : dict of int to int
        Labelled (not ignored) pixels of each image in the encoder's frame.
    max_label : int
        Largest label that is not the ignore index (−1 when every pixel is ignored).
    """

    tokens: dict
    valid_pixels: dict
    max_label: int


def scan_masks(source: MaskSource, indices: Sequence[int], *, ignore_index: int | None,
               num_classes: int | None = None, progress: ProgressCallback | None = None,
               task: str = "read masks", check: LabelCheck | None = None) -> MaskScan:
    """Read the masks of ``indices`` once: token-grid masks, labelled-pixel counts, label range checks.

    Raises
    ------
    PosvitError
        A negative label, or a label ≥ ``num_classes`` that is not the ignore index (the file is named).
    """
    prog = report(progress)
    tokens, valid = {}, {}
    max_label = -1
    for n, i in enumerate(indices):
        lab = source.processed(i)
        hi, labelled = check_label_range(lab, source.files[i], num_classes, ignore_index)
        if check is not None:
            check.add(lab, source.files[i], None if ignore_index is None else lab == ignore_index)
        max_label = max(max_label, hi)
        tokens[i] = source.tokens(i, lab)
        valid[i] = labelled
        prog(task, n + 1, len(indices))
    return MaskScan(tokens, valid, max_label)



# --------------------------------------------------------------------------------------------------------------
# Training samples


def image_split(names: Sequence[str], fraction: float, seed: int, salt: int) -> tuple[list[int], list[int]]:
    """Split positions ``0..len(names)-1`` into (rest, held out): a seeded permutation of the *sorted* names.

    At least one item is held out and at least one kept (for two or more names). The split depends only on the
    set of names, the fraction and the seed, so stores of the same images in any order split alike.
    """
    n = len(names)
    if n < 2:
        return list(range(n)), []
    order = sorted(range(n), key=lambda i: (names[i], i))
    perm = np.random.default_rng([int(seed), int(salt)]).permutation(n)
    k = min(n - 1, max(1, int(round(n * fraction))))
    held = sorted(order[p] for p in perm[:k])
    rest = sorted(order[p] for p in perm[k:])
    return rest, held


def gather_samples(store, layer: str, source: MaskSource, scan: MaskScan, indices: Sequence[int], *,
                   ignore_index: int | None, resolution: str, max_samples: int, pixels_per_token: int, seed: int,
                   salt: int = 3, progress: ProgressCallback | None = None,
                   task: str = "gather tokens") -> tuple[np.ndarray, np.ndarray, dict]:
    """Labelled training samples of some images, in memory (float16), subsampled to at most ``max_samples``.

    ``tokens``: the labelled tokens (mask at the patch centre not ignored). ``pixels``: ``pixels_per_token ×
    tokens`` labelled pixels per image drawn uniformly in the encoder's frame, each with the bilinear interpolation
    of the token features at that pixel. Every image keeps the same fraction of its candidates (seeded per image,
    by the rank of its name), so the subsample is class-blind.

    Returns
    -------
    X : ndarray of float16, shape (n, C)
    y : ndarray of int64, shape (n,)
    info : dict
        ``available`` (candidates before subsampling), ``used``.
    """
    prog = report(progress)
    recs = store.records
    cand = {}
    for i in indices:
        if resolution == "tokens":
            t = scan.tokens[i]
            cand[i] = int(t.size if ignore_index is None else (t != ignore_index).sum())
        else:
            h, w = recs[i].grid
            cand[i] = min(scan.valid_pixels[i], pixels_per_token * h * w)
    available = sum(cand.values())
    frac = min(1.0, max_samples / available) if available else 0.0
    take = {i: (c if frac >= 1.0 else int(math.floor(c * frac))) for i, c in cand.items()}
    total = sum(take.values())
    C = int(store.feature_rows(indices[0], layer, 0, 1).shape[-1]) if indices else int(store.channels)
    X = np.empty((total, C), dtype=np.float16)
    y = np.empty(total, dtype=np.int64)
    rank = {i: k for k, i in enumerate(sorted(indices, key=lambda j: (recs[j].name, j)))}
    pos = 0
    for n_done, i in enumerate(indices):
        k = take[i]
        if k == 0:
            prog(task, n_done + 1, len(indices))
            continue
        rng = np.random.default_rng([int(seed), int(salt), rank[i]])
        if resolution == "tokens":
            t = scan.tokens[i].ravel()
            valid = np.flatnonzero(t != ignore_index) if ignore_index is not None else np.arange(t.size)
            pick = valid if k == len(valid) else np.sort(rng.choice(valid, size=k, replace=False))
            X[pos:pos + k] = _picked_tokens(store, i, layer, pick)
            y[pos:pos + k] = t[pick]
        else:
            f = _stored_grid(store, i, layer)
            lab = source.processed(i)
            flat = lab.ravel()
            valid = np.flatnonzero(flat != ignore_index) if ignore_index is not None else np.arange(flat.size)
            n_draw = cand[i]
            pick = valid if n_draw == len(valid) else rng.choice(valid, size=n_draw, replace=False)
            if k < len(pick):
                pick = rng.choice(pick, size=k, replace=False)
            pick = np.sort(pick)
            H, W = lab.shape
            h, w = f.shape[:2]
            py, px = pick // W, pick % W
            y0, y1, ly = bilinear_taps(h, H)
            x0, x1, lx = bilinear_taps(w, W)
            a, b = ly[py][:, None], lx[px][:, None]
            def tap(rows, cols):  # float32 whatever the store holds: the same sums as from a float32 grid
                return f[rows, cols].astype(np.float32, copy=False)

            X[pos:pos + k] = ((1 - a) * (1 - b) * tap(y0[py], x0[px]) + (1 - a) * b * tap(y0[py], x1[px])
                              + a * (1 - b) * tap(y1[py], x0[px]) + a * b * tap(y1[py], x1[px]))
            y[pos:pos + k] = flat[pick]
        pos += k
        prog(task, n_done + 1, len(indices))
    if not np.isfinite(X).all():
        raise PosvitError(f"features of '{store.source}' contain NaN or inf (or overflow float16): re-extract them")
    return X, y, {"available": int(available), "used": int(total)}


#: Grids of more tokens than this are read in row bands of about this many tokens (gathering samples, scoring), so
#: a huge tiled image (625 × 625 × 384) never sits in memory as a whole float32 copy.
BAND_TOKENS = 65_536


def _stored_grid(store, index: int, layer: str) -> np.ndarray:
    """One image's token grid (h, w, C) as stored when that is float16 or float32, else float32."""
    f = store.features(index, layer, dtype=None)
    return f if f.dtype in (np.float16, np.float32) else f.astype(np.float32)


def _bands(store, index: int):
    """Row ranges ``(start, stop)`` of one image of about :data:`BAND_TOKENS` tokens each."""
    h, w = store.record(index).grid
    rows = max(1, BAND_TOKENS // max(w, 1))
    return [(a, min(h, a + rows)) for a in range(0, h, rows)]


def _picked_tokens(store, index: int, layer: str, pick: np.ndarray) -> np.ndarray:
    """Tokens at the sorted row-major indices ``pick`` of one image, shape (len(pick), C), float32.

    Grids above :data:`BAND_TOKENS` tokens are read in row bands, keeping the picked tokens of each.
    """
    h, w = store.record(index).grid
    if h * w <= BAND_TOKENS:
        f = store.features(index, layer, dtype=np.float32)
        return f.reshape(-1, f.shape[-1])[pick]
    parts = []
    for a, b in _bands(store, index):
        lo, hi = np.searchsorted(pick, [a * w, b * w])
        if hi > lo:
            band = store.feature_rows(index, layer, a, b, dtype=np.float32)
            parts.append(band.reshape(-1, band.shape[-1])[pick[lo:hi] - a * w])
    return np.concatenate(parts) if parts else np.empty((0, store.channels), np.float32)


def _grid_logits(head: AffineHead, store, index: int, layer: str, device):
    """Logits (h, w, K) of one image, after checking its features are finite; grids above
    :data:`BAND_TOKENS` tokens are read and scored in row bands."""
    import torch

    h, w = store.record(index).grid
    bands = [(0, None)] if h * w <= BAND_TOKENS else _bands(store, index)
    out = []
    for a, b in bands:
        f = (store.features(index, layer, dtype=np.float32) if b is None
             else store.feature_rows(index, layer, a, b, dtype=np.float32))
        if not np.isfinite(f).all():
            raise PosvitError(f"features of '{store.record(index).name}' in '{store.source}' contain NaN or inf")
        out.append(head.logits(f, device))
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


# --------------------------------------------------------------------------------------------------------------
# Scoring


def score_store(head: AffineHead, store, layer: str, source: MaskSource, indices: Sequence[int], *,
                num_classes: int, ignore_index: int | None, resolution: str,
                token_masks: dict | None = None, feature_index: dict | None = None, device="cpu",
                progress: ProgressCallback | None = None, task: str = "score") -> np.ndarray:
    """The dataset-wide confusion matrix of a head on some images (rows: ground truth, columns: prediction).

    Parameters
    ----------
    head : AffineHead
    store : FeatureStore
        Where the features come from.
    layer : str
    source : MaskSource
        Masks, indexed like ``indices`` (the store of the masks may differ from ``store``: robustness stores
        reuse the masks of the untransformed images).
    indices : sequence of int
        Images to score (indices into ``source.store``).
    token_masks : dict, optional
        Token-grid masks already read (``MaskScan.tokens``).
    feature_index : dict, optional
        ``{mask image index: feature image index in store}`` when the two stores differ.
    device : str

    Returns
    -------
    ndarray of int64, shape (num_classes, num_classes)
    """
    import torch

    from posvit_cli.core.measure.metrics import confusion_matrix

    prog = report(progress)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for n_done, i in enumerate(indices):
            j = feature_index[i] if feature_index is not None else i
            got, want = tuple(store.record(j).grid), tuple(source.store.record(i).grid)
            if got != want:
                raise PosvitError(
                    f"image '{source.store.record(i).name}' has a {got[0]}×{got[1]} token grid in "
                    f"'{store.source}' but {want[0]}×{want[1]} with its masks: extract both at the same size"
                )
            logits = _grid_logits(head, store, j, layer, device)
            if resolution == "tokens":
                gt = token_masks[i] if token_masks is not None and i in token_masks else source.tokens(i)
                pred = logits.argmax(-1).cpu().numpy()
            else:
                gt = source.processed(i)
                pred = upsample_argmax(logits, gt.shape).cpu().numpy()
            conf += confusion_matrix(gt, pred, num_classes, ignore_index=ignore_index)
            prog(task, n_done + 1, len(indices))
    return conf


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """mIoU, IoU per class, pixel accuracy and counts from one confusion matrix.

    A class with an empty union (never in the ground truth, never predicted) has IoU ``None`` and is left out of
    the mean; a class predicted but absent from the ground truth scores 0 (its false positives count).
    """
    from posvit_cli.core.measure.metrics import iou_per_class

    conf = np.asarray(conf, dtype=np.int64)
    iou = iou_per_class(conf)
    scored = np.isfinite(iou)
    total = int(conf.sum())
    gt_count = conf.sum(1)
    return {
        "miou": float(iou[scored].mean()) if scored.any() else None,
        "pixel_accuracy": float(np.trace(conf) / total) if total else None,
        "iou_per_class": {name: (float(v) if np.isfinite(v) else None) for name, v in zip(class_names, iou)},
        "classes_scored": int(scored.sum()),
        "classes_absent": [name for name, c, s in zip(class_names, gt_count, scored) if c == 0 and not s],
        "pixels_scored": total,
        "pixels_per_class": {name: int(c) for name, c in zip(class_names, gt_count)},
        "confusion_matrix": conf.tolist(),
    }

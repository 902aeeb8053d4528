"""Overclustering evaluation (Ziegler & Asano 2022), k-means decompositions, and the spatial entropy of clusters.

Two evaluation protocols, as the reference code runs them (see ``docs`` and the README for the differences):

``standard`` (Leopart / NeCo ``sup_overcluster``, what the papers report)
    Patch tokens at patch resolution → per-dimension z-score over all tokens → PCA to 50 dims fitted on all
    tokens → k-means (k-means++ seeding, 100 iterations, 5 restarts keeping the lowest inertia) for seeds 0–4 →
    cluster maps nearest-upsampled to 100×100; masks nearest-downsampled to 100×100; ignore label 255 →
    Hungarian matching when k equals the number of classes, greedy precision-based many-to-one when k is larger
    → mIoU from one dataset-wide confusion matrix over all classes (background included; a class with an
    empty union counts 0) → mean ± std over seeds.
``in-training`` (``PredsmIoUKmeans`` of the RASA/Leopart training code)
    Token grids bilinearly upsampled to the mask resolution (100×100) → z-score ``(x − μ)/(σ + 1e-5)`` →
    PCA fitted on the first 4M vectors → k-means with 50 iterations, 5 restarts, one seed (1) → Hungarian
    when k equals the number of classes, and both IoU-based and precision-based greedy many-to-one otherwise.

Everything streams from the feature store in bounded memory: per-dimension moments and the covariance are
accumulated chunk by chunk (float64), PCA is an ``eigh`` in float64, and only the projected ``(N, 50)`` tokens are
held in memory.

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

import dataclasses
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "PROTOCOLS",
    "FeatureProjection",
    "MaskSet",
    "apply_matching",
    "cluster_dataset",
    "fit_projection",
    "load_masks",
    "match_clusters",
    "overcluster_eval",
    "per_image_kmeans",
    "protocol_defaults",
    "spatial_entropy",
]

#: Settings of the two evaluation protocols.
PROTOCOLS = {
    "standard": dict(seeds=(0, 1, 2, 3, 4), n_init=5, max_iter=100, upsample_features=False, zscore_eps=0.0,
                     pca_fit_max=None, matchings_above=("precision",)),
    "in-training": dict(seeds=(1,), n_init=5, max_iter=50, upsample_features=True, zscore_eps=1e-5,
                        pca_fit_max=4_000_000, matchings_above=("iou", "precision")),
}
_CHUNK_TOKENS = 131_072


def protocol_defaults(protocol: str) -> dict:
    """The settings of ``standard`` or ``in-training`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise PosvitError(f"unknown protocol '{protocol}': use standard or in-training")
    return dict(PROTOCOLS[protocol])


# --------------------------------------------------------------------------------------------------------------
# Streaming tokens, z-score and PCA


def _iter_token_chunks(store, layer, indices, upsample_to, device, chunk_tokens=_CHUNK_TOKENS):
    """Yield ``(image_indices, tokens (n, C) float32 tensor)`` blocks of whole images, about ``chunk_tokens`` each."""
    import torch
    import torch.nn.functional as F

    batch, ids, count = [], [], 0
    for i in indices:
        f = torch.from_numpy(store.features(int(i), layer)).to(device)
        if upsample_to is not None:
            f = F.interpolate(f.permute(2, 0, 1)[None], size=tuple(upsample_to), mode="bilinear",
                              align_corners=False)[0].permute(1, 2, 0)
        batch.append(f.reshape(-1, f.shape[-1]))
        ids.append(int(i))
        count += batch[-1].shape[0]
        if count >= chunk_tokens:
            yield ids, torch.cat(batch)
            batch, ids, count = [], [], 0
    if batch:
        yield ids, torch.cat(batch)


@dataclasses.dataclass
class FeatureProjection:
    """Per-dimension z-score followed by PCA, as one affine map ``y = x @ weight + bias``.

    Attributes
    ----------
    mean, scale : ndarray (C,)
        The z-score: ``z = (x − mean) / scale``.
    components : ndarray (C, p) or None
        Principal axes of ``z`` (columns, by decreasing variance); None when no PCA is applied.
    pca_mean : ndarray (C,)
        Mean of ``z`` over the vectors the PCA was fitted on (zero when fitted on all vectors).
    explained_variance_ratio : float
        Fraction of the variance of ``z`` kept by the ``p`` components (1 without PCA).
    n_vectors : int
        Vectors the z-score was computed on.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray | None
    pca_mean: np.ndarray
    explained_variance_ratio: float
    n_vectors: int

    @property
    def out_dim(self) -> int:
        return int(self.mean.shape[0] if self.components is None else self.components.shape[1])

    def affine(self, device):
        """``(weight (C, p), bias (p,))`` float32 tensors on ``device``."""
        import torch

        inv = 1.0 / self.scale
        if self.components is None:
            w = np.diag(inv)
            b = -(self.mean * inv)
        else:
            w = self.components * inv[:, None]
            b = -((self.mean * inv) + self.pca_mean) @ self.components
        return (torch.as_tensor(w, dtype=torch.float32, device=device),
                torch.as_tensor(b, dtype=torch.float32, device=device))


def fit_projection(store, layer, indices, *, pca_dim: int = 50, zscore_eps: float = 0.0,
                   pca_fit_max: int | None = None, upsample_to=None, device="cpu",
                   progress: ProgressCallback | None = None) -> FeatureProjection:
    """Fit the z-score and PCA on all tokens of the given images, streaming them once.

    Parameters
    ----------
    store : FeatureStore
    layer : str
    indices : sequence of int
        Images to use, in order (the order matters only for ``pca_fit_max``).
    pca_dim : int
        Components to keep; 0 or at least the number of channels means no PCA.
    zscore_eps : float
        0: divide by the standard deviation (scikit-learn's StandardScaler, a zero deviation becomes 1);
        ``eps > 0``: divide by ``σ + eps`` (the in-training reference).
    pca_fit_max : int, optional
        Fit the PCA on the first this many vectors only (the in-training reference uses 4,000,000).
    upsample_to : (int, int), optional
        Bilinearly upsample each token grid to this size first (in-training protocol).

    Returns
    -------
    FeatureProjection
    """
    import torch

    prog = report(progress)
    shift = None
    n = 0
    s1 = s2 = None
    n_fit = 0
    f1 = f2 = None
    done = 0
    for ids, x in _iter_token_chunks(store, layer, indices, upsample_to, device):
        x = x.to(torch.float32)
        if shift is None:
            # Moments about a nearby point (the first chunk's mean) avoid cancellation in E[x²] − E[x]².
            shift = x.mean(0, dtype=torch.float64).to(torch.float32)
            c = x.shape[1]
            s1 = torch.zeros(c, dtype=torch.float64, device=device)
            s2 = torch.zeros(c, c, dtype=torch.float64, device=device)
            if pca_fit_max:
                f1 = torch.zeros_like(s1)
                f2 = torch.zeros_like(s2)
        xs = x - shift
        s1 += xs.sum(0, dtype=torch.float64)
        s2 += (xs.T @ xs).double()
        n += xs.shape[0]
        if pca_fit_max and n_fit < pca_fit_max:
            part = xs[: pca_fit_max - n_fit]
            f1 += part.sum(0, dtype=torch.float64)
            f2 += (part.T @ part).double()
            n_fit += part.shape[0]
        done += len(ids)
        prog("z-score and PCA", done, len(indices))
    if n == 0:
        raise PosvitError("no tokens to cluster: the store is empty")
    m1 = s1 / n
    cov = s2 / n - torch.outer(m1, m1)
    var = torch.diagonal(cov).clamp(min=0)
    std = var.sqrt()
    if zscore_eps > 0:
        scale = std + zscore_eps
    else:
        scale = torch.where(std > 0, std, torch.ones_like(std))
    mean = shift.double() + m1
    c = mean.shape[0]
    pca_mean = torch.zeros(c, dtype=torch.float64, device=device)
    if pca_fit_max and n_fit < n:
        fm = f1 / n_fit
        cov_fit = f2 / n_fit - torch.outer(fm, fm)
        # Mean of z over the fitted vectors: ((shift + fm) − mean) / scale.
        pca_mean = (shift.double() + fm - mean) / scale
    else:
        cov_fit = cov
    cov_z = (cov_fit / torch.outer(scale, scale)).cpu()
    if pca_dim <= 0 or pca_dim >= c:
        return FeatureProjection(mean.cpu().numpy(), scale.cpu().numpy(), None, pca_mean.cpu().numpy(), 1.0, n)
    evals, evecs = torch.linalg.eigh(cov_z)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    comps = evecs[:, :pca_dim]
    # eigh's signs are arbitrary: make each axis's largest entry positive so runs agree across devices.
    flip = torch.sign(comps[comps.abs().argmax(0), torch.arange(pca_dim)])
    comps = comps * torch.where(flip == 0, torch.ones_like(flip), flip)
    total = float(evals.clamp(min=0).sum())
    ratio = float(evals[:pca_dim].clamp(min=0).sum()) / total if total > 0 else 1.0
    return FeatureProjection(mean.cpu().numpy(), scale.cpu().numpy(), comps.numpy(), pca_mean.cpu().numpy(), ratio, n)


def project_tokens(store, layer, indices, projection: FeatureProjection, *, upsample_to=None, device="cpu",
                   progress: ProgressCallback | None = None):
    """Project every token of the given images: returns ``(Y (N, p) float32 tensor, offsets (n_img + 1,))``."""
    import torch

    w, b = projection.affine(device)
    prog = report(progress)
    parts, sizes = [], []
    done = 0
    for ids, x in _iter_token_chunks(store, layer, indices, upsample_to, device):
        parts.append(torch.addmm(b[None, :], x.to(torch.float32), w))
        done += len(ids)
        prog("project tokens", done, len(indices))
    for i in indices:
        g = store.record(int(i)).grid if upsample_to is None else tuple(upsample_to)
        sizes.append(int(g[0]) * int(g[1]))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return torch.cat(parts), offsets


# --------------------------------------------------------------------------------------------------------------
# Masks


@dataclasses.dataclass
class MaskSet:
    """Ground-truth masks of a store's images, resampled to the evaluation grid.

    Attributes
    ----------
    labels : ndarray of int32, shape (n_images, H, W)
        Class per evaluation pixel (``ignore_index`` where ignored), in store order.
    num_classes : int
    ignore_index : int or None
    class_names : list of str
    files : list of str
        The mask file of each image.
    resized : list of str
        Masks whose size differed from their image's (resized nearest, with a warning).
    """

    labels: np.ndarray
    num_classes: int
    ignore_index: int | None
    class_names: list
    files: list
    resized: list

    @property
    def eval_size(self) -> tuple[int, int]:
        return int(self.labels.shape[1]), int(self.labels.shape[2])

    def present_classes(self) -> np.ndarray:
        """Classes that occur in at least one kept pixel."""
        lab = self.labels.ravel()
        if self.ignore_index is not None:
            lab = lab[lab != self.ignore_index]
        return np.unique(lab)


MASK_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_gt", "_seg")


def load_masks(store, mask_dir, *, eval_size=(100, 100), ignore_index: int | None = 255,
               num_classes: int | None = None, class_names: Sequence[str] | None = None,
               progress: ProgressCallback | None = None) -> MaskSet:
    """Read every image's mask (matched by file stem) and bring it to the evaluation grid.

    A mask is first mapped onto the frame the encoder saw (the store's ``--size`` resize, and centre crop for
    ``crop:N``; nearest neighbour, pixel centres), then nearest-resized to ``eval_size`` the way the references do
    (``F.interpolate(mode="nearest")``). VOC palette PNGs decode to class indices.

    Raises
    ------
    PosvitError
        If masks are missing for some images (they are named), a mask holds a value ≥ ``num_classes`` that is not
        ``ignore_index``, or the class names do not fit.
    """
    from posvit_cli.core.io.labels import (
        LabelCheck, check_label_range, find_label_files, read_label_image, resize_labels_nearest,
    )

    records = store.records
    names = [r.name for r in records]
    found, missing = find_label_files(names, mask_dir, MASK_SUFFIXES)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PosvitError(
            f"no mask in '{mask_dir}' for {len(missing)} of {len(names)} images: {shown} "
            "(masks are matched by file stem, e.g. img1.jpg ↔ img1.png)"
        )
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise PosvitError(f"{len(class_names)} class names given for {num_classes} classes")
    if class_names is not None and num_classes is None:
        num_classes = len(class_names)
    eh, ew = (int(v) for v in eval_size)
    out = np.empty((len(records), eh, ew), dtype=np.int32)
    prog = report(progress)
    size_mode, patch = _store_resize(store)
    resized, files = [], []
    max_label = -1
    check = LabelCheck("mask", num_classes)
    for i, r in enumerate(records):
        path = found[r.name]
        files.append(str(path))
        mask = read_label_image(path, "mask", ignore_index=ignore_index)
        check.add(mask)
        lab = mask.values
        if tuple(lab.shape) != tuple(r.orig_size):
            resized.append(str(path))
            warnings.warn(
                f"mask '{Path(path).name}' is {lab.shape[0]}×{lab.shape[1]} px but its image is "
                f"{r.orig_size[0]}×{r.orig_size[1]}: resized to the image (nearest)",
                PosvitWarning, stacklevel=2,
            )
            lab = resize_labels_nearest(lab, r.orig_size)
        lab = _to_processed_frame(lab, r, size_mode, patch)
        lab = resize_labels_nearest(lab, (eh, ew), sampling="floor")
        max_label = max(max_label, check_label_range(lab, path, num_classes, ignore_index)[0])
        out[i] = lab
        prog("read masks", i + 1, len(records))
    check.finish()
    if num_classes is None:
        num_classes = max_label + 1
        if num_classes < 1:
            raise PosvitError(f"every mask pixel in '{mask_dir}' is the ignore index {ignore_index}")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    return MaskSet(out, int(num_classes), ignore_index, names, files, resized)


def _store_resize(store):
    from posvit_cli.core.io.preprocess import parse_size

    try:
        mode = store.resize_mode
    except PosvitError:
        mode = parse_size("native")
    return mode, int(store.patch_size or 1)


def _to_processed_frame(lab, record, mode, patch):
    """Map a mask at the source image's size onto the image the encoder saw (same crop, same size)."""
    from posvit_cli.core.io.labels import resize_labels_nearest
    from posvit_cli.core.io.preprocess import plan_resize

    ph, pw = record.proc_size
    if record.meta.get("tiles"):
        # Tiled extraction crops the remainder beyond the last whole patch at the bottom and right.
        return lab[:ph, :pw]
    if mode.kind == "crop":
        try:
            resize_hw, crop = plan_resize(tuple(record.orig_size), mode, patch)
        except PosvitError:
            resize_hw, crop = (ph, pw), None
        lab = resize_labels_nearest(lab, resize_hw)
        if crop is not None:
            top = (resize_hw[0] - crop[0]) // 2
            left = (resize_hw[1] - crop[1]) // 2
            lab = lab[top : top + crop[0], left : left + crop[1]]
        return resize_labels_nearest(lab, (ph, pw))
    return resize_labels_nearest(lab, (ph, pw))


# --------------------------------------------------------------------------------------------------------------
# Matching clusters to classes and scoring


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


def _score(conf, method):
    from posvit_cli.core.measure.metrics import iou_per_class

    mapping = match_clusters(conf, method)
    cc = apply_matching(conf, mapping)
    iou = np.nan_to_num(iou_per_class(cc), nan=0.0)
    return float(iou.mean()), iou, mapping


# --------------------------------------------------------------------------------------------------------------
# Spatial entropy


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


# --------------------------------------------------------------------------------------------------------------
# Clustering a whole store


def _check_k(ks, n_tokens):
    for k in ks:
        if k < 1:
            raise PosvitError(f"k must be at least 1 (got {k})")
        if k > n_tokens:
            raise PosvitError(f"k={k} is larger than the number of tokens to cluster ({n_tokens}): use a smaller -k")


def _kmeans_labels(y, k, seed, n_init, max_iter, device, max_points_per_cluster, progress, task):
    """k-means on the projected tokens (optionally trained on a subsample), labels for all tokens."""
    import torch

    from posvit_cli.core.cluster.kmeans import assign_labels, kmeans

    n = y.shape[0]
    if max_points_per_cluster and n > k * max_points_per_cluster:
        # faiss's default: train on a random subset of k · max_points_per_cluster points, then label all.
        g = torch.Generator().manual_seed(10_000 + seed)
        idx = torch.randperm(n, generator=g)[: k * max_points_per_cluster].to(y.device)
        res = kmeans(y[idx], k, n_init=n_init, max_iter=max_iter, seed=seed, device=device, progress=progress,
                     task=task)
        labels, sq = assign_labels(y, res.centers, device=device)
        return labels, float(sq.sum()), res.n_iter
    res = kmeans(y, k, n_init=n_init, max_iter=max_iter, seed=seed, device=device, progress=progress, task=task)
    return res.labels, res.inertia, res.n_iter


def _grids(store, indices, upsample_to):
    return [tuple(upsample_to) if upsample_to is not None else tuple(store.record(int(i)).grid) for i in indices]


def _split(labels, offsets, grids):
    return [labels[offsets[j] : offsets[j + 1]].reshape(grids[j]) for j in range(len(grids))]


def overcluster_eval(store, masks: MaskSet, ks: Sequence[int], *, protocol: str = "standard",
                     seeds: Sequence[int] | None = None, pca_dim: int = 50, n_init: int | None = None,
                     max_iter: int | None = None, layer: str | None = None, device="cpu",
                     max_points_per_cluster: int | None = None, keep_maps: bool = False,
                     progress: ProgressCallback | None = None) -> dict:
    """Overclustering mIoU of a store's features against masks, per k, as mean ± std over seeds.

    Parameters
    ----------
    store : FeatureStore
    masks : MaskSet
        From :func:`load_masks`, in store order, at the evaluation size.
    ks : sequence of int
    protocol : {"standard", "in-training"}
    seeds, n_init, max_iter : optional
        Override the protocol's settings.
    pca_dim : int
    max_points_per_cluster : int, optional
        Train k-means on a random subset of ``k ·`` this many tokens (faiss's default is 256), then label all.
    keep_maps : bool
        Return the cluster maps and matched class maps of the first seed under ``"maps"``.

    Returns
    -------
    dict (JSON-ready except ``"maps"``)
        ``settings``, ``pca`` (explained variance), and ``results``: one entry per (k, matching) with
        ``miou_mean``, ``miou_std`` (population std over seeds), ``miou_per_seed``, ``iou_per_class`` (mean over
        seeds), ``clusters_to_background``, ``spatial_entropy`` (mean, std, shuffled reference), ``inertia_per_seed``
        and ``seconds``.
    """
    from posvit_cli.core.io.labels import nearest_indices
    from posvit_cli.core.measure.metrics import confusion_matrix

    cfg = protocol_defaults(protocol)
    seeds = tuple(cfg["seeds"] if seeds is None else seeds)
    n_init = cfg["n_init"] if n_init is None else n_init
    max_iter = cfg["max_iter"] if max_iter is None else max_iter
    layer = store.check_layer(layer)
    prog = report(progress)
    indices = list(range(len(store)))
    eh, ew = masks.eval_size
    upsample_to = (eh, ew) if cfg["upsample_features"] else None
    grids = _grids(store, indices, upsample_to)
    n_tokens = sum(h * w for h, w in grids)
    _check_k(ks, n_tokens)
    t0 = time.perf_counter()
    proj = fit_projection(store, layer, indices, pca_dim=pca_dim, zscore_eps=cfg["zscore_eps"],
                          pca_fit_max=cfg["pca_fit_max"], upsample_to=upsample_to, device=device, progress=prog)
    y, offsets = project_tokens(store, layer, indices, proj, upsample_to=upsample_to, device=device, progress=prog)
    prep_seconds = time.perf_counter() - t0

    gt = masks.labels
    n_cls = masks.num_classes
    keep = np.ones(gt.shape, bool) if masks.ignore_index is None else gt != masks.ignore_index
    gt_kept = gt[keep].astype(np.int64)
    # Nearest upsampling of every cluster map to the evaluation grid, as index arrays per grid size.
    samplers = {g: (nearest_indices(g[0], eh, "floor"), nearest_indices(g[1], ew, "floor")) for g in set(grids)}

    results = []
    maps: dict[str, list] = {}
    for k in ks:
        per_method: dict[str, dict] = {}
        methods = ["hungarian"] if k <= n_cls else list(cfg["matchings_above"])
        entropies, shuffled, inertias, iters = [], [], [], []
        t_k = time.perf_counter()
        for si, seed in enumerate(seeds):
            task = f"k-means k={k} seed {seed}"
            labels, inertia, n_it = _kmeans_labels(y, k, seed, n_init, max_iter, device, max_points_per_cluster,
                                                   prog, task)
            inertias.append(inertia)
            iters.append(n_it)
            per_img = _split(labels, offsets, grids)
            entropies.append(spatial_entropy(per_img, k))
            if si == 0:
                shuffled.append(spatial_entropy(per_img, k, shuffle_seed=seed))
            pred = np.empty(gt.shape, dtype=np.int64)
            for j, lab in enumerate(per_img):
                rr, cc = samplers[grids[j]]
                pred[j] = lab[rr[:, None], cc[None, :]]
            conf = confusion_matrix(gt_kept, pred[keep], n_cls, num_pred=k)
            for method in methods:
                miou, iou, mapping = _score(conf, method)
                entry = per_method.setdefault(method, {"miou": [], "iou": [], "bg": []})
                entry["miou"].append(miou)
                entry["iou"].append(iou)
                entry["bg"].append(float(np.mean(mapping == 0)))
                if si == 0 and keep_maps:
                    maps[f"kmeans_k{k}_{method}_class"] = [mapping[lab].astype(np.int32) for lab in per_img]
            if si == 0 and keep_maps:
                maps[f"kmeans_k{k}"] = [lab.astype(np.int32) for lab in per_img]
        seconds = time.perf_counter() - t_k
        for method, entry in per_method.items():
            mi = np.asarray(entry["miou"])
            results.append({
                "k": int(k),
                "matching": method,
                "miou_mean": float(mi.mean()),
                "miou_std": float(mi.std()),
                "miou_per_seed": [float(v) for v in mi],
                "iou_per_class": {name: float(v) for name, v in zip(masks.class_names, np.mean(entry["iou"], 0))},
                "clusters_to_background": float(np.mean(entry["bg"])),
                "spatial_entropy": float(np.mean(entropies)),
                "spatial_entropy_std": float(np.std(entropies)),
                "spatial_entropy_shuffled": float(shuffled[0]),
                "inertia_per_seed": [float(v) for v in inertias],
                "kmeans_iterations": [int(v) for v in iters],
                "seconds": round(seconds, 3),
            })
    present = set(int(c) for c in masks.present_classes())
    out = {
        "settings": {
            "protocol": protocol, "layer": layer, "seeds": list(seeds), "n_init": n_init, "max_iter": max_iter,
            "pca_dim": proj.out_dim, "eval_size": [eh, ew], "ignore_index": masks.ignore_index,
            "num_classes": n_cls, "class_names": list(masks.class_names),
            "features": "bilinear-upsampled to the eval size" if upsample_to else "patch resolution",
            "zscore": f"(x - mean) / (std + {cfg['zscore_eps']})" if cfg["zscore_eps"] else "(x - mean) / std",
            "pca_fit_vectors": min(proj.n_vectors, cfg["pca_fit_max"] or proj.n_vectors),
            "max_points_per_cluster": max_points_per_cluster, "init": "k-means++ (greedy, sampled)",
            "std": "population std over seeds",
        },
        "n_images": len(indices),
        "n_tokens": int(n_tokens),
        "n_eval_pixels": int(keep.sum()),
        "classes_absent_from_masks": [masks.class_names[c] for c in range(n_cls) if c not in present],
        "pca": {"dims": proj.out_dim, "explained_variance_ratio": proj.explained_variance_ratio},
        "prep_seconds": round(prep_seconds, 3),
        "results": results,
    }
    if keep_maps:
        out["maps"] = maps
    return out


def cluster_dataset(store, ks: Sequence[int], *, seeds: Sequence[int] = (0,), pca_dim: int = 50, n_init: int = 5,
                    max_iter: int = 100, layer: str | None = None, device="cpu",
                    max_points_per_cluster: int | None = None, progress: ProgressCallback | None = None) -> dict:
    """Dataset-wide k-means of all tokens (z-score → PCA → k-means), without masks.

    Returns
    -------
    dict
        ``results``: per k the inertia and spatial entropy per seed, and ``maps``: ``{"kmeans_k{k}": [labels
        (h, w) per image]}`` from the first seed.
    """
    layer = store.check_layer(layer)
    prog = report(progress)
    indices = list(range(len(store)))
    grids = _grids(store, indices, None)
    n_tokens = sum(h * w for h, w in grids)
    _check_k(ks, n_tokens)
    proj = fit_projection(store, layer, indices, pca_dim=pca_dim, device=device, progress=prog)
    y, offsets = project_tokens(store, layer, indices, proj, device=device, progress=prog)
    results, maps = [], {}
    for k in ks:
        ent, shuffled, inertias, iters = [], None, [], []
        t_k = time.perf_counter()
        for si, seed in enumerate(seeds):
            labels, inertia, n_it = _kmeans_labels(y, k, seed, n_init, max_iter, device, max_points_per_cluster,
                                                   prog, f"k-means k={k} seed {seed}")
            per_img = _split(labels, offsets, grids)
            ent.append(spatial_entropy(per_img, k))
            inertias.append(inertia)
            iters.append(n_it)
            if si == 0:
                shuffled = spatial_entropy(per_img, k, shuffle_seed=seed)
                maps[f"kmeans_k{k}"] = [lab.astype(np.int32) for lab in per_img]
        results.append({
            "k": int(k), "spatial_entropy": float(np.mean(ent)), "spatial_entropy_std": float(np.std(ent)),
            "spatial_entropy_shuffled": float(shuffled), "spatial_entropy_per_seed": [float(v) for v in ent],
            "inertia_per_seed": [float(v) for v in inertias], "kmeans_iterations": iters,
            "seconds": round(time.perf_counter() - t_k, 3),
        })
    return {
        "settings": {"mode": "dataset", "layer": layer, "seeds": list(seeds), "n_init": n_init,
                     "max_iter": max_iter, "pca_dim": proj.out_dim, "max_points_per_cluster": max_points_per_cluster,
                     "init": "k-means++ (greedy, sampled)"},
        "n_images": len(indices), "n_tokens": int(n_tokens),
        "pca": {"dims": proj.out_dim, "explained_variance_ratio": proj.explained_variance_ratio},
        "results": results, "maps": maps,
    }


def per_image_kmeans(store, ks: Sequence[int], *, n_init: int = 15, max_iter: int = 300, seed: int = 0,
                     layer: str | None = None, device="cpu", progress: ProgressCallback | None = None) -> dict:
    """k-means of each image's tokens on their own (the "What DINO saw" decompositions).

    Each image's tokens are standardised channel by channel over that image (zero-variance channels are left
    centred), then clustered with ``n_init`` k-means++ restarts, keeping the lowest inertia.

    Returns
    -------
    dict
        ``results``: per k the spatial entropy (per image, token-weighted) and its shuffled reference, the mean
        inertia; ``maps``: ``{"kmeans_k{k}": [labels (h, w) per image]}``.
    """
    import torch

    from posvit_cli.core.cluster.kmeans import kmeans

    layer = store.check_layer(layer)
    prog = report(progress)
    n = len(store)
    for r in store.records:
        h, w = r.grid
        for k in ks:
            if k > h * w:
                raise PosvitError(
                    f"k={k} is larger than the {h * w} tokens of image '{r.name}': use a smaller -k"
                )
            if k < 1:
                raise PosvitError(f"k must be at least 1 (got {k})")
    maps = {f"kmeans_k{k}": [] for k in ks}
    inertia = {k: [] for k in ks}
    t0 = time.perf_counter()
    for i, (rec, f) in enumerate(store.iter_features(layer)):
        x = torch.from_numpy(f.reshape(-1, f.shape[-1])).to(device)
        mu = x.mean(0)
        sd = x.std(0, unbiased=False)
        x = (x - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))
        for k in ks:
            res = kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=seed, device=device)
            maps[f"kmeans_k{k}"].append(res.labels.reshape(rec.grid).astype(np.int32))
            inertia[k].append(res.inertia)
        prog("per-image k-means", i + 1, n)
    results = []
    for k in ks:
        labs = maps[f"kmeans_k{k}"]
        results.append({
            "k": int(k),
            "spatial_entropy": spatial_entropy(labs, k, per_image=True),
            "spatial_entropy_shuffled": spatial_entropy(labs, k, per_image=True, shuffle_seed=seed),
            "inertia_mean": float(np.mean(inertia[k])),
        })
    return {
        "settings": {"mode": "per-image", "layer": layer, "n_init": n_init, "max_iter": max_iter, "seed": seed,
                     "standardise": "per image, per channel", "init": "k-means++ (greedy)"},
        "n_images": n, "seconds": round(time.perf_counter() - t0, 3), "results": results, "maps": maps,
    }


def write_label_store(path, store, maps: dict, provenance: dict, *, overwrite: bool = False) -> str | None:
    """Write label maps into a maps-only store with the source store's image paths and sizes.

    Parameters
    ----------
    maps : dict of name → list of ndarray (h, w), one per image in store order
    """
    from posvit_cli.core.features.store import StoreWriter

    prov = {**provenance, "channels": 0, "patch_size": store.patch_size, "source_store": store.source,
            "maps": sorted(maps)}
    writer = StoreWriter(path, provenance=prov, layers=[], overwrite=overwrite)
    try:
        for i, rec in enumerate(store.records):
            writer.add(rec.path, {}, maps={name: arrs[i] for name, arrs in maps.items()},
                       orig_size=rec.orig_size, proc_size=rec.proc_size, meta=rec.meta)
        writer.commit()
    except BaseException:
        writer.abort()
        # A label store has nothing to resume: leave no partial file behind.
        if writer.work_path is not None:
            import shutil

            wp = Path(writer.work_path)
            if wp.is_dir():
                shutil.rmtree(wp, ignore_errors=True)
            elif wp.exists():
                wp.unlink()
        raise
    final = writer.close(complete=True)
    return str(final) if final else None

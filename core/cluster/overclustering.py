"""Overclustering evaluation (Ziegler & Asano 2022), k-means decompositions, and how much clusters follow position.

Every clustering reports its ``position_dependence``
(:func:`~posvit_cli.core.cluster.position_dependence.position_dependence`: mutual information between cluster
label and grid block against each image's labels rolled on the torus, a p-value and a normalised dependence),
measured on the first seed's clustering. The ``spatial_entropy`` keys (``_std``, ``_shuffled``, ``_per_seed``)
are the old measure (:mod:`~posvit_cli.core.cluster.entropy`), kept for scripts that read them: it does not
separate position from content.

Two evaluation protocols, as the reference code runs them (see ``docs`` and the README for the differences):

``standard`` (Leopart / NeCo ``sup_overcluster``, what the papers report)
    Patch tokens at patch resolution → per-dimension z-score over all tokens → PCA to 50 dims fitted on all
    tokens → k-means (k-means++ seeding, 100 iterations, 5 restarts keeping the lowest inertia) for seeds 0–4 →
    cluster maps nearest-upsampled to 100×100; masks nearest-downsampled to 100×100; ignore label 255 →
    Hungarian matching when k equals the number of classes, greedy precision-based many-to-one for any other k
    (larger or smaller, as Leopart's ``PredsmIoU`` does) → mIoU from one dataset-wide confusion matrix over all
    classes (background included; a class with an empty union counts 0) → mean ± std over seeds.
``in-training`` (``PredsmIoUKmeans`` of the RASA/Leopart training code)
    Token grids bilinearly upsampled to the mask resolution (100×100) → z-score ``(x − μ)/(σ + 1e-5)`` →
    PCA fitted on the first 4M vectors → k-means with 50 iterations, 5 restarts, one seed (1) → Hungarian
    when k equals the number of classes, and both IoU-based and precision-based greedy many-to-one otherwise.

``matching="hungarian"`` keeps Hungarian matching for k below the number of classes too (posvit's earlier rule).

The pieces live in their own modules: :mod:`~posvit_cli.core.cluster.projection` (streamed z-score and PCA),
:mod:`~posvit_cli.core.cluster.masks` (ground truth on the evaluation grid), :mod:`~posvit_cli.core.cluster.matching`
(clusters to classes), :mod:`~posvit_cli.core.cluster.position_dependence` (does a clustering follow position?) and
:mod:`~posvit_cli.core.cluster.entropy` (the old spatial entropy).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.cluster.entropy import spatial_entropy
from posvit_cli.core.cluster.masks import MaskSet
from posvit_cli.core.cluster.position_dependence import DEFAULT_BINS, DEFAULT_DRAWS, position_dependence
from posvit_cli.core.cluster.matching import matched_iou
from posvit_cli.core.cluster.projection import fit_projection, project_tokens, projected_source
from posvit_cli.core.cluster.sampled import fit_sample_size, kmeans_streamed
from posvit_cli.core.cluster.streamed import FIT_MODES, kmeans_stream
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "MATCHING_RULES",
    "PROTOCOLS",
    "cluster_dataset",
    "matchings_for",
    "overcluster_eval",
    "per_image_kmeans",
    "protocol_defaults",
    "write_label_store",
]

#: Settings of the two evaluation protocols. ``many_to_one``: the greedy matchings used when k ≠ classes.
PROTOCOLS = {
    "standard": dict(seeds=(0, 1, 2, 3, 4), n_init=5, max_iter=100, upsample_features=False, zscore_eps=0.0,
                     pca_fit_max=None, many_to_one=("precision",)),
    "in-training": dict(seeds=(1,), n_init=5, max_iter=50, upsample_features=True, zscore_eps=1e-5,
                        pca_fit_max=4_000_000, many_to_one=("iou", "precision")),
}

#: When Hungarian matching is used: ``reference`` only at k = classes (Leopart's ``PredsmIoU``: greedy many-to-one
#: for every other k), ``hungarian`` at every k ≤ classes (posvit's earlier rule).
MATCHING_RULES = ("reference", "hungarian")


def matchings_for(k: int, n_classes: int, protocol: str = "standard", rule: str = "reference") -> list[str]:
    """The matchings (``hungarian``, ``precision``, ``iou``) evaluated for ``k`` clusters and ``n_classes``.

    Hungarian when ``k == n_classes`` (or ``k < n_classes`` under ``rule="hungarian"``), else the protocol's
    greedy many-to-one matchings: precision (standard), IoU and precision (in-training).
    """
    if rule not in MATCHING_RULES:
        raise PosvitError(f"unknown matching rule '{rule}': use reference or hungarian")
    if k == n_classes or (k < n_classes and rule == "hungarian"):
        return ["hungarian"]
    return list(protocol_defaults(protocol)["many_to_one"])


def protocol_defaults(protocol: str) -> dict:
    """The settings of ``standard`` or ``in-training`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise PosvitError(f"unknown protocol '{protocol}': use standard or in-training")
    return dict(PROTOCOLS[protocol])


# --------------------------------------------------------------------------------------------------------------
# Clustering a whole store


def _check_fit(fit: str) -> None:
    if fit not in FIT_MODES:
        raise PosvitError(f"unknown k-means fit '{fit}' for tokens beyond the memory cap: use stream or sample")


def _check_k(ks, n_tokens):
    for k in ks:
        if k < 1:
            raise PosvitError(f"k must be at least 1 (got {k})")
        if k > n_tokens:
            raise PosvitError(f"k={k} is larger than the number of tokens to cluster ({n_tokens}): use a smaller -k")


@dataclasses.dataclass
class _Tokens:
    """The projected tokens to cluster: ``y`` (N, p) in memory, or None and a ``source`` streamed per pass."""

    y: object
    source: object
    n: int
    dims: int


def _projected_tokens(store, layer, indices, proj, upsample_to, device, prog, n_tokens) -> _Tokens:
    """Project all tokens into memory, unless they exceed the fit cap (then they are re-projected per pass)."""
    if fit_sample_size(n_tokens, proj.out_dim) is None:
        y, _ = project_tokens(store, layer, indices, proj, upsample_to=upsample_to, device=device, progress=prog)
        return _Tokens(y, None, int(y.shape[0]), proj.out_dim)
    source = projected_source(store, layer, indices, proj, upsample_to=upsample_to, device=device)
    return _Tokens(None, source, int(n_tokens), proj.out_dim)


def _kmeans_labels(tokens: _Tokens, k, seed, n_init, max_iter, device, max_points_per_cluster, progress, task,
                   fit="stream"):
    """k-means on the projected tokens (optionally trained on a subsample), labels for all tokens.

    Tokens beyond the fit cap (:data:`~posvit_cli.core.cluster.sampled.FIT_MAX_VALUES`) are streamed from the
    store: with ``fit="stream"`` exact Lloyd passes over all of them (:mod:`~posvit_cli.core.cluster.streamed`,
    the in-memory result for the same seed); with ``fit="sample"``, or when ``max_points_per_cluster`` asks for a
    subset fit, k-means is fitted on a sample of at most the cap, drawn like the ``max_points_per_cluster`` one,
    and every token labelled chunk by chunk.
    """
    import torch

    from posvit_cli.core.cluster.kmeans import assign_labels, kmeans

    y = tokens.y
    if y is None and fit == "stream" and not max_points_per_cluster:
        res = kmeans_stream(tokens.source, tokens.n, tokens.dims, k, n_init=n_init, max_iter=max_iter, seed=seed,
                            device=device, progress=progress, task=task)
        return res.labels, res.inertia, res.n_iter
    if y is None:
        limit = k * max_points_per_cluster if max_points_per_cluster else None
        sample = fit_sample_size(tokens.n, tokens.dims, limit) or tokens.n
        return kmeans_streamed(tokens.source, tokens.n, tokens.dims, k, sample=sample, sample_seed=10_000 + seed,
                               device=device, n_init=n_init, max_iter=max_iter, seed=seed, progress=progress,
                               task=task)
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


def _offsets(grids) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([h * w for h, w in grids])]).astype(np.int64)


def _grids(store, indices, upsample_to):
    return [tuple(upsample_to) if upsample_to is not None else tuple(store.record(int(i)).grid) for i in indices]


def _split(labels, offsets, grids):
    return [labels[offsets[j] : offsets[j + 1]].reshape(grids[j]) for j in range(len(grids))]


def _matching_summary(entry: dict, class_names: Sequence[str]) -> dict:
    """mIoU mean, population std and per-seed values, per-class IoU (mean over seeds) of one k and matching."""
    mi = np.asarray(entry["miou"])
    return {
        "miou_mean": float(mi.mean()),
        "miou_std": float(mi.std()),
        "miou_per_seed": [float(v) for v in mi],
        "iou_per_class": {name: float(v) for name, v in zip(class_names, np.mean(entry["iou"], 0))},
        "clusters_to_background": float(np.mean(entry["bg"])),
    }


def _seed_summary(entropies, shuffled_entropy: float, inertias, iterations) -> dict:
    """Old spatial entropy (mean, std, shuffled reference), inertia and iterations over the seeds of one k."""
    return {
        "spatial_entropy": float(np.mean(entropies)),
        "spatial_entropy_std": float(np.std(entropies)),
        "spatial_entropy_shuffled": float(shuffled_entropy),
        "inertia_per_seed": [float(v) for v in inertias],
        "kmeans_iterations": [int(v) for v in iterations],
    }


def _preprocessing_settings(cfg: dict, proj) -> dict:
    """The protocol's feature resolution, z-score and PCA fit size, as recorded in the results."""
    return {
        "features": "bilinear-upsampled to the eval size" if cfg["upsample_features"] else "patch resolution",
        "zscore": f"(x - mean) / (std + {cfg['zscore_eps']})" if cfg["zscore_eps"] else "(x - mean) / std",
        "pca_fit_vectors": min(proj.n_vectors, cfg["pca_fit_max"] or proj.n_vectors),
    }


def overcluster_eval(store, masks: MaskSet, ks: Sequence[int], *, protocol: str = "standard",
                     seeds: Sequence[int] | None = None, pca_dim: int = 50, n_init: int | None = None,
                     max_iter: int | None = None, layer: str | None = None, device="cpu",
                     max_points_per_cluster: int | None = None, keep_maps: bool = False,
                     matching: str = "reference", position_bins: int = DEFAULT_BINS,
                     null_draws: int = DEFAULT_DRAWS, fit: str = "stream",
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
    matching : {"reference", "hungarian"}
        ``reference``: Hungarian only when k equals the number of classes, greedy many-to-one for every other k
        (Leopart's ``PredsmIoU``). ``hungarian``: Hungarian for every k up to the number of classes.
    position_bins, null_draws : int
        Blocks per side and rolled draws of the position dependence (of the first seed's clustering).
    fit : {"stream", "sample"}
        Tokens beyond the in-memory cap: exact Lloyd passes streamed over all of them, or a fit on a capped
        sample (see :func:`_kmeans_labels`).

    Returns
    -------
    dict (JSON-ready except ``"maps"``)
        ``settings``, ``pca`` (explained variance), and ``results``: one entry per (k, matching) with
        ``miou_mean``, ``miou_std`` (population std over seeds), ``miou_per_seed``, ``iou_per_class`` (mean over
        seeds), ``clusters_to_background``, ``position_dependence`` (first seed; see
        :func:`~posvit_cli.core.cluster.position_dependence.position_dependence`), the old ``spatial_entropy``
        (mean, std, shuffled reference), ``inertia_per_seed`` and ``seconds``.
    """
    from posvit_cli.core.io.labels import nearest_indices
    from posvit_cli.core.measure.metrics import confusion_matrix

    cfg = protocol_defaults(protocol)
    matchings_for(1, 1, protocol, matching)  # refuses an unknown rule before any work
    _check_fit(fit)
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
    y = _projected_tokens(store, layer, indices, proj, upsample_to, device, prog, n_tokens)
    offsets = _offsets(grids)
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
        methods = matchings_for(k, n_cls, protocol, matching)
        entropies, shuffled, inertias, iters = [], [], [], []
        dependence = None
        t_k = time.perf_counter()
        for si, seed in enumerate(seeds):
            task = f"k-means k={k} seed {seed}"
            labels, inertia, n_it = _kmeans_labels(y, k, seed, n_init, max_iter, device, max_points_per_cluster,
                                                   prog, task, fit)
            inertias.append(inertia)
            iters.append(n_it)
            per_img = _split(labels, offsets, grids)
            entropies.append(spatial_entropy(per_img, k))
            if si == 0:
                shuffled.append(spatial_entropy(per_img, k, shuffle_seed=seed))
                dependence = position_dependence(per_img, bins=position_bins, draws=null_draws, seed=seed)
            pred = np.empty(gt.shape, dtype=np.int64)
            for j, lab in enumerate(per_img):
                rr, cc = samplers[grids[j]]
                pred[j] = lab[rr[:, None], cc[None, :]]
            conf = confusion_matrix(gt_kept, pred[keep], n_cls, num_pred=k)
            for method in methods:
                miou, iou, mapping = matched_iou(conf, method)
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
            results.append({"k": int(k), "matching": method, **_matching_summary(entry, masks.class_names),
                            "position_dependence": dependence, **_seed_summary(entropies, shuffled[0], inertias, iters), "seconds": round(seconds, 3)})
    present = set(int(c) for c in masks.present_classes())
    out = {
        "settings": {
            "protocol": protocol, "matching_rule": matching, "layer": layer, "seeds": list(seeds),
            "n_init": n_init, "max_iter": max_iter,
            "pca_dim": proj.out_dim, "eval_size": [eh, ew], "ignore_index": masks.ignore_index,
            "num_classes": n_cls, "class_names": list(masks.class_names),
            "position_bins": position_bins, "null_draws": null_draws,
            **_preprocessing_settings(cfg, proj), "max_points_per_cluster": max_points_per_cluster,
            "fit_beyond_cap": fit,
            "init": "k-means++ (greedy, sampled)", "std": "population std over seeds",
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
                    max_points_per_cluster: int | None = None, position_bins: int = DEFAULT_BINS,
                    null_draws: int = DEFAULT_DRAWS, fit: str = "stream",
                    progress: ProgressCallback | None = None) -> dict:
    """Dataset-wide k-means of all tokens (z-score → PCA → k-means), without masks.

    ``fit`` chooses how tokens beyond the in-memory cap are clustered (see :func:`overcluster_eval`).

    Returns
    -------
    dict
        ``results``: per k the inertia per seed, the ``position_dependence`` of the first seed's clusters
        (``position_bins`` blocks per side, ``null_draws`` rolls), the old spatial entropy per seed, and ``maps``: ``{"kmeans_k{k}": [labels
        (h, w) per image]}`` from the first seed.
    """
    _check_fit(fit)
    layer = store.check_layer(layer)
    prog = report(progress)
    indices = list(range(len(store)))
    grids = _grids(store, indices, None)
    n_tokens = sum(h * w for h, w in grids)
    _check_k(ks, n_tokens)
    proj = fit_projection(store, layer, indices, pca_dim=pca_dim, device=device, progress=prog)
    y = _projected_tokens(store, layer, indices, proj, None, device, prog, n_tokens)
    offsets = _offsets(grids)
    results, maps = [], {}
    for k in ks:
        ent, shuffled, dependence, inertias, iters = [], None, None, [], []
        t_k = time.perf_counter()
        for si, seed in enumerate(seeds):
            labels, inertia, n_it = _kmeans_labels(y, k, seed, n_init, max_iter, device, max_points_per_cluster,
                                                   prog, f"k-means k={k} seed {seed}", fit)
            per_img = _split(labels, offsets, grids)
            ent.append(spatial_entropy(per_img, k))
            inertias.append(inertia)
            iters.append(n_it)
            if si == 0:
                shuffled = spatial_entropy(per_img, k, shuffle_seed=seed)
                dependence = position_dependence(per_img, bins=position_bins, draws=null_draws, seed=seed)
                maps[f"kmeans_k{k}"] = [lab.astype(np.int32) for lab in per_img]
        results.append({
            "k": int(k), "position_dependence": dependence, "spatial_entropy": float(np.mean(ent)), "spatial_entropy_std": float(np.std(ent)),
            "spatial_entropy_shuffled": float(shuffled), "spatial_entropy_per_seed": [float(v) for v in ent],
            "inertia_per_seed": [float(v) for v in inertias], "kmeans_iterations": iters,
            "seconds": round(time.perf_counter() - t_k, 3),
        })
    return {
        "settings": {"mode": "dataset", "layer": layer, "seeds": list(seeds), "n_init": n_init,
                     "max_iter": max_iter, "pca_dim": proj.out_dim, "max_points_per_cluster": max_points_per_cluster,
                     "fit_beyond_cap": fit,
                     "init": "k-means++ (greedy, sampled)", "position_bins": position_bins, "null_draws": null_draws},
        "n_images": len(indices), "n_tokens": int(n_tokens),
        "pca": {"dims": proj.out_dim, "explained_variance_ratio": proj.explained_variance_ratio},
        "results": results, "maps": maps,
    }


def per_image_kmeans(store, ks: Sequence[int], *, n_init: int = 15, max_iter: int = 300, seed: int = 0,
                     layer: str | None = None, device="cpu", position_bins: int = DEFAULT_BINS,
                     null_draws: int = DEFAULT_DRAWS, fit: str = "stream",
                     progress: ProgressCallback | None = None) -> dict:
    """k-means of each image's tokens on their own (the "What DINO saw" decompositions).

    Each image's tokens are standardised channel by channel over that image (zero-variance channels are left
    centred), then clustered with ``n_init`` k-means++ restarts, keeping the lowest inertia. An image of more
    values than :data:`~posvit_cli.core.cluster.sampled.FIT_MAX_VALUES` is read in row bands and clustered by
    exact Lloyd passes streamed over its bands (``fit="stream"``) or fitted on a seeded sample of its tokens
    (``fit="sample"``; see :func:`_image_kmeans`).

    Returns
    -------
    dict
        ``results``: per k the ``position_dependence`` (per image, token-weighted; ``position_bins`` blocks per
        side, ``null_draws`` rolls), the old spatial entropy and its shuffled reference, the mean inertia; ``maps``: ``{"kmeans_k{k}": [labels (h, w) per image]}``.
    """
    _check_fit(fit)
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
    for i, rec in enumerate(store.records):
        for k, (labels, inert) in _image_kmeans(store, i, layer, ks, n_init, max_iter, seed, device, fit).items():
            maps[f"kmeans_k{k}"].append(labels.reshape(rec.grid).astype(np.int32))
            inertia[k].append(inert)
        prog("per-image k-means", i + 1, n)
    results = []
    for k in ks:
        labs = maps[f"kmeans_k{k}"]
        results.append({
            "k": int(k),
            "position_dependence": position_dependence(labs, per_image=True, bins=position_bins, draws=null_draws,
                                                       seed=seed),
            "spatial_entropy": spatial_entropy(labs, k, per_image=True),
            "spatial_entropy_shuffled": spatial_entropy(labs, k, per_image=True, shuffle_seed=seed),
            "inertia_mean": float(np.mean(inertia[k])),
        })
    return {
        "settings": {"mode": "per-image", "layer": layer, "n_init": n_init, "max_iter": max_iter, "seed": seed,
                     "standardise": "per image, per channel", "init": "k-means++ (greedy)", "fit_beyond_cap": fit,
                     "position_bins": position_bins, "null_draws": null_draws},
        "n_images": n, "seconds": round(time.perf_counter() - t0, 3), "results": results, "maps": maps,
    }


def _image_kmeans(store, index, layer, ks, n_init, max_iter, seed, device, fit="stream") -> dict:
    """``{k: (labels (h·w,), inertia)}`` of one image's standardised tokens.

    An image of more values than :data:`~posvit_cli.core.cluster.sampled.FIT_MAX_VALUES` is standardised from
    streamed moments and then, band by band, clustered by exact streamed Lloyd passes (``fit="stream"``) or
    fitted on a sample of its tokens (seeded by ``seed``) and labelled (``fit="sample"``).
    """
    import torch

    from posvit_cli.core.cluster.kmeans import kmeans

    h, w = (int(v) for v in store.record(index).grid)
    dims = int(store.feature_rows(index, layer, 0, 1).shape[-1])
    sample = fit_sample_size(h * w, dims)
    if sample is None:
        f = store.features(index, layer)
        x = torch.from_numpy(f.reshape(-1, f.shape[-1])).to(device)
        mu = x.mean(0)
        sd = x.std(0, unbiased=False)
        x = (x - mu) / torch.where(sd > 0, sd, torch.ones_like(sd))
        out = {}
        for k in ks:
            res = kmeans(x, k, n_init=n_init, max_iter=max_iter, seed=seed, device=device)
            out[k] = (res.labels, res.inertia)
        return out
    raw = _band_source(store, index, layer, device)
    mu, scale = _streamed_standardisation(raw)
    source = _band_source(store, index, layer, device, mu, scale)
    out = {}
    for k in ks:
        if fit == "stream":
            res = kmeans_stream(source, h * w, dims, k, n_init=n_init, max_iter=max_iter, seed=seed, device=device)
            out[k] = (res.labels, res.inertia)
            continue
        labels, inert, _ = kmeans_streamed(source, h * w, dims, k, sample=sample, sample_seed=10_000 + seed,
                                           device=device, n_init=n_init, max_iter=max_iter, seed=seed)
        out[k] = (labels, inert)
    return out


def _band_source(store, index, layer, device, mu=None, scale=None):
    """Token source (see :mod:`~posvit_cli.core.cluster.sampled`) of one image read in row bands, optionally
    standardised as ``(x − mu) / scale``."""
    import torch

    from posvit_cli.core.cluster.sampled import BAND_TOKENS

    h, w = (int(v) for v in store.record(index).grid)
    rows = max(1, BAND_TOKENS // w)

    def chunks():
        for r0 in range(0, h, rows):
            band = store.feature_rows(index, layer, r0, min(h, r0 + rows))
            x = torch.from_numpy(band.reshape(-1, band.shape[-1])).to(device)
            yield r0 * w, x if mu is None else (x - mu) / scale

    return chunks


def _streamed_standardisation(source):
    """Per-channel mean and standard deviation (1 where it is 0) of a token source, float32 tensors (C,)."""
    import torch

    shift = s1 = s2 = None
    n = 0
    for _, x in source():
        if shift is None:
            # Moments about the first band's mean: no cancellation in E[x²] − E[x]².
            shift = x.mean(0, dtype=torch.float64)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros_like(shift)
        xs = x.double() - shift
        s1 += xs.sum(0)
        s2 += (xs * xs).sum(0)
        n += x.shape[0]
    m1 = s1 / n
    sd = (s2 / n - m1 * m1).clamp(min=0).sqrt()
    mu = (shift + m1).to(torch.float32)
    return mu, torch.where(sd > 0, sd, torch.ones_like(sd)).to(torch.float32)


def write_label_store(path, store, maps: dict, provenance: dict, *, overwrite: bool = False) -> str | None:
    """Write label maps into a maps-only store with the source store's image paths and sizes.

    Parameters
    ----------
    maps : dict of name → list of ndarray (h, w), one per image in store order
    """
    from posvit_cli.core.features.writer import StoreWriter

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


"""The whole semantic probe: check that stores hold the same features, split the images, train a head, score it on
the held-out or validation images and on transformed copies, and build the result document
(``docs/semantic-results.md``)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from posvit_cli.core.device import torch_threads
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.provenance import NETWORK_KEYS, STORAGE_KEYS, identity_differences
from posvit_cli.core.fileio import read_tagged_json, tagged_header
from posvit_cli.core.io.labels import LabelCheck
from posvit_cli.core.measure.semantic.dataset import (
    MaskSource, gather_samples, image_split, scan_masks, score_store, scores_from_confusion,
)
from posvit_cli.core.measure.semantic.heads import AffineHead, fit_ridge_head, train_linear_head
from posvit_cli.core.measure.semantic.settings import SEMANTIC_SCHEMA, SEMANTIC_SCHEMA_VERSION, SemanticSettings
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["check_same_features", "read_semantic_result", "semantic_probe"]


# --------------------------------------------------------------------------------------------------------------
# Store compatibility


def check_same_features(reference, other, what: str, *, same_preprocessing: bool = False) -> None:
    """Refuse a store whose features come from another model, weights or debiasing than ``reference``.

    Parameters
    ----------
    reference, other : FeatureStore
    what : str
        How to name ``other`` in the message (``validation store``).
    same_preprocessing : bool
        Also require the same resize and normalisation (robustness stores of the scored images).

    Raises
    ------
    PosvitError
        Naming the first difference.
    """
    ignore = STORAGE_KEYS + ("tiling", "transform") + (() if same_preprocessing else ("preprocessing",))
    diff = identity_differences(reference.provenance, other.provenance, ignore=ignore)
    if not diff:
        return
    key = diff[0]
    if key in NETWORK_KEYS:
        va, vb = reference.provenance.get(key), other.provenance.get(key)
        show = (lambda v: (str(v)[:12] + "…") if key == "weights_sha256" and v else v)
        raise PosvitError(
            f"{what} '{other.source}' holds features of another model ({key} {show(vb)} vs {show(va)} in "
            f"'{reference.source}'): a head trained on one model's features cannot score another's"
        )
    if key == "debias":
        raise PosvitError(
            f"{what} '{other.source}' was debiased differently from '{reference.source}' "
            "(provenance 'debias' differs): score features made the same way"
        )
    raise PosvitError(
        f"{what} '{other.source}' was preprocessed differently from '{reference.source}' ({', '.join(diff)} differ: "
        f"size {other.size_rule} vs {reference.size_rule}): extract it with the same --size and --intensity"
    )


def _store_summary(store) -> dict:
    return {
        "source": store.source,
        "format": store.format,
        "n_images": len(store),
        "channels": store.channels,
        "grids": {g.name: int(len(g.indices)) for g in store.groups},
        "model": store.model,
        "weights": store.weights,
        "weights_sha256": store.weights_sha256,
        "patch_size": store.patch_size,
        "preprocessing": store.preprocessing,
        "debias": store.debias,
        "transform": store.transform,
    }


def _names_index(store, what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for r in store.records:
        if r.name in index:
            raise PosvitError(f"{what} '{store.source}' holds two images with the stem '{r.name}': masks and "
                              "transformed copies are matched by stem, so stems must be unique")
        index[r.name] = r.index
    return index


# --------------------------------------------------------------------------------------------------------------
# The whole probe


def semantic_probe(
    train_store,
    masks: str,
    settings: SemanticSettings,
    *,
    val_store=None,
    val_masks: str | None = None,
    robustness: Sequence = (),
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
    layer: str | None = None,
    device: str = "cpu",
    threads: int | None = 1,
    keep_head: bool = False,
    progress: ProgressCallback | None = None,
) -> dict:
    """Train a linear head on one store's features and masks; score it on a validation store (and transforms).

    Parameters
    ----------
    train_store : FeatureStore
    masks : str
        Mask folder of the training images (matched by stem).
    settings : SemanticSettings
    val_store : FeatureStore, optional
        Scored images. Without it, ``settings.test_fraction`` of the training store's images are held out and
        scored instead.
    val_masks : str, optional
        Mask folder of the validation images (default: ``masks``).
    robustness : sequence of FeatureStore
        Stores of the scored images extracted with ``posvit extract --transform`` (mapped back to the original
        frame). Each is scored with the same head; its transform is read from its provenance.
    num_classes : int, optional
        Default: the largest label in the masks + 1 (or ``len(class_names)``).
    ignore_index : int or None
    class_names : sequence of str, optional
    layer : str, optional
        Default: the training store's default layer.
    device : str
    threads : int or None
        Torch intra-op threads (None: torch's setting). One by default: the head's products are small, and
        on shared or oversubscribed cores intra-op threads made its training 25× slower here.
    keep_head : bool
        Also return the trained :class:`AffineHead` under ``"head"`` (not JSON; for library use).

    Returns
    -------
    dict
        The result document (schema ``posvit-semantic-probe-result``, ``docs/semantic-results.md``).

    Raises
    ------
    PosvitError
        For missing masks, labels ≥ ``num_classes``, stores of another model, too few images, robustness stores
        lacking scored images or with other grids.
    """
    with torch_threads(threads):
        doc, head = _semantic_probe(train_store, masks, settings.validated(), val_store, val_masks, robustness,
                                    num_classes, ignore_index, class_names, layer, device, report(progress))
    if keep_head:
        doc["head"] = head
    return doc


@dataclasses.dataclass
class _Split:
    """Which images train, stop early and are scored, and where their masks come from."""

    fit: list[int]
    stop: list[int]
    scored: list[int]
    train_source: MaskSource
    score_store: Any
    score_source: MaskSource
    scored_on: str


def _semantic_probe(train_store, masks, settings, val_store, val_masks, robustness, num_classes, ignore_index,
                    class_names, layer, device, prog) -> tuple[dict, AffineHead]:
    t_start = time.perf_counter()
    layer = _check_stores(train_store, val_store, layer)
    class_names, num_classes = _check_classes(class_names, num_classes)
    split = _split_images(train_store, val_store, masks, val_masks, settings)
    # One pass over every mask: label range, token-grid masks, labelled-pixel counts, the off-by-one check.
    check = LabelCheck("mask", num_classes)
    held_out = set(split.scored) if val_store is None else set()
    train_scan = scan_masks(split.train_source, sorted(set(split.fit) | set(split.stop) | held_out),
                            ignore_index=ignore_index, num_classes=num_classes, progress=prog, check=check)
    max_label = train_scan.max_label
    score_scan = train_scan
    if val_store is not None:
        score_scan = scan_masks(split.score_source, split.scored, ignore_index=ignore_index, num_classes=num_classes,
                                progress=prog, task="read validation masks", check=check)
        max_label = max(max_label, score_scan.max_label)
    check.finish()
    if num_classes is None:
        num_classes = max_label + 1
        if num_classes < 2:
            raise PosvitError(f"the masks hold {max(num_classes, 0)} class(es): a semantic probe needs at least 2 "
                              f"(every pixel is label 0 or the ignore index {ignore_index}?)")
    class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    notes: list[str] = []
    head, log = _fit_head(train_store, layer, split, train_scan, settings, num_classes, class_names, ignore_index,
                          device, notes, prog)
    scoring = dict(num_classes=num_classes, ignore_index=ignore_index, resolution=settings.resolution,
                   token_masks=score_scan.tokens, device=device, progress=prog)
    conf = score_store(head, split.score_store, layer, split.score_source, split.scored, **scoring)
    results = scores_from_confusion(conf, class_names)
    rob = _robustness_rows(head, robustness, split, layer, results, class_names, scoring) if robustness else []
    all_resized = sorted(set(split.train_source.resized) | set(split.score_source.resized))
    if all_resized:
        notes.append(f"{len(all_resized)} mask(s) had another size than their image and were resized (nearest)")
    return {
        **tagged_header(SEMANTIC_SCHEMA, SEMANTIC_SCHEMA_VERSION),
        "store": {"train": _store_summary(train_store),
                  "val": _store_summary(val_store) if val_store is not None else None},
        "layer": layer,
        "masks": {
            "train": split.train_source.mask_dir,
            "val": split.score_source.mask_dir,
            "num_classes": int(num_classes),
            "ignore_index": ignore_index,
            "class_names": class_names,
            "resized": all_resized,
        },
        "settings": settings.as_dict(),
        "split": {
            "scored_on": split.scored_on,
            "fit_images": [train_store.record(i).name for i in split.fit],
            "early_stopping_images": [train_store.record(i).name for i in split.stop],
            "scored_images": [split.score_store.record(i).name for i in split.scored],
        },
        "training": log,
        "results": results,
        "robustness": rob,
        "seconds": round(time.perf_counter() - t_start, 3),
        "notes": notes,
    }, head


def _check_stores(train_store, val_store, layer: str | None) -> str:
    """Both stores hold images and feature layers of the same features; returns the layer to read."""
    for st, what in ((train_store, "training store"), (val_store, "validation store")):
        if st is None:
            continue
        if len(st) == 0:
            raise PosvitError(f"{what} '{st.source}' holds no images")
        if not st.layers:
            raise PosvitError(f"{what} '{st.source}' holds no feature layers (a maps-only store): probe a feature store")
    layer = train_store.check_layer(layer)
    if val_store is not None:
        check_same_features(train_store, val_store, "validation store")
        val_store.check_layer(layer)
    return layer


def _check_classes(class_names, num_classes: int | None) -> tuple[list[str] | None, int | None]:
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes is not None and len(class_names) != num_classes:
            raise PosvitError(f"{len(class_names)} class names given for --num-classes {num_classes}")
        num_classes = len(class_names)
    if num_classes is not None and num_classes < 2:
        raise PosvitError(f"--num-classes must be at least 2, got {num_classes}")
    return class_names, num_classes


def _split_images(train_store, val_store, masks, val_masks, settings: SemanticSettings) -> _Split:
    train_source = MaskSource(train_store, masks)
    names = [r.name for r in train_store.records]
    if val_store is None:
        fit_pool, scored = image_split(names, settings.test_fraction, settings.seed, salt=0)
        if not scored:
            raise PosvitError(f"'{train_store.source}' holds 1 image: hold-out scoring needs at least 2 "
                              "(or give a validation store with --val)")
        score_store_, score_source = train_store, train_source
        scored_on = f"held-out {len(scored)} of {len(names)} images of the training store (--test-fraction)"
    else:
        fit_pool = list(range(len(train_store)))
        score_source = MaskSource(val_store, val_masks or masks)
        score_store_ = val_store
        scored = list(range(len(val_store)))
        scored_on = "the validation store"
    fit, stop = list(fit_pool), []
    if settings.head == "linear" and settings.patience > 0:
        fit, stop = image_split([names[i] for i in fit_pool], settings.holdout_fraction, settings.seed, salt=1)
        fit, stop = [fit_pool[i] for i in fit], [fit_pool[i] for i in stop]
        if not stop:
            raise PosvitError(
                f"early stopping needs at least 2 training images ({len(fit_pool)} available): add images or "
                "pass --patience 0"
            )
    return _Split(fit, stop, scored, train_source, score_store_, score_source, scored_on)


def _fit_head(train_store, layer, split: _Split, train_scan, settings, num_classes, class_names, ignore_index,
              device, notes: list[str], prog) -> tuple[AffineHead, dict]:
    """Gather the training (and early-stopping) samples and fit the head; returns it and its training log."""
    X, y, info = gather_samples(train_store, layer, split.train_source, train_scan, split.fit,
                                ignore_index=ignore_index, resolution=settings.resolution,
                                max_samples=settings.max_train_tokens, pixels_per_token=settings.pixels_per_token,
                                seed=settings.seed, progress=prog)
    if len(y) == 0:
        raise PosvitError("no labelled training tokens: every mask pixel of the training images is ignored")
    present = np.bincount(y, minlength=num_classes)
    missing_train = [class_names[c] for c in range(num_classes) if present[c] == 0]
    if missing_train:
        notes.append(f"classes never seen in training: {', '.join(missing_train)}")
    X_stop = y_stop = None
    if split.stop:
        X_stop, y_stop, _ = gather_samples(
            train_store, layer, split.train_source, train_scan, split.stop, ignore_index=ignore_index,
            resolution=settings.resolution, max_samples=max(2, settings.max_train_tokens // 4),
            pixels_per_token=settings.pixels_per_token, seed=settings.seed, salt=4, progress=prog,
            task="gather early-stopping tokens")
    t_fit = time.perf_counter()
    if settings.head == "linear":
        head, log = train_linear_head(X, y, X_stop, y_stop, num_classes, settings, device=device, progress=prog)
    else:
        head = fit_ridge_head(X, y, num_classes, settings.alpha, device=device)
        log = {"epochs_run": 0, "best_epoch": None, "stopped_early": False, "train_loss": [], "stop_loss": []}
    log["seconds"] = round(time.perf_counter() - t_fit, 3)
    log["samples"] = info
    log["sample_kind"] = "tokens" if settings.resolution == "tokens" else "pixels (bilinear features)"
    return head, log


def _robustness_rows(head, robustness, split: _Split, layer, results, class_names, scoring: dict) -> list[dict]:
    """The same head scored on each transformed store of the scored images, with the original masks."""
    base_names = {split.score_store.record(i).name: i for i in split.scored}
    rows = [{"transform": "identity", "store": split.score_store.source, **_brief(results), "delta_miou": 0.0}]
    for tstore in robustness:
        check_same_features(split.score_store, tstore, "transformed store", same_preprocessing=True)
        tstore.check_layer(layer)
        spec = tstore.transform or "identity"
        index = _names_index(tstore, "transformed store")
        lacking = [n for n in base_names if n not in index]
        if lacking:
            shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
            raise PosvitError(f"transformed store '{tstore.source}' lacks {len(lacking)} scored image(s): {shown} "
                              "(extract the same images with --transform)")
        fmap = {i: index[n] for n, i in base_names.items()}
        tconf = score_store(head, tstore, layer, split.score_source, split.scored, feature_index=fmap,
                            task=f"score {spec}", **scoring)
        tres = scores_from_confusion(tconf, class_names)
        delta = None if tres["miou"] is None or results["miou"] is None else tres["miou"] - results["miou"]
        rows.append({"transform": spec, "store": tstore.source, **_brief(tres), "delta_miou": delta,
                     "iou_per_class": tres["iou_per_class"]})
    return rows


def _brief(res: dict) -> dict[str, Any]:
    return {"miou": res["miou"], "pixel_accuracy": res["pixel_accuracy"], "pixels_scored": res["pixels_scored"]}


def read_semantic_result(path) -> dict:
    """Read a result written by ``posvit probe semantic STORE --masks DIR -o FILE``.

    Raises
    ------
    PosvitError
        If the file is missing, is not JSON or is not a semantic probe result of a readable version.
    """
    return read_tagged_json(path, SEMANTIC_SCHEMA, SEMANTIC_SCHEMA_VERSION, "semantic probe result")

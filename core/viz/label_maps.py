"""Label-map pictures: k-means clusters of a store, and segmentations against their ground truth."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import Footprint, fit_size, load_display_image, token_footprint
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import Legend, Panel, PanelGrid
from posvit_cli.core.viz.maps import blend, label_palette, labels_rgb, position_eta_squared, upsample
from posvit_cli.core.viz.pictures import (
    FigureOptions,
    SourceImages,
    require_images,
    row_label,
    select_images,
    slug,
    store_intensity,
    store_label,
    write_grid,
)
from posvit_cli.core.viz.scores import fmt

__all__ = [
    "clusters_figure",
    "segmentation_figure",
]


#: Most label colours listed in a legend; beyond it the legend says how many there are.
LEGEND_MAX = 24


def _legend(values: Sequence[int], palette: np.ndarray, names: Sequence[str] | None, what: str) -> Legend:
    entries = []
    for k, v in enumerate(values[:LEGEND_MAX]):
        name = names[v] if names is not None and 0 <= v < len(names) else f"{what} {v}"
        entries.append((palette[k], name))
    plural = {"class": "classes"}.get(what, what + "s") if len(values) != 1 else what
    title = f"{len(values)} {plural}" + (f" (first {LEGEND_MAX} listed)" if len(values) > LEGEND_MAX else "")
    return Legend(entries, title)


def clusters_figure(
    store,
    outdir: str | os.PathLike,
    *,
    map_names: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
    alpha: float = 0.5,
    options: FigureOptions | None = None,
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """Per-token label maps (clusters) over the images: one row per image, one column per map.

    Every panel carries the label map's positional share η²(x), η²(y) (:func:`position_eta_squared`): near 1,
    the clusters follow the image's columns or rows, not its content.

    Parameters
    ----------
    store : FeatureStore
        A store with maps (``posvit cluster`` writes maps-only stores with the same images as the features).
    map_names : sequence of str, optional
        Maps to draw (default: all).
    alpha : float
        Opacity of the label colours over the image.

    Raises
    ------
    PosvitError
        For a store without maps or an unknown map name.
    """
    opts = options or FigureOptions()
    run = report(progress)
    require_images(store)
    available = store.map_names()
    if not available:
        raise PosvitError(f"'{store.source}' holds no label maps (make some with `posvit cluster`)")
    names = list(map_names) if map_names else available
    for n in names:
        if n not in available:
            raise PosvitError(f"map '{n}' is not in '{store.source}' (its maps: {', '.join(available)})")
    if not (0.0 <= alpha <= 1.0):
        raise PosvitError(f"--alpha must be in [0, 1], got {alpha}")
    indices = list(indices) if indices is not None else select_images(store)
    outdir = Path(outdir)
    label = opts.label or store_label(store)
    prep = store.preprocessing
    sources = SourceImages(store.source, opts.image_dir, store_intensity(store))
    maps = {(i, n): np.asarray(store.token_map(i, n)) for i in indices for n in names}
    for (i, n), m in maps.items():
        if not np.issubdtype(m.dtype, np.integer) and not np.all(np.mod(m, 1) == 0):
            raise PosvitError(f"map '{n}' holds non-integer values: not a label map")
    values = sorted({int(v) for m in maps.values() for v in np.unique(m) if v >= 0})
    palette = label_palette(max(len(values), 1))
    stem = "_".join(["clusters", slug(label)] + ([slug(names[0])] if len(names) == 1 else []))
    rows, labels, numbers = [], [], []
    eta_sum = {n: [[], []] for n in names}
    for j, i in enumerate(indices):
        rec = store.record(i)
        fp = token_footprint(rec, prep)
        hw = fit_size(fp.height, fp.width, opts.panel_size)
        img = sources.image(rec.path, rec.name, fp, hw)
        row = [Panel(img, size=hw, placeholder="source image not found")]
        info = {"name": rec.name, "index": rec.index, "maps": {}}
        for n in names:
            m = maps[(i, n)].astype(np.int64)
            colours = labels_rgb(upsample(m, hw, "nearest"), values, palette)
            rgb = colours if img is None else blend(img, colours, alpha)
            ex, ey = position_eta_squared(m)
            eta_sum[n][0].append(ex)
            eta_sum[n][1].append(ey)
            k = int(np.unique(m[m >= 0]).size)
            row.append(Panel(rgb, title=f"{k} labels · η² x {fmt(ex)}, y {fmt(ey)}"))
            info["maps"][n] = {"labels": k, "eta2_x": ex, "eta2_y": ey}
        rows.append(row)
        labels.append(row_label(rec, None, fp))
        numbers.append(info)
        run("drawing clusters", j + 1, len(indices))
    sources.warn()
    means = {n: (float(np.nanmean(v[0])) if np.isfinite(v[0]).any() else float("nan"),
                 float(np.nanmean(v[1])) if np.isfinite(v[1]).any() else float("nan")) for n, v in eta_sum.items()}
    headers = ["image"] + [f"{n}\nmean η² x {fmt(means[n][0])}, y {fmt(means[n][1])}" for n in names]
    title = (f"Label maps over the images · {label}\nη²: share of a token's column (x) and row (y) variance explained "
             "by its label; near 1 = labels follow position, not content")
    footer = f"Label colours at opacity {alpha:g}, nearest upsampling (one colour per token)."
    path = outdir / f"{stem}.png"
    grid = PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, footer=footer,
                     legend=_legend(values, palette, None, "label"))
    size = write_grid(grid, path, title.split("\n")[0])
    caption = f"{len(indices)} images × {len(names)} map(s): " + "; ".join(
        f"{n}: mean η² x {fmt(means[n][0])}, y {fmt(means[n][1])}" for n in names)
    return [FigureEntry(path.relative_to(outdir).as_posix(), "clusters", title.split("\n")[0], caption, [],
                        {"size": list(size), "mean_eta2": {n: {"x": v[0], "y": v[1]} for n, v in means.items()},
                         "images": numbers}, opts.command)]


def _stat_labels(lab: np.ndarray, side: int = 256) -> np.ndarray:
    """A label image reduced (nearest) to at most ``side`` pixels a side, for cheap statistics."""
    H, W = lab.shape
    if max(H, W) <= side:
        return lab
    return upsample(lab, fit_size(H, W, side), "nearest")


#: Label-image rows counted or scored at once: statistics of a 10,000² px image cost a band, not the image.
BAND_ROWS = 512


def _value_counts(lab: np.ndarray) -> dict[int, int]:
    """Pixels of each value of a label image, counted in row bands."""
    counts: dict[int, int] = {}
    for r in range(0, lab.shape[0], BAND_ROWS):
        vals, n = np.unique(lab[r : r + BAND_ROWS], return_counts=True)
        for v, c in zip(vals.tolist(), n.tolist()):
            counts[v] = counts.get(v, 0) + c
    return counts


def _read_segmentations(images, predictions, truth, class_names, ignore_index) -> list:
    """``(image path, stem, prediction file, truth file or None, prediction counts, truth counts)`` per image.

    Every label image is read once here, off-by-one checked and reduced to its value counts (class indices
    0..C-1, -1 = unlabelled, so the legend's names index them directly); the figure reads each again when it
    draws it, so only one image's labels are in memory at a time.
    """
    from posvit_cli.core.io.labels import LabelCheck, read_label_image, stem as stem_of

    loaded = []
    n_named = len(class_names) if class_names else None
    pred_check = LabelCheck("prediction", n_named, fix="add 1 (class k is prediction value k+1, 0 = unlabelled)")
    truth_check = LabelCheck("mask", n_named)
    for p in images:
        s = stem_of(p)
        pr = read_label_image(predictions[s], "prediction")
        pred_check.add(pr)
        pred_counts = _value_counts(pr.classes)
        del pr
        truth_file, truth_counts = None, None
        if truth and s in truth:
            truth_file = truth[s]
            g = read_label_image(truth_file, "mask", ignore_index=ignore_index)
            truth_check.add(g)
            truth_counts = _value_counts(g.classes)
        loaded.append((Path(p), s, predictions[s], truth_file, pred_counts, truth_counts))
    pred_check.finish()
    truth_check.finish()
    return loaded


def _confusion_in_bands(name: str, pred: np.ndarray, gt: np.ndarray, n_cls: int) -> np.ndarray:
    """``(n_cls, n_cls)`` confusion counts of a prediction against its truth (-1 = unlabelled), by row bands."""
    from posvit_cli.core.io.labels import resize_labels_nearest
    from posvit_cli.core.measure.metrics import confusion_matrix

    pr = pred if pred.shape == gt.shape else resize_labels_nearest(pred, gt.shape)
    conf = np.zeros((n_cls, n_cls), np.int64)
    for r in range(0, gt.shape[0], BAND_ROWS):
        g, p = gt[r : r + BAND_ROWS], pr[r : r + BAND_ROWS]
        keep = g >= 0
        pk = p[keep]
        if (pk < 0).any():
            raise PosvitError(f"prediction of '{name}' leaves pixels unlabelled (value 0) where the ground truth "
                              "has a class: predictions hold class k as value k+1 (docs/labels.md)")
        bad = pk >= n_cls
        if bad.any():
            raise PosvitError(f"prediction of '{name}' holds label {int(pk[bad][0])}, not a class of the "
                              f"ground truth or the other predictions")
        conf += confusion_matrix(g[keep], pk, n_cls)
    return conf


def segmentation_figure(
    images: Sequence[str | os.PathLike],
    predictions: dict[str, Path],
    outdir: str | os.PathLike,
    *,
    truth: dict[str, Path] | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int | None = 255,
    alpha: float = 0.5,
    intensity: str = "auto",
    label: str = "segmentation",
    options: FigureOptions | None = None,
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """Predicted label images over their images (and the ground truth beside them when given).

    Parameters
    ----------
    images : sequence of path-like
        Source images, in drawing order.
    predictions : dict of str to Path
        Image stem → predicted label image as ``posvit segment apply`` writes it: value ``k + 1`` is class ``k``,
        0 is unlabelled (``docs/labels.md``).
    truth : dict of str to Path, optional
        Image stem → ground-truth mask (class indices ``0 .. C-1``); enables per-image and overall mIoU (classes
        absent from both an image's truth and prediction are left out of its mean).
    class_names : sequence of str, optional
        Legend names of classes 0, 1, ... (prediction values 1, 2, ...).
    ignore_index : int, optional
        Ground-truth value that never counts (and is drawn uncoloured); 255 by default.

    Returns
    -------
    list of FigureEntry
    """
    from posvit_cli.core.io.images import image_size
    from posvit_cli.core.io.labels import read_label_image, resize_labels_nearest
    from posvit_cli.core.measure.metrics import accumulate_confusion, miou

    opts = options or FigureOptions()
    run = report(progress)
    if not images:
        raise PosvitError("no images to draw")
    if not (0.0 <= alpha <= 1.0):
        raise PosvitError(f"--alpha must be in [0, 1], got {alpha}")
    outdir = Path(outdir)
    loaded = _read_segmentations(images, predictions, truth, class_names, ignore_index)
    values = sorted({v for *_, pc, tc in loaded for counts in (pc, tc) if counts for v in counts if v >= 0})
    palette = label_palette(max(len(values), 1))
    n_cls = (max(values) + 1) if values else 1
    total = None
    rows, labels, numbers = [], [], []
    for j, (p, s, pred_file, truth_file, pred_counts, _) in enumerate(loaded):
        pred = read_label_image(pred_file, "prediction").classes
        gt = None if truth_file is None else read_label_image(truth_file, "mask", ignore_index=ignore_index).classes
        try:
            H, W = image_size(p)
            fp = Footprint(0.0, 0.0, float(H), float(W), (H, W), (H, W))
            hw = fit_size(H, W, opts.panel_size)
            img = load_display_image(p, fp, hw, intensity)
        except PosvitError as exc:
            warnings.warn(f"{exc}; drawing the prediction of '{s}' alone", PosvitWarning, stacklevel=2)
            H, W = pred.shape
            hw = fit_size(H, W, opts.panel_size)
            img = None
        if pred.shape != (H, W):
            warnings.warn(f"prediction of '{s}' is {pred.shape[1]}×{pred.shape[0]} px, the image {W}×{H} px: "
                          "stretched over the image", PosvitWarning, stacklevel=2)
        info: dict = {"name": s}
        colours = labels_rgb(resize_labels_nearest(pred, hw), values, palette)
        ex, ey = position_eta_squared(_stat_labels(pred))
        info.update({"eta2_x": ex, "eta2_y": ey,
                     "class_fractions": {v: n / pred.size for v, n in sorted(pred_counts.items())}})
        t = f"η² x {fmt(ex)}, y {fmt(ey)}"
        row = [Panel(img, size=hw, placeholder="image unreadable")]
        if gt is not None:
            conf = _confusion_in_bands(s, pred, gt, n_cls)
            total = accumulate_confusion(total, conf)
            score = miou(conf, absent="skip")
            info["miou"] = score
            t = f"mIoU {fmt(score, 3)} · η² x {fmt(ex)}, y {fmt(ey)}"
        row.append(Panel(colours if img is None else blend(img, colours, alpha), title=t))
        if gt is not None:
            gcol = labels_rgb(resize_labels_nearest(gt, hw), values, palette)
            row.append(Panel(gcol if img is None else blend(img, gcol, alpha), title="ground truth"))
        rows.append(row)
        labels.append(f"{s}\n{W}×{H} px" + (f"\nmIoU {fmt(info['miou'], 3)}" if "miou" in info else ""))
        numbers.append(info)
        run("drawing segmentations", j + 1, len(loaded))
    overall = miou(total, absent="skip") if total is not None else None
    n_truth = sum(1 for *_, tc in loaded if tc is not None)
    title = f"Segmentation · {label}\n" + (
        f"mIoU {fmt(overall, 3)} over {n_truth} image(s) with ground truth (one confusion matrix; classes in "
        "neither truth nor prediction left out)" if overall is not None
        else "no ground truth given (--truth): η² = share of column (x) / row (y) variance explained by the labels")
    headers = ["image", "prediction"] + (["ground truth"] if any(tc is not None for *_, tc in loaded) else [])
    path = outdir / f"segmentation_{slug(label)}.png"
    legend = _legend(values, palette, class_names, "class")
    grid = PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, legend=legend,
                     footer=f"Class colours at opacity {alpha:g}."
                     + (f" Ground-truth value {ignore_index} ignored." if ignore_index is not None else ""))
    size = write_grid(grid, path, title.split("\n")[0])
    caption = f"{len(loaded)} images." + (f" mIoU {fmt(overall, 3)}." if overall is not None else "")
    return [FigureEntry(path.relative_to(outdir).as_posix(), "segmentation", title.split("\n")[0], caption, [],
                        {"size": list(size), "miou": overall, "images": numbers,
                         "legend": [{"class": int(v), "name": name, "colour": [int(c) for c in colour]}
                                    for v, (colour, name) in zip(values, legend.entries)]},
                        opts.command)]

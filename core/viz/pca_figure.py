"""PCA pictures of a store's token grids: three principal components as RGB, raw and standardised."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import fit_size, token_footprint
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import Panel, PanelGrid, save_png_array
from posvit_cli.core.viz.maps import fit_pca, foreground_mask, to_uint8, upsample
from posvit_cli.core.viz.pictures import (
    FigureOptions,
    LazyTokens,
    SourceImages,
    raw_size,
    require_features,
    row_label,
    score_title,
    select_images,
    slug,
    store_intensity,
    store_label,
    write_grid,
)
from posvit_cli.core.viz.scores import PositionScore

__all__ = [
    "pca_figure",
]


_VARIANT_NAMES = {"raw": "raw", "std": "standardised"}


def pca_figure(
    store,
    outdir: str | os.PathLike,
    *,
    layer: str | None = None,
    indices: Sequence[int] | None = None,
    variants: Sequence[str] = ("raw", "std"),
    shared: bool = False,
    foreground: bool = False,
    fg_threshold: float = 0.5,
    clip_percentile: float = 0.0,
    score: PositionScore | None = None,
    options: FigureOptions | None = None,
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """PCA of patch features → RGB, beside each image: one row per image, one column per variant.

    Parameters
    ----------
    store : FeatureStore
    outdir : path-like
    layer : str, optional
        Default: the store's default layer.
    indices : sequence of int, optional
        Images to draw (default: the first 8).
    variants : sequence of {"raw", "std"}
        ``raw``: PCA of the features as stored; ``std``: each channel z-scored per image first.
    shared : bool
        One PCA fitted on the tokens of all drawn images (colours comparable across images) instead of one per
        image.
    foreground : bool
        Keep only the tokens on the foreground side of the first principal component (black elsewhere); the PCA
        is then fitted on the foreground tokens (:func:`~posvit_cli.core.viz.maps.foreground_mask`).
    fg_threshold : float
        Cut of the min-max scaled first component.
    clip_percentile : float
        Colour range from percentiles instead of min-max (0 = min-max, as published).
    score : PositionScore, optional
        Shown in the title and row labels.

    Returns
    -------
    list of FigureEntry
    """
    opts = options or FigureOptions()
    run = report(progress)
    layer = require_features(store, layer)
    indices = list(indices) if indices is not None else select_images(store)
    for v in variants:
        if v not in _VARIANT_NAMES:
            raise PosvitError(f"unknown PCA variant '{v}': use raw or std")
    outdir = Path(outdir)
    label = opts.label or store_label(store)
    prep = store.preprocessing
    sources = SourceImages(store.source, opts.image_dir, store_intensity(store))
    recs = [store.record(i) for i in indices]
    tokens = LazyTokens(store, indices, layer)
    masks: dict[str, list[np.ndarray | None]] = {v: [None] * len(indices) for v in variants}
    if foreground:
        for j in range(len(indices)):
            t = tokens[j]
            for v in variants:
                masks[v][j] = foreground_mask(t, standardise=v == "std", threshold=fg_threshold)
    bases: dict[str, object] = {}
    if shared:
        for v in variants:
            bases[v] = fit_pca(tokens, 3, standardise=v == "std", masks=masks[v], clip_percentile=clip_percentile)
    base = "_".join(["pca", slug(label)] + (["shared"] if shared else []) + (["fg"] if foreground else [])
                    + ([slug(layer)] if layer != "final" else []))
    stem = base + (f"_{variants[0]}" if len(variants) == 1 else "")
    rows, labels, numbers, extra = [], [], [], []
    for j, rec in enumerate(recs):
        t = tokens[j]
        fp = token_footprint(rec, prep)
        hw = fit_size(fp.height, fp.width, opts.panel_size)
        img = sources.image(rec.path, rec.name, fp, hw)
        row = [Panel(img, size=hw, placeholder="source image not found")]
        info: dict = {"name": rec.name, "index": rec.index, "explained": {}}
        if score is not None:
            info["xy_r2"] = score.per_image.get(rec.index)
        for v in variants:
            m = masks[v][j]
            if shared:
                basis = bases[v]
                rgb = basis.to_rgb(t, m)
            else:
                basis = fit_pca([t], 3, standardise=v == "std", masks=[m], clip_percentile=clip_percentile)
                rgb = basis.to_rgb(t, m)
            ex = [float(x) for x in basis.explained]
            info["explained"][_VARIANT_NAMES[v]] = ex
            title = "" if shared else "var " + " · ".join(f"{100 * x:.0f}" for x in ex) + " %"
            if m is not None:
                frac = float(np.mean(m))
                info.setdefault("foreground_fraction", {})[_VARIANT_NAMES[v]] = frac
                title = (title + " · " if title else "") + f"fg {100 * frac:.0f} %"
            row.append(Panel(to_uint8(upsample(rgb, hw, opts.upsample)), title=title))
            if opts.raw:
                raw_path = outdir / "raw" / f"{base}_{v}_{slug(rec.name)}.png"
                save_png_array(to_uint8(upsample(rgb, raw_size(fp, opts.raw_max_side), opts.upsample)), raw_path)
                extra.append(raw_path.relative_to(outdir).as_posix())
        rows.append(row)
        labels.append(row_label(rec, score, fp))
        numbers.append(info)
        run("drawing PCA", j + 1, len(recs))
    sources.warn()
    headers = ["image"]
    for v in variants:
        h = f"PCA · {_VARIANT_NAMES[v]}"
        if shared:
            h += "\nshared: var " + " · ".join(f"{100 * x:.0f}" for x in bases[v].explained) + " %"
        headers.append(h)
    title = (f"PCA → RGB of {layer} patch features · {label}\n{score_title(score)}")
    footer = ("PC1 → red, PC2 → green, PC3 → blue, each scaled to [0, 1] "
              + ("over all images (one shared PCA)" if shared else "per image")
              + (f" ({clip_percentile:g}–{100 - clip_percentile:g} percentiles)" if clip_percentile else " (min–max)")
              + ". raw: features as stored; standardised: every channel z-scored per image first (it can hide or "
              "reveal a positional ramp)."
              + (f" Foreground: first component cut at {fg_threshold:g}, border side = background." if foreground else "")
              + f" Token maps enlarged by {opts.upsample} upsampling.")
    path = outdir / f"{stem}.png"
    size = write_grid(PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, footer=footer), path,
                  title.split("\n")[0])
    caption = f"{len(recs)} images, layer {layer}. {score_title(score)}."
    return [FigureEntry(path.relative_to(outdir).as_posix(), "pca", title.split("\n")[0], caption, extra,
                        {"size": list(size), "score": score.as_dict() if score else None, "images": numbers},
                        opts.command)]

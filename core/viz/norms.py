"""Token-norm maps: where a ViT without registers parks its high-norm artefact tokens, with their share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.measure.norms import DEFAULT_K, image_norms
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import fit_size, token_footprint
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import Panel, PanelGrid
from posvit_cli.core.viz.maps import colormap_rgb, upsample
from posvit_cli.core.viz.pictures import (
    FigureOptions,
    SourceImages,
    marker_xy,
    require_features,
    row_label,
    select_images,
    slug,
    store_intensity,
    store_label,
    write_grid,
)

__all__ = ["MAX_MARKERS", "norms_figure"]

#: Outliers circled per panel (the highest norms): beyond a few dozen the circles hide the map.
MAX_MARKERS = 24


def _share_text(count: int, total: int) -> str:
    return f"{count}/{total} outlier tokens ({100 * count / max(1, total):.2f} %)"


def norms_figure(
    store,
    outdir: str | os.PathLike,
    *,
    layer: str | None = None,
    indices: Sequence[int] | None = None,
    k: float = DEFAULT_K,
    cmap: str = "viridis",
    options: FigureOptions | None = None,
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """Token L2-norm maps beside each image, outliers circled: one row per image.

    Each map is coloured from its 1st percentile to its largest norm, so artefact tokens stand out as bright
    dots over a dark bulk; the outliers (:func:`~posvit_cli.core.measure.norms.outlier_mask` with ``k``) are
    circled, the highest :data:`MAX_MARKERS` of them. Panel titles carry each image's outlier share, the figure
    title the mean share over the drawn images.

    Returns
    -------
    list of FigureEntry
        One entry; its numbers hold every drawn image's summary
        (:meth:`~posvit_cli.core.measure.norms.TokenNorms.summary`) and the mean share.
    """
    opts = options or FigureOptions()
    run = report(progress)
    layer = require_features(store, layer)
    indices = list(indices) if indices is not None else select_images(store)
    outdir = Path(outdir)
    label = opts.label or store_label(store)
    prep = store.preprocessing
    sources = SourceImages(store.source, opts.image_dir, store_intensity(store))
    rows, labels, numbers = [], [], []
    for j, i in enumerate(indices):
        rec = store.record(i)
        tn = image_norms(store, i, layer, k=k)
        fp = token_footprint(rec, prep)
        hw = fit_size(fp.height, fp.width, opts.panel_size)
        lo, hi = float(np.percentile(tn.norms, 1)), float(tn.norms.max())
        colours = colormap_rgb(upsample(tn.norms, hw, opts.upsample), cmap, lo, hi if hi > lo else lo + 1e-6)
        marks = [marker_xy(fp, (r, c), hw) for r, c in tn.positions(MAX_MARKERS)]
        title = (f"{_share_text(tn.count, tn.norms.size)}\nmedian {np.median(tn.norms):.3g} · max {hi:.3g}"
                 f" · cut {tn.threshold:.3g}")
        img = sources.image(rec.path, rec.name, fp, hw)
        rows.append([Panel(img, size=hw, placeholder="source image not found"),
                     Panel(colours, title=title, markers=marks)])
        labels.append(row_label(rec, None, fp))
        numbers.append(tn.summary())
        run("drawing token norms", j + 1, len(indices))
    sources.warn()
    shares = [n["share"] for n in numbers]
    mean_share = float(np.mean(shares)) if shares else 0.0
    with_out = sum(1 for n in numbers if n["n_outliers"])
    summary = (f"mean outlier share {100 * mean_share:.2f} %, {with_out} of {len(numbers)} images with outliers "
               f"(log norm > median + {k:g} robust SD)")
    title = f"Token L2 norms ({layer}) · {label}\n{summary}"
    footer = (f"Each map: token L2 norms, {cmap} from the image's 1st percentile to its largest norm. Circled: "
              f"outlier tokens (up to {MAX_MARKERS}, highest first), whose log norm lies more than {k:g} robust "
              "standard deviations (1.4826 MAD) above the image's median. A few bright dots in background regions "
              "are the high-norm artefacts of ViTs trained without registers (Darcet et al., ICLR 2024).")
    stem = "_".join(["norms", slug(label)] + ([slug(layer)] if layer != "final" else []))
    path = outdir / f"{stem}.png"
    grid = PanelGrid(rows, title=title, row_labels=labels, col_headers=["image", "token norms"], footer=footer)
    size = write_grid(grid, path, title.split("\n")[0])
    caption = f"{len(numbers)} images, layer {layer}. {summary}."
    return [FigureEntry(path.relative_to(outdir).as_posix(), "norms", title.split("\n")[0], caption, [],
                        {"size": list(size), "k": float(k), "mean_share": mean_share,
                         "images_with_outliers": with_out, "images": numbers}, opts.command)]

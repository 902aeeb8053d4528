"""Cosine-similarity maps of query tokens, over the source image, with how fast similarity falls off with distance."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import Footprint, fit_size, query_token, token_footprint
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import ColourBar, Panel, PanelGrid, save_png_array
from posvit_cli.core.viz.maps import (
    blend,
    colormap_rgb,
    cosine_similarity_map,
    similarity_distance_correlation,
    upsample,
)
from posvit_cli.core.viz.pictures import (
    FigureOptions,
    SourceImages,
    StoreGrid,
    marker_xy,
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
from posvit_cli.core.viz.scores import PositionScore, fmt

__all__ = [
    "point_text",
    "query_tokens",
    "similarity_figure",
    "similarity_panel",
]


def similarity_panel(
    tokens: np.ndarray,
    footprint: Footprint,
    token: tuple[int, int],
    out_hw: tuple[int, int],
    image: np.ndarray | None = None,
    *,
    vmin: float = 0.5,
    vmax: float = 1.0,
    alpha: float = 0.7,
    cmap: str = "coolwarm",
    method: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray, float]:
    """A cosine-similarity map of one query token, coloured and laid over the image.

    Parameters
    ----------
    tokens : ndarray, shape (h, w, C)
    footprint : Footprint
        Only its grid is used here; the output covers the footprint.
    token : (int, int)
        Query ``(row, col)``.
    out_hw : (int, int)
        Output size in pixels (the footprint's aspect ratio).
    image : ndarray of uint8, shape (out_h, out_w, 3), optional
        The image under the overlay; without it the colours are drawn opaque.
    vmin, vmax : float
        Fixed colour scale (0.5..1, as the papers draw it); similarities below ``vmin`` take its colour.
    alpha : float
        Opacity of the colours over the image (0.7 in the papers).

    Returns
    -------
    rgb : ndarray of uint8, shape (out_h, out_w, 3)
    sim : ndarray of float64, shape (h, w)
        The token-level similarity map; ``sim[token] == 1``.
    corr : float
        :func:`~posvit_cli.core.viz.maps.similarity_distance_correlation`.
    """
    sim = cosine_similarity_map(tokens, *token)
    colours = colormap_rgb(upsample(sim, out_hw, method), cmap, vmin, vmax)
    rgb = colours if image is None else blend(image, colours, alpha)
    return rgb, sim, similarity_distance_correlation(sim, *token)


def query_tokens(store, indices, points, units, prep) -> dict[int, list[tuple[int, int]]]:
    """Query tokens ``(row, col)`` of every point on every image, ``{index: [token, ...]}``.

    Raises
    ------
    PosvitError
        For the first point outside an image.
    """
    out = {}
    for i in indices:
        rec = store.record(i)
        fp = token_footprint(rec, prep)
        out[i] = [query_token(p, units, fp, rec.name) for p in points]
    return out


def point_text(point, units) -> str:
    """A query point ``(x, y)`` as written in headers, with its unit unless pixels."""
    x, y = point
    return f"({x:g}, {y:g}){'' if units == 'px' else ' ' + units}"


def similarity_figure(
    store,
    outdir: str | os.PathLike,
    points: Sequence[tuple[float, float]],
    *,
    units: str = "px",
    layer: str | None = None,
    indices: Sequence[int] | None = None,
    vmin: float = 0.5,
    vmax: float = 1.0,
    alpha: float = 0.7,
    cmap: str = "coolwarm",
    score: PositionScore | None = None,
    options: FigureOptions | None = None,
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """Cosine similarity of query patches to every patch, over each image: one row per image, one column per point.

    Parameters
    ----------
    points : sequence of (float, float)
        Query points ``(x, y)`` in ``units``.
    units : {"px", "token", "frac"}
        Pixels of the original image, token column/row, or fractions of the width/height.

    Raises
    ------
    PosvitError
        If a point lies outside an image (checked for every image before anything is drawn).
    """
    opts = options or FigureOptions(upsample="bilinear")
    run = report(progress)
    layer = require_features(store, layer)
    if not points:
        raise PosvitError("no query point: pass --at X,Y (several times for several points)")
    if not (0.0 <= alpha <= 1.0):
        raise PosvitError(f"--alpha must be in [0, 1], got {alpha}")
    if not vmax > vmin:
        raise PosvitError(f"--vmax must exceed --vmin, got {vmin}..{vmax}")
    indices = list(indices) if indices is not None else select_images(store)
    prep = store.preprocessing
    queries = query_tokens(store, indices, points, units, prep)
    outdir = Path(outdir)
    label = opts.label or store_label(store)
    stem = "_".join(["similarity", slug(label)] + ([slug(layer)] if layer != "final" else []))
    sources = SourceImages(store.source, opts.image_dir, store_intensity(store))
    rows, labels, numbers, extra = [], [], [], []
    for j, i in enumerate(indices):
        rec = store.record(i)
        fp = token_footprint(rec, prep)
        hw = fit_size(fp.height, fp.width, opts.panel_size)
        img = sources.image(rec.path, rec.name, fp, hw)
        t = StoreGrid(store, i, layer)  # read in bands of token rows: a huge image is never held whole
        marks = [marker_xy(fp, q, hw) for q in queries[i]]
        row = [Panel(img, size=hw, placeholder="source image not found", markers=marks)]
        info = {"name": rec.name, "index": rec.index, "queries": []}
        for k, (p, q) in enumerate(zip(points, queries[i])):
            rgb, sim, corr = similarity_panel(t, fp, q, hw, img, vmin=vmin, vmax=vmax, alpha=alpha, cmap=cmap,
                                              method=opts.upsample)
            row.append(Panel(rgb, title=f"token x {q[1]}, y {q[0]} · r(sim, −dist) {fmt(corr)}", markers=[marks[k]]))
            info["queries"].append({"point": list(p), "units": units, "token": {"x": q[1], "y": q[0]},
                                    "mean_similarity": float(sim.mean()), "similarity_distance_corr": corr})
            if opts.raw:
                raw_path = outdir / "raw" / f"{stem}_q{k}_{slug(rec.name)}.png"
                save_png_array(colormap_rgb(upsample(sim, raw_size(fp, opts.raw_max_side), opts.upsample), cmap,
                                            vmin, vmax), raw_path)
                extra.append(raw_path.relative_to(outdir).as_posix())
        rows.append(row)
        labels.append(row_label(rec, score, fp))
        numbers.append(info)
        run("drawing similarity", j + 1, len(indices))
    sources.warn()
    headers = ["image (queries ○)"] + [f"query {point_text(p, units)}" for p in points]
    title = f"Cosine similarity to query patches ({layer}) · {label}\n{score_title(score)}"
    footer = (f"sim = cosine of raw features; the query patch is 1. Colours {cmap} on a fixed scale "
              f"{vmin:g}..{vmax:g} at opacity {alpha:g}; lower values take the {vmin:g} colour. Maps enlarged by "
              f"{opts.upsample} upsampling. r(sim, −dist): correlation of similarity with closeness to the query "
              "(near 1 when similarity just falls off with distance).")
    path = outdir / f"{stem}.png"
    grid = PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, footer=footer,
                     colourbar=ColourBar(cmap, vmin, vmax, "cosine similarity to the query patch"))
    size = write_grid(grid, path, title.split("\n")[0])
    caption = (f"{len(indices)} images × {len(points)} query point(s) in {units}, layer {layer}. "
               f"{score_title(score)}.")
    return [FigureEntry(path.relative_to(outdir).as_posix(), "similarity", title.split("\n")[0], caption, extra,
                        {"size": list(size), "score": score.as_dict() if score else None, "images": numbers},
                        opts.command)]

"""One figure comparing models on the same images: PCA and similarity maps per model, each with its score."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import find_source_image, fit_size, load_display_image, query_token, token_footprint
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import ColourBar, Panel, PanelGrid
from posvit_cli.core.viz.maps import fit_pca, to_uint8, upsample
from posvit_cli.core.viz.pictures import (
    FigureOptions,
    SourceImages,
    StoreGrid,
    marker_xy,
    require_features,
    require_images,
    slug,
    store_intensity,
    store_label,
    write_grid,
)
from posvit_cli.core.viz.scores import PositionScore, fmt
from posvit_cli.core.viz.similarity import point_text, similarity_panel

__all__ = [
    "compare_figure",
    "shared_images",
]


def shared_images(stores: Sequence, images: Sequence[str] | None = None, max_images: int = 4) -> list[str]:
    """File names of the images every store holds, in the first store's order: the named ones or the first
    ``max_images``.

    Raises
    ------
    PosvitError
        If the stores share no image or a named image is not in all of them.
    """
    for s in stores:
        require_images(s)
    names = [list(dict.fromkeys(Path(r.path).name for r in s.records)) for s in stores]
    others = [set(n) for n in names[1:]]
    common = [n for n in names[0] if all(n in o for o in others)]
    if not common:
        raise PosvitError("the stores share no image (matched by file name): extract the same images with each model")
    if images:
        chosen = []
        for it in images:
            key = str(it)
            hit = next((n for n in common if n == key or Path(n).stem == key), None)
            if hit is None:
                raise PosvitError(f"image '{key}' is not in every store (shared: {', '.join(common[:5])}"
                                  f"{', …' if len(common) > 5 else ''})")
            chosen.append(hit)
        return list(dict.fromkeys(chosen))
    if max_images < 1:
        raise PosvitError(f"--max-images must be at least 1, got {max_images}")
    return common[:max_images]


def _store_queries(store, index: int, prep: dict | None, points, units: str) -> list[tuple[int, int]]:
    """Query tokens ``(row, col)`` of ``points`` on one store's image."""
    rec = store.record(index)
    return [query_token(p, units, token_footprint(rec, prep), rec.name) for p in points]


def _source_image(stores, indices: Sequence[int], fp0, hw0, sources: SourceImages, image_dir: str | None):
    """The shared image under the first store's footprint, from the first store that can find its source file."""
    rec0 = stores[0].record(indices[0])
    img0 = sources.image(rec0.path, rec0.name, fp0, hw0)
    if img0 is not None:
        return img0
    for k in range(1, len(stores)):
        found = find_source_image(stores[k].record(indices[k]).path, stores[k].source, image_dir)
        if found is not None:
            sources.missing.remove(rec0.name)
            return load_display_image(found, fp0, hw0, store_intensity(stores[0]))
    return None


def _column_headers(labels, scores, points, units: str, standardise: bool):
    """Column headers (image, then PCA and one similarity map per point for each model) and the model groups
    ``(first column, last column, label with score)``."""
    per_model = 1 + len(points)
    headers = ["image"]
    groups = []
    for k, label in enumerate(labels):
        first = 1 + k * per_model
        sc = scores[k]
        groups.append((first, first + per_model - 1, label + ("\n" + sc.text() if sc is not None else "")))
        headers.append("PCA" + (" (std)" if standardise else ""))
        headers += [f"similarity {point_text(p, units)}" if len(points) > 1 else "similarity" for p in points]
    return headers, groups


def compare_figure(
    stores: Sequence,
    outdir: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    scores: Sequence[PositionScore | None] | None = None,
    layers: Sequence[str | None] | None = None,
    images: Sequence[str] | None = None,
    max_images: int = 4,
    points: Sequence[tuple[float, float]] = ((0.5, 0.5),),
    units: str = "frac",
    standardise: bool = False,
    vmin: float = 0.5,
    vmax: float = 1.0,
    alpha: float = 0.7,
    cmap: str = "coolwarm",
    sim_upsample: str = "bilinear",
    options: FigureOptions | None = None,
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """One grid for a report: images as rows, models as column groups (PCA and similarity maps), each group's
    header carrying that model's positional score.

    Parameters
    ----------
    stores : sequence of FeatureStore
        Stores of the same images from different models (images are matched by file name).
    labels : sequence of str, optional
        Model names (default: :func:`store_label`).
    scores : sequence of PositionScore or None, optional
        One per store, shown in its header.
    images : sequence of str, optional
        Image names to draw (default: the first ``max_images`` images all stores share).
    points, units
        Query points of the similarity maps (default: the centre of each image).
    standardise : bool
        Z-score channels per image before the PCA (the same for every model).

    Raises
    ------
    PosvitError
        If the stores share no image, or a point lies outside an image.
    """
    opts = options or FigureOptions(panel_size=224)
    run = report(progress)
    if len(stores) < 1:
        raise PosvitError("name at least one store to compare")
    layers = list(layers) if layers else [None] * len(stores)
    layers = [require_features(s, ly) for s, ly in zip(stores, layers)]
    labels = list(labels) if labels else [store_label(s) for s in stores]
    if len(labels) != len(stores):
        raise PosvitError(f"{len(labels)} --label values for {len(stores)} stores: give one per store")
    scores = list(scores) if scores else [None] * len(stores)
    if not points:
        raise PosvitError("no query point: pass --at X,Y")
    chosen = shared_images(stores, images, max_images)
    by_name = [{Path(r.path).name: r.index for r in reversed(s.records)} for s in stores]
    preps = [s.preprocessing for s in stores]
    queries = {(k, n): _store_queries(s, by_name[k][n], preps[k], points, units)
               for k, s in enumerate(stores) for n in chosen}
    outdir = Path(outdir)
    sources = SourceImages(stores[0].source, opts.image_dir, store_intensity(stores[0]))
    rows, row_labels, numbers = [], [], []
    for j, n in enumerate(chosen):
        rec0 = stores[0].record(by_name[0][n])
        fp0 = token_footprint(rec0, preps[0])
        hw0 = fit_size(fp0.height, fp0.width, opts.panel_size)
        img0 = _source_image(stores, [b[n] for b in by_name], fp0, hw0, sources, opts.image_dir)
        marks0 = [marker_xy(fp0, q, hw0) for q in queries[(0, n)]]
        row = [Panel(img0, size=hw0, placeholder="source image not found", markers=marks0)]
        info = {"name": rec0.name, "models": []}
        for k, s in enumerate(stores):
            i = by_name[k][n]
            rec = s.record(i)
            fp = token_footprint(rec, preps[k])
            hw = fit_size(fp.height, fp.width, opts.panel_size)
            under = img0 if hw == hw0 else (sources.image(rec.path, rec.name, fp, hw) if img0 is not None else None)
            t = StoreGrid(s, i, layers[k])  # read in bands of token rows: a huge image is never held whole
            basis = fit_pca([t], 3, standardise=standardise)
            ptitle = scores[k].image_text(i) if scores[k] is not None else ""
            row.append(Panel(to_uint8(upsample(basis.to_rgb(t), hw, opts.upsample)), title=ptitle))
            minfo = {"label": labels[k], "xy_r2": scores[k].per_image.get(i) if scores[k] else None,
                     "explained": [float(x) for x in basis.explained], "queries": []}
            for q in queries[(k, n)]:
                rgb, sim, corr = similarity_panel(t, fp, q, hw, under, vmin=vmin, vmax=vmax, alpha=alpha, cmap=cmap,
                                                  method=sim_upsample)
                row.append(Panel(rgb, title=f"r(sim, −dist) {fmt(corr)}", markers=[marker_xy(fp, q, hw)]))
                minfo["queries"].append({"token": {"x": q[1], "y": q[0]}, "similarity_distance_corr": corr})
            info["models"].append(minfo)
        rows.append(row)
        H, W = rec0.orig_size
        row_labels.append(f"{rec0.name}\n{W}×{H} px")
        numbers.append(info)
        run("drawing comparison", j + 1, len(chosen))
    sources.warn()
    headers, groups = _column_headers(labels, scores, points, units, standardise)
    title = ("Positional bias compared: " + " vs ".join(labels)) if len(labels) > 1 else f"Positional bias: {labels[0]}"
    srcs = sorted({sc.source for sc in scores if sc is not None})
    footer = ("Scores: " + ("; ".join(srcs) if srcs else "not computed") + ". PCA → RGB per image "
              + ("(channels z-scored first)" if standardise else "(features as stored)")
              + f", {opts.upsample} upsampling. Similarity: cosine to the marked patch, {cmap} {vmin:g}..{vmax:g} at "
              f"opacity {alpha:g}, {sim_upsample} upsampling; r(sim, −dist) near 1 = similarity falls off with distance.")
    path = outdir / ("compare_" + "_vs_".join(slug(lb, 30) for lb in labels)[:120] + ".png")
    grid = PanelGrid(rows, title=title, row_labels=row_labels, col_headers=headers, groups=groups, footer=footer,
                     colourbar=ColourBar(cmap, vmin, vmax, "cosine similarity to the query patch"))
    size = write_grid(grid, path, title)
    caption = "; ".join(f"{lb}: {sc.text() if sc else 'not scored'}" for lb, sc in zip(labels, scores))
    return [FigureEntry(path.relative_to(outdir).as_posix(), "compare", title, caption, [],
                        {"size": list(size), "models": [{"label": lb, "score": sc.as_dict() if sc else None}
                                                        for lb, sc in zip(labels, scores)], "images": numbers},
                        opts.command)]

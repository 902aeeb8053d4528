"""Figures of feature stores, label maps and segmentations, written as PNG files with their numbers.

Each ``*_figure`` function reads what it needs, draws one figure (rows of images), writes it atomically into an
output folder and returns the :class:`~posvit_cli.core.viz.index.FigureEntry` records to put on the folder's
index page. Every figure carries its numbers: the store's positional probe score in the title, per-image scores
in the row labels, and the statistic of each panel in its title.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import (
    Footprint,
    find_source_image,
    fit_size,
    load_display_image,
    query_token,
    token_footprint,
)
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import ColourBar, Legend, Panel, PanelGrid, render_grid, save_figure, save_png_array
from posvit_cli.core.viz.maps import (
    blend,
    colormap_rgb,
    cosine_similarity_map,
    fit_pca,
    foreground_mask,
    label_palette,
    labels_rgb,
    position_eta_squared,
    similarity_distance_correlation,
    to_uint8,
    upsample,
)
from posvit_cli.core.viz.scores import ChannelScores, PositionScore, fmt

__all__ = [
    "FigureOptions",
    "channels_figure",
    "clusters_figure",
    "compare_figure",
    "pca_figure",
    "require_features",
    "require_images",
    "segmentation_figure",
    "select_images",
    "similarity_figure",
    "similarity_panel",
    "slug",
    "store_label",
]

#: Most label colours listed in a legend; beyond it the legend says how many there are.
LEGEND_MAX = 24


@dataclasses.dataclass
class FigureOptions:
    """Settings shared by the image figures.

    Attributes
    ----------
    panel_size : int
        Longer side of each image panel in pixels.
    upsample : {"nearest", "bilinear"}
        How token maps are enlarged to the panel (see :func:`~posvit_cli.core.viz.maps.upsample`).
    raw : bool
        Also write every per-image map pixel for pixel (no titles) under ``raw/``, at the resolution of the
        image region the features cover, its longer side capped at ``raw_max_side``.
    raw_max_side : int
    image_dir : str, optional
        Folder to look for source images in first (when the stored paths moved).
    label : str, optional
        Name of the model in titles and file names (default: from the store's provenance).
    command : str
        The command line, recorded on the index page.
    """

    panel_size: int = 256
    upsample: str = "nearest"
    raw: bool = False
    raw_max_side: int = 1024
    image_dir: str | None = None
    label: str | None = None
    command: str = ""


# --------------------------------------------------------------------------------------------------------------
# Helpers


def slug(text: str, max_len: int = 60) -> str:
    """A file-name-safe version of ``text`` (letters, digits, ``-``, ``_``, ``.``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-._")
    return (s or "x")[:max_len]


def store_label(store) -> str:
    """A short name for a store's features: model, weights marker and debiasing, e.g. ``dinov2-s-reg + rasa``."""
    name = store.model or Path(store.source).stem or "features"
    if store.weights == "random":
        name += " (random weights)"
    methods = store.debias_methods
    mods = [str(m.get("name", "?")) for m in store.modifications if isinstance(m, dict)]
    for m in mods + methods:
        name += f" + {m}"
    return name


def require_images(store) -> None:
    """Raise a one-line error for a store without images."""
    if len(store) == 0:
        raise PosvitError(f"'{store.source}' holds no images: nothing to draw")


def require_features(store, layer: str | None) -> str:
    """The layer to draw, after checking the store has images and feature layers."""
    require_images(store)
    if not store.layers:
        raise PosvitError(
            f"'{store.source}' holds no feature layers (a maps-only store: {', '.join(store.map_names()) or 'no maps'}); "
            "draw its label maps with `posvit viz clusters`"
        )
    return store.check_layer(layer)


def select_images(store, images: Sequence[str] | None = None, max_images: int = 8) -> list[int]:
    """Store indices of the images to draw: named ones (file stem, file name or index) or the first ``max_images``.

    Raises
    ------
    PosvitError
        If a named image is not in the store, or ``max_images < 1``.
    """
    require_images(store)
    recs = store.records
    if not images:
        if max_images < 1:
            raise PosvitError(f"--max-images must be at least 1, got {max_images}")
        return list(range(min(len(recs), max_images)))
    by_name: dict[str, int] = {}
    for r in recs:
        by_name.setdefault(r.name, r.index)
        by_name.setdefault(Path(r.path).name, r.index)
        by_name.setdefault(r.path, r.index)
    out = []
    for item in images:
        key = str(item).strip()
        if key in by_name:
            out.append(by_name[key])
        elif key.isdigit() and int(key) < len(recs):
            out.append(int(key))
        else:
            some = ", ".join(r.name for r in recs[:5]) + (", …" if len(recs) > 5 else "")
            raise PosvitError(f"image '{key}' is not in '{store.source}' (its images: {some})")
    return list(dict.fromkeys(out))


class _LazyTokens:
    """Token grids of chosen store images, read on demand: a sequence that never holds more than one image."""

    def __init__(self, store, indices: Sequence[int], layer: str):
        self.store, self.indices, self.layer = store, list(indices), layer

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.store.features(self.indices[j], self.layer)


class _Sources:
    """Source images of a store's records, located once; missing ones are named in one warning."""

    def __init__(self, store_source: str, image_dir: str | None, intensity: str = "auto"):
        self.store_source = store_source
        self.image_dir = image_dir
        self.intensity = intensity
        self.missing: list[str] = []

    def image(self, path: str, name: str, footprint: Footprint, out_hw: tuple[int, int]) -> np.ndarray | None:
        found = find_source_image(path, self.store_source, self.image_dir)
        if found is None:
            self.missing.append(name)
            return None
        try:
            return load_display_image(found, footprint, out_hw, self.intensity)
        except PosvitError as exc:
            warnings.warn(f"{exc}; drawing the features of '{name}' alone", PosvitWarning, stacklevel=2)
            return None

    def warn(self) -> None:
        if self.missing:
            names = ", ".join(self.missing[:3]) + (f" and {len(self.missing) - 3} more" if len(self.missing) > 3 else "")
            hint = "" if self.image_dir else " (pass --image-dir where they are now)"
            warnings.warn(f"source image not found for {names}: drawing the features alone{hint}",
                          PosvitWarning, stacklevel=2)


def _intensity(store) -> str:
    return store.intensity


def _row_label(record, score: PositionScore | None, fp: Footprint | None = None) -> str:
    H, W = record.orig_size
    lines = [record.name, f"{W}×{H} px · {record.grid[1]}×{record.grid[0]} tokens"]
    if fp is not None and fp.cropped:
        lines.append(f"features cover x {fp.left:.0f}–{fp.right:.0f}, y {fp.top:.0f}–{fp.bottom:.0f} px")
    if score is not None and score.image_text(record.index):
        lines.append(score.image_text(record.index))
    return "\n".join(lines)


def _raw_size(fp: Footprint, max_side: int) -> tuple[int, int]:
    h, w = int(round(fp.height)), int(round(fp.width))
    if max(h, w) > max_side:
        return fit_size(fp.height, fp.width, max_side)
    return max(h, 1), max(w, 1)


def _score_title(score: PositionScore | None) -> str:
    if score is None:
        return "positional score not computed (--no-score)"
    return f"{score.text()} — {score.source}"


def _marker_xy(fp: Footprint, token: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, float]:
    """Centre of a token in panel pixels (pixel centres at integers)."""
    cx, cy = fp.token_centre(*token)
    return ((cx - fp.left) / fp.width * out_hw[1] - 0.5, (cy - fp.top) / fp.height * out_hw[0] - 0.5)


def _write(grid: PanelGrid, path: Path, title: str) -> tuple[int, int]:
    fig = render_grid(grid)
    save_figure(fig.figure, path, ("png",), title=title)
    return fig.size


# --------------------------------------------------------------------------------------------------------------
# PCA


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
    sources = _Sources(store.source, opts.image_dir, _intensity(store))
    recs = [store.record(i) for i in indices]
    tokens = _LazyTokens(store, indices, layer)
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
                save_png_array(to_uint8(upsample(rgb, _raw_size(fp, opts.raw_max_side), opts.upsample)), raw_path)
                extra.append(raw_path.relative_to(outdir).as_posix())
        rows.append(row)
        labels.append(_row_label(rec, score, fp))
        numbers.append(info)
        run("drawing PCA", j + 1, len(recs))
    sources.warn()
    headers = ["image"]
    for v in variants:
        h = f"PCA · {_VARIANT_NAMES[v]}"
        if shared:
            h += "\nshared: var " + " · ".join(f"{100 * x:.0f}" for x in bases[v].explained) + " %"
        headers.append(h)
    title = (f"PCA → RGB of {layer} patch features · {label}\n{_score_title(score)}")
    footer = ("PC1 → red, PC2 → green, PC3 → blue, each scaled to [0, 1] "
              + ("over all images (one shared PCA)" if shared else "per image")
              + (f" ({clip_percentile:g}–{100 - clip_percentile:g} percentiles)" if clip_percentile else " (min–max)")
              + ". raw: features as stored; standardised: every channel z-scored per image first (it can hide or "
              "reveal a positional ramp)."
              + (f" Foreground: first component cut at {fg_threshold:g}, border side = background." if foreground else "")
              + f" Token maps enlarged by {opts.upsample} upsampling.")
    path = outdir / f"{stem}.png"
    size = _write(PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, footer=footer), path,
                  title.split("\n")[0])
    caption = f"{len(recs)} images, layer {layer}. {_score_title(score)}."
    return [FigureEntry(path.relative_to(outdir).as_posix(), "pca", title.split("\n")[0], caption, extra,
                        {"size": list(size), "score": score.as_dict() if score else None, "images": numbers},
                        opts.command)]


# --------------------------------------------------------------------------------------------------------------
# Similarity


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


def _point_text(point, units) -> str:
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
    sources = _Sources(store.source, opts.image_dir, _intensity(store))
    rows, labels, numbers, extra = [], [], [], []
    for j, i in enumerate(indices):
        rec = store.record(i)
        fp = token_footprint(rec, prep)
        hw = fit_size(fp.height, fp.width, opts.panel_size)
        img = sources.image(rec.path, rec.name, fp, hw)
        t = store.features(i, layer)
        marks = [_marker_xy(fp, q, hw) for q in queries[i]]
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
                save_png_array(colormap_rgb(upsample(sim, _raw_size(fp, opts.raw_max_side), opts.upsample), cmap,
                                            vmin, vmax), raw_path)
                extra.append(raw_path.relative_to(outdir).as_posix())
        rows.append(row)
        labels.append(_row_label(rec, score, fp))
        numbers.append(info)
        run("drawing similarity", j + 1, len(indices))
    sources.warn()
    headers = ["image (queries ○)"] + [f"query {_point_text(p, units)}" for p in points]
    title = f"Cosine similarity to query patches ({layer}) · {label}\n{_score_title(score)}"
    footer = (f"sim = cosine of raw features; the query patch is 1. Colours {cmap} on a fixed scale "
              f"{vmin:g}..{vmax:g} at opacity {alpha:g}; lower values take the {vmin:g} colour. Maps enlarged by "
              f"{opts.upsample} upsampling. r(sim, −dist): correlation of similarity with closeness to the query "
              "(near 1 when similarity just falls off with distance).")
    path = outdir / f"{stem}.png"
    grid = PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, footer=footer,
                     colourbar=ColourBar(cmap, vmin, vmax, "cosine similarity to the query patch"))
    size = _write(grid, path, title.split("\n")[0])
    caption = (f"{len(indices)} images × {len(points)} query point(s) in {units}, layer {layer}. "
               f"{_score_title(score)}.")
    return [FigureEntry(path.relative_to(outdir).as_posix(), "similarity", title.split("\n")[0], caption, extra,
                        {"size": list(size), "score": score.as_dict() if score else None, "images": numbers},
                        opts.command)]


# --------------------------------------------------------------------------------------------------------------
# Positional channels


def channels_figure(
    store,
    outdir: str | os.PathLike,
    scores: ChannelScores,
    *,
    channels: Sequence[int] | None = None,
    layer: str | None = None,
    indices: Sequence[int] | None = None,
    cmap: str = "viridis",
    options: FigureOptions | None = None,
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """The most positional channels as images: one row per channel, one column per image.

    A channel that encodes position draws the same ramp in every column whatever the image shows. Each row has
    one colour scale (its 1st to 99th percentile over the images drawn), so columns compare directly.

    Parameters
    ----------
    scores : ChannelScores
        Per-channel R² and the ranked channels (:func:`~posvit_cli.core.viz.scores.channel_scores`).
    channels : sequence of int, optional
        Channels to draw instead of ``scores.ranked``.

    Raises
    ------
    PosvitError
        For a channel index outside the store's channels.
    """
    opts = options or FigureOptions(panel_size=160)
    run = report(progress)
    layer = require_features(store, layer)
    indices = list(indices) if indices is not None else select_images(store)
    chans = list(channels) if channels else list(scores.ranked)
    if not chans:
        raise PosvitError("no channels to draw")
    first = store.features(indices[0], layer)
    C = int(first.shape[-1])
    bad = [c for c in chans if not 0 <= c < C]
    if bad:
        raise PosvitError(f"channel {bad[0]} does not exist: the features have channels 0..{C - 1}")
    outdir = Path(outdir)
    label = opts.label or store_label(store)
    prep = store.preprocessing
    recs = [store.record(i) for i in indices]
    hws = [fit_size(fp.height, fp.width, opts.panel_size) for fp in (token_footprint(r, prep) for r in recs)]
    # Only the drawn channels are kept in memory: (h, w, len(chans)) per image.
    per_image = [first[..., chans]] + [store.features(i, layer)[..., chans] for i in indices[1:]]
    stem = "_".join(["channels", slug(label)] + ([slug(layer)] if layer != "final" else []))
    rows, labels, bars, numbers = [], [], [], []
    for k, c in enumerate(chans):
        allv = np.concatenate([v[..., k].ravel() for v in per_image])
        lo, hi = (float(x) for x in np.percentile(allv, [1, 99]))
        if hi <= lo:
            hi = lo + 1e-6
        row = []
        for j in range(len(indices)):
            m = upsample(per_image[j][..., k], hws[j], opts.upsample)
            row.append(Panel(colormap_rgb(m, cmap, lo, hi)))
        rows.append(row)
        ramp, r2 = scores.best_ramp(c)
        tops = [t for t, cs in scores.top.items() if c in cs]
        lab = f"channel {c}"
        for t in tops or ([ramp] if ramp else []):
            lab += f"\n{t} R² {fmt(float(scores.channel_r2[t][c]))}"
        if "xy" in scores.channel_r2:
            lab += f"\nxy R² {fmt(float(scores.channel_r2['xy'][c]))}"
        if tops:
            lab += f"\n(top of {', '.join(tops)})"
        labels.append(lab)
        bars.append(ColourBar(cmap, lo, hi))
        numbers.append({"channel": c, "best_ramp": ramp, "r2": r2,
                        "r2_by_target": {t: float(v[c]) for t, v in scores.channel_r2.items()}, "top_of": tops,
                        "scale": [lo, hi]})
        run("drawing channels", k + 1, len(chans))
    headers = [r.name for r in recs]
    stack = " · ".join(f"{t} {fmt(v)}" for t, v in scores.stack.items() if t in ("lr", "ud", "diag", "radial", "xy"))
    ctrl = scores.stack.get("random")
    title = (f"Most positional channels ({layer}) · {label}\nstack R²: {stack}"
             + (f" (random control {fmt(ctrl)})" if ctrl is not None else "") + f" — {scores.source}")
    footer = ("Each row: one channel over the images, one colour scale per row (1st–99th percentile over these "
              "images). A positional channel draws the same ramp in every column whatever the content. R²: that "
              f"channel alone, probed for each ramp. Token maps enlarged by {opts.upsample} upsampling.")
    path = outdir / f"{stem}.png"
    grid = PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, row_colourbars=bars, footer=footer)
    size = _write(grid, path, title.split("\n")[0])
    caption = f"{len(chans)} channels × {len(indices)} images, layer {layer}. Stack R²: {stack}. {scores.source}."
    return [FigureEntry(path.relative_to(outdir).as_posix(), "channels", title.split("\n")[0], caption, [],
                        {"size": list(size), "stack_r2": scores.stack, "channels": numbers,
                         "source": scores.source}, opts.command)]


# --------------------------------------------------------------------------------------------------------------
# Label maps: clusters and segmentations


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
    sources = _Sources(store.source, opts.image_dir, _intensity(store))
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
        labels.append(_row_label(rec, None, fp))
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
    size = _write(grid, path, title.split("\n")[0])
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
    from posvit_cli.core.io.images import read_image
    from posvit_cli.core.io.labels import LabelCheck, read_label_image, resize_labels_nearest, stem as stem_of
    from posvit_cli.core.measure.metrics import accumulate_confusion, confusion_matrix, miou

    opts = options or FigureOptions()
    run = report(progress)
    if not images:
        raise PosvitError("no images to draw")
    if not (0.0 <= alpha <= 1.0):
        raise PosvitError(f"--alpha must be in [0, 1], got {alpha}")
    outdir = Path(outdir)
    loaded = []
    n_named = len(class_names) if class_names else None
    pred_check = LabelCheck("prediction", n_named, fix="add 1 (class k is prediction value k+1, 0 = unlabelled)")
    truth_check = LabelCheck("mask", n_named)
    for p in images:
        s = stem_of(p)
        # Both become class indices 0..C-1 (-1 = unlabelled), so the legend's names index them directly.
        pr = read_label_image(predictions[s], "prediction")
        pred_check.add(pr)
        gt = None
        if truth and s in truth:
            g = read_label_image(truth[s], "mask", ignore_index=ignore_index)
            truth_check.add(g)
            gt = g.classes
        loaded.append((Path(p), s, pr.classes, gt))
    pred_check.finish()
    truth_check.finish()
    values = sorted({int(v) for _, _, pr, gt in loaded for a in (pr, gt) if a is not None
                     for v in np.unique(a) if v >= 0})
    palette = label_palette(max(len(values), 1))
    n_cls = (max(values) + 1) if values else 1
    total = None
    rows, labels, numbers = [], [], []
    for j, (p, s, pred, gt) in enumerate(loaded):
        try:
            H, W = read_image(p).shape[:2]
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
                     "class_fractions": {int(v): float(np.mean(pred == v)) for v in np.unique(pred)}})
        t = f"η² x {fmt(ex)}, y {fmt(ey)}"
        row = [Panel(img, size=hw, placeholder="image unreadable")]
        if gt is not None:
            pr = pred if pred.shape == gt.shape else resize_labels_nearest(pred, gt.shape)
            gt_ok = gt
            keep = gt_ok >= 0
            bad = (pr[keep] < 0) | (pr[keep] >= n_cls)
            if (pr[keep] < 0).any():
                raise PosvitError(f"prediction of '{s}' leaves pixels unlabelled (value 0) where the ground truth "
                                  "has a class: predictions hold class k as value k+1 (docs/labels.md)")
            if bad.any():
                raise PosvitError(f"prediction of '{s}' holds label {int(pr[keep][bad][0])}, not a class of the "
                                  f"ground truth or the other predictions")
            conf = confusion_matrix(gt_ok[keep], pr[keep], n_cls)
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
    n_truth = sum(1 for *_, gt in loaded if gt is not None)
    title = f"Segmentation · {label}\n" + (
        f"mIoU {fmt(overall, 3)} over {n_truth} image(s) with ground truth (one confusion matrix; classes in "
        "neither truth nor prediction left out)" if overall is not None
        else "no ground truth given (--truth): η² = share of column (x) / row (y) variance explained by the labels")
    headers = ["image", "prediction"] + (["ground truth"] if any(gt is not None for *_, gt in loaded) else [])
    path = outdir / f"segmentation_{slug(label)}.png"
    legend = _legend(values, palette, class_names, "class")
    grid = PanelGrid(rows, title=title, row_labels=labels, col_headers=headers, legend=legend,
                     footer=f"Class colours at opacity {alpha:g}."
                     + (f" Ground-truth value {ignore_index} ignored." if ignore_index is not None else ""))
    size = _write(grid, path, title.split("\n")[0])
    caption = f"{len(loaded)} images." + (f" mIoU {fmt(overall, 3)}." if overall is not None else "")
    return [FigureEntry(path.relative_to(outdir).as_posix(), "segmentation", title.split("\n")[0], caption, [],
                        {"size": list(size), "miou": overall, "images": numbers,
                         "legend": [{"class": int(v), "name": name, "colour": [int(c) for c in colour]}
                                    for v, (colour, name) in zip(values, legend.entries)]},
                        opts.command)]


# --------------------------------------------------------------------------------------------------------------
# Compare models


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
    queries = {}
    for k, s in enumerate(stores):
        for n in chosen:
            i = by_name[k][n]
            rec = s.record(i)
            queries[(k, n)] = [query_token(p, units, token_footprint(rec, preps[k]), rec.name) for p in points]
    outdir = Path(outdir)
    sources = _Sources(stores[0].source, opts.image_dir, _intensity(stores[0]))
    rows, row_labels, numbers = [], [], []
    for j, n in enumerate(chosen):
        rec0 = stores[0].record(by_name[0][n])
        fp0 = token_footprint(rec0, preps[0])
        hw0 = fit_size(fp0.height, fp0.width, opts.panel_size)
        img0 = sources.image(rec0.path, rec0.name, fp0, hw0)
        if img0 is None:
            for k in range(1, len(stores)):
                r = stores[k].record(by_name[k][n])
                found = find_source_image(r.path, stores[k].source, opts.image_dir)
                if found is not None:
                    img0 = load_display_image(found, fp0, hw0, _intensity(stores[0]))
                    sources.missing.remove(rec0.name)
                    break
        marks0 = [_marker_xy(fp0, q, hw0) for q in queries[(0, n)]]
        row = [Panel(img0, size=hw0, placeholder="source image not found", markers=marks0)]
        info = {"name": rec0.name, "models": []}
        for k, s in enumerate(stores):
            i = by_name[k][n]
            rec = s.record(i)
            fp = token_footprint(rec, preps[k])
            hw = fit_size(fp.height, fp.width, opts.panel_size)
            under = img0 if hw == hw0 else (sources.image(rec.path, rec.name, fp, hw) if img0 is not None else None)
            t = s.features(i, layers[k])
            basis = fit_pca([t], 3, standardise=standardise)
            ptitle = scores[k].image_text(i) if scores[k] is not None else ""
            row.append(Panel(to_uint8(upsample(basis.to_rgb(t), hw, opts.upsample)), title=ptitle))
            minfo = {"label": labels[k], "xy_r2": scores[k].per_image.get(i) if scores[k] else None,
                     "explained": [float(x) for x in basis.explained], "queries": []}
            for q in queries[(k, n)]:
                rgb, sim, corr = similarity_panel(t, fp, q, hw, under, vmin=vmin, vmax=vmax, alpha=alpha, cmap=cmap,
                                                  method=sim_upsample)
                row.append(Panel(rgb, title=f"r(sim, −dist) {fmt(corr)}", markers=[_marker_xy(fp, q, hw)]))
                minfo["queries"].append({"token": {"x": q[1], "y": q[0]}, "similarity_distance_corr": corr})
            info["models"].append(minfo)
        rows.append(row)
        H, W = rec0.orig_size
        row_labels.append(f"{rec0.name}\n{W}×{H} px")
        numbers.append(info)
        run("drawing comparison", j + 1, len(chosen))
    sources.warn()
    per_model = 1 + len(points)
    headers = ["image"]
    groups = []
    for k in range(len(stores)):
        first = 1 + k * per_model
        sc = scores[k]
        groups.append((first, first + per_model - 1, labels[k] + ("\n" + sc.text() if sc is not None else "")))
        headers.append("PCA" + (" (std)" if standardise else ""))
        headers += [f"similarity {_point_text(p, units)}" if len(points) > 1 else "similarity" for p in points]
    title = ("Positional bias compared: " + " vs ".join(labels)) if len(labels) > 1 else f"Positional bias: {labels[0]}"
    srcs = sorted({sc.source for sc in scores if sc is not None})
    footer = ("Scores: " + ("; ".join(srcs) if srcs else "not computed") + ". PCA → RGB per image "
              + ("(channels z-scored first)" if standardise else "(features as stored)")
              + f", {opts.upsample} upsampling. Similarity: cosine to the marked patch, {cmap} {vmin:g}..{vmax:g} at "
              f"opacity {alpha:g}, {sim_upsample} upsampling; r(sim, −dist) near 1 = similarity falls off with distance.")
    path = outdir / ("compare_" + "_vs_".join(slug(lb, 30) for lb in labels)[:120] + ".png")
    grid = PanelGrid(rows, title=title, row_labels=row_labels, col_headers=headers, groups=groups, footer=footer,
                     colourbar=ColourBar(cmap, vmin, vmax, "cosine similarity to the query patch"))
    size = _write(grid, path, title)
    caption = "; ".join(f"{lb}: {sc.text() if sc else 'not scored'}" for lb, sc in zip(labels, scores))
    return [FigureEntry(path.relative_to(outdir).as_posix(), "compare", title, caption, [],
                        {"size": list(size), "models": [{"label": lb, "score": sc.as_dict() if sc else None}
                                                        for lb, sc in zip(labels, scores)], "images": numbers},
                        opts.command)]

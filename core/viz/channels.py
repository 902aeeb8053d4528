"""The most positional channels of a store, each drawn as a map with its positional score."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import fit_size, token_footprint
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import ColourBar, Panel, PanelGrid
from posvit_cli.core.viz.maps import colormap_rgb, grid_channels, upsample
from posvit_cli.core.viz.pictures import (
    FigureOptions,
    StoreGrid,
    require_features,
    select_images,
    slug,
    store_label,
    write_grid,
)
from posvit_cli.core.viz.scores import ChannelScores, fmt

__all__ = [
    "channels_figure",
]


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
    first = StoreGrid(store, indices[0], layer)
    C = int(first.shape[-1])
    bad = [c for c in chans if not 0 <= c < C]
    if bad:
        raise PosvitError(f"channel {bad[0]} does not exist: the features have channels 0..{C - 1}")
    outdir = Path(outdir)
    label = opts.label or store_label(store)
    prep = store.preprocessing
    recs = [store.record(i) for i in indices]
    hws = [fit_size(fp.height, fp.width, opts.panel_size) for fp in (token_footprint(r, prep) for r in recs)]
    # Only the drawn channels are kept in memory: (h, w, len(chans)) per image, read in bands of token rows.
    per_image = [grid_channels(StoreGrid(store, i, layer), chans) for i in indices]
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
    size = write_grid(grid, path, title.split("\n")[0])
    caption = f"{len(chans)} channels × {len(indices)} images, layer {layer}. Stack R²: {stack}. {scores.source}."
    return [FigureEntry(path.relative_to(outdir).as_posix(), "channels", title.split("\n")[0], caption, [],
                        {"size": list(size), "stack_r2": scores.stack, "channels": numbers,
                         "source": scores.source}, opts.command)]

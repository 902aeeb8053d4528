"""Figures laid out in pixels: grids of image panels with titles, labels, colour bars and legends.

Every size here is in pixels of the output PNG. A panel's image is drawn 1:1 into an axes box of exactly its
size, so a figure's pixels are the arrays it was given (no resampling by matplotlib) and a panel keeps the true
aspect ratio of its image. Figures use matplotlib's object API with the Agg canvas (no pyplot, no GUI, no global
state) and are written atomically.
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.fileio import atomic_path

__all__ = [
    "DPI", "ColourBar", "Legend", "Panel", "PanelGrid", "RenderedFigure", "render_grid", "save_figure", "save_png_array",
]

#: Dots per inch of every raster figure; sizes are set in pixels, so this only converts font sizes.
DPI = 100
MARGIN = 10
GAP = 6
FONT = {"title": 15, "header": 13, "label": 12, "panel": 11, "small": 10}
LINE = 1.3
CHAR_W = 0.56  # average glyph width of DejaVu Sans, as a fraction of the font size


def _pt(px: float) -> float:
    return px * 72.0 / DPI


def _lines(text: str) -> list[str]:
    return [ln for ln in (text or "").split("\n")] if text else []


def _line_h(kind: str) -> int:
    return int(math.ceil(FONT[kind] * LINE))


def _text_w(line: str, kind: str) -> int:
    return int(math.ceil(len(line) * FONT[kind] * CHAR_W))


def _wrap(text: str, width_px: int, kind: str) -> list[str]:
    chars = max(8, int(width_px / (FONT[kind] * CHAR_W)))
    out: list[str] = []
    for ln in _lines(text):
        out.extend(textwrap.wrap(ln, chars, break_long_words=True, break_on_hyphens=False) or [""])
    return out


@dataclasses.dataclass
class Panel:
    """One image in a grid.

    Attributes
    ----------
    image : ndarray of uint8, shape (h, w, 3), or None
        Drawn pixel for pixel. None draws a grey box of ``size`` with ``placeholder`` text.
    size : (int, int), optional
        ``(h, w)``; defaults to the image's shape.
    title : str
        Small text above the panel (several lines with ``\\n``).
    placeholder : str
        Text inside an empty panel.
    markers : list of (float, float)
        Points ``(x, y)`` in panel pixels to mark (query patches).
    """

    image: np.ndarray | None
    size: tuple[int, int] | None = None
    title: str = ""
    placeholder: str = ""
    markers: list[tuple[float, float]] = dataclasses.field(default_factory=list)

    @property
    def hw(self) -> tuple[int, int]:
        if self.size is not None:
            return int(self.size[0]), int(self.size[1])
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclasses.dataclass
class ColourBar:
    """A colour scale: ``cmap`` from ``vmin`` to ``vmax``, with a label."""

    cmap: str
    vmin: float
    vmax: float
    label: str = ""


@dataclasses.dataclass
class Legend:
    """Colour swatches with names: ``entries`` of ``((r, g, b) uint8, text)``."""

    entries: list[tuple[Sequence[int], str]]
    title: str = ""


@dataclasses.dataclass
class PanelGrid:
    """A figure: rows of panels with optional row labels, column headers, group headers and scales.

    Attributes
    ----------
    rows : list of list of Panel or None
        ``rows[r][c]``; None leaves a cell empty.
    title : str
        Figure title (lines with ``\\n``; long lines wrap).
    row_labels : list of str, optional
        Text left of each row.
    col_headers : list of str, optional
        Text above each column.
    groups : list of (int, int, str), optional
        Headers spanning columns ``first..last`` (inclusive), above the column headers.
    colourbar : ColourBar, optional
        One horizontal scale under the grid.
    row_colourbars : list of ColourBar or None, optional
        A vertical scale right of each row.
    legend : Legend, optional
        Swatches under the grid.
    footer : str
        Small notes at the bottom.
    """

    rows: list[list[Panel | None]]
    title: str = ""
    row_labels: list[str] | None = None
    col_headers: list[str] | None = None
    groups: list[tuple[int, int, str]] | None = None
    colourbar: ColourBar | None = None
    row_colourbars: list[ColourBar | None] | None = None
    legend: Legend | None = None
    footer: str = ""


@dataclasses.dataclass
class RenderedFigure:
    """A laid-out figure: the matplotlib Figure, its size and where each panel's pixels are.

    Attributes
    ----------
    figure : matplotlib.figure.Figure
    size : (int, int)
        ``(height, width)`` of the PNG in pixels.
    boxes : dict of (int, int) to (int, int, int, int)
        ``(row, col)`` → ``(x0, y0, x1, y1)`` of the panel's image in PNG pixels (``x1``, ``y1`` exclusive).
    """

    figure: object
    size: tuple[int, int]
    boxes: dict[tuple[int, int], tuple[int, int, int, int]]


def render_grid(grid: PanelGrid) -> RenderedFigure:
    """Lay out a :class:`PanelGrid` and draw it on a matplotlib Figure (Agg canvas).

    Row heights and column widths are the largest panel in them; a smaller panel is centred in its cell.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    rows = grid.rows
    n_rows = len(rows)
    n_cols = max((len(r) for r in rows), default=0)
    col_w = [0] * n_cols
    row_h = [0] * n_rows
    title_lines = [0] * n_rows
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            if p is None:
                continue
            h, w = p.hw
            col_w[c] = max(col_w[c], w)
            row_h[r] = max(row_h[r], h)
            title_lines[r] = max(title_lines[r], len(_lines(p.title)))
    label_w = 0
    if grid.row_labels:
        longest = max((_text_w(ln, "label") for lab in grid.row_labels for ln in _lines(lab)), default=0)
        # The first line is bold (about 10 % wider than the estimate) and needs air before the panels.
        label_w = min(max(int(longest * 1.1) + 16, 60), 240)
    bar_w = 78 if grid.row_colourbars and any(grid.row_colourbars) else 0
    grid_w = label_w + sum(col_w) + GAP * max(n_cols - 1, 0) + bar_w
    # Headers are wrapped to their columns; the figure grows for a title only up to a sensible width.
    title_w = max((_text_w(ln, "title") for ln in _lines(grid.title)), default=0)
    W = 2 * MARGIN + max(grid_w, min(title_w, max(grid_w, 900)), 360)
    title = _wrap(grid.title, W - 2 * MARGIN, "title")
    col_x = []
    x = MARGIN + label_w
    for c in range(n_cols):
        col_x.append(x)
        x += col_w[c] + GAP
    headers = [_wrap(h, max(col_w[c], 40), "header") if grid.col_headers and c < len(grid.col_headers) else []
               for c, h in enumerate((grid.col_headers or []) + [""] * n_cols)][:n_cols]
    groups = []
    for first, last, text in grid.groups or []:
        span = col_x[last] + col_w[last] - col_x[first]
        groups.append((first, last, _wrap(text, span, "header")))
    y = MARGIN
    title_y = y
    y += len(title) * _line_h("title") + (8 if title else 0)
    group_y = y
    y += max((len(g[2]) for g in groups), default=0) * _line_h("header") + (6 if groups else 0)
    header_y = y
    y += max((len(h) for h in headers), default=0) * _line_h("header") + (4 if any(headers) else 0)
    row_y = []
    for r in range(n_rows):
        y += title_lines[r] * _line_h("panel") + (2 if title_lines[r] else 0)
        row_y.append(y)
        y += row_h[r] + GAP
    y += 4
    cbar_y = y
    if grid.colourbar:
        y += 14 + 2 * _line_h("small") + 10
    legend_y = y
    legend_rows = 0
    legend_cols = 1
    if grid.legend and grid.legend.entries:
        legend_cell = max(_text_w(t, "panel") for _, t in grid.legend.entries) + 34
        legend_cols = max(1, min(len(grid.legend.entries), (W - 2 * MARGIN) // legend_cell))
        legend_rows = math.ceil(len(grid.legend.entries) / legend_cols)
        y += (_line_h("panel") if grid.legend.title else 0) + legend_rows * (_line_h("panel") + 2) + 8
    footer = _wrap(grid.footer, W - 2 * MARGIN, "small")
    footer_y = y
    y += len(footer) * _line_h("small")
    H = int(y + MARGIN)
    W = int(W)

    fig = Figure(figsize=(W / DPI, H / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)

    def text(px, py, s, kind, **kw):
        fig.text(px / W, 1 - py / H, s, fontsize=_pt(FONT[kind]), va="top", **kw)

    for i, ln in enumerate(title):
        text(MARGIN, title_y + i * _line_h("title"), ln, "title", ha="left", weight="bold" if i == 0 else "normal")
    for first, last, lines in groups:
        cx = (col_x[first] + col_x[last] + col_w[last]) / 2
        for i, ln in enumerate(lines):
            text(cx, group_y + i * _line_h("header"), ln, "header", ha="center", weight="bold")
        x0, x1 = col_x[first] + 2, col_x[last] + col_w[last] - 2
        yy = 1 - (header_y - 3) / H
        fig.add_artist(Line2D([x0 / W, x1 / W], [yy, yy], transform=fig.transFigure, color="0.4", lw=0.8))
    for c, lines in enumerate(headers):
        cx = col_x[c] + col_w[c] / 2
        for i, ln in enumerate(lines):
            text(cx, header_y + i * _line_h("header"), ln, "header", ha="center")
    boxes = {}
    for r, row in enumerate(rows):
        if grid.row_labels and r < len(grid.row_labels):
            lines = _wrap(grid.row_labels[r], label_w - 10, "label")
            block = len(lines) * _line_h("label")
            top = row_y[r] + max(0, (row_h[r] - block) // 2)
            for i, ln in enumerate(lines):
                text(MARGIN, top + i * _line_h("label"), ln, "label", ha="left", weight="bold" if i == 0 else "normal")
        for c, p in enumerate(row):
            if p is None:
                continue
            h, w = p.hw
            x0 = col_x[c] + (col_w[c] - w) // 2
            y0 = row_y[r] + (row_h[r] - h) // 2
            for i, ln in enumerate(_lines(p.title)):
                ty = row_y[r] - (title_lines[r] - i) * _line_h("panel") - 2
                text(x0 + w / 2, ty, ln, "panel", ha="center")
            ax = fig.add_axes((x0 / W, 1 - (y0 + h) / H, w / W, h / H))
            ax.set_axis_off()
            if p.image is not None:
                ax.imshow(p.image, interpolation="nearest", resample=False, aspect="auto",
                          extent=(-0.5, w - 0.5, h - 0.5, -0.5))
            else:
                ax.add_patch(Rectangle((-0.5, -0.5), w, h, facecolor="0.88", edgecolor="0.6"))
                ax.text(w / 2, h / 2, "\n".join(textwrap.wrap(p.placeholder, max(8, int(w / 7)))),
                        ha="center", va="center", fontsize=_pt(FONT["small"]), color="0.3")
            for mx, my in p.markers:
                ax.plot([mx], [my], marker="o", ms=15, mfc="none", mec="black", mew=2.6)
                ax.plot([mx], [my], marker="o", ms=15, mfc="none", mec="yellow", mew=1.2)
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            boxes[(r, c)] = (x0, y0, x0 + w, y0 + h)
        if grid.row_colourbars and r < len(grid.row_colourbars) and grid.row_colourbars[r]:
            cb = grid.row_colourbars[r]
            bx = MARGIN + label_w + sum(col_w) + GAP * max(n_cols - 1, 0) + 8
            bh = max(20, int(row_h[r] * 0.85))
            by = row_y[r] + (row_h[r] - bh) // 2
            cax = fig.add_axes((bx / W, 1 - (by + bh) / H, 10 / W, bh / H))
            cbar = fig.colorbar(ScalarMappable(Normalize(cb.vmin, cb.vmax), cb.cmap), cax=cax, orientation="vertical")
            cbar.ax.tick_params(labelsize=_pt(FONT["small"]), length=2)
            if cb.label:
                cbar.set_label(cb.label, fontsize=_pt(FONT["small"]))
    if grid.colourbar:
        cb = grid.colourbar
        bw = min(W - 2 * MARGIN, 420)
        bx = (W - bw) // 2
        cax = fig.add_axes((bx / W, 1 - (cbar_y + 14) / H, bw / W, 14 / H))
        cbar = fig.colorbar(ScalarMappable(Normalize(cb.vmin, cb.vmax), cb.cmap), cax=cax, orientation="horizontal")
        cbar.ax.tick_params(labelsize=_pt(FONT["small"]), length=2)
        if cb.label:
            cbar.set_label(cb.label, fontsize=_pt(FONT["small"]), labelpad=2)
    if legend_rows:
        ly = legend_y
        if grid.legend.title:
            text(MARGIN, ly, grid.legend.title, "panel", ha="left", weight="bold")
            ly += _line_h("panel")
        cell = legend_cell
        for i, (rgb, name) in enumerate(grid.legend.entries):
            rr, cc = divmod(i, legend_cols)
            sx, sy = MARGIN + cc * cell, ly + rr * (_line_h("panel") + 2)
            fig.add_artist(Rectangle((sx / W, 1 - (sy + 12) / H), 12 / W, 12 / H, transform=fig.transFigure,
                                     facecolor=np.asarray(rgb, float) / 255.0, edgecolor="0.3", lw=0.5))
            text(sx + 17, sy - 1, name, "panel", ha="left")
    for i, ln in enumerate(footer):
        text(MARGIN, footer_y + i * _line_h("small"), ln, "small", ha="left", color="0.3")
    return RenderedFigure(fig, (H, W), boxes)




def save_figure(figure, path: str | os.PathLike, formats: Sequence[str] = ("png",), title: str = "") -> list[Path]:
    """Write a matplotlib Figure atomically as ``path`` with each suffix in ``formats``.

    Returns
    -------
    list of Path
        The files written, in ``formats`` order.
    """
    from posvit_cli import __version__

    base = Path(path)
    out = []
    for fmt in formats:
        target = base.with_suffix("." + fmt)
        meta = {"Title": title} if title else {}
        if fmt == "png":
            meta["Software"] = f"posvit {__version__} (matplotlib)"
        elif fmt == "svg":
            meta["Creator"] = f"posvit {__version__} (matplotlib)"
            meta["Date"] = None  # reproducible SVGs: no timestamp
        with atomic_path(target) as tmp:
            figure.savefig(tmp, format=fmt, dpi=DPI, facecolor="white", metadata=meta)
        out.append(target)
    return out


def save_png_array(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a ``uint8`` image array as a PNG, pixel for pixel, atomically."""
    from PIL import Image

    target = Path(path)
    with atomic_path(target) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    return target

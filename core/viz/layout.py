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


@dataclasses.dataclass
class _GridGeometry:
    """Where every part of a :class:`PanelGrid` goes, in output pixels (``y`` grows down from the top edge)."""

    width: int
    height: int
    label_w: int
    col_x: list
    col_w: list
    row_y: list
    row_h: list
    title_lines: list
    title: list
    title_y: int
    groups: list
    group_y: int
    headers: list
    header_y: int
    cbar_y: int
    legend_y: int
    legend_rows: int
    legend_cols: int
    legend_cell: int
    footer: list
    footer_y: int

    @property
    def bars_x(self) -> int:
        """Left edge of the per-row colour bars: just right of the last column."""
        return MARGIN + self.label_w + sum(self.col_w) + GAP * max(len(self.col_w) - 1, 0) + 8


def _cell_sizes(rows) -> tuple[list[int], list[int], list[int]]:
    """Column widths and row heights (the largest panel in each) and the panel-title lines of each row."""
    n_cols = max((len(r) for r in rows), default=0)
    col_w, row_h, title_lines = [0] * n_cols, [0] * len(rows), [0] * len(rows)
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            if p is None:
                continue
            h, w = p.hw
            col_w[c] = max(col_w[c], w)
            row_h[r] = max(row_h[r], h)
            title_lines[r] = max(title_lines[r], len(_lines(p.title)))
    return col_w, row_h, title_lines


def _figure_width(grid: PanelGrid, col_w: list[int]) -> tuple[int, int]:
    """Width of the row-label column and of the whole figure."""
    label_w = 0
    if grid.row_labels:
        longest = max((_text_w(ln, "label") for lab in grid.row_labels for ln in _lines(lab)), default=0)
        # The first line is bold (about 10 % wider than the estimate) and needs air before the panels.
        label_w = min(max(int(longest * 1.1) + 16, 60), 240)
    bar_w = 78 if grid.row_colourbars and any(grid.row_colourbars) else 0
    grid_w = label_w + sum(col_w) + GAP * max(len(col_w) - 1, 0) + bar_w
    # Headers are wrapped to their columns; the figure grows for a title only up to a sensible width.
    title_w = max((_text_w(ln, "title") for ln in _lines(grid.title)), default=0)
    return label_w, 2 * MARGIN + max(grid_w, min(title_w, max(grid_w, 900)), 360)


def _grid_geometry(grid: PanelGrid) -> _GridGeometry:
    """Measure a grid: cell sizes, wrapped texts, and the top edge of every band from the title to the footer."""
    col_w, row_h, title_lines = _cell_sizes(grid.rows)
    n_cols = len(col_w)
    label_w, W = _figure_width(grid, col_w)
    title = _wrap(grid.title, W - 2 * MARGIN, "title")
    col_x = [MARGIN + label_w + sum(col_w[:c]) + GAP * c for c in range(n_cols)]
    headers = [_wrap(h, max(col_w[c], 40), "header") if grid.col_headers and c < len(grid.col_headers) else []
               for c, h in enumerate((grid.col_headers or []) + [""] * n_cols)][:n_cols]
    groups = [(first, last, _wrap(text, col_x[last] + col_w[last] - col_x[first], "header"))
              for first, last, text in grid.groups or []]
    y = title_y = MARGIN
    y += len(title) * _line_h("title") + (8 if title else 0)
    group_y = y
    y += max((len(g[2]) for g in groups), default=0) * _line_h("header") + (6 if groups else 0)
    header_y = y
    y += max((len(h) for h in headers), default=0) * _line_h("header") + (4 if any(headers) else 0)
    row_y = []
    for r in range(len(grid.rows)):
        y += title_lines[r] * _line_h("panel") + (2 if title_lines[r] else 0)
        row_y.append(y)
        y += row_h[r] + GAP
    y += 4
    cbar_y = y
    if grid.colourbar:
        y += 14 + 2 * _line_h("small") + 10
    legend_y, legend_rows, legend_cols, legend_cell = y, 0, 1, 0
    if grid.legend and grid.legend.entries:
        legend_cell = max(_text_w(t, "panel") for _, t in grid.legend.entries) + 34
        legend_cols = max(1, min(len(grid.legend.entries), (W - 2 * MARGIN) // legend_cell))
        legend_rows = math.ceil(len(grid.legend.entries) / legend_cols)
        y += (_line_h("panel") if grid.legend.title else 0) + legend_rows * (_line_h("panel") + 2) + 8
    footer = _wrap(grid.footer, W - 2 * MARGIN, "small")
    footer_y = y
    y += len(footer) * _line_h("small")
    return _GridGeometry(int(W), int(y + MARGIN), label_w, col_x, col_w, row_y, row_h, title_lines, title, title_y,
                         groups, group_y, headers, header_y, cbar_y, legend_y, legend_rows, legend_cols, legend_cell,
                         footer, footer_y)


class _Canvas:
    """A matplotlib Figure addressed in output pixels from the top-left corner."""

    def __init__(self, width: int, height: int):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.W, self.H = width, height
        self.fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
        FigureCanvasAgg(self.fig)

    def text(self, px, py, s, kind, **kw):
        self.fig.text(px / self.W, 1 - py / self.H, s, fontsize=_pt(FONT[kind]), va="top", **kw)

    def axes(self, x0, y0, w, h):
        """Axes whose box covers pixels ``[x0, x0 + w) × [y0, y0 + h)``."""
        return self.fig.add_axes((x0 / self.W, 1 - (y0 + h) / self.H, w / self.W, h / self.H))

    def colourbar(self, bar: ColourBar, cax, orientation: str, labelpad: float | None = None):
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        cbar = self.fig.colorbar(ScalarMappable(Normalize(bar.vmin, bar.vmax), bar.cmap), cax=cax,
                                 orientation=orientation)
        cbar.ax.tick_params(labelsize=_pt(FONT["small"]), length=2)
        if bar.label:
            cbar.set_label(bar.label, fontsize=_pt(FONT["small"]), **({} if labelpad is None else {"labelpad": labelpad}))


def _draw_headings(canvas: _Canvas, g: _GridGeometry) -> None:
    """Title, column-group headers with their rule, and column headers."""
    from matplotlib.lines import Line2D

    W, H = canvas.W, canvas.H
    for i, ln in enumerate(g.title):
        canvas.text(MARGIN, g.title_y + i * _line_h("title"), ln, "title", ha="left",
                    weight="bold" if i == 0 else "normal")
    for first, last, lines in g.groups:
        cx = (g.col_x[first] + g.col_x[last] + g.col_w[last]) / 2
        for i, ln in enumerate(lines):
            canvas.text(cx, g.group_y + i * _line_h("header"), ln, "header", ha="center", weight="bold")
        x0, x1 = g.col_x[first] + 2, g.col_x[last] + g.col_w[last] - 2
        yy = 1 - (g.header_y - 3) / H
        canvas.fig.add_artist(Line2D([x0 / W, x1 / W], [yy, yy], transform=canvas.fig.transFigure, color="0.4",
                                     lw=0.8))
    for c, lines in enumerate(g.headers):
        cx = g.col_x[c] + g.col_w[c] / 2
        for i, ln in enumerate(lines):
            canvas.text(cx, g.header_y + i * _line_h("header"), ln, "header", ha="center")


def _draw_panel(canvas: _Canvas, p: Panel, x0: int, y0: int) -> None:
    """One panel 1:1 in its pixel box: the image (or a grey placeholder) and its query markers."""
    from matplotlib.patches import Rectangle

    h, w = p.hw
    ax = canvas.axes(x0, y0, w, h)
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


def _draw_row(canvas: _Canvas, grid: PanelGrid, g: _GridGeometry, r: int, boxes: dict) -> None:
    """Row label, panels with their titles, and the row's colour bar; records each panel's box in ``boxes``."""
    if grid.row_labels and r < len(grid.row_labels):
        lines = _wrap(grid.row_labels[r], g.label_w - 10, "label")
        top = g.row_y[r] + max(0, (g.row_h[r] - len(lines) * _line_h("label")) // 2)
        for i, ln in enumerate(lines):
            canvas.text(MARGIN, top + i * _line_h("label"), ln, "label", ha="left",
                        weight="bold" if i == 0 else "normal")
    for c, p in enumerate(grid.rows[r]):
        if p is None:
            continue
        h, w = p.hw
        x0 = g.col_x[c] + (g.col_w[c] - w) // 2
        y0 = g.row_y[r] + (g.row_h[r] - h) // 2
        for i, ln in enumerate(_lines(p.title)):
            ty = g.row_y[r] - (g.title_lines[r] - i) * _line_h("panel") - 2
            canvas.text(x0 + w / 2, ty, ln, "panel", ha="center")
        _draw_panel(canvas, p, x0, y0)
        boxes[(r, c)] = (x0, y0, x0 + w, y0 + h)
    if grid.row_colourbars and r < len(grid.row_colourbars) and grid.row_colourbars[r]:
        bh = max(20, int(g.row_h[r] * 0.85))
        by = g.row_y[r] + (g.row_h[r] - bh) // 2
        canvas.colourbar(grid.row_colourbars[r], canvas.axes(g.bars_x, by, 10, bh), "vertical")


def _draw_legend(canvas: _Canvas, legend: Legend, g: _GridGeometry) -> None:
    """Colour swatches with their names, ``legend_cols`` to a line."""
    from matplotlib.patches import Rectangle

    W, H = canvas.W, canvas.H
    ly = g.legend_y
    if legend.title:
        canvas.text(MARGIN, ly, legend.title, "panel", ha="left", weight="bold")
        ly += _line_h("panel")
    for i, (rgb, name) in enumerate(legend.entries):
        rr, cc = divmod(i, g.legend_cols)
        sx, sy = MARGIN + cc * g.legend_cell, ly + rr * (_line_h("panel") + 2)
        canvas.fig.add_artist(Rectangle((sx / W, 1 - (sy + 12) / H), 12 / W, 12 / H, transform=canvas.fig.transFigure,
                                        facecolor=np.asarray(rgb, float) / 255.0, edgecolor="0.3", lw=0.5))
        canvas.text(sx + 17, sy - 1, name, "panel", ha="left")


def render_grid(grid: PanelGrid) -> RenderedFigure:
    """Lay out a :class:`PanelGrid` and draw it on a matplotlib Figure (Agg canvas).

    Row heights and column widths are the largest panel in them; a smaller panel is centred in its cell.
    """
    g = _grid_geometry(grid)
    canvas = _Canvas(g.width, g.height)
    _draw_headings(canvas, g)
    boxes: dict = {}
    for r in range(len(grid.rows)):
        _draw_row(canvas, grid, g, r, boxes)
    if grid.colourbar:
        bw = min(g.width - 2 * MARGIN, 420)
        cax = canvas.axes((g.width - bw) // 2, g.cbar_y, bw, 14)
        canvas.colourbar(grid.colourbar, cax, "horizontal", labelpad=2)
    if g.legend_rows:
        _draw_legend(canvas, grid.legend, g)
    for i, ln in enumerate(g.footer):
        canvas.text(MARGIN, g.footer_y + i * _line_h("small"), ln, "small", ha="left", color="0.3")
    return RenderedFigure(canvas.fig, (g.height, g.width), boxes)


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

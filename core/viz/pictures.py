"""What every figure of feature stores, label maps and segmentations shares: options, image choice, row labels.

The figures themselves live by family: :mod:`~posvit_cli.core.viz.pca_figure`, :mod:`~posvit_cli.core.viz.similarity`,
:mod:`~posvit_cli.core.viz.channels`, :mod:`~posvit_cli.core.viz.label_maps` and :mod:`~posvit_cli.core.viz.compare`
(and :mod:`~posvit_cli.core.viz.plots` for charts). Each ``*_figure`` function reads what it needs, draws one figure (rows of images), writes it atomically into an
output folder and returns the :class:`~posvit_cli.core.viz.index.FigureEntry` records to put on the folder's
index page. Every figure carries its numbers: the store's positional probe score in the title, per-image scores
in the row labels, and the statistic of each panel in its title.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.viz.geometry import Footprint, find_source_image, fit_size, load_display_image
from posvit_cli.core.viz.layout import PanelGrid, render_grid, save_figure
from posvit_cli.core.viz.scores import PositionScore

__all__ = [
    "FigureOptions",
    "LazyTokens",
    "SourceImages",
    "StoreGrid",
    "marker_xy",
    "raw_size",
    "require_features",
    "require_images",
    "row_label",
    "score_title",
    "select_images",
    "slug",
    "store_intensity",
    "store_label",
    "write_grid",
]



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


class StoreGrid:
    """One stored image's token grid, read in bands of token rows on demand and never whole.

    The figures' numbers (:mod:`~posvit_cli.core.viz.maps`) take it wherever they take a ``(h, w, C)`` array: a
    huge image (a 625×625×384 grid is 0.6 GB as float32) is then read a band at a time.

    Attributes
    ----------
    shape : (int, int, int)
        ``(h, w, C)`` of the grid.
    """

    def __init__(self, store, index: int, layer: str):
        self.store, self.index, self.layer = store, int(index), layer
        h, w = (int(v) for v in store.record(index).grid)
        first = store.feature_rows(index, layer, 0, min(1, h))
        self.shape = (h, w, int(first.shape[-1]))

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Token rows ``start:stop`` as float32, shape ``(stop - start, w, C)``."""
        return self.store.feature_rows(self.index, self.layer, start, stop, dtype=np.float32)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # Whole-grid reads stay possible for small grids (np.asarray), but the figures read bands.
        return self.store.features(self.index, self.layer, dtype=dtype or np.float32)


class LazyTokens:
    """Token grids of chosen store images, read on demand: a sequence of :class:`StoreGrid` (read in bands)."""

    def __init__(self, store, indices: Sequence[int], layer: str):
        self.store, self.indices, self.layer = store, list(indices), layer

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> StoreGrid:
        return StoreGrid(self.store, self.indices[j], self.layer)


class SourceImages:
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


def store_intensity(store) -> str:
    """The intensity mapping the store's images were read with (``auto`` when not recorded)."""
    return store.intensity


def row_label(record, score: PositionScore | None, fp: Footprint | None = None) -> str:
    """Row label of one image: name, size in pixels and tokens, the region the features cover, its score."""
    H, W = record.orig_size
    lines = [record.name, f"{W}×{H} px · {record.grid[1]}×{record.grid[0]} tokens"]
    if fp is not None and fp.cropped:
        lines.append(f"features cover x {fp.left:.0f}–{fp.right:.0f}, y {fp.top:.0f}–{fp.bottom:.0f} px")
    if score is not None and score.image_text(record.index):
        lines.append(score.image_text(record.index))
    return "\n".join(lines)


def raw_size(fp: Footprint, max_side: int) -> tuple[int, int]:
    """``(h, w)`` in pixels of a raw map: the region the features cover, its longer side capped at ``max_side``."""
    h, w = int(round(fp.height)), int(round(fp.width))
    if max(h, w) > max_side:
        return fit_size(fp.height, fp.width, max_side)
    return max(h, 1), max(w, 1)


def score_title(score: PositionScore | None) -> str:
    """The positional score and where it came from, for a figure title."""
    if score is None:
        return "positional score not computed (--no-score)"
    return f"{score.text()} — {score.source}"


def marker_xy(fp: Footprint, token: tuple[int, int], out_hw: tuple[int, int]) -> tuple[float, float]:
    """Centre of a token in panel pixels (pixel centres at integers)."""
    cx, cy = fp.token_centre(*token)
    return ((cx - fp.left) / fp.width * out_hw[1] - 0.5, (cy - fp.top) / fp.height * out_hw[0] - 0.5)


def write_grid(grid: PanelGrid, path: Path, title: str) -> tuple[int, int]:
    """Render a panel grid and write it atomically as PNG; returns the figure's ``(height, width)`` in pixels."""
    fig = render_grid(grid)
    save_figure(fig.figure, path, ("png",), title=title)
    return fig.size

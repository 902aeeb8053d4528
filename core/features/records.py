"""What a feature store records about each image, and the names it gives layers and grid groups."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.io.images import split_page

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "GridGroup",
    "ImageRecord",
    "canonical_layer_name",
    "grid_group_name",
    "image_stem",
]

SCHEMA_NAME = "posvit-feature-store"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """Where one image's features live and how its tokens map to pixels.

    Attributes
    ----------
    index : int
        Position of the image in the store (0-based, insertion order).
    path : str
        The source path as given to ``extract``.
    orig_size : tuple of int
        ``(height, width)`` of the decoded source image in pixels.
    proc_size : tuple of int
        ``(height, width)`` of the image after resizing, the size the encoder saw (a multiple of the patch size).
    grid : tuple of int
        ``(h, w)`` token grid.
    group : str
        Name of the group whose arrays hold this image (``"{h}x{w}"``).
    row : int
        Row of this image in its group's arrays.
    meta : dict
        Extra per-image metadata (tile layout, transform, ...).
    """

    index: int
    path: str
    orig_size: tuple[int, int]
    proc_size: tuple[int, int]
    grid: tuple[int, int]
    group: str
    row: int
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file stem of the source path, used to match masks and labels to images."""
        return image_stem(self.path)


@dataclasses.dataclass(frozen=True)
class GridGroup:
    """All images of one token-grid size: their store indices and grid ``(h, w)``."""

    name: str
    grid: tuple[int, int]
    indices: np.ndarray



def image_stem(path: str) -> str:
    """The file stem of an image path (``a/b/cell.ome.tif`` → ``cell``), used to match masks to images.

    A page of a multi-page TIFF (``stack.tif#page=2``) is ``stack_page2``, so pages do not share a name.
    """
    file, page = split_page(path)
    if page is not None:
        return f"{image_stem(str(file))}_page{page}"
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def grid_group_name(grid: tuple[int, int]) -> str:
    """The name of the group holding images of token grid ``(h, w)``: ``"{h}x{w}"``."""
    return f"{int(grid[0])}x{int(grid[1])}"


def canonical_layer_name(layer: str | int) -> str:
    """Return the stored name of a layer: ``"final"`` or ``"block{i}"``."""
    s = str(layer).strip()
    if s in ("final", "-1", "last"):
        return "final"
    if s.startswith("block") and s[5:].isdigit():
        return s
    if s.isdigit():
        return f"block{int(s)}"
    raise PosvitError(f"unknown layer '{layer}': use 'final' or a block index such as 'block6' or 6")

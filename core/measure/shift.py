"""Crop-shift correspondence: a label-free positional diagnostic that needs only images and the encoder.

For each image, two views offset by a known whole-patch shift ``(dy, dx)`` are encoded, and every token of view A
that has a counterpart in view B is matched to its cosine nearest neighbour among *all* tokens of B. A
position-free encoder follows the content: the neighbour is the token that saw the same pixels (A's position
minus the shift). An encoder whose tokens carry a dominant absolute-position code follows the grid: the neighbour
sits at the same grid position in B.

Views (``mode``):

``crop``
    Two crops of the same size from the preprocessed image, B's origin ``(dy, dx)`` patches below and right of
    A's. The crops are ``(h - |dy|) × (w - |dx|)`` tokens (the largest that fit) and overlap in
    ``(h - 2|dy|) × (w - 2|dx|)`` tokens.
``roll``
    The whole image and its torus roll by ``(-dy, -dx)`` patches, so view B at position ``q`` shows A's content at
    ``q + (dy, dx)`` (wrapping). Every token has a counterpart. A roll-equivariant encoder (2-D ALiBi on a torus,
    NoPE) matches every token at the content offset exactly.

Categories of a matched token (the per-token maps): :data:`CONTENT` (the neighbour is the content-correct token),
:data:`ABSOLUTE` (the neighbour sits at the query's own grid position), :data:`OTHER`, and :data:`OUTSIDE` for
tokens of A without a counterpart in B (not scored).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import json_text, read_tagged_json, tagged_header, write_text_atomic
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "ABSOLUTE",
    "CATEGORY_NAMES",
    "CONTENT",
    "DEFAULT_SHIFT",
    "MODES",
    "OTHER",
    "OUTSIDE",
    "SHIFT_SCHEMA",
    "SHIFT_SCHEMA_VERSION",
    "ShiftMatch",
    "ShiftViews",
    "encode_views",
    "match_tokens",
    "nearest_neighbours",
    "parse_shift",
    "prepare_image",
    "read_shift_result",
    "shift_correspondence",
    "shift_result_json",
    "shift_views",
    "image_matches",
    "summarise",
    "view_pair",
    "write_shift_result",
]

SHIFT_SCHEMA = "posvit-shift-correspondence"
SHIFT_SCHEMA_VERSION = 1
MODES = ("crop", "roll")
DEFAULT_SHIFT = (2, 3)
CONTENT, ABSOLUTE, OTHER, OUTSIDE = 0, 1, 2, -1
CATEGORY_NAMES = {CONTENT: "content", ABSOLUTE: "absolute", OTHER: "other", OUTSIDE: "outside"}
#: Similarities held at once when matching: query chunk × all reference tokens (float32, 16 MB).
MATCH_BLOCK = 1 << 22


def parse_shift(spec: str | Sequence[int]) -> tuple[int, int]:
    """``"2,3"`` (or ``(2, 3)``) → ``(2, 3)``: a shift of whole patches, rows then columns.

    Raises
    ------
    PosvitError
        For anything but two integers, or the zero shift (content and grid position would coincide).
    """
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.replace(" ", "").split(",")]
        try:
            dy, dx = (int(p) for p in parts)
        except ValueError:
            raise PosvitError(f"--shift '{spec}' is not DY,DX: two whole numbers of patches, e.g. 2,3") from None
    else:
        dy, dx = (int(v) for v in spec)
    if dy == 0 and dx == 0:
        raise PosvitError("--shift 0,0 does not move the content: content and grid position would be the same")
    return dy, dx


@dataclasses.dataclass(frozen=True)
class ShiftViews:
    """Where the two views of one shift lie on an image's token grid (all in tokens).

    Attributes
    ----------
    shift : (int, int)
        ``(dy, dx)``.
    mode : {"crop", "roll"}
    origin_a, origin_b : (int, int)
        Top-left token of each view on the image grid (``(0, 0)`` for both in roll mode).
    view_hw : (int, int)
        Token grid of each view.
    """

    shift: tuple[int, int]
    mode: str
    origin_a: tuple[int, int]
    origin_b: tuple[int, int]
    view_hw: tuple[int, int]

    def overlap_mask(self) -> np.ndarray:
        """``(h, w)`` bool on view A: the tokens whose content view B also shows."""
        h, w = self.view_hw
        mask = np.zeros((h, w), dtype=bool)
        if self.mode == "roll":
            mask[:] = True
            return mask
        dy, dx = self.shift
        mask[max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)] = True
        return mask


def shift_views(grid_hw: tuple[int, int], shift: tuple[int, int], mode: str) -> ShiftViews:
    """The two views of ``shift`` on an image of ``grid_hw`` tokens.

    Raises
    ------
    PosvitError
        For an unknown mode, a roll by whole grid periods (no move), or a crop shift that leaves no overlap.
    """
    if mode not in MODES:
        raise PosvitError(f"unknown mode '{mode}': use {' or '.join(MODES)}")
    gh, gw = (int(v) for v in grid_hw)
    dy, dx = shift
    if mode == "roll":
        if dy % gh == 0 and dx % gw == 0:
            raise PosvitError(f"--shift {dy},{dx} rolls the {gh}×{gw}-token grid onto itself: content and grid "
                              "position coincide; use a shift that is not a multiple of the grid")
        return ShiftViews((dy, dx), mode, (0, 0), (0, 0), (gh, gw))
    if gh <= 2 * abs(dy) or gw <= 2 * abs(dx):
        raise PosvitError(
            f"--shift {dy},{dx} leaves no overlap between two crops of a {gh}×{gw}-token image: the crops are "
            f"{max(0, gh - abs(dy))}×{max(0, gw - abs(dx))} tokens; use |DY| < {(gh + 1) // 2} and "
            f"|DX| < {(gw + 1) // 2}, or a larger --size"
        )
    origin_a = (max(0, -dy), max(0, -dx))
    origin_b = (origin_a[0] + dy, origin_a[1] + dx)
    return ShiftViews((dy, dx), mode, origin_a, origin_b, (gh - abs(dy), gw - abs(dx)))


def nearest_neighbours(queries, references, *, block: int = MATCH_BLOCK):
    """Index of each query's cosine nearest neighbour among all references, in bounded memory.

    Parameters
    ----------
    queries : array-like, shape (N, C)
    references : array-like, shape (M, C)
    block : int
        Most similarities held at once; the queries go through in chunks of ``block // M`` rows.

    Returns
    -------
    ndarray of int64, shape (N,)
        Row of ``references`` of highest cosine similarity (the first on ties).
    """
    import torch
    import torch.nn.functional as F

    q, r = (t.float() if torch.is_tensor(t) else torch.as_tensor(np.asarray(t, dtype=np.float32))
            for t in (queries, references))
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise PosvitError(f"cannot match tokens of shapes {tuple(q.shape)} and {tuple(r.shape)}: (N, C) and (M, C)")
    r = F.normalize(r.to(q.device), dim=1)
    step = max(1, block // max(1, r.shape[0]))
    out = []
    for start in range(0, q.shape[0], step):
        sims = F.normalize(q[start: start + step], dim=1) @ r.T
        out.append(sims.argmax(dim=1).cpu())
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, dtype=np.int64)


@dataclasses.dataclass
class ShiftMatch:
    """The matches of one shift on one image.

    Attributes
    ----------
    views : ShiftViews
    categories : ndarray of int8, shape (h, w)
        Per token of view A: :data:`CONTENT`, :data:`ABSOLUTE`, :data:`OTHER` or :data:`OUTSIDE`.
    displacement : ndarray of float64, shape (h, w)
        Euclidean distance in tokens from each neighbour to the content-correct token (on the torus in roll
        mode); NaN outside the overlap.
    """

    views: ShiftViews
    categories: np.ndarray
    displacement: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int((self.categories != OUTSIDE).sum())

    def fraction(self, category: int) -> float:
        return float((self.categories == category).sum() / max(1, self.n_tokens))

    def summary(self) -> dict:
        """Fractions, mean displacement error and the chance level (one uniform guess among view B's tokens)."""
        h, w = self.views.view_hw
        return {
            "shift": list(self.views.shift),
            "origin_a": list(self.views.origin_a),
            "origin_b": list(self.views.origin_b),
            "view_grid": [h, w],
            "overlap_tokens": self.n_tokens,
            "fraction_content": self.fraction(CONTENT),
            "fraction_absolute": self.fraction(ABSOLUTE),
            "fraction_other": self.fraction(OTHER),
            "displacement_error": float(np.nanmean(self.displacement)) if self.n_tokens else None,
            "chance": 1.0 / (h * w),
        }


def match_tokens(tokens_a, tokens_b, views: ShiftViews, *, block: int = MATCH_BLOCK) -> ShiftMatch:
    """Match every overlap token of view A to its cosine nearest neighbour in view B and classify it.

    Parameters
    ----------
    tokens_a, tokens_b : array-like, shape (h, w, C)
        Token grids of the two views (``views.view_hw``).
    views : ShiftViews
        The geometry: A's token at ``p`` shows the content of B's token at ``p - shift`` (modulo the grid in roll
        mode).

    Returns
    -------
    ShiftMatch
    """
    import torch

    h, w = views.view_hw
    # Tensors stay where they are (a GPU matches its own tokens); arrays become CPU tensors.
    ta, tb = (t if torch.is_tensor(t) else torch.as_tensor(np.asarray(t)) for t in (tokens_a, tokens_b))
    if tuple(ta.shape[:2]) != (h, w) or tuple(tb.shape[:2]) != (h, w):
        raise PosvitError(f"token grids {tuple(ta.shape[:2])} and {tuple(tb.shape[:2])} are not the {h}×{w} views")
    rows, cols = np.nonzero(views.overlap_mask())
    flat_a = ta.reshape(h * w, -1)[torch.as_tensor(rows * w + cols, device=ta.device)]
    nn = nearest_neighbours(flat_a, tb.reshape(h * w, -1), block=block)
    nr, nc = nn // w, nn % w
    dy, dx = views.shift
    cr, cc = rows - dy, cols - dx
    if views.mode == "roll":
        cr, cc = cr % h, cc % w
        er = np.abs(nr - cr)
        ec = np.abs(nc - cc)
        er, ec = np.minimum(er, h - er), np.minimum(ec, w - ec)
    else:
        er, ec = nr - cr, nc - cc
    cat = np.where((nr == cr) & (nc == cc), CONTENT, np.where((nr == rows) & (nc == cols), ABSOLUTE, OTHER))
    categories = np.full((h, w), OUTSIDE, dtype=np.int8)
    categories[rows, cols] = cat
    displacement = np.full((h, w), np.nan)
    displacement[rows, cols] = np.hypot(er, ec)
    return ShiftMatch(views, categories, displacement)


# --------------------------------------------------------------------------------------------------------------
# Images through the encoder


def prepare_image(path: str | os.PathLike, encoder, size, intensity: str = "auto", max_side: int = 2048):
    """Read and preprocess one image as extraction does: ``(tensor (C, H, W) normalised, orig_hw)``.

    Raises
    ------
    PosvitError
        Naming the image when it cannot be read or is larger than ``max_side`` after resizing.
    """
    from posvit_cli.core.io.images import image_size, read_image, to_channels, to_float
    from posvit_cli.core.io.preprocess import plan_resize, resize_and_normalise

    orig = image_size(path)
    resize_hw, crop = plan_resize(orig, size, encoder.patch_size)
    proc = crop or resize_hw
    if max(proc) > max_side:
        raise PosvitError(f"'{path}': {proc[0]}×{proc[1]} px after --size {size} exceeds --max-side {max_side}; "
                          "resize it (--size short:N)")
    raw = read_image(path)
    img = to_channels(to_float(raw, intensity), encoder.in_chans)
    tensor, _ = resize_and_normalise(img, size, encoder.patch_size, encoder.mean, encoder.std)
    return tensor, (int(raw.shape[0]), int(raw.shape[1]))


def view_pair(image, views: ShiftViews, patch: int):
    """The two views of a preprocessed image ``(C, H, W)`` as one batch ``(2, C, h·patch, w·patch)``."""
    import torch

    if views.mode == "roll":
        dy, dx = views.shift
        return torch.stack([image, torch.roll(image, shifts=(-dy * patch, -dx * patch), dims=(1, 2))])
    h, w = views.view_hw
    out = []
    for y, x in (views.origin_a, views.origin_b):
        out.append(image[:, y * patch: (y + h) * patch, x * patch: (x + w) * patch])
    return torch.stack(out)


def image_matches(encoder, image, shifts: Sequence[tuple[int, int]], mode: str, layer: str, *, device="cpu",
                  precision: str = "fp32") -> list[ShiftMatch]:
    """Encode both views of every shift of one preprocessed image and match them (one forward per shift)."""
    grid = encoder.grid(int(image.shape[-2]), int(image.shape[-1]))
    out = []
    for shift in shifts:
        views = shift_views(grid, shift, mode)
        t = encode_views(encoder, image, views, layer, device=device, precision=precision)
        out.append(match_tokens(t[0], t[1], views))
    return out


def encode_views(encoder, image, views: ShiftViews, layer: str, *, device="cpu", precision: str = "fp32"):
    """Tokens of both views of a preprocessed image ``(C, H, W)``: float32 tensor ``(2, h, w, C)`` on ``device``
    (one forward of the pair)."""
    import torch

    from posvit_cli.core.device import autocast

    dev = torch.device(device)
    batch = view_pair(image, views, encoder.patch_size).to(dev)
    with torch.inference_mode(), autocast(dev, precision):
        tokens, _ = encoder.forward_tokens(batch, [layer])
    return tokens[layer].float()


def _mean_std(values: list) -> dict:
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    if not np.isfinite(vals).any():
        return {"mean": None, "std": None}
    return {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals))}


def summarise(images: list[dict], shifts: Sequence[tuple[int, int]]) -> list[dict]:
    """Per shift: mean ± std over images of the fractions and the displacement error, and the total tokens."""
    out = []
    for j, shift in enumerate(shifts):
        rows = [im["shifts"][j] for im in images]
        out.append({
            "shift": list(shift),
            "n_images": len(rows),
            "overlap_tokens": int(sum(r["overlap_tokens"] for r in rows)),
            **{k: _mean_std([r[k] for r in rows])
               for k in ("fraction_content", "fraction_absolute", "fraction_other", "displacement_error", "chance")},
        })
    return out


def shift_correspondence(
    encoder,
    paths: Sequence[str | os.PathLike],
    *,
    shifts: Sequence[tuple[int, int]] = (DEFAULT_SHIFT,),
    mode: str = "crop",
    size=None,
    intensity: str = "auto",
    layer: str = "final",
    device="cpu",
    precision: str = "fp32",
    max_side: int = 2048,
    progress: ProgressCallback | None = None,
) -> dict:
    """Crop-shift correspondence of ``encoder`` on images: the result document (see ``docs/commands/probe.md``).

    Parameters
    ----------
    encoder : Encoder
        On ``device`` already.
    paths : sequence of path
        Images (any format :func:`~posvit_cli.core.io.images.read_image` reads).
    shifts : sequence of (int, int)
        Shifts ``(dy, dx)`` in whole patches.
    mode : {"crop", "roll"}
    size : ResizeMode, optional
        Resize rule (default ``native``).
    layer : str
        Canonical layer name (:meth:`Encoder.layer_names`).

    Returns
    -------
    dict
        Tagged document: ``settings``, ``summary`` (one block per shift: mean ± std over images of
        ``fraction_content``, ``fraction_absolute``, ``fraction_other``, ``displacement_error`` in tokens and the
        ``chance`` level) and ``images`` (per image and shift: the same numbers and the category ``map``,
        ``view_grid`` rows of :data:`CONTENT` 0 / :data:`ABSOLUTE` 1 / :data:`OTHER` 2 / :data:`OUTSIDE` -1).

    Raises
    ------
    PosvitError
        For no images, an unreadable image (named), or a shift that does not fit an image.
    """
    from posvit_cli.core.io.preprocess import parse_size

    size = size or parse_size("native")
    shifts = [parse_shift(s) for s in shifts]
    if not shifts:
        raise PosvitError("give at least one --shift")
    if not paths:
        raise PosvitError("no images to measure")
    run = report(progress)
    images = []
    for i, path in enumerate(paths):
        tensor, orig = prepare_image(path, encoder, size, intensity, max_side)
        grid = encoder.grid(int(tensor.shape[-2]), int(tensor.shape[-1]))
        try:
            matches = image_matches(encoder, tensor, shifts, mode, layer, device=device, precision=precision)
        except PosvitError as exc:
            raise PosvitError(f"'{path}' ({grid[0]}×{grid[1]} tokens): {exc}") from None
        images.append({
            "path": str(path), "name": Path(path).name, "orig_size": list(orig),
            "proc_size": [int(tensor.shape[-2]), int(tensor.shape[-1])], "grid": list(grid),
            "shifts": [{**m.summary(), "map": m.categories.tolist()} for m in matches],
        })
        run("shift correspondence", i + 1, len(paths))
    return {
        **tagged_header(SHIFT_SCHEMA, SHIFT_SCHEMA_VERSION),
        "model": encoder.provenance(),
        "layer": layer,
        "settings": {"mode": mode, "shifts": [list(s) for s in shifts], "size": str(size), "intensity": intensity,
                     "precision": precision, "categories": {str(k): v for k, v in CATEGORY_NAMES.items()}},
        "summary": summarise(images, shifts),
        "images": images,
    }


# --------------------------------------------------------------------------------------------------------------
# Documents


def shift_result_json(result: dict) -> str:
    """The result document as strict JSON text (NaN written as null)."""
    return json_text(result, indent=1)


def write_shift_result(path: str | os.PathLike, result: dict) -> Path:
    """Write a crop-shift result as JSON, atomically. Returns the path."""
    return write_text_atomic(path, shift_result_json(result) + "\n")


def read_shift_result(path: str | os.PathLike) -> dict:
    """Read a result of :func:`write_shift_result` (``posvit probe shift -o``).

    Raises
    ------
    PosvitError
        If the file is missing, not JSON, or not a crop-shift result of a readable schema version.
    """
    return read_tagged_json(path, SHIFT_SCHEMA, SHIFT_SCHEMA_VERSION, "crop-shift result",
                            hint=f"write one with `posvit probe shift IMAGES -o {Path(path).name}`")

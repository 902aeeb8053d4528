"""Feature extraction: images → encoder → feature store, batched, prefetched and (for huge images) tiled.

Decoding and resizing run in a small thread pool ahead of the model; same-sized images are batched; every batch
is committed to the store, so an interrupted run resumes after the last batch. Images larger than ``tile`` are cut
into overlapping tiles whose token grids are blended (linear ramps across the overlap) and written to the store
in row bands, so memory depends on the image width and tile size, not on the image area. With
``tile_shifts`` N > 1, N tile grids offset along the diagonal by k/N of the tile step are blended together, so the
encoder's per-tile positional pattern is averaged over N phases instead of repeating once per tile. With
``tile_blend="centre"`` every tile is weighted by a smooth window over the whole tile (a floored Hann window), so
each token is taken mostly from the tiles it lies nearest the centre of, away from the tile edges.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.features.backends import split_store_suffix
from posvit_cli.core.io.images import image_size, parse_intensity, read_image, to_channels, to_float
from posvit_cli.core.io.preprocess import (ResizeMode, check_patch_multiple, parse_size, plan_resize,
                                             resize_and_normalise, suggested_tile)
from posvit_cli.core.progress import ProgressCallback, no_progress, report

__all__ = ["ExtractOptions", "ExtractSummary", "extract_images", "shard_paths", "tile_starts", "blend_ramp",
           "centre_window", "tile_weights", "TILE_BLENDS", "shift_offsets", "shifted_tile_starts", "variant_path"]

#: Blend weights of tiled extraction: ``linear`` ramps across the overlaps (weight 1 elsewhere), or a ``centre``
#: window over the whole tile (:func:`centre_window`).
TILE_BLENDS = ("linear", "centre")

#: The least weight of :func:`centre_window`, relative to the tile centre's: tokens at the image border are covered
#: by edge tokens only, which must keep a weight.
CENTRE_FLOOR = 1e-3


@dataclasses.dataclass
class ExtractOptions:
    """How to extract.

    Attributes
    ----------
    layers : list of str
        Canonical layer names (:meth:`Encoder.layer_names`).
    size : ResizeMode
        Resize rule (see :mod:`posvit_cli.core.io.preprocess`).
    intensity : str
        Intensity rule for :func:`posvit_cli.core.io.images.to_float`.
    keep_prefix : bool
        Store CLS/register tokens too.
    batch_size : int
        Images (or tiles) per forward pass.
    precision : {"fp32", "bf16"}
    tile, overlap : int or None, int
        Tile side and overlap in pixels (multiples of the patch size); images whose processed side exceeds
        ``tile`` are tiled. ``None`` disables tiling.
    tile_shifts : int
        Tile grids blended per tiled image (1: one grid). Grid k (0 ≤ k < N) is offset by k/N of the tile step
        along both axes (rounded to patches), which averages the encoder's positional pattern over N phases at N
        times the cost.
    tile_blend : {"linear", "centre"}
        Blend weights of the tiles: linear ramps across the overlap (1 elsewhere), or a Hann window over the
        whole tile (:func:`centre_window`) that takes each token mostly from the tiles it is nearest the centre of.
    max_side : int
        Refuse (skip) untiled images whose processed longer side exceeds this many pixels.
    workers : int
        Decoding threads.
    strict : bool
        Fail on the first unreadable image instead of skipping it.
    postprocess : callable or None
        ``fn(layer, tokens (B, h, w, C) tensor) -> tensor`` applied before writing (a debiasing head).
    image_transform : object or None
        A transform with ``apply(tensor (B, C, H, W))`` and ``invert_tokens(tensor (B, h, w, C))`` (robustness
        tests): features of the transformed image are mapped back to the original frame.
    compile : bool
        Run the encoder through ``torch.compile`` (:class:`~posvit_cli.core.features.compiled.CompiledForward`:
        one static-shape graph per input shape, each checked against eager on its first batch; eager on failure).
    """

    layers: list[str]
    size: ResizeMode = dataclasses.field(default_factory=lambda: parse_size("native"))
    intensity: str = "auto"
    keep_prefix: bool = False
    batch_size: int = 8
    precision: str = "fp32"
    tile: int | None = None
    overlap: int = 0
    tile_shifts: int = 1
    tile_blend: str = "linear"
    max_side: int = 2048
    workers: int = 2
    strict: bool = False
    postprocess: Callable[[str, Any], Any] | None = None
    image_transform: Any = None
    compile: bool = False


@dataclasses.dataclass
class ExtractSummary:
    """What an extraction did: counts, skipped images with reasons, and speed."""

    requested: int = 0
    written: int = 0
    already_done: int = 0
    tiled: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        d["images_per_second"] = round(self.images_per_second, 3)
        return d


def shard_paths(paths: Sequence[Path], shard: str | None) -> list[Path]:
    """Select shard ``i/n`` of a path list: every n-th image starting at i (0-based).

    Raises
    ------
    PosvitError
        If ``shard`` is not of the form ``i/n`` with ``0 <= i < n``.
    """
    if not shard:
        return list(paths)
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise PosvitError(f"shard '{shard}': write i/n, e.g. 0/4 for the first of four shards") from None
    if not (n >= 1 and 0 <= i < n):
        raise PosvitError(f"shard '{shard}': need 0 <= i < n")
    return list(paths)[i::n]


def variant_path(path: str | os.PathLike, labels: Sequence[str]) -> str:
    """The store of one variant of an extraction (a size of a sweep, a transform): labels go before the suffix.

    ``variant_path("feats.h5", ["448"])`` → ``feats.448.h5``; ``("v.zarr.zip", ["224", "rot90"])`` →
    ``v.224.rot90.zarr.zip``. A path without a store suffix gets the labels appended.
    """
    base, suffix = split_store_suffix(path)
    return ".".join([base, *labels]) + suffix


# --------------------------------------------------------------------------------------------------------------
# Tiling geometry


def tile_starts(length: int, tile: int, overlap: int, patch: int) -> list[int]:
    """Start offsets (pixels) of tiles of ``tile`` px covering ``length`` px with at least ``overlap`` px overlap.

    Starts are patch-aligned; the last tile ends exactly at ``length`` (itself a patch multiple).
    """
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    last = length - tile
    if starts[-1] != last:
        starts.append(last)
    return [s - s % patch for s in starts[:-1]] + [last]


def shift_offsets(tile: int, overlap: int, patch: int, shifts: int) -> list[int]:
    """Offsets (pixels) of ``shifts`` tile grids: k/N of the step ``tile - overlap``, rounded down to patches.

    Raises
    ------
    PosvitError
        If the step has fewer patches than ``shifts`` (two grids would coincide).
    """
    step_tokens = (tile - overlap) // patch
    if shifts < 1 or step_tokens < shifts:
        raise PosvitError(f"--tile-shifts {shifts} needs a tile step (--tile {tile} - --overlap {overlap}) of at "
                          f"least {shifts} patches of {patch} px; use fewer shifts or a larger tile")
    return [(k * step_tokens // shifts) * patch for k in range(shifts)]


def shifted_tile_starts(length: int, tile: int, overlap: int, patch: int, offset: int) -> list[int]:
    """Tile starts (pixels) of the grid offset by ``offset`` px: ``0``, then every step from ``offset``, then the
    start of the tile that ends at ``length``. ``offset`` 0 is :func:`tile_starts`.

    Every tile keeps the full ``tile`` size (a shorter tile would carry a rescaled positional pattern), so the
    first tile starts at 0 and overlaps the second by more than ``overlap``; near the image borders the shifted
    grids therefore coincide with the plain one.
    """
    if offset == 0 or length <= tile:
        return tile_starts(length, tile, overlap, patch)
    return sorted({0, *range(offset, length - tile, tile - overlap), length - tile})


def blend_ramp(n: int, start: int, total: int, overlap_tokens: int) -> np.ndarray:
    """Blending weights along one axis of a tile: a linear ramp over the overlap, 1 inside and at image borders.

    Parameters
    ----------
    n : int
        Tile length in tokens.
    start : int
        Tile start in tokens.
    total : int
        Image length in tokens.
    overlap_tokens : int
        Overlap in tokens.
    """
    w = np.ones(n, dtype=np.float32)
    if overlap_tokens <= 0:
        return w
    ramp = (np.arange(overlap_tokens, dtype=np.float32) + 0.5) / overlap_tokens
    k = min(overlap_tokens, n)
    if start > 0:
        w[:k] = np.minimum(w[:k], ramp[:k])
    if start + n < total:
        w[n - k :] = np.minimum(w[n - k :], ramp[:k][::-1])
    return w


def centre_window(n: int) -> np.ndarray:
    """Blending weights along one axis of a tile that favour its centre: a Hann window over the whole tile.

    ``w[i] = max(sin²(π (i + ½) / n), CENTRE_FLOOR)``: symmetric, largest at the centre, sampled at token centres
    so no token has weight 0, and floored so that a token at the image border, covered only by tile edges, is
    still covered. The same at image borders and inside the image: the accumulated weights are normalised per
    token, so where one tile alone covers a token its weight cancels.

    Parameters
    ----------
    n : int
        Tile length in tokens.

    Returns
    -------
    ndarray of float32, shape (n,)
    """
    w = np.sin(np.pi * (np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)) ** 2
    return np.maximum(w, CENTRE_FLOOR).astype(np.float32)


def tile_weights(n: int, start: int, total: int, overlap_tokens: int, blend: str = "linear") -> np.ndarray:
    """Blending weights (tokens) along one axis of a tile: :func:`blend_ramp` or :func:`centre_window`."""
    if blend == "centre":
        return centre_window(n)
    return blend_ramp(n, start, total, overlap_tokens)


# --------------------------------------------------------------------------------------------------------------
# Decoding ahead of the model


@dataclasses.dataclass
class _Prepared:
    path: str
    orig_size: tuple[int, int]
    proc_size: tuple[int, int] = (0, 0)
    tensor: Any = None  # (C, H, W) normalised, for untiled images
    raw: np.ndarray | None = None  # decoded image, for tiled images
    error: str | None = None


def _prefetch(fn: Callable, items: Iterable, workers: int, window: int) -> Iterator:
    """Map ``fn`` over ``items`` in a thread pool, yielding results in order, at most ``window`` ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="posvit-decode") as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield fut.result()


def _prepare(path: Path, encoder, opts: ExtractOptions) -> _Prepared:
    p = str(path)
    try:
        # The size comes from the header: an image refused for its size is never decoded (a 1 MB compressed
        # TIFF can declare 30000×30000 px).
        orig = image_size(path)
        patch = encoder.patch_size
        resize_hw, crop = plan_resize(orig, opts.size, patch)
        proc = crop or resize_hw
        tiled = bool(opts.tile and max(proc) > opts.tile)
        if not tiled and max(proc) > opts.max_side:
            after = f" ({proc[0]}×{proc[1]} px after --size {opts.size})" if proc != orig else ""
            return _Prepared(
                p, orig, proc,
                error=f"{orig[0]}×{orig[1]} px{after} exceeds --max-side {opts.max_side} (not decoded); tile it "
                f"(--tile {suggested_tile(patch)}) or resize (--size short:N)",
            )
        raw = read_image(path)
        orig = (int(raw.shape[0]), int(raw.shape[1]))
        if tiled:
            if opts.size.kind != "native":
                img = to_channels(to_float(raw, opts.intensity), _own_channels(raw))
                t, proc = resize_and_normalise(img, opts.size, patch, (0.0,) * img.shape[-1], (1.0,) * img.shape[-1])
                raw = t.permute(1, 2, 0).numpy()
            return _Prepared(p, orig, proc, raw=raw)
        img = to_channels(to_float(raw, opts.intensity), encoder.in_chans)
        tensor, proc = resize_and_normalise(img, opts.size, patch, encoder.mean, encoder.std)
        return _Prepared(p, orig, proc, tensor=tensor)
    except PosvitError as exc:
        return _Prepared(p, (0, 0), error=str(exc))
    except Exception as exc:  # a decoder bug on one file must not stop a 10k-image run
        return _Prepared(p, (0, 0), error=f"{type(exc).__name__}: {exc}")


def _own_channels(raw: np.ndarray) -> int:
    return 1 if raw.ndim == 2 or raw.shape[-1] in (1, 2) else 3


# --------------------------------------------------------------------------------------------------------------
# The engine


#: The progress task counting tiles of all tiled images so far (its total grows as each tiled image starts).
TILES_TASK = "extract tiles"


class _Band:
    """Weighted sums of tile tokens for the token rows not yet written (a band of the image's token grid)."""

    def __init__(self, layers: Sequence[str], width: int, channels: int):
        self.layers, self.width, self.channels = list(layers), width, channels
        self.acc = {layer: np.zeros((0, width, channels), np.float32) for layer in self.layers}
        self.wsum = np.zeros((0, width), np.float32)
        self.start = 0  # token row of acc[0]

    def grow_to(self, end: int) -> None:
        """Make room for token rows up to ``end`` (exclusive)."""
        grow = end - self.start - self.wsum.shape[0]
        if grow > 0:
            for layer in self.layers:
                self.acc[layer] = np.concatenate([self.acc[layer], np.zeros((grow, self.width, self.channels),
                                                                             np.float32)])
            self.wsum = np.concatenate([self.wsum, np.zeros((grow, self.width), np.float32)])

    def add(self, tokens: dict, row: int, col: int, weights: np.ndarray) -> None:
        """Add one tile's tokens (layer -> (h, w, C)) at token (row, col) times ``weights`` (h, w)."""
        r0 = row - self.start
        h, w = weights.shape
        for layer in self.layers:
            self.acc[layer][r0 : r0 + h, col : col + w] += tokens[layer] * weights[..., None]
        self.wsum[r0 : r0 + h, col : col + w] += weights

    def pop_finished(self, done_to: int) -> list[tuple[str, int, np.ndarray]]:
        """Normalise and remove the rows above ``done_to``: (layer, first row, rows (n, w, C)) per layer."""
        n_done = done_to - self.start
        if n_done <= 0:
            return []
        w = np.maximum(self.wsum[:n_done], 1e-12)[..., None]
        out = [(layer, self.start, self.acc[layer][:n_done] / w) for layer in self.layers]
        for layer in self.layers:
            self.acc[layer] = self.acc[layer][n_done:]
        self.wsum = self.wsum[n_done:]
        self.start = done_to
        return out


class _Runner:
    """Runs batches through the encoder and writes results to the store."""

    def __init__(self, encoder, writer, opts: ExtractOptions, device, progress: ProgressCallback = no_progress):
        import torch

        from posvit_cli.core.device import autocast

        self.torch = torch
        self.encoder, self.writer, self.opts, self.device = encoder, writer, opts, device
        self.autocast = lambda: autocast(device, opts.precision)
        self.compiled = None
        # Looked up when a batch runs, not here: a run refused before any forward needs no forward at all.
        self.forward_tokens = lambda *args, **kw: encoder.forward_tokens(*args, **kw)
        if opts.compile:
            from posvit_cli.core.features.compiled import compiled_forward

            self.compiled = self.forward_tokens = compiled_forward(encoder)
        # One huge image is one unit of the "extract" task: tiles are counted apart, so a 17-minute image has an eta.
        self.progress = progress
        self.tiles_done = 0
        self.tiles_total = 0

    def forward(self, batch):
        """Tokens for a (B, C, H, W) CPU tensor: dict layer -> float32 ndarray (B, h, w, C), prefix dict or None."""
        torch = self.torch
        x = batch.to(self.device, non_blocking=True)
        tf = self.opts.image_transform
        if tf is not None:
            x = tf.apply(x)
        with torch.inference_mode(), self.autocast():
            tokens, prefix = self.forward_tokens(x, self.opts.layers, keep_prefix=self.opts.keep_prefix)
        out = {}
        for layer, t in tokens.items():
            t = t.float()
            if tf is not None:
                t = tf.invert_tokens(t)
            if self.opts.postprocess is not None:
                with torch.inference_mode():
                    t = self.opts.postprocess(layer, t)
            out[layer] = t.cpu().numpy()
        pre = {k: v.float().cpu().numpy() for k, v in prefix.items()} if prefix else None
        return out, pre

    def run_batch(self, items: list[_Prepared]) -> None:
        batch = self.torch.stack([it.tensor for it in items])
        tokens, prefix = self.forward(batch)
        for i, it in enumerate(items):
            self.writer.add(
                it.path,
                {layer: tokens[layer][i] for layer in self.opts.layers},
                orig_size=it.orig_size,
                proc_size=it.proc_size,
                prefix={layer: prefix[layer][i] for layer in self.opts.layers} if prefix else None,
            )
        self.writer.commit()

    def run_tiled(self, it: _Prepared) -> None:
        """Extract one large image tile by tile, blending tokens and writing finished row bands.

        With ``tile_shifts`` N > 1 the tile rows of all N grids are run in order of their start, into one
        accumulator: every tile adds its tokens times its blend weights, so each token ends as the weighted mean
        over all the tiles (of all grids) that cover it.
        """
        enc, opts = self.encoder, self.opts
        patch = enc.patch_size
        H, W = it.proc_size
        # native mode tiles the decoded image directly; the remainder beyond the last patch multiple is cropped.
        raw = it.raw[:H, :W]
        resized = raw.dtype == np.float32 and opts.size.kind != "native"
        scale = None if resized else _global_intensity(raw, opts.intensity)
        tile = opts.tile - opts.tile % patch
        overlap = opts.overlap - opts.overlap % patch
        offsets = shift_offsets(tile, overlap, patch, opts.tile_shifts) if opts.tile_shifts > 1 else [0]
        grids = [(shifted_tile_starts(H, tile, overlap, patch, d), shifted_tile_starts(W, tile, overlap, patch, d))
                 for d in offsets]
        # Tile rows of every grid, by start: rows above the next start receive no more contributions.
        tile_rows = sorted((y0, k) for k, (ys, _) in enumerate(grids) for y0 in ys)
        gh, gw = H // patch, W // patch
        self.tiles_total += sum(len(ys) * len(xs) for ys, xs in grids)
        self.progress(TILES_TASK, self.tiles_done, self.tiles_total)
        meta = {"tile": tile, "overlap": overlap, "rows": grids[0][0], "cols": grids[0][1]}
        if len(offsets) > 1:
            meta.update(shifts=len(offsets), offsets=offsets)
        if opts.tile_blend != "linear":
            meta["blend"] = opts.tile_blend
        handle = self.writer.begin_image(it.path, (gh, gw), enc.embed_dim, orig_size=it.orig_size,
                                         proc_size=it.proc_size, meta={"tiles": meta})
        band = _Band(opts.layers, gw, enc.embed_dim)
        for i, (y0, k) in enumerate(tile_rows):
            self._tile_row(raw, scale, band, y0, grids[k][1], tile, overlap, (gh, gw))
            done_to = tile_rows[i + 1][0] // patch if i + 1 < len(tile_rows) else gh
            for layer, start, rows in band.pop_finished(done_to):
                handle.write_rows(layer, start, rows)
        handle.finish()
        self.writer.commit()

    def _tile_row(self, raw, scale, band: _Band, y0: int, xs: list[int], tile: int, overlap: int, grid) -> None:
        """Run the tiles starting at row ``y0`` (pixels) and columns ``xs`` and add their weighted tokens."""
        torch, patch, opts = self.torch, self.encoder.patch_size, self.opts
        H, W = raw.shape[:2]
        gh, gw = grid
        ov_t = overlap // patch
        th = min(tile, H - y0)
        ty0 = y0 // patch
        band.grow_to(ty0 + th // patch)
        wy = tile_weights(th // patch, ty0, gh, ov_t, opts.tile_blend)
        for b0 in range(0, len(xs), opts.batch_size):
            cols = xs[b0 : b0 + opts.batch_size]
            tiles = [self._tile_tensor(raw[y0 : y0 + th, x0 : x0 + min(tile, W - x0)], scale) for x0 in cols]
            if len({t.shape for t in tiles}) == 1:
                groups = [(cols, torch.stack(tiles))]
            else:
                groups = [([c], t[None]) for c, t in zip(cols, tiles)]
            for gcols, batch in groups:
                tokens, _ = self.forward(batch)
                tw_t = batch.shape[-1] // patch
                for j, x0 in enumerate(gcols):
                    wx = tile_weights(tw_t, x0 // patch, gw, ov_t, opts.tile_blend)
                    band.add({layer: t[j] for layer, t in tokens.items()}, ty0, x0 // patch, wy[:, None] * wx[None, :])
                # One call per forward pass (a batch of tiles): the rate is bounded by the model's.
                self.tiles_done += len(gcols)
                self.progress(TILES_TASK, self.tiles_done, self.tiles_total)

    def _tile_tensor(self, raw_tile: np.ndarray, scale):
        torch = self.torch
        enc = self.encoder
        if scale is None:
            img = raw_tile.astype(np.float32)
        else:
            lo, hi = scale
            img = np.clip((raw_tile.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros(
                raw_tile.shape, np.float32
            )
        img = to_channels(img, enc.in_chans)
        m = np.asarray(enc.mean, np.float32)
        s = np.asarray(enc.std, np.float32)
        img = (img - m) / s
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _global_intensity(raw: np.ndarray, intensity: str) -> tuple[float, float]:
    """The (lo, hi) intensity window of a whole image, so every tile is scaled the same way."""
    rule, pct = parse_intensity(intensity)
    if rule == "auto":
        rule = "dtype" if raw.dtype == np.uint8 else "minmax"
    if rule == "dtype":
        if np.issubdtype(raw.dtype, np.integer):
            info = np.iinfo(raw.dtype)
            return float(info.min), float(info.max)
        return 0.0, 1.0
    if rule == "minmax":
        return float(np.nanmin(raw)), float(np.nanmax(raw))
    sample = raw[:: max(1, raw.shape[0] // 2048), :: max(1, raw.shape[1] // 2048)]
    lo, hi = np.nanpercentile(sample, pct)
    return float(lo), float(hi)


def extract_images(
    paths: Sequence[str | os.PathLike],
    encoder,
    writer,
    options: ExtractOptions,
    *,
    device=None,
    progress: ProgressCallback | None = None,
) -> ExtractSummary:
    """Extract features of ``paths`` into ``writer`` (a :class:`~posvit_cli.core.features.writer.StoreWriter`).

    Images already in the writer (``writer.done``, after ``--resume``) are skipped. Unreadable images are
    skipped with a :class:`PosvitWarning` and listed in the summary, or raise with ``options.strict``. Images
    refused for their size (``options.max_side``) are refused from their header, before they are decoded.

    ``progress`` is called with task ``"extract"`` (images done or skipped, of those to do) and, once an image is
    tiled, ``"extract tiles"`` (tiles done, of the tiles of every tiled image started so far) after each forward pass.

    Returns
    -------
    ExtractSummary

    Raises
    ------
    PosvitError
        If ``options.tile`` or ``options.overlap`` is not a multiple of the encoder's patch size.
    """
    import torch

    progress = report(progress)
    device = device or torch.device("cpu")
    if options.tile is not None:  # provenance records the tile as given: it must be the tile used
        check_patch_multiple(f"--tile {options.tile}", options.tile, encoder.patch_size, encoder.name)
        check_patch_multiple(f"--overlap {options.overlap}", options.overlap, encoder.patch_size, encoder.name)
        if options.tile_shifts > 1:
            shift_offsets(options.tile, options.overlap, encoder.patch_size, options.tile_shifts)
        if options.tile_blend not in TILE_BLENDS:
            raise PosvitError(f"--tile-blend '{options.tile_blend}': use {' or '.join(TILE_BLENDS)}")
    t0 = time.perf_counter()
    summary = ExtractSummary(requested=len(paths))
    done = {os.path.abspath(d) for d in writer.done} | set(writer.done)
    todo = [Path(p) for p in paths if str(p) not in done and os.path.abspath(p) not in done]
    summary.already_done = len(paths) - len(todo)
    runner = _Runner(encoder, writer, options, device, progress)
    total = len(todo)
    progress("extract", 0, total)
    buckets: dict[tuple, list[_Prepared]] = collections.OrderedDict()
    buffered = 0
    finished = 0

    def flush(key) -> None:
        nonlocal buffered, finished
        items = buckets.pop(key)
        runner.run_batch(items)
        buffered -= len(items)
        finished += len(items)
        summary.written += len(items)
        progress("extract", finished + len(summary.skipped), total)

    window = max(2 * options.batch_size, 4)
    prepared = _prefetch(lambda p: _prepare(p, encoder, options), todo, options.workers, window)
    for it in prepared:
        if it.error is not None:
            if options.strict:
                raise PosvitError(f"'{it.path}': {it.error} (stopped by --strict; finished images are kept for --resume)")
            warnings.warn(f"skipped '{it.path}': {it.error}", PosvitWarning, stacklevel=2)
            summary.skipped.append((it.path, it.error))
            progress("extract", finished + len(summary.skipped), total)
            continue
        if it.raw is not None:
            runner.run_tiled(it)
            finished += 1
            summary.written += 1
            summary.tiled += 1
            progress("extract", finished + len(summary.skipped), total)
            continue
        key = tuple(it.tensor.shape)
        buckets.setdefault(key, []).append(it)
        buffered += 1
        if len(buckets[key]) >= options.batch_size:
            flush(key)
        elif buffered >= window:
            flush(max(buckets, key=lambda k: len(buckets[k])))
    while buckets:
        flush(next(iter(buckets)))
    if runner.compiled is not None:  # known only now: which shapes ran compiled, and any fallback to eager
        writer.update_provenance(compile={"requested": True, **runner.compiled.provenance()})
    summary.seconds = time.perf_counter() - t0
    return summary


def _tiling_provenance(options: ExtractOptions) -> dict | None:
    if not options.tile:
        return None
    tiling = {"tile": options.tile, "overlap": options.overlap}
    if options.tile_shifts > 1:  # absent for one grid, so stores tiled before the option existed stay the same
        tiling["shifts"] = options.tile_shifts
    if options.tile_blend != "linear":  # likewise absent for the default
        tiling["blend"] = options.tile_blend
    return tiling


def extraction_provenance(encoder, options: ExtractOptions, *, device, command: str = "", shard: str | None = None,
                          debias: list | None = None, transform: str | None = None) -> dict:
    """The store provenance of an extraction: model, weights, layers, preprocessing and run settings."""
    import platform

    import torch

    from posvit_cli import __version__

    prov = encoder.provenance()
    prov.update(
        {
            "posvit_version": __version__,
            "layers": list(options.layers),
            "prefix_tokens": encoder.num_prefix_tokens if options.keep_prefix else 0,
            "preprocessing": {
                "size": str(options.size),
                "interpolation": "bilinear-antialias",
                "intensity": options.intensity,
                "mean": list(encoder.mean),
                "std": list(encoder.std),
                "in_chans": encoder.in_chans,
            },
            "tiling": _tiling_provenance(options),
            "precision": options.precision,
            "compile": {"requested": options.compile, "used": False},
            "device": str(device),
            "debias": debias or [],
            "transform": transform,
            "shard": shard,
            "command": command,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        }
    )
    return prov

"""The dataset loop: every image of a store (or any feature reader) through the solver, summarised per layer.

:func:`probe_dataset` takes a reader callable so that training code can probe features it holds in memory;
:func:`probe_store` wraps it for a :class:`~posvit_cli.core.features.store.FeatureStore` and builds the result
document (schema: ``docs/probe-results.md``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from posvit_cli.core.device import torch_threads
from posvit_cli.core.fileio import tagged_header
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.measure.probe.results import top_channels
from posvit_cli.core.measure.probe.settings import (
    POSITIONAL_RAMPS, PROBE_SCHEMA, PROBE_SCHEMA_VERSION, RAMP_TARGETS, ProbeSettings, sampling_plan,
)
from posvit_cli.core.measure.probe.solver import PositionClassifier, probe_image
from posvit_cli.core.measure.probe.tiles import phase_periodicity, tile_frame, tile_frame_plan
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["FeatureReader", "probe_dataset", "probe_store", "tile_layout"]


# --------------------------------------------------------------------------------------------------------------
# Dataset level


class _Stat:
    """Running mean and population std of arrays, ignoring NaN entries."""

    def __init__(self):
        self.n = self.s = self.s2 = None

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        vz = np.where(ok, v, 0.0)
        if self.n is None:
            self.n, self.s, self.s2 = ok.sum(0).astype(np.float64), vz.sum(0), (vz ** 2).sum(0)
        else:
            self.n += ok.sum(0)
            self.s += vz.sum(0)
            self.s2 += (vz ** 2).sum(0)

    def mean_std(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s / self.n
            std = np.sqrt(np.maximum(self.s2 / self.n - mean ** 2, 0.0))
        return mean, std


def _summary(per_image_repeats: list[np.ndarray]) -> dict:
    a = np.asarray(per_image_repeats, dtype=np.float64)
    finite = np.isfinite(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "mean": float(np.nanmean(a)) if finite.any() else None,
            "std": float(np.nanstd(a)) if finite.any() else None,
            "per_image": [None if not np.isfinite(x) else float(x) for x in np.nanmean(a, axis=1)],
            "per_repeat": [[None if not np.isfinite(x) else float(x) for x in row] for row in a],
        }


FeatureReader = Callable[[int, str], np.ndarray]


def probe_dataset(
    read: FeatureReader,
    images: Sequence[dict],
    layers: Sequence[str],
    settings: ProbeSettings,
    *,
    device: str = "cpu",
    threads: int | None = 1,
    progress: ProgressCallback | None = None,
) -> dict:
    """Probe every image of a dataset for every layer; return the per-layer result blocks.

    Parameters
    ----------
    read : callable ``(image_index, layer) -> ndarray (h, w, C)``
        Feature access (called once per image and layer, again in the classifier's second pass).
    images : sequence of dict
        One ``{"name", "path", "grid": (h, w)}`` per image, in index order; images extracted in tiles also carry
        ``"tiles"``: their ``meta["tiles"]`` plus ``"patch"`` (pixels per token), and are probed in their tile
        frame too (see :mod:`~posvit_cli.core.measure.probe.tiles`).
    layers : sequence of str
        Layers to probe; the sampling masks of an image are the same for every layer.
    settings : ProbeSettings
    device : str
    threads : int or None
        Torch intra-op threads while probing (see :func:`posvit_cli.core.device.torch_threads`); None keeps
        torch's setting.
    progress : callable, optional
        Called as ``progress("probe", done, total)`` and ``progress("position classifier", done, total)``.

    Returns
    -------
    dict
        ``{layer: block}`` with, per block, ``stack_r2``, ``channel_r2``, ``top_channels``,
        ``positional_channels``, ``coordinate_rmse``, ``position_accuracy`` and, when some image was tiled,
        ``tile_frame`` (see :func:`probe_store`).

    Raises
    ------
    PosvitError
        For images with non-finite features (all of them are named), grids too small to probe or no images.
    """
    with torch_threads(threads):
        return _probe_dataset(read, images, layers, settings.validated(), device, report(progress))


def _probe_dataset(read, images, layers, settings, device, progress) -> dict:
    _check_grids(images, settings)
    acc = _Accumulator(layers, settings, device)
    total = len(images) * len(layers)
    done = 0
    progress("probe", 0, total)
    tile_settings = _tile_frame_settings(settings)
    for i, im in enumerate(images):
        plan = tiled = None
        frame = tile_frame(im["grid"], im.get("tiles"), (im.get("tiles") or {}).get("patch", 0))
        for ly in layers:
            f = read(i, ly)
            if f.ndim != 3 or tuple(f.shape[:2]) != tuple(int(x) for x in im["grid"]):
                raise PosvitError(f"image '{im['name']}' features have shape {f.shape}, its grid is {tuple(im['grid'])}")
            if acc.channels is None:
                acc.channels = int(f.shape[2])
            if not _all_finite(f):
                if im["name"] not in acc.nonfinite:
                    acc.nonfinite.append(im["name"])
            elif not acc.nonfinite:  # once an error is certain, only keep scanning for more bad images
                if plan is None:
                    plan = sampling_plan(tuple(f.shape[:2]), settings, np.random.default_rng([settings.seed, i]))
                acc.add(ly, i, f, probe_image(f, settings, plan, device=device))
                if frame is not None and tile_settings is not None:
                    tiled = tiled or tile_frame_plan(plan, frame)
                    acc.add_tile(ly, i, probe_image(f, tile_settings, tiled, device=device),
                                 phase_periodicity(f, frame))
            done += 1
            progress("probe", done, total)
    if acc.nonfinite:
        shown = ", ".join(f"'{n}'" for n in acc.nonfinite[:5])
        more = f" and {len(acc.nonfinite) - 5} more" if len(acc.nonfinite) > 5 else ""
        raise PosvitError(
            f"features of {len(acc.nonfinite)} image(s) contain NaN or inf: {shown}{more} "
            "(re-extract them, e.g. with --dtype float32; posvit does not zero them)"
        )
    if settings.extras:
        acc.classify(read, images, progress)
    grids = [tuple(im["grid"]) for im in images]
    return {"layers": {ly: acc.block(ly, grids) for ly in layers}, "channels": acc.channels}


def _all_finite(f: np.ndarray) -> bool:
    """``np.isfinite(f).all()`` a row of the grid at a time: no boolean copy of a huge image's features."""
    return all(np.isfinite(row).all() for row in f)


def _tile_frame_settings(settings: ProbeSettings) -> ProbeSettings | None:
    """The settings of the tile-frame fits: the probed ramps only, whole stack only (None when no ramp is probed)."""
    ramps = tuple(t for t in settings.targets if t in RAMP_TARGETS)
    if not ramps:
        return None
    return dataclasses.replace(settings, targets=ramps, per_channel=False, extras=False)


def _probeable_records(records, settings: ProbeSettings) -> tuple[list, list[tuple[str, str]]]:
    """The records whose token grid the probe can sample, and ``(name, reason)`` for the others, with one warning.

    One tiny image (a 15×10 px thumbnail has a 1×1 grid) must not stop the probe of a whole store; it is left out
    and named. When no image is left, the probe refuses as before (:func:`_check_grids` names the first).
    """
    why_not: dict[tuple[int, int], str | None] = {}  # one sampling check per grid size, not per image
    for grid in dict.fromkeys((int(r.grid[0]), int(r.grid[1])) for r in records):
        try:
            if grid[0] * grid[1] < 2:
                raise PosvitError(f"a {grid[0]}×{grid[1]} token grid has no positions to probe (need at least 2 tokens)")
            sampling_plan(grid, settings, np.random.default_rng(0))
            why_not[grid] = None
        except PosvitError as exc:
            why_not[grid] = str(exc)
    kept, skipped = [], []
    for r in records:
        reason = why_not[(int(r.grid[0]), int(r.grid[1]))]
        if reason is None:
            kept.append(r)
        else:
            skipped.append((r.name, reason))
    if not kept:
        return list(records), []  # nothing probeable: let the dataset check refuse with its message
    if skipped:
        shown = ", ".join(f"'{n}'" for n, _ in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5
                                                               else "")
        warnings.warn(f"left {len(skipped)} image(s) out of the probe, their token grids are too small: {shown} "
                      f"({skipped[0][1]}); `posvit store subset` writes a store without them",
                      PosvitWarning, stacklevel=3)
    return kept, skipped


def _check_grids(images: Sequence[dict], settings: ProbeSettings) -> None:
    """Fail before any work on no images, a grid of fewer than 2 tokens, or a grid too small for the sampling."""
    if not images:
        raise PosvitError("no images to probe")
    bad_grids = [im["name"] for im in images if int(im["grid"][0]) * int(im["grid"][1]) < 2]
    if bad_grids:
        g = next(im["grid"] for im in images if im["name"] == bad_grids[0])
        raise PosvitError(
            f"image '{bad_grids[0]}' has a {g[0]}×{g[1]} token grid: nothing to probe (need at least 2 tokens)"
            + (f"; {len(bad_grids) - 1} more images too" if len(bad_grids) > 1 else "")
        )
    for grid in dict.fromkeys(tuple(int(x) for x in im["grid"]) for im in images):
        sampling_plan(grid, settings, np.random.default_rng(0))


class _Accumulator:
    """Per-layer running scores of :func:`probe_dataset`: stack R² per image, per-channel statistics, coordinate
    RMSE and the token-index classifiers (two passes over the images)."""

    def __init__(self, layers: Sequence[str], settings: ProbeSettings, device):
        self.settings = settings
        targets = settings.targets
        self.stacks: dict[str, dict[str, list]] = {ly: {t: [] for t in targets} for ly in layers}
        self.chan: dict[str, dict[str, _Stat]] = {ly: {t: _Stat() for t in targets} for ly in layers}
        self.rmse: dict[str, list] = {ly: [] for ly in layers}
        self.rmse_chance: dict[str, list] = {ly: [] for ly in layers}
        alpha = settings.alpha if settings.regressor == "ridge" else 1.0
        self.classifiers = {ly: PositionClassifier(alpha, device) for ly in layers} if settings.extras else {}
        self.accuracy: dict[str, list] = {ly: [] for ly in layers}
        self.within: dict[str, list] = {ly: [] for ly in layers}
        self.nonfinite: list[str] = []
        self.channels: int | None = None
        # Tile frame: per tiled image, its index, the stack R² per ramp and the phase periodicity.
        self.tile_index: dict[str, list[int]] = {ly: [] for ly in layers}
        self.tile_stacks: dict[str, dict[str, list]] = {ly: {t: [] for t in targets if t in RAMP_TARGETS}
                                                        for ly in layers}
        self.periodicity: dict[str, list[dict]] = {ly: [] for ly in layers}

    def add(self, layer: str, index: int, features: np.ndarray, res) -> None:
        for t in self.settings.targets:
            self.stacks[layer][t].append(res.stack[t])
            if self.settings.per_channel:
                self.chan[layer][t].add(res.channel[t])
        self.rmse[layer].append(res.coordinate_rmse)
        self.rmse_chance[layer].append(res.coordinate_rmse_chance)
        if self.settings.extras and self.classifiers[layer].add_allowed(features.shape[:2]):
            self.classifiers[layer].add(index, features)

    def add_tile(self, layer: str, index: int, res, periodicity: dict) -> None:
        """Scores of one tiled image in its tile frame (``res`` from the tile-frame plan)."""
        self.tile_index[layer].append(index)
        for t, v in self.tile_stacks[layer].items():
            v.append(res.stack[t])
        self.periodicity[layer].append(periodicity)

    def tile_block(self, ly: str) -> dict:
        """The ``tile_frame`` block of one layer (tiled images only)."""
        per = self.periodicity[ly]
        score = _summary([[p["periodicity"]] for p in per])
        return {
            "images": self.tile_index[ly],
            "stack_r2": {t: _summary(v) for t, v in self.tile_stacks[ly].items()},
            "periodicity": {
                "mean": score["mean"], "std": score["std"], "per_image": score["per_image"],
                "eta2_mean": _summary([[p["eta2"]] for p in per])["mean"],
                "eta2_chance_mean": _summary([[p["eta2_chance"]] for p in per])["mean"],
                "definition": "mean over channels of the chance-corrected eta squared (epsilon squared) of a one-way "
                              "ANOVA of the channel on the tile phase (token row, col within its tile): "
                              "(SS_between - (K-1) SS_within/(N-K)) / SS_total; 0 = no tile pattern, 1 = set by phase",
            },
            "frame": "position within the tile whose centre is nearest to the token (from the store's tile layout)",
        }

    def classify(self, read, images, progress) -> None:
        """Pass 2: each image's tokens classified by the classifier of the other images (leave one out)."""
        total = len(images) * len(self.classifiers)
        done = 0
        progress("position classifier", 0, total)
        for i, im in enumerate(images):
            for ly, clf in self.classifiers.items():
                a, b = clf.score(i, read(i, ly)) if clf.available(im["grid"]) else (float("nan"), float("nan"))
                self.accuracy[ly].append(a)
                self.within[ly].append(b)
                done += 1
                progress("position classifier", done, total)

    def block(self, ly: str, grids: list[tuple]) -> dict:
        """The result block of one layer (see :func:`probe_store`)."""
        settings = self.settings
        block: dict[str, Any] = {"stack_r2": {t: _summary(self.stacks[ly][t]) for t in settings.targets}}
        if settings.per_channel:
            block["channel_r2"] = {}
            for t in settings.targets:
                mean, std = self.chan[ly][t].mean_std()
                block["channel_r2"][t] = {"mean": mean.tolist(), "std": std.tolist()}
            ramps = [r for r in POSITIONAL_RAMPS if r in settings.targets]
            top = {r: top_channels(np.asarray(block["channel_r2"][r]["mean"]), settings.top_k) for r in ramps}
            block["top_channels"] = top
            block["positional_channels"] = sorted({c for v in top.values() for c in v})
        rm = _summary(self.rmse[ly])
        rc = _summary(self.rmse_chance[ly])
        block["coordinate_rmse"] = {
            "mean": rm["mean"], "std": rm["std"], "per_image": rm["per_image"],
            "chance_mean": rc["mean"], "unit": "patches",
            "definition": "sqrt(mean over evaluation tokens and both coordinates of the squared error) of the "
                          "xy ridge fit, in token units; chance = predicting the training mean",
        }
        if settings.extras:
            block["position_accuracy"] = self._accuracy_block(ly, grids)
        if self.tile_index[ly]:
            block["tile_frame"] = self.tile_block(ly)
        return block

    def _accuracy_block(self, ly: str, grids: list[tuple]) -> dict:
        acc = np.asarray(self.accuracy[ly], dtype=np.float64)
        near = np.asarray(self.within[ly], dtype=np.float64)
        ok = np.isfinite(acc)
        return {
            "mean": float(acc[ok].mean()) if ok.any() else None,
            "std": float(acc[ok].std()) if ok.any() else None,
            "within_one_mean": float(near[ok].mean()) if ok.any() else None,
            "per_image": [float(a) if np.isfinite(a) else None for a in acc],
            "chance_mean": float(np.mean([1.0 / (g[0] * g[1]) for g, k in zip(grids, ok) if k])) if ok.any() else None,
            "images_scored": int(ok.sum()),
            "classifier": (
                "ridge one-vs-rest least squares on the one-hot token index (closed form), "
                f"alpha {self.classifiers[ly].alpha:g}, features z-scored per image, leave-one-image-out over "
                "images of the same grid size"
            ),
            **({} if ok.any() else {"reason": "needs at least 2 images with the same grid size of at most "
                                              f"{PositionClassifier.MAX_TOKENS} tokens"}),
        }


def tile_layout(record, patch) -> dict:
    """``{"tiles": {...}}`` for an image extracted in more than one tile (its recorded layout and the patch size)."""
    tiles = (record.meta or {}).get("tiles")
    if not isinstance(tiles, dict) or not patch or len(tiles.get("rows") or []) * len(tiles.get("cols") or []) < 2:
        return {}
    return {"tiles": {**tiles, "patch": int(patch)}}


def _stored_features(store, index: int, layer: str) -> np.ndarray:
    """One image's features as stored when that is float16 or float32, else as float32."""
    f = store.features(index, layer, dtype=None)
    return f if f.dtype in (np.float16, np.float32) else f.astype(np.float32)


def probe_store(
    store,
    settings: ProbeSettings,
    *,
    layers: Sequence[str] | None = None,
    device: str = "cpu",
    threads: int | None = 1,
    progress: ProgressCallback | None = None,
) -> dict:
    """Probe a feature store and return the full result document (schema: ``docs/probe-results.md``).

    Parameters
    ----------
    store : FeatureStore
    settings : ProbeSettings
    layers : sequence of str, optional
        Layers to probe (default: the store's default layer).
    device : str
    threads : int or None
        Torch intra-op threads (see :func:`posvit_cli.core.device.torch_threads`).
    progress : callable, optional

    Returns
    -------
    dict
        ``schema``, ``posvit_version``, ``created``, ``store`` (source, format, provenance), ``settings``,
        ``images``, ``layers`` (probed, in order), ``primary_layer`` (the one :func:`positional_channels` reads
        by default), ``results`` ({layer: block}) and ``notes``.

    Raises
    ------
    PosvitError
        For an empty store, a store with no feature layers (maps only), grids of fewer than 2 tokens, missing
        layers or non-finite features.
    """
    if len(store) == 0:
        raise PosvitError(f"'{store.source}' holds no images: nothing to probe")
    if not store.layers:
        maps = ", ".join(store.map_names()) or "none"
        raise PosvitError(f"'{store.source}' holds no feature layers (a maps-only store: {maps}); probe a feature store")
    if layers is None:
        layers = [store.default_layer]
    layers = [store.check_layer(ly) for ly in layers]
    layers = list(dict.fromkeys(layers))
    records = store.records
    for r in records:
        if len(r.grid) != 2 or r.grid[0] < 1 or r.grid[1] < 1:
            raise PosvitError(f"image '{r.name}' in '{store.source}' has no token grid ({r.grid})")
    kept, skipped = _probeable_records(records, settings.validated())
    images = [{"name": r.name, "path": r.path, "grid": [int(r.grid[0]), int(r.grid[1])],
               **tile_layout(r, store.patch_size)} for r in kept]
    # Features are read in their stored type (float16 or float32): the solver converts token chunks to float64,
    # and float16 → float64 is exact, so a float32 copy of a huge image would only add memory (0.6 GB at
    # 625 × 625 × 384), never precision.
    out = probe_dataset(lambda i, ly: _stored_features(store, kept[i].index, ly), images, layers, settings,
                        device=device, threads=threads, progress=progress)
    primary = store.default_layer if store.default_layer in layers else layers[-1]
    notes = [f"skipped image '{name}': {why}" for name, why in skipped]
    for ly, block in out["layers"].items():
        for t, s in block["stack_r2"].items():
            if s["mean"] is None:
                notes.append(f"{ly}: target '{t}' is constant on every grid (e.g. ud on one-row grids): R² undefined")
    prov = dict(store.provenance)
    return {
        **tagged_header(PROBE_SCHEMA, PROBE_SCHEMA_VERSION),
        "store": {
            "source": store.source,
            "format": store.format,
            "n_images": len(store),
            "channels": out["channels"],
            "stored_layers": list(store.layers),
            "grids": {g.name: int(len(g.indices)) for g in store.groups},
            "model": store.model,
            "weights": store.weights,
            "weights_sha256": store.weights_sha256,
            "patch_size": store.patch_size,
            "preprocessing": store.preprocessing,
            "debias": store.debias,
            "provenance": prov,
        },
        "settings": settings.as_dict(),
        "images": images,
        "layers": layers,
        "primary_layer": primary,
        "results": out["layers"],
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------------------

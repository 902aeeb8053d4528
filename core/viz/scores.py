"""The probe numbers every picture carries: a store's positional R², from a saved result or probed on the spot.

A saved probe result (``posvit probe -o``) is used only when its provenance matches the store drawn (same model,
weights and debiasing): a score of another model next to a picture would be worse than none. Without a result,
the images drawn are probed here with the ``holdout`` protocol (R² on held-out tokens), so the number describes
exactly the pictures it stands next to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.provenance import INPUT_KEYS, STORAGE_KEYS, identity_differences
from posvit_cli.core.progress import ProgressCallback

__all__ = [
    "ChannelScores",
    "PositionScore",
    "channel_scores",
    "check_result_matches_store",
    "probe_fraction",
    "score_from_result",
    "score_store",
]

#: Training tokens the on-the-spot probe wants at least, per image: with fewer, held-out R² of a planted ramp
#: among a few noise channels drops from 0.99 to 0.56 (10 × 12 grid, 16 channels: 30 vs 12 tokens).
MIN_TRAIN_TOKENS = 32


def fmt(v: float | None, digits: int = 2) -> str:
    """A number for a figure: fixed digits, a real minus sign, ``n/a`` for undefined."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f}".replace("-", "−")


@dataclasses.dataclass
class PositionScore:
    """A store's stack R² for one positional target, for figure titles.

    Attributes
    ----------
    target : str
        The target (``xy`` unless the result lacks it).
    mean, std : float
        Over images × repeats.
    control : float or None
        The ``random`` target's mean R² (the null to read ``mean`` against), when probed.
    per_image : dict of int to float
        Store index → the image's R² (mean over repeats).
    n_images : int
    source : str
        Where the number comes from, in words.
    """

    target: str
    mean: float | None
    std: float | None
    control: float | None
    per_image: dict[int, float]
    n_images: int
    source: str

    def text(self) -> str:
        """``xy R² 0.83 ± 0.05 (random control −0.12)``."""
        s = f"{self.target} R² {fmt(self.mean)}"
        if self.std is not None and math.isfinite(self.std):
            # A spread below the shown precision still gets one significant digit, not "± 0.00".
            s += f" ± {fmt(self.std, 3 if 0 < abs(self.std) < 0.01 else 2)}"
        if self.control is not None:
            s += f" (random control {fmt(self.control)})"
        return s

    def image_text(self, index: int) -> str:
        """``xy R² 0.81`` for one image, or an empty string when it was not scored."""
        v = self.per_image.get(index)
        return "" if v is None else f"{self.target} R² {fmt(v)}"

    def as_dict(self) -> dict:
        return {"target": self.target, "mean": self.mean, "std": self.std, "random_control": self.control,
                "n_images": self.n_images, "source": self.source}


def _debias_key(v) -> str:
    return json.dumps(v or [], sort_keys=True, default=str)


def check_result_matches_store(result: dict, store, result_name: str = "the probe result") -> None:
    """Refuse a probe result that was not made from this store's features.

    Compares the feature identity recorded in the result (model, weights' SHA-256, architecture changes,
    patch size, channel count, debiasing; :func:`~posvit_cli.core.features.provenance.identity_differences`)
    with the store's provenance. Keys missing on either side are not compared.

    Raises
    ------
    PosvitError
        Naming both models (or weights, or debiasing) when they differ.
    """
    rs = {k: v for k, v in (result.get("store") or {}).items() if v is not None}
    prov = {k: v for k, v in {**(store.provenance or {}), "channels": store.channels or None}.items() if v is not None}
    diff = identity_differences(rs, prov, ignore=INPUT_KEYS + STORAGE_KEYS, missing_ok=True)
    a, b = rs.get("model"), prov.get("model")
    if "model" in diff:
        raise PosvitError(
            f"{result_name} was made from model '{a}', but '{store.source}' holds features of model '{b}': "
            "pass the probe result of this store (or none, to probe it here)"
        )
    a, b = rs.get("weights_sha256"), prov.get("weights_sha256")
    if "weights_sha256" in diff:
        raise PosvitError(
            f"{result_name} was made from other weights of '{prov.get('model')}' (sha256 {a[:12]}…) than "
            f"'{store.source}' (sha256 {b[:12]}…): pass the probe result of this store"
        )
    if "debias" in diff:
        raise PosvitError(
            f"{result_name} was made from features with debiasing {_debias_key(rs.get('debias'))}, "
            f"'{store.source}' holds {_debias_key(prov.get('debias'))}: pass the probe result of this store"
        )
    if "channels" in diff:
        raise PosvitError(f"{result_name} has {rs['channels']} channels, '{store.source}' {prov['channels']}: "
                          "not the same features")
    if diff:
        raise PosvitError(f"{result_name} was made from other features than '{store.source}' ({', '.join(diff)} "
                          "differ): pass the probe result of this store")


def _image_index_map(result: dict, store) -> dict[int, int]:
    """Result image position → store index, by path first, then by unique name."""
    recs = store.records
    by_path = {r.path: r.index for r in recs}
    names: dict[str, list[int]] = {}
    for r in recs:
        names.setdefault(r.name, []).append(r.index)
    out = {}
    for j, im in enumerate(result.get("images") or []):
        if im.get("path") in by_path:
            out[j] = by_path[im["path"]]
        elif len(names.get(im.get("name"), [])) == 1:
            out[j] = names[im["name"]][0]
    return out


def _pick_target(stack: dict, target: str) -> str:
    if target in stack:
        return target
    for t in ("xy", "lr", "ud", "diag", "radial"):
        if t in stack:
            return t
    raise PosvitError(f"the probe result scores no positional ramp (targets: {', '.join(stack)})")


def score_from_result(result: dict, store, *, layer: str | None = None, target: str = "xy",
                      result_name: str = "the probe result") -> PositionScore:
    """The stack R² of a saved probe result, checked against the store it is drawn with.

    Parameters
    ----------
    result : dict
        From :func:`posvit_cli.core.measure.probe.read_probe_result`.
    store : FeatureStore
    layer : str, optional
        The layer drawn; it must have been probed. Default: the result's primary layer.
    target : str
        Preferred target; falls back to the first of xy, lr, ud, diag, radial the result holds.

    Raises
    ------
    PosvitError
        If the result is of another model, weights or debiasing, or lacks the layer.
    """
    check_result_matches_store(result, store, result_name)
    results = result.get("results") or {}
    ly = layer or result.get("primary_layer") or (result.get("layers") or [None])[-1]
    if ly not in results:
        raise PosvitError(f"{result_name} has no layer '{ly}' (probed: {', '.join(results) or 'none'}); "
                          "probe that layer or draw another with --layer")
    stack = results[ly]["stack_r2"]
    t = _pick_target(stack, target)
    per = stack[t].get("per_image") or []
    index = _image_index_map(result, store)
    per_image = {index[j]: float(v) for j, v in enumerate(per) if j in index and v is not None}
    ctrl = stack.get("random", {}).get("mean")
    settings = result.get("settings") or {}
    src = f"{result_name}: {settings.get('protocol', '?')} probe of {result.get('store', {}).get('n_images', '?')} images"
    return PositionScore(t, stack[t].get("mean"), stack[t].get("std"), ctrl, per_image,
                         int(result.get("store", {}).get("n_images") or len(per)), src)


def probe_fraction(grids: Sequence[tuple[int, int]]) -> float:
    """Training fraction of the on-the-spot probe: 1/36 (the published setting), raised on small grids so that
    every image keeps at least :data:`MIN_TRAIN_TOKENS` training tokens, at most 1/4."""
    smallest = min(int(h) * int(w) for h, w in grids)
    return float(max(1 / 36, min(0.25, MIN_TRAIN_TOKENS / max(smallest, 1))))


def _features_as_stored(store, index: int, layer: str) -> np.ndarray:
    """One image's features as stored when float16 or float32 (else float32): the probe casts them in token
    chunks, so a float16 store's huge image is not held as a float32 copy (0.6 GB for 625×625×384 tokens)."""
    f = store.features(index, layer, dtype=None)
    return f if f.dtype in (np.float16, np.float32) else f.astype(np.float32)


def _probe(store, indices, layer, targets, per_channel, repeats, seed, progress):
    from posvit_cli.core.measure.probe import make_settings, probe_dataset

    recs = [store.record(i) for i in indices]
    images = [{"name": r.name, "path": r.path, "grid": [int(r.grid[0]), int(r.grid[1])]} for r in recs]
    fraction = probe_fraction([r.grid for r in recs])
    settings, _ = make_settings("holdout", targets=tuple(targets), fraction=fraction, repeats=repeats, seed=seed,
                                per_channel=per_channel, extras=False)
    out = probe_dataset(lambda j, ly: _features_as_stored(store, indices[j], ly), images, [layer], settings,
                        progress=progress)
    return out["layers"][layer], settings


def score_store(store, indices: Sequence[int], layer: str, *, repeats: int = 3, seed: int = 0,
                progress: ProgressCallback | None = None) -> PositionScore:
    """Probe the drawn images of a store for ``xy`` (and the ``random`` control) with the holdout protocol.

    Parameters
    ----------
    store : FeatureStore
    indices : sequence of int
        Store indices of the images drawn.
    layer : str
    repeats, seed : int
        Sampling masks per image and their seed (fixed: the same store gives the same number).

    Returns
    -------
    PositionScore
    """
    indices = list(indices)
    block, settings = _probe(store, indices, layer, ("xy", "random"), False, repeats, seed, progress)
    st = block["stack_r2"]
    per = st["xy"]["per_image"]
    per_image = {indices[j]: float(v) for j, v in enumerate(per) if v is not None and math.isfinite(v)}
    src = (f"probed here: holdout, {len(indices)} image{'s' if len(indices) != 1 else ''}, "
           f"fraction {settings.fraction:.3g}, {repeats} repeats")
    return PositionScore("xy", st["xy"]["mean"], st["xy"]["std"], st["random"]["mean"], per_image, len(indices), src)


@dataclasses.dataclass
class ChannelScores:
    """Per-channel R² of the positional ramps and the most positional channels.

    Attributes
    ----------
    channel_r2 : dict of str to ndarray (C,)
        Dataset-mean R² of each channel alone, per target.
    ranked : list of int
        The most positional channels (union of the top-k per ramp), ascending.
    top : dict of str to list of int
        The top-k channels of each ramp, best first.
    stack : dict of str to float
        Stack R² per target.
    source : str
    """

    channel_r2: dict[str, np.ndarray]
    ranked: list[int]
    top: dict[str, list[int]]
    stack: dict[str, float | None]
    source: str

    def best_ramp(self, channel: int) -> tuple[str, float]:
        """The ramp a channel encodes best and its R²."""
        best, val = "", -math.inf
        for t, r2 in self.channel_r2.items():
            if t in ("random", "raster", "xy"):
                continue
            v = float(r2[channel])
            if math.isfinite(v) and v > val:
                best, val = t, v
        return best, val


def channel_scores(store, indices: Sequence[int], layer: str, *, k: int = 2, result: dict | None = None,
                   result_name: str = "the probe result", repeats: int = 3, seed: int = 0,
                   progress: ProgressCallback | None = None) -> ChannelScores:
    """The most positional channels of a store, from a probe result or probed here on the drawn images.

    Parameters
    ----------
    k : int
        Top channels per ramp (lr, ud, diag, radial); their union is ``ranked``.
    result : dict, optional
        A saved probe result with per-channel scores (checked against the store).

    Raises
    ------
    PosvitError
        If the result is of other features, has no per-channel scores, or lacks the layer.
    """
    from posvit_cli.core.measure.probe import POSITIONAL_RAMPS, positional_channels

    if result is not None:
        check_result_matches_store(result, store, result_name)
        results = result.get("results") or {}
        ly = layer if layer in results else None
        if ly is None:
            raise PosvitError(f"{result_name} has no layer '{layer}' (probed: {', '.join(results) or 'none'})")
        block = results[ly]
        doc = result
        src = f"{result_name} ({(result.get('settings') or {}).get('protocol', '?')} probe)"
    else:
        block, settings = _probe(store, list(indices), layer, ("lr", "ud", "diag", "radial", "xy", "random"),
                                 True, repeats, seed, progress)
        doc = {"layers": [layer], "primary_layer": layer, "results": {layer: block}}
        src = f"probed here: holdout, {len(indices)} images, fraction {settings.fraction:.3g}"
    if "channel_r2" not in block:
        raise PosvitError(f"{result_name} has no per-channel scores (probed with --no-per-channel)")
    ramps = [r for r in POSITIONAL_RAMPS if r in block["channel_r2"]]
    if not ramps:
        raise PosvitError(f"{result_name} scores none of the ramps {', '.join(POSITIONAL_RAMPS)} per channel")
    ranked = positional_channels(doc, k=k, ramps=ramps, layer=layer)
    r2 = {t: np.array([np.nan if v is None else v for v in d["mean"]], dtype=np.float64)
          for t, d in block["channel_r2"].items()}
    top = {}
    for t in ramps:
        order = np.argsort(-np.where(np.isfinite(r2[t]), r2[t], -np.inf), kind="stable")
        top[t] = [int(c) for c in order[:k]]
    stack = {t: s.get("mean") for t, s in block["stack_r2"].items()}
    return ChannelScores(r2, ranked, top, stack, src)

"""The before/after report shared by every head, and the facts a head records about the store it was made from.

:func:`stack_r2_report` runs ``probe``'s stack R² on the same images before and after a head.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.provenance import NETWORK_KEYS
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["backbone_info", "encoder_input_size", "most_common_size", "report_indices", "require_final", "stack_r2_report", "store_report"]

#: Provenance keys a head copies from the store (or encoder) it was made for: what identifies the network, and how
#: it was named.
BACKBONE_KEYS = NETWORK_KEYS + ("timm_name", "weights")


def backbone_info(provenance: dict) -> dict:
    """The encoder facts (:data:`BACKBONE_KEYS`) of a store's or encoder's provenance, without empty ones."""
    return {k: provenance.get(k) for k in BACKBONE_KEYS if provenance.get(k) is not None}


def most_common_size(store) -> tuple[int, int]:
    """The most common processed image size ``(H, W)`` in pixels of a store's images."""
    return Counter(tuple(r.proc_size) for r in store.records).most_common(1)[0][0]


def encoder_input_size(store) -> tuple[int, int]:
    """The most common image size ``(H, W)`` in pixels the encoder itself ran on, for a store's images.

    An image extracted in tiles (``extract --tile``) was seen one tile at a time, so its size is the tile's
    (clipped to the image); others count with their processed size. ``svd --size auto`` uses it: the constant
    image of a tiled 10,000² px micrograph is one 1024 px tile, not a 10,000² px image no ViT could attend over.
    """
    sizes = []
    for r in store.records:
        tiles = (r.meta or {}).get("tiles")
        if isinstance(tiles, dict) and tiles.get("tile"):
            side = int(tiles["tile"])
            sizes.append((min(side, int(r.proc_size[0])), min(side, int(r.proc_size[1]))))
        else:
            sizes.append(tuple(int(v) for v in r.proc_size))
    return Counter(sizes).most_common(1)[0][0]


def require_final(store) -> None:
    """Heads act on final tokens: refuse a store without them.

    Raises
    ------
    PosvitError
        For a maps-only store, or one holding other layers only.
    """
    if not store.layers:
        raise PosvitError(f"'{store.source}' holds no feature layers (a maps-only store)")
    if "final" not in store.layers:
        raise PosvitError(
            f"heads act on final tokens; '{store.source}' stores {', '.join(store.layers)}: extract with --layers final"
        )


def report_indices(n: int, max_images: int) -> list[int]:
    """Up to ``max_images`` indices spread evenly over ``n`` images."""
    if n <= max_images:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, max_images)})


#: Grids of more tokens than this are read and cleaned for the report in row bands of about this many tokens,
#: and both feature sets are handed to the probe in the store's dtype (float16 or float32): a 625 × 625 × 384
#: float16 grid then costs 0.3 GB per set, not a whole float32 copy per set plus the head's output.
REPORT_BAND_TOKENS = 65_536


def _probe_input(f) -> np.ndarray:
    """Features for the probe: float16 or float32 as given (the probe sums them in float64 chunks), else float32."""
    f = np.asarray(f)
    return f if f.dtype in (np.float16, np.float32) else f.astype(np.float32)


def stack_r2_report(
    read: Callable[[int], np.ndarray],
    images: Sequence[dict],
    apply: Callable[[np.ndarray], np.ndarray] | None = None,
    read_after: Callable[[int], np.ndarray] | None = None,
    *,
    fraction: float | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> dict:
    """``probe``'s stack R² of the positional ramps, before and after debiasing, on the same images and masks.

    Parameters
    ----------
    read : callable ``i -> ndarray (h, w, C)``
        Features before.
    images : sequence of dict
        ``{"name", "path", "grid"}`` per image.
    apply : callable, optional
        Head applied to ``read(i)`` for the "after" features (or give ``read_after``).
    read_after : callable ``i -> ndarray (h, w, C)``, optional
    fraction : float, optional
        Training fraction of the probe. Default: the published 1/36, raised on small grids so that at least 16
        tokens train each fit (at most half of them), since 1/36 of a few hundred tokens fits nothing.
    seed : int

    Returns
    -------
    dict
        ``{"images": n, "fraction": f, "protocol": text, "before": {target: mean R²}, "after": {...}}`` for lr,
        ud, diag, radial and xy; ``protocol`` says how the R² was measured, to print beside it.
    """
    from posvit_cli.core.measure.probe import RAMP_TARGETS, make_settings, probe_dataset

    progress = report(progress)
    if read_after is None:
        if apply is None:
            raise ValueError("give apply or read_after")

        def read_after(i):
            return apply(read(i))

    if fraction is None:
        smallest = min(int(im["grid"][0]) * int(im["grid"][1]) for im in images)
        fraction = min(0.5, max(1 / 36, 16 / smallest))
    settings, _ = make_settings("holdout", targets=RAMP_TARGETS, per_channel=False, extras=False, seed=seed,
                                fraction=fraction)
    out = {"images": len(images), "fraction": fraction,
           # Printed next to the numbers: they come from fewer images and possibly a larger training fraction
           # than `posvit probe`'s defaults, so they need not equal its R² on the same store.
           "protocol": f"holdout probe, {len(images)} images, fraction {fraction:.3g}, {settings.repeats} repeats, "
                       f"seed {seed}"}
    for name, fn in (("before", read), ("after", read_after)):
        res = probe_dataset(lambda i, _ly, fn=fn: _probe_input(fn(i)), images, ["final"], settings,
                            progress=lambda task, done, total, name=name: progress(f"probe {name}", done, total))
        out[name] = {t: v["mean"] for t, v in res["layers"]["final"]["stack_r2"].items()}
    return out


def store_report(store, head, max_images: int, *, seed: int = 0,
                 progress: ProgressCallback | None = None) -> dict | None:
    """:func:`stack_r2_report` of ``head`` on up to ``max_images`` images of ``store`` (None for 0 or no grids).

    Parameters
    ----------
    store : FeatureStore
        Holding ``final`` tokens.
    head : Head
        Applied to each image's tokens, an array of shape (h, w, C).
    max_images : int
        Images spread evenly over the store (:func:`report_indices`); 0 = no report.
    """
    if max_images == 0:
        return None
    usable = [i for i in report_indices(len(store), max_images)
              if store.record(i).grid[0] * store.record(i).grid[1] >= 2]
    if not usable:
        return None
    images = [{"name": store.record(i).name, "path": store.record(i).path, "grid": list(store.record(i).grid)}
              for i in usable]
    return stack_r2_report(lambda j: _report_features(store, usable[j]), images,
                           read_after=lambda j: _report_features(store, usable[j], head), seed=seed,
                           progress=progress)


def _report_features(store, index: int, head=None) -> np.ndarray:
    """One image's final tokens ``(h, w, C)``, cleaned by ``head`` when given.

    Up to :data:`REPORT_BAND_TOKENS` tokens: read whole as float32. Larger grids: read (and cleaned) in row bands
    into one array of the store's dtype, so memory stays one grid as stored plus a band.
    """
    h, w = store.record(index).grid
    if h * w <= REPORT_BAND_TOKENS:
        f = store.features(index, "final")
        return f if head is None else head.apply_numpy(f)
    rows = max(1, REPORT_BAND_TOKENS // w)
    out = None
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        band = store.feature_rows(index, "final", start, stop, dtype=None)
        if out is None:
            dtype = band.dtype if band.dtype in (np.float16, np.float32) else np.float32
            out = np.empty((h, w, band.shape[-1]), dtype=dtype)
        if head is not None:  # where the rows lie matters to posmean
            import torch

            band = head.apply_rows(torch.from_numpy(band.astype(np.float32)), (h, w), start).numpy()
        out[start:stop] = band
    return out

"""RASA's training data: a store's final patch tokens read once into memory, with their grid coordinates.

Memory is bounded whatever the images' sizes: an image contributes at most :data:`MAX_IMAGE_TOKENS` tokens (a
seeded random sample above that), the whole cache at most ``max_tokens``, and images are read in row bands of
about :data:`READ_BAND_TOKENS` tokens in the store's dtype, so a huge tiled micrograph is never held whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["MAX_IMAGE_TOKENS", "READ_BAND_TOKENS", "TokenCache", "grid_coordinates", "load_token_cache"]

#: Most tokens one image puts in the cache (a 512 × 512 grid); a larger image gives a random sample of this many
#: tokens drawn from the seed. A RASA plane is a 2 × D linear map, so 262,144 tokens already fix it well, and the
#: cache and one optimiser step on it stay near 6·D bytes per token (0.6 GB for D = 384) for any image size.
MAX_IMAGE_TOKENS = 262_144
#: Tokens per row band when an image is read in parts (float16, D = 384: 50 MB).
READ_BAND_TOKENS = 65_536


def _torch():
    import torch

    return torch


def _axis_coordinates(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float32) / (n - 1) if n > 1 else np.full(1, 0.5, np.float32)


def grid_coordinates(h: int, w: int) -> np.ndarray:
    """RASA targets of an ``h × w`` token grid in row-major order: ``(row/(h−1), col/(w−1))``.

    An axis with a single token gets 0.5 (the centre; the sigmoid of 0).

    Returns
    -------
    ndarray of float32, shape (h·w, 2)
        Column 0 is the normalised row (y), column 1 the normalised column (x), both in [0, 1].
    """
    yy, xx = np.meshgrid(_axis_coordinates(h), _axis_coordinates(w), indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


def _token_coordinates(h: int, w: int, idx: np.ndarray) -> np.ndarray:
    """:func:`grid_coordinates` of the row-major token indices ``idx`` only, shape (len(idx), 2)."""
    return np.stack([_axis_coordinates(h)[idx // w], _axis_coordinates(w)[idx % w]], axis=1)


@dataclasses.dataclass
class TokenCache:
    """Patch tokens of many images with their RASA targets, ready for training.

    Attributes
    ----------
    tokens : torch.Tensor, shape (M, D)
        float16 (as most stores hold them) or float32, on the training device.
    coords : torch.Tensor of float32, shape (M, 2)
        ``(row/(h−1), col/(w−1))`` of every token.
    n_images : int
        Images (or augmented views) the tokens come from.
    sampled : bool
        True when fewer than all tokens of the store were kept (``max_tokens`` or ``image_tokens``).
    grids : dict
        ``{"HxW": number of images}``.
    offsets : ndarray of int64, shape (n_images + 1,), optional
        Image ``i`` owns tokens ``offsets[i]:offsets[i + 1]``. None: ``n_images`` equal runs.
    """

    tokens: Any
    coords: Any
    n_images: int
    sampled: bool = False
    grids: dict = dataclasses.field(default_factory=dict)
    offsets: np.ndarray | None = None

    @property
    def channels(self) -> int:
        return int(self.tokens.shape[1])

    def image_offsets(self) -> np.ndarray:
        """Token ranges of the images (``offsets``, or equal runs when they were not recorded)."""
        if self.offsets is not None:
            return np.asarray(self.offsets, dtype=np.int64)
        M = len(self)
        if M % self.n_images:
            raise PosvitError(f"{M} tokens do not split into {self.n_images} equal images: give the cache its offsets")
        return np.arange(self.n_images + 1, dtype=np.int64) * (M // self.n_images)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _read_tokens(store, index: int, layer: str, grid: tuple[int, int], idx: np.ndarray | None, out) -> bool:
    """Copy one image's tokens into ``out`` (a tensor of shape (n, D)): all (``idx`` None) or the sorted
    row-major indices ``idx``. False (``out`` partly written) when a token of the image is not finite.

    A grid larger than :data:`READ_BAND_TOKENS` is read in row bands in the store's dtype, keeping only the
    sampled tokens of each band; every token is still checked for finiteness.
    """
    torch = _torch()
    h, w = grid
    if h * w <= READ_BAND_TOKENS:
        f = store.features(index, layer).reshape(h * w, -1)
        if f.shape[1] != out.shape[1]:
            raise PosvitError(f"image '{store.record(index).name}' has {f.shape[1]} channels, the store {out.shape[1]}")
        if not np.isfinite(f).all():
            return False
        out.copy_(torch.from_numpy(f if idx is None else f[idx]))
        return True
    rows = max(1, READ_BAND_TOKENS // w)
    pos = 0
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        band = store.feature_rows(index, layer, start, stop, dtype=None).reshape((stop - start) * w, -1)
        if band.shape[1] != out.shape[1]:
            raise PosvitError(f"image '{store.record(index).name}' has {band.shape[1]} channels, the store "
                              f"{out.shape[1]}")
        if band.dtype not in (np.float16, np.float32):
            band = band.astype(np.float32)
        if not np.isfinite(band).all():
            return False
        if idx is not None:
            lo, hi = np.searchsorted(idx, [start * w, stop * w])
            band = band[idx[lo:hi] - start * w]
        out[pos : pos + len(band)] = torch.from_numpy(band)
        pos += len(band)
    return True


def load_token_cache(
    store,
    *,
    layer: str = "final",
    max_tokens: int = 4_000_000,
    image_tokens: int | None = None,
    seed: int = 0,
    device="cpu",
    progress: ProgressCallback | None = None,
) -> TokenCache:
    """Read a store's tokens once into memory (the device's), sampling evenly when there are too many.

    Parameters
    ----------
    store : FeatureStore
    layer : str
        Stored layer (RASA is defined on ``final``).
    max_tokens : int
        Upper bound on cached tokens; above it every image contributes the same fraction of its tokens, drawn
        at random (``seed``). Memory: ``max_tokens × D × 2`` bytes for float16 stores.
    image_tokens : int, optional
        Most tokens one image contributes (default :data:`MAX_IMAGE_TOKENS`); a larger image gives a random
        sample of this many (``seed``), read in row bands, so one huge image never sits in memory whole.
    seed : int
    device : str or torch.device
    progress : callable, optional
        ``progress("read tokens", done, n_images)``.

    Raises
    ------
    PosvitError
        Empty store, missing layer, or non-finite features.
    """
    torch = _torch()
    progress = report(progress)
    if len(store) == 0:
        raise PosvitError(f"'{store.source}' holds no images: nothing to train on")
    layer = store.check_layer(layer)
    if max_tokens < 1:
        raise PosvitError(f"--max-tokens must be at least 1, got {max_tokens}")
    cap = MAX_IMAGE_TOKENS if image_tokens is None else int(image_tokens)
    if cap < 1:
        raise PosvitError(f"the per-image token cap must be at least 1, got {cap}")
    records = store.records
    counts = np.array([r.grid[0] * r.grid[1] for r in records], dtype=np.int64)
    total = int(counts.sum())
    keep = np.maximum(1, np.floor(counts * (max_tokens / total)).astype(np.int64)) if total > max_tokens else counts
    keep = np.minimum(keep, cap)
    sampled = total > max_tokens or bool((keep < counts).any())
    M = int(keep.sum())
    D = store.channels or int(store.feature_rows(0, layer, 0, 1).shape[-1])
    dtype = torch.float16 if store.dtype == "float16" else torch.float32
    tokens = torch.empty((M, D), dtype=dtype)
    coords = torch.empty((M, 2), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    grids: dict[str, int] = {}
    pos = 0
    bad = []
    progress("read tokens", 0, len(records))
    for i, r in enumerate(records):
        h, w = r.grid
        k = int(keep[i])
        idx = np.sort(rng.choice(h * w, size=k, replace=False)) if k < h * w else None
        if not _read_tokens(store, r.index, layer, (h, w), idx, tokens[pos : pos + k]):
            bad.append(r.name)
            continue
        coords[pos : pos + k] = torch.from_numpy(grid_coordinates(h, w) if idx is None
                                                 else _token_coordinates(h, w, idx))
        pos += k
        grids[f"{h}x{w}"] = grids.get(f"{h}x{w}", 0) + 1
        progress("read tokens", i + 1, len(records))
    if bad:
        raise PosvitError(
            f"features of {len(bad)} image(s) contain NaN or inf (first: '{bad[0]}'): re-extract them, e.g. with "
            "--dtype float32"
        )
    device = torch.device(device)
    offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    return TokenCache(tokens=tokens.to(device), coords=coords.to(device), n_images=len(records), sampled=sampled,
                      grids=grids, offsets=offsets)

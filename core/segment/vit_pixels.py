"""ViT tokens → per-pixel feature maps for trainable segmentation.

A token grid ``(h, w, C)`` is reduced to a few channels and upsampled to the image's pixels:

1. z-score every channel over the image's tokens,
2. PCA to ``dims`` components (9 by default), each component's sign chosen so its skewness is ≥ 0 (a
   deterministic choice, so similar images get similarly oriented components),
3. min-max each component to [0, 1],
4. bilinear interpolation to pixel positions (token centres at half-token offsets; edge tokens extend to the
   border), evaluated for any pixel rectangle so that tiles of an image get exactly the whole image's values.

The z-score / PCA / min-max statistics are fitted per image (``pca="per-image"``, as in the reference) or once
on all training images and stored with the model (``pca="shared"``, so that the components mean the same on
every image).

Tokens are read from a :class:`~posvit_cli.core.features.store.FeatureStore` in row bands, so a huge image's token grid
is never held at full width in float32 (only its reduced ``(h, w, dims)`` grid is).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.provenance import STORAGE_KEYS, identity_differences

__all__ = [
    "PCA_POLICIES",
    "ExtractedStore",
    "ReducedTokens",
    "SharedPCA",
    "TokenSource",
    "VitConfig",
    "fit_shared_pca",
    "identity_mismatch",
    "reduce_tokens",
    "upsample_region",
]

PCA_POLICIES = ("per-image", "shared")
_BAND_TOKENS = 1 << 15  # tokens per band read from a store: float64 working copies of 384 channels stay ~100 MB


@dataclasses.dataclass
class VitConfig:
    """How ViT features enter the pixel features.

    Attributes
    ----------
    dims : int
        PCA components kept.
    pca : {"per-image", "shared"}
    layer : str
        Store layer.
    encoder : dict
        Identity of the features: the store provenance keys that must match at apply time (model, weights
        hash, layer, preprocessing, debias, ...), and what is needed to extract on the fly.
    """

    dims: int = 9
    pca: str = "per-image"
    layer: str = "final"
    encoder: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pca not in PCA_POLICIES:
            raise PosvitError(f"unknown PCA policy '{self.pca}': use {' or '.join(PCA_POLICIES)}")
        if self.dims < 1:
            raise PosvitError("--vit-dims must be at least 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VitConfig:
        return cls(dims=int(d["dims"]), pca=d["pca"], layer=d["layer"], encoder=dict(d.get("encoder", {})))


@dataclasses.dataclass
class SharedPCA:
    """z-score, PCA and min-max statistics fitted on the tokens of several images.

    Attributes
    ----------
    mean, scale : ndarray of float32, shape (C,)
    components : ndarray of float32, shape (dims, C)
    lo, hi : ndarray of float32, shape (dims,)
        Range of each component over the fitting tokens.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"pca_{k}": getattr(self, k) for k in ("mean", "scale", "components", "lo", "hi")}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SharedPCA:
        return cls(**{k: np.asarray(arrays[f"pca_{k}"], np.float32) for k in ("mean", "scale", "components", "lo", "hi")})


@dataclasses.dataclass
class ReducedTokens:
    """One image's reduced token grid and how it maps to the image's pixels.

    Attributes
    ----------
    grid : ndarray of float32, shape (h, w, dims)
        Values in [0, 1].
    covered : (int, int)
        Height and width in pixels of the image area the token grid spans (the whole image, or for natively
        tiled extraction the patch-aligned top-left part; pixels beyond take the edge tokens' values).
    """

    grid: np.ndarray
    covered: tuple[int, int]


# --------------------------------------------------------------------------------------------------------------
# Statistics


class _Moments:
    """Streaming mean and covariance of token rows (float64)."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = np.zeros(channels)
        self.outer = np.zeros((channels, channels))

    def add(self, X: np.ndarray) -> None:
        X = X.astype(np.float64, copy=False)
        self.n += X.shape[0]
        self.sum += X.sum(0)
        self.outer += X.T @ X

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.sum / max(self.n, 1)
        cov = self.outer / max(self.n, 1) - np.outer(mu, mu)
        return mu, cov


def _pca_from_moments(mu: np.ndarray, cov: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z-score parameters and the top ``dims`` principal axes of the standardised data."""
    var = np.clip(np.diag(cov), 0.0, None)
    sd = np.sqrt(var)
    sd[sd < 1e-12] = 1.0
    corr = cov / np.outer(sd, sd)
    evals, evecs = np.linalg.eigh(corr)
    order = np.argsort(evals)[::-1][:dims]
    return mu, sd, evecs[:, order].T  # (dims, C)


def _orient_by_skew(proj: np.ndarray, components: np.ndarray) -> None:
    """Flip components (in place) so the projections have non-negative skewness."""
    centred = proj - proj.mean(0)
    skew = (centred**3).mean(0)
    flip = skew < 0
    proj[:, flip] *= -1
    components[flip] *= -1


def _check_dims(dims: int, channels: int) -> None:
    if dims > channels:
        raise PosvitError(f"--vit-dims {dims} exceeds the {channels} feature channels of the store")


def reduce_tokens(tokens: np.ndarray, dims: int = 9, shared: SharedPCA | None = None) -> np.ndarray:
    """Reduce one image's token grid to ``dims`` channels in [0, 1].

    Parameters
    ----------
    tokens : ndarray, shape (h, w, C)
    dims : int
    shared : SharedPCA, optional
        Statistics fitted on training images; without it, z-score, PCA and min-max are fitted on ``tokens``.

    Returns
    -------
    ndarray of float32, shape (h, w, dims)
    """
    t = np.asarray(tokens, np.float32)
    h, w, c = t.shape
    return _reduce_bands(lambda: iter([t.reshape(h * w, c)]), (h, w), c, dims, shared)


def _reduce_bands(bands, hw: tuple[int, int], channels: int, dims: int, shared: SharedPCA | None) -> np.ndarray:
    """:func:`reduce_tokens` over an iterable of token-row bands (``bands()`` restarts the iteration)."""
    h, w = hw
    if shared is not None:
        mu, sd, comps = shared.mean, shared.scale, shared.components
        if comps.shape[1] != channels:
            raise PosvitError(f"the store has {channels} channels; the model's PCA was fitted on {comps.shape[1]}")
    else:
        _check_dims(dims, channels)
        mom = _Moments(channels)
        for X in bands():
            mom.add(X)
        mu, sd, comps = _pca_from_moments(*mom.mean_cov(), dims)
    comps = np.array(comps, np.float64)
    proj = np.concatenate([((X.astype(np.float64) - mu) / sd) @ comps.T for X in bands()], axis=0)
    if shared is not None:
        lo, hi = shared.lo.astype(np.float64), shared.hi.astype(np.float64)
    else:
        _orient_by_skew(proj, comps)
        lo, hi = proj.min(0), proj.max(0)
    rng = np.where(hi > lo, hi - lo, 1.0)
    out = np.clip((proj - lo) / rng, 0.0, 1.0)
    return out.reshape(h, w, -1).astype(np.float32)


def fit_shared_pca(token_sets: Sequence[np.ndarray] | Iterator[np.ndarray], dims: int = 9) -> SharedPCA:
    """Fit z-score, PCA and min-max on the tokens of several images.

    Parameters
    ----------
    token_sets : iterable of ndarray, shape (n_i, C)
        Token rows of each image (or bands of them).
    dims : int

    Returns
    -------
    SharedPCA
    """
    sets = [np.asarray(t, np.float32).reshape(-1, np.shape(t)[-1]) for t in token_sets]
    if not sets:
        raise PosvitError("no tokens to fit a PCA on")
    c = sets[0].shape[1]
    _check_dims(dims, c)
    mom = _Moments(c)
    for X in sets:
        mom.add(X)
    mu, sd, comps = _pca_from_moments(*mom.mean_cov(), dims)
    proj = np.concatenate([((X.astype(np.float64) - mu) / sd) @ comps.T for X in sets])
    comps = np.array(comps)
    _orient_by_skew(proj, comps)
    return SharedPCA(
        mean=mu.astype(np.float32), scale=sd.astype(np.float32), components=comps.astype(np.float32),
        lo=proj.min(0).astype(np.float32), hi=proj.max(0).astype(np.float32),
    )


# --------------------------------------------------------------------------------------------------------------
# Upsampling


def _axis_weights(start: int, stop: int, n_tokens: int, covered: int):
    """Bilinear source indices and weights for pixels ``start:stop`` along one axis."""
    pix = np.arange(start, stop, dtype=np.float64)
    t = (pix + 0.5) * (n_tokens / covered) - 0.5
    t = np.clip(t, 0.0, n_tokens - 1)
    i0 = np.floor(t).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_tokens - 1)
    frac = (t - i0).astype(np.float32)
    return i0, i1, frac


def upsample_region(reduced: ReducedTokens, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Bilinear pixel values of a reduced token grid over a pixel rectangle.

    Parameters
    ----------
    reduced : ReducedTokens
    rows, cols : (int, int)
        Pixel ranges ``[start, stop)`` in image coordinates.

    Returns
    -------
    ndarray of float32, shape (rows[1] - rows[0], cols[1] - cols[0], dims)
        The same values for a pixel whichever rectangle it is computed in.
    """
    g = reduced.grid
    h, w, _ = g.shape
    r0, r1, fr = _axis_weights(rows[0], rows[1], h, reduced.covered[0])
    c0, c1, fc = _axis_weights(cols[0], cols[1], w, reduced.covered[1])
    a = g[r0] * (1.0 - fr)[:, None, None] + g[r1] * fr[:, None, None]  # (ny, w, k)
    return (a[:, c0] * (1.0 - fc)[None, :, None] + a[:, c1] * fc[None, :, None]).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Stores as token sources


def _norm(p: str) -> str:
    return os.path.normcase(os.path.abspath(p))


class TokenSource:
    """Finds an image's tokens in a feature store and reduces them.

    Parameters
    ----------
    store : FeatureStore
    layer : str, optional
        Store layer (default: the store's default layer).
    """

    def __init__(self, store, layer: str | None = None):
        self.store = store
        self.layer = store.check_layer(layer)
        size = store.size_rule
        if size.startswith("crop"):
            raise PosvitError(
                f"'{store.source}' was extracted with --size {size}: centre-cropped features do not cover the "
                "image; extract with native, short:N, long:N or square:N for segmentation"
            )
        self.native = size == "native"
        self._by_path = {}
        self._by_stem: dict[str, list] = {}
        for r in store.records:
            self._by_path[_norm(r.path)] = r
            self._by_path.setdefault(r.path, r)
            self._by_stem.setdefault(r.name, []).append(r)

    def identity(self) -> dict:
        """Provenance keys that define what these features are (checked when a model is applied)."""
        prov = self.store.provenance
        ident = {k: v for k, v in self.store.identity.items() if k not in STORAGE_KEYS}
        ident.update({k: prov[k] for k in ("timm_name", "weights", "seed") if k in prov})  # descriptive
        ident["layer"] = self.layer
        return ident

    def record_for(self, path: str | os.PathLike):
        """The store record of an image, matched by path, then by unique file stem.

        Raises
        ------
        PosvitError
            If the image is not in the store or its stem is ambiguous.
        """
        from posvit_cli.core.io.labels import stem

        p = str(path)
        for key in (_norm(p), p):
            if key in self._by_path:
                return self._by_path[key]
        hits = self._by_stem.get(stem(p), [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise PosvitError(
                f"'{Path(p).name}' matches {len(hits)} images in '{self.store.source}' by name; "
                "extract features with the same paths you pass here"
            )
        raise PosvitError(f"no features for '{p}' in '{self.store.source}' (matched by path and by file stem)")

    def _bands(self, record) -> callable:
        h, w = record.grid
        rows = max(1, _BAND_TOKENS // max(w, 1))

        def bands():
            for y in range(0, h, rows):
                # Through the store's checked reader: a damaged Zarr chunk is an error, not zeros.
                band = self.store.feature_rows(record.index, self.layer, y, min(h, y + rows))
                if not np.isfinite(band).all():
                    # NaN would surface later as a bare LinAlgError or scikit-learn ValueError naming no image.
                    raise self._nonfinite(record)
                yield band.reshape(-1, band.shape[-1])

        return bands

    def _nonfinite(self, record) -> PosvitError:
        return PosvitError(
            f"features of '{record.path}' in '{self.store.source}' contain NaN or inf: re-extract them (e.g. with "
            "--dtype float32); posvit does not zero them"
        )

    def check_finite(self, path) -> None:
        """Read all tokens of one image (in row bands) and raise if any is NaN or infinite.

        Raises
        ------
        PosvitError
            Naming the store and the image, when its features hold NaN or inf.
        """
        for _ in self._bands(self.record_for(path))():
            pass

    def covered(self, record) -> tuple[int, int]:
        """Pixel extent of the image that the token grid spans."""
        if self.native and record.meta.get("tiles"):
            return tuple(int(v) for v in record.proc_size)
        return tuple(int(v) for v in record.orig_size)

    def reduced(self, path, image_hw: tuple[int, int], dims: int, shared: SharedPCA | None = None) -> ReducedTokens:
        """The reduced token grid of one image.

        Raises
        ------
        PosvitError
            If the store's features come from an image of another size.
        """
        rec = self.record_for(path)
        if tuple(rec.orig_size) != tuple(image_hw):
            raise PosvitError(
                f"features of '{Path(str(path)).name}' in '{self.store.source}' come from a "
                f"{rec.orig_size[0]}×{rec.orig_size[1]} image, but the image is {image_hw[0]}×{image_hw[1]}"
            )
        h, w = rec.grid
        grid = _reduce_bands(self._bands(rec), (h, w), self.store.channels or 0, dims, shared)
        return ReducedTokens(grid=grid, covered=self.covered(rec))

    def token_rows(self, path) -> np.ndarray:
        """All token rows of one image, shape ``(h·w, C)`` float32 (for fitting a shared PCA)."""
        rec = self.record_for(path)
        return np.concatenate(list(self._bands(rec)()), axis=0)


# --------------------------------------------------------------------------------------------------------------
# Extracting on the fly


def identity_mismatch(trained: dict, given: dict) -> list[str]:
    """Names of the identity entries that differ between two feature identities (empty when compatible).

    The identity keys of :mod:`posvit_cli.core.features.provenance` plus the layer; how the tokens were stored
    and whether they were extracted in tiles may differ, and entries a saved model predates are not compared.
    """
    bad = ["layer"] if (trained.get("layer") or None) != (given.get("layer") or None) else []
    return bad + identity_differences(trained, given, ignore=STORAGE_KEYS + ("tiling",), missing_ok=True)


class ExtractedStore:
    """A temporary feature store extracted for segmentation; removed on :meth:`close`.

    Parameters
    ----------
    paths : sequence of path
        Images to extract.
    model, weights : str
        Encoder (any name :func:`posvit_cli.core.features.encoders.load_encoder` accepts) and weights.
    layer : str
        Layer to keep (``final`` or a block index).
    size, intensity : str
        Resize and intensity rules (as ``posvit extract``).
    device : str
    seed : int
        Seed of random weights.
    max_side, tile : int
        Images whose processed longer side exceeds ``max_side`` are extracted in ``tile``-px tiles.
    """

    def __init__(self, paths, *, model: str, weights: str = "pretrained", layer: str = "final",
                 size: str = "native", intensity: str = "auto", device: str = "cpu", seed: int = 0,
                 batch_size: int = 4, max_side: int = 2048, tile: int = 1024, progress=None):
        import shutil
        import tempfile

        from posvit_cli.core.device import resolve_device
        from posvit_cli.core.features.encoders import load_encoder
        from posvit_cli.core.features.extract import ExtractOptions, extract_images, extraction_provenance
        from posvit_cli.core.io.preprocess import parse_size, plan_resize
        from posvit_cli.core.segment.training_labels import image_hw
        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.features.writer import StoreWriter

        self._dir = tempfile.mkdtemp(prefix="posvit-seg-")
        self.store = None
        try:
            dev = resolve_device(device)
            encoder = load_encoder(model, weights, device=str(dev), seed=seed)
            layers = encoder.layer_names([layer])
            mode = parse_size(size)
            patch = encoder.patch_size
            tile_px = max(patch, tile - tile % patch)
            small, large = [], []
            for p in paths:
                resize_hw, crop = plan_resize(image_hw(p), mode, patch)
                (large if max(crop or resize_hw) > max_side else small).append(p)
            opts = ExtractOptions(layers=layers, size=mode, intensity=intensity, batch_size=batch_size,
                                  max_side=max_side, strict=True, workers=0)
            prov = extraction_provenance(encoder, opts, device=dev)
            if weights == "random":
                prov["seed"] = seed
            out = os.path.join(self._dir, "features.h5")
            writer = StoreWriter(out, provenance=prov, layers=layers, dtype="float32")
            try:
                if small:
                    extract_images(small, encoder, writer, opts, device=dev, progress=progress)
                if large:
                    tiled = dataclasses.replace(opts, tile=tile_px, overlap=2 * patch)
                    extract_images(large, encoder, writer, tiled, device=dev, progress=progress)
            except BaseException:
                writer.abort()
                raise
            writer.close(complete=True)
            self.store = FeatureStore(out)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    def close(self) -> None:
        import shutil

        if self.store is not None:
            self.store.close()
            self.store = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> ExtractedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

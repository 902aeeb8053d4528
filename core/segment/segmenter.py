"""Trainable (scribble) segmentation: per-pixel features, training, tiled application and the model file.

Pixel features are the classical filter bank (:mod:`posvit_cli.core.segment.filters`) followed by ViT token features
reduced and upsampled to pixels (:mod:`posvit_cli.core.segment.vit_pixels`); a classifier
(:mod:`posvit_cli.core.segment.classifiers`) is fitted on the labelled pixels of scribble images (0 = unlabelled,
other values = classes) and applied to every pixel of new images, tile by tile.

Tiling: an image is cut into ``tile × tile`` cores; each core's classical features are computed on the core plus
:attr:`ClassicalConfig.halo` pixels of context (plus the CRF's reach when the CRF is on), so tiled and untiled
results agree to float rounding, and memory is bounded by one tile's features whatever the image size.

The model file (``.posvit-seg``) is a zip archive holding ``segmenter.json`` (classes, feature settings, encoder
identity, classifier settings, training summary), the classifier in its own format (XGBoost UBJSON or an ``.npz``
of arrays) and, for a shared PCA, ``pca.npz``. Nothing in it is unpickled; it is written to a temporary file
and renamed, so a model file under its final name is always complete.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.fileio import atomic_path, json_text
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.segment.classes import ClassTable, LabelledImage
from posvit_cli.core.segment.classifiers import ClassifierConfig, PixelClassifier, load_classifier
from posvit_cli.core.segment.crf import CrfConfig, crf_halo, mean_field_crf
from posvit_cli.core.segment.filters import ClassicalConfig, classical_features, feature_names
from posvit_cli.core.segment.vit_pixels import ReducedTokens, SharedPCA, VitConfig, upsample_region

__all__ = [
    "MODEL_FORMAT",
    "MODEL_SUFFIX",
    "FeatureSpec",
    "Segmenter",
    "gather_training_pixels",
    "label_palette",
    "ProbabilityWriter",
    "load_grey",
    "load_segmenter",
    "pixel_features",
    "segment_image",
    "tile_boxes",
    "train_segmenter",
    "warn",
    "write_label_image",
]

MODEL_FORMAT = "posvit-segmenter"
MODEL_VERSION = 1
MODEL_SUFFIX = ".posvit-seg"
#: Pixels per classifier call: bounds the memory of one prediction batch.
_PREDICT_ROWS = 1 << 18


# --------------------------------------------------------------------------------------------------------------
# Images


def load_grey(path: str | os.PathLike, intensity: str = "auto") -> np.ndarray:
    """Read an image as greyscale float32 in [0, 1], shape ``(H, W)`` (RGB → luminance, alpha dropped).

    16-bit, 32-bit and float images are min-max scaled per image with ``intensity="auto"``
    (see :func:`posvit_cli.core.io.images.to_float`).
    """
    from posvit_cli.core.io.images import read_image, to_channels, to_float

    img = to_float(read_image(path), intensity)
    return np.ascontiguousarray(to_channels(img, 1)[..., 0], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Pixel features


def tile_boxes(height: int, width: int, tile: int | None) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Row and column ranges of the tile cores covering an image (one box when ``tile`` is None or larger)."""
    if not tile or (height <= tile and width <= tile):
        return [((0, height), (0, width))]
    return [((y, min(height, y + tile)), (x, min(width, x + tile)))
            for y in range(0, height, tile) for x in range(0, width, tile)]


@dataclasses.dataclass
class FeatureSpec:
    """What pixel features a segmenter uses.

    Attributes
    ----------
    classical : ClassicalConfig or None
    vit : VitConfig or None
    intensity : str
        Intensity rule applied to images before the classical features.
    """

    classical: ClassicalConfig | None
    vit: VitConfig | None
    intensity: str = "auto"

    def __post_init__(self) -> None:
        if self.classical is None and self.vit is None:
            raise PosvitError("no features: enable classical features or give ViT features (--features/--model)")

    @property
    def names(self) -> list[str]:
        out = feature_names(self.classical) if self.classical else []
        if self.vit:
            out += [f"vit_pc{i + 1}" for i in range(self.vit.dims)]
        return out

    @property
    def halo(self) -> int:
        return self.classical.halo if self.classical else 0


def pixel_features(
    grey: np.ndarray,
    rows: tuple[int, int],
    cols: tuple[int, int],
    spec: FeatureSpec,
    reduced: ReducedTokens | None,
    *,
    device: str = "cpu",
    threads: int | None = None,
) -> np.ndarray:
    """Per-pixel features of a rectangle of an image.

    Parameters
    ----------
    grey : ndarray, shape (H, W)
        The whole image (intensities in [0, 1]); context around the rectangle is read from it.
    rows, cols : (int, int)
        Pixel ranges ``[start, stop)``.
    spec : FeatureSpec
    reduced : ReducedTokens or None
        The image's reduced token grid (required when ``spec.vit`` is set).

    Returns
    -------
    ndarray of float32, shape (rows, cols, F)
        Channels in the order of ``spec.names``; a channel-last view of a channel-planar buffer (select pixels
        or row blocks, or call ``numpy.ascontiguousarray``).
    """
    H, W = grey.shape
    ny, nx = rows[1] - rows[0], cols[1] - cols[0]
    n_classical = len(feature_names(spec.classical)) if spec.classical is not None else 0
    n_vit = spec.vit.dims if spec.vit is not None else 0
    if spec.vit is not None and reduced is None:
        raise PosvitError("this segmenter uses ViT features: give a feature store or an encoder")
    classical = None
    if spec.classical is not None:
        halo = spec.halo
        y0, y1 = max(0, rows[0] - halo), min(H, rows[1] + halo)
        x0, x1 = max(0, cols[0] - halo), min(W, cols[1] + halo)
        f = classical_features(grey[y0:y1, x0:x1], spec.classical, device=device, threads=threads)
        classical = f[rows[0] - y0 : rows[1] - y0, cols[0] - x0 : cols[1] - x0]
        if n_vit == 0:
            return classical
    # Channel-planar buffer, as classical_features returns: cheap to fill, transposed per row block to predict.
    out = np.empty((n_classical + n_vit, ny, nx), np.float32)
    if classical is not None:
        out[:n_classical] = classical.transpose(2, 0, 1)
        del classical, f
    out[n_classical:] = upsample_region(reduced, rows, cols).transpose(2, 0, 1)
    return out.transpose(1, 2, 0)


# --------------------------------------------------------------------------------------------------------------
# The segmenter


class Segmenter:
    """A trained pixel classifier with everything needed to compute its features.

    Attributes
    ----------
    classes : ClassTable
    spec : FeatureSpec
    classifier : PixelClassifier
    shared_pca : SharedPCA or None
    training : dict
        Summary of the training run (images, pixels per class, times).
    """

    def __init__(self, classes: ClassTable, spec: FeatureSpec, classifier: PixelClassifier,
                 shared_pca: SharedPCA | None = None, training: dict | None = None):
        self.classes = classes
        self.spec = spec
        self.classifier = classifier
        self.shared_pca = shared_pca
        self.training = dict(training or {})

    @property
    def feature_names(self) -> list[str]:
        return self.spec.names

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities of per-pixel features ``(N, F)`` or ``(H, W, F)`` → ``(..., K)`` float32.

        Predicts in bounded batches of rows; a channel-planar ``(H, W, F)`` view (as :func:`pixel_features`
        returns) is made pixel-contiguous one row block at a time.
        """
        K = len(self.classes)
        if features.ndim == 2:
            out = np.empty((features.shape[0], K), np.float32)
            for s in range(0, features.shape[0], _PREDICT_ROWS):
                out[s : s + _PREDICT_ROWS] = self.classifier.predict_proba(features[s : s + _PREDICT_ROWS])
            return out
        H, W, F = features.shape
        out = np.empty((H, W, K), np.float32)
        step = max(1, _PREDICT_ROWS // max(W, 1))
        for y in range(0, H, step):
            block = np.ascontiguousarray(features[y : y + step]).reshape(-1, F)
            out[y : y + step] = self.classifier.predict_proba(block).reshape(-1, W, K)
        return out

    def describe(self) -> dict:
        """A JSON-ready description (what ``segmenter.json`` holds, minus file references)."""
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "classes": self.classes.to_dict(),
            "features": {
                "intensity": self.spec.intensity,
                "classical": self.spec.classical.to_dict() if self.spec.classical else None,
                "vit": self.spec.vit.to_dict() if self.spec.vit else None,
                "names": self.feature_names,
            },
            "training": self.training,
        }

    # -- persistence -------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the model file atomically (temporary file in the same folder, then rename).

        Raises
        ------
        PosvitError
            If the file exists and ``overwrite`` is False, or its folder does not exist.
        """
        from posvit_cli import __version__

        path = Path(path)
        if path.exists() and not overwrite:
            raise PosvitError(f"'{path}' already exists: pass --overwrite to replace it")
        if not path.parent.exists():
            raise PosvitError(f"output folder '{path.parent}' does not exist")
        meta = self.describe()
        clf_meta, files = self.classifier.to_files()
        meta["classifier"] = clf_meta
        meta["posvit_version"] = __version__
        meta["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self.shared_pca is not None:
            buf = io.BytesIO()
            np.savez(buf, **self.shared_pca.arrays())
            files["pca.npz"] = buf.getvalue()
            meta["features"]["vit"]["pca_file"] = "pca.npz"
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("segmenter.json", json_text(meta, default=str))
            for name, data in files.items():
                z.writestr(name, data)
        return path


def load_segmenter(path: str | os.PathLike) -> Segmenter:
    """Read a ``.posvit-seg`` model file (JSON, XGBoost UBJSON and ``.npz`` arrays; no pickle).

    Raises
    ------
    PosvitError
        If the file is missing, not a posvit segmenter, or from a newer posvit.
    """
    path = Path(path)
    if not path.is_file():
        raise PosvitError(f"model file '{path}' does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("segmenter.json"))
            files = {n: z.read(n) for n in z.namelist() if n != "segmenter.json"}
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise PosvitError(f"'{path}' is not a posvit segmenter model ({type(exc).__name__})") from exc
    if meta.get("format") != MODEL_FORMAT:
        raise PosvitError(f"'{path}' is not a posvit segmenter model")
    if int(meta.get("version", 0)) > MODEL_VERSION:
        raise PosvitError(f"'{path}' was written by a newer posvit (model version {meta['version']}): upgrade posvit")
    feats = meta["features"]
    classical = ClassicalConfig.from_dict(feats["classical"]) if feats.get("classical") else None
    vit = VitConfig.from_dict(feats["vit"]) if feats.get("vit") else None
    shared = None
    if vit is not None and feats["vit"].get("pca_file"):
        with np.load(io.BytesIO(files[feats["vit"]["pca_file"]]), allow_pickle=False) as z:
            shared = SharedPCA.from_arrays({k: z[k] for k in z.files})
    spec = FeatureSpec(classical=classical, vit=vit, intensity=feats.get("intensity", "auto"))
    classifier = load_classifier(meta["classifier"], files)
    if classifier.n_features != len(spec.names):
        raise PosvitError(f"'{path}' is inconsistent: {classifier.n_features} classifier inputs, "
                          f"{len(spec.names)} features")
    return Segmenter(ClassTable.from_dict(meta["classes"]), spec, classifier, shared, meta.get("training"))


# --------------------------------------------------------------------------------------------------------------
# Training


ReducedFor = Callable[[str, tuple[int, int]], "ReducedTokens | None"]


def gather_training_pixels(
    images: Sequence[LabelledImage],
    spec: FeatureSpec,
    reduced_for: ReducedFor | None,
    *,
    n_classes: int,
    max_samples: int | None = None,
    seed: int = 0,
    tile: int | None = 1024,
    device: str = "cpu",
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and classes of the labelled pixels of several images.

    Features are computed only for tiles that hold a labelled pixel. With ``max_samples``, a random subset is
    kept: every pixel of a class with fewer than its share, a uniform sample of the others (so a rare class is
    never sampled away; the class balance is restored by sample weights when fitting).

    Returns
    -------
    X : ndarray of float32, shape (N, F)
    y : ndarray of int64, shape (N,)
    """
    progress = report(progress)
    rng = np.random.default_rng(seed)
    counts = [int((im.labels >= 0).sum()) for im in images]
    total = sum(counts)
    keep_masks: list[np.ndarray | None] = [None] * len(images)
    if max_samples and total > max_samples:
        chosen = _class_aware_subset(np.concatenate([im.labels[im.labels >= 0] for im in images]), n_classes,
                                     max_samples, rng)
        start = 0
        for i, n in enumerate(counts):
            keep_masks[i] = chosen[start : start + n]
            start += n
    Xs, ys = [], []
    progress("features", 0, len(images))
    for i, im in enumerate(images):
        labelled = im.labels >= 0
        if keep_masks[i] is not None:
            sel = np.zeros(im.labels.shape, bool)
            sel[labelled] = keep_masks[i]
            labelled = sel
        grey = load_grey(im.path, spec.intensity)
        reduced = reduced_for(im.path, grey.shape) if (spec.vit is not None and reduced_for) else None
        for rows, cols in tile_boxes(*grey.shape, tile):
            m = labelled[rows[0] : rows[1], cols[0] : cols[1]]
            if not m.any():
                continue
            f = pixel_features(grey, rows, cols, spec, reduced, device=device, threads=threads)
            Xs.append(f[m])
            ys.append(im.labels[rows[0] : rows[1], cols[0] : cols[1]][m].astype(np.int64))
        progress("features", i + 1, len(images))
    if not Xs:
        raise PosvitError("no labelled pixels to train on")
    X = np.concatenate(Xs)
    y = np.concatenate(ys)
    missing = np.flatnonzero(np.bincount(y, minlength=n_classes) == 0)
    if missing.size:
        raise PosvitError(f"class index {int(missing[0])} has no labelled pixel in the training images")
    return X, y


def _class_aware_subset(y: np.ndarray, n_classes: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Mask of at most ``budget`` entries of ``y``: small classes whole, the rest sampled to equal shares."""
    counts = np.bincount(y, minlength=n_classes)
    quota = np.zeros(n_classes, np.int64)
    left, open_classes = budget, [c for c in np.argsort(counts) if counts[c] > 0]
    while open_classes:
        share = left // len(open_classes)
        c = open_classes[0]
        if counts[c] <= share:
            quota[c] = counts[c]
            left -= counts[c]
            open_classes.pop(0)
        else:
            for c in open_classes:
                quota[c] = share
            break
    keep = np.zeros(y.size, bool)
    for c in range(n_classes):
        idx = np.flatnonzero(y == c)
        keep[idx if quota[c] >= idx.size else rng.choice(idx, quota[c], replace=False)] = True
    return keep


def train_segmenter(
    images: Sequence[LabelledImage],
    classes: ClassTable,
    spec: FeatureSpec,
    classifier: ClassifierConfig,
    *,
    reduced_for: ReducedFor | None = None,
    shared_pca: SharedPCA | None = None,
    max_samples: int | None = 500_000,
    seed: int = 0,
    tile: int | None = 1024,
    device: str = "cpu",
    threads: int | None = None,
    progress: ProgressCallback | None = None,
) -> Segmenter:
    """Train a segmenter on scribbled images.

    Parameters
    ----------
    images : sequence of LabelledImage
        Images with their class-index label maps (−1 = unlabelled).
    classes : ClassTable
    spec : FeatureSpec
    classifier : ClassifierConfig
    reduced_for : callable, optional
        ``reduced_for(path, (H, W)) -> ReducedTokens``: the image's reduced ViT tokens (needed with
        ``spec.vit``).
    shared_pca : SharedPCA, optional
        Stored with the model when ``spec.vit.pca == "shared"``.
    max_samples : int or None
        Upper bound on training pixels (uniform subsample).
    tile : int or None
        Tile side for feature computation.

    Returns
    -------
    Segmenter
    """
    import time

    if not images:
        raise PosvitError("no labelled images to train on")
    t0 = time.perf_counter()
    X, y = gather_training_pixels(
        images, spec, reduced_for, n_classes=len(classes), max_samples=max_samples, seed=seed, tile=tile,
        device=device, threads=threads, progress=progress,
    )
    t1 = time.perf_counter()
    report(progress)("train classifier", 0, 1)
    model = PixelClassifier.fit(X, y, len(classes), classifier)
    report(progress)("train classifier", 1, 1)
    t2 = time.perf_counter()
    counts = np.bincount(y, minlength=len(classes))
    training = {
        "images": [im.path for im in images],
        "pixels_per_class": {n: int(c) for n, c in zip(classes.names, counts)},
        "samples": int(y.size),
        "classifier": classifier.to_dict(),
        "feature_seconds": round(t1 - t0, 3),
        "fit_seconds": round(t2 - t1, 3),
    }
    return Segmenter(classes, spec, model, shared_pca, training)


# --------------------------------------------------------------------------------------------------------------
# Application


def segment_image(
    segmenter: Segmenter,
    grey: np.ndarray,
    reduced: ReducedTokens | None = None,
    *,
    tile: int | None = 1024,
    crf: CrfConfig | None = None,
    probabilities: np.ndarray | bool = False,
    device: str = "cpu",
    threads: int | None = None,
    progress: ProgressCallback | None = None,
    task: str = "segment",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment one image, tile by tile.

    Parameters
    ----------
    segmenter : Segmenter
    grey : ndarray, shape (H, W)
        The image in [0, 1] (:func:`load_grey` with the segmenter's intensity rule).
    reduced : ReducedTokens, optional
        Reduced ViT tokens, when the segmenter uses them.
    tile : int or None
        Tile core side in pixels (None: the whole image at once).
    crf : CrfConfig, optional
        Refine probabilities with the mean-field CRF (tiles then carry :func:`crf_halo` more context).
    probabilities : bool or ndarray
        False: no probabilities; True: return them as ``(H, W, K)``; an array of shape ``(K, H, W)`` (for
        instance a memory-mapped TIFF): fill it.

    Returns
    -------
    labels : ndarray, shape (H, W)
        Class label values (uint8 when they fit, else uint16/uint32).
    probs : ndarray of float32, shape (H, W, K), or None
    """
    progress = report(progress)
    H, W = grey.shape
    K = len(segmenter.classes)
    values = np.asarray(segmenter.classes.values)
    dtype = np.uint8 if values.max() <= 255 else (np.uint16 if values.max() <= 65535 else np.uint32)
    labels = np.empty((H, W), dtype)
    probs_chw = probs_hwk = None
    if isinstance(probabilities, np.ndarray):
        probs_chw = probabilities
        if probs_chw.shape != (K, H, W):
            raise ValueError(f"probability buffer must be {(K, H, W)}, got {probs_chw.shape}")
    elif probabilities:
        probs_hwk = np.empty((H, W, K), np.float32)
    extra = crf_halo(crf) if crf is not None else 0
    boxes = tile_boxes(H, W, tile)
    progress(task, 0, len(boxes))
    for n, (rows, cols) in enumerate(boxes):
        # With a CRF, predict on a larger rectangle so the CRF sees the core's surroundings.
        ey0, ey1 = max(0, rows[0] - extra), min(H, rows[1] + extra)
        ex0, ex1 = max(0, cols[0] - extra), min(W, cols[1] + extra)
        feats = pixel_features(grey, (ey0, ey1), (ex0, ex1), segmenter.spec, reduced, device=device,
                               threads=threads)
        p = segmenter.predict_proba(feats)
        del feats
        if crf is not None:
            p = mean_field_crf(p, grey[ey0:ey1, ex0:ex1], crf)
        core = p[rows[0] - ey0 : rows[1] - ey0, cols[0] - ex0 : cols[1] - ex0]
        labels[rows[0] : rows[1], cols[0] : cols[1]] = values[np.argmax(core, axis=-1)]
        if probs_chw is not None:
            probs_chw[:, rows[0] : rows[1], cols[0] : cols[1]] = np.moveaxis(core, -1, 0)
        elif probs_hwk is not None:
            probs_hwk[rows[0] : rows[1], cols[0] : cols[1]] = core
        progress(task, n + 1, len(boxes))
    return labels, probs_hwk


# --------------------------------------------------------------------------------------------------------------
# Output files

#: Colours of classes 1, 2, ... in label PNGs of segmenters trained on index labels (index 0 stays black).
DEFAULT_COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


def label_palette(classes: ClassTable) -> list[int]:
    """A 256-entry RGB palette for label PNGs: black for 0, the class colours at the class values."""
    pal = [0] * (256 * 3)
    for i, v in enumerate(classes.values):
        if v > 255:
            continue
        c = classes.colours[i] if classes.colours else DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]
        pal[3 * v : 3 * v + 3] = list(c)
    return pal


def write_label_image(path: str | os.PathLike, labels: np.ndarray, classes: ClassTable) -> Path:
    """Write a label image atomically: a palette PNG (values ≤ 255, viewable and read back as class values)
    or, for ``.tif``/``.tiff`` paths or larger values, a compressed integer TIFF."""
    path = Path(path)
    with atomic_path(path, keep_suffix=True) as tmp:
        if path.suffix.lower() == ".png":
            from PIL import Image

            if labels.max(initial=0) > 255:
                raise PosvitError(f"label values above 255 do not fit a PNG: write '{path.with_suffix('.tif')}'")
            im = Image.fromarray(np.ascontiguousarray(labels, np.uint8))
            im.putpalette(label_palette(classes))  # an "L" image with a palette becomes "P", values unchanged
            im.save(tmp, format="PNG")
        else:
            import tifffile

            tifffile.imwrite(tmp, labels, compression="zlib", photometric="minisblack")
    return path


class ProbabilityWriter:
    """A ``(K, H, W)`` float32 TIFF filled tile by tile through a memory map, renamed into place on success.

    Use as a context manager; :attr:`array` is the memory-mapped ``(K, H, W)`` array. The file's blocks are
    allocated before it is mapped: on a full disk a write through a memory map is not an error but a SIGBUS that
    kills the process, so the space is claimed up front, where running out is a clean :class:`PosvitError`. On
    any failure the temporary file is removed and ``path`` is untouched.

    Raises
    ------
    PosvitError
        When the disk has no room for the whole file.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int], class_names: Sequence[str]):
        import sys

        self.path = Path(path)
        self.array = None
        # The memory map is filled under atomic_path's temporary name, which becomes the file only on success.
        self._atomic = atomic_path(self.path, keep_suffix=True)
        self._tmp = self._atomic.__enter__()
        try:
            self._open(shape, class_names)
        except BaseException:
            self._close(*sys.exc_info())
            raise

    def _open(self, shape: tuple[int, int, int], class_names: Sequence[str]) -> None:
        import errno

        import tifffile

        os.unlink(self._tmp)  # tifffile.memmap creates the file itself
        nbytes = int(np.prod(shape)) * 4
        self.array = tifffile.memmap(
            self._tmp, shape=tuple(shape), dtype=np.float32, photometric="minisblack", bigtiff=nbytes > 2**31 - 2**25,
            metadata={"axes": "CYX", "classes": list(class_names)},
        )
        size = os.path.getsize(self._tmp)  # header + data; tifffile leaves the data part sparse
        if hasattr(os, "posix_fallocate"):  # Linux and most Unixes; elsewhere the map stays sparse
            fd = os.open(self._tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise PosvitError(f"no space left on device for '{self.path}' ({-(-size // 10**6)} MB needed): "
                                      "free some space or write to another folder") from exc
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                    raise
            finally:
                os.close(fd)

    def _close(self, exc_type, exc, tb) -> None:
        arr, self.array = self.array, None
        if arr is not None and exc_type is None:  # after a failure the file is discarded: nothing to flush
            try:
                arr.flush()
            except BaseException as flush_error:  # the file stays a temporary one and is removed
                del arr
                self._atomic.__exit__(type(flush_error), flush_error, flush_error.__traceback__)
                raise
        del arr
        self._atomic.__exit__(exc_type, exc, tb)

    def __enter__(self) -> ProbabilityWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(exc_type, exc, tb)


def warn(message: str) -> None:
    """Issue a :class:`PosvitWarning` (shown as one ``warning:`` line by the command line)."""
    warnings.warn(message, PosvitWarning, stacklevel=2)

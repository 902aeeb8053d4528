"""Scribble-segmentation benchmark: mIoU on held-out images over rounds of simulated corrections.

Protocol (the "rounds" of the reference's Ni-superalloy benchmark, made explicit):

1. The first ``n_train`` images (in the order given) are training images, the rest are held out.
2. Round 0: :func:`~posvit_cli.core.segment.scribbles.draw_scribbles` draws ``per_class`` scribbles per class on every
   training image from its dense ground truth.
3. Every round trains a segmenter on the scribbles, segments the held-out images (scored against their ground
   truth: per-image class-average mIoU and dataset mIoU) and the training images; then
   :func:`~posvit_cli.core.segment.scribbles.correction_scribbles` adds scribbles in the ``corrections`` largest wrong
   regions of each training image.
4. Every feature configuration (classical only; classical + ViT features of each encoder) follows its own
   correction trajectory from the same initial scribbles, with the same random seeds, so differences come from
   the features alone. Training images are never scored.

Classical features are computed once per image and cached on disk (memory-mapped); ViT features are reduced
once per image and encoder.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from posvit_cli.core.segment.filters import ClassicalConfig
from posvit_cli.core.segment.classifiers import ClassifierConfig, PixelClassifier
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.segment.scribbles import correction_scribbles, draw_scribbles
from posvit_cli.core.segment.evaluate import SegmentationScores
from posvit_cli.core.segment.segmenter import FeatureSpec, load_grey, pixel_features
from posvit_cli.core.segment.vit_pixels import TokenSource, fit_shared_pca, upsample_region

__all__ = ["BenchConfig", "run_benchmark"]


@dataclasses.dataclass
class BenchConfig:
    """Benchmark protocol settings (see the module docstring)."""

    n_train: int = 5
    rounds: int = 3
    per_class: int = 3
    corrections: int = 3
    length: int | None = None
    width: int = 1
    margin: float = 3.0
    seed: int = 0
    ignore_value: int | None = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _class_lookup(gt: dict[str, np.ndarray], ignore: int | None) -> tuple[list[int], np.ndarray]:
    """Class values present in the ground truth (``ignore`` left out) and a table value → class index."""
    values = sorted(set().union(*[set(np.unique(g).tolist()) for g in gt.values()]) - ({ignore} if ignore is not None else set()))
    if len(values) < 2:
        raise PosvitError("the ground truth holds fewer than two classes")
    lut = np.full(max(values) + 1, -1, np.int64)
    lut[values] = np.arange(len(values))
    return values, lut


class _BenchFeatures:
    """Per-pixel features of every benchmark image, computed once: classical features memory-mapped from
    ``workdir``, ViT tokens reduced per encoder and upsampled on request."""

    def __init__(self, images, gt, encoders, train, *, classical, intensity, threads, vit_dims, pca, workdir,
                 progress):
        self.cache: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        spec_c = FeatureSpec(classical=classical, vit=None, intensity=intensity) if classical else None
        progress("features", 0, len(images))
        for i, p in enumerate(images):
            grey = load_grey(p, intensity)
            if grey.shape != gt[p].shape:
                raise PosvitError(f"ground truth of '{p}' is {gt[p].shape[0]}×{gt[p].shape[1]} px, the image "
                                  f"{grey.shape[0]}×{grey.shape[1]} px")
            self.shapes[p] = grey.shape
            if spec_c is not None:
                f = pixel_features(grey, (0, grey.shape[0]), (0, grey.shape[1]), spec_c, None, threads=threads)
                fn = os.path.join(workdir, f"classical_{i}.npy")
                np.save(fn, f)
                del f
                self.cache[p] = np.load(fn, mmap_mode="r")
            progress("features", i + 1, len(images))
        self.vit_maps: dict[str, dict[str, object]] = {}
        for name, src in encoders:
            shared = fit_shared_pca([src.token_rows(p) for p in train], vit_dims) if pca == "shared" else None
            self.vit_maps[name] = {p: src.reduced(p, self.shapes[p], vit_dims, shared) for p in images}

    def __call__(self, p: str, enc: str | None) -> np.ndarray:
        """Features ``(H, W, F)`` of image ``p``: classical (if any), then encoder ``enc``'s (if given)."""
        parts = []
        if p in self.cache:
            parts.append(np.asarray(self.cache[p]))
        if enc is not None:
            H, W = self.shapes[p]
            parts.append(upsample_region(self.vit_maps[enc][p], (0, H), (0, W)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)


class _RoundModel:
    """A classifier fitted on the scribbled pixels of the training images, predicting class values."""

    def __init__(self, features: _BenchFeatures, enc, train, labels, lut, values, classifier):
        self.features, self.enc = features, enc
        Xs, ys = [], []
        for p in train:
            m = labels[p] != 0
            f = features(p, enc)
            Xs.append(f[m])
            ys.append(lut[labels[p][m]])
        X, y = np.concatenate(Xs), np.concatenate(ys)
        present = np.unique(y)
        if present.size < 2:
            raise PosvitError("the scribbles cover fewer than two classes; draw more (--scribbles)")
        # Classes absent from the scribbles cannot be predicted; fit on the present ones.
        remap = np.full(len(values), -1, np.int64)
        remap[present] = np.arange(present.size)
        self.model = PixelClassifier.fit(X, remap[y], present.size, classifier)
        self.out_values = np.asarray(values)[present]

    def predict(self, p: str) -> np.ndarray:
        """Class values ``(H, W)`` of image ``p``, predicted 256 rows at a time."""
        f = self.features(p, self.enc)
        H, W = self.features.shapes[p]
        prob = np.concatenate([self.model.predict_proba(f[i : i + 256].reshape(-1, f.shape[-1]))
                               for i in range(0, H, 256)]).reshape(H, W, -1)
        return self.out_values[np.argmax(prob, axis=-1)]


def _round_scores(model: _RoundModel, test, gt, labels, train, shapes, ignore, r: int, t0: float) -> dict:
    """Held-out scores of one round, with the labelled share of the training pixels."""
    scores = SegmentationScores(ignore_value=ignore)
    for p in test:
        scores.add(os.path.basename(p), model.predict(p), gt[p])
    summ = scores.summary()
    n_lab = int(sum((labels[p] != 0).sum() for p in train))
    n_pix = int(sum(np.prod(shapes[p]) for p in train))
    return {
        "round": r,
        "labelled_pixels": n_lab,
        "labelled_fraction": n_lab / n_pix,
        "class_avg_miou_mean": summ["class_avg_miou_mean"],
        "class_avg_miou_std": summ["class_avg_miou_std"],
        "dataset_miou": summ["dataset_miou"],
        "per_class_iou": summ["per_class_iou"],
        "positional_r2_mean": summ["positional_r2_mean"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _run_configuration(features, enc, initial, train, test, gt, lut, values, classifier, bench: BenchConfig,
                       tick) -> list[dict]:
    """Every round of one feature configuration: train, score the held-out images, correct the scribbles."""
    labels = {p: initial[p].copy() for p in train}
    rounds = []
    for r in range(bench.rounds + 1):
        t0 = time.perf_counter()
        model = _RoundModel(features, enc, train, labels, lut, values, classifier)
        rounds.append(_round_scores(model, test, gt, labels, train, features.shapes, bench.ignore_value, r, t0))
        if r < bench.rounds:
            for i, p in enumerate(train):
                labels[p] = correction_scribbles(
                    gt[p], model.predict(p), labels[p], bench.corrections, length=bench.length,
                    width=bench.width, margin=min(bench.margin, 2.0), ignore_value=bench.ignore_value,
                    seed=bench.seed + 1000 * i + 17 * (r + 1),
                )
        tick()
    return rounds


def run_benchmark(
    images: Sequence[str],
    ground_truth: dict[str, np.ndarray],
    encoders: Sequence[tuple[str, TokenSource]],
    *,
    classical: ClassicalConfig | None,
    vit_dims: int = 9,
    pca: str = "per-image",
    classifier: ClassifierConfig | None = None,
    bench: BenchConfig | None = None,
    intensity: str = "auto",
    include_classical_only: bool = True,
    threads: int | None = None,
    workdir: str | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Run the benchmark.

    Parameters
    ----------
    images : sequence of str
        Image paths; the first ``bench.n_train`` are the training images.
    ground_truth : dict of path to ndarray (H, W)
        Dense ground truth of every image (class values; ``bench.ignore_value`` = unlabelled).
    encoders : sequence of (name, TokenSource)
        ViT features to compare; each gives a configuration "classical + name" (or "name" alone when
        ``classical`` is None).
    classical : ClassicalConfig or None
    include_classical_only : bool
        Also run the configuration without ViT features.

    Returns
    -------
    dict
        ``train_images``, ``test_images``, ``settings`` and ``configs``: one entry per configuration with a
        list of rounds (labelled pixels, held-out scores).
    """
    progress = report(progress)
    bench = bench or BenchConfig()
    classifier = classifier or ClassifierConfig()
    if not 1 <= bench.n_train < len(images):
        raise PosvitError(f"--train {bench.n_train}: need at least one training and one held-out image "
                          f"({len(images)} images)")
    train, test = list(images[: bench.n_train]), list(images[bench.n_train :])
    gt = {p: np.asarray(ground_truth[p]) for p in images}
    values, lut = _class_lookup(gt, bench.ignore_value)
    configs: list[tuple[str, str | None]] = []
    if include_classical_only and classical is not None:
        configs.append(("classical", None))
    for name, _ in encoders:
        configs.append((f"classical+{name}" if classical is not None else name, name))
    if not configs:
        raise PosvitError("nothing to compare: give an encoder or keep the classical features")

    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="posvit-bench-")
    t_start = time.perf_counter()
    features = None
    try:
        features = _BenchFeatures(images, gt, encoders, train, classical=classical, intensity=intensity,
                                  threads=threads, vit_dims=vit_dims, pca=pca, workdir=workdir, progress=progress)
        initial = {p: draw_scribbles(gt[p], bench.per_class, length=bench.length, width=bench.width,
                                     margin=bench.margin, ignore_value=bench.ignore_value, seed=bench.seed + 1000 * i)
                   for i, p in enumerate(train)}
        total_steps = len(configs) * (bench.rounds + 1)
        done = [0]

        def tick() -> None:
            done[0] += 1
            progress("bench", done[0], total_steps)

        progress("bench", 0, total_steps)
        results = [{"name": cname, "encoder": enc,
                    "rounds": _run_configuration(features, enc, initial, train, test, gt, lut, values, classifier,
                                                 bench, tick)}
                   for cname, enc in configs]
    finally:
        if features is not None:
            # Drop the memory maps before their files are removed.
            features.cache.clear()
        if own_dir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "train_images": train,
        "test_images": test,
        "classes": values,
        "settings": {
            "bench": bench.to_dict(),
            "classical": classical.to_dict() if classical else None,
            "vit": {"dims": vit_dims, "pca": pca},
            "classifier": classifier.to_dict(),
        },
        "configs": results,
        "seconds": round(time.perf_counter() - t_start, 2),
    }

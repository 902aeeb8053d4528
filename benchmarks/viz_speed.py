"""Benchmark: posvit's PCA → RGB against scikit-learn's PCA + min-max, and the time to draw a whole figure.

The study is the published figure setting: DINOv2-S tokens at 518 px (37 × 37 × 384), 16 images. posvit fits
the 3 principal axes from the channel covariance (one ``eigh`` of a 384 × 384 matrix per image; a shared PCA
streams the images through the same sums), the baseline runs ``sklearn.decomposition.PCA(3)`` and a
``MinMaxScaler`` per image, as the reference notebooks do. Colours must agree up to the sign of each axis
(sign conventions differ): the mean absolute colour difference after aligning signs is reported.

The end-to-end time of ``posvit viz pca`` on a store of 8 such images (two variants, 256-px panels, PNG written)
is measured too, without the on-the-spot probe.

Usage: ``python benchmarks/viz_speed.py``. The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_features(n_images: int, h: int, w: int, channels: int, seed: int = 0) -> list[np.ndarray]:
    """ViT-like tokens: a smooth positional part shared by all images plus content noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    basis = np.stack([np.cos(np.pi * (fy * ys + fx * xs)) for fy in range(4) for fx in range(4)], -1)
    positional = basis @ rng.normal(size=(basis.shape[-1], channels)) * 0.5
    return [(positional + rng.normal(size=(h, w, channels))).astype(np.float32) for _ in range(n_images)]


def sklearn_rgb(tokens: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import MinMaxScaler

    h, w, C = tokens.shape
    scores = PCA(n_components=3).fit_transform(tokens.reshape(-1, C))
    return MinMaxScaler(clip=True).fit_transform(scores).reshape(h, w, 3)


def aligned_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a − b| per colour channel after flipping b's channel when the PCA axis points the other way."""
    out = []
    for k in range(3):
        x, y = a[..., k].ravel(), b[..., k].ravel()
        if np.corrcoef(x, y)[0, 1] < 0:
            y = 1.0 - y
        out.append(float(np.abs(x - y).mean()))
    return max(out)


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from posvit_cli.core.viz.maps import fit_pca, pca_rgb

    n, g, C = 16, 37, 384
    feats = make_features(n, g, g, C)
    t_posvit = best_of(lambda: [pca_rgb(f) for f in feats])
    t_sklearn = best_of(lambda: [sklearn_rgb(f) for f in feats])
    diff = max(aligned_difference(pca_rgb(f)[0], sklearn_rgb(f)) for f in feats[:4])
    t_shared = best_of(lambda: [fit_pca(feats, 3).to_rgb(f) for f in feats[:1]], 2)

    from conftest import write_store
    from typer.testing import CliRunner

    from posvit_cli.app import app

    with tempfile.TemporaryDirectory() as d:
        store = write_store(Path(d) / "f.h5", feats[:8], provenance={"patch_size": 14})
        runner = CliRunner()
        t0 = time.perf_counter()
        r = runner.invoke(app, ["viz", "pca", str(store), "-o", str(Path(d) / "out"), "--no-score", "-q"])
        t_figure = time.perf_counter() - t0
        figure_ok = r.exit_code == 0
    ratio = t_sklearn / t_posvit
    agree = diff < 1e-3
    print(f"PCA→RGB of {n} images {g}×{g}×{C}: posvit {t_posvit:.3f} s, scikit-learn {t_sklearn:.3f} s "
          f"({ratio:.1f}×); max mean |Δcolour| {diff:.1e}; shared PCA {t_shared:.3f} s; "
          f"8-image figure {t_figure:.2f} s", file=sys.stderr)
    result = {
        "name": "viz_speed",
        "posvit": round(t_posvit, 4),
        "baseline": round(t_sklearn, 4),
        "unit": "s",
        "ratio": round(ratio, 2),
        "target": 1.0,
        "pass": bool(ratio >= 1.0 and agree and figure_ok and t_figure < 30.0),
        "agree": agree,
        "max_mean_abs_colour_diff": diff,
        "shared_pca_16_images_s": round(t_shared, 4),
        "figure_8_images_s": round(t_figure, 3),
        "figure_target_s": 30.0,
        "study": {"images": n, "grid": [g, g], "channels": C},
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

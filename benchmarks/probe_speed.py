"""Benchmark: posvit's batched closed-form probe against a straightforward scikit-learn loop.

The study is the published one ("What DINO saw", Table 1 and the per-channel figures): 15 images of 37 × 37
tokens × 384 channels, 6 repeats with fresh step-6 random masks per target, targets lr, ud, diag, radial and the
joint xy, ridge α = 1 on per-channel standardised features, R² over all tokens, for the whole stack and for every
channel alone. The baseline fits one ``StandardScaler`` + ``Ridge`` per (image, repeat, target, channel) on the very
same masks, as the reference code does.

That loop has ~1.7·10⁵ fits (minutes); by default it is timed on the first ``--baseline-images`` images ×
``--baseline-repeats`` repeats and scaled to the full study by fit count (``baseline_extrapolated``); pass
``--full-baseline`` to run all of it. R² agreement is checked on every baseline fit that ran.

Usage: ``python benchmarks/probe_speed.py [--full-baseline]``. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

TARGETS = ("lr", "ud", "diag", "radial", "xy")
COLUMNS = {"lr": [0], "ud": [1], "diag": [2], "radial": [3], "xy": [0, 1]}


def make_features(n_images: int, h: int, w: int, channels: int, seed: int = 0) -> list[np.ndarray]:
    """ViT-like tokens: a smooth positional part (random mixes of 2-D sinusoids) shared by all images + content."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    basis = [np.cos(np.pi * (fy * ys + fx * xs)) for fy in range(4) for fx in range(4)]
    basis = np.stack(basis, -1)                                              # (h, w, 16)
    positional = basis @ rng.normal(size=(basis.shape[-1], channels)) * 0.5
    return [(positional + rng.normal(size=(h, w, channels))).astype(np.float32) for _ in range(n_images)]


def sklearn_study(features, settings, images, repeats):
    """The reference loop: per (image, repeat, target) one stack fit and one fit per channel."""
    import warnings

    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    from posvit_cli.core.measure.probe import sampling_plan

    scores = {}
    fits = 0
    for i in range(images):
        f = features[i]
        h, w, C = f.shape
        X = f.reshape(h * w, C).astype(np.float64)
        plan = sampling_plan((h, w), settings, np.random.default_rng([settings.seed, i]))
        for r in range(repeats):
            for t in TARGETS:
                m = plan.mask_of[t][r]
                train = plan.train[m]
                Y = plan.targets[m][:, COLUMNS[t]]
                scaler = StandardScaler().fit(X[train])
                model = Ridge(alpha=settings.alpha).fit(scaler.transform(X[train]), Y[train])
                scores[(i, r, t, "stack")] = model.score(scaler.transform(X), Y)
                fits += 1
                per_channel = np.empty(C)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for c in range(C):
                        xc = X[:, c:c + 1]
                        sc = StandardScaler().fit(xc[train])
                        mc = Ridge(alpha=settings.alpha).fit(sc.transform(xc[train]), Y[train])
                        per_channel[c] = mc.score(sc.transform(xc), Y)
                        fits += 1
                scores[(i, r, t, "channel")] = per_channel
    return scores, fits


def posvit_study(features, settings, threads):
    from posvit_cli.core.device import torch_threads
    from posvit_cli.core.measure.probe import probe_dataset, probe_image, sampling_plan

    images = [{"name": f"img{i}", "path": "", "grid": f.shape[:2]} for i, f in enumerate(features)]
    t0 = time.perf_counter()
    probe_dataset(lambda i, ly: features[i], images, ["final"], settings, threads=threads)
    seconds = time.perf_counter() - t0
    # Per-fit values for the agreement check (same masks as the dataset run: rng [seed, image index]).
    per_fit = {}
    with torch_threads(threads):
        for i, f in enumerate(features):
            plan = sampling_plan(f.shape[:2], settings, np.random.default_rng([settings.seed, i]))
            res = probe_image(f, settings, plan)
            for t in TARGETS:
                for r in range(settings.repeats):
                    per_fit[(i, r, t, "stack")] = res.stack[t][r]
                    per_fit[(i, r, t, "channel")] = res.channel[t][r]
    return seconds, per_fit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=15)
    ap.add_argument("--grid", type=int, default=37)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--baseline-images", type=int, default=1)
    ap.add_argument("--baseline-repeats", type=int, default=1)
    ap.add_argument("--full-baseline", action="store_true", help="time the whole scikit-learn loop (minutes)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for posvit (the 2-thread time is also reported)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from posvit_cli.core.measure.probe import make_settings

    settings, _ = make_settings("dino-saw", targets=TARGETS, repeats=args.repeats, extras=False)
    features = make_features(args.images, args.grid, args.grid, args.channels)

    posvit_study(features[:1], settings, args.threads)                      # warm-up (imports, allocator)
    t_posvit, ours = posvit_study(features, settings, args.threads)
    t_posvit_2, _ = posvit_study(features, settings, 2)
    print(f"posvit probe: {t_posvit:.2f} s ({args.threads} thread(s)), {t_posvit_2:.2f} s (2 threads)", file=sys.stderr)

    b_images = args.images if args.full_baseline else min(args.baseline_images, args.images)
    b_repeats = args.repeats if args.full_baseline else min(args.baseline_repeats, args.repeats)
    t0 = time.perf_counter()
    theirs, fits_measured = sklearn_study(features, settings, b_images, b_repeats)
    t_measured = time.perf_counter() - t0
    fits_total = args.images * args.repeats * len(TARGETS) * (args.channels + 1)
    t_baseline = t_measured * fits_total / fits_measured
    extrapolated = fits_measured < fits_total
    print(
        f"scikit-learn loop: {t_measured:.1f} s for {fits_measured} fits"
        + (f" → {t_baseline:.0f} s for the full {fits_total} fits (scaled by fit count)" if extrapolated else ""),
        file=sys.stderr,
    )
    diff = max(float(np.max(np.abs(np.asarray(ours[k]) - np.asarray(v)))) for k, v in theirs.items())
    agree = diff < 1e-6
    ratio = t_baseline / t_posvit
    print(f"ratio {ratio:.0f}×; max |ΔR²| = {diff:.2e} over {fits_measured} fits", file=sys.stderr)
    result = {
        "name": "probe_speed",
        "posvit": round(t_posvit, 4),
        "baseline": round(t_baseline, 2),
        "unit": "s",
        "ratio": round(ratio, 1),
        "target": 50,
        "target_posvit_s": 5.0,
        "pass": bool(ratio >= 50 and t_posvit < 5.0 and agree),
        "agree": agree,
        "max_abs_r2_diff": diff,
        "posvit_threads": args.threads,
        "posvit_2_threads_s": round(t_posvit_2, 4),
        "baseline_measured_s": round(t_measured, 2),
        "baseline_fits_measured": fits_measured,
        "baseline_fits_total": fits_total,
        "baseline_extrapolated": extrapolated,
        "study": {"images": args.images, "grid": [args.grid, args.grid], "channels": args.channels,
                  "repeats": args.repeats, "targets": list(TARGETS), "protocol": "dino-saw", "per_channel": True},
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

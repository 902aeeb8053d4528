"""Benchmark: peak memory of the store readers on one huge image's token grid (issue 17).

The store holds ONE 10,000 × 10,000-pixel image at patch 16: a 625 × 625 token grid × 384 channels, float16
(300 MB on disk, 600 MB as float32): what a tiled ViT-S/16 extraction of such an image writes. No encoder is
run: the tokens are standard-normal noise with planted ramps (``lr``, ``ud``, ``diag``, ``radial`` in four
channels), written with :class:`~posvit_cli.core.features.writer.StoreWriter` together with the tile layout
that ``extract --tile 1024 --overlap 128`` records (11 × 11 tiles), so the probe also runs its tile-frame fits
and the tile periodicity.

Each reader runs as its own process: ``posvit probe`` (the defaults: every target, per channel, extras),
``posvit cluster -k 2`` and ``posvit viz pca``. Its peak resident memory (``ru_maxrss`` of a watcher process
whose only child is the command) is compared with the baseline, a process that only imports
``posvit_cli.app`` and torch. Target: each reader's peak within 1.5 GB above the baseline, whatever the image
size (the features themselves, 0.6 GB in float32, included).

Usage: ``python benchmarks/huge_image.py``. The last stdout line is one JSON object; exits 0 either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GRID, CHANNELS, PATCH = 625, 384, 16
TILE, OVERLAP = 1024, 128                     # the layout recorded as ``extract --tile 1024 --overlap 128`` does
TARGET_GB = 1.5
# Runs argv[1:] as the only child and prints its peak RSS in KiB (Linux ru_maxrss unit) as the last line.
_WATCH = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
          "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def write_huge_store(path: Path, seed: int = 0) -> Path:
    """One 625 × 625 × 384 float16 grid: noise plus the four ramps planted in channels 3, 17, 9 and 25."""
    from posvit_cli.core.features.extract import tile_starts
    from posvit_cli.core.features.writer import StoreWriter
    from posvit_cli.core.measure.probe import ramp_targets

    rng = np.random.default_rng(seed)
    f = rng.standard_normal((GRID, GRID, CHANNELS), dtype=np.float32)
    for name, c in {"lr": 3, "ud": 17, "radial": 9, "diag": 25}.items():
        f[..., c] = ramp_targets(GRID, GRID, (name,))[name] + 0.02 * f[..., c]
    f = f.astype(np.float16)
    side = GRID * PATCH
    prov = {"model": "synthetic (stands for a tiled ViT-S/16 extraction)", "patch_size": PATCH, "channels": CHANNELS}
    with StoreWriter(path, provenance=prov, layers=["final"], dtype="float16", overwrite=True) as w:
        starts = tile_starts(side, TILE, OVERLAP, PATCH)
        # The tile layout makes the probe also fit the ramps in the tile frame and score the tile periodicity.
        w.add("huge.png", {"final": f}, orig_size=(side, side), proc_size=(side, side),
              meta={"tiles": {"tile": TILE, "overlap": OVERLAP, "rows": starts, "cols": starts}})
        w.commit()
    return path


def peak_rss(argv: list[str]) -> tuple[int, float, float]:
    """``(return code, peak RSS in GB, wall seconds)`` of ``argv`` run in a fresh process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WATCH, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    rc, kib = out.stdout.split()[-2:]
    return int(rc), int(kib) * 1024 / 1e9, wall


def main() -> int:
    posvit = [sys.executable, "-m", "posvit_cli"]
    with tempfile.TemporaryDirectory() as d:
        store = write_huge_store(Path(d) / "huge.h5")
        size_mb = store.stat().st_size / 1e6
        _, base_gb, base_s = peak_rss([sys.executable, "-c", "import posvit_cli.app, torch"])
        readers = {
            "probe": [*posvit, "probe", str(store), "-o", str(Path(d) / "probe.json"), "-q"],
            "cluster": [*posvit, "cluster", str(store), "-k", "2", "-o", str(Path(d) / "labels.h5"), "-q"],
            "viz_pca": [*posvit, "viz", "pca", str(store), "-o", str(Path(d) / "viz"), "-q"],
        }
        details = {}
        for name, argv in readers.items():
            rc, gb, wall = peak_rss(argv)
            details[name] = {"exit_code": rc, "peak_gb": round(gb, 3), "above_baseline_gb": round(gb - base_gb, 3),
                             "wall_s": round(wall, 1), "pass": bool(rc == 0 and gb - base_gb <= TARGET_GB)}
            print(f"{name}: exit {rc}, peak {gb:.2f} GB ({gb - base_gb:+.2f} GB above the interpreter), "
                  f"{wall:.1f} s", file=sys.stderr)
    worst = max(v["above_baseline_gb"] for v in details.values())
    result = {
        "name": "huge_image",
        "posvit": worst,
        "baseline": TARGET_GB,
        "unit": "GB above interpreter",
        "ratio": round(worst / TARGET_GB, 3),
        "target": f"<= {TARGET_GB} GB above baseline per reader",
        "pass": all(v["pass"] for v in details.values()),
        "interpreter_peak_gb": round(base_gb, 3),
        "interpreter_s": round(base_s, 1),
        "readers": details,
        "study": {"grid": [GRID, GRID], "channels": CHANNELS, "patch": PATCH, "dtype": "float16",
                  "tile_px": TILE, "overlap_px": OVERLAP,
                  "store_mb": round(size_mb, 1), "float32_features_gb": round(GRID * GRID * CHANNELS * 4 / 1e9, 3)},
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

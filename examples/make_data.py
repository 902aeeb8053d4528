#!/usr/bin/env python
"""Generate synthetic greyscale micrographs with dense ground truth and scribbles (deterministic by seed).

The shipped example set (``examples/data``) is exactly what this prints with its defaults::

    python examples/make_data.py --out examples/data

A custom set, e.g. two 2048² images of each kind with illumination ramps::

    python examples/make_data.py --out big --kinds grains,particles,cracks --size 2048 --count 2 --ramp 0.2 --seed 7

Layout of ``--out``::

    micrographs/<stem>.png   8-bit greyscale images with ground truth (kinds grains, particles, cracks)
    masks/<stem>.png         palette PNG, pixel value = class index (0..K-1); class names in manifest.json
    scribbles/<stem>.png     palette PNG, 0 = unlabelled, k + 1 = class k (thin strokes inside each class)
    textures/<stem>.png      homogeneous textures without ground truth (kinds fractal, spinodal)
    manifest.json            per image: kind, size, seed, class names, pixel counts, all drawn parameters

The generators are ``posvit_cli.core.synthetic.generate``; every image is ``make_sample(kind, size, seed, ramp_max=...)``
with the seed recorded in the manifest, so any single file can be regenerated on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from posvit_cli.core.synthetic.generate import make_sample
from posvit_cli.core.synthetic.structures import KINDS, STRUCTURE_KINDS

#: Colours of classes 0, 1, 2, ... in mask PNGs (scribble PNGs shift them by one: index 0 is black, unlabelled).
CLASS_COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]

#: The shipped set: (kind, side in px, number of images, largest illumination ramp).
SHIPPED = [
    ("grains", 256, 3, 0.0),
    ("particles", 256, 3, 0.0),
    ("cracks", 256, 3, 0.0),
    ("grains", 512, 1, 0.2),
    ("particles", 512, 1, 0.2),
    ("cracks", 512, 1, 0.2),
    ("particles", 1024, 1, 0.0),
    ("fractal", 256, 6, 0.0),
    ("spinodal", 256, 6, 0.0),
]


def _palette(offset: int) -> list[int]:
    colours = [(0, 0, 0)] * offset + CLASS_COLOURS
    flat = [c for rgb in colours for c in rgb]
    return flat + [0] * (768 - len(flat))


def save_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    """Write an 8-bit PNG atomically; with ``palette`` as a palette image whose pixel values are the indices."""
    im = Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)), mode="L")
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette)
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)


def plan(args) -> list[tuple[str, int, float, str]]:
    """(kind, size, ramp_max, stem) of every image to make, in seed order."""
    if args.kinds is None:
        groups = SHIPPED
    else:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise SystemExit(f"error: unknown kind(s) {', '.join(bad)}: use {', '.join(KINDS)}")
        groups = [(k, args.size, args.count, args.ramp) for k in kinds]
    out = []
    for kind, size, count, ramp in groups:
        for i in range(count):
            out.append((kind, size, ramp, f"{kind}_{size}_{i + 1:02d}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="output folder (created; files are overwritten)")
    ap.add_argument("--seed", type=int, default=0, help="base seed; image i gets seed + i (default: 0)")
    ap.add_argument("--kinds", default=None,
                    help=f"comma-separated kinds out of {', '.join(KINDS)} (default: the shipped set)")
    ap.add_argument("--size", type=int, default=512, help="image side in px with --kinds (default: 512)")
    ap.add_argument("--count", type=int, default=4, help="images per kind with --kinds (default: 4)")
    ap.add_argument("--ramp", type=float, default=0.0,
                    help="largest peak-to-peak illumination ramp with --kinds, e.g. 0.2 (default: 0, even light)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.size < 16 or args.count < 1:
        raise SystemExit("error: --size must be at least 16 and --count at least 1")

    jobs = plan(args)
    out = args.out
    for sub in ("micrographs", "masks", "scribbles", "textures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    manifest = {
        "generator": "posvit_cli.core.synthetic.generate.make_sample",
        "command": "python examples/make_data.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "images": [],
    }
    t_all = time.perf_counter()
    for i, (kind, size, ramp, stem) in enumerate(jobs):
        t0 = time.perf_counter()
        seed = args.seed + i
        s = make_sample(kind, size, seed, ramp_max=ramp)
        entry = {"file": None, "kind": kind, "size": [size, size], "seed": seed, "ramp_max": ramp}
        if kind in STRUCTURE_KINDS:
            entry["file"] = f"micrographs/{stem}.png"
            save_png(out / entry["file"], s.image)
            save_png(out / "masks" / f"{stem}.png", s.mask, _palette(0))
            save_png(out / "scribbles" / f"{stem}.png", s.scribbles, _palette(1))
            k = len(s.class_names)
            entry.update(
                mask=f"masks/{stem}.png",
                scribbles=f"scribbles/{stem}.png",
                class_names=list(s.class_names),
                class_pixels=np.bincount(s.mask.ravel(), minlength=k).tolist(),
                scribble_pixels=np.bincount(s.scribbles.ravel(), minlength=k + 1)[1:].tolist(),
            )
        else:
            entry["file"] = f"textures/{stem}.png"
            save_png(out / entry["file"], s.image)
        entry["params"] = s.params
        manifest["images"].append(entry)
        if not args.quiet:
            print(f"[{i + 1}/{len(jobs)}] {entry['file']} ({size}×{size}, seed {seed}) "
                  f"{time.perf_counter() - t0:.2f} s", file=sys.stderr)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
    if not args.quiet:
        print(f"wrote {len(jobs)} images to {out} in {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

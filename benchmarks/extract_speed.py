"""End-to-end `posvit extract` throughput against the bare timm forward pass, peak memory, and bf16 agreement.

posvit: decode PNGs, resize, normalise, forward, write float16 features to an HDF5 store (extract_images).
baseline: the same model's forward_features on the same images already decoded and normalised in memory
(same batch size, inference mode). Target: posvit ≥ 0.85 × the bare throughput.
Also: peak RSS of `posvit extract` for N and 3N images (must not grow with N), and bf16 autocast on CPU:
throughput and the cosine between bf16 and fp32 features.

Usage: python benchmarks/extract_speed.py [--n 240] [--model dinov2-s-reg] [--size 224] [--batch-size 8]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_images(folder: Path, n: int, side: int, seed: int = 0) -> list[Path]:
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = gaussian_filter(rng.random((side * 2, side * 2)), 2)
    paths = []
    for i in range(n):
        y, x = rng.integers(0, side, 2)
        a = base[y : y + side, x : x + side] + 0.1 * rng.random((side, side))
        a = ((a - a.min()) / np.ptp(a) * 255).astype(np.uint8)
        p = folder / f"img{i:04d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def peak_rss_mib(args: list[str]) -> float:
    code = (
        "import resource,sys\nfrom posvit_cli.app import main\nsys.argv=['posvit']+sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return int(p.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--model", default="dinov2-s-reg")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    import torch

    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.features.extract import ExtractOptions, _prepare, extract_images
    from posvit_cli.core.io.preprocess import parse_size
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.features.writer import StoreWriter

    tmp = Path(tempfile.mkdtemp(prefix="posvit-bench-"))
    paths = make_images(tmp / "imgs", args.n, args.size + 32)
    enc = load_encoder(args.model, "random")
    size = parse_size(f"square:{args.size}")
    opts = ExtractOptions(layers=["final"], size=size, batch_size=args.batch_size)

    # Baseline: bare forward on preloaded, preprocessed tensors.
    tensors = torch.stack([_prepare(p, enc, opts).tensor for p in paths])
    with torch.inference_mode():
        enc.model.forward_features(tensors[: args.batch_size])  # warm-up, as extract gets none
        t0 = time.perf_counter()
        for i in range(0, len(tensors), args.batch_size):
            enc.model.forward_features(tensors[i : i + args.batch_size])
        bare_s = time.perf_counter() - t0
    bare_ips = args.n / bare_s

    def run(out: str, precision: str) -> float:
        o = ExtractOptions(layers=["final"], size=size, batch_size=args.batch_size, precision=precision)
        with StoreWriter(tmp / out, provenance={"channels": enc.embed_dim}, layers=["final"]) as w:
            t = time.perf_counter()
            extract_images(paths, enc, w, o)
            return time.perf_counter() - t

    posvit_s = run("fp32.h5", "fp32")
    posvit_ips = args.n / posvit_s
    bf16_s = run("bf16.h5", "bf16")
    with FeatureStore(tmp / "fp32.h5") as a, FeatureStore(tmp / "bf16.h5") as b:
        cos = []
        for i in range(len(a)):
            x, y = a.features(i).reshape(-1, enc.embed_dim), b.features(i).reshape(-1, enc.embed_dim)
            cos.append((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
        cos = np.concatenate(cos)

    # Peak memory for N and 3N images through the real CLI.
    more = make_images(tmp / "more", 2 * args.n, args.size + 32, seed=1)
    del more
    common = ["-m", args.model, "-w", "random", "--size", f"square:{args.size}", "-q", "--batch-size",
              str(args.batch_size)]
    rss_n = peak_rss_mib(["extract", str(tmp / "imgs"), *common, "-o", str(tmp / "m1.h5")])
    rss_3n = peak_rss_mib(["extract", str(tmp / "imgs"), str(tmp / "more"), *common, "-o", str(tmp / "m3.h5")])

    ratio = posvit_ips / bare_ips
    result = {
        "name": "extract_speed",
        "posvit": round(posvit_ips, 3),
        "baseline": round(bare_ips, 3),
        "unit": "images/s",
        "ratio": round(ratio, 3),
        "target": 0.85,
        "pass": bool(ratio >= 0.85 and rss_3n < rss_n * 1.15),
        "model": args.model,
        "images": args.n,
        "input_px": args.size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "bf16_images_per_s": round(args.n / bf16_s, 3),
        "bf16_speedup": round(posvit_s / bf16_s, 3),
        "bf16_fp32_cosine_mean": round(float(cos.mean()), 6),
        "bf16_fp32_cosine_min": round(float(cos.min()), 6),
        "peak_rss_mib_n": round(rss_n, 1),
        "peak_rss_mib_3n": round(rss_3n, 1),
    }
    print(f"bare forward {bare_ips:.2f} img/s, posvit extract {posvit_ips:.2f} img/s (ratio {ratio:.3f}); "
          f"bf16 {args.n / bf16_s:.2f} img/s, cosine to fp32 mean {cos.mean():.6f} min {cos.min():.6f}; "
          f"peak RSS {rss_n:.0f} MiB ({args.n} images) vs {rss_3n:.0f} MiB ({3 * args.n} images)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

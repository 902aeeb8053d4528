"""End-to-end `posvit extract` throughput against the bare timm forward pass, peak memory, and bf16 agreement.

posvit: decode PNGs, resize, normalise, forward, write float16 features to an HDF5 store (extract_images).
baseline: the same model's forward_features on the same images already decoded and normalised in memory
(same batch size, inference mode). Target: posvit ≥ 0.85 × the bare throughput.
Also: peak RSS of `posvit extract` for N and 3N images (must not grow with N), and bf16 autocast on CPU:
throughput and the cosine between bf16 and fp32 features.

Compiled: the same with `extract --compile` (torch.compile, static shapes) and the bare forward compiled and with a
channels-last patch embedding; compile time is timed apart (first call) with the images after which it is repaid.
All variants run interleaved, --reps times, and their medians are compared (the machine may be shared).

Usage: python benchmarks/extract_speed.py [--n 240] [--model dinov2-s-reg] [--size 224] [--batch-size 8] [--reps 3]
       [--no-memory]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
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


def _cos(a: np.ndarray, b: np.ndarray, channels: int) -> np.ndarray:
    x, y = a.reshape(-1, channels).astype(np.float64), b.reshape(-1, channels).astype(np.float64)
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--model", default="dinov2-s-reg")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every variant (medians)")
    ap.add_argument("--no-memory", action="store_true", help="skip the bf16 run and the peak-RSS runs")
    args = ap.parse_args()

    import torch

    from posvit_cli.core.features.compiled import compiled_forward
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

    # Baseline: bare forward on preloaded, preprocessed tensors. Compiled variants: torch.compile(dynamic=False)
    # through posvit's CompiledForward (its first call per shape compiles and checks against eager: timed apart).
    tensors = torch.stack([_prepare(p, enc, opts).tensor for p in paths])
    batches = [tensors[i : i + args.batch_size] for i in range(0, len(tensors), args.batch_size)]
    cf = compiled_forward(enc)
    cl_model = copy.deepcopy(enc.model)
    cl_model.patch_embed.proj.to(memory_format=torch.channels_last)

    def bare(fn, to_cl=False) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            for b in batches:
                fn(b.contiguous(memory_format=torch.channels_last) if to_cl else b)
            return time.perf_counter() - t

    with torch.inference_mode():
        enc.model.forward_features(batches[0])  # warm-up, as extract gets none
        cl_model.forward_features(batches[0].contiguous(memory_format=torch.channels_last))
        t0 = time.perf_counter()
        cf(batches[0], ["final"])
        first_call_s = time.perf_counter() - t0
    compile_ok = cf.used

    def run(out: str, precision: str, compile: bool = False) -> float:
        o = ExtractOptions(layers=["final"], size=size, batch_size=args.batch_size, precision=precision,
                           compile=compile)
        # float32 storage, so that the compiled-eager cosine is not hidden by float16 rounding.
        with StoreWriter(tmp / out, provenance={"channels": enc.embed_dim}, layers=["final"], overwrite=True,
                         dtype="float32") as w:
            t = time.perf_counter()
            extract_images(paths, enc, w, o)
            return time.perf_counter() - t

    # Interleaved repetitions (the machine is shared): medians of each variant.
    times: dict[str, list[float]] = {k: [] for k in ("bare", "bare_compiled", "bare_cl", "posvit", "posvit_compiled")}
    for _ in range(args.reps):
        times["bare"].append(bare(enc.model.forward_features))
        times["bare_compiled"].append(bare(lambda b: cf(b, ["final"])))
        times["bare_cl"].append(bare(cl_model.forward_features, to_cl=True))
        times["posvit"].append(run("fp32.h5", "fp32"))
        times["posvit_compiled"].append(run("compiled.h5", "fp32", compile=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.n / v for k, v in med.items()}
    bare_ips, posvit_ips, posvit_s = ips["bare"], ips["posvit"], med["posvit"]
    compile_s = max(0.0, first_call_s - 2 * med["bare_compiled"] / len(batches))  # less one eager + one compiled batch
    gain_per_image = 1 / ips["posvit"] - 1 / ips["posvit_compiled"]
    break_even = compile_s / gain_per_image if gain_per_image > 0 else float("inf")
    with FeatureStore(tmp / "fp32.h5") as a, FeatureStore(tmp / "compiled.h5") as b:
        ccos = np.concatenate([_cos(a.features(i), b.features(i), enc.embed_dim) for i in range(len(a))])
    extra: dict = {}
    if not args.no_memory:
        bf16_s = run("bf16.h5", "bf16")
        with FeatureStore(tmp / "fp32.h5") as a, FeatureStore(tmp / "bf16.h5") as b:
            cos = np.concatenate([_cos(a.features(i), b.features(i), enc.embed_dim) for i in range(len(a))])
        # Peak memory for N and 3N images through the real CLI.
        make_images(tmp / "more", 2 * args.n, args.size + 32, seed=1)
        common = ["-m", args.model, "-w", "random", "--size", f"square:{args.size}", "-q", "--batch-size",
                  str(args.batch_size)]
        rss_n = peak_rss_mib(["extract", str(tmp / "imgs"), *common, "-o", str(tmp / "m1.h5")])
        rss_3n = peak_rss_mib(["extract", str(tmp / "imgs"), str(tmp / "more"), *common, "-o", str(tmp / "m3.h5")])
        extra = {
            "bf16_images_per_s": round(args.n / bf16_s, 3),
            "bf16_speedup": round(posvit_s / bf16_s, 3),
            "bf16_fp32_cosine_mean": round(float(cos.mean()), 6),
            "bf16_fp32_cosine_min": round(float(cos.min()), 6),
            "peak_rss_mib_n": round(rss_n, 1),
            "peak_rss_mib_3n": round(rss_3n, 1),
        }

    ratio = posvit_ips / bare_ips
    memory_ok = args.no_memory or extra["peak_rss_mib_3n"] < extra["peak_rss_mib_n"] * 1.15
    result = {
        "name": "extract_speed",
        "posvit": round(posvit_ips, 3),
        "baseline": round(bare_ips, 3),
        "unit": "images/s",
        "ratio": round(ratio, 3),
        "target": 0.85,
        "pass": bool(ratio >= 0.85 and memory_ok),
        "model": args.model,
        "images": args.n,
        "input_px": args.size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "fused_attn": bool(all(getattr(b.attn, "fused_attn", False) for b in enc.model.blocks)),
        "compile_ok": compile_ok,
        "compile_s": round(compile_s, 1),
        "posvit_compiled": round(ips["posvit_compiled"], 3),
        "bare_compiled": round(ips["bare_compiled"], 3),
        "bare_channels_last": round(ips["bare_cl"], 3),
        "compiled_vs_bare": round(ips["posvit_compiled"] / bare_ips, 3),
        "compiled_vs_posvit": round(ips["posvit_compiled"] / posvit_ips, 3),
        "bare_compiled_vs_bare": round(ips["bare_compiled"] / bare_ips, 3),
        "channels_last_vs_bare": round(ips["bare_cl"] / bare_ips, 3),
        "compiled_target": 1.2,
        "compiled_pass": bool(ips["posvit_compiled"] / bare_ips >= 1.2),
        "compile_break_even_images": round(break_even) if break_even != float("inf") else None,
        "compiled_eager_cosine_min": round(float(ccos.min()), 7),
        **extra,
    }
    print(f"load {os.getloadavg()[0]:.2f}; bare forward {bare_ips:.2f} img/s (channels-last patch embed "
          f"{ips['bare_cl']:.2f}, compiled {ips['bare_compiled']:.2f}); posvit extract {posvit_ips:.2f} img/s "
          f"(ratio {ratio:.3f}), compiled {ips['posvit_compiled']:.2f} img/s (vs bare "
          f"{ips['posvit_compiled'] / bare_ips:.3f}, vs posvit eager {ips['posvit_compiled'] / posvit_ips:.3f}); "
          f"compile {compile_s:.0f} s, repaid after {break_even:.0f} images; compiled-eager cosine min "
          f"{ccos.min():.7f}")
    if extra:
        print(f"bf16 {extra['bf16_images_per_s']:.2f} img/s, cosine to fp32 min {extra['bf16_fp32_cosine_min']:.6f}; "
              f"peak RSS {extra['peak_rss_mib_n']:.0f} MiB ({args.n} images) vs {extra['peak_rss_mib_3n']:.0f} MiB "
              f"({3 * args.n} images)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Exact k-means of a store larger than memory: streamed Lloyd passes against the in-memory engine.

Data: a generated HDF5 store of N tokens × 192 channels in float16 (default the issue's 20 M tokens, about 7.7 GB
on disk), as images of 1000 × 1000 tokens (the last one shorter), written with ``StoreWriter`` in row bands:
``--centres`` planted Gaussian blobs (spread decaying over the channels, like ViT features) plus noise.
posvit: ``core.cluster.streamed.kmeans_stream`` on the store's z-scored PCA-50 tokens as ``cluster`` runs it
(projection fitted in one streamed pass, then every Lloyd pass re-reads and re-projects every token in row
bands), k = 100, one restart, ``--passes`` Lloyd iterations; its peak RSS (``ru_maxrss`` after the streamed run,
before the baseline loads anything) must stay under 3 GB.
baseline: the in-memory engine, ``core.cluster.kmeans.kmeans(algorithm="bounded")``, on the part that fits (the
first ``--fit-tokens`` projected tokens, default the in-memory cap 2**25 / 50 = 671,088), same k, seed and
iterations. Also reported: the streamed engine on that same in-memory part (no store reads), to separate the
cost of re-reading the store from the cost of plain Lloyd without distance bounds.
Times are seconds per Lloyd pass per million tokens (the median pass); ratio = posvit / baseline (above 1: the
streamed pass is slower per token). pass = peak RSS < 3 GB.

Usage: python benchmarks/cluster_stream.py [--tokens 20000000] [--k 100] [--passes 5] [--threads 2]
           [--fit-tokens 671088] [--out /tmp/streamkm-out] [--keep]
Writes only under --out and deletes what it wrote at the end (unless --keep). The last stdout line is one JSON
object; the exit code is 0 either way.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

WIDTH = 1000
CHANNELS = 192


def generate(path: Path, n_tokens: int, centres: int, seed: int = 0) -> float:
    """Write the store in row bands; returns seconds taken."""
    import numpy as np

    from posvit_cli.core.features.writer import StoreWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    scale = (np.exp(-np.arange(CHANNELS) / 40.0) * 3.0).astype(np.float32)
    means = rng.normal(size=(centres, CHANNELS)).astype(np.float32) * scale
    prov = {"model": "synthetic", "patch_size": 16, "channels": CHANNELS}
    band_rows = 50
    left = n_tokens
    with StoreWriter(path, provenance=prov, layers=["final"], dtype="float16", overwrite=True) as w:
        i = 0
        while left > 0:
            rows = min(WIDTH, max(1, left // WIDTH))
            handle = w.begin_image(f"img{i:05d}.png", (rows, WIDTH), CHANNELS, orig_size=(rows * 16, WIDTH * 16),
                                   proc_size=(rows * 16, WIDTH * 16))
            for r0 in range(0, rows, band_rows):
                r = min(band_rows, rows - r0)
                lab = rng.integers(0, centres, r * WIDTH)
                x = means[lab] + rng.standard_normal((r * WIDTH, CHANNELS), dtype=np.float32) * 0.7
                handle.write_rows("final", r0, x.reshape(r, WIDTH, CHANNELS))
            handle.finish()
            left -= rows * WIDTH
            i += 1
            if left < WIDTH:
                break
        w.commit()
    return time.perf_counter() - t0


def timed(source, log: list):
    """The token source, recording each full pass's wall time (reading + the consumer's work) in ``log``."""

    def chunks():
        t0 = time.perf_counter()
        yield from source()
        log.append(time.perf_counter() - t0)

    return chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--centres", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit-tokens", type=int, default=None)
    ap.add_argument("--out", default="/tmp/streamkm-out")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    import torch

    from posvit_cli.core.cluster import sampled
    from posvit_cli.core.cluster.kmeans import kmeans
    from posvit_cli.core.cluster.projection import fit_projection, projected_source
    from posvit_cli.core.cluster.streamed import kmeans_stream
    from posvit_cli.core.features.store import FeatureStore

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokens.h5"
    result = {"name": "cluster_stream", "unit": "s per Lloyd pass per million tokens", "target": 3.0,
              "target_unit": "GB peak RSS of the streamed run"}
    try:
        gen_s = generate(path, args.tokens, args.centres)
        print(f"generated {path} ({path.stat().st_size / 1e9:.2f} GB) in {gen_s:.0f} s", file=sys.stderr)
        with FeatureStore(path) as fs:
            indices = list(range(len(fs)))
            n = sum(int(r.grid[0]) * int(r.grid[1]) for r in fs.records)
            t0 = time.perf_counter()
            proj = fit_projection(fs, "final", indices, pca_dim=50)
            proj_s = time.perf_counter() - t0
            log: list = []
            source = projected_source(fs, "final", indices, proj)
            t0 = time.perf_counter()
            res = kmeans_stream(timed(source, log), n, proj.out_dim, args.k, max_iter=args.passes, seed=0)
            stream_s = time.perf_counter() - t0
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
            # Passes: the mean, the seeding sample, then the Lloyd passes (and a final assignment).
            lloyd = log[2 : 2 + res.n_iter] or log[2:]
            per_pass = statistics.median(lloyd)
            m = min(n, args.fit_tokens or sampled.FIT_MAX_VALUES // proj.out_dim)
            part = torch.empty(m, proj.out_dim)
            for start, y in source():
                if start >= m:
                    break
                part[start : start + y.shape[0]] = y[: m - start]
        ticks = []
        t0 = time.perf_counter()
        ref = kmeans(part, args.k, max_iter=args.passes, seed=0, algorithm="bounded",
                     progress=lambda task, done, total: ticks.append(time.perf_counter()))
        mem_s = time.perf_counter() - t0
        # Per iteration: between progress ticks (the first tick also carries the seeding); median, as streamed.
        gaps = [b - a for a, b in zip(ticks, ticks[1 : ref.n_iter])]
        per_iter = statistics.median(gaps) if gaps else mem_s / max(1, ref.n_iter)
        mlog: list = []
        mem_stream = kmeans_stream(timed(lambda: ((s, part[s : s + 131_072]) for s in range(0, m, 131_072)), mlog),
                                   m, proj.out_dim, args.k, max_iter=args.passes, seed=0)
        mem_stream_pass = statistics.median(mlog[2 : 2 + mem_stream.n_iter] or mlog[2:])
        posvit = per_pass / (n / 1e6)
        baseline = per_iter / (m / 1e6)
        result.update({
            "posvit": round(posvit, 4), "baseline": round(baseline, 4), "ratio": round(posvit / baseline, 3),
            "pass": bool(peak_gb < 3.0), "peak_rss_gb": round(peak_gb, 3), "tokens": n, "channels": CHANNELS,
            "store_gb": round(path.stat().st_size / 1e9, 3), "k": args.k, "threads": args.threads,
            "lloyd_passes": res.n_iter, "stream_pass_s": [round(v, 2) for v in lloyd],
            "stream_total_s": round(stream_s, 1), "projection_fit_s": round(proj_s, 1),
            "generate_s": round(gen_s, 1), "in_memory_tokens": m, "in_memory_iters": ref.n_iter,
            "in_memory_s_per_iter": round(per_iter, 3),
            "streamed_on_the_in_memory_part_s_per_pass_per_mtoken": round(mem_stream_pass / (m / 1e6), 4),
            "same_labels_on_the_part": bool((mem_stream.labels == ref.labels).all()),
        })
    except Exception as exc:  # the JSON line comes out either way
        result.update({"pass": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if not args.keep:
            # Only what this run wrote: the store (a file, or a folder for Zarr), then --out if left empty.
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
    print(json.dumps(result))


if __name__ == "__main__":
    main()

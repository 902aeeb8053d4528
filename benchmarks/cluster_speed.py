"""posvit's k-means against scikit-learn's KMeans on the same data, in one run.

Data: N × 50 float32 points (default 1M), seeded: 1,000 overlapping Gaussian blobs whose spread decays over the
dimensions like a PCA spectrum, so k = 300 clusters must cut through blobs (as on real PCA-50 ViT tokens) and
Lloyd's algorithm does not settle in a few iterations.
posvit: ``posvit_cli.core.cluster.kmeans.kmeans`` (sampled greedy k-means++ seeding, exact Lloyd with Hamerly bounds).
baseline: ``sklearn.cluster.KMeans(algorithm="lloyd", init="k-means++", n_init=1)``.
Both run the same number of Lloyd iterations (``--iters``, tol 0, both stop earlier only if no label changes),
one restart, with the same number of CPU threads, each in its own process, once per seed (``--seeds``, default
0,1,2; posvit and scikit-learn alternate, so load changes hit both). Target: posvit ≥ 3× faster on the CPU (total
time over the seeds) at equal or lower inertia, compared as the mean over the seeds ("equal": within
``--inertia-tol``, default 0.1 %). One seed is not enough for the inertia: two k-means++ seedings of the same
quality end 0.1-0.2 % apart after 100 iterations, either way round. Also reported: both inertias
and iteration counts, posvit's peak RSS (its process holds the data, 200 MB at 1M × 50, plus torch), and, when a
GPU is present, posvit's time on CUDA (data starting in host memory) as extra fields; the CPU's vector
extensions (``cpu_capability``: torch's dispatch level, ``cpu_vector_flags`` from /proc/cpuinfo), the ratio per
seed and the load average at the start and end.

Usage: python benchmarks/cluster_speed.py [--n 1000000] [--k 300] [--iters 100] [--threads 1] [--seeds 0,1,2]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def make_data(n: int, d: int = 50, blobs: int = 1000, seed: int = 0):
    """Overlapping Gaussian blobs with a decaying per-dimension scale, float32 (n, d)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scale = np.exp(-np.arange(d) / 15.0).astype(np.float32) * 3.0
    centres = rng.normal(size=(blobs, d)).astype(np.float32) * scale
    x = np.empty((n, d), dtype=np.float32)
    step = 250_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x[s : s + m] = centres[rng.integers(0, blobs, m)] + rng.normal(size=(m, d)).astype(np.float32) * (0.6 * scale + 0.05)
    return x


def _run_posvit(n, k, iters, seed, threads, device="cpu"):
    import torch

    from posvit_cli.core.cluster.kmeans import kmeans

    torch.set_num_threads(threads)
    x = make_data(n, seed=seed)
    if device != "cpu":
        # Warm up the CUDA context and kernels outside the timed run; the data start in host memory.
        kmeans(x[:50_000], k, max_iter=2, device=device)
        torch.cuda.synchronize()
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = kmeans(x, k, n_init=1, max_iter=iters, tol=0.0, seed=seed, device=device)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "inertia": res.inertia, "n_iter": res.n_iter, "peak_rss_mib": peak,
            "data_rss_mib": rss_data, "algorithm": res.algorithm}


def _run_sklearn(n, k, iters, seed, threads):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = make_data(n, seed=seed)
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        km = KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd", random_state=seed).fit(x)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "inertia": float(km.inertia_), "n_iter": int(km.n_iter_)}


def _child(which: str, args, seed: int, extra: str = "") -> dict:
    """Run one side in a fresh process, so peak RSS and caches are its own."""
    code = (
        "import json,sys\nsys.path.insert(0, %r)\nimport cluster_speed as b\n"
        "print(json.dumps(b._run_%s(%d, %d, %d, %d, %d%s)))\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), which, args.n, args.k, args.iters, seed, args.threads, extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{which} run failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def cpu_capability() -> dict:
    """The CPU's vector extensions: torch's dispatch level (e.g. ``AVX2``, ``AVX512``) and the /proc/cpuinfo flags."""
    import torch

    cap = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    key, _, val = line.partition(":")
                    key = key.strip()
                    if key == "flags":
                        cap["cpu_vector_flags"] = sorted({v for v in val.split() if v.startswith(("avx", "fma", "amx"))})
                    else:
                        cap["cpu_model"] = val.strip()
                if "cpu_vector_flags" in cap and "cpu_model" in cap:
                    break
    except OSError:
        pass
    return cap


def _version(module: str) -> str:
    import importlib

    return getattr(importlib.import_module(module), "__version__", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the data and the seeding, comma-separated")
    # One thread each by default: on small shared machines, OpenMP threads that wait for a busy core slow the
    # thousands of short torch ops far more than they help, which measures the neighbours, not the code.
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for each side (default 1)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the extra CUDA timing when a GPU is present")
    ap.add_argument("--inertia-tol", type=float, default=1e-3,
                    help="relative inertia excess still counted as equal (default 0.001)")
    args = ap.parse_args()

    seeds = [int(v) for v in args.seeds.split(",")]
    cap = cpu_capability()
    load_start = os.getloadavg()
    print(f"CPU: {cap.get('cpu_model', '?')}, torch dispatch {cap['cpu_capability']}, flags "
          f"{' '.join(cap.get('cpu_vector_flags', []))}", file=sys.stderr)
    print(f"data: {args.n} x 50 float32, k={args.k}, {args.iters} iterations, 1 restart, {args.threads} threads, "
          f"seeds {seeds}", file=sys.stderr)
    runs = []
    for seed in seeds:
        ours = _child("posvit", args, seed)
        base = _child("sklearn", args, seed)
        runs.append((ours, base))
        print(f"seed {seed}: posvit {ours['seconds']:7.2f} s inertia {ours['inertia']:.6e} ({ours['n_iter']} it, "
              f"peak RSS {ours['peak_rss_mib']:.0f} MiB) | sklearn {base['seconds']:7.2f} s inertia "
              f"{base['inertia']:.6e} ({base['n_iter']} it) | {base['seconds'] / ours['seconds']:.2f}x, inertia "
              f"{ours['inertia'] / base['inertia'] - 1:+.4%}", file=sys.stderr, flush=True)
    cuda = None
    if not args.no_cuda:
        import torch

        if torch.cuda.is_available():
            cuda = _child("posvit", args, seeds[0], extra=', device="cuda"')
    t_ours = sum(o["seconds"] for o, _ in runs)
    t_base = sum(b["seconds"] for _, b in runs)
    i_ours = sum(o["inertia"] for o, _ in runs) / len(runs)
    i_base = sum(b["inertia"] for _, b in runs) / len(runs)
    ratio = t_base / t_ours
    rel = i_ours / i_base - 1.0
    ours, base = runs[0]
    print(f"total: posvit {t_ours:.1f} s, sklearn {t_base:.1f} s: speed-up {ratio:.2f}x; mean inertia posvit/sklearn"
          f" - 1 = {rel:+.4%}", file=sys.stderr)
    if cuda:
        print(f"posvit on CUDA : {cuda['seconds']:8.2f} s  inertia {cuda['inertia']:.6e}  "
              f"({base['seconds'] / cuda['seconds']:.1f}x sklearn on the CPU)")
    result = {
        "name": "cluster_speed",
        "posvit": round(t_ours, 3),
        "baseline": round(t_base, 3),
        "unit": "s",
        "ratio": round(ratio, 3),
        "target": 3.0,
        "pass": bool(ratio >= 3.0 and rel <= args.inertia_tol),
        "n": args.n,
        "d": 50,
        "k": args.k,
        "iterations": args.iters,
        "threads": args.threads,
        "seeds": seeds,
        "posvit_seconds": [round(o["seconds"], 3) for o, _ in runs],
        "sklearn_seconds": [round(b["seconds"], 3) for _, b in runs],
        "posvit_inertia_mean": i_ours,
        "sklearn_inertia_mean": i_base,
        "inertia_rel_diff": rel,
        "inertia_rel_diff_per_seed": [round(o["inertia"] / b["inertia"] - 1, 6) for o, b in runs],
        "ratio_per_seed": [round(b["seconds"] / o["seconds"], 3) for o, b in runs],
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        **cap,
        "posvit_n_iter": [o["n_iter"] for o, _ in runs],
        "sklearn_n_iter": [b["n_iter"] for _, b in runs],
        "posvit_peak_rss_mib": round(max(o["peak_rss_mib"] for o, _ in runs), 1),
        "posvit_data_rss_mib": round(ours["data_rss_mib"], 1),
        "sklearn_version": _version("sklearn"),
        "torch_version": _version("torch"),
    }
    if cuda:
        result["posvit_cuda_seconds"] = round(cuda["seconds"], 3)
        result["posvit_cuda_inertia"] = cuda["inertia"]
        result["cuda_ratio"] = round(base["seconds"] / cuda["seconds"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

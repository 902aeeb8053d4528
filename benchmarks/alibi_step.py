"""Training-step cost of posvit's ALiBi attention against plain attention and the published explicit-softmax way.

One ViT-S/14 (``vit_small_patch14_dinov2``, random weights) at 224 px, batch 8, one distillation step (forward,
cosine loss against fixed targets, backward, AdamW update), three ways:

- ``plain``: the original model, learned position embedding, fused attention (``F.scaled_dot_product_attention``);
- ``alibi``: posvit's retrofit: no position embedding, the 2-D ALiBi bias as an additive float mask to the same
  fused attention (:mod:`posvit_cli.core.features.alibi`);
- ``explicit``: the same bias added to explicitly computed logits and softmax (timm's non-fused path), which is
  how the reference implementation trains.

Step times: interleaved rounds (plain, alibi, explicit, plain, ...) so that load changes on a shared machine hit
all three alike; the ratios use the best round of each (load can only add time; ``timeit``'s rule). On CPU the
time is the process's CPU time (``time.process_time``), which other processes on a shared machine do not inflate;
with ``--threads 1`` (the default here) it equals the wall time of an idle machine. Wall times are reported too.
On CUDA the time is synchronised wall time. Memory: the activations a step keeps for its backward pass (distinct storages
saved by autograd, exact on any device), and on CUDA also ``torch.cuda.max_memory_allocated`` per variant.

A second, smaller measurement at 518 px (``--high-res 518:1``; 1374 tokens) shows where attention dominates.

Target (at 224 px, batch 8): ALiBi at most 1.2 × plain, and faster than explicit. The last line printed is one
JSON object.

What a GPU run changes (``--device cuda --precision bf16``): without a mask SDPA runs FlashAttention; an additive
float mask rules that kernel out and SDPA takes the memory-efficient kernel, which adds the bias (broadcast over
batch and heads) inside the kernel, still without materialising the B·H·N² attention matrix. The explicit path
materialises logits, probabilities and their gradients: at 518 px and the published batch of 32 that is
32 · 6 · 1374² ≈ 360 M values per tensor per block, several GiB per step, and it is bound by memory traffic, so the
fused path's lead in time and memory grows with resolution and batch on a GPU. Under bf16 autocast the mask is cast
to bf16 with q and k.

Usage: ``python benchmarks/alibi_step.py [--device cpu|cuda] [--size 224] [--batch 8] [--rounds 5] [--high-res 518:1]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = ("plain", "alibi", "explicit")
MODEL = "vit_small_patch14_dinov2"


def build(variant: str, size: int, device):
    import timm
    import torch

    from posvit_cli.core.features.alibi import _apply

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=0, img_size=size)
    if variant in ("alibi", "explicit"):
        _apply(model, "alibi", {}, MODEL)
    if variant == "explicit":
        for blk in model.blocks:
            blk.attn.fused_attn = False  # the reference: logits + bias → softmax, written out
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    return model, opt


def make_step(model, opt, batch: int, size: int, device, precision: str):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    p = model.num_prefix_tokens
    n = (size // 14) ** 2
    target = torch.randn(batch, n, model.embed_dim, generator=g).to(device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else None

    def step():
        if amp is not None:
            with amp:
                out = model.forward_features(x)[:, p:]
        else:
            out = model.forward_features(x)[:, p:]
        loss = (1 - F.cosine_similarity(out.float(), target, dim=-1)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    return step


def saved_for_backward_mb(model, batch: int, size: int, device, precision: str) -> float:
    """Bytes the forward pass keeps for the backward pass (distinct storages): a training step's activation memory.

    Exact and independent of allocator caching, unlike the resident set on CPU.
    """
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        except Exception:  # tensors without storage (e.g. wrapped subclasses)
            pass
        return t

    x = torch.randn(batch, 3, size, size, device=device)
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if amp is not None:
            with amp:
                out = model.forward_features(x)
        else:
            out = model.forward_features(x)
    del out
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params) / 2**20


def measure(size: int, batch: int, rounds: int, warmup: int, device, precision: str) -> dict:
    """Interleaved timing and memory of the three variants at one input size."""
    import torch

    steps, saved = {}, {}
    for v in VARIANTS:
        model, opt = build(v, size, device)
        steps[v] = make_step(model, opt, batch, size, device, precision)
        saved[v] = round(saved_for_backward_mb(model, batch, size, device, precision), 1)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peak_gpu: dict[str, float] = {}
    for v in VARIANTS:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            steps[v]()
        if device.type == "cuda":
            peak_gpu[v] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    cpu_clock = device.type == "cpu"
    for _ in range(rounds):
        for v in VARIANTS:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[v]()
            wall = time.perf_counter() - t0
            walls[v].append(wall)
            times[v].append(time.process_time() - c0 if cpu_clock else wall)
    best = {v: min(t) for v, t in times.items()}
    med = {v: statistics.median(t) for v, t in times.items()}
    for v in VARIANTS:
        gpu = f", CUDA peak {peak_gpu[v]} MB" if peak_gpu else ""
        print(f"{size} px × {batch}: {v:9s} step best {best[v] * 1000:8.1f} ms {'CPU' if cpu_clock else 'wall'} "
              f"(median {med[v] * 1000:.1f}, best wall {min(walls[v]) * 1000:.1f}), saved for backward "
              f"{saved[v]} MB{gpu}", file=sys.stderr)
    print(f"{size} px × {batch}: alibi / plain = {best['alibi'] / best['plain']:.3f}; explicit / alibi = "
          f"{best['explicit'] / best['alibi']:.3f}", file=sys.stderr)
    return {
        "size": size, "batch": batch,
        "best": {v: round(t, 4) for v, t in best.items()},
        "median": {v: round(t, 4) for v, t in med.items()},
        "best_wall": {v: round(min(t), 4) for v, t in walls.items()},
        "saved_for_backward_mb": saved,
        "cuda_peak_mb": peak_gpu or None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: see the CPU-time note)")
    ap.add_argument("--high-res", default="518:1",
                    help="SIZE:BATCH of a second measurement where attention dominates ('' to skip)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    primary = measure(args.size, args.batch, args.rounds, args.warmup, device, args.precision)
    high = None
    if args.high_res:
        hsize, hbatch = (int(v) for v in args.high_res.split(":"))
        high = measure(hsize, hbatch, max(2, args.rounds // 2), args.warmup, device, args.precision)
    best = primary["best"]
    ratio = best["alibi"] / best["plain"]
    ratio_explicit = best["explicit"] / best["alibi"]
    result = {
        "name": "alibi_train_step",
        "posvit": round(best["alibi"], 4),
        "baseline": round(best["plain"], 4),
        "unit": "CPU s/step" if device.type == "cpu" else "s/step",
        "ratio": round(ratio, 3),
        "target": "alibi <= 1.2 x plain and alibi < explicit",
        "pass": bool(ratio <= 1.2 and best["alibi"] < best["explicit"]),
        "explicit": round(best["explicit"], 4),
        "explicit_over_alibi": round(ratio_explicit, 3),
        "median_s": primary["median"],
        "best_wall_s": primary["best_wall"],
        "saved_for_backward_mb": primary["saved_for_backward_mb"],
        "cuda_peak_mb": primary["cuda_peak_mb"],
        "high_res": None if high is None else {
            "size": high["size"], "batch": high["batch"], "best_s": high["best"],
            "alibi_over_plain": round(high["best"]["alibi"] / high["best"]["plain"], 3),
            "explicit_over_alibi": round(high["best"]["explicit"] / high["best"]["alibi"], 3),
            "saved_for_backward_mb": high["saved_for_backward_mb"], "cuda_peak_mb": high["cuda_peak_mb"],
        },
        "model": MODEL,
        "size": args.size,
        "batch": args.batch,
        "precision": args.precision,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

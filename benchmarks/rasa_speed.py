"""posvit's cached RASA against the reference protocol that re-runs the frozen backbone every epoch.

posvit: extract the final patch tokens of the images once (extract_images → float16 HDF5 store), read them into a
token cache and train all rounds on it (train_rasa: every round, every epoch, per-round evaluation included).
baseline: the references' protocol, simulated with the same model, images and settings: the images are decoded
and normalised once (generous to the baseline: the references decode and augment every epoch too), and every
optimiser step runs the frozen backbone on its batch of images (all their tokens, images in order, unshuffled),
applies the earlier planes in training order and takes one AdamW step on W_t.

Both start every round from the same initial weights (core.rasa.initial_weights). The script reports the largest
principal angle between posvit's and the reference's plane of every round: for posvit's default batches (random
tokens of all images; the planes differ by optimiser noise) and for `--batching images-in-order` (the
references' batches, trained on the same cache; the planes differ only by the float16 cache), and, for scale,
the angle of two random planes and of each trained plane to its starting weights. Target: ≥ 20× faster for
9 rounds × 5 epochs (the time of the default posvit run, extraction included).

Threads: the backbone runs on --threads in both protocols; posvit's round loop runs on one thread, its default on
the CPU (its matrices are small).

A randomly initialised ViT barely encodes position, so its position embedding is scaled (--pos-scale) to make
position as decodable as in trained models (the report shows the coordinate error before and after RASA).

Usage: python benchmarks/rasa_speed.py [--n 32] [--model vit_tiny_patch16_224] [--size 256] [--batch-images 8]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
    paths = []
    for i in range(n):
        a = gaussian_filter(rng.random((side, side, 3)), (3, 3, 0))
        a = ((a - a.min()) / np.ptp(a) * 255).astype(np.uint8)
        p = folder / f"img{i:04d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def plane_angle_deg(a, b) -> float:
    """Largest principal angle (degrees) between the planes spanned by the rows of a and b (2 × D each)."""
    import torch

    from posvit_cli.core.debias.heads import gram_schmidt

    ua, ub = gram_schmidt(torch.as_tensor(a)), gram_schmidt(torch.as_tensor(b))
    s = torch.linalg.svdvals(ua @ ub.T).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(s.min())))


def reference_protocol(encoder, batches, coords, config, D):
    """The references' loop: backbone forward inside every step; earlier planes applied to the tokens in order."""
    import torch
    import torch.nn.functional as F

    from posvit_cli.core.debias.heads import gram_schmidt
    from posvit_cli.core.debias.rasa import initial_weights

    inits = initial_weights(D, config.rounds, config.seed)
    total = len(batches) * config.epochs
    planes, bases = [], []
    for t in range(config.rounds):
        W = inits[t].clone().requires_grad_(True)
        opt = torch.optim.AdamW([W], lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
        step = 0
        for _ in range(config.epochs):
            for x in batches:
                with torch.no_grad():
                    z = encoder.forward_tokens(x, ["final"])[0]["final"].reshape(-1, D).float()
                    for u in bases:
                        z = z - (z @ u.T) @ u
                for g in opt.param_groups:
                    g["lr"] = 0.5 * config.lr * (1.0 + math.cos(math.pi * step / total))
                y = coords.repeat(x.shape[0], 1)
                loss = F.mse_loss(torch.sigmoid(z @ W.T), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
        W_t = W.detach().clone()
        planes.append(W_t)
        bases.append(gram_schmidt(W_t).float())
    return torch.stack(planes).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32, help="images")
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="timm model (random weights)")
    ap.add_argument("--size", type=int, default=256, help="image side in px")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-images", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--pos-scale", type=float, default=50.0, help="factor on the random position embedding")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the backbone (both protocols)")
    ap.add_argument("--target", type=float, default=20.0)
    args = ap.parse_args()

    import torch

    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.features.extract import ExtractOptions, extract_images, extraction_provenance
    from posvit_cli.core.io.images import read_image, to_channels, to_float
    from posvit_cli.core.io.preprocess import parse_size, resize_and_normalise
    from posvit_cli.core.debias.rasa import RasaConfig, grid_coordinates, initial_weights, load_token_cache, train_rasa
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.features.writer import StoreWriter

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="posvit-rasa-bench-"))
    paths = make_images(tmp / "imgs", args.n, args.size)
    encoder = load_encoder(args.model, "random", seed=0)
    with torch.no_grad():
        encoder.model.pos_embed.mul_(args.pos_scale)
    D = encoder.embed_dim
    config = RasaConfig(rounds=args.rounds, epochs=args.epochs, lr=args.lr, batch_images=args.batch_images, seed=0)
    size = parse_size(f"crop:{args.size}")
    print(f"{args.n} images of {args.size} px, {args.model} ({D} channels, random weights, position embedding × "
          f"{args.pos_scale:g}), {args.rounds} rounds × {args.epochs} epochs, {args.batch_images} images per step, "
          f"lr {args.lr:g}, {args.threads} thread(s)", file=sys.stderr)

    # Warm-up outside the clocks (lazy initialisation of autograd, LAPACK and the model's first forward), so both
    # protocols are timed in steady state.
    from posvit_cli.core.debias.rasa import TokenCache

    train_rasa(TokenCache(torch.randn(64, D), torch.rand(64, 2), 4), RasaConfig(rounds=2, epochs=1, batch_images=2))
    with torch.no_grad():
        encoder.forward_tokens(torch.zeros(1, encoder.in_chans, args.size, args.size), ["final"])

    # -- posvit: extract once, train on the cache ---------------------------------------------------------------
    t0 = time.perf_counter()
    opts = ExtractOptions(layers=["final"], size=size, batch_size=16, workers=2)
    prov = extraction_provenance(encoder, opts, device=torch.device("cpu"), command="benchmark")
    writer = StoreWriter(tmp / "cache.h5", provenance=prov, layers=["final"], dtype="float16")
    summary = extract_images(paths, encoder, writer, opts)
    writer.close()
    t_extract = time.perf_counter() - t0
    with FeatureStore(tmp / "cache.h5") as store:
        cache = load_token_cache(store)
    result = train_rasa(cache, config)
    t_posvit = time.perf_counter() - t0
    in_order = train_rasa(cache, RasaConfig(rounds=args.rounds, epochs=args.epochs, lr=args.lr,
                                            batch_images=args.batch_images, batching="images-in-order", seed=0))
    print(f"posvit: {t_posvit:.1f} s (extraction {t_extract:.1f} s of {summary.written} images, training "
          f"{result.seconds:.1f} s: {result.steps_per_round} steps per round on {result.tokens} cached tokens)",
          file=sys.stderr)

    # -- the reference protocol ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    xs = []
    for p in paths:
        img = to_channels(to_float(read_image(p)), encoder.in_chans)
        xs.append(resize_and_normalise(img, size, encoder.patch_size, encoder.mean, encoder.std)[0])
    x = torch.stack(xs)
    batches = list(x.split(args.batch_images))
    h, w = encoder.grid(x.shape[-2], x.shape[-1])
    coords = torch.from_numpy(grid_coordinates(h, w))
    baseline_planes = reference_protocol(encoder, batches, coords, config, D)
    t_baseline = time.perf_counter() - t0
    forwards = args.rounds * args.epochs * args.n
    print(f"reference protocol: {t_baseline:.1f} s ({forwards} backbone forwards)", file=sys.stderr)

    angles = [plane_angle_deg(a, b) for a, b in zip(result.planes, baseline_planes)]
    angles_in_order = [plane_angle_deg(a, b) for a, b in zip(in_order.planes, baseline_planes)]
    rng = np.random.default_rng(0)
    random_angle = float(np.mean([plane_angle_deg(rng.normal(size=(2, D)), rng.normal(size=(2, D)))
                                  for _ in range(20)]))
    inits = initial_weights(D, args.rounds, 0).numpy()
    moved = [float(np.linalg.norm(p - i) / np.linalg.norm(i)) for p, i in zip(result.planes, inits)]
    init_angles = [plane_angle_deg(p, i) for p, i in zip(result.planes, inits)]
    first, last = result.rounds[0], result.rounds[-1]
    ratio = t_baseline / t_posvit
    print(f"ratio {ratio:.1f}× (target ≥ {args.target:g}×); plane angles posvit vs reference per round: "
          + ", ".join(f"{a:.1f}°" for a in angles) + "; with the references' batches (--batching images-in-order): "
          + ", ".join(f"{a:.2f}°" for a in angles_in_order) + f" (two random planes: {random_angle:.0f}°; trained "
          "planes vs their start: " + ", ".join(f"{a:.0f}°" for a in init_angles) + ")", file=sys.stderr)
    print(f"coordinate MSE {first.probe_mse_before:.4f} → {last.probe_mse_after:.4f} (constant predictor "
          f"{last.constant_mse:.4f}); cos(raw, clean) {last.cosine:.3f}", file=sys.stderr)
    out = {
        "name": "rasa_speed",
        "posvit": round(t_posvit, 3),
        "baseline": round(t_baseline, 3),
        "unit": "s",
        "ratio": round(ratio, 2),
        "target": args.target,
        "pass": bool(ratio >= args.target),
        "posvit_extract_s": round(t_extract, 3),
        "posvit_train_s": round(result.seconds, 3),
        "backbone_forwards_baseline": forwards,
        "backbone_forwards_posvit": args.n,
        "posvit_extract_s_per_image": round(t_extract / args.n, 4),
        "baseline_s_per_image_forward": round(t_baseline / forwards, 4),
        "plane_angle_deg": [round(a, 2) for a in angles],
        "max_plane_angle_deg": round(max(angles), 2),
        "plane_angle_images_in_order_deg": [round(a, 3) for a in angles_in_order],
        "max_plane_angle_images_in_order_deg": round(max(angles_in_order), 3),
        "random_plane_angle_deg": round(random_angle, 1),
        "plane_angle_from_init_deg": [round(a, 1) for a in init_angles],
        "relative_change_from_init": [round(m, 3) for m in moved],
        "coordinate_mse_before": round(first.probe_mse_before, 5),
        "coordinate_mse_after": round(last.probe_mse_after, 5),
        "coordinate_mse_constant": round(last.constant_mse, 5),
        "images": args.n, "size": args.size, "model": args.model, "channels": D, "rounds": args.rounds,
        "epochs": args.epochs, "batch_images": args.batch_images, "lr": args.lr, "pos_scale": args.pos_scale,
        "threads": args.threads, "steps_per_round": result.steps_per_round,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train posvit's own small encoder (``posvit-tiny``) with masked image modelling on synthetic micrographs.

No pretrained weights can be downloaded where posvit is developed, and a randomly initialised ViT has neither
semantics nor a smooth position embedding. This script trains a ViT with a learned absolute position embedding
the way MAE does, on data the project generates itself, so the positional bias the examples measure is genuine.

Recipe (see ``examples/models/posvit-tiny.md`` for the measured run):

* Encoder: timm ``vit_tiny_patch16_224`` with ``patch_size=8, depth=6, num_heads=3, in_chans=1, img_size=64``
  (width 192, 2.69 M parameters, learned ``pos_embed`` of 1 + 8×8 tokens), built by posvit's registry
  (``load_encoder("posvit-tiny", "random")``) so the weights drop straight into ``posvit extract``.
* Data: ``--images`` synthetic 128² micrographs (all five kinds of :mod:`posvit_cli.core.synthetic.generate`, random
  illumination ramps up to 0.15), seeds 1,000,000 + i (the shipped example set uses seeds below 100); each step
  takes random 64² crops with random flips and transposes.
* Objective: 75 % of the 64 patches masked; the encoder sees the 16 visible ones; a light decoder (width 128,
  2 blocks, 4 heads, its own learned position embedding, a mask token) predicts the pixels; the loss is the mean
  squared error on the masked patches of the *image-standardised* crop (MAE's per-patch normalised target does not
  learn on noisy micrographs: most patches are flat plus noise). Predicting zero scores 1.0.
* AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.05 except on biases, norms, tokens and position embeddings),
  linear warm-up then cosine decay to 1e-5, batch 128, gradient clipping at 1, fp32.

Deterministic: the batch, crops, flips and masks of step ``t`` are drawn from ``numpy.random.default_rng([seed,
t])``, so a resumed run continues exactly as an uninterrupted one (same thread count). A checkpoint is written
atomically every ``--checkpoint-every`` steps; running the same command again resumes from it.

Usage::

    nice -n 10 python examples/train_tiny_encoder.py train --workdir runs/tiny --steps 3000
    python examples/train_tiny_encoder.py export --workdir runs/tiny --out examples/models/posvit-tiny.safetensors
    python examples/train_tiny_encoder.py evaluate --weights examples/models/posvit-tiny.safetensors \\
        --data examples/data/textures --json examples/models/posvit-tiny.probe.json

Outputs in ``--workdir``: ``train_images.npz`` (the generated data, reused on resume), ``checkpoint.pt``,
``loss.csv`` (step, mean loss over the last ``--log-every`` steps, learning rate, cumulative training seconds,
images per second) and ``probe.csv`` (held-out positional probe every ``--probe-every`` steps).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CROP = 64
PATCH = 8
TRAIN_SIZE = 128
TRAIN_SEED_BASE = 1_000_000
PROBE_SEED_BASE = 2_000_000
TRAIN_KINDS = ("grains", "particles", "cracks", "fractal", "spinodal")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Data


def _one_image(i: int, size: int, seed_base: int, ramp_max: float) -> np.ndarray:
    from posvit_cli.core.synthetic.generate import make_sample

    kind = TRAIN_KINDS[i % len(TRAIN_KINDS)]
    return make_sample(kind, size, seed_base + i, ramp_max=ramp_max, with_scribbles=False).image


def generate_images(n: int, size: int, seed_base: int, ramp_max: float, workers: int = 1) -> np.ndarray:
    """``n`` uint8 images ``(n, size, size)``: kinds in turn, image ``i`` from seed ``seed_base + i``.

    The result does not depend on ``workers`` (every image has its own seed).
    """
    import functools
    from concurrent.futures import ProcessPoolExecutor

    out = np.empty((n, size, size), np.uint8)
    t0 = time.perf_counter()
    make = functools.partial(_one_image, size=size, seed_base=seed_base, ramp_max=ramp_max)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for i, img in enumerate(pool.map(make, range(n), chunksize=64)):
                out[i] = img
                if (i + 1) % 2000 == 0:
                    log(f"  generated {i + 1}/{n} images ({time.perf_counter() - t0:.0f} s)")
    else:
        for i in range(n):
            out[i] = make(i)
            if (i + 1) % 2000 == 0:
                log(f"  generated {i + 1}/{n} images ({time.perf_counter() - t0:.0f} s)")
    return out


def load_or_make_data(path: Path, n: int, workers: int = 1) -> np.ndarray:
    if path.is_file():
        with np.load(path) as z:
            if int(z["n"]) == n and int(z["seed_base"]) == TRAIN_SEED_BASE:
                return z["images"]
    log(f"generating {n} training images of {TRAIN_SIZE}² px ...")
    imgs = generate_images(n, TRAIN_SIZE, TRAIN_SEED_BASE, ramp_max=0.15, workers=workers)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, images=imgs, n=n, seed_base=TRAIN_SEED_BASE)
    os.replace(tmp, path)
    return imgs


def batch_for_step(images: np.ndarray, step: int, seed: int, batch: int):
    """The crops ``(B, 64, 64)`` uint8 and mask noise ``(B, 64)`` of one step, a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    n, H, W = images.shape
    idx = rng.integers(0, n, batch)
    oy = rng.integers(0, H - CROP + 1, batch)
    ox = rng.integers(0, W - CROP + 1, batch)
    ar = np.arange(CROP)
    crops = images[idx[:, None, None], (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]]
    flips = rng.random((batch, 3)) < 0.5
    crops = np.where(flips[:, 0, None, None], crops.transpose(0, 2, 1), crops)
    crops = np.where(flips[:, 1, None, None], crops[:, :, ::-1], crops)
    crops = np.where(flips[:, 2, None, None], crops[:, ::-1, :], crops)
    noise = rng.random((batch, (CROP // PATCH) ** 2))
    return np.ascontiguousarray(crops), noise


# --------------------------------------------------------------------------------------------------------------
# The masked autoencoder


def build_mae(encoder_model, dec_dim: int = 128, dec_depth: int = 2, dec_heads: int = 4, mask_ratio: float = 0.75):
    import torch
    from torch import nn
    from timm.layers import trunc_normal_
    from timm.models.vision_transformer import Block

    class MAE(nn.Module):
        """MAE around a timm VisionTransformer: encoder on visible patches, light decoder, masked pixel loss."""

        def __init__(self, vit):
            super().__init__()
            self.vit = vit
            n = (CROP // PATCH) ** 2
            self.n_keep = int(round(n * (1 - mask_ratio)))
            self.enc_to_dec = nn.Linear(vit.embed_dim, dec_dim)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
            self.dec_pos = nn.Parameter(torch.zeros(1, 1 + n, dec_dim))
            self.dec_blocks = nn.ModuleList(
                [Block(dec_dim, dec_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(dec_depth)]
            )
            self.dec_norm = nn.LayerNorm(dec_dim)
            self.head = nn.Linear(dec_dim, PATCH * PATCH)
            trunc_normal_(self.mask_token, std=0.02)
            trunc_normal_(self.dec_pos, std=0.02)
            for m in [self.enc_to_dec, self.head, *self.dec_blocks.modules()]:
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

        def forward(self, x, noise):
            """Predicted pixels ``(B, N, 64)`` and the boolean mask ``(B, N)`` (True = hidden) for input x."""
            v = self.vit
            B = x.shape[0]
            t = v.patch_embed(x).flatten(1, 2)  # (B, N, C); timm's dynamic-size patch embed is NHWC
            N, C = t.shape[1], t.shape[2]
            t = t + v.pos_embed[:, v.num_prefix_tokens:]
            order = torch.argsort(noise, dim=1)
            keep = order[:, : self.n_keep]
            t = torch.gather(t, 1, keep[..., None].expand(-1, -1, C))
            cls = (v.cls_token + v.pos_embed[:, :1]).expand(B, -1, -1)
            t = v.norm_pre(torch.cat([cls, t], 1))
            for blk in v.blocks:
                t = blk(t)
            t = v.norm(t)
            d = self.enc_to_dec(t)
            full = self.mask_token.expand(B, N, -1).clone()
            full.scatter_(1, keep[..., None].expand(-1, -1, d.shape[-1]), d[:, 1:])
            d = torch.cat([d[:, :1], full], 1) + self.dec_pos
            for blk in self.dec_blocks:
                d = blk(d)
            pred = self.head(self.dec_norm(d))[:, 1:]
            hidden = torch.ones(B, N, dtype=torch.bool, device=x.device)
            hidden.scatter_(1, keep, False)
            return pred, hidden

    return MAE(encoder_model)


def patchify(img):
    """``(B, 64, 64)`` → ``(B, 64 patches, 64 pixels)`` in row-major patch order (the token order of timm)."""
    B = img.shape[0]
    g = CROP // PATCH
    return img.reshape(B, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(B, g * g, PATCH * PATCH)


def masked_loss(pred, crops01, hidden):
    """MSE on hidden patches against the image-standardised crop (per-image mean 0, std 1)."""
    mu = crops01.mean(dim=(1, 2), keepdim=True)
    sd = crops01.std(dim=(1, 2), keepdim=True)
    target = patchify((crops01 - mu) / (sd + 1e-3))
    err = ((pred - target) ** 2).mean(-1)
    return (err * hidden).sum() / hidden.sum()


def lr_at(step: int, total: int, base: float, warmup: int, final: float = 1e-5) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(mae, weight_decay: float):
    decay, no_decay = [], []
    for name, p in mae.named_parameters():
        if p.ndim < 2 or "pos_embed" in name or "dec_pos" in name or "token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------------
# Held-out positional probe during training (homogeneous images without illumination ramps)


def probe_images(n: int = 16, size: int = 128) -> np.ndarray:
    from posvit_cli.core.synthetic.generate import make_sample

    return np.stack([
        make_sample(TRAIN_KINDS[i % len(TRAIN_KINDS)], size, PROBE_SEED_BASE + i, with_scribbles=False).image
        for i in range(n)
    ])


def probe_r2(vit, images: np.ndarray, mean: float, std: float, zero_pe: bool = False) -> float:
    """Mean stack R² (xy target, ridge α=1, 1/36 of tokens at 128² px) of the final tokens of ``images``."""
    import torch

    from posvit_cli.core.measure.probe import stack_r2

    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].to(vit.pos_embed.device)
    x = (x - mean) / std
    saved = vit.pos_embed.data.clone()
    try:
        if zero_pe:
            vit.pos_embed.data.zero_()
        vit.eval()
        with torch.inference_mode():
            out = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    finally:
        vit.pos_embed.data.copy_(saved)
        vit.train()
    g = images.shape[-1] // PATCH
    feats = out.reshape(len(images), g, g, -1).float().cpu().numpy()
    return float(np.mean([stack_r2(f, ("xy",), fraction=1 / 36, seed=i)["xy"] for i, f in enumerate(feats)]))


# --------------------------------------------------------------------------------------------------------------
# Commands


def cmd_train(args) -> int:
    import torch

    from posvit_cli.core.features.encoders import load_encoder

    from posvit_cli.core.device import resolve_device

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    # The recipe is fp32: keep TF32 off on GPUs too.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.data_cache) if args.data_cache else work / "train_images.npz"
    cache.parent.mkdir(parents=True, exist_ok=True)
    images = load_or_make_data(cache, args.images, args.workers)
    mean = round(float(images.mean()) / 255.0, 4)
    std = round(float(images.std()) / 255.0, 4)
    log(f"data: {images.shape[0]} images {images.shape[1]}², pixel mean {mean}, std {std}")

    enc = load_encoder("posvit-tiny", "random", seed=args.seed)
    vit = enc.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        mae = build_mae(vit)
    mae.to(device).train()
    opt = torch.optim.AdamW(param_groups(mae, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    config = {k: v for k, v in vars(args).items() if k not in ("func", "stop_after", "workers")}
    config["device"] = str(device)
    config.update(mean=mean, std=std, crop=CROP, patch=PATCH, train_size=TRAIN_SIZE, seed_base=TRAIN_SEED_BASE)

    ckpt_path = work / "checkpoint.pt"
    loss_csv = work / "loss.csv"
    probe_csv = work / "probe.csv"
    step, seconds = 0, 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        for key in ("steps", "batch", "lr", "seed", "images", "warmup"):
            if ck["config"][key] != config[key]:
                raise SystemExit(f"error: {ckpt_path} was trained with {key}={ck['config'][key]}, not "
                                 f"{config[key]}: use another --workdir or the same settings")
        mae.load_state_dict(ck["mae"])
        opt.load_state_dict(ck["opt"])
        step, seconds = int(ck["step"]), float(ck["seconds"])
        log(f"resuming at step {step} ({seconds / 60:.1f} min trained)")
    _truncate_csv(loss_csv, step)
    _truncate_csv(probe_csv, step)
    probes = probe_images(args.probe_images)
    if step == 0:
        _append_csv(probe_csv, ["step", "r2_xy", "r2_xy_pe_zeroed"],
                    [0, round(probe_r2(vit, probes, mean, std), 4), round(probe_r2(vit, probes, mean, std, True), 4)])

    window: list[float] = []
    t_last = time.perf_counter()
    n_last = 0
    stop = min(args.steps, args.stop_after or args.steps)
    while step < stop:
        crops, noise = batch_for_step(images, step, args.seed, args.batch)
        x01 = torch.from_numpy(crops).to(device, non_blocking=True).float().div_(255.0)
        x = ((x01 - mean) / std)[:, None]
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        pred, hidden = mae(x, torch.from_numpy(noise).to(device))
        loss = masked_loss(pred, x01, hidden)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mae.parameters(), 1.0)
        opt.step()
        step += 1
        n_last += args.batch
        window.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            seconds += now - t_last
            ips = n_last / (now - t_last)
            t_last, n_last = now, 0
            _append_csv(loss_csv, ["step", "loss", "lr", "seconds", "images_per_s"],
                        [step, round(float(np.mean(window)), 5), f"{lr:.3e}", round(seconds, 1), round(ips, 1)])
            if step % (4 * args.log_every) == 0 or step == args.steps:
                log(f"step {step}/{args.steps}  loss {np.mean(window):.4f}  lr {lr:.2e}  "
                    f"{ips:.0f} img/s  {seconds / 60:.1f} min")
            window = []
        if step % args.probe_every == 0 or step == args.steps:
            r2 = probe_r2(vit, probes, mean, std)
            r2z = probe_r2(vit, probes, mean, std, True)
            _append_csv(probe_csv, ["step", "r2_xy", "r2_xy_pe_zeroed"], [step, round(r2, 4), round(r2z, 4)])
            log(f"  probe at step {step}: xy R² {r2:.3f} (pos_embed zeroed: {r2z:.3f})")
            t_last = time.perf_counter()  # probing time is not training time
        if step % args.checkpoint_every == 0 or step in (args.steps, stop):
            _save_checkpoint(ckpt_path, mae, opt, step, seconds, config)
    log(f"{'done' if step == args.steps else 'stopped'}: {step} steps, {seconds / 60:.1f} min of training")
    return 0


def _save_checkpoint(path: Path, mae, opt, step: int, seconds: float, config: dict) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save({"mae": mae.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds,
                "config": config}, tmp)
    os.replace(tmp, path)


def _append_csv(path: Path, header: list[str], row: list) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerow(row)


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


def cmd_export(args) -> int:
    import torch

    from posvit_cli.core.features.encoders import Encoder, load_encoder, save_encoder_checkpoint, state_dict_sha256

    work = Path(args.workdir)
    ck = torch.load(work / "checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = ck["config"]
    enc = load_encoder("posvit-tiny", "random", seed=cfg["seed"])
    vit_sd = {k[len("vit."):]: v for k, v in ck["mae"].items() if k.startswith("vit.")}
    enc.model.load_state_dict(vit_sd, strict=True)
    enc = Encoder(enc.model, enc.spec, weights="trained", weights_sha256=state_dict_sha256(vit_sd),
                  mean=(cfg["mean"],), std=(cfg["std"],), create_kwargs=enc.create_kwargs)
    loss_rows = list(csv.DictReader(open(work / "loss.csv")))
    training = {
        "script": "examples/train_tiny_encoder.py",
        "objective": "MAE, 75% masking, MSE on image-standardised pixels of masked patches",
        "steps": ck["step"], "batch": cfg["batch"], "lr": cfg["lr"], "warmup": cfg["warmup"],
        "weight_decay": cfg["weight_decay"], "seed": cfg["seed"], "images": cfg["images"],
        "image_size": cfg["train_size"], "crop": cfg["crop"], "threads": cfg["threads"], "device": cfg.get("device"),
        "data": f"{cfg['images']} synthetic {cfg['train_size']}² images ({', '.join(TRAIN_KINDS)}), seeds "
                f"{cfg['seed_base']}+i, illumination ramps up to 0.15",
        "train_seconds": round(ck["seconds"], 1), "final_loss": float(loss_rows[-1]["loss"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_encoder_checkpoint(out, enc, extra={"base_model": "posvit-tiny", "training": training},
                            dtype=torch.float16)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, float16): {training}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# Evaluation: the model card's probe table


#: Probe settings of the model card: ridge α, fraction of tokens for training, repeats per image.
CARD_PROBE = {"alpha": 1.0, "fraction": 1 / 36, "repeats": 6}
#: The same with a strong ridge, whose null sits near 0 instead of far below it.
CARD_PROBE_STRONG = {"alpha": 100.0, "fraction": 1 / 36, "repeats": 6}
#: Native-grid probe: 64² tiles (the training size, 8×8 tokens, position embedding used as trained).
CARD_PROBE_NATIVE = {"alpha": 1.0, "fraction": 1 / 6, "repeats": 6}
CARD_TARGETS = ("lr", "ud", "xy")


def card_encoders(weights: str | None = None) -> dict:
    """The encoders the model card compares: trained, the same architecture untrained, trained without pos_embed.

    ``weights`` None means the bundled file. All three use the trained model's input normalisation, so they see
    identical pixels.
    """
    from posvit_cli.core.features.encoders import load_encoder

    trained = load_encoder("posvit-tiny", weights or "pretrained")
    untrained = load_encoder("posvit-tiny", "random", seed=0)
    untrained.mean, untrained.std = trained.mean, trained.std
    zeroed = load_encoder("posvit-tiny", weights or "pretrained")
    zeroed.model.pos_embed.data.zero_()
    return {"trained": trained, "untrained": untrained, "pos_embed_zeroed": zeroed}


def extract_folder(encoder, folder) -> dict:
    """Final-token grids ``{image name: (h, w, C)}`` of a folder (or a list of images), extracted as ``posvit
    extract`` does by default.

    Native size, fp32 compute, a float16 HDF5 store (the command's defaults), read back as float32.
    """
    from posvit_cli.core.features.extract import ExtractOptions, extract_images, extraction_provenance
    from posvit_cli.core.io.images import list_images
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.features.writer import StoreWriter

    opts = ExtractOptions(layers=["final"], workers=0)
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "features.h5"
        writer = StoreWriter(str(store_path), provenance=extraction_provenance(encoder, opts, device="cpu"),
                             layers=["final"], overwrite=True)
        inputs = [str(p) for p in folder] if isinstance(folder, (list, tuple)) else [folder]
        extract_images(list_images(inputs), encoder, writer, opts)
        writer.close(complete=True)
        with FeatureStore(str(store_path)) as store:
            return {rec.name: store.features(i, "final") for i, rec in enumerate(store.records)}


def native_tiles(encoder, folder) -> dict:
    """Final-token grids of every non-overlapping 64² tile of every image: ``{"name#k": (8, 8, C)}``."""
    import torch

    from posvit_cli.core.io.images import list_images, read_image, to_float

    out = {}
    for path in list_images([folder]):
        img = to_float(read_image(path))
        H, W = (v - v % CROP for v in img.shape[:2])
        tiles = img[:H, :W].reshape(H // CROP, CROP, W // CROP, CROP).transpose(0, 2, 1, 3).reshape(-1, 1, CROP, CROP)
        x = (torch.from_numpy(np.ascontiguousarray(tiles)) - encoder.mean[0]) / encoder.std[0]
        with torch.inference_mode():
            tokens, _ = encoder.forward_tokens(x, ["final"])
        for k, t in enumerate(tokens["final"].numpy()):
            out[f"{path.name}#{k}"] = t
    return out


def probe_grids(grids: dict, probe: dict = CARD_PROBE, targets=CARD_TARGETS) -> dict:
    """Stack R² of every grid (seed = its index), with mean and std over grids.

    Returns
    -------
    dict
        ``{"per_image": {name: {target: R²}}, "mean": {target: float}, "std": {target: float}, "grid": [h, w]}``
    """
    from posvit_cli.core.measure.probe import stack_r2

    per_image = {name: stack_r2(f, targets, **probe, seed=i) for i, (name, f) in enumerate(grids.items())}
    vals = {t: np.array([r[t] for r in per_image.values()]) for t in targets}
    return {
        "per_image": per_image,
        "mean": {t: float(v.mean()) for t, v in vals.items()},
        "std": {t: float(v.std()) for t, v in vals.items()},
        "grid": list(next(iter(grids.values())).shape[:2]),
    }


def pos_embed_alone(encoder, grid, probe: dict = CARD_PROBE, targets=CARD_TARGETS, n_seeds: int = 12) -> dict:
    """Probe the position embedding itself, resampled to ``grid`` as timm does for larger inputs."""
    from timm.layers import resample_abs_pos_embed

    from posvit_cli.core.measure.probe import stack_r2

    m = encoder.model
    pe = resample_abs_pos_embed(m.pos_embed.detach().float(), new_size=list(grid), num_prefix_tokens=1)
    f = pe[0, 1:].reshape(grid[0], grid[1], -1).numpy()
    vals = [stack_r2(f, targets, **probe, seed=s) for s in range(n_seeds)]
    return {t: float(np.mean([v[t] for v in vals])) for t in targets}


def cmd_evaluate(args) -> int:
    import torch

    from posvit_cli.core.features.encoders import bundled_weights_path, read_checkpoint_meta

    torch.set_num_threads(args.threads)
    encs = card_encoders(args.weights)
    trained = encs["trained"]
    meta = read_checkpoint_meta(args.weights or bundled_weights_path(trained.spec.bundled))
    result = {
        "data": str(args.data),
        "extraction": "posvit extract defaults: native size, final normed patch tokens, fp32 compute, float16 store",
        "probe": {**CARD_PROBE, "seed": "image index"},
        "probe_strong": CARD_PROBE_STRONG,
        "probe_native": {**CARD_PROBE_NATIVE, "tiles": f"{CROP}² px, {CROP // PATCH}×{CROP // PATCH} tokens"},
        "targets": list(CARD_TARGETS),
        "training": (meta or {}).get("training", {}),
        # The untrained control is timm's random initialisation under seed 0, which may change between versions.
        "versions": {"timm": __import__("timm").__version__, "torch": torch.__version__, "numpy": np.__version__},
        "conditions": {},
    }
    for name, enc in encs.items():
        t0 = time.perf_counter()
        grids = extract_folder(enc, args.data)
        res = probe_grids(grids)
        strong = probe_grids(grids, CARD_PROBE_STRONG, ("xy",))
        native = probe_grids(native_tiles(enc, args.data), CARD_PROBE_NATIVE, ("xy",))
        result["conditions"][name] = {
            "mean": res["mean"], "std": res["std"], "grid": res["grid"],
            "per_image_xy": {k: v["xy"] for k, v in res["per_image"].items()},
            "xy_alpha100": strong["mean"]["xy"], "xy_alpha100_std": strong["std"]["xy"],
            "xy_native": native["mean"]["xy"], "xy_native_std": native["std"]["xy"],
        }
        log(f"{name}: {res['mean']}  (α=100 xy {strong['mean']['xy']:.3f}, native 8×8 xy {native['mean']['xy']:.3f})"
            f"  {time.perf_counter() - t0:.1f} s")
    grid = result["conditions"]["trained"]["grid"]
    result["pos_embed_alone"] = {
        "trained": pos_embed_alone(trained, grid),
        "untrained": pos_embed_alone(encs["untrained"], grid),
    }
    log(f"pos_embed alone at {grid}: {result['pos_embed_alone']}")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.json)
    print(markdown_table(result))
    return 0


def markdown_table(result: dict) -> str:
    g = result["conditions"]["trained"]["grid"]
    rows = [f"| encoder | lr ({g[0]}×{g[1]}) | ud | xy | xy, α=100 | xy, native 8×8 tiles |",
            "|---|---|---|---|---|---|"]
    for name, c in result["conditions"].items():
        m, s = c["mean"], c["std"]
        rows.append(f"| {name} | {m['lr']:.3f} ± {s['lr']:.3f} | {m['ud']:.3f} ± {s['ud']:.3f} | "
                    f"{m['xy']:.3f} ± {s['xy']:.3f} | {c['xy_alpha100']:.3f} ± {c['xy_alpha100_std']:.3f} | "
                    f"{c['xy_native']:.3f} ± {c['xy_native_std']:.3f} |")
    for name, v in result["pos_embed_alone"].items():
        rows.append(f"| pos_embed alone ({name}), resampled to {g[0]}×{g[1]} | {v['lr']:.3f} | {v['ud']:.3f} | "
                    f"{v['xy']:.3f} | – | – |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the MAE")
    t.add_argument("--workdir", required=True, help="checkpoint, logs and cached data go here")
    t.add_argument("--data-cache", default=None, help="path of the generated-data cache (default: WORKDIR/train_images.npz)")
    t.add_argument("--steps", type=int, default=3000, help="optimiser steps (default: 3000)")
    t.add_argument("--images", type=int, default=10000, help="generated 128² training images (default: 10000)")
    t.add_argument("--batch", type=int, default=128, help="crops per step (default: 128)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    t.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default: 200)")
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches (default: 0)")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu; CPU runs are bit-reproducible)")
    t.add_argument("--workers", type=int, default=1, help="processes generating the data (default: 1)")
    t.add_argument("--log-every", type=int, default=25, help="steps per loss.csv row (default: 25)")
    t.add_argument("--probe-every", type=int, default=250, help="steps between held-out probes (default: 250)")
    t.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: 250)")
    t.add_argument("--probe-images", type=int, default=16, help="held-out 128² probe images (default: 16)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this step, as if interrupted; run again to resume")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("export", help="write the trained encoder as a float16 posvit checkpoint")
    e.add_argument("--workdir", required=True)
    e.add_argument("--out", default="examples/models/posvit-tiny.safetensors")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("evaluate", help="probe table of the model card (trained / untrained / pos_embed zeroed)")
    v.add_argument("--weights", default=None, help="encoder checkpoint (default: the bundled posvit-tiny)")
    v.add_argument("--data", default="examples/data/textures", help="homogeneous images (default: examples/data/textures)")
    v.add_argument("--json", default=None, help="write the results here")
    v.add_argument("--threads", type=int, default=2)
    v.set_defaults(func=cmd_evaluate)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

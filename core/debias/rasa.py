"""RASA ("Removal of Absolute Spatial Attributes", Franca 2025) trained on cached patch tokens.

The backbone is frozen and only a ``2 × D`` linear map is trained per round, so posvit reads the final-layer
patch tokens once (a feature store, or images extracted once with the references' augmentations by
:func:`extract_views`) and runs every round on that token cache; the references re-run the ViT every epoch.

Round ``t`` (``t = 1..T``): ``z̃`` is ``z`` after the planes of rounds ``1..t−1`` (applied in training order); fit
``W_t`` (``2 × D``, no bias, PyTorch's ``nn.Linear`` initialisation) minimising the mean over tokens of
``‖sigmoid(W_t z̃) − (row/(h−1), col/(w−1))‖²`` with AdamW (no weight decay) and a per-step cosine schedule to 0
over the round; then the rows of ``W_t`` are orthonormalised (row 0 → y, row 1 → x) and that plane is removed.
With ``exact`` the planes of earlier rounds are removed by one orthogonal projector (QR of all plane vectors)
instead of one after the other.

Training never forms ``z̃`` for the whole cache: since ``W z̃ᵀ = (W Lᵀ) zᵀ`` for the linear cleaning map ``L``,
each step multiplies the raw tokens by ``W`` pushed through the earlier planes (``2 × D`` numbers), which is the
same gradient as the references' and costs one ``(B × D)·(D × 2)`` product.

Each round logs the training loss, the mean-squared error of a closed-form linear regressor of the coordinates
(fitted on half of a fixed evaluation sample of tokens, scored on the other half) before and after removing the
plane, the error of the constant predictor (the floor a fully debiased feature reaches) and the mean cosine
between raw and cleaned tokens.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.debias.token_cache import (  # noqa: F401  (re-exported: RASA's data)
    MAX_IMAGE_TOKENS, TokenCache, grid_coordinates, load_token_cache,
)
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "AUGMENTATIONS",
    "BATCHINGS",
    "MAX_IMAGE_TOKENS",
    "ROTATIONS",
    "RasaConfig",
    "RasaResult",
    "RoundLog",
    "TokenCache",
    "ViewOptions",
    "extract_views",
    "grid_coordinates",
    "initial_weights",
    "load_token_cache",
    "rotate_view",
    "rotation_angle",
    "train_rasa",
    "view_provenance",
]

#: What one optimiser step trains on (see :class:`RasaConfig`).
BATCHINGS = ("tokens", "images", "images-in-order")
#: The augmentations of Franca's RASA training data (``ViewOptions(augment=True)``), in order.
AUGMENTATIONS = {
    "random_resized_crop": {"scale": [0.25, 1.0]},
    "color_jitter": {"brightness": 0.32, "contrast": 0.32, "saturation": 0.32, "hue": 0.08, "p": 0.8},
    "grayscale": {"p": 0.2},
    "gaussian_blur": {"sigma": [0.1, 2.0], "kernel": 13, "p": 0.5},
    "hflip": {"p": 0.5},
    "vflip": {"p": 0.5},
    # torchvision RandomRotation(90): any angle in [-90°, 90°], nearest neighbour, corners filled with 0 (black).
    "rotation": {"p": 0.5, "degrees": [-90.0, 90.0], "interpolation": "nearest", "fill": 0},
}
#: ``any``: Franca's rotation (:data:`AUGMENTATIONS`); ``quarter-turns``: ±90° exactly (posvit's earlier views).
ROTATIONS = ("any", "quarter-turns")


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class RasaConfig:
    """RASA training settings (defaults: Franca's code).

    Attributes
    ----------
    rounds : int
        Planes ``T`` (Franca's config: 9; paper: 8).
    epochs : int
        Epochs per round.
    lr : float
        Peak AdamW learning rate of every round (Franca's code 2e-4; the paper says 2e-3).
    batch_images : int
        Images per optimiser step: an epoch has ``ceil(n_images / batch_images)`` steps, or
        ``floor(n_images / batch_images)`` with ``images-in-order`` (the references drop the last partial batch).
    batching : {"tokens", "images", "images-in-order"}
        What a step trains on. ``tokens`` (default): an equal share of the epoch's tokens drawn at random from all
        images (lower-variance steps). ``images``: all tokens of ``batch_images`` images, images shuffled every
        epoch. ``images-in-order``: the same in store order every epoch, the references' batches (their loaders
        do not shuffle and drop the last partial batch, and their cosine runs over those full batches only).
    token_fraction : float
        ``tokens`` batching: fraction of the cached tokens an epoch uses (a fresh random subset each epoch).
    exact : bool
        Remove earlier planes with one orthogonal projector (QR of all plane vectors) rather than in sequence.
    seed : int
        Initialisation of every ``W_t``, token order and evaluation sample.
    eval_tokens : int
        Tokens of the fixed evaluation sample (half fit the coordinate regressor, half score it).
    eval_alpha : float
        Ridge strength of that regressor on per-channel standardised tokens.
    """

    rounds: int = 9
    epochs: int = 5
    lr: float = 2e-4
    batch_images: int = 128
    batching: str = "tokens"
    token_fraction: float = 1.0
    exact: bool = False
    seed: int = 0
    eval_tokens: int = 16384
    eval_alpha: float = 1.0

    def validate(self) -> RasaConfig:
        """Return self after checking every field (one-line :class:`PosvitError` naming the option)."""
        if self.rounds < 1:
            raise PosvitError(f"--rounds must be at least 1, got {self.rounds}")
        if self.epochs < 1:
            raise PosvitError(f"--epochs must be at least 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PosvitError(f"--lr-head must be positive, got {self.lr}")
        if self.batch_images < 1:
            raise PosvitError(f"--batch-images must be at least 1, got {self.batch_images}")
        if self.batching not in BATCHINGS:
            raise PosvitError(f"unknown --batching '{self.batching}': use {', '.join(BATCHINGS)}")
        if not (0.0 < self.token_fraction <= 1.0):
            raise PosvitError(f"--token-fraction must be in (0, 1], got {self.token_fraction}")
        if self.token_fraction < 1.0 and self.batching != "tokens":
            raise PosvitError("--token-fraction applies to --batching tokens (image batches hold all their tokens)")
        if self.eval_tokens < 4:
            raise PosvitError(f"the evaluation sample needs at least 4 tokens, got {self.eval_tokens}")
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(optimizer="AdamW", weight_decay=0.0, betas=[0.9, 0.999], schedule="cosine per step to 0",
                 loss="mean squared error of sigmoid(W z) to (row/(h-1), col/(w-1))",
                 init="nn.Linear default: U(-1/sqrt(D), 1/sqrt(D))", bias=False)
        return d


@dataclasses.dataclass
class RoundLog:
    """What one round did. Errors are mean squared errors of normalised coordinates (``[0, 1]`` units)."""

    round: int
    loss: float
    probe_mse_before: float
    probe_mse_after: float
    constant_mse: float
    cosine: float
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RasaResult:
    """Trained planes and logs.

    Attributes
    ----------
    planes : ndarray of float32, shape (T, 2, D)
        ``W_t`` of every round, in training order.
    rounds : list of RoundLog
    steps_per_round : int
    tokens : int
        Cached tokens trained on.
    seconds : float
    """

    planes: np.ndarray
    rounds: list[RoundLog]
    steps_per_round: int
    tokens: int
    seconds: float

    def as_dict(self) -> dict:
        return {"rounds": [r.as_dict() for r in self.rounds], "steps_per_round": self.steps_per_round,
                "tokens": self.tokens, "seconds": round(self.seconds, 3)}


def _through_planes(W, bases: Sequence, q):
    """``W`` as seen by raw tokens: ``W Lᵀ`` with ``L`` the cleaning map of the earlier planes (row vectors).

    ``L = (I − P_1)…(I − P_{t−1})`` acts on tokens in training order, so ``W Lᵀ`` applies the planes to the rows
    of ``W`` in reverse order; for the exact projector ``L = I − QQᵀ``.
    """
    if q is not None:
        return W - (W @ q) @ q.T
    for u in reversed(bases):
        W = W - (W @ u.T) @ u
    return W


def initial_weights(channels: int, rounds: int, seed: int = 0) -> Any:
    """The starting ``W_t`` of every round: PyTorch's ``nn.Linear`` initialisation, drawn from ``seed`` alone.

    ``nn.Linear(D, 2)``'s default (Kaiming-uniform with ``a = √5``) is ``U(−1/√D, 1/√D)``. The draws depend only on
    ``seed`` and the round, not on the data or its order, so two protocols with the same seed start every round
    from the same weights.

    Returns
    -------
    torch.Tensor of float32, shape (rounds, 2, channels)
    """
    torch = _torch()
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(channels)
    return (torch.rand((rounds, 2, channels), generator=gen, dtype=torch.float32) * 2 - 1) * bound


class _CoordinateProbe:
    """Closed-form ridge regression of the coordinates on a fixed token sample (fit half / score half)."""

    def __init__(self, X, Y, alpha: float, seed: int):
        torch = _torch()
        n = X.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
        half = n // 2
        self.fit_idx, self.test_idx = perm[:half], perm[half:]
        self.Y = Y.to(torch.float64)
        self.alpha = alpha
        yfit = self.Y[self.fit_idx]
        self.constant_mse = float(((self.Y[self.test_idx] - yfit.mean(0)) ** 2).mean())

    def mse(self, X) -> float:
        torch = _torch()
        Xf, Xt = X[self.fit_idx], X[self.test_idx]
        mu = Xf.mean(0)
        sd = Xf.std(0, unbiased=False)
        sd = torch.where(sd > 1e-12 * (sd.max() + 1e-300), sd, torch.ones_like(sd))
        A = (Xf - mu) / sd
        B = (Xt - mu) / sd
        yf = self.Y[self.fit_idx]
        ym = yf.mean(0)
        G = A.T @ A
        G.diagonal().add_(self.alpha)
        beta = torch.linalg.solve(G, A.T @ (yf - ym))
        pred = B @ beta + ym
        return float(((pred - self.Y[self.test_idx]) ** 2).mean())


#: Fewer optimiser steps per round than this trigger a warning (Franca's VOC setting runs 410).
MIN_STEPS_PER_ROUND = 50


def train_rasa(
    cache: TokenCache,
    config: RasaConfig,
    *,
    threads: int | None = 1,
    progress: ProgressCallback | None = None,
    on_round: Callable[[RoundLog], None] | None = None,
) -> RasaResult:
    """Train RASA planes on cached tokens.

    Parameters
    ----------
    cache : TokenCache
        Tokens ``(M, D)`` and targets; training runs on their device.
    config : RasaConfig
    threads : int or None
        Torch intra-op threads while training on the CPU (None: torch's setting). One by default: the
        matrices of a step are small, and on shared cores intra-op threads made the loop 10–20× slower.
    progress : callable, optional
        ``progress("RASA", step, rounds × steps_per_round)``.
    on_round : callable, optional
        Called with each round's :class:`RoundLog` as soon as the round ends.

    Returns
    -------
    RasaResult
    """
    from posvit_cli.core.device import torch_threads

    config.validate()
    with torch_threads(threads if cache.tokens.device.type == "cpu" else None):
        return _train_rasa(cache, config, report(progress), on_round)


def _epoch_batches(config: RasaConfig, gen, n_tokens: int, n_use: int, steps_per_epoch: int, image_tokens, dev):
    """One epoch's optimiser steps as token-index tensors, by ``config.batching`` (draws from ``gen`` in order)."""
    torch = _torch()
    if config.batching == "tokens":
        return torch.randperm(n_tokens, generator=gen)[:n_use].to(dev).tensor_split(steps_per_epoch)
    n_images = len(image_tokens)
    images = (torch.randperm(n_images, generator=gen) if config.batching == "images" else torch.arange(n_images))
    parts = images.split(config.batch_images)[:steps_per_epoch]  # in order: Franca's drop_last=True
    return [torch.cat([image_tokens[i] for i in part.tolist()]).to(dev) for part in parts]


def _steps_per_epoch(config: RasaConfig, n_images: int) -> int:
    """⌈n/B⌉, or ⌊n/B⌋ for ``images-in-order``: the references' loader drops the last partial batch (drop_last)."""
    if config.batching != "images-in-order":
        return max(1, math.ceil(n_images / config.batch_images))
    if n_images < config.batch_images:
        raise PosvitError(f"--batching images-in-order drops the last partial batch, as the references: "
                          f"{n_images} images make no full batch of {config.batch_images}; lower --batch-images")
    return n_images // config.batch_images


#: Tokens per forward/backward part of one optimiser step: a larger step sums the gradients of its parts, so
#: its float32 copy of the tokens stays ``STEP_CHUNK_TOKENS × D × 4`` bytes (100 MB for D = 384) however many
#: tokens the step holds.
STEP_CHUNK_TOKENS = 65_536


def _loss_backward(Z, Y, idx, W, bases, q):
    """One step's mean squared error (detached), its gradient accumulated into ``W.grad``.

    Steps of more than :data:`STEP_CHUNK_TOKENS` tokens run in parts whose summed losses are the step's mean.
    """
    torch = _torch()
    F = torch.nn.functional
    n = int(idx.shape[0])
    if n <= STEP_CHUNK_TOKENS:
        loss = F.mse_loss(torch.sigmoid(Z[idx].float() @ _through_planes(W, bases, q).T), Y[idx])
        loss.backward()
        return loss.detach()
    total = torch.zeros((), device=Z.device)
    for part in idx.split(STEP_CHUNK_TOKENS):
        W_eff = _through_planes(W, bases, q)
        loss = F.mse_loss(torch.sigmoid(Z[part].float() @ W_eff.T), Y[part], reduction="sum") / (Y.shape[1] * n)
        loss.backward()
        total += loss.detach()
    return total


def _train_rasa(cache: TokenCache, config: RasaConfig, progress, on_round) -> RasaResult:
    from posvit_cli.core.debias.heads import gram_schmidt

    torch = _torch()
    t_start = time.perf_counter()
    Z, Y = cache.tokens, cache.coords
    dev = Z.device
    M, D = int(Z.shape[0]), int(Z.shape[1])
    if M < 4:
        raise PosvitError(f"only {M} tokens to train on: RASA needs more images or tokens")
    # Data order and the evaluation sample use their own stream, so initial weights depend on the seed alone.
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([int(config.seed), 1]).generate_state(1)[0]))
    inits = initial_weights(D, config.rounds, config.seed)
    steps_per_epoch = _steps_per_epoch(config, cache.n_images)
    n_use = max(steps_per_epoch, int(round(config.token_fraction * M)))
    total_steps = steps_per_epoch * config.epochs
    if total_steps < MIN_STEPS_PER_ROUND:
        # The references' defaults assume ~10k images (410 steps per round); on a small store the planes would
        # stay near their random start and remove random directions.
        warnings.warn(
            f"only {total_steps} optimiser steps per round ({cache.n_images} images, {config.batch_images} per "
            f"step, {config.epochs} epochs): the planes will barely leave their random start; lower "
            "--batch-images or raise --epochs (and --lr-head)",
            PosvitWarning,
            stacklevel=2,
        )
    image_tokens = None
    if config.batching != "tokens":
        offsets = cache.image_offsets()
        image_tokens = [torch.arange(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]

    eval_idx = torch.randperm(M, generator=gen)[: min(config.eval_tokens, M)].to(dev)
    E_raw = Z[eval_idx].to("cpu", torch.float64)
    probe = _CoordinateProbe(E_raw, Y[eval_idx].cpu(), config.eval_alpha, config.seed)
    E = E_raw.clone()
    mse_before = probe.mse(E)

    planes: list = []
    bases: list = []  # orthonormal rows of each plane, float32 on the training device
    bases64: list = []
    q = None
    logs: list[RoundLog] = []
    done = 0
    progress("RASA", 0, config.rounds * total_steps)
    for t in range(config.rounds):
        t0 = time.perf_counter()
        W = inits[t].clone().to(dev).requires_grad_(True)
        opt = torch.optim.AdamW([W], lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
        step = 0
        for epoch in range(config.epochs):
            chunks = _epoch_batches(config, gen, M, n_use, steps_per_epoch, image_tokens, dev)
            epoch_loss = torch.zeros((), device=dev)
            for idx in chunks:
                lr_now = 0.5 * config.lr * (1.0 + math.cos(math.pi * step / total_steps))
                for g in opt.param_groups:
                    g["lr"] = lr_now
                opt.zero_grad(set_to_none=True)
                epoch_loss += _loss_backward(Z, Y, idx, W, bases, q)
                opt.step()
                step += 1
                done += 1
                progress("RASA", done, config.rounds * total_steps)
        W_t = W.detach().to("cpu", torch.float32)
        u = gram_schmidt(W_t)
        if u.shape[0] < 2:
            warnings.warn(f"RASA round {t + 1}: the two rows of W are parallel or zero; removing {u.shape[0]} "
                          "direction(s)", PosvitWarning, stacklevel=2)
        planes.append(W_t)
        bases64.append(u)
        bases.append(u.to(dev, torch.float32))
        if config.exact:
            stacked = torch.cat(bases64, dim=0)
            qq, rr = torch.linalg.qr(stacked.T)
            q64 = qq[:, rr.diagonal().abs() > 1e-8]
            q = q64.to(dev, torch.float32)
            E = E_raw - (E_raw @ q64) @ q64.T
        else:
            E = E - (E @ u.T) @ u
        mse_after = probe.mse(E)
        cos = torch.nn.functional.cosine_similarity(E, E_raw, dim=1, eps=1e-12).mean()
        log = RoundLog(
            round=t + 1,
            loss=float(epoch_loss) / len(chunks),
            probe_mse_before=mse_before,
            probe_mse_after=mse_after,
            constant_mse=probe.constant_mse,
            cosine=float(cos),
            seconds=time.perf_counter() - t0,
        )
        logs.append(log)
        if on_round is not None:
            on_round(log)
        mse_before = mse_after
    return RasaResult(
        planes=torch.stack(planes).numpy(), rounds=logs, steps_per_round=total_steps, tokens=M,
        seconds=time.perf_counter() - t_start,
    )


# --------------------------------------------------------------------------------------------------------------
# Extracting (augmented) views of images once


@dataclasses.dataclass
class ViewOptions:
    """How :func:`extract_views` turns images into the token cache.

    Attributes
    ----------
    crop : int
        Side of the square views in pixels (rounded down to the patch size): 518 in the references.
    views : int
        Views per image (fresh random augmentations each).
    augment : bool
        Franca's augmentations (:data:`AUGMENTATIONS`: random resized crop of scale 0.25–1, colour jitter,
        greyscale, blur, flips, rotation); without them each image is resized (short side ``crop``) and
        centre-cropped once.
    rotation : {"any", "quarter-turns"}
        With ``augment``, half the views are rotated: ``any`` by an angle drawn uniformly from [−90°, 90°]
        (nearest neighbour, corners 0, as Franca's ``RandomRotation(90)``), ``quarter-turns`` by exactly ±90°.
    intensity : str
        Intensity rule (:func:`posvit_cli.core.io.images.to_float`).
    batch_size : int
        Views per forward pass.
    precision : {"fp32", "bf16"}
    seed : int
        View ``v`` of image ``i`` is drawn from ``torch.manual_seed(hash(seed, i, v))``: reproducible.
    """

    crop: int = 518
    views: int = 1
    augment: bool = True
    rotation: str = "any"
    intensity: str = "auto"
    batch_size: int = 16
    precision: str = "fp32"
    seed: int = 0

    def validate(self) -> ViewOptions:
        if self.crop < 1:
            raise PosvitError(f"--crop must be positive, got {self.crop}")
        if self.views < 1:
            raise PosvitError(f"--views must be at least 1, got {self.views}")
        if self.batch_size < 1:
            raise PosvitError(f"--extract-batch must be at least 1, got {self.batch_size}")
        if self.rotation not in ROTATIONS:
            raise PosvitError(f"unknown --rotation '{self.rotation}': use {' or '.join(ROTATIONS)}")
        if self.views > 1 and not self.augment:
            raise PosvitError("--views > 1 needs augmentation (without it every view is the same): drop --no-augment")
        return self


def _augmenter(side: int, colour: bool):
    from torchvision.transforms import v2

    a = AUGMENTATIONS
    steps = [v2.RandomResizedCrop((side, side), scale=tuple(a["random_resized_crop"]["scale"]), antialias=True)]
    cj = a["color_jitter"]
    if colour:
        steps += [
            v2.RandomApply([v2.ColorJitter(cj["brightness"], cj["contrast"], cj["saturation"], cj["hue"])], p=cj["p"]),
            v2.RandomGrayscale(p=a["grayscale"]["p"]),
        ]
    else:  # saturation and hue do not exist for one channel
        steps += [v2.RandomApply([v2.ColorJitter(cj["brightness"], cj["contrast"])], p=cj["p"])]
    gb = a["gaussian_blur"]
    steps += [
        v2.RandomApply([v2.GaussianBlur(kernel_size=gb["kernel"], sigma=tuple(gb["sigma"]))], p=gb["p"]),
        v2.RandomHorizontalFlip(p=a["hflip"]["p"]),
        v2.RandomVerticalFlip(p=a["vflip"]["p"]),
    ]
    return v2.Compose(steps)


def rotation_angle(rotation: str = "any") -> float | None:
    """One view's rotation drawn from torch's global generator: None (not rotated, probability 1 − p), else the
    angle in degrees counter-clockwise, uniform in [−90, 90] (``any``) or ±90 (``quarter-turns``)."""
    torch, spec = _torch(), AUGMENTATIONS["rotation"]
    if torch.rand(()) >= spec["p"]:
        return None
    if rotation == "quarter-turns":
        return 90.0 if torch.rand(()) < 0.5 else -90.0
    lo, hi = spec["degrees"]
    return float(torch.empty(()).uniform_(lo, hi))


def rotate_view(x, angle: float):
    """Rotate ``(C, H, W)`` by ``angle`` degrees counter-clockwise about its centre, keeping its size: quarter
    turns exactly (``torch.rot90``), other angles nearest-neighbour with 0 outside the image (torchvision's
    ``RandomRotation(interpolation=NEAREST, fill=0)``)."""
    torch = _torch()
    if angle % 90 == 0:
        return torch.rot90(x, int(angle // 90) % 4, dims=(-2, -1))
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    return TF.rotate(x, angle, interpolation=InterpolationMode.NEAREST, expand=False, fill=0.0)


def _view_seed(seed: int, image: int, view: int) -> int:
    return int(np.random.SeedSequence([seed, image, view]).generate_state(1)[0])


def _make_view(img: np.ndarray, encoder, opts: ViewOptions, augment_fn, seed: int):
    """One normalised view ``(C, side, side)`` of a float image ``(H, W, c)`` in [0, 1]."""
    torch = _torch()
    from posvit_cli.core.io.images import to_channels
    from posvit_cli.core.io.preprocess import parse_size, resize_and_normalise

    patch = encoder.patch_size
    side = opts.crop - opts.crop % patch
    if not opts.augment:
        t, _ = resize_and_normalise(to_channels(img, encoder.in_chans), parse_size(f"crop:{side}"), patch,
                                    encoder.mean, encoder.std)
        return t
    colour = encoder.in_chans == 3
    x = torch.from_numpy(np.ascontiguousarray(to_channels(img, 3 if colour else 1).transpose(2, 0, 1)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = augment_fn(x).clamp_(0.0, 1.0)
        angle = rotation_angle(opts.rotation)
        if angle is not None:
            x = rotate_view(x, angle)
    m = torch.tensor(encoder.mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(encoder.std, dtype=torch.float32).view(-1, 1, 1)
    return ((x - m) / s).contiguous()


def view_provenance(encoder, opts: ViewOptions, command: str = "") -> dict:
    """Store provenance of a view cache: the encoder's, plus how the views were made."""
    from posvit_cli import __version__

    prov = encoder.provenance()
    side = opts.crop - opts.crop % encoder.patch_size
    prov.update({
        "posvit_version": __version__,
        "layers": ["final"],
        "prefix_tokens": 0,
        "preprocessing": {
            "size": f"random-resized-crop:{side}" if opts.augment else f"crop:{side}",
            "interpolation": "bilinear-antialias",
            "intensity": opts.intensity,
            "mean": list(encoder.mean),
            "std": list(encoder.std),
            "in_chans": encoder.in_chans,
        },
        "augmentation": ({**AUGMENTATIONS, "rotation": {**AUGMENTATIONS["rotation"], "angles": opts.rotation}}
                         if opts.augment else None),
        "views": opts.views,
        "view_seed": opts.seed,
        "precision": opts.precision,
        "debias": [],
        "transform": None,
        "tiling": None,
        "command": command,
        "purpose": "RASA training cache (posvit debias-train rasa)",
    })
    return prov


def extract_views(
    paths: Sequence[str | Path],
    encoder,
    writer,
    opts: ViewOptions,
    *,
    device=None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Extract final patch tokens of (augmented) views of images into a store, once.

    Each view is written as ``<path>#view<v>`` with its ``crop × crop`` grid; unreadable images are skipped with
    a :class:`PosvitWarning`.

    Returns
    -------
    dict
        ``{"views": written, "images": images used, "skipped": [(path, reason)], "seconds": s}``.
    """
    torch = _torch()
    from posvit_cli.core.device import autocast
    from posvit_cli.core.io.images import read_image, to_float

    opts.validate()
    progress = report(progress)
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    augment_fn = _augmenter(opts.crop - opts.crop % encoder.patch_size, encoder.in_chans == 3) if opts.augment else None
    side = opts.crop - opts.crop % encoder.patch_size
    if side < encoder.patch_size:
        raise PosvitError(f"--crop {opts.crop} is smaller than one {encoder.patch_size}-px patch")
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[str, tuple[int, int], Any]] = []
    written = 0
    total = len(paths) * opts.views
    progress("extract views", 0, total)

    def flush() -> None:
        nonlocal written
        if not pending:
            return
        x = torch.stack([p[2] for p in pending]).to(device)
        with torch.inference_mode(), autocast(device, opts.precision):
            tokens, _ = encoder.forward_tokens(x, ["final"])
        arr = tokens["final"].float().cpu().numpy()
        for (name, orig, _), f in zip(pending, arr):
            writer.add(name, {"final": f}, orig_size=orig, proc_size=(side, side))
        writer.commit()
        written += len(pending)
        pending.clear()
        progress("extract views", written + len(skipped) * opts.views, total)

    for i, path in enumerate(paths):
        try:
            raw = read_image(path)
            img = to_float(raw, opts.intensity)
        except PosvitError as exc:
            warnings.warn(f"skipped '{path}': {exc}", PosvitWarning, stacklevel=2)
            skipped.append((str(path), str(exc)))
            continue
        orig = (int(raw.shape[0]), int(raw.shape[1]))
        for v in range(opts.views):
            name = f"{path}#view{v}" if opts.views > 1 else str(path)
            pending.append((name, orig, _make_view(img, encoder, opts, augment_fn, _view_seed(opts.seed, i, v))))
            if len(pending) >= opts.batch_size:
                flush()
    flush()
    if written == 0:
        raise PosvitError("no image could be read: nothing to train on")
    return {"views": written, "images": len(paths) - len(skipped), "skipped": skipped,
            "seconds": time.perf_counter() - t0}

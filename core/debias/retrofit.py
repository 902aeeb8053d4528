"""Distilling a position-free ViT (ALiBi or NoPE retrofit) back to its original: the ``debias-train`` ALiBi recipe.

The **teacher** is the original model, frozen. Its targets are its final normed patch tokens with the most
positional channels set to zero. The **student** is a copy whose absolute position embedding (and RoPE) is
removed and, for ``alibi``, whose attention gets the 2-D ALiBi bias of :mod:`posvit_cli.core.features.alibi`. The loss is
the mean over patch tokens of ``1 − cos(student, target)`` (or the MSE), plus optionally a Gram anchor
``λ · mean((X̂_s X̂_sᵀ − X̂_t X̂_tᵀ)²)`` on L2-normalised tokens that keeps the patch-to-patch similarity structure.

Training runs in stages (``224:15,518:1``: image size and epochs), each with its own learning rate, global batch
and a fresh AdamW optimiser, as the published models were trained. Images are resized (shortest side) and centre
cropped, without augmentation. Teacher targets are computed batch-wise inside the training step (or read from a
feature store of the teacher), never image by image.

Determinism: the data order of every epoch is a function of (seed, stage, epoch); a step's global batch is split
across processes and micro-batches by position, so the same images form a step whatever the number of processes
and gradient-accumulation steps. A training state (student, optimiser, RNG, counters, log) is saved atomically
every N steps; resuming from it continues the run exactly (bit-exact on CPU).

Multi-process: under ``torchrun`` (``WORLD_SIZE`` > 1) the student is wrapped in DistributedDataParallel (NCCL on
GPUs, gloo on CPU); rank 0 evaluates, logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.features.alibi import METHODS, AlibiConfig, retrofit
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import atomic_path
from posvit_cli.core.io.images import read_image, to_channels, to_float
from posvit_cli.core.io.preprocess import ResizeMode, parse_size, resize_and_normalise
from posvit_cli.core.measure.probe import RAMP_TARGETS, stack_r2
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "DistInfo",
    "RetrofitConfig",
    "RetrofitResult",
    "Stage",
    "check_images",
    "epoch_order",
    "gram_loss",
    "learning_rate",
    "most_positional_channels",
    "noise_images",
    "parse_blank",
    "parse_stages",
    "read_training_state",
    "setup_distributed",
    "split_train_val",
    "step_batches",
    "train_retrofit",
]

STATE_FORMAT = "posvit-retrofit-state"
STATE_VERSION = 1
LOG_COLUMNS = (
    "step", "stage", "epoch", "size", "lr", "train_loss", "val_loss", "val_cosine",
    *(f"r2_{t}" for t in RAMP_TARGETS), "images_per_s", "elapsed_s",
)


# --------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes
    ----------
    size : int
        Image side in pixels (shortest-side resize, centre crop; rounded down to a patch multiple).
    epochs : float
        Passes over the training images (fractions allowed).
    lr : float
        Peak learning rate.
    batch_size : int
        Global batch (images per optimiser step, over all processes and accumulation steps).
    """

    size: int
    epochs: float
    lr: float
    batch_size: int


#: Published defaults per stage: 1e-4 and a batch of 256 for the first stage, 1e-5 and 32 for later ones.
DEFAULT_LR = (1e-4, 1e-5)
DEFAULT_BATCH = (256, 32)


def _per_stage(values: str | None, n: int, cast, what: str, defaults: tuple) -> list:
    if values is None or str(values).strip() == "":
        return [defaults[min(k, len(defaults) - 1)] for k in range(n)]
    try:
        items = [cast(v.strip()) for v in str(values).split(",") if v.strip()]
    except ValueError:
        raise PosvitError(f"cannot read {what} '{values}': write one value, or one per stage, e.g. 1e-4,1e-5") from None
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise PosvitError(f"{what} '{values}' gives {len(items)} values for {n} stages: give one, or one per stage")
    return items


def parse_stages(spec: str, lrs: str | None = None, batch_sizes: str | None = None) -> list[Stage]:
    """Parse ``--stages 224:15,518:1`` with ``--lr`` and ``--batch-size`` lists (one value, or one per stage).

    Without a list, the first stage takes lr 1e-4 and batch 256 and later stages 1e-5 and 32 (the published
    recipe).

    Raises
    ------
    PosvitError
        For a malformed stage, a non-positive size, epoch count, learning rate or batch size.
    """
    stages_raw = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not stages_raw:
        raise PosvitError("--stages is empty: write SIZE:EPOCHS[,SIZE:EPOCHS], e.g. 224:15,518:1")
    parsed = []
    for s in stages_raw:
        size, sep, ep = s.partition(":")
        try:
            size_i, ep_f = int(size), float(ep)
        except ValueError:
            raise PosvitError(f"stage '{s}': write SIZE:EPOCHS, e.g. 224:15") from None
        if not sep or size_i <= 0 or not (ep_f > 0 and math.isfinite(ep_f)):
            raise PosvitError(f"stage '{s}': need a positive size and a positive number of epochs")
        parsed.append((size_i, ep_f))
    n = len(parsed)
    lr_list = _per_stage(lrs, n, float, "--lr", DEFAULT_LR)
    bs_list = _per_stage(batch_sizes, n, int, "--batch-size", DEFAULT_BATCH)
    for lr in lr_list:
        if not (lr > 0 and math.isfinite(lr)):
            raise PosvitError(f"--lr {lr}: learning rates must be positive")
    for b in bs_list:
        if b < 1:
            raise PosvitError(f"--batch-size {b}: batch sizes must be at least 1")
    return [Stage(size, ep, lr, bs) for (size, ep), lr, bs in zip(parsed, lr_list, bs_list)]


def parse_blank(spec: str | None) -> list[int] | str:
    """Parse ``--blank``: ``auto``, ``none``, a channel list ``47,113`` or a ``posvit probe`` result file.

    Returns
    -------
    list of int or "auto"
    """
    s = (spec or "none").strip()
    if s.lower() == "auto":
        return "auto"
    if s.lower() in ("none", ""):
        return []
    if os.path.exists(s) or s.endswith(".json"):
        return _channels_from_probe_result(s)
    try:
        chans = sorted({int(v) for v in s.split(",") if v.strip()})
    except ValueError:
        raise PosvitError(f"--blank '{spec}': use auto, none, channel indices (47,113) or a probe result .json") from None
    if any(c < 0 for c in chans):
        raise PosvitError(f"--blank '{spec}': channel indices must be 0 or more")
    return chans


def _channels_from_probe_result(path: str) -> list[int]:
    """The most positional channels (top 2 per ramp) named by a ``posvit probe`` result file."""
    from posvit_cli.core.measure.probe import positional_channels, read_probe_result

    return sorted(int(c) for c in positional_channels(read_probe_result(path)))


@dataclasses.dataclass
class RetrofitConfig:
    """Everything that defines a retrofit run (see ``posvit debias-train --help`` for the user-facing names).

    Attributes
    ----------
    method : {"alibi", "nope"}
    alibi : AlibiConfig
    stages : list of Stage
    micro_batch : int
        Images per forward pass and process; a process accumulates gradients over ``ceil(local batch /
        micro_batch)`` passes. A hardware choice: it does not change what a step computes.
    weight_decay : float
        AdamW weight decay (PyTorch defaults otherwise: betas 0.9/0.999, eps 1e-8).
    warmup : float
        Linear warm-up over this fraction of each stage's steps (0 = none).
    schedule : {"constant", "cosine"}
        Learning rate after warm-up: constant (published), or cosine decay to ``min_lr_ratio × lr``.
    min_lr_ratio : float
    grad_clip : float
        Clip the global gradient norm to this value (0 = off, as published).
    loss : {"cosine", "mse"}
    gram_weight : float
        λ of the Gram anchor (0 = off).
    blank : list of int or "auto"
        Channels zeroed in the teacher targets; ``auto`` = the top-2 channels per ramp (lr, ud, diag, radial) by
        per-channel held-out R² on the monitor images (:func:`most_positional_channels`).
    val_fraction, val_max : float, int
        Held-out images: this fraction of the images, at most ``val_max``.
    eval_every, log_every, checkpoint_every : int
        In optimiser steps; evaluation and a checkpoint also happen at the end of every stage.
    keep_checkpoints : bool
        Keep every training state (``stepNNNNNNN.pt``) besides ``last.pt``.
    seed : int
    precision : {"fp32", "bf16"}
        bf16 autocast (CUDA, or CPU with AMX); the loss is always computed in float32.
    compile : bool
        ``torch.compile`` the student and the teacher.
    workers : int
        Image decoding processes of the data loader (0 = in the training process).
    intensity : str
        Intensity rule of :func:`posvit_cli.core.io.images.to_float`.
    monitor_size : str
        Resize rule for monitor images: a ``--size`` rule (``native``: their own size rounded down to patch
        multiples, as published) or ``stage`` (the current stage's crop).
    r2_repeats : int
        Random training subsets of the stack-R² probe per monitor image.
    r2_fraction : float
        Fraction of a monitor image's tokens the stack-R² probe trains on (published: 1/36).
    """

    method: str = "alibi"
    alibi: AlibiConfig = dataclasses.field(default_factory=AlibiConfig)
    stages: list[Stage] = dataclasses.field(default_factory=lambda: parse_stages("224:15,518:1"))
    micro_batch: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    loss: str = "cosine"
    gram_weight: float = 0.0
    blank: list[int] | str = "auto"
    val_fraction: float = 0.05
    val_max: int = 500
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: bool = False
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False
    workers: int = 2
    intensity: str = "auto"
    monitor_size: str = "native"
    r2_repeats: int = 6
    r2_fraction: float = 1 / 36

    def validate(self) -> None:
        if self.method not in METHODS:
            raise PosvitError(f"unknown retrofit method '{self.method}': use {', '.join(METHODS)}")
        if self.loss not in ("cosine", "mse"):
            raise PosvitError(f"unknown loss '{self.loss}': use cosine or mse")
        if self.schedule not in ("constant", "cosine"):
            raise PosvitError(f"unknown schedule '{self.schedule}': use constant or cosine")
        if not 0 <= self.warmup < 1:
            raise PosvitError(f"--warmup {self.warmup}: give a fraction of each stage's steps in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise PosvitError(f"--val-fraction {self.val_fraction}: give a fraction in [0, 1)")
        if self.micro_batch < 1:
            raise PosvitError("--micro-batch must be at least 1")
        for name in ("eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise PosvitError(f"--{name.replace('_', '-')} must be 0 (off) or more")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.gram_weight < 0:
            raise PosvitError("--weight-decay, --grad-clip and --gram-weight must be 0 or more")
        if self.precision not in ("fp32", "bf16"):
            raise PosvitError(f"unknown precision '{self.precision}': use fp32 or bf16")
        if self.workers < 0:
            raise PosvitError("--workers must be 0 or more")
        if self.monitor_size != "stage":
            parse_size(self.monitor_size)
        if not 0 < self.r2_fraction < 1 or self.r2_repeats < 1:
            raise PosvitError("--monitor-fraction must be in (0, 1) and the probe needs at least one repeat")

    def recipe(self) -> dict:
        """What a resumed run must share with the run it resumes (and what the checkpoint records)."""
        return {
            "method": self.method,
            "alibi": self.alibi.to_dict() if self.method == "alibi" else None,
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "weight_decay": self.weight_decay,
            "warmup": self.warmup,
            "schedule": self.schedule,
            "min_lr_ratio": self.min_lr_ratio,
            "grad_clip": self.grad_clip,
            "loss": self.loss,
            "gram_weight": self.gram_weight,
            "val_fraction": self.val_fraction,
            "val_max": self.val_max,
            "seed": self.seed,
            "intensity": self.intensity,
        }


@dataclasses.dataclass
class RetrofitResult:
    """What a retrofit run produced."""

    output: str | None
    run_dir: str
    log_csv: str
    steps: int
    channels_blanked: list[int]
    teacher_r2: dict[str, dict[str, float]]
    final: dict[str, Any]
    seconds: float
    resumed_from: str | None = None
    train_images: int = 0
    val_images: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Distributed set-up


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device):
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1) and pick this rank's device.

    Parameters
    ----------
    device : torch.device
        The requested device; on CUDA each rank takes ``cuda:LOCAL_RANK``.

    Returns
    -------
    dist_info : DistInfo
    device : torch.device
    """
    import torch
    import torch.distributed as tdist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local), device


def shutdown_distributed() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _barrier(dist: DistInfo) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


# --------------------------------------------------------------------------------------------------------------
# Data


def check_images(paths: Sequence[str | os.PathLike], progress: ProgressCallback | None = None) -> list[tuple[str, str]]:
    """Find images that cannot be decoded, cheaply (headers and integrity checks, no full decode of JPEGs).

    Returns
    -------
    list of (path, reason)
    """
    progress = report(progress)
    bad = []
    total = len(paths)
    for i, p in enumerate(paths):
        p = Path(p)
        try:
            if p.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                with tifffile.TiffFile(str(p)) as tf:
                    _ = tf.pages[0].shape
            else:
                from PIL import Image

                with Image.open(p) as im:
                    im.verify()
        except Exception as exc:
            bad.append((str(p), f"{type(exc).__name__}: {exc}".strip()))
        if (i + 1) % 256 == 0 or i + 1 == total:
            progress("checking images", i + 1, total)
    return bad


def split_train_val(paths: Sequence[Path], fraction: float, max_val: int, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded split of the sorted image list into training and validation images.

    Returns
    -------
    train, val : list of Path
        Both in sorted order.
    """
    import torch

    paths = sorted(Path(p) for p in paths)
    n = len(paths)
    n_val = min(max_val, int(round(n * fraction))) if fraction > 0 else 0
    if fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    perm = torch.randperm(n, generator=g).tolist()
    val_idx = set(perm[:n_val])
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val


def epoch_order(n: int, seed: int, stage: int, epoch: int):
    """The image order of one epoch: a permutation of ``range(n)`` fixed by (seed, stage, epoch).

    Returns
    -------
    torch.Tensor of int64, shape (n,)
    """
    import torch

    key = hashlib.sha256(f"{seed}/{stage}/{epoch}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    return torch.randperm(n, generator=g)


def step_batches(order, step_in_epoch: int, global_batch: int, rank: int, world: int, micro: int) -> list[list[int]]:
    """This process's micro-batches (image indices) of one optimiser step.

    The step's global batch is ``order[step·G:(step+1)·G]``; process ``rank`` takes every ``world``-th image of
    it starting at ``rank``, in chunks of at most ``micro``.
    """
    batch = order[step_in_epoch * global_batch : (step_in_epoch + 1) * global_batch].tolist()
    share = batch[rank::world]
    return [share[i : i + micro] for i in range(0, len(share), micro)]


def noise_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` uniform-noise RGB images (uint8, ``size × size``): the published position probe's "noise" set."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _prepare(raw: np.ndarray, mode: ResizeMode, patch: int, mean, std, in_chans: int, intensity: str):
    img = to_channels(to_float(raw, intensity), in_chans)
    tensor, _ = resize_and_normalise(img, mode, patch, mean, std)
    return tensor


class _ImageSet:
    """Training/validation images as tensors of one stage size; optionally the teacher's stored targets.

    Errors are returned, not raised, so a decoding failure in a loader worker reaches the training process as a
    clear message naming the file.
    """

    def __init__(self, paths, size: int, patch: int, mean, std, in_chans: int, intensity: str,
                 store_path: str | None = None, store_index: dict[str, int] | None = None):
        self.paths = [str(p) for p in paths]
        self.mode = ResizeMode("crop", int(size))
        self.patch, self.mean, self.std, self.in_chans, self.intensity = patch, mean, std, in_chans, intensity
        self.store_path, self.store_index = store_path, store_index
        self._store = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        path = self.paths[i]
        try:
            raw = read_image(path)
            t = _prepare(raw, self.mode, self.patch, self.mean, self.std, self.in_chans, self.intensity)
            target = None
            if self.store_path is not None:
                if self._store is None:  # opened lazily: one handle per loader process
                    from posvit_cli.core.features.store import FeatureStore

                    self._store = FeatureStore(self.store_path)
                f = self._store.features(self.store_index[os.path.abspath(path)], "final")
                target = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
            return {"index": i, "image": t, "target": target, "error": None}
        except Exception as exc:
            return {"index": i, "image": None, "target": None, "error": f"'{path}': {exc}"}


def _collate(items: list[dict]) -> dict:
    import torch

    errors = [it["error"] for it in items if it["error"]]
    if errors:
        return {"error": errors[0]}
    out = {"index": [it["index"] for it in items], "image": torch.stack([it["image"] for it in items])}
    if items[0]["target"] is not None:
        out["target"] = torch.stack([it["target"] for it in items])
    return out


def _loader(dataset: _ImageSet, batches: list[list[int]], workers: int):
    import torch

    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers if batches else 0, collate_fn=_collate,
        persistent_workers=False, pin_memory=False,
    )


# --------------------------------------------------------------------------------------------------------------
# Losses, schedule


def gram_loss(student, target):
    """Gram anchor: mean over token pairs of the squared difference of the L2-normalised Gram matrices.

    Parameters
    ----------
    student, target : torch.Tensor, shape (B, N, C)

    Returns
    -------
    torch.Tensor, scalar
    """
    import torch.nn.functional as F

    s = F.normalize(student, dim=-1)
    t = F.normalize(target, dim=-1)
    gs = s @ s.transpose(1, 2)
    gt = t @ t.transpose(1, 2)
    return ((gs - gt) ** 2).mean()


def distill_loss(student, target, loss: str, gram_weight: float):
    """The distillation objective on patch tokens (B, N, C): mean(1 − cos) or MSE, plus the Gram anchor."""
    import torch.nn.functional as F

    if loss == "cosine":
        value = (1.0 - F.cosine_similarity(student, target, dim=-1, eps=1e-8)).mean()
    else:
        value = F.mse_loss(student, target)
    if gram_weight > 0:
        value = value + gram_weight * gram_loss(student, target)
    return value


def learning_rate(step: int, total: int, base: float, warmup_steps: int = 0, schedule: str = "constant",
                  min_ratio: float = 0.0) -> float:
    """Learning rate of step ``step`` (0-based) of a stage of ``total`` steps.

    Linear warm-up from ``base / warmup_steps`` to ``base`` over the first ``warmup_steps`` steps; then constant,
    or a cosine from ``base`` down to ``min_ratio · base`` at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return base


# --------------------------------------------------------------------------------------------------------------
# Blanking: the most positional channels


def most_positional_channels(grids: Sequence[np.ndarray], *, top_k: int = 2, fraction: float = 1 / 36,
                             repeats: int = 6, seed: int = 0) -> list[int]:
    """The union of the top-``top_k`` channels per ramp (lr, ud, diag, radial) by mean per-channel held-out R².

    The published selection of channels to blank, through :func:`posvit_cli.core.measure.probe.probe_dataset`.

    Parameters
    ----------
    grids : sequence of ndarray, shape (h, w, C)
        Features of homogeneous images (any grid sizes).
    top_k, fraction, repeats, seed
        Probe settings (``holdout`` protocol, random sampling).

    Returns
    -------
    list of int
        Ascending channel indices.
    """
    from posvit_cli.core.measure.probe import POSITIONAL_RAMPS, make_settings, probe_dataset

    settings, _ = make_settings("holdout", targets=POSITIONAL_RAMPS, per_channel=True, extras=False,
                                top_k=top_k, fraction=fraction, repeats=repeats, seed=seed)
    images = [{"name": f"monitor{i}", "path": "", "grid": g.shape[:2]} for i, g in enumerate(grids)]
    out = probe_dataset(lambda i, layer: np.asarray(grids[i], dtype=np.float32), images, ["final"], settings,
                        threads=None)
    return [int(c) for c in out["layers"]["final"]["positional_channels"]]


# --------------------------------------------------------------------------------------------------------------
# Training state files


def _state_meta(state: dict) -> dict:
    return json.loads(state["meta"])


def read_training_state(path: str | os.PathLike) -> dict:
    """Load a training state written by :func:`train_retrofit` (a file, or a run folder holding ``last.pt``).

    Loaded with ``weights_only=True``: a state file cannot run code.

    Raises
    ------
    PosvitError
        If the path is missing or is not a posvit training state (an encoder checkpoint, another file).
    """
    import torch

    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise PosvitError(f"--resume: '{path}' has no training state (looked for {p})")
    if p.suffix == ".safetensors":
        raise PosvitError(
            f"--resume: '{path}' is an encoder checkpoint, not a training state; resume from the run folder "
            "(the .train folder next to the output) or its last.pt"
        )
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PosvitError(f"--resume: '{p}' is not a readable posvit training state ({type(exc).__name__})") from exc
    if not isinstance(state, dict) or "meta" not in state:
        raise PosvitError(f"--resume: '{p}' is not a posvit training state")
    meta = _state_meta(state)
    if meta.get("format") != STATE_FORMAT:
        raise PosvitError(f"--resume: '{p}' is not a posvit debias-train state (format {meta.get('format')!r})")
    state["_path"] = str(p)
    return state


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        f.write(buf.getbuffer())


def _write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in LOG_COLUMNS})


def _rng_state() -> dict:
    import torch

    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    import torch

    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def _sha_of_paths(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.abspath(p).encode() + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The student's forward pass (DDP wraps this module)


def _patch_token_module(model, num_prefix: int):
    import torch

    class PatchTokens(torch.nn.Module):
        """Final normed patch tokens (B, N, C) of a timm ViT: the module DDP and torch.compile see."""

        def __init__(self, vit, prefix):
            super().__init__()
            self.vit = vit
            self.prefix = prefix

        def forward(self, x):
            return self.vit.forward_features(x)[:, self.prefix :]

    return PatchTokens(model, num_prefix)


def _trainable_parameters(model) -> list:
    # forward_features never uses the classifier, its pre-norm (fc_norm) or an attention-pool head: DDP would
    # wait forever for their gradients.
    unused = ("head.", "fc_norm.", "attn_pool.", "head_drop.")
    params = []
    for name, p in model.named_parameters():
        if name.startswith(unused):
            p.requires_grad_(False)
        elif p.requires_grad:
            params.append(p)
    return params


# --------------------------------------------------------------------------------------------------------------
# The run


class _Run:
    """One retrofit run: holds the models, data and counters; :func:`train_retrofit` is its public face."""

    def __init__(self, teacher, images, config: RetrofitConfig, *, output, run_dir, resume, student_init,
                 monitor, teacher_stores, dist: DistInfo, device, progress, on_log):
        import torch

        self.torch = torch
        self.cfg = config
        self.teacher = teacher
        self.output = Path(output) if output is not None else None
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.device = device
        self.progress = report(progress)
        self.on_log = on_log or (lambda row: None)
        self.monitor_raw = list(monitor) if monitor is not None else None
        self.resume_state = read_training_state(resume) if resume is not None else None
        self.student_init = student_init
        self.teacher_stores = list(teacher_stores or [])
        self.images = [Path(p) for p in images]
        self.log_rows: list[dict] = []
        # Training-loss window since the last log row: [loss sum, steps, images, seconds].
        self._running: list = [0.0, 0, 0, 0.0]
        self.t0 = time.perf_counter()
        self.elapsed_before = 0.0

    # -- set-up -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        cfg.validate()
        t = self.teacher
        if any(m.get("name") in METHODS for m in t.modifications):
            raise PosvitError(f"the teacher '{t.name}' is already retrofitted: use the original model as teacher")
        if t.is_sam:
            raise PosvitError(f"'{t.name}' (SAM) uses windowed attention: the retrofit needs a global-attention ViT")
        if self.resume_state is not None:
            self._check_resume_compatible()
        self.train_paths, self.val_paths = split_train_val(self.images, cfg.val_fraction, cfg.val_max, cfg.seed)
        if not self.train_paths:
            raise PosvitError("no training images left after the validation split")
        for k, st in enumerate(cfg.stages):
            if st.batch_size % self.dist.world_size:
                raise PosvitError(
                    f"stage {k + 1}: batch size {st.batch_size} does not split over {self.dist.world_size} processes"
                )
            if st.batch_size > len(self.train_paths):
                raise PosvitError(
                    f"stage {k + 1}: batch size {st.batch_size} is larger than the {len(self.train_paths)} "
                    "training images; lower --batch-size or add images"
                )
        # Teacher: frozen, eval mode, on the device.
        t.model.eval().requires_grad_(False)
        t.to(self.device)
        self.prefix = t.num_prefix_tokens
        self.student = self._build_student()
        self.stores = self._index_teacher_stores()
        self.monitor = self._monitor_images()
        self.blank = self._resolve_blank()
        if self.resume_state is not None:
            had = list(_state_meta(self.resume_state).get("channels_blanked", []))
            if had != self.blank:
                raise PosvitError(
                    f"--resume '{self.resume_state['_path']}' blanked channels {had}, the options ask for {self.blank}"
                )
        self.teacher_r2: dict[str, dict[str, float]] = {}

    def _build_student(self):
        cfg = self.cfg
        t = self.teacher
        if self.student_init is not None:
            from posvit_cli.core.features.encoders import load_encoder, read_checkpoint_meta

            meta = read_checkpoint_meta(self.student_init)
            if meta is None:
                raise PosvitError(f"--student-init '{self.student_init}' is not a posvit encoder checkpoint")
            if int(meta.get("embed_dim", -1)) != t.embed_dim:
                raise PosvitError(
                    f"width mismatch: the student '{self.student_init}' has {meta.get('embed_dim')} channels, the "
                    f"teacher {t.name} has {t.embed_dim}"
                )
            if meta.get("timm_name") != t.spec.timm_name:
                raise PosvitError(
                    f"the student '{self.student_init}' is a {meta.get('timm_name')}, the teacher a {t.spec.timm_name}"
                )
            names = [m.get("name") for m in meta.get("modifications", [])]
            if names != [cfg.method]:
                raise PosvitError(
                    f"the student '{self.student_init}' was retrofitted with {names or 'nothing'}, not {cfg.method}"
                )
            if cfg.method == "alibi":
                have = AlibiConfig.from_dict(meta["modifications"][0].get("config"))
                if have != cfg.alibi:
                    raise PosvitError(
                        f"the student '{self.student_init}' has ALiBi settings {have.to_dict()}, the options ask for "
                        f"{cfg.alibi.to_dict()}"
                    )
            student = load_encoder(None, self.student_init, device="cpu")
        else:
            student = copy.deepcopy(t)
            student.model.requires_grad_(True)  # the copy of the frozen teacher; the retrofit freezes what it must
            retrofit(student, cfg.method, cfg.alibi if cfg.method == "alibi" else None)
        student.model.train()
        student.to(self.device)
        return student

    def _index_teacher_stores(self) -> dict[int, tuple[str, dict[str, int]]]:
        """Map stage size → (store path, abs image path → store index) for stores of the teacher's features."""
        out: dict[int, tuple[str, dict[str, int]]] = {}
        if not self.teacher_stores:
            return out
        from posvit_cli.core.features.store import FeatureStore

        t = self.teacher
        sizes = {st.size for st in self.cfg.stages}
        for path in self.teacher_stores:
            with FeatureStore(path) as fs:
                if fs.channels != t.embed_dim:
                    raise PosvitError(
                        f"width mismatch: teacher store '{path}' has {fs.channels} channels, the teacher {t.name} "
                        f"has {t.embed_dim}"
                    )
                if fs.weights_sha256 and fs.weights_sha256 != t.weights_sha256:
                    raise PosvitError(f"teacher store '{path}' was extracted with other weights than the teacher's")
                if "final" not in fs.layers:
                    raise PosvitError(f"teacher store '{path}' has no final layer")
                pre = fs.preprocessing
                if pre.get("intensity", self.cfg.intensity) != self.cfg.intensity:
                    raise PosvitError(
                        f"teacher store '{path}' was extracted with --intensity {pre.get('intensity')}, the training "
                        f"uses {self.cfg.intensity}"
                    )
                size_rule = str(pre.get("size", ""))
                mode = parse_size(size_rule) if size_rule else None
                if mode is None or mode.kind != "crop" or mode.size not in sizes:
                    raise PosvitError(
                        f"teacher store '{path}' was extracted with --size {size_rule or '?'}: extract the teacher "
                        f"with --size crop:N for a stage size N ({', '.join(str(s) for s in sorted(sizes))})"
                    )
                index = {os.path.abspath(r.path): r.index for r in fs.records}
            wanted = [os.path.abspath(p) for p in self.train_paths + self.val_paths]
            missing = [p for p in wanted if p not in index]
            if missing:
                raise PosvitError(
                    f"teacher store '{path}' lacks {len(missing)} of the {len(wanted)} images (first: {missing[0]})"
                )
            out[mode.size] = (str(path), index)
        return out

    def _monitor_images(self) -> list[np.ndarray]:
        if self.monitor_raw is not None:
            return self.monitor_raw
        # The published noise set: 518 × 518 uniform noise (37 × 37 tokens at patch 14).
        return noise_images(4, 518, seed=self.cfg.seed)

    def _monitor_mode(self, stage: Stage) -> ResizeMode:
        return ResizeMode("crop", stage.size) if self.cfg.monitor_size == "stage" else parse_size(self.cfg.monitor_size)

    def _monitor_tensors(self, stage: Stage) -> list:
        t = self.teacher
        mode = self._monitor_mode(stage)
        return [_prepare(raw, mode, t.patch_size, t.mean, t.std, t.in_chans, self.cfg.intensity) for raw in self.monitor]

    def _resolve_blank(self) -> list[int]:
        cfg = self.cfg
        c = self.teacher.embed_dim
        if cfg.blank == "auto":
            if self.resume_state is not None:
                return list(_state_meta(self.resume_state)["channels_blanked"])
            grids = self._features(self.teacher, self._monitor_tensors(cfg.stages[0]))
            return most_positional_channels(grids, fraction=cfg.r2_fraction, repeats=cfg.r2_repeats, seed=cfg.seed)
        chans = sorted(int(v) for v in cfg.blank)
        bad = [v for v in chans if v >= c]
        if bad:
            raise PosvitError(f"--blank channel {bad[0]} does not exist: {self.teacher.name} has channels 0..{c - 1}")
        return chans

    def _check_resume_compatible(self) -> None:
        meta = _state_meta(self.resume_state)
        path = self.resume_state["_path"]
        if meta.get("method") != self.cfg.method:
            raise PosvitError(
                f"--resume '{path}' is a checkpoint of a --method {meta.get('method')} run, not --method {self.cfg.method}"
            )
        want = self.cfg.recipe()
        have = meta.get("recipe", {})
        diff = sorted(k for k in set(want) | set(have) if json.dumps(want.get(k)) != json.dumps(have.get(k)))
        if diff:
            raise PosvitError(f"--resume '{path}' was trained with other settings: {', '.join(diff)} differ")
        t = self.teacher
        if meta.get("teacher", {}).get("weights_sha256") != t.weights_sha256:
            raise PosvitError(f"--resume '{path}' was trained with another teacher ({meta.get('teacher', {}).get('model')})")
        if meta.get("finished"):
            raise PosvitError(f"--resume '{path}' is a finished run; start a new one (e.g. with --student-init)")

    # -- forward passes -----------------------------------------------------------------------------------
    def _autocast(self):
        from posvit_cli.core.device import autocast

        return autocast(self.device, self.cfg.precision)

    def _teacher_tokens(self, x):
        torch = self.torch
        with torch.no_grad(), self._autocast():
            out = self.teacher_fn(x)
        out = out.float()
        if self.blank:
            out[..., self.blank] = 0.0
        return out

    def _features(self, encoder, tensors) -> list[np.ndarray]:
        """Final patch tokens (h, w, C) of single images, batched by size; eval mode; float32 numpy."""
        torch = self.torch
        model = encoder.model
        was_training = model.training
        model.eval()
        out: list[np.ndarray | None] = [None] * len(tensors)
        by_shape: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault(tuple(t.shape), []).append(i)
        try:
            with torch.no_grad(), self._autocast():
                for shape, idx in by_shape.items():
                    for k in range(0, len(idx), self.cfg.micro_batch):
                        chunk = idx[k : k + self.cfg.micro_batch]
                        x = torch.stack([tensors[i] for i in chunk]).to(self.device)
                        tok = model.forward_features(x)[:, encoder.num_prefix_tokens :].float()
                        h, w = encoder.grid(shape[-2], shape[-1])
                        tok = tok.reshape(len(chunk), h, w, -1).cpu().numpy()
                        for j, i in enumerate(chunk):
                            out[i] = tok[j]
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]

    def _monitor_r2(self, encoder, stage: Stage) -> dict[str, float]:
        grids = self._features(encoder, self._monitor_tensors(stage))
        scores = [
            stack_r2(g, RAMP_TARGETS, fraction=self.cfg.r2_fraction, repeats=self.cfg.r2_repeats, seed=self.cfg.seed + i)
            for i, g in enumerate(grids)
        ]
        return {t: float(np.mean([s[t] for s in scores])) for t in RAMP_TARGETS}

    # -- evaluation ---------------------------------------------------------------------------------------
    def _evaluate(self, stage_index: int, stage: Stage) -> dict:
        torch = self.torch
        model = self.student.model
        row: dict[str, Any] = {}
        if self.val_paths:
            ds = self._dataset(self.val_paths, stage)
            micro = self.cfg.micro_batch
            batches = [list(range(i, min(i + micro, len(ds)))) for i in range(0, len(ds), micro)]
            total_loss = total_cos = 0.0
            n = 0
            model.eval()
            try:
                with torch.no_grad():
                    for batch in _loader(ds, batches, self.cfg.workers):
                        self._raise_batch_error(batch)
                        x = batch["image"].to(self.device)
                        target = self._target(batch, x)
                        with self._autocast():
                            s = self.student_fn(x)
                        s = s.float()
                        loss = distill_loss(s, target, self.cfg.loss, self.cfg.gram_weight)
                        cos = torch.nn.functional.cosine_similarity(s, target, dim=-1, eps=1e-8).mean()
                        total_loss += float(loss) * len(batch["index"])
                        total_cos += float(cos) * len(batch["index"])
                        n += len(batch["index"])
            finally:
                model.train()
            row["val_loss"] = total_loss / n
            row["val_cosine"] = total_cos / n
        r2 = self._monitor_r2(self.student, stage)
        row.update({f"r2_{k}": v for k, v in r2.items()})
        return row

    # -- data ---------------------------------------------------------------------------------------------
    def _dataset(self, paths, stage: Stage) -> _ImageSet:
        t = self.teacher
        store = self.stores.get(stage.size)
        return _ImageSet(paths, stage.size, t.patch_size, t.mean, t.std, t.in_chans, self.cfg.intensity,
                         store_path=store[0] if store else None, store_index=store[1] if store else None)

    @staticmethod
    def _raise_batch_error(batch: dict) -> None:
        if "error" in batch:
            raise PosvitError(f"cannot read training image {batch['error']}")

    def _target(self, batch: dict, x):
        if "target" in batch:
            t = batch["target"].to(self.device).float()
            t = t.reshape(t.shape[0], -1, t.shape[-1])
            h, w = self.teacher.grid(x.shape[-2], x.shape[-1])
            if t.shape[1] != h * w:
                raise PosvitError(
                    f"the teacher store's grid ({t.shape[1]} tokens) does not match the {h}×{w} grid of the stage"
                )
            if self.blank:
                t[..., self.blank] = 0.0
            return t
        return self._teacher_tokens(x)

    # -- logging and checkpoints ----------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        row = dict(row)
        row["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self.t0, 3)
        self.log_rows.append(row)
        if self.dist.is_main:
            _write_csv(self.log_rows, self.log_csv)
            self.on_log(dict(row, event="eval" if row.get("val_loss") is not None or row.get("r2_xy") is not None
                             else "train"))

    def _state(self, stage_index: int, step_in_stage: int, global_step: int, finished: bool) -> dict:
        t = self.teacher
        meta = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": self.cfg.method,
            "recipe": self.cfg.recipe(),
            "teacher": {"model": t.name, "weights": t.weights, "weights_sha256": t.weights_sha256},
            "images_sha256": self.images_sha,
            "channels_blanked": self.blank,
            "stage_index": stage_index,
            "step_in_stage": step_in_stage,
            "global_step": global_step,
            "finished": finished,
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0,
            "teacher_r2": self.teacher_r2,
            # The training-loss window in progress, so a resumed run logs the same averages.
            "running": self._running,
        }
        return {
            "meta": json.dumps(meta),
            "student": {k: v.detach().cpu().clone() for k, v in self.student.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "rng": _rng_state(),
            "log": json.dumps(self.log_rows),
        }

    def _save_state(self, stage_index: int, step_in_stage: int, global_step: int, finished: bool = False) -> None:
        if self.dist.is_main:
            state = self._state(stage_index, step_in_stage, global_step, finished)
            _atomic_torch_save(state, self.run_dir / "last.pt")
            if self.cfg.keep_checkpoints and not finished:
                _atomic_torch_save(state, self.run_dir / f"step{global_step:07d}.pt")
            if not finished:
                self.on_log({"event": "checkpoint", "step": global_step, "path": str(self.run_dir / "last.pt")})
        _barrier(self.dist)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> RetrofitResult:
        torch = self.torch
        cfg = self.cfg
        self.setup()
        self.images_sha = _sha_of_paths(self.train_paths + self.val_paths)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        _barrier(self.dist)
        self.log_csv = self.run_dir / "log.csv"

        start_stage, start_step, global_step = 0, 0, 0
        self.optimizer = None
        if self.resume_state is not None:
            meta = _state_meta(self.resume_state)
            if meta.get("images_sha256") != self.images_sha:
                raise PosvitError(
                    f"--resume '{self.resume_state['_path']}' was trained on other images: pass the same image folder"
                )
            self.student.model.load_state_dict(self.resume_state["student"], strict=True)
            start_stage, start_step = int(meta["stage_index"]), int(meta["step_in_stage"])
            global_step = int(meta["global_step"])
            self.log_rows = json.loads(self.resume_state["log"])
            self.elapsed_before = float(meta.get("elapsed_s", 0.0))
            self.teacher_r2 = dict(meta.get("teacher_r2", {}))
            _set_rng_state(self.resume_state["rng"])
            self._running = list(meta.get("running", [0.0, 0, 0, 0.0]))

        # The functions the loop calls: DDP- and compile-wrapped student, plain or compiled teacher.
        student_module = _patch_token_module(self.student.model, self.prefix)
        teacher_module = _patch_token_module(self.teacher.model, self.prefix)
        params = _trainable_parameters(self.student.model)
        train_fn = student_module
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_fn = DistributedDataParallel(student_module, device_ids=ids)
        if cfg.compile:
            # Static shapes: each stage size compiles its own graph. Dynamic shapes made Inductor fail on the
            # ALiBi mask's symbolic sizes (torch 2.11, H100), and a stage rarely changes size mid-way.
            train_fn = torch.compile(train_fn, dynamic=False)
            self.student_fn = torch.compile(student_module, dynamic=False)
            self.teacher_fn = torch.compile(teacher_module, dynamic=False)
        else:
            self.student_fn = student_module
            self.teacher_fn = teacher_module
        ddp = train_fn if self.dist.enabled else None

        n_train = len(self.train_paths)
        total_steps = sum(self._stage_steps(st, n_train) for st in cfg.stages)
        for k in range(start_stage, len(cfg.stages)):
            stage = cfg.stages[k]
            steps = self._stage_steps(stage, n_train)
            first = start_step if k == start_stage else 0
            if first >= steps:
                continue
            self.optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=cfg.weight_decay)
            if self.resume_state is not None and k == start_stage and first > 0:
                self.optimizer.load_state_dict(self.resume_state["optimizer"])
            key = str(stage.size)
            if key not in self.teacher_r2 and self.dist.is_main:
                self.teacher_r2[key] = self._monitor_r2(self.teacher, stage)
                if self.dist.is_main:
                    self.on_log({"event": "teacher", "stage": k + 1, "size": stage.size,
                                 **{f"r2_{t}": v for t, v in self.teacher_r2[key].items()},
                                 "channels_blanked": self.blank})
            if global_step == 0 and first == 0:
                # Step 0: what the retrofit alone costs before any distillation (the baseline of the curve).
                row = self._train_row(k, stage, -1, 1, 0, stage.lr, None, None)
                row["epoch"] = 0.0
                if self.dist.is_main:
                    row.update(self._evaluate(k, stage))
                _barrier(self.dist)
                self._log(row)
            global_step = self._run_stage(k, stage, first, steps, global_step, total_steps, train_fn, ddp, params)
        evals = [r for r in self.log_rows if r.get("r2_xy") is not None]
        final_row = evals[-1] if evals else {}

        # The end: a finished state (nothing to resume) and the encoder checkpoint.
        last_stage = len(cfg.stages) - 1
        self._save_state(last_stage, self._stage_steps(cfg.stages[-1], n_train), global_step, finished=True)
        if self.dist.is_main and self.output is not None:
            self._save_encoder(final_row)
        _barrier(self.dist)
        return RetrofitResult(
            output=str(self.output) if self.output is not None else None,
            run_dir=str(self.run_dir),
            log_csv=str(self.log_csv),
            steps=global_step,
            channels_blanked=list(self.blank),
            teacher_r2=self.teacher_r2,
            final={k: final_row.get(k) for k in ("val_loss", "val_cosine", *(f"r2_{t}" for t in RAMP_TARGETS))},
            seconds=round(self.elapsed_before + time.perf_counter() - self.t0, 3),
            resumed_from=self.resume_state["_path"] if self.resume_state is not None else None,
            train_images=len(self.train_paths),
            val_images=len(self.val_paths),
        )

    @staticmethod
    def _stage_steps(stage: Stage, n_train: int) -> int:
        per_epoch = n_train // stage.batch_size
        return max(1, int(round(stage.epochs * per_epoch)))

    def _run_stage(self, k, stage, first, steps, global_step, total_steps, train_fn, ddp, params) -> int:
        torch = self.torch
        cfg = self.cfg
        dist = self.dist
        n_train = len(self.train_paths)
        per_epoch = n_train // stage.batch_size
        warmup_steps = int(round(cfg.warmup * steps))
        micro = cfg.micro_batch
        # This process's micro-batches for every remaining step, in order; one loader serves the whole stage.
        plan: list[list[list[int]]] = []
        for s in range(first, steps):
            epoch, b = divmod(s, per_epoch)
            if b == 0 or not plan or s == first:
                order = epoch_order(n_train, cfg.seed, k, epoch)
            plan.append(step_batches(order, b, stage.batch_size, dist.rank, dist.world_size, micro))
        flat = [mb for step in plan for mb in step]
        loader = iter(_loader(self._dataset(self.train_paths, stage), flat, cfg.workers))
        task = f"stage {k + 1}/{len(cfg.stages)}: {stage.size} px"
        self.progress(task, first, steps)
        t_start = time.perf_counter()
        local_batch = stage.batch_size // dist.world_size
        self.student.model.train()
        for s, micro_batches in zip(range(first, steps), plan):
            lr = learning_rate(s, steps, stage.lr, warmup_steps, cfg.schedule, cfg.min_lr_ratio)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=self.device)
            for j, idx in enumerate(micro_batches):
                batch = next(loader)
                self._raise_batch_error(batch)
                x = batch["image"].to(self.device, non_blocking=True)
                target = self._target(batch, x)
                sync = ddp is None or j == len(micro_batches) - 1
                ctx = contextlib.nullcontext() if sync else ddp.no_sync()
                with ctx:
                    with self._autocast():
                        out = train_fn(x)
                    loss = distill_loss(out.float(), target, cfg.loss, cfg.gram_weight)
                    # Micro-batch means weighted by size: the step minimises the mean over its global batch.
                    (loss * (len(idx) / local_batch)).backward()
                step_loss += loss.detach() * (len(idx) / local_batch)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if dist.enabled:
                import torch.distributed as tdist

                tdist.all_reduce(step_loss)
                step_loss /= dist.world_size
            value = float(step_loss)
            if not math.isfinite(value):
                raise PosvitError(
                    f"the training loss became {value} at step {global_step + 1}: lower --lr (or use --precision fp32)"
                )
            now = time.perf_counter()
            run_ = self._running
            run_[0] += value
            run_[1] += 1
            run_[2] += stage.batch_size
            run_[3] += now - t_start
            t_start = now
            global_step += 1
            done = s + 1
            self.progress(task, done, steps)
            end_of_stage = done == steps
            row = None
            if cfg.log_every and (global_step % cfg.log_every == 0) or end_of_stage:
                run_ = self._running
                row = self._train_row(k, stage, s, per_epoch, global_step, lr, run_[0] / run_[1],
                                      run_[2] / max(1e-9, run_[3]))
                self._running = [0.0, 0, 0, 0.0]
            if (cfg.eval_every and global_step % cfg.eval_every == 0) or end_of_stage:
                if row is None:
                    row = self._train_row(k, stage, s, per_epoch, global_step, lr, None, None)
                if dist.is_main:
                    row.update(self._evaluate(k, stage))
                _barrier(dist)
            if row is not None:
                self._log(row)
            if (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0) or end_of_stage:
                self._save_state(k, done, global_step)
        return global_step

    @staticmethod
    def _train_row(k, stage, s, per_epoch, global_step, lr, loss, ips) -> dict:
        return {
            "step": global_step,
            "stage": k + 1,
            "epoch": round((s + 1) / per_epoch, 4),
            "size": stage.size,
            "lr": lr,
            "train_loss": loss,
            "images_per_s": None if ips is None else round(ips, 3),
        }

    def _save_encoder(self, final_row: dict) -> None:
        from posvit_cli import __version__
        from posvit_cli.core.features.encoders import save_encoder_checkpoint

        t = self.teacher
        cfg = self.cfg
        extra = {
            "method": cfg.method,
            "alibi": cfg.alibi.to_dict() if cfg.method == "alibi" else None,
            "channels_blanked": list(self.blank),
            "recipe": cfg.recipe(),
            "teacher": {"model": t.name, "weights": t.weights, "weights_sha256": t.weights_sha256},
            "train_images": len(self.train_paths),
            "val_images": len(self.val_paths),
            "final": {k: final_row.get(k) for k in ("val_loss", "val_cosine", *(f"r2_{x}" for x in RAMP_TARGETS))},
            "teacher_r2": self.teacher_r2,
            "posvit_version": __version__,
        }
        self.output.parent.mkdir(parents=True, exist_ok=True)
        save_encoder_checkpoint(self.output, self.student, extra=extra)


def train_retrofit(
    teacher,
    images: Sequence[str | os.PathLike],
    config: RetrofitConfig,
    *,
    output: str | os.PathLike | None,
    run_dir: str | os.PathLike,
    resume: str | os.PathLike | None = None,
    student_init: str | os.PathLike | None = None,
    monitor: Sequence[np.ndarray] | None = None,
    teacher_stores: Sequence[str | os.PathLike] = (),
    dist: DistInfo | None = None,
    device=None,
    progress: ProgressCallback | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> RetrofitResult:
    """Retrofit ``teacher``'s architecture with ALiBi or NoPE and distil it to ``teacher`` on ``images``.

    Parameters
    ----------
    teacher : Encoder
        The original model (frozen during training; not modified).
    images : sequence of path
        Training images (readable; see :func:`check_images`); a seeded ``config.val_fraction`` is held out.
    config : RetrofitConfig
    output : path or None
        Final posvit encoder checkpoint (``.safetensors``), written atomically by rank 0.
    run_dir : path
        Folder for training states (``last.pt``) and the log (``log.csv``).
    resume : path, optional
        A training state (or run folder) of an interrupted run with the same recipe, teacher and images.
    student_init : path, optional
        Start the student from this retrofitted posvit checkpoint (e.g. the 224 px result before a 518 px stage).
    monitor : sequence of ndarray, optional
        Homogeneous images ``(H, W[, C])`` for the stack-R² monitor and automatic blanking; default: 4 uniform-noise
        images of 518 × 518 px.
    teacher_stores : sequence of path
        Feature stores of the teacher (``posvit extract --size crop:N``) that replace on-the-fly teacher passes for
        stages of size N.
    dist : DistInfo, optional
        From :func:`setup_distributed`.
    device : torch.device, optional
    progress : callable, optional
        ``progress(task, completed, total)`` per optimiser step.
    on_log : callable, optional
        Called on rank 0 with each log row (``event``: ``train``, ``eval``, ``teacher``, ``checkpoint``).

    Returns
    -------
    RetrofitResult

    Raises
    ------
    PosvitError
        For inputs that do not fit (batch larger than the data, wrong resume state, width mismatch, ...).
    """
    import torch

    device = device if device is not None else torch.device("cpu")
    with warnings.catch_warnings():
        # timm warns once per new grid size when resampling position embeddings; irrelevant for the teacher here.
        warnings.filterwarnings("ignore", category=UserWarning, module="timm")
        run = _Run(teacher, images, config, output=output, run_dir=run_dir, resume=resume, student_init=student_init,
                   monitor=monitor, teacher_stores=teacher_stores, dist=dist or DistInfo(), device=device,
                   progress=progress, on_log=on_log)
        return run.run()

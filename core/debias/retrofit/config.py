"""What defines a retrofit run: the stages (size, epochs, learning rate, batch), :class:`RetrofitConfig` and
:class:`RetrofitResult`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.alibi import METHODS, AlibiConfig
from posvit_cli.core.io.preprocess import parse_size


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

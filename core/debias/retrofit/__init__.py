"""Distilling a position-free ViT (ALiBi or NoPE retrofit) back to its original: the ``debias-train alibi|nope`` recipe.

The **teacher** is the original model, frozen. Its targets are its final normed patch tokens with the most
positional channels set to zero. The **student** is a copy whose absolute position embedding (and RoPE) is
removed and, for ``alibi``, whose attention gets the 2-D ALiBi bias of :mod:`posvit_cli.core.features.alibi`. The
loss is the mean over patch tokens of ``1 − cos(student, target)`` (or the MSE), plus optionally a Gram anchor
``λ · mean((X̂_s X̂_sᵀ − X̂_t X̂_tᵀ)²)`` on L2-normalised tokens that keeps the patch-to-patch similarity structure.

Training runs in stages (``224:15,518:1``: image size and epochs), each with its own learning rate, global batch
and a fresh AdamW optimiser, as the published models were trained. Images are resized (shortest side) and centre
cropped, without augmentation. Teacher targets are computed batch-wise inside the training step (or read from a
feature store of the teacher), never image by image.

Modules (imported in this order, none importing a later one): :mod:`.config` (stages, the run's configuration and
result), :mod:`.distributed` (``torchrun`` set-up), :mod:`.data` (image checks, split, epoch order, loader),
:mod:`.losses` (objective, schedule, channels to blank), :mod:`.state` (training states, resume, log) and
:mod:`.trainer` (the run).
"""

from __future__ import annotations

from posvit_cli.core.debias.blank import parse_blank
from posvit_cli.core.debias.retrofit.config import RetrofitConfig, RetrofitResult, Stage, parse_stages
from posvit_cli.core.debias.retrofit.data import (
    check_images, epoch_order, noise_images, split_train_val, step_batches,
)
from posvit_cli.core.debias.retrofit.distributed import DistInfo, setup_distributed, shutdown_distributed
from posvit_cli.core.debias.retrofit.losses import distill_loss, gram_loss, learning_rate, most_positional_channels
from posvit_cli.core.debias.retrofit.state import read_training_state
from posvit_cli.core.debias.retrofit.trainer import train_retrofit

__all__ = [
    "DistInfo",
    "RetrofitConfig",
    "RetrofitResult",
    "Stage",
    "check_images",
    "distill_loss",
    "epoch_order",
    "gram_loss",
    "learning_rate",
    "most_positional_channels",
    "noise_images",
    "parse_blank",
    "parse_stages",
    "read_training_state",
    "setup_distributed",
    "shutdown_distributed",
    "split_train_val",
    "step_batches",
    "train_retrofit",
]

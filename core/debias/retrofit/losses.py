"""Distillation objective, learning-rate schedule and the choice of teacher channels to blank in the targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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

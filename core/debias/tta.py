"""The ``tta`` head's before/after report: the encoder runs on each image, plain and transform-averaged.

Unlike the other heads, test-time augmentation cannot act on stored tokens: it needs the encoder on transformed
images (:meth:`~posvit_cli.core.debias.heads.TTAHead.wrap_encoder`), so its report extracts both feature sets here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.debias.report import report_indices, stack_r2_report
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["tta_report"]


def tta_report(
    head,
    encoder,
    paths: Sequence[str | os.PathLike],
    *,
    max_images: int = 16,
    size: str = "native",
    intensity: str = "auto",
    device=None,
    precision: str = "fp32",
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> tuple[dict | None, int]:
    """``probe``'s stack R² of the encoder's final tokens without and with the TTA head, on the same images.

    Parameters
    ----------
    head : TTAHead
    encoder : Encoder
    paths : sequence of path
        Images; up to ``max_images`` spread evenly over them are used.
    max_images : int
        0 = no report.
    size : str
        Resize rule as in ``extract --size`` (``auto`` = ``native``).
    intensity : str
        Intensity rule of :func:`~posvit_cli.core.io.images.to_float`.
    device : torch.device, optional
    precision : {"fp32", "bf16"}
    seed : int
        Seed of the probe's sampling.

    Returns
    -------
    report : dict or None
        As :func:`~posvit_cli.core.debias.report.stack_r2_report`; None when ``max_images`` is 0 or no image.
    images : int
        Images the report used.
    """
    import torch

    from posvit_cli.core.device import autocast
    from posvit_cli.core.io.images import read_image, to_channels, to_float
    from posvit_cli.core.io.preprocess import parse_size, resize_and_normalise

    progress = report(progress)
    if max_images == 0 or not paths:
        return None, 0
    device = device if device is not None else torch.device("cpu")
    chosen = [paths[i] for i in report_indices(len(paths), max_images)]
    wrapped = head.wrap_encoder(encoder)
    mode = parse_size("native" if str(size).strip().lower() == "auto" else size)
    before: list[np.ndarray] = []
    after: list[np.ndarray] = []
    names = []
    for k, p in enumerate(chosen):
        img = to_channels(to_float(read_image(p), intensity), encoder.in_chans)
        x, _ = resize_and_normalise(img, mode, encoder.patch_size, encoder.mean, encoder.std)
        x = x[None].to(device)
        with torch.inference_mode(), autocast(device, precision):
            before.append(encoder.forward_tokens(x, ["final"])[0]["final"][0].float().cpu().numpy())
            after.append(wrapped.forward_tokens(x, ["final"])[0]["final"][0].float().cpu().numpy())
        names.append({"name": Path(p).stem, "path": str(p), "grid": list(before[-1].shape[:2])})
        progress("tta features", k + 1, len(chosen))
    result = stack_r2_report(lambda i: before[i], names, read_after=lambda i: after[i], seed=seed, progress=progress)
    return result, len(chosen)

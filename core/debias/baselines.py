"""Cheap debiasing baselines and the before/after report shared by every head.

- ``svd``: the positional subspace of an encoder read off the tokens of a constant image (INSID3-style): with
  no content, whatever varies over the grid is position. Tokens are L2-normalised (so token norms do not weigh
  the directions), centred over positions, and the top-``k`` singular vectors in channel space (the left singular
  vectors of the ``D × N`` token matrix) span the subspace that :class:`~posvit_cli.core.debias.heads.ProjectionHead`
  then projects out of every token. The projection acts on the raw (not L2-normalised) tokens, so the head stays
  linear and features keep their scale; commands downstream standardise features anyway.
- ``blank``: the most positional channels of a probe result (top-k per ramp), set to zero.
- ``tta``: see :mod:`posvit_cli.core.io.transforms` and :class:`~posvit_cli.core.debias.heads.TTAHead`.

:func:`stack_r2_report` runs ``probe``'s stack R² on the same images before and after a head.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "constant_image_subspace",
    "parse_image_size",
    "report_indices",
    "stack_r2_report",
    "store_positional_channels",
]


def parse_image_size(spec: str, patch: int) -> tuple[int, int]:
    """Pixel size ``(H, W)`` from ``N``, ``square:N``, ``crop:N`` or ``HxW`` (rounded down to the patch size).

    Raises
    ------
    PosvitError
        For other forms or sizes below one patch.
    """
    s = str(spec).strip().lower()
    for p in ("square:", "crop:"):
        if s.startswith(p):
            s = s[len(p):]
    try:
        if "x" in s:
            H, W = (int(v) for v in s.split("x"))
        else:
            H = W = int(s)
    except ValueError:
        raise PosvitError(f"image size '{spec}': write N, square:N or HxW in pixels") from None
    H, W = H - H % patch, W - W % patch
    if H < patch or W < patch:
        raise PosvitError(f"image size '{spec}' is smaller than one {patch}-px patch")
    return H, W


def constant_image_subspace(
    encoder,
    size: tuple[int, int],
    rank: int,
    *,
    device=None,
    precision: str = "fp32",
    value: float = 0.0,
) -> tuple[np.ndarray, dict]:
    """The positional subspace of an encoder from the tokens of a constant image.

    Parameters
    ----------
    encoder : Encoder
    size : (int, int)
        Image size ``(H, W)`` in pixels (multiples of the patch size): use the size of the images the head will
        clean, since the positional pattern depends on the grid.
    rank : int
        Singular vectors kept (INSID3: 16).
    device : torch.device, optional
    precision : {"fp32", "bf16"}
    value : float
        The constant in *normalised* units; 0 is the dataset-mean colour (INSID3's "normalised-zero" image).

    Returns
    -------
    basis : ndarray of float32, shape (k, D)
        Orthonormal rows, strongest first (``k = rank``, or fewer when the tokens vary in fewer directions).
    info : dict
        ``grid``, ``size``, ``singular_values`` (all), ``explained`` (variance fraction of the kept vectors).
    """
    import torch

    from posvit_cli.core.device import autocast

    if rank < 1:
        raise PosvitError(f"--rank must be at least 1, got {rank}")
    device = device or torch.device("cpu")
    H, W = size
    x = torch.full((1, encoder.in_chans, H, W), float(value), dtype=torch.float32, device=device)
    with torch.inference_mode(), autocast(device, precision):
        tokens, _ = encoder.forward_tokens(x, ["final"])
    t = tokens["final"][0].to("cpu", torch.float64)
    h, w, D = t.shape
    X = t.reshape(h * w, D)
    X = X / torch.linalg.vector_norm(X, dim=1, keepdim=True).clamp_min(1e-12)
    X = X - X.mean(0, keepdim=True)
    if h * w < 2:
        raise PosvitError(f"a {h}×{w} token grid has no positional variation: use a larger --size")
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    # Directions with no variance over the grid are not positional: never remove arbitrary null directions.
    available = int((S > 1e-6 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    k = min(rank, available)
    if k < 1:
        raise PosvitError("the tokens of a constant image do not vary over the grid: this encoder has no "
                          "positional subspace to remove")
    if k < rank:
        warnings.warn(f"the constant image's tokens vary in only {k} directions; removing {k}, not --rank {rank}",
                      PosvitWarning, stacklevel=2)
    energy = (S**2).sum()
    explained = float((S[:k] ** 2).sum() / energy) if energy > 0 else float("nan")
    return Vh[:k].numpy().astype(np.float32), {
        "grid": [int(h), int(w)], "size": [int(H), int(W)], "rank": int(k),
        "singular_values": [float(s) for s in S], "explained": explained,
        "constant": float(value), "token_normalisation": "L2 per token, then centred over positions",
    }


def store_positional_channels(store, k: int = 2, *, images: int | None = None, seed: int = 0,
                              progress: ProgressCallback | None = None) -> tuple[list[int], dict]:
    """The most positional channels of a store: ``probe``'s top-``k`` channels per ramp (lr, ud, diag, radial).

    Returns
    -------
    channels : list of int
    result : dict
        The probe result document it was read from.
    """
    from posvit_cli.core.measure.probe import POSITIONAL_RAMPS, make_settings, positional_channels, probe_store

    settings, _ = make_settings("holdout", targets=POSITIONAL_RAMPS, per_channel=True, extras=False, top_k=k,
                                seed=seed)
    result = probe_store(store, settings, progress=progress)
    return positional_channels(result, k=k), result


def report_indices(n: int, max_images: int) -> list[int]:
    """Up to ``max_images`` indices spread evenly over ``n`` images."""
    if n <= max_images:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, max_images)})


def stack_r2_report(
    read: Callable[[int], np.ndarray],
    images: Sequence[dict],
    apply: Callable[[np.ndarray], np.ndarray] | None = None,
    read_after: Callable[[int], np.ndarray] | None = None,
    *,
    fraction: float | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> dict:
    """``probe``'s stack R² of the positional ramps, before and after debiasing, on the same images and masks.

    Parameters
    ----------
    read : callable ``i -> ndarray (h, w, C)``
        Features before.
    images : sequence of dict
        ``{"name", "path", "grid"}`` per image.
    apply : callable, optional
        Head applied to ``read(i)`` for the "after" features (or give ``read_after``).
    read_after : callable ``i -> ndarray (h, w, C)``, optional
    fraction : float, optional
        Training fraction of the probe. Default: the published 1/36, raised on small grids so that at least 16
        tokens train each fit (at most half of them), since 1/36 of a few hundred tokens fits nothing.
    seed : int

    Returns
    -------
    dict
        ``{"images": n, "fraction": f, "before": {target: mean R²}, "after": {...}}`` for lr, ud, diag, radial
        and xy.
    """
    from posvit_cli.core.measure.probe import RAMP_TARGETS, make_settings, probe_dataset

    progress = report(progress)
    if read_after is None:
        if apply is None:
            raise ValueError("give apply or read_after")

        def read_after(i):
            return apply(read(i))

    if fraction is None:
        smallest = min(int(im["grid"][0]) * int(im["grid"][1]) for im in images)
        fraction = min(0.5, max(1 / 36, 16 / smallest))
    settings, _ = make_settings("holdout", targets=RAMP_TARGETS, per_channel=False, extras=False, seed=seed,
                                fraction=fraction)
    out = {"images": len(images), "fraction": fraction}
    for name, fn in (("before", read), ("after", read_after)):
        res = probe_dataset(lambda i, _ly, fn=fn: np.asarray(fn(i), dtype=np.float32), images, ["final"], settings,
                            progress=lambda task, done, total, name=name: progress(f"probe {name}", done, total))
        out[name] = {t: v["mean"] for t, v in res["layers"]["final"]["stack_r2"].items()}
    return out

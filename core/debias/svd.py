"""The ``svd`` baseline: the positional subspace of an encoder read off the tokens of a constant image.

INSID3-style: with no content, whatever varies over the grid is position. Tokens are L2-normalised (so token norms
do not weigh the directions), centred over positions, and the top-``k`` singular vectors in channel space (the left
singular vectors of the ``D × N`` token matrix) span the subspace that
:class:`~posvit_cli.core.debias.heads.ProjectionHead` then projects out of every token. The projection acts on the
raw (not L2-normalised) tokens, so the head stays linear and features keep their scale; commands downstream
standardise features anyway.
"""

from __future__ import annotations

import warnings

import numpy as np

from posvit_cli.core.errors import PosvitError, PosvitWarning

__all__ = ["constant_image_subspace", "parse_image_size", "svd_image_size"]


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


def svd_image_size(spec: str, patch: int, store_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The constant image's size ``(H, W)`` in pixels for ``--size``.

    ``auto`` is ``store_size`` (the cleaned store's most common image size) or 518 × 518 without a store, rounded
    down to multiples of ``patch``; any other value goes through :func:`parse_image_size`.
    """
    if str(spec).strip().lower() != "auto":
        return parse_image_size(spec, patch)
    H, W = store_size if store_size is not None else (518, 518)
    return H - H % patch, W - W % patch


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

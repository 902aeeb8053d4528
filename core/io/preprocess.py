"""Resizing and normalising images for a ViT whose input sides must be multiples of the patch size.

Resize modes (``--size``):

``native``
    Keep the image's size, resized *down* to the nearest multiple of the patch size (600×474 → 588×462 at
    patch 14), as the references do.
``short:N``
    Scale so the shorter side is N pixels, then round both sides down to patch multiples.
``long:N``
    Scale so the longer side is N pixels, then round down to patch multiples.
``square:N`` (or just ``N``)
    Resize to N×N, ignoring the aspect ratio (N rounded down to a patch multiple).
``crop:N``
    Scale the shorter side to N, then take the centre N×N crop.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = ["ResizeMode", "check_patch_multiple", "nearest_patch_multiples", "parse_size", "plan_resize",
           "resize_and_normalise", "suggested_tile"]


@dataclasses.dataclass(frozen=True)
class ResizeMode:
    """A parsed ``--size`` value: ``kind`` in native/short/long/square/crop and its pixel size."""

    kind: str
    size: int | None = None

    def __str__(self) -> str:
        return self.kind if self.size is None else f"{self.kind}:{self.size}"


def parse_size(spec: str) -> ResizeMode:
    """Parse ``native``, ``short:N``, ``long:N``, ``square:N``, ``crop:N`` or a bare ``N`` (= ``square:N``).

    Raises
    ------
    PosvitError
        For an unknown mode or a size that is not a positive integer.
    """
    s = str(spec).strip().lower()
    if s == "native":
        return ResizeMode("native")
    kind, sep, num = s.partition(":")
    if not sep:
        if not s.isdigit():
            raise PosvitError(f"unknown size '{spec}': use native, short:N, long:N, square:N, crop:N or N")
        kind, num = "square", s
    if kind not in ("short", "long", "square", "crop"):
        raise PosvitError(f"unknown size '{spec}': use native, short:N, long:N, square:N or crop:N")
    try:
        n = int(num)
    except ValueError:
        raise PosvitError(f"size '{spec}': N must be a whole number of pixels") from None
    if n <= 0:
        raise PosvitError(f"size '{spec}': N must be positive")
    return ResizeMode(kind, n)


def nearest_patch_multiples(px: int, patch: int) -> list[int]:
    """The one or two multiples of ``patch`` nearest ``px`` that are at least one patch: ``(518, 8)`` → ``[512, 520]``."""
    lo = px - px % patch
    return [lo, lo + patch] if lo >= patch else [lo + patch]


def check_patch_multiple(option: str, px: int, patch: int, model: str = "the model") -> None:
    """Refuse a size in pixels that is not a multiple of the patch, instead of rounding it down silently.

    Parameters
    ----------
    option : str
        How the user wrote the size (``--size square:500``, ``--tile 518``), for the message.
    px : int
        The size in pixels.
    patch : int
        Patch size in pixels.
    model : str
        The model's name, for the message.

    Raises
    ------
    PosvitError
        Naming the nearest valid sizes.
    """
    if px % patch:
        near = " or ".join(str(v) for v in nearest_patch_multiples(px, patch))
        raise PosvitError(f"{option}: {px} px is not a multiple of the {patch}-px patch of {model} (use {near})")


def suggested_tile(patch: int, target: int = 512) -> int:
    """A tile side to suggest in messages: the multiple of ``patch`` nearest ``target`` px (518 at patch 14)."""
    return max(patch, round(target / patch) * patch)


def _floor(v: float, patch: int) -> int:
    return int(v // patch) * patch


def plan_resize(orig_hw: tuple[int, int], mode: ResizeMode, patch: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The resized size ``(H', W')`` and, for ``crop``, the crop size, for an image of ``orig_hw`` pixels.

    Returns
    -------
    resize_hw : (int, int)
        Size the whole image is resized to.
    crop_hw : (int, int) or None
        Centre crop taken after resizing (``crop`` mode only). The processed size is ``crop_hw or resize_hw``.

    Raises
    ------
    PosvitError
        If the processed image would be smaller than one patch.
    """
    H, W = (int(v) for v in orig_hw)
    crop = None
    if mode.kind == "native":
        out = (_floor(H, patch), _floor(W, patch))
    elif mode.kind in ("short", "long"):
        ref = min(H, W) if mode.kind == "short" else max(H, W)
        s = mode.size / ref
        out = (_floor(round(H * s), patch), _floor(round(W * s), patch))
    elif mode.kind == "square":
        n = _floor(mode.size, patch)
        out = (n, n)
    elif mode.kind == "crop":
        s = mode.size / min(H, W)
        out = (max(mode.size, round(H * s)), max(mode.size, round(W * s)))
        n = _floor(mode.size, patch)
        crop = (n, n)
    else:  # pragma: no cover - guarded by parse_size
        raise ValueError(mode)
    final = crop or out
    if final[0] < patch or final[1] < patch:
        raise PosvitError(
            f"image of {H}×{W} px is smaller than one {patch}-px patch after '{mode}' resizing"
        )
    return out, crop


def resize_and_normalise(
    img: np.ndarray, mode: ResizeMode, patch: int, mean, std
):
    """Resize a float image and normalise it for the encoder.

    Parameters
    ----------
    img : ndarray of float32, shape (H, W, C)
        Intensities in [0, 1] (see :func:`posvit_cli.core.io.images.to_float`).
    mode : ResizeMode
    patch : int
        Patch size in pixels.
    mean, std : sequence of float, length C

    Returns
    -------
    tensor : torch.Tensor of float32, shape (C, H', W')
        Normalised image, sides multiples of ``patch``.
    proc_hw : (int, int)
        ``(H', W')``.
    """
    import torch
    import torch.nn.functional as F

    H, W, C = img.shape
    resize_hw, crop = plan_resize((H, W), mode, patch)
    t = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]
    if resize_hw != (H, W):
        # Antialiasing matters when shrinking micrographs: aliasing would invent texture the encoder sees.
        t = F.interpolate(t, size=resize_hw, mode="bilinear", antialias=True, align_corners=False)
        t = t.clamp_(0.0, 1.0)
    if crop is not None:
        top = (resize_hw[0] - crop[0]) // 2
        left = (resize_hw[1] - crop[1]) // 2
        t = t[..., top : top + crop[0], left : left + crop[1]]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    t = (t - m) / s
    return t[0].contiguous(), (int(t.shape[-2]), int(t.shape[-1]))

"""Heads of the semantic probe and their geometry: bilinear upsampling taps (torch's ``align_corners=False``),
the arg-max of upsampled logits in bounded memory, the trained linear head (batch norm + linear, AdamW, early
stopping) and the closed-form ridge head. Both heads end as one :class:`AffineHead` (``logits = x @ W + b``)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from posvit_cli.core.measure.semantic.settings import MIN_STEPS_PER_EPOCH, SemanticSettings
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["AffineHead", "bilinear_taps", "fit_ridge_head", "train_linear_head", "upsample_argmax"]


# --------------------------------------------------------------------------------------------------------------
# Bilinear upsampling (torch's align_corners=False convention), as index/weight taps


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of a 1-D bilinear resize from ``n_in`` to ``n_out`` samples.

    Output sample ``o`` is ``(1 − lam[o]) · x[i0[o]] + lam[o] · x[i1[o]]``, exactly what
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` computes along one axis (source
    coordinate ``(o + 0.5) · n_in / n_out − 0.5``, clamped at 0; float32 arithmetic as torch's CPU kernel).

    Returns
    -------
    i0, i1 : ndarray of int64, shape (n_out,)
    lam : ndarray of float32, shape (n_out,)
    """
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0.astype(np.float32)).astype(np.float32)
    lam = np.where(i1 == i0, np.float32(0.0), lam).astype(np.float32)
    return i0, i1, lam


def upsample_argmax(logits, out_hw: tuple[int, int], *, max_elements: int = 2**24):
    """Arg-max class of bilinearly upsampled logits, computed in row bands (bounded memory).

    Parameters
    ----------
    logits : torch.Tensor, shape (h, w, K)
    out_hw : (H, W)
        Output size (e.g. the frame the encoder saw).
    max_elements : int
        Floats per band (bands of ``max_elements // (W · K)`` rows).

    Returns
    -------
    torch.Tensor of int64, shape (H, W)
        Equal to ``F.interpolate(logits.permute(2, 0, 1)[None], (H, W), mode="bilinear").argmax(1)[0]``.
    """
    import torch

    h, w, K = logits.shape
    H, W = int(out_hw[0]), int(out_hw[1])
    dev = logits.device
    ry0, ry1, ly = (torch.as_tensor(a, device=dev) for a in bilinear_taps(h, H))
    rx0, rx1, lx = (torch.as_tensor(a, device=dev) for a in bilinear_taps(w, W))
    lx = lx[None, :, None]
    out = torch.empty((H, W), dtype=torch.int64, device=dev)
    band = max(1, max_elements // max(1, W * K))
    for r0 in range(0, H, band):
        r1 = min(H, r0 + band)
        wy = ly[r0:r1, None, None]
        rows = logits[ry0[r0:r1]] * (1 - wy) + logits[ry1[r0:r1]] * wy              # (b, w, K)
        full = rows[:, rx0] * (1 - lx) + rows[:, rx1] * lx                           # (b, W, K)
        out[r0:r1] = full.argmax(-1)
    return out


# --------------------------------------------------------------------------------------------------------------
# Heads


@dataclasses.dataclass
class AffineHead:
    """A trained linear head as one affine map on raw features: ``logits = x @ weight + bias``.

    Attributes
    ----------
    weight : ndarray of float32, shape (C, K)
    bias : ndarray of float32, shape (K,)
    """

    weight: np.ndarray
    bias: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    @property
    def channels(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, features, device="cpu"):
        """Logits of a token grid: ``features`` (h, w, C) ndarray or tensor → torch tensor (h, w, K)."""
        import torch

        x = torch.as_tensor(np.asarray(features, dtype=np.float32), device=device)
        W = torch.as_tensor(self.weight, device=device)
        b = torch.as_tensor(self.bias, device=device)
        return x @ W + b


def _shuffle_indices(n: int, generator, device):
    import torch

    return torch.randperm(n, generator=generator).to(device)


def train_linear_head(X, y, X_stop, y_stop, num_classes: int, settings: SemanticSettings, *, device="cpu",
                      progress: ProgressCallback | None = None) -> tuple[AffineHead, dict]:
    """Train batch norm → dropout → linear with AdamW and cross-entropy; keep the best early-stopping epoch.

    Parameters
    ----------
    X : ndarray (n, C), float16 or float32
        Training samples (tokens or interpolated pixels); labels ``y`` (n,) int64 in ``[0, num_classes)``.
    X_stop, y_stop : ndarray or None
        Early-stopping samples (None with ``settings.patience == 0``).
    num_classes : int
    settings : SemanticSettings
    device : str
    progress : callable, optional
        ``progress("train head", epoch, epochs)``.

    Returns
    -------
    head : AffineHead
        The kept epoch's head, batch norm folded in.
    log : dict
        ``epochs_run``, ``best_epoch`` (1-based), ``train_loss`` and ``stop_loss`` per epoch, ``stopped_early``.
    """
    import torch
    from torch import nn

    prog = report(progress)
    dev = torch.device(device)
    n, C = X.shape
    Xt = torch.as_tensor(X)
    yt = torch.as_tensor(y, dtype=torch.int64)
    if dev.type != "cpu":
        Xt, yt = Xt.to(dev), yt.to(dev)
    use_stop = settings.patience > 0 and X_stop is not None and len(X_stop) > 0
    if use_stop:
        Xs = torch.as_tensor(X_stop).to(dev)
        ys = torch.as_tensor(y_stop, dtype=torch.int64).to(dev)
    devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        if dev.type == "cuda":
            torch.cuda.manual_seed(settings.seed)
        layers: list[nn.Module] = []
        if settings.batchnorm:
            layers.append(nn.BatchNorm1d(C))
        if settings.dropout > 0:
            layers.append(nn.Dropout(settings.dropout))
        linear = nn.Linear(C, num_classes)
        layers.append(linear)
        model = nn.Sequential(*layers).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(settings.seed)
        # Small training sets get smaller batches, so that every epoch still takes MIN_STEPS optimiser steps.
        bs = max(2, min(settings.batch_size, n // MIN_STEPS_PER_EPOCH))
        # A final batch of one token would break batch norm; fold a short tail into the previous step.
        steps = max(1, n // bs)
        best, best_state, best_epoch, bad = math.inf, None, 0, 0
        train_losses, stop_losses = [], []
        prog("train head", 0, settings.epochs)
        epoch = 0
        for epoch in range(1, settings.epochs + 1):
            model.train()
            perm = _shuffle_indices(n, gen, dev)
            total = 0.0
            for s in range(steps):
                idx = perm[s * bs: (s + 1) * bs if s < steps - 1 else n]
                xb = Xt[idx].to(torch.float32)
                loss = loss_fn(model(xb), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            train_losses.append(total / n)
            if use_stop:
                stop = _mean_loss(model, Xs, ys)
                stop_losses.append(stop)
                if stop < best:
                    best, best_epoch, bad = stop, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    bad += 1
            prog("train head", epoch, settings.epochs)
            if use_stop and bad >= settings.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            best_epoch = epoch
    model.eval()
    head = _fold(model, settings.batchnorm)
    log = {
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "stopped_early": bool(use_stop and epoch < settings.epochs),
        "train_loss": train_losses,
        "stop_loss": stop_losses,
        "steps_per_epoch": steps,
        "batch_size": bs,
    }
    return head, log


def _mean_loss(model, X, y, chunk: int = 65536) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(X), chunk):
            total += float(F.cross_entropy(model(X[i:i + chunk].to(torch.float32)), y[i:i + chunk], reduction="sum"))
    return total / max(1, len(X))


def _fold(model, batchnorm: bool) -> AffineHead:
    """The eval-mode network (batch norm → dropout → linear) as one affine map on raw features."""
    import torch

    linear = model[-1]
    W = linear.weight.detach().double().T                                   # (C, K)
    b = linear.bias.detach().double()
    if batchnorm:
        bn = model[0]
        g = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
        shift = bn.bias.detach().double() - bn.running_mean.detach().double() * g
        b = b + shift @ W
        W = g[:, None] * W
    return AffineHead(W.float().cpu().numpy(), b.float().cpu().numpy())


def fit_ridge_head(X, y, num_classes: int, alpha: float = 1.0, *, device="cpu", chunk: int = 262144) -> AffineHead:
    """Closed-form least-squares classifier: ridge regression of one-hot labels on standardised features.

    ``W = (Zᵀ Z + α I)⁻¹ Zᵀ (Y − Ȳ)`` with ``Z`` the features z-scored over the training samples (a constant
    channel gets scale 1); folded into an :class:`AffineHead`. Sums are accumulated in float64 in chunks.

    Parameters
    ----------
    X : ndarray (n, C)
    y : ndarray (n,) int64
    num_classes : int
    alpha : float
    """
    import torch

    dev = torch.device(device)
    n, C = X.shape
    shift = torch.as_tensor(np.asarray(X[: min(n, 4096)], dtype=np.float64).mean(0), device=dev)
    s1 = torch.zeros(C, dtype=torch.float64, device=dev)
    G = torch.zeros((C, C), dtype=torch.float64, device=dev)
    XY = torch.zeros((C, num_classes), dtype=torch.float64, device=dev)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=dev)
    for i in range(0, n, chunk):
        xb = torch.as_tensor(np.asarray(X[i:i + chunk], dtype=np.float64), device=dev) - shift
        yb = torch.as_tensor(np.asarray(y[i:i + chunk]), device=dev)
        onehot = torch.nn.functional.one_hot(yb, num_classes).double()
        s1 += xb.sum(0)
        G += xb.T @ xb
        XY += xb.T @ onehot
        counts += onehot.sum(0)
    mu = s1 / n
    ybar = counts / n
    cov = G - n * torch.outer(mu, mu)                                        # Σ (x − μ)(x − μ)ᵀ
    var = torch.clamp(torch.diagonal(cov) / n, min=0.0)
    scale = torch.where(var > 1e-12 * torch.clamp(var.max(), min=1e-300), var.sqrt(), torch.ones_like(var))
    cxy = XY - torch.outer(mu, counts)                                       # Σ (x − μ) yᵀ = Σ (x − μ)(y − ȳ)ᵀ
    Gz = cov / torch.outer(scale, scale) + alpha * torch.eye(C, dtype=torch.float64, device=dev)
    Wz = torch.linalg.solve(Gz, cxy / scale[:, None])
    W = Wz / scale[:, None]
    b = ybar - (mu + shift) @ W
    return AffineHead(W.float().cpu().numpy(), b.float().cpu().numpy())

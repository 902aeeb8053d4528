"""Linear-probe semantic segmentation on cached patch features, and its transformation-robustness test.

The question it answers: do the features still say *what* a patch shows once position is removed? A linear head
is trained on the frozen features of a store (the backbone is never re-run) against class masks matched to the
images by file stem, and scored on other images with one dataset-wide confusion matrix.

Masks and resolution (``resolution``)
    A mask is first brought onto the frame the encoder saw (the store's ``--size`` resize, or the crop of tiled
    and ``crop:N`` extractions; nearest neighbour). ``tokens`` (default): the mask is nearest-downsampled to the
    token grid (each token takes the class at its patch centre); the head is trained and scored per token.
    ``pixels`` (the published setting of "What DINO saw"): the head's logits are bilinearly upsampled to the
    mask in that frame (``align_corners=False``) and every pixel is scored; training uses, per image, a seeded
    sample of pixels whose features are the bilinear interpolation of the tokens (``pixels_per_token`` pixels
    per token), which for an affine head is exactly the upsampled-logit loss at those pixels.

Heads (``head``)
    ``linear`` (default, the published head): batch norm → dropout → linear layer, trained with AdamW and
    cross-entropy on minibatches of tokens held in memory (a seeded, class-blind subsample of at most
    ``max_train_tokens`` tokens, float16), keeping the epoch of lowest loss on an early-stopping split of the
    training images. ``ridge``: closed-form least squares on one-hot targets (features standardised on the
    training tokens, ``alpha`` on the Gram diagonal): one pass, no epochs. Both end as one affine map
    ``logits = x @ W + b`` (batch norm folded in), so scoring and robustness treat them alike.

Scoring
    mIoU from ONE confusion matrix accumulated over every scored pixel of every image (not per batch, which
    averages batch-level scores and inflates them), IoU per class (a class with an empty union, never in the
    ground truth and never predicted, is left out of the mean and reported), pixel accuracy. Pixels whose mask
    value is ``ignore_index`` never count.

Splits
    Images, not tokens, are split, by a seeded permutation of the sorted file stems (so every store of the same
    images gets the same split). Without a validation store, ``test_fraction`` of the images are held out and
    scored; ``holdout_fraction`` of the remaining training images decide early stopping.

Robustness
    Stores extracted with ``posvit extract --transform T`` hold the features of transformed images mapped back
    to the original frame; the SAME head is scored on them with the original masks (:func:`score_store`), one
    mIoU per transform. A model equivariant to a transform scores exactly as on the untransformed images.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.cluster.masks import MASK_SUFFIXES
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.io.labels import check_label_range
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "AffineHead",
    "HEADS",
    "MASK_SUFFIXES",
    "MaskSource",
    "RESOLUTIONS",
    "SEMANTIC_SCHEMA",
    "SemanticSettings",
    "bilinear_taps",
    "check_same_features",
    "fit_ridge_head",
    "gather_samples",
    "image_split",
    "scan_masks",
    "score_store",
    "scores_from_confusion",
    "semantic_probe",
    "train_linear_head",
    "upsample_argmax",
]

SEMANTIC_SCHEMA = "posvit-semantic-probe-result"
#: Fewest optimiser steps per epoch of the linear head (small training sets get smaller batches).
MIN_STEPS_PER_EPOCH = 20
SEMANTIC_SCHEMA_VERSION = 1
HEADS = ("linear", "ridge")
RESOLUTIONS = ("tokens", "pixels")


@dataclasses.dataclass(frozen=True)
class SemanticSettings:
    """How to train and score the semantic probe.

    Attributes
    ----------
    head : {"linear", "ridge"}
        See the module docstring.
    resolution : {"tokens", "pixels"}
        Where masks and predictions meet (see the module docstring).
    epochs : int
        Most epochs of the linear head (50, as published).
    patience : int
        Stop after this many epochs without a lower early-stopping loss (0: no early stopping, train
        ``epochs`` epochs on all training images and keep the last).
    lr, weight_decay : float
        AdamW settings (1e-3 as published; 0.01 is torch's default decay).
    batch_size : int
        Tokens (or pixels) per optimiser step; smaller when the training set is under ``20 × batch_size``, so
        that every epoch takes at least :data:`MIN_STEPS_PER_EPOCH` steps.
    dropout : float
        Dropout on the normalised channels. Off by default: the published head drops whole channel maps of an
        image (``Dropout2d(0.1)``), a regulariser a head of ``C × K`` weights trained on up to a million tokens
        does not need, and per-token dropout doubled the cost of a training step here.
    batchnorm : bool
        Batch norm before the linear layer (published for VOC; off for their ADE20K head).
    alpha : float
        Ridge strength on standardised features (``ridge`` head).
    holdout_fraction : float
        Fraction of the training images that decide early stopping (at least one image).
    test_fraction : float
        Fraction of the images held out and scored when no validation store is given (at least one image).
    max_train_tokens : int
        Most training samples held in memory (float16: ``max_train_tokens × C × 2`` bytes); above it every
        image contributes the same fraction of its labelled tokens.
    pixels_per_token : int
        Training pixels drawn per token with ``resolution="pixels"``.
    seed : int
        Splits, subsamples, initial weights, shuffling and dropout.
    """

    head: str = "linear"
    resolution: str = "tokens"
    epochs: int = 50
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 8192
    dropout: float = 0.0
    batchnorm: bool = True
    alpha: float = 1.0
    holdout_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train_tokens: int = 1_000_000
    pixels_per_token: int = 4
    seed: int = 0

    def validated(self) -> SemanticSettings:
        """Return self after checking every field (raises :class:`PosvitError` naming the option)."""
        if self.head not in HEADS:
            raise PosvitError(f"unknown head '{self.head}': use {' or '.join(HEADS)}")
        if self.resolution not in RESOLUTIONS:
            raise PosvitError(f"unknown resolution '{self.resolution}': use {' or '.join(RESOLUTIONS)}")
        if self.epochs < 1:
            raise PosvitError(f"--epochs must be at least 1, got {self.epochs}")
        if self.patience < 0:
            raise PosvitError(f"--patience must be 0 (no early stopping) or more, got {self.patience}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise PosvitError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise PosvitError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.batch_size < 2:
            raise PosvitError(f"--batch-size must be at least 2 tokens (batch norm), got {self.batch_size}")
        if not (0.0 <= self.dropout < 1.0):
            raise PosvitError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise PosvitError(f"--alpha must be 0 or more, got {self.alpha}")
        if not (0.0 < self.holdout_fraction < 1.0):
            raise PosvitError(f"the early-stopping fraction must be in (0, 1), got {self.holdout_fraction}")
        if not (0.0 < self.test_fraction < 1.0):
            raise PosvitError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_train_tokens < 2:
            raise PosvitError(f"--max-train-tokens must be at least 2, got {self.max_train_tokens}")
        if self.pixels_per_token < 1:
            raise PosvitError(f"--pixels-per-token must be at least 1, got {self.pixels_per_token}")
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["masks"] = (
            "nearest-downsampled to the token grid (class at each patch centre)" if self.resolution == "tokens"
            else "in the frame the encoder saw; logits bilinearly upsampled to it (align_corners=False)"
        )
        d["head_form"] = (
            ("batch norm → " if self.batchnorm else "") + (f"dropout {self.dropout:g} → " if self.dropout else "")
            + "linear; AdamW, cross-entropy, best early-stopping loss" if self.head == "linear"
            else f"ridge least squares on one-hot targets, standardised features, alpha {self.alpha:g}"
        )
        d["metric"] = "mIoU from one dataset-wide confusion matrix; classes with an empty union left out"
        return d


# --------------------------------------------------------------------------------------------------------------
# Masks


class MaskSource:
    """The class masks of a store's images, matched by file stem, read on demand.

    Parameters
    ----------
    store : FeatureStore
    mask_dir : str or path-like
        Folder of label images (palette PNG, greyscale, integer TIFF): class indices per pixel.

    Raises
    ------
    PosvitError
        If the folder does not exist or images have no mask (they are named).
    """

    def __init__(self, store, mask_dir):
        from posvit_cli.core.cluster.masks import store_size_mode
        from posvit_cli.core.io.labels import find_label_files

        self.store = store
        self.mask_dir = str(mask_dir)
        names = [r.name for r in store.records]
        found, missing = find_label_files(names, mask_dir, MASK_SUFFIXES)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise PosvitError(
                f"no mask in '{mask_dir}' for {len(missing)} of {len(names)} images of '{store.source}': {shown} "
                "(masks are matched by file stem, e.g. img1.jpg ↔ img1.png)"
            )
        self.files = [found[n] for n in names]
        self.size_mode, self.patch = store_size_mode(store)
        self.resized: list[str] = []

    def processed(self, index: int) -> np.ndarray:
        """The mask of image ``index`` in the frame the encoder saw, shape ``proc_size``, int64.

        The same mapping as the overclustering evaluation (:mod:`posvit_cli.core.cluster.overclustering`): resized to the
        image if its size differs (nearest, with a warning), then through the store's resize and crop.
        """
        from posvit_cli.core.cluster.masks import labels_to_processed_frame
        from posvit_cli.core.io.labels import load_label_image, resize_labels_nearest

        r = self.store.record(index)
        path = self.files[index]
        lab, _ = load_label_image(path)
        if lab.ndim != 2:
            raise PosvitError(f"mask '{path}' is not a 2-D label image (shape {lab.shape})")
        if tuple(lab.shape) != tuple(r.orig_size) and r.orig_size[0] > 0:
            if str(path) not in self.resized:
                self.resized.append(str(path))
                warnings.warn(
                    f"mask '{Path(path).name}' is {lab.shape[0]}×{lab.shape[1]} px but its image is "
                    f"{r.orig_size[0]}×{r.orig_size[1]}: resized to the image (nearest)", PosvitWarning, stacklevel=2,
                )
            lab = resize_labels_nearest(lab, r.orig_size)
        return labels_to_processed_frame(lab, r, self.size_mode, self.patch)

    def tokens(self, index: int, processed: np.ndarray | None = None) -> np.ndarray:
        """The mask on the token grid ``(h, w)``: the class under each patch centre."""
        from posvit_cli.core.io.labels import resize_labels_nearest

        lab = self.processed(index) if processed is None else processed
        return resize_labels_nearest(lab, tuple(self.store.record(index).grid))


@dataclasses.dataclass
class MaskScan:
    """What one pass over the masks of some images found.

    Attributes
    ----------
    tokens : dict of int to ndarray (h, w) int64
        Token-grid masks by store index.
    valid_pixels : dict of int to int
        Labelled (not ignored) pixels of each image in the encoder's frame.
    max_label : int
        Largest label that is not the ignore index (−1 when every pixel is ignored).
    """

    tokens: dict
    valid_pixels: dict
    max_label: int


def scan_masks(source: MaskSource, indices: Sequence[int], *, ignore_index: int | None,
               num_classes: int | None = None, progress: ProgressCallback | None = None,
               task: str = "read masks") -> MaskScan:
    """Read the masks of ``indices`` once: token-grid masks, labelled-pixel counts, label range checks.

    Raises
    ------
    PosvitError
        A negative label, or a label ≥ ``num_classes`` that is not the ignore index (the file is named).
    """
    prog = report(progress)
    tokens, valid = {}, {}
    max_label = -1
    for n, i in enumerate(indices):
        lab = source.processed(i)
        hi, labelled = check_label_range(lab, source.files[i], num_classes, ignore_index)
        max_label = max(max_label, hi)
        tokens[i] = source.tokens(i, lab)
        valid[i] = labelled
        prog(task, n + 1, len(indices))
    return MaskScan(tokens, valid, max_label)


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


# --------------------------------------------------------------------------------------------------------------
# Training samples


def image_split(names: Sequence[str], fraction: float, seed: int, salt: int) -> tuple[list[int], list[int]]:
    """Split positions ``0..len(names)-1`` into (rest, held out): a seeded permutation of the *sorted* names.

    At least one item is held out and at least one kept (for two or more names). The split depends only on the
    set of names, the fraction and the seed, so stores of the same images in any order split alike.
    """
    n = len(names)
    if n < 2:
        return list(range(n)), []
    order = sorted(range(n), key=lambda i: (names[i], i))
    perm = np.random.default_rng([int(seed), int(salt)]).permutation(n)
    k = min(n - 1, max(1, int(round(n * fraction))))
    held = sorted(order[p] for p in perm[:k])
    rest = sorted(order[p] for p in perm[k:])
    return rest, held


def gather_samples(store, layer: str, source: MaskSource, scan: MaskScan, indices: Sequence[int], *,
                   ignore_index: int | None, resolution: str, max_samples: int, pixels_per_token: int, seed: int,
                   salt: int = 3, progress: ProgressCallback | None = None,
                   task: str = "gather tokens") -> tuple[np.ndarray, np.ndarray, dict]:
    """Labelled training samples of some images, in memory (float16), subsampled to at most ``max_samples``.

    ``tokens``: the labelled tokens (mask at the patch centre not ignored). ``pixels``: ``pixels_per_token ×
    tokens`` labelled pixels per image drawn uniformly in the encoder's frame, each with the bilinear interpolation
    of the token features at that pixel. Every image keeps the same fraction of its candidates (seeded per image,
    by the rank of its name), so the subsample is class-blind.

    Returns
    -------
    X : ndarray of float16, shape (n, C)
    y : ndarray of int64, shape (n,)
    info : dict
        ``available`` (candidates before subsampling), ``used``.
    """
    prog = report(progress)
    recs = store.records
    cand = {}
    for i in indices:
        if resolution == "tokens":
            t = scan.tokens[i]
            cand[i] = int(t.size if ignore_index is None else (t != ignore_index).sum())
        else:
            h, w = recs[i].grid
            cand[i] = min(scan.valid_pixels[i], pixels_per_token * h * w)
    available = sum(cand.values())
    frac = min(1.0, max_samples / available) if available else 0.0
    take = {i: (c if frac >= 1.0 else int(math.floor(c * frac))) for i, c in cand.items()}
    total = sum(take.values())
    C = int(store.features(indices[0], layer).shape[-1]) if indices else int(store.channels)
    X = np.empty((total, C), dtype=np.float16)
    y = np.empty(total, dtype=np.int64)
    rank = {i: k for k, i in enumerate(sorted(indices, key=lambda j: (recs[j].name, j)))}
    pos = 0
    for n_done, i in enumerate(indices):
        k = take[i]
        if k == 0:
            prog(task, n_done + 1, len(indices))
            continue
        rng = np.random.default_rng([int(seed), int(salt), rank[i]])
        f = store.features(i, layer, dtype=np.float32)
        if resolution == "tokens":
            t = scan.tokens[i].ravel()
            valid = np.flatnonzero(t != ignore_index) if ignore_index is not None else np.arange(t.size)
            pick = valid if k == len(valid) else np.sort(rng.choice(valid, size=k, replace=False))
            X[pos:pos + k] = f.reshape(-1, f.shape[-1])[pick]
            y[pos:pos + k] = t[pick]
        else:
            lab = source.processed(i)
            flat = lab.ravel()
            valid = np.flatnonzero(flat != ignore_index) if ignore_index is not None else np.arange(flat.size)
            n_draw = cand[i]
            pick = valid if n_draw == len(valid) else rng.choice(valid, size=n_draw, replace=False)
            if k < len(pick):
                pick = rng.choice(pick, size=k, replace=False)
            pick = np.sort(pick)
            H, W = lab.shape
            h, w = f.shape[:2]
            py, px = pick // W, pick % W
            y0, y1, ly = bilinear_taps(h, H)
            x0, x1, lx = bilinear_taps(w, W)
            a, b = ly[py][:, None], lx[px][:, None]
            X[pos:pos + k] = ((1 - a) * (1 - b) * f[y0[py], x0[px]] + (1 - a) * b * f[y0[py], x1[px]]
                              + a * (1 - b) * f[y1[py], x0[px]] + a * b * f[y1[py], x1[px]])
            y[pos:pos + k] = flat[pick]
        pos += k
        prog(task, n_done + 1, len(indices))
    if not np.isfinite(X).all():
        raise PosvitError(f"features of '{store.source}' contain NaN or inf (or overflow float16): re-extract them")
    return X, y, {"available": int(available), "used": int(total)}


# --------------------------------------------------------------------------------------------------------------
# Scoring


def score_store(head: AffineHead, store, layer: str, source: MaskSource, indices: Sequence[int], *,
                num_classes: int, ignore_index: int | None, resolution: str,
                token_masks: dict | None = None, feature_index: dict | None = None, device="cpu",
                progress: ProgressCallback | None = None, task: str = "score") -> np.ndarray:
    """The dataset-wide confusion matrix of a head on some images (rows: ground truth, columns: prediction).

    Parameters
    ----------
    head : AffineHead
    store : FeatureStore
        Where the features come from.
    layer : str
    source : MaskSource
        Masks, indexed like ``indices`` (the store of the masks may differ from ``store``: robustness stores
        reuse the masks of the untransformed images).
    indices : sequence of int
        Images to score (indices into ``source.store``).
    token_masks : dict, optional
        Token-grid masks already read (``MaskScan.tokens``).
    feature_index : dict, optional
        ``{mask image index: feature image index in store}`` when the two stores differ.
    device : str

    Returns
    -------
    ndarray of int64, shape (num_classes, num_classes)
    """
    import torch

    from posvit_cli.core.measure.metrics import confusion_matrix

    prog = report(progress)
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for n_done, i in enumerate(indices):
            j = feature_index[i] if feature_index is not None else i
            f = store.features(j, layer, dtype=np.float32)
            want = tuple(source.store.record(i).grid)
            if tuple(f.shape[:2]) != want:
                raise PosvitError(
                    f"image '{source.store.record(i).name}' has a {f.shape[0]}×{f.shape[1]} token grid in "
                    f"'{store.source}' but {want[0]}×{want[1]} with its masks: extract both at the same size"
                )
            if not np.isfinite(f).all():
                raise PosvitError(f"features of '{store.record(j).name}' in '{store.source}' contain NaN or inf")
            logits = head.logits(f, device)
            if resolution == "tokens":
                gt = token_masks[i] if token_masks is not None and i in token_masks else source.tokens(i)
                pred = logits.argmax(-1).cpu().numpy()
            else:
                gt = source.processed(i)
                pred = upsample_argmax(logits, gt.shape).cpu().numpy()
            conf += confusion_matrix(gt, pred, num_classes, ignore_index=ignore_index)
            prog(task, n_done + 1, len(indices))
    return conf


def scores_from_confusion(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """mIoU, IoU per class, pixel accuracy and counts from one confusion matrix.

    A class with an empty union (never in the ground truth, never predicted) has IoU ``None`` and is left out of
    the mean; a class predicted but absent from the ground truth scores 0 (its false positives count).
    """
    from posvit_cli.core.measure.metrics import iou_per_class

    conf = np.asarray(conf, dtype=np.int64)
    iou = iou_per_class(conf)
    scored = np.isfinite(iou)
    total = int(conf.sum())
    gt_count = conf.sum(1)
    return {
        "miou": float(iou[scored].mean()) if scored.any() else None,
        "pixel_accuracy": float(np.trace(conf) / total) if total else None,
        "iou_per_class": {name: (float(v) if np.isfinite(v) else None) for name, v in zip(class_names, iou)},
        "classes_scored": int(scored.sum()),
        "classes_absent": [name for name, c, s in zip(class_names, gt_count, scored) if c == 0 and not s],
        "pixels_scored": total,
        "pixels_per_class": {name: int(c) for name, c in zip(class_names, gt_count)},
        "confusion_matrix": conf.tolist(),
    }


# --------------------------------------------------------------------------------------------------------------
# Store compatibility


_MODEL_KEYS = ("model", "weights_sha256", "channels", "patch_size", "modifications")


def _debias_signature(prov: dict) -> list:
    out = []
    for d in prov.get("debias") or []:
        if isinstance(d, dict):
            out.append((d.get("method"), d.get("head_sha256"), d.get("channels_zeroed"), tuple(d.get("transforms") or ())))
        else:
            out.append(str(d))
    return out


def check_same_features(reference, other, what: str, *, same_preprocessing: bool = False) -> None:
    """Refuse a store whose features come from another model, weights or debiasing than ``reference``.

    Parameters
    ----------
    reference, other : FeatureStore
    what : str
        How to name ``other`` in the message (``validation store``).
    same_preprocessing : bool
        Also require the same resize and normalisation (robustness stores of the scored images).

    Raises
    ------
    PosvitError
        Naming the first difference.
    """
    a, b = reference.provenance, other.provenance
    for key in _MODEL_KEYS:
        va, vb = a.get(key), b.get(key)
        if key == "channels":
            va, vb = reference.channels or None, other.channels or None
        if (va or None) != (vb or None):
            show = (lambda v: (str(v)[:12] + "…") if key == "weights_sha256" and v else v)
            raise PosvitError(
                f"{what} '{other.source}' holds features of another model ({key} {show(vb)} vs {show(va)} in "
                f"'{reference.source}'): a head trained on one model's features cannot score another's"
            )
    if _debias_signature(a) != _debias_signature(b):
        raise PosvitError(
            f"{what} '{other.source}' was debiased differently from '{reference.source}' "
            "(provenance 'debias' differs): score features made the same way"
        )
    if same_preprocessing and (a.get("preprocessing") or {}) != (b.get("preprocessing") or {}):
        pa, pb = (a.get("preprocessing") or {}).get("size"), (b.get("preprocessing") or {}).get("size")
        raise PosvitError(
            f"{what} '{other.source}' was preprocessed differently from '{reference.source}' (size {pb} vs {pa}): "
            "extract it with the same --size and --intensity"
        )


def _store_summary(store) -> dict:
    prov = dict(store.provenance)
    return {
        "source": store.source,
        "format": store.format,
        "n_images": len(store),
        "channels": store.channels,
        "grids": {g.name: int(len(g.indices)) for g in store.groups},
        "model": prov.get("model"),
        "weights": prov.get("weights"),
        "weights_sha256": prov.get("weights_sha256"),
        "patch_size": prov.get("patch_size"),
        "preprocessing": prov.get("preprocessing"),
        "debias": prov.get("debias"),
        "transform": prov.get("transform"),
    }


def _names_index(store, what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for r in store.records:
        if r.name in index:
            raise PosvitError(f"{what} '{store.source}' holds two images with the stem '{r.name}': masks and "
                              "transformed copies are matched by stem, so stems must be unique")
        index[r.name] = r.index
    return index


# --------------------------------------------------------------------------------------------------------------
# The whole probe


def semantic_probe(
    train_store,
    masks: str,
    settings: SemanticSettings,
    *,
    val_store=None,
    val_masks: str | None = None,
    robustness: Sequence = (),
    num_classes: int | None = None,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
    layer: str | None = None,
    device: str = "cpu",
    threads: int | None = 1,
    keep_head: bool = False,
    progress: ProgressCallback | None = None,
) -> dict:
    """Train a linear head on one store's features and masks; score it on a validation store (and transforms).

    Parameters
    ----------
    train_store : FeatureStore
    masks : str
        Mask folder of the training images (matched by stem).
    settings : SemanticSettings
    val_store : FeatureStore, optional
        Scored images. Without it, ``settings.test_fraction`` of the training store's images are held out and
        scored instead.
    val_masks : str, optional
        Mask folder of the validation images (default: ``masks``).
    robustness : sequence of FeatureStore
        Stores of the scored images extracted with ``posvit extract --transform`` (mapped back to the original
        frame). Each is scored with the same head; its transform is read from its provenance.
    num_classes : int, optional
        Default: the largest label in the masks + 1 (or ``len(class_names)``).
    ignore_index : int or None
    class_names : sequence of str, optional
    layer : str, optional
        Default: the training store's default layer.
    device : str
    threads : int or None
        Torch intra-op threads (None: torch's setting). One by default: the head's products are small, and
        on shared or oversubscribed cores intra-op threads made its training 25× slower here.
    keep_head : bool
        Also return the trained :class:`AffineHead` under ``"head"`` (not JSON; for library use).

    Returns
    -------
    dict
        The result document (schema ``posvit-semantic-probe-result``, ``docs/semantic-results.md``).

    Raises
    ------
    PosvitError
        For missing masks, labels ≥ ``num_classes``, stores of another model, too few images, robustness stores
        lacking scored images or with other grids.
    """
    from posvit_cli.core.measure.probe import torch_threads

    with torch_threads(threads):
        doc, head = _semantic_probe(train_store, masks, settings.validated(), val_store, val_masks, robustness,
                                    num_classes, ignore_index, class_names, layer, device, report(progress))
    if keep_head:
        doc["head"] = head
    return doc


def _semantic_probe(train_store, masks, settings, val_store, val_masks, robustness, num_classes, ignore_index,
                    class_names, layer, device, prog) -> tuple[dict, AffineHead]:
    from posvit_cli import __version__

    t_start = time.perf_counter()
    for st, what in ((train_store, "training store"), (val_store, "validation store")):
        if st is None:
            continue
        if len(st) == 0:
            raise PosvitError(f"{what} '{st.source}' holds no images")
        if not st.layers:
            raise PosvitError(f"{what} '{st.source}' holds no feature layers (a maps-only store): probe a feature store")
    layer = train_store.check_layer(layer)
    if val_store is not None:
        check_same_features(train_store, val_store, "validation store")
        val_store.check_layer(layer)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes is not None and len(class_names) != num_classes:
            raise PosvitError(f"{len(class_names)} class names given for --num-classes {num_classes}")
        num_classes = len(class_names)
    if num_classes is not None and num_classes < 2:
        raise PosvitError(f"--num-classes must be at least 2, got {num_classes}")

    train_source = MaskSource(train_store, masks)
    names = [r.name for r in train_store.records]
    if val_store is None:
        fit_pool, scored = image_split(names, settings.test_fraction, settings.seed, salt=0)
        if not scored:
            raise PosvitError(f"'{train_store.source}' holds 1 image: hold-out scoring needs at least 2 "
                              "(or give a validation store with --val)")
        score_store_, score_source = train_store, train_source
        scored_on = f"held-out {len(scored)} of {len(names)} images of the training store (--test-fraction)"
    else:
        fit_pool = list(range(len(train_store)))
        score_source = MaskSource(val_store, val_masks or masks)
        score_store_ = val_store
        scored = list(range(len(val_store)))
        scored_on = "the validation store"
    use_stop = settings.head == "linear" and settings.patience > 0
    if use_stop:
        fit, stop = image_split([names[i] for i in fit_pool], settings.holdout_fraction, settings.seed, salt=1)
        fit, stop = [fit_pool[i] for i in fit], [fit_pool[i] for i in stop]
        if not stop:
            raise PosvitError(
                f"early stopping needs at least 2 training images ({len(fit_pool)} available): add images or "
                "pass --patience 0"
            )
    else:
        fit, stop = list(fit_pool), []

    # One pass over every mask: label range, token-grid masks, labelled-pixel counts.
    train_scan = scan_masks(train_source, sorted(set(fit) | set(stop) | (set(scored) if val_store is None else set())),
                            ignore_index=ignore_index, num_classes=num_classes, progress=prog)
    max_label = train_scan.max_label
    if val_store is not None:
        score_scan = scan_masks(score_source, scored, ignore_index=ignore_index, num_classes=num_classes,
                                progress=prog, task="read validation masks")
        max_label = max(max_label, score_scan.max_label)
    else:
        score_scan = train_scan
    if num_classes is None:
        num_classes = max_label + 1
        if num_classes < 2:
            raise PosvitError(f"the masks hold {max(num_classes, 0)} class(es): a semantic probe needs at least 2 "
                              f"(every pixel is label 0 or the ignore index {ignore_index}?)")
    class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]

    X, y, info = gather_samples(train_store, layer, train_source, train_scan, fit, ignore_index=ignore_index,
                                resolution=settings.resolution, max_samples=settings.max_train_tokens,
                                pixels_per_token=settings.pixels_per_token, seed=settings.seed, progress=prog)
    if len(y) == 0:
        raise PosvitError("no labelled training tokens: every mask pixel of the training images is ignored")
    present = np.bincount(y, minlength=num_classes)
    notes = []
    missing_train = [class_names[c] for c in range(num_classes) if present[c] == 0]
    if missing_train:
        notes.append(f"classes never seen in training: {', '.join(missing_train)}")
    X_stop = y_stop = None
    if stop:
        X_stop, y_stop, _ = gather_samples(
            train_store, layer, train_source, train_scan, stop, ignore_index=ignore_index,
            resolution=settings.resolution, max_samples=max(2, settings.max_train_tokens // 4),
            pixels_per_token=settings.pixels_per_token, seed=settings.seed, salt=4, progress=prog,
            task="gather early-stopping tokens")
    t_fit = time.perf_counter()
    if settings.head == "linear":
        head, log = train_linear_head(X, y, X_stop, y_stop, num_classes, settings, device=device, progress=prog)
    else:
        head = fit_ridge_head(X, y, num_classes, settings.alpha, device=device)
        log = {"epochs_run": 0, "best_epoch": None, "stopped_early": False, "train_loss": [], "stop_loss": []}
    log["seconds"] = round(time.perf_counter() - t_fit, 3)
    log["samples"] = info
    log["sample_kind"] = "tokens" if settings.resolution == "tokens" else "pixels (bilinear features)"
    del X, y, X_stop, y_stop

    conf = score_store(head, score_store_, layer, score_source, scored, num_classes=num_classes,
                       ignore_index=ignore_index, resolution=settings.resolution, token_masks=score_scan.tokens,
                       device=device, progress=prog)
    results = scores_from_confusion(conf, class_names)

    rob = []
    if robustness:
        base_names = {score_store_.record(i).name: i for i in scored}
        rob.append({"transform": "identity", "store": score_store_.source, **_brief(results), "delta_miou": 0.0})
        for tstore in robustness:
            check_same_features(score_store_, tstore, "transformed store", same_preprocessing=True)
            tstore.check_layer(layer)
            spec = tstore.provenance.get("transform") or "identity"
            index = _names_index(tstore, "transformed store")
            lacking = [n for n in base_names if n not in index]
            if lacking:
                shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
                raise PosvitError(f"transformed store '{tstore.source}' lacks {len(lacking)} scored image(s): {shown} "
                                  "(extract the same images with --transform)")
            fmap = {i: index[n] for n, i in base_names.items()}
            tconf = score_store(head, tstore, layer, score_source, scored, num_classes=num_classes,
                                ignore_index=ignore_index, resolution=settings.resolution,
                                token_masks=score_scan.tokens, feature_index=fmap, device=device, progress=prog,
                                task=f"score {spec}")
            tres = scores_from_confusion(tconf, class_names)
            delta = None if tres["miou"] is None or results["miou"] is None else tres["miou"] - results["miou"]
            rob.append({"transform": spec, "store": tstore.source, **_brief(tres), "delta_miou": delta,
                        "iou_per_class": tres["iou_per_class"]})

    all_resized = sorted(set(train_source.resized) | set(score_source.resized))
    if all_resized:
        notes.append(f"{len(all_resized)} mask(s) had another size than their image and were resized (nearest)")
    return {
        "schema": SEMANTIC_SCHEMA,
        "schema_version": SEMANTIC_SCHEMA_VERSION,
        "posvit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "store": {"train": _store_summary(train_store),
                  "val": _store_summary(val_store) if val_store is not None else None},
        "layer": layer,
        "masks": {
            "train": train_source.mask_dir,
            "val": score_source.mask_dir,
            "num_classes": int(num_classes),
            "ignore_index": ignore_index,
            "class_names": class_names,
            "resized": all_resized,
        },
        "settings": settings.as_dict(),
        "split": {
            "scored_on": scored_on,
            "fit_images": [train_store.record(i).name for i in fit],
            "early_stopping_images": [train_store.record(i).name for i in stop],
            "scored_images": [score_store_.record(i).name for i in scored],
        },
        "training": log,
        "results": results,
        "robustness": rob,
        "seconds": round(time.perf_counter() - t_start, 3),
        "notes": notes,
    }, head


def _brief(res: dict) -> dict[str, Any]:
    return {"miou": res["miou"], "pixel_accuracy": res["pixel_accuracy"], "pixels_scored": res["pixels_scored"]}


def read_semantic_result(path) -> dict:
    """Read a result written by ``posvit probe --masks ... -o FILE``.

    Raises
    ------
    PosvitError
        If the file is missing, is not JSON or is not a semantic probe result of a readable version.
    """
    from posvit_cli.core.fileio import read_tagged_json

    return read_tagged_json(path, SEMANTIC_SCHEMA, SEMANTIC_SCHEMA_VERSION, "semantic probe result")

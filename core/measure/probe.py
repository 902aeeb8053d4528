"""Positional linear probes: how much of a token's grid position is linearly decodable from its features.

Targets are ramps on the ``h × w`` token grid scaled to [0, 1] (:func:`ramp_targets`): ``lr`` (x), ``ud`` (y),
``diag``, ``radial`` (1 at the centre), the joint ``xy`` (x and y together, scored as the mean of the two R²) and
two controls, ``random`` (uniform noise, a fresh draw per fit: must score about 0 or below) and ``raster``
(row-major token index). For every image, a linear regressor is fitted on a sample of its tokens after
standardising each channel on those tokens, and R² is measured on the other tokens (``protocol="holdout"``,
the default) or on all tokens (``protocol="dino-saw"``, the published setting of "What DINO saw", whose
training tokens are part of its evaluation set).

Everything is closed form and batched: for one image, all repeats (fresh sampling masks), all targets and, for
the per-channel scores, all channels are solved at once with a handful of float64 matrix products (torch). The
stack regressor uses the dual (kernel) form of ridge when there are fewer training tokens than channels, the
primal form otherwise; ordinary least squares is the minimum-norm solution (``gelsd``), as scikit-learn's
``LinearRegression`` gives.

Dataset level (:func:`probe_dataset`, :func:`probe_store`): mean ± std over images × repeats, per layer, the
per-channel R² of every channel for every target, the most positional channels (top-k per ramp of the
dataset-mean per-channel R² and their union), the RMSE of a 2-D coordinate regressor in patch units and the
accuracy of a linear classifier of the exact token index. :func:`write_probe_result`,
:func:`read_probe_result` and :func:`positional_channels` let other commands read results back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import json_text, read_tagged_json, write_text_atomic
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "CONTROL_TARGETS",
    "POSITIONAL_RAMPS",
    "PROBE_SCHEMA",
    "PROTOCOLS",
    "RAMP_TARGETS",
    "ImageProbe",
    "ProbeSettings",
    "SamplingPlan",
    "channel_r2_table",
    "check_targets",
    "fingerprint",
    "make_settings",
    "positional_channels",
    "probe_dataset",
    "probe_image",
    "probe_result_json",
    "probe_store",
    "ramp_targets",
    "read_probe_result",
    "sampling_plan",
    "stack_r2",
    "torch_threads",
    "write_channel_csv",
    "write_probe_result",
]

#: Ramp targets in the order reports list them; ``xy`` is the joint 2-output (x, y) target.
RAMP_TARGETS = ("lr", "ud", "diag", "radial", "xy")
#: Targets that carry no position (``random``) or an artificial one (``raster``): the nulls of a report.
CONTROL_TARGETS = ("random", "raster")
#: Single-output ramps whose top channels define "the most positional channels".
POSITIONAL_RAMPS = ("lr", "ud", "diag", "radial")
ALL_TARGETS = RAMP_TARGETS + CONTROL_TARGETS
SAMPLINGS = ("random", "grid", "grid-holdout")
PROTOCOLS = ("holdout", "dino-saw")
REGRESSORS = ("ridge", "ols")
PROBE_SCHEMA = "posvit-probe-result"
PROBE_SCHEMA_VERSION = 1

# Columns of the per-mask target matrix; ``xy`` is the pair (lr, ud) fitted on its own mask.
_COLUMNS = ("lr", "ud", "diag", "radial", "random", "raster")
_TARGET_COLUMNS = {
    "lr": (0,), "ud": (1,), "diag": (2,), "radial": (3,), "xy": (0, 1), "random": (4,), "raster": (5,),
}
# The published setting ("What DINO saw", Table 1): step-6 random masks, ridge alpha 1, 6 repeats, numpy seed.
_DINO_SAW = {"sampling": "random", "fraction": 1 / 36, "step": 6, "repeats": 6, "alpha": 1.0, "regressor": "ridge",
             "seed": 100001}
_DEFAULT_CUTOFF = {"random": 1.0, "grid": 1.0, "grid-holdout": 0.7}


# --------------------------------------------------------------------------------------------------------------
# Targets


def ramp_targets(h: int, w: int, names=RAMP_TARGETS, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Positional targets on an ``h × w`` token grid, each in [0, 1].

    Parameters
    ----------
    h, w : int
        Grid rows and columns (each ≥ 2 along at least one axis).
    names : sequence of str
        ``lr`` = x/(w−1), ``ud`` = y/(h−1), ``diag`` = mean of per-axis ``linspace(0, 1, max(h, w))`` ramps
        (so below 1 at the far corner of non-square grids), ``radial`` = 1 − ρ/ρmax with ρ the distance to
        ``(h//2, w//2)``, ``xy`` = ``lr`` and ``ud`` stacked (shape ``(h, w, 2)``), ``random`` = U(0, 1) noise,
        ``raster`` = row-major index / (h·w).
    rng : numpy Generator, optional
        Source of the ``random`` target.

    Returns
    -------
    dict of str to ndarray, shape (h, w) or (h, w, 2) for ``xy``

    Raises
    ------
    PosvitError
        For a 1×1 grid or an unknown target name.
    """
    if h * w < 2:
        raise PosvitError(f"a {h}×{w} token grid has no positions to probe (need at least 2 tokens)")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    lr = xs / (w - 1) if w > 1 else np.zeros_like(xs)
    ud = ys / (h - 1) if h > 1 else np.zeros_like(ys)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "lr":
            out[name] = lr
        elif name == "ud":
            out[name] = ud
        elif name == "diag":
            a = np.linspace(0.0, 1.0, max(h, w))
            out[name] = (a[:h][:, None] + a[:w][None, :]) / 2.0
        elif name == "radial":
            rho = np.hypot(ys - h // 2, xs - w // 2)
            out[name] = 1.0 - rho / rho.max()
        elif name == "xy":
            out[name] = np.stack([lr, ud], axis=-1)
        elif name == "random":
            out[name] = (rng or np.random.default_rng(0)).random((h, w))
        elif name == "raster":
            out[name] = np.arange(h * w, dtype=np.float64).reshape(h, w) / (h * w)
        else:
            raise PosvitError(f"unknown target '{name}': use {', '.join(ALL_TARGETS)}")
    return out


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Validate target names (order kept, duplicates dropped).

    Raises
    ------
    PosvitError
        For an unknown name or an empty list.
    """
    out: list[str] = []
    for t in targets:
        t = str(t).strip()
        if t not in _TARGET_COLUMNS:
            raise PosvitError(f"unknown target '{t}': use {', '.join(ALL_TARGETS)}")
        if t not in out:
            out.append(t)
    if not out:
        raise PosvitError(f"no targets to probe: name some of {', '.join(ALL_TARGETS)}")
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """How to probe. Build with :func:`make_settings` to get a protocol's defaults and validation.

    Attributes
    ----------
    targets : tuple of str
        Targets to score (see :func:`ramp_targets`).
    protocol : {"holdout", "dino-saw"}
        ``holdout``: R² on tokens not used for training; one sampling mask per repeat shared by all targets (a
        centred box for ``radial`` when ``cutoff < 1``). ``dino-saw``: the published setting: R² over *all* tokens
        (training tokens included), an independent mask per target and repeat, grid masks at offset 0.
    sampling : {"random", "grid", "grid-holdout"}
        ``random``: ⌊area · fraction⌋ tokens of the sampling region, uniformly without replacement. ``grid``:
        every ``step``-th row and column of the region (random offset per repeat under ``holdout``, offset 0
        under ``dino-saw``). ``grid-holdout``: ``grid`` inside the top-left ``cutoff`` box (a centred box for
        ``radial``); under ``holdout`` R² is measured on the tokens outside the box (extrapolation).
    fraction : float
        Fraction of the region's tokens used for training by ``random`` sampling (1/36 as published).
    step : int
        Grid spacing in tokens for ``grid`` and ``grid-holdout``.
    cutoff : float
        Side fraction of the sampling region (1 = whole grid).
    repeats : int
        Fresh sampling masks per image.
    alpha : float
        Ridge strength on per-channel standardised features (ignored by ``ols``).
    regressor : {"ridge", "ols"}
    seed : int
        Masks and the ``random`` target of image ``i`` come from ``numpy.random.default_rng([seed, i])``.
    per_channel : bool
        Also score each channel alone.
    top_k : int
        Channels kept per ramp as "most positional".
    extras : bool
        Also measure the 2-D coordinate RMSE and the token-index classifier accuracy.
    """

    targets: tuple[str, ...] = ALL_TARGETS
    protocol: str = "holdout"
    sampling: str = "random"
    fraction: float = 1 / 36
    step: int = 6
    cutoff: float = 1.0
    repeats: int = 6
    alpha: float = 1.0
    regressor: str = "ridge"
    seed: int = 0
    per_channel: bool = True
    top_k: int = 2
    extras: bool = True

    def validated(self) -> ProbeSettings:
        """Return self after checking every field (raises :class:`PosvitError` naming the bad option)."""
        check_targets(self.targets)
        if self.protocol not in PROTOCOLS:
            raise PosvitError(f"unknown protocol '{self.protocol}': use {' or '.join(PROTOCOLS)}")
        if self.sampling not in SAMPLINGS:
            raise PosvitError(f"unknown sampling '{self.sampling}': use {', '.join(SAMPLINGS)}")
        if self.regressor not in REGRESSORS:
            raise PosvitError(f"unknown regressor '{self.regressor}': use {' or '.join(REGRESSORS)}")
        if not (0.0 < self.fraction < 1.0):
            raise PosvitError(f"--fraction must be between 0 and 1 (exclusive), got {self.fraction}")
        if self.step < 1:
            raise PosvitError(f"--step must be at least 1, got {self.step}")
        if not (0.0 < self.cutoff <= 1.0):
            raise PosvitError(f"--cutoff must be in (0, 1], got {self.cutoff}")
        if self.sampling == "grid-holdout" and self.cutoff >= 1.0 and self.protocol == "holdout":
            raise PosvitError("grid-holdout needs --cutoff below 1: the tokens outside the box are the test set")
        if self.repeats < 1:
            raise PosvitError(f"--repeats must be at least 1, got {self.repeats}")
        if self.regressor == "ridge" and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise PosvitError(f"ridge needs --alpha > 0, got {self.alpha} (use --regressor ols for no penalty)")
        if self.top_k < 1:
            raise PosvitError(f"--top-k must be at least 1, got {self.top_k}")
        return self

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["evaluated_on"] = "all tokens" if self.protocol == "dino-saw" else (
            "tokens outside the sampling box" if self.sampling == "grid-holdout" else "held-out tokens"
        )
        d["standardisation"] = "per image and fit, each channel z-scored on its training tokens"
        d["masks"] = "one per target and repeat" if self.protocol == "dino-saw" else "one per repeat, shared by targets"
        return d


def make_settings(protocol: str = "holdout", **overrides: Any) -> tuple[ProbeSettings, list[str]]:
    """Settings of a protocol, with explicit overrides (``None`` values mean "the protocol's default").

    Parameters
    ----------
    protocol : {"holdout", "dino-saw"}
    **overrides
        Any :class:`ProbeSettings` field.

    Returns
    -------
    settings : ProbeSettings
        Validated.
    deviations : list of str
        For ``dino-saw``: the overrides that depart from the published setting (empty when faithful).
    """
    if protocol not in PROTOCOLS:
        raise PosvitError(f"unknown protocol '{protocol}': use {' or '.join(PROTOCOLS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(ProbeSettings)}
    if unknown:
        raise TypeError(f"unknown probe settings {sorted(unknown)}")
    base: dict[str, Any] = dict(_DINO_SAW) if protocol == "dino-saw" else {}
    deviations = []
    if protocol == "dino-saw":
        for k, v in given.items():
            if k in _DINO_SAW and k not in ("sampling", "seed") and v != _DINO_SAW[k]:
                deviations.append(f"{k}={v} (published: {_DINO_SAW[k]:.6g})" if isinstance(v, float)
                                  else f"{k}={v} (published: {_DINO_SAW[k]})")
    base.update(given)
    if protocol == "dino-saw" and "step" in given and "fraction" not in given:
        # The published random masks draw ⌊area / step²⌋ tokens: the step sets the fraction.
        base["fraction"] = 1.0 / float(given["step"]) ** 2
    if "targets" in base:
        base["targets"] = check_targets(base["targets"])
    if "cutoff" not in base:
        base["cutoff"] = _DEFAULT_CUTOFF.get(base.get("sampling", "random"), 1.0)
    elif protocol == "dino-saw":
        published = _DEFAULT_CUTOFF.get(base.get("sampling", "random"))
        if published is not None and base["cutoff"] != published:
            deviations.append(f"cutoff={base['cutoff']} (published: {published})")
    return ProbeSettings(protocol=protocol, **base).validated(), deviations


# --------------------------------------------------------------------------------------------------------------
# Sampling masks


@dataclasses.dataclass
class SamplingPlan:
    """The fits of one image: training and evaluation masks and which targets each mask serves.

    Attributes
    ----------
    grid : (h, w)
    train : ndarray of bool, shape (M, h·w)
        Training tokens of each mask (row-major token order).
    evaluate : ndarray of bool, shape (M, h·w)
        Tokens on which R² is measured.
    mask_of : dict of str to ndarray of int, shape (repeats,)
        For every target (and ``"xy"``, always present for the coordinate RMSE), the mask index of each repeat.
    targets : ndarray of float64, shape (M, h·w, 6)
        Columns ``lr, ud, diag, radial, random, raster`` for each mask (``random`` is drawn per mask).
    """

    grid: tuple[int, int]
    train: np.ndarray
    evaluate: np.ndarray
    mask_of: dict[str, np.ndarray]
    targets: np.ndarray


def _region(h: int, w: int, cutoff: float, centred: bool) -> tuple[int, int, int, int]:
    rh, rw = int(h * cutoff), int(w * cutoff)
    if centred:  # the published radial region: a centred box of the same side fraction
        y0, y1 = math.ceil((h - rh) / 2), math.floor((h + rh) / 2)
        x0, x1 = math.ceil((w - rw) / 2), math.floor((w + rw) / 2)
        return y0, y1, x0, x1
    return 0, rh, 0, rw


def _one_mask(h, w, settings: ProbeSettings, rng: np.random.Generator, centred: bool):
    y0, y1, x0, x1 = _region(h, w, settings.cutoff, centred)
    region = np.zeros((h, w), bool)
    region[y0:y1, x0:x1] = True
    train = np.zeros((h, w), bool)
    rh, rw = y1 - y0, x1 - x0
    if settings.sampling == "random":
        area = rh * rw
        # The small epsilon keeps area·(1/36) = k − 1e-16 from flooring to k − 1 when area = 36k.
        n = int(math.floor(area * settings.fraction + 1e-9))
        if n >= 1:
            flat = np.zeros(area, bool)
            flat[rng.choice(area, size=n, replace=False)] = True
            train[y0:y1, x0:x1] = flat.reshape(rh, rw)
    else:
        s = settings.step
        if settings.protocol == "dino-saw":
            oy = ox = 0
        else:  # a fresh offset per repeat so that repeats of a grid probe differ
            oy, ox = int(rng.integers(min(s, max(rh, 1)))), int(rng.integers(min(s, max(rw, 1))))
        train[y0 + oy:y1:s, x0 + ox:x1:s] = True
    if settings.protocol == "dino-saw":
        evaluate = np.ones((h, w), bool)
    elif settings.sampling == "grid-holdout":
        evaluate = ~region
    else:
        evaluate = ~train
    return train.ravel(), evaluate.ravel()


def sampling_plan(grid: tuple[int, int], settings: ProbeSettings, rng: np.random.Generator) -> SamplingPlan:
    """Draw the masks and the ``random`` targets of one image.

    Parameters
    ----------
    grid : (h, w)
        Token grid.
    settings : ProbeSettings
    rng : numpy Generator
        Consumed in a fixed order (repeat by repeat, then target by target), so a seed fixes every number.

    Returns
    -------
    SamplingPlan

    Raises
    ------
    PosvitError
        When a mask holds fewer than 2 training tokens or fewer than 2 evaluation tokens.
    """
    h, w = int(grid[0]), int(grid[1])
    if h * w < 2:
        raise PosvitError(f"a {h}×{w} token grid has no positions to probe (need at least 2 tokens)")
    roles = list(settings.targets)
    if "xy" not in roles:
        roles.append("xy")  # the coordinate RMSE comes from the xy fit
    trains, evals = [], []
    mask_of: dict[str, list[int]] = {t: [] for t in roles}
    shared_centred = settings.cutoff < 1.0
    for _ in range(settings.repeats):
        if settings.protocol == "dino-saw":
            for t in roles:
                tr, ev = _one_mask(h, w, settings, rng, centred=(t == "radial"))
                mask_of[t].append(len(trains))
                trains.append(tr)
                evals.append(ev)
        else:
            tr, ev = _one_mask(h, w, settings, rng, centred=False)
            plain = len(trains)
            trains.append(tr)
            evals.append(ev)
            centred_index = plain
            if shared_centred and "radial" in roles:
                tr, ev = _one_mask(h, w, settings, rng, centred=True)
                centred_index = len(trains)
                trains.append(tr)
                evals.append(ev)
            for t in roles:
                mask_of[t].append(centred_index if t == "radial" else plain)
    train = np.stack(trains)
    evaluate = np.stack(evals)
    n_train, n_eval = train.sum(1), evaluate.sum(1)
    if n_train.min() < 2:
        how = (f"--fraction {settings.fraction:.4g}" if settings.sampling == "random"
               else f"--step {settings.step} and --cutoff {settings.cutoff:g}")
        raise PosvitError(
            f"a {h}×{w} token grid gives {int(n_train.min())} training token(s) with {how}: "
            "raise --fraction (or lower --step, raise --cutoff)"
        )
    if n_eval.min() < 2:
        raise PosvitError(f"a {h}×{w} token grid leaves {int(n_eval.min())} evaluation token(s): lower --fraction or --cutoff")
    base = ramp_targets(h, w, ("lr", "ud", "diag", "radial", "raster"))
    fixed = np.stack([base[c].ravel() for c in ("lr", "ud", "diag", "radial")], axis=-1)
    raster = base["raster"].ravel()
    m = len(trains)
    noise = rng.random((m, h * w))
    targets = np.empty((m, h * w, len(_COLUMNS)))
    targets[:, :, :4] = fixed[None]
    targets[:, :, 4] = noise
    targets[:, :, 5] = raster[None]
    return SamplingPlan((h, w), train, evaluate, {t: np.asarray(v) for t, v in mask_of.items()}, targets)


# --------------------------------------------------------------------------------------------------------------
# The batched engine


def _torch():
    import torch

    return torch


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run a block with ``threads`` torch intra-op threads (None: leave torch's setting), then restore it.

    The per-image solves of a probe are small: intra-op threads gain little on them and, on shared or
    oversubscribed cores, their synchronisation can make a probe ten times slower. The probe therefore runs
    single-threaded by default.
    """
    torch = _torch()
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _scale_of(var, mean, n):
    """Standard deviations with constant channels set to 1, as scikit-learn's StandardScaler does."""
    torch = _torch()
    eps = torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return torch.where(constant, torch.ones_like(var), var.sqrt())


def _stack_weights(Xc, train_idx, Y, alpha: float, regressor: str):
    """Whole-stack regressors for a group of masks with equal training size, as weights on the raw features.

    Parameters
    ----------
    Xc : tensor (N, C), float64
        One image's tokens, centred per channel over the image (R² is invariant to that shift; it keeps the
        float64 variance arithmetic well conditioned).
    train_idx : tensor of int64, shape (M, n)
        Training tokens of each mask.
    Y : tensor (M, N, T)
        Targets of each mask.

    Returns
    -------
    weights : tensor (M, C, T)
    offset : tensor (M, 1, T)
        Predictions for every token are ``Xc @ weights + offset``: the standardisation (with the training
        tokens' mean and std) is folded into the weights, so all masks share one product with ``Xc``.
    """
    torch = _torch()
    M, n = train_idx.shape
    C = Xc.shape[1]
    Xt = Xc[train_idx]                                                     # (M, n, C)
    mu = Xt.mean(1, keepdim=True)                                          # (M, 1, C)
    var = ((Xt - mu) ** 2).mean(1, keepdim=True)
    scale = _scale_of(var, mu, n)
    Zt = (Xt - mu) / scale                                                 # standardised training tokens
    Yt = torch.gather(Y, 1, train_idx[:, :, None].expand(-1, -1, Y.shape[2]))
    ybar = Yt.mean(1, keepdim=True)
    Yc = Yt - ybar
    like = dict(dtype=Xc.dtype, device=Xc.device)
    if regressor == "ridge" and n < C:
        # Dual form: w = Zᵀ (Z Zᵀ + αI)⁻¹ y, an n × n system instead of C × C.
        K = Zt @ Zt.mT + alpha * torch.eye(n, **like)
        W = Zt.mT @ torch.cholesky_solve(Yc, torch.linalg.cholesky(K))   # (M, C, T)
    elif regressor == "ridge":
        G = Zt.mT @ Zt + alpha * torch.eye(C, **like)
        W = torch.cholesky_solve(Zt.mT @ Yc, torch.linalg.cholesky(G))
    elif Xc.device.type == "cpu":
        # Minimum-norm least squares (SVD-based), the solution scikit-learn's LinearRegression returns.
        W = torch.linalg.lstsq(Zt, Yc, driver="gelsd").solution
    else:
        W = torch.linalg.pinv(Zt) @ Yc
    Wx = W / scale.mT                                                      # weights on centred raw features
    return Wx, ybar - mu @ Wx


def _channel_r2_dense(Xc, X2, T, E, y, rows_mask, alpha: float):
    """Per-channel R² for arbitrary training and evaluation masks (dense mask products).

    Parameters
    ----------
    Xc, X2 : tensor (N, C)
        Centred tokens and their squares.
    T, E : tensor (M, N), float64
        Training and evaluation indicators of each mask.
    y : tensor (R, N)
        Target of each fit; fit ``r`` uses mask ``rows_mask[r]``.

    Returns
    -------
    tensor (R, C)
    """
    n = T.sum(1)
    S1, S2 = T @ Xc, T @ X2                                                # (M, C)
    Tr, Er = T[rows_mask], E[rows_mask]
    ty = (Tr * y).sum(1)
    txy = (Tr * y) @ Xc
    nE = E.sum(1)[rows_mask]
    ey, ey2, eyx = (Er * y).sum(1), (Er * y * y).sum(1), (Er * y) @ Xc
    e1, e2 = (E @ Xc)[rows_mask], (E @ X2)[rows_mask]
    return _channel_r2_from_sums(n, S1, S2, rows_mask, ty, txy, nE, ey, ey2, eyx, e1, e2, alpha)


def _channel_r2_from_sums(n, S1, S2, rows_mask, ty, txy, nE, ey, ey2, eyx, e1, e2, alpha):
    """Closed-form R² of every 1-D ridge fit (one standardised channel, with intercept) from masked sums.

    With z = (x − μ)/σ on the training tokens, Σ_train z² = n·var/σ² (= n unless the channel is constant) and
    the slope is w = Σ_train z (y − ȳ) / (Σ_train z² + α). The evaluation residual Σ_E (y − ȳ − w z)² expands
    into Σ_E y², Σ_E y, Σ_E x y, Σ_E x, Σ_E x², so every channel of every fit comes from a few matrix
    products. Row quantities (``ty`` = Σ_T y, ``txy`` = Σ_T x y, ``nE``, ``ey`` = Σ_E y, ``ey2``, ``eyx``,
    ``e1`` = Σ_E x, ``e2`` = Σ_E x²) are per fit; ``n``, ``S1``, ``S2`` per mask.
    """
    torch = _torch()
    mu = S1 / n[:, None]
    var = torch.clamp(S2 / n[:, None] - mu ** 2, min=0.0)
    scale = _scale_of(var, mu, n[:, None])
    zz_train = (n[:, None] * var / scale ** 2)[rows_mask]                  # Σ_train z²
    mu_r, s_r, n_r = mu[rows_mask], scale[rows_mask], n[rows_mask]
    ybar = ty / n_r
    sxy = txy - ybar[:, None] * S1[rows_mask]                              # Σ_train (y − ȳ) x
    w = sxy / s_r / (zz_train + alpha)
    if alpha == 0:  # least squares on a constant channel: no slope, as scikit-learn gives
        w = torch.where(zz_train > 0, w, torch.zeros_like(w))
    q = ey - nE * ybar                                                     # Σ_eval (y − ȳ)
    yz_eval = (eyx - ybar[:, None] * e1 - mu_r * q[:, None]) / s_r         # Σ_eval (y − ȳ) z
    yy_eval = ey2 - 2 * ybar * ey + nE * ybar ** 2                         # Σ_eval (y − ȳ)²
    zz_eval = (e2 - 2 * mu_r * e1 + nE[:, None] * mu_r ** 2) / s_r ** 2    # Σ_eval z²
    sse = yy_eval[:, None] - 2 * w * yz_eval + w ** 2 * zz_eval
    sst = ey2 - ey ** 2 / nE
    tiny = sst <= 1e-12 * torch.clamp(ey2, min=1e-300)
    r2 = 1.0 - sse / torch.where(tiny, torch.ones_like(sst), sst)[:, None]
    return torch.where(tiny[:, None], torch.full_like(r2, float("nan")), r2)


@dataclasses.dataclass
class ImageProbe:
    """Scores of one image (one layer).

    Attributes
    ----------
    stack : dict of str to ndarray, shape (repeats,)
        Whole-stack R² per target and repeat (``xy``: mean of the x and y R²).
    channel : dict of str to ndarray, shape (repeats, C)
        Per-channel R² per target (empty when ``per_channel`` is off).
    coordinate_rmse : ndarray, shape (repeats,)
        RMSE of the (row, col) prediction of the xy fit on its evaluation tokens, in patches, per coordinate
        (√ of the mean over tokens and both coordinates, the quantity RASA's MSE loss averages).
    coordinate_rmse_chance : ndarray, shape (repeats,)
        The same for a constant prediction (the training mean): the no-information level.
    """

    stack: dict[str, np.ndarray]
    channel: dict[str, np.ndarray]
    coordinate_rmse: np.ndarray
    coordinate_rmse_chance: np.ndarray


def probe_image(
    features: np.ndarray,
    settings: ProbeSettings,
    plan: SamplingPlan | None = None,
    *,
    rng: np.random.Generator | None = None,
    device: str = "cpu",
) -> ImageProbe:
    """Probe one image: every target, repeat and (optionally) channel in one batched solve.

    Parameters
    ----------
    features : ndarray, shape (h, w, C)
        The token grid (any float type; computed in float64). Must be finite.
    settings : ProbeSettings
    plan : SamplingPlan, optional
        Masks to use (so several layers share them); drawn from ``rng`` when omitted.
    rng : numpy Generator, optional
        Defaults to ``default_rng(settings.seed)``.
    device : str
        Torch device for the linear algebra.

    Returns
    -------
    ImageProbe

    Raises
    ------
    PosvitError
        For a non-finite feature, a wrong shape or a grid too small for the sampling.
    """
    torch = _torch()
    f = np.asarray(features)
    if f.ndim != 3:
        raise PosvitError(f"features must be (h, w, C), got shape {f.shape}")
    h, w, C = f.shape
    if C < 1:
        raise PosvitError("features have no channels")
    if not np.isfinite(f).all():
        raise PosvitError("features contain NaN or inf")
    if plan is None:
        plan = sampling_plan((h, w), settings, rng if rng is not None else np.random.default_rng(settings.seed))
    if plan.grid != (h, w):
        raise ValueError(f"sampling plan is for a {plan.grid} grid, features are {(h, w)}")
    dev = torch.device(device)
    N = h * w
    # A private float64 copy, centred in place (never the caller's array): peak memory is two N × C arrays.
    Xc = torch.as_tensor(f.reshape(N, C), device=dev).to(torch.float64, copy=True)
    Xc -= Xc.mean(0, keepdim=True)
    Y = torch.as_tensor(plan.targets, device=dev)                          # (M, N, 6)
    T = torch.as_tensor(plan.train, device=dev)
    M = T.shape[0]

    # The fits: one row per (mask, target column) that some target needs; xy rows always (coordinate RMSE).
    roles = list(settings.targets) + ([] if "xy" in settings.targets else ["xy"])
    row_of: dict[tuple[int, int], int] = {}
    for t in roles:
        for m in plan.mask_of[t].tolist():
            for col in _TARGET_COLUMNS[t]:
                row_of.setdefault((m, col), len(row_of))
    rows_m = torch.as_tensor([k[0] for k in row_of], device=dev)
    rows_c = torch.as_tensor([k[1] for k in row_of], device=dev)
    y = Y[rows_m, :, rows_c]                                               # (R, N)
    Ef = torch.as_tensor(plan.evaluate, device=dev, dtype=torch.float64)[rows_m]

    # Whole-stack fits, grouped by training-set size (grid masks with random offsets may differ by a row).
    weights = torch.empty((M, C, Y.shape[2]), dtype=torch.float64, device=dev)
    offset = torch.empty((M, 1, Y.shape[2]), dtype=torch.float64, device=dev)
    sizes = T.sum(1)
    for n in torch.unique(sizes).tolist():
        group = torch.nonzero(sizes == n).ravel()
        idx = torch.stack([torch.nonzero(T[g]).ravel() for g in group.tolist()])
        weights[group], offset[group] = _stack_weights(Xc, idx, Y[group], settings.alpha, settings.regressor)
    # One (N × C) @ (C × R) product predicts every token for every fit.
    pred = (Xc @ weights[rows_m, :, rows_c].T).T + offset[rows_m, 0, rows_c][:, None]
    nE = Ef.sum(1)
    sse = (((y - pred) ** 2) * Ef).sum(1)
    ey = (y * Ef).sum(1)
    sst = (y * y * Ef).sum(1) - ey ** 2 / nE
    tiny = sst <= 1e-12 * torch.clamp((y * y * Ef).sum(1), min=1e-300)
    r2_rows = torch.where(tiny, torch.full_like(sse, float("nan")), 1.0 - sse / torch.where(tiny, 1.0, sst))
    r2_rows, sse_rows = r2_rows.cpu().numpy(), sse.cpu().numpy()

    def rows_for(t: str) -> np.ndarray:
        """Row indices of target ``t``, shape (repeats, columns)."""
        return np.array([[row_of[(m, c)] for c in _TARGET_COLUMNS[t]] for m in plan.mask_of[t].tolist()])

    stack = {t: r2_rows[rows_for(t)].mean(1) for t in settings.targets}  # xy: mean of the x and y R²

    # 2-D coordinate regressor: the xy fit, rescaled from [0, 1] ramps to patch units.
    xy_rows = rows_for("xy")
    unit2 = np.array([max(w - 1, 0), max(h - 1, 0)], dtype=np.float64) ** 2
    n_eval = nE.cpu().numpy()[xy_rows[:, 0]]
    rmse = np.sqrt((sse_rows[xy_rows] * unit2).sum(1) / (2 * n_eval))
    yn, en = y.cpu().numpy(), Ef.cpu().numpy()
    tn = plan.train[plan.mask_of["xy"]]
    chance_sse = np.zeros_like(rmse)
    for k in range(2):
        yk = yn[xy_rows[:, k]]
        mean_train = (yk * tn).sum(1) / tn.sum(1)
        chance_sse += unit2[k] * (((yk - mean_train[:, None]) ** 2) * en[xy_rows[:, k]]).sum(1)
    chance = np.sqrt(chance_sse / (2 * n_eval))

    channel: dict[str, np.ndarray] = {}
    if settings.per_channel:
        alpha = settings.alpha if settings.regressor == "ridge" else 0.0
        X2 = Xc * Xc
        rc2 = _channel_r2_sparse(Xc, X2, plan, y, rows_m, rows_c, alpha)
        if rc2 is None:  # evaluation sets that are neither "all tokens" nor "all but the training tokens"
            Tf = T.to(torch.float64)
            Eall = torch.as_tensor(plan.evaluate, device=dev, dtype=torch.float64)
            rc2 = _channel_r2_dense(Xc, X2, Tf, Eall, y, rows_m, alpha)
        rc2 = rc2.cpu().numpy()
        for t in settings.targets:
            channel[t] = rc2[rows_for(t)].mean(1)                          # (repeats, C); xy: mean of x and y
    return ImageProbe(stack=stack, channel=channel, coordinate_rmse=rmse, coordinate_rmse_chance=chance)


def _channel_r2_sparse(Xc, X2, plan: SamplingPlan, y, rows_m, rows_c, alpha):
    """Per-channel R² when every evaluation set is all tokens or all but the training tokens.

    Then each evaluation sum is a whole-image sum (shared by all masks; for the fixed ramps shared by all
    fits) minus, at most, a sum over the few training tokens, gathered instead of multiplied by a dense mask:
    the cost is O(fits · n_train · C) plus one (columns × N) @ (N × C) product, not O(fits · N · C).
    Returns None for other evaluation sets.
    """
    torch = _torch()
    if plan.evaluate.all():
        complement = False
    elif np.array_equal(plan.evaluate, ~plan.train):
        complement = True
    else:
        return None
    dev = Xc.device
    N = Xc.shape[0]
    counts = plan.train.sum(1)
    nmax = int(counts.max())
    idx_np = np.zeros((len(counts), nmax), dtype=np.int64)
    wt_np = np.zeros((len(counts), nmax))
    for m, row in enumerate(plan.train):
        where = np.flatnonzero(row)
        idx_np[m, : len(where)] = where
        wt_np[m, : len(where)] = 1.0
    idx = torch.as_tensor(idx_np, device=dev)
    wt = torch.as_tensor(wt_np, device=dev)
    Xg = Xc[idx] * wt[:, :, None]                                          # (M, nmax, C), padding zeroed
    n = wt.sum(1)
    S1, S2 = Xg.sum(1), (Xg * Xg).sum(1)
    yg = torch.gather(y, 1, idx[rows_m]) * wt[rows_m]                      # (R, nmax)
    ty = yg.sum(1)
    # Σ_T x·y for every fit as one batched product per mask: fits of a mask sit in slots (M, P, nmax).
    rm = rows_m.cpu().numpy()
    slot = np.zeros(len(rm), dtype=np.int64)
    seen: dict[int, int] = {}
    for r, m in enumerate(rm.tolist()):
        slot[r] = seen.get(m, 0)
        seen[m] = slot[r] + 1
    slot_t = torch.as_tensor(slot, device=dev)
    packed = torch.zeros((Xg.shape[0], int(slot.max()) + 1, nmax), dtype=Xc.dtype, device=dev)
    packed[rows_m, slot_t] = yg
    txy = torch.bmm(packed, Xg)[rows_m, slot_t]                            # (R, C)
    # Whole-image Σ x·y: one product per distinct target column; the random column differs per mask.
    all_yx = torch.empty((y.shape[0], Xc.shape[1]), dtype=Xc.dtype, device=dev)
    random_col = _COLUMNS.index("random")
    is_random = rows_c == random_col
    fixed_rows = torch.nonzero(~is_random).ravel()
    if len(fixed_rows):
        cols = rows_c[fixed_rows]
        uniq, inverse = torch.unique(cols, return_inverse=True)
        table = torch.as_tensor(plan.targets[0][:, uniq.cpu().numpy()], device=dev).T @ Xc  # (U, C)
        all_yx[fixed_rows] = table[inverse]
    rand_rows = torch.nonzero(is_random).ravel()
    if len(rand_rows):
        all_yx[rand_rows] = y[rand_rows] @ Xc
    all_y, all_y2 = y.sum(1), (y * y).sum(1)
    all_x, all_x2 = Xc.sum(0), X2.sum(0)
    if complement:
        nE = N - n[rows_m]
        ey, ey2, eyx = all_y - ty, all_y2 - (yg * yg).sum(1), all_yx - txy
        e1, e2 = all_x[None] - S1[rows_m], all_x2[None] - S2[rows_m]
    else:
        nE = torch.full_like(ty, float(N))
        ey, ey2, eyx = all_y, all_y2, all_yx
        e1, e2 = all_x[None].expand_as(txy), all_x2[None].expand_as(txy)
    return _channel_r2_from_sums(n, S1, S2, rows_m, ty, txy, nE, ey, ey2, eyx, e1, e2, alpha)


def stack_r2(
    features: np.ndarray,
    targets=("lr", "ud", "diag", "radial", "xy"),
    *,
    alpha: float = 1.0,
    fraction: float = 1 / 36,
    repeats: int = 6,
    seed: int = 0,
) -> dict[str, float]:
    """Mean held-out R² of a ridge probe of each positional target from all channels of one image.

    A thin wrapper over :func:`probe_image` (``holdout`` protocol, random sampling, no per-channel scores) for
    training monitors. On small grids the training set is raised to at least 2 tokens.

    Parameters
    ----------
    features : ndarray or torch tensor, shape (h, w, C)
        One image's token grid.
    targets : sequence of str
        Target names (see :func:`ramp_targets`); ``xy`` scores the mean of the x and y R².
    alpha : float
        Ridge strength on per-channel standardised features.
    fraction : float
        Fraction of tokens used for training (at least 2); R² is computed on the others.
    repeats : int
        Random training subsets; the result is their mean.
    seed : int

    Returns
    -------
    dict of str to float
    """
    if hasattr(features, "detach"):  # a torch tensor from a training loop, possibly on the GPU
        features = features.detach().float().cpu().numpy()
    f = np.asarray(features)
    if f.ndim != 3:
        raise PosvitError(f"features must be (h, w, C), got shape {f.shape}")
    h, w, _ = f.shape
    if h * w < 2:
        raise PosvitError(f"a {h}×{w} token grid has no positions to probe (need at least 2 tokens)")
    n_tokens = h * w
    fraction = min(max(float(fraction), 2.0 / n_tokens + 1e-9), 1.0 - 1e-9)
    if n_tokens - math.floor(n_tokens * fraction + 1e-9) < 2:
        raise PosvitError(f"a {h}×{w} grid is too small to hold out tokens at fraction {fraction}")
    settings = ProbeSettings(targets=check_targets(targets), fraction=fraction, repeats=int(repeats),
                             alpha=float(alpha), seed=int(seed), per_channel=False, extras=False).validated()
    res = probe_image(f, settings, rng=np.random.default_rng(seed))
    return {t: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for t, v in res.stack.items()}


# --------------------------------------------------------------------------------------------------------------
# Token-index classifier (DropPos/LOCA-style position prediction)


def _zscore_tokens(f: np.ndarray, device):
    torch = _torch()
    h, w, C = f.shape
    X = torch.as_tensor(f.reshape(h * w, C), dtype=torch.float64, device=device)
    X = X - X.mean(0, keepdim=True)
    sd = X.std(0, unbiased=False, keepdim=True)
    return X / torch.where(sd > 0, sd, torch.ones_like(sd))


class _PositionClassifier:
    """Leave-one-image-out ridge classifier of the exact token index, per grid size.

    One-vs-rest least squares on one-hot targets: W = (Σ Zᵀ Z + αI)⁻¹ Σ Zᵀ, since the one-hot matrix of an image's
    tokens is the identity. Features are z-scored per image over all tokens (no position information is used);
    the per-class intercept is the same for every class and drops out of the arg-max. Pass 1 accumulates the
    Gram matrix and class sums over images; pass 2 subtracts each image's own share and classifies its tokens.
    """

    def __init__(self, alpha: float, device, cache_bytes: int = 256 * 2**20):
        self.alpha, self.device = alpha, device
        self.gram: dict[tuple[int, int], Any] = {}
        self.sums: dict[tuple[int, int], Any] = {}
        self.count: dict[tuple[int, int], int] = {}
        # Per-image Gram matrices kept from pass 1 (within a memory budget) so pass 2 need not recompute them.
        self.own: dict[int, Any] = {}
        self.cache_left = cache_bytes

    def _gram(self, Z):
        Z32 = Z.to(_torch().float32)
        return (Z32.mT @ Z32).to(Z.dtype)

    def add(self, index: int, f: np.ndarray) -> None:
        h, w, _ = f.shape
        Z = _zscore_tokens(f, self.device)
        gram = self._gram(Z)
        key = (h, w)
        if key not in self.gram:
            self.gram[key] = gram.clone()
            self.sums[key] = Z.mT.clone()
            self.count[key] = 1
        else:
            self.gram[key] += gram
            self.sums[key] += Z.mT
            self.count[key] += 1
        size = gram.numel() * gram.element_size()
        if size <= self.cache_left:
            self.own[index] = gram
            self.cache_left -= size

    #: Above this many tokens the N × N class scores (O(N² C)) are not worth computing.
    MAX_TOKENS = 16384

    def add_allowed(self, grid) -> bool:
        return int(grid[0]) * int(grid[1]) <= self.MAX_TOKENS

    def available(self, grid) -> bool:
        return self.count.get(tuple(grid), 0) >= 2

    def score(self, index: int, f: np.ndarray) -> tuple[float, float]:
        """Accuracy and within-one-token accuracy (Chebyshev distance ≤ 1) on this image's tokens."""
        torch = _torch()
        h, w, C = f.shape
        Z = _zscore_tokens(f, self.device)
        own = self.own.pop(index) if index in self.own else self._gram(Z)
        G = self.gram[(h, w)] - own + self.alpha * torch.eye(C, dtype=Z.dtype, device=Z.device)
        S = (self.sums[(h, w)] - Z.mT).to(torch.float32)
        # Only the arg-max is used: float32 is ample for the N right-hand sides and the N × N scores.
        A = torch.cholesky_solve(S, torch.linalg.cholesky(G).to(torch.float32))  # (C, N)
        Zf = Z.to(torch.float32)
        chunk = max(1, 2**26 // (h * w))                                   # ≤ 256 MB of float32 scores at a time
        pred = torch.cat([(Zf[i:i + chunk] @ A).argmax(1) for i in range(0, h * w, chunk)])
        truth = torch.arange(h * w, device=pred.device)
        exact = (pred == truth).double().mean().item()
        near = ((torch.div(pred, w, rounding_mode="floor") - torch.div(truth, w, rounding_mode="floor")).abs().le(1)
                & ((pred % w) - (truth % w)).abs().le(1)).double().mean().item()
        return exact, near


# --------------------------------------------------------------------------------------------------------------
# Dataset level


class _Stat:
    """Running mean and population std of arrays, ignoring NaN entries."""

    def __init__(self):
        self.n = self.s = self.s2 = None

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(v)
        vz = np.where(ok, v, 0.0)
        if self.n is None:
            self.n, self.s, self.s2 = ok.sum(0).astype(np.float64), vz.sum(0), (vz ** 2).sum(0)
        else:
            self.n += ok.sum(0)
            self.s += vz.sum(0)
            self.s2 += (vz ** 2).sum(0)

    def mean_std(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.s / self.n
            std = np.sqrt(np.maximum(self.s2 / self.n - mean ** 2, 0.0))
        return mean, std


def _summary(per_image_repeats: list[np.ndarray]) -> dict:
    a = np.asarray(per_image_repeats, dtype=np.float64)
    finite = np.isfinite(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            "mean": float(np.nanmean(a)) if finite.any() else None,
            "std": float(np.nanstd(a)) if finite.any() else None,
            "per_image": [None if not np.isfinite(x) else float(x) for x in np.nanmean(a, axis=1)],
            "per_repeat": [[None if not np.isfinite(x) else float(x) for x in row] for row in a],
        }


def _top_channels(mean_r2: np.ndarray, k: int) -> list[int]:
    order = np.argsort(-np.where(np.isfinite(mean_r2), mean_r2, -np.inf), kind="stable")
    return [int(c) for c in order[:k]]


FeatureReader = Callable[[int, str], np.ndarray]


def probe_dataset(
    read: FeatureReader,
    images: Sequence[dict],
    layers: Sequence[str],
    settings: ProbeSettings,
    *,
    device: str = "cpu",
    threads: int | None = 1,
    progress: ProgressCallback | None = None,
) -> dict:
    """Probe every image of a dataset for every layer; return the per-layer result blocks.

    Parameters
    ----------
    read : callable ``(image_index, layer) -> ndarray (h, w, C)``
        Feature access (called once per image and layer, again in the classifier's second pass).
    images : sequence of dict
        One ``{"name", "path", "grid": (h, w)}`` per image, in index order.
    layers : sequence of str
        Layers to probe; the sampling masks of an image are the same for every layer.
    settings : ProbeSettings
    device : str
    threads : int or None
        Torch intra-op threads while probing (see :func:`torch_threads`); None keeps torch's setting.
    progress : callable, optional
        Called as ``progress("probe", done, total)`` and ``progress("position classifier", done, total)``.

    Returns
    -------
    dict
        ``{layer: block}`` with, per block, ``stack_r2``, ``channel_r2``, ``top_channels``,
        ``positional_channels``, ``coordinate_rmse`` and ``position_accuracy`` (see :func:`probe_store`).

    Raises
    ------
    PosvitError
        For images with non-finite features (all of them are named), grids too small to probe or no images.
    """
    with torch_threads(threads):
        return _probe_dataset(read, images, layers, settings.validated(), device, report(progress))


def _probe_dataset(read, images, layers, settings, device, progress) -> dict:
    if not images:
        raise PosvitError("no images to probe")
    bad_grids = [im["name"] for im in images if int(im["grid"][0]) * int(im["grid"][1]) < 2]
    if bad_grids:
        g = next(im["grid"] for im in images if im["name"] == bad_grids[0])
        raise PosvitError(
            f"image '{bad_grids[0]}' has a {g[0]}×{g[1]} token grid: nothing to probe (need at least 2 tokens)"
            + (f"; {len(bad_grids) - 1} more images too" if len(bad_grids) > 1 else "")
        )
    # Check every grid size against the sampling settings before any work (a too-small grid fails at once).
    for grid in dict.fromkeys(tuple(int(x) for x in im["grid"]) for im in images):
        sampling_plan(grid, settings, np.random.default_rng(0))
    stacks: dict[str, dict[str, list]] = {ly: {t: [] for t in settings.targets} for ly in layers}
    chan: dict[str, dict[str, _Stat]] = {ly: {t: _Stat() for t in settings.targets} for ly in layers}
    rmse: dict[str, list] = {ly: [] for ly in layers}
    rmse_chance: dict[str, list] = {ly: [] for ly in layers}
    classifiers = {ly: _PositionClassifier(settings.alpha if settings.regressor == "ridge" else 1.0, device)
                   for ly in layers} if settings.extras else {}
    nonfinite: list[str] = []
    channels: int | None = None
    total = len(images) * len(layers)
    done = 0
    progress("probe", 0, total)
    for i, im in enumerate(images):
        plan = None
        for ly in layers:
            f = read(i, ly)
            if f.ndim != 3 or tuple(f.shape[:2]) != tuple(int(x) for x in im["grid"]):
                raise PosvitError(f"image '{im['name']}' features have shape {f.shape}, its grid is {tuple(im['grid'])}")
            if channels is None:
                channels = int(f.shape[2])
            if not np.isfinite(f).all():
                if im["name"] not in nonfinite:
                    nonfinite.append(im["name"])
                done += 1
                progress("probe", done, total)
                continue
            if nonfinite:  # an error is coming; only keep scanning for more bad images
                done += 1
                progress("probe", done, total)
                continue
            if plan is None:
                plan = sampling_plan(tuple(f.shape[:2]), settings, np.random.default_rng([settings.seed, i]))
            res = probe_image(f, settings, plan, device=device)
            for t in settings.targets:
                stacks[ly][t].append(res.stack[t])
                if settings.per_channel:
                    chan[ly][t].add(res.channel[t])
            rmse[ly].append(res.coordinate_rmse)
            rmse_chance[ly].append(res.coordinate_rmse_chance)
            if settings.extras and classifiers[ly].add_allowed(f.shape[:2]):
                classifiers[ly].add(i, f)
            done += 1
            progress("probe", done, total)
    if nonfinite:
        shown = ", ".join(f"'{n}'" for n in nonfinite[:5])
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        raise PosvitError(
            f"features of {len(nonfinite)} image(s) contain NaN or inf: {shown}{more} "
            "(re-extract them, e.g. with --dtype float32; posvit does not zero them)"
        )

    accuracy: dict[str, list] = {ly: [] for ly in layers}
    within: dict[str, list] = {ly: [] for ly in layers}
    if settings.extras:
        done = 0
        progress("position classifier", 0, total)
        for i, im in enumerate(images):
            for ly in layers:
                clf = classifiers[ly]
                if clf.available(im["grid"]):
                    a, b = clf.score(i, read(i, ly))
                else:
                    a = b = float("nan")
                accuracy[ly].append(a)
                within[ly].append(b)
                done += 1
                progress("position classifier", done, total)

    blocks = {}
    for ly in layers:
        block: dict[str, Any] = {"stack_r2": {t: _summary(stacks[ly][t]) for t in settings.targets}}
        if settings.per_channel:
            block["channel_r2"] = {}
            for t in settings.targets:
                mean, std = chan[ly][t].mean_std()
                block["channel_r2"][t] = {"mean": mean.tolist(), "std": std.tolist()}
            ramps = [r for r in POSITIONAL_RAMPS if r in settings.targets]
            top = {r: _top_channels(np.asarray(block["channel_r2"][r]["mean"]), settings.top_k) for r in ramps}
            block["top_channels"] = top
            block["positional_channels"] = sorted({c for v in top.values() for c in v})
        rm = _summary(rmse[ly])
        rc = _summary(rmse_chance[ly])
        block["coordinate_rmse"] = {
            "mean": rm["mean"], "std": rm["std"], "per_image": rm["per_image"],
            "chance_mean": rc["mean"], "unit": "patches",
            "definition": "sqrt(mean over evaluation tokens and both coordinates of the squared error) of the "
                          "xy ridge fit, in token units; chance = predicting the training mean",
        }
        if settings.extras:
            acc = np.asarray(accuracy[ly], dtype=np.float64)
            near = np.asarray(within[ly], dtype=np.float64)
            ok = np.isfinite(acc)
            grids = [tuple(im["grid"]) for im in images]
            block["position_accuracy"] = {
                "mean": float(acc[ok].mean()) if ok.any() else None,
                "std": float(acc[ok].std()) if ok.any() else None,
                "within_one_mean": float(near[ok].mean()) if ok.any() else None,
                "per_image": [float(a) if np.isfinite(a) else None for a in acc],
                "chance_mean": float(np.mean([1.0 / (g[0] * g[1]) for g, k in zip(grids, ok) if k])) if ok.any() else None,
                "images_scored": int(ok.sum()),
                "classifier": (
                    "ridge one-vs-rest least squares on the one-hot token index (closed form), "
                    f"alpha {classifiers[ly].alpha:g}, features z-scored per image, leave-one-image-out over "
                    "images of the same grid size"
                ),
                **({} if ok.any() else {"reason": "needs at least 2 images with the same grid size of at most "
                                                  f"{_PositionClassifier.MAX_TOKENS} tokens"}),
            }
        blocks[ly] = block
    return {"layers": blocks, "channels": channels}


def probe_store(
    store,
    settings: ProbeSettings,
    *,
    layers: Sequence[str] | None = None,
    device: str = "cpu",
    threads: int | None = 1,
    progress: ProgressCallback | None = None,
) -> dict:
    """Probe a feature store and return the full result document (schema: ``docs/probe-results.md``).

    Parameters
    ----------
    store : FeatureStore
    settings : ProbeSettings
    layers : sequence of str, optional
        Layers to probe (default: the store's default layer).
    device : str
    threads : int or None
        Torch intra-op threads (see :func:`torch_threads`).
    progress : callable, optional

    Returns
    -------
    dict
        ``schema``, ``posvit_version``, ``created``, ``store`` (source, format, provenance), ``settings``,
        ``images``, ``layers`` (probed, in order), ``primary_layer`` (the one :func:`positional_channels` reads
        by default), ``results`` ({layer: block}) and ``notes``.

    Raises
    ------
    PosvitError
        For an empty store, a store with no feature layers (maps only), grids of fewer than 2 tokens, missing
        layers or non-finite features.
    """
    from posvit_cli import __version__

    if len(store) == 0:
        raise PosvitError(f"'{store.source}' holds no images: nothing to probe")
    if not store.layers:
        maps = ", ".join(store.map_names()) or "none"
        raise PosvitError(f"'{store.source}' holds no feature layers (a maps-only store: {maps}); probe a feature store")
    if layers is None:
        layers = [store.default_layer]
    layers = [store.check_layer(ly) for ly in layers]
    layers = list(dict.fromkeys(layers))
    records = store.records
    for r in records:
        if len(r.grid) != 2 or r.grid[0] < 1 or r.grid[1] < 1:
            raise PosvitError(f"image '{r.name}' in '{store.source}' has no token grid ({r.grid})")
    images = [{"name": r.name, "path": r.path, "grid": [int(r.grid[0]), int(r.grid[1])]} for r in records]
    out = probe_dataset(lambda i, ly: store.features(i, ly, dtype=np.float32), images, layers, settings,
                        device=device, threads=threads, progress=progress)
    primary = store.default_layer if store.default_layer in layers else layers[-1]
    notes = []
    for ly, block in out["layers"].items():
        for t, s in block["stack_r2"].items():
            if s["mean"] is None:
                notes.append(f"{ly}: target '{t}' is constant on every grid (e.g. ud on one-row grids): R² undefined")
    prov = dict(store.provenance)
    return {
        "schema": PROBE_SCHEMA,
        "schema_version": PROBE_SCHEMA_VERSION,
        "posvit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "store": {
            "source": store.source,
            "format": store.format,
            "n_images": len(store),
            "channels": out["channels"],
            "stored_layers": list(store.layers),
            "grids": {g.name: int(len(g.indices)) for g in store.groups},
            "model": store.model,
            "weights": store.weights,
            "weights_sha256": store.weights_sha256,
            "patch_size": store.patch_size,
            "preprocessing": store.preprocessing,
            "debias": store.debias,
            "provenance": prov,
        },
        "settings": settings.as_dict(),
        "images": images,
        "layers": layers,
        "primary_layer": primary,
        "results": out["layers"],
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------------------------
# Reading results back


def probe_result_json(result: dict) -> str:
    """The result document as strict JSON text (NaN written as null)."""
    return json_text(result, indent=1)


def write_probe_result(path: str | os.PathLike, result: dict) -> Path:
    """Write a probe result as JSON, atomically (temporary file, then rename). Returns the path."""
    return write_text_atomic(path, probe_result_json(result) + "\n")


def read_probe_result(path: str | os.PathLike) -> dict:
    """Read a result written by :func:`write_probe_result` (or ``posvit probe -o``).

    Raises
    ------
    PosvitError
        If the file is missing, is not JSON, or is not a posvit probe result of a readable schema version.
    """
    return read_tagged_json(path, PROBE_SCHEMA, PROBE_SCHEMA_VERSION, "probe result",
                            hint=f"write one with `posvit probe STORE -o {Path(path).name}`")


def _result_block(result: dict, layer: str | None) -> tuple[str, dict]:
    if not isinstance(result, dict) or "results" not in result:
        raise PosvitError("not a probe result document (no 'results')")
    layer = layer or result.get("primary_layer") or result["layers"][-1]
    if layer not in result["results"]:
        raise PosvitError(f"layer '{layer}' was not probed (probed: {', '.join(result['results'])})")
    return layer, result["results"][layer]


def _channel_means(block: dict, target: str, layer: str) -> np.ndarray:
    if "channel_r2" not in block:
        raise PosvitError(f"the probe result of layer '{layer}' has no per-channel scores (probed without them)")
    if target not in block["channel_r2"]:
        raise PosvitError(
            f"target '{target}' was not probed (probed: {', '.join(block['channel_r2'])}); "
            "re-run `posvit probe` with it in --targets"
        )
    return np.array([np.nan if v is None else v for v in block["channel_r2"][target]["mean"]], dtype=np.float64)


def positional_channels(
    result: dict, k: int = 2, ramps: Sequence[str] = POSITIONAL_RAMPS, *, layer: str | None = None
) -> list[int]:
    """The most positional channels: the union of the top-``k`` channels of each ramp, sorted.

    Ranks by the dataset-mean per-channel R² (NaN last), as the published channel-blanking selection does
    (top-2 of lr, ud, diag, radial).

    Parameters
    ----------
    result : dict
        A probe result (:func:`probe_store` or :func:`read_probe_result`).
    k : int
        Channels per ramp.
    ramps : sequence of str
        Targets to rank (any probed target).
    layer : str, optional
        Defaults to the result's primary layer.

    Returns
    -------
    list of int
        Channel indices, ascending.

    Raises
    ------
    PosvitError
        If a ramp or the layer was not probed, or ``k < 1``.
    """
    if k < 1:
        raise PosvitError(f"k must be at least 1, got {k}")
    layer, block = _result_block(result, layer)
    chosen: set[int] = set()
    for r in ramps:
        chosen.update(_top_channels(_channel_means(block, r, layer), k))
    return sorted(chosen)


def fingerprint(result: dict, target: str = "lr") -> tuple[list[str], np.ndarray]:
    """The layers × channels matrix of dataset-mean per-channel R² for one target.

    Returns
    -------
    layers : list of str
        Rows, in probing order.
    matrix : ndarray, shape (len(layers), C)
    """
    layers = list(result["layers"])
    rows = [_channel_means(result["results"][ly], target, ly) for ly in layers]
    return layers, np.stack(rows)


def channel_r2_table(result: dict) -> tuple[list[str], list[list]]:
    """Rows of per-channel scores: ``layer, channel, <target>_mean, <target>_std ..., top_for``."""
    targets = list(result["settings"]["targets"])
    header = ["layer", "channel"] + [f"{t}_{s}" for t in targets for s in ("mean", "std")] + ["top_for"]
    rows: list[list] = []
    for ly in result["layers"]:
        block = result["results"][ly]
        if "channel_r2" not in block:
            continue
        top = block.get("top_channels", {})
        C = len(next(iter(block["channel_r2"].values()))["mean"])
        for c in range(C):
            row: list[Any] = [ly, c]
            for t in targets:
                d = block["channel_r2"][t]
                row += [d["mean"][c], d["std"][c]]
            row.append(";".join(r for r, chs in top.items() if c in chs))
            rows.append(row)
    return header, rows


def write_channel_csv(path: str | os.PathLike, result: dict) -> Path:
    """Write the per-channel R² of every probed layer as CSV, atomically."""
    import csv
    import io

    header, rows = channel_r2_table(result)
    if not rows:
        raise PosvitError("the probe result has no per-channel scores to write")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None or (isinstance(v, float) and not math.isfinite(v))
                         else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return write_text_atomic(path, buf.getvalue())

"""Positional linear probes: how much of a token's grid position is linearly decodable from its features.

Targets are ramps on the ``h × w`` token grid scaled to [0, 1] (:func:`ramp_targets`). A ridge regression is
fitted on a random subset of tokens (by default 1/36, as published) of *one image*, after standardising each
channel on those tokens, and R² is measured on the held-out tokens.

This module is the seed of ``posvit probe``; :func:`stack_r2` is the contract other commands rely on.
"""

from __future__ import annotations

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = ["RAMP_TARGETS", "ramp_targets", "stack_r2"]

#: Ramp targets in the order reports list them; ``xy`` is the joint 2-output (x, y) target.
RAMP_TARGETS = ("lr", "ud", "diag", "radial", "xy")
CONTROL_TARGETS = ("random", "raster")


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
            raise PosvitError(f"unknown target '{name}': use {', '.join(RAMP_TARGETS + CONTROL_TARGETS)}")
    return out


def _ridge_r2(X: np.ndarray, Y: np.ndarray, train: np.ndarray, alpha: float) -> np.ndarray:
    """Held-out R² per output column of a ridge fit on the ``train`` rows of standardised ``X``."""
    Xt, Yt = X[train], Y[train]
    mu = Xt.mean(0)
    sd = Xt.std(0)
    sd[sd == 0] = 1.0
    Z = (X - mu) / sd
    Zt = Z[train]
    ym = Yt.mean(0)
    n, c = Zt.shape
    if n < c:  # dual form: (n × n) system
        K = Zt @ Zt.T
        coef = Zt.T @ np.linalg.solve(K + alpha * np.eye(n), Yt - ym)
    else:
        coef = np.linalg.solve(Zt.T @ Zt + alpha * np.eye(c), Zt.T @ (Yt - ym))
    test = ~train
    pred = Z[test] @ coef + ym
    resid = ((Y[test] - pred) ** 2).sum(0)
    tot = ((Y[test] - Y[test].mean(0)) ** 2).sum(0)
    return 1.0 - resid / np.where(tot > 0, tot, np.nan)


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

    Parameters
    ----------
    features : ndarray, shape (h, w, C)
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
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 3:
        raise PosvitError(f"features must be (h, w, C), got shape {f.shape}")
    h, w, c = f.shape
    if not np.isfinite(f).all():
        raise PosvitError("features contain NaN or inf")
    rng = np.random.default_rng(seed)
    tg = ramp_targets(h, w, targets, rng=rng)
    X = f.reshape(h * w, c)
    n_train = max(2, int(round(h * w * fraction)))
    if n_train >= h * w:
        raise PosvitError(f"a {h}×{w} grid is too small to hold out tokens at fraction {fraction}")
    scores: dict[str, list[float]] = {t: [] for t in targets}
    for _ in range(repeats):
        train = np.zeros(h * w, bool)
        train[rng.choice(h * w, n_train, replace=False)] = True
        for t in targets:
            Y = tg[t].reshape(h * w, -1)
            scores[t].append(float(np.nanmean(_ridge_r2(X, Y, train, alpha))))
    return {t: float(np.mean(v)) for t, v in scores.items()}

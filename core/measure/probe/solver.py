"""The closed-form solver: ridge / OLS probes of one image, all repeats, targets and channels in one batched
solve (float64 torch), and the leave-one-image-out token-index classifier.

The stack regressor uses the dual (kernel) form of ridge when there are fewer training tokens than channels, the
primal form otherwise; ordinary least squares is the minimum-norm solution (``gelsd``), as scikit-learn's
``LinearRegression`` gives. Nothing here knows about stores or result documents.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.probe.settings import (
    TARGET_COLUMNS, TARGET_MATRIX_COLUMNS, ProbeSettings, SamplingPlan, check_targets, sampling_plan,
)

__all__ = ["ImageProbe", "PositionClassifier", "probe_image", "stack_r2", "zscore_tokens"]


# --------------------------------------------------------------------------------------------------------------
# The batched engine


def _torch():
    import torch

    return torch


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
            for col in TARGET_COLUMNS[t]:
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
        return np.array([[row_of[(m, c)] for c in TARGET_COLUMNS[t]] for m in plan.mask_of[t].tolist()])

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
    random_col = TARGET_MATRIX_COLUMNS.index("random")
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


def zscore_tokens(f: np.ndarray, device):
    torch = _torch()
    h, w, C = f.shape
    X = torch.as_tensor(f.reshape(h * w, C), dtype=torch.float64, device=device)
    X = X - X.mean(0, keepdim=True)
    sd = X.std(0, unbiased=False, keepdim=True)
    return X / torch.where(sd > 0, sd, torch.ones_like(sd))


class PositionClassifier:
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
        Z = zscore_tokens(f, self.device)
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
        Z = zscore_tokens(f, self.device)
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



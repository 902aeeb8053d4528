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


#: Tokens per chunk wherever a sum runs over every token of an image: the float64 working set is a few
#: CHUNK_TOKENS × C arrays (16,384 × 384 × 8 B = 50 MB each) whatever the grid size, so a 625 × 625 grid costs
#: its features plus that, not several float64 (N × C) copies. Module-level so tests can make it tiny.
CHUNK_TOKENS = 16384


def _centred_chunks(X: np.ndarray, mean, dev):
    """``(slice, chunk)`` over consecutive token chunks of ``X`` (N, C), each a float64 tensor minus ``mean``.

    A fresh float64 copy per chunk (never a view of the caller's array, which may be float64 already).
    """
    torch = _torch()
    N = X.shape[0]
    step = max(1, int(CHUNK_TOKENS))
    for start in range(0, N, step):
        sl = slice(start, min(N, start + step))
        chunk = torch.as_tensor(np.array(X[sl], dtype=np.float64), device=dev)
        if mean is not None:
            chunk -= mean
        yield sl, chunk


def _chunk_sums(X: np.ndarray, mean, dev, terms) -> list:
    """Σ over token chunks of ``terms(slice, centred chunk)``, a tuple of tensors of fixed shapes."""
    total = None
    for sl, chunk in _centred_chunks(X, mean, dev):
        part = terms(sl, chunk)
        total = list(part) if total is None else [a + b for a, b in zip(total, part)]
    return total


def _all_finite(X: np.ndarray) -> bool:
    """``np.isfinite(X).all()`` without an (N, C) boolean temporary."""
    step = max(1, int(CHUNK_TOKENS))
    return all(np.isfinite(X[i:i + step]).all() for i in range(0, X.shape[0], step))


def _stack_weights(Xt, Yt, alpha: float, regressor: str):
    """Whole-stack regressors for a group of masks with equal training size, as weights on the raw features.

    Parameters
    ----------
    Xt : tensor (M, n, C), float64
        The training tokens of each mask, centred by the image's per-channel mean (R² is invariant to that
        shift; it keeps the float64 variance arithmetic well conditioned).
    Yt : tensor (M, n, T)
        Targets of each mask at its training tokens.

    Returns
    -------
    weights : tensor (M, C, T)
    offset : tensor (M, 1, T)
        Predictions for every token are ``Xc @ weights + offset`` with ``Xc`` the centred tokens: the
        standardisation (with the training tokens' mean and std) is folded into the weights, so all masks
        share one product with each chunk of ``Xc``.
    """
    torch = _torch()
    M, n, C = Xt.shape
    mu = Xt.mean(1, keepdim=True)                                          # (M, 1, C)
    var = ((Xt - mu) ** 2).mean(1, keepdim=True)
    scale = _scale_of(var, mu, n)
    Zt = (Xt - mu) / scale                                                 # standardised training tokens
    ybar = Yt.mean(1, keepdim=True)
    Yc = Yt - ybar
    like = dict(dtype=Xt.dtype, device=Xt.device)
    if regressor == "ridge" and n < C:
        # Dual form: w = Zᵀ (Z Zᵀ + αI)⁻¹ y, an n × n system instead of C × C.
        K = Zt @ Zt.mT + alpha * torch.eye(n, **like)
        W = Zt.mT @ torch.cholesky_solve(Yc, torch.linalg.cholesky(K))   # (M, C, T)
    elif regressor == "ridge":
        G = Zt.mT @ Zt + alpha * torch.eye(C, **like)
        W = torch.cholesky_solve(Zt.mT @ Yc, torch.linalg.cholesky(G))
    elif Xt.device.type == "cpu":
        # Minimum-norm least squares (SVD-based), the solution scikit-learn's LinearRegression returns.
        W = torch.linalg.lstsq(Zt, Yc, driver="gelsd").solution
    else:
        W = torch.linalg.pinv(Zt) @ Yc
    Wx = W / scale.mT                                                      # weights on centred raw features
    return Wx, ybar - mu @ Wx


def _channel_r2_dense(X, mean, plan: SamplingPlan, rows_m, rows_c, alpha: float):
    """Per-channel R² for arbitrary training and evaluation masks (dense mask products, summed over chunks).

    Parameters
    ----------
    X : ndarray (N, C)
        The image's tokens (any float type); ``mean`` (1, C) is subtracted chunk by chunk.
    plan : SamplingPlan
        Masks and targets; fit ``r`` is target column ``rows_c[r]`` of mask ``rows_m[r]``.

    Returns
    -------
    tensor (R, C)
    """
    torch = _torch()
    dev = mean.device
    train = torch.as_tensor(plan.train)
    evaluate = torch.as_tensor(plan.evaluate)
    targets = torch.as_tensor(plan.targets)
    rm_cpu, rc_cpu = rows_m.cpu(), rows_c.cpu()

    def terms(sl, Xc):
        X2 = Xc * Xc
        T = train[:, sl].to(device=dev, dtype=torch.float64)
        E = evaluate[:, sl].to(device=dev, dtype=torch.float64)
        y = targets[:, sl][rm_cpu, :, rc_cpu].to(dev)                      # (R, chunk)
        Tr, Er = T[rows_m], E[rows_m]
        Ty, Ey = Tr * y, Er * y
        return (T @ Xc, T @ X2, Ty.sum(1), Ty @ Xc, Ey.sum(1), (Ey * y).sum(1), Ey @ Xc,
                (E @ Xc)[rows_m], (E @ X2)[rows_m])

    S1, S2, ty, txy, ey, ey2, eyx, e1, e2 = _chunk_sums(X, mean, dev, terms)
    n = torch.as_tensor(plan.train.sum(1), device=dev, dtype=torch.float64)
    nE = torch.as_tensor(plan.evaluate.sum(1), device=dev, dtype=torch.float64)[rows_m]
    return _channel_r2_from_sums(n, S1, S2, rows_m, ty, txy, nE, ey, ey2, eyx, e1, e2, alpha)


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
    X = f.reshape(h * w, C)                                                # a view: no copy of the features
    if not _all_finite(X):
        raise PosvitError("features contain NaN or inf")
    if plan is None:
        plan = sampling_plan((h, w), settings, rng if rng is not None else np.random.default_rng(settings.seed))
    if plan.grid != (h, w):
        raise ValueError(f"sampling plan is for a {plan.grid} grid, features are {(h, w)}")
    dev = torch.device(device)
    # Every sum over all tokens runs over chunks of float64 copies centred by the image mean, so memory beyond
    # the features stays O(CHUNK_TOKENS × C) (see CHUNK_TOKENS); only the training tokens are gathered whole.
    mean = _chunk_sums(X, None, dev, lambda sl, chunk: (chunk.sum(0, keepdim=True),))[0] / (h * w)

    # The fits: one row per (mask, target column) that some target needs; xy rows always (coordinate RMSE).
    roles = list(settings.targets) + ([] if "xy" in settings.targets else ["xy"])
    row_of: dict[tuple[int, int], int] = {}
    for t in roles:
        for m in plan.mask_of[t].tolist():
            for col in TARGET_COLUMNS[t]:
                row_of.setdefault((m, col), len(row_of))
    rows_m = torch.as_tensor([k[0] for k in row_of], device=dev)
    rows_c = torch.as_tensor([k[1] for k in row_of], device=dev)

    def rows_for(t: str) -> np.ndarray:
        """Row indices of target ``t``, shape (repeats, columns)."""
        return np.array([[row_of[(m, c)] for c in TARGET_COLUMNS[t]] for m in plan.mask_of[t].tolist()])

    weights, offset = _fit_stacks(X, mean, plan, settings)
    xy_rows = rows_for("xy")
    r2_rows, sse_rows, nE, chance_sse = _evaluate_stacks(X, mean, plan, rows_m, rows_c,
                                                         weights[rows_m, :, rows_c], offset[rows_m, 0, rows_c],
                                                         xy_rows)
    stack = {t: r2_rows[rows_for(t)].mean(1) for t in settings.targets}  # xy: mean of the x and y R²

    # 2-D coordinate regressor: the xy fit, rescaled from [0, 1] ramps to patch units.
    unit2 = np.array([max(w - 1, 0), max(h - 1, 0)], dtype=np.float64) ** 2
    n_eval = nE[xy_rows[:, 0]]
    rmse = np.sqrt((sse_rows[xy_rows] * unit2).sum(1) / (2 * n_eval))
    chance = np.sqrt((chance_sse * unit2).sum(1) / (2 * n_eval))

    channel: dict[str, np.ndarray] = {}
    if settings.per_channel:
        alpha = settings.alpha if settings.regressor == "ridge" else 0.0
        rc2 = _channel_r2_sparse(X, mean, plan, rows_m, rows_c, alpha)
        if rc2 is None:  # evaluation sets that are neither "all tokens" nor "all but the training tokens"
            rc2 = _channel_r2_dense(X, mean, plan, rows_m, rows_c, alpha)
        rc2 = rc2.cpu().numpy()
        for t in settings.targets:
            channel[t] = rc2[rows_for(t)].mean(1)                          # (repeats, C); xy: mean of x and y
    return ImageProbe(stack=stack, channel=channel, coordinate_rmse=rmse, coordinate_rmse_chance=chance)


def _training_tokens(X: np.ndarray, mean, idx: np.ndarray):
    """The tokens ``X[idx]`` (idx of any shape) as a centred float64 tensor on ``mean``'s device."""
    torch = _torch()
    return torch.as_tensor(np.array(X[idx], dtype=np.float64), device=mean.device) - mean


def _fit_stacks(X: np.ndarray, mean, plan: SamplingPlan, settings: ProbeSettings):
    """Whole-stack weights (M, C, 6) and offsets (M, 1, 6) of every mask, grouped by training-set size (grid
    masks with random offsets may differ by a row)."""
    torch = _torch()
    dev = mean.device
    M, C = plan.train.shape[0], X.shape[1]
    cols = plan.targets.shape[2]
    weights = torch.empty((M, C, cols), dtype=torch.float64, device=dev)
    offset = torch.empty((M, 1, cols), dtype=torch.float64, device=dev)
    sizes = plan.train.sum(1)
    for n in np.unique(sizes).tolist():
        group = np.flatnonzero(sizes == n)
        idx = np.stack([np.flatnonzero(plan.train[g]) for g in group.tolist()])    # (G, n)
        Yt = torch.as_tensor(plan.targets[group[:, None], idx], device=dev)      # (G, n, 6)
        g = torch.as_tensor(group, device=dev)
        weights[g], offset[g] = _stack_weights(_training_tokens(X, mean, idx), Yt, settings.alpha,
                                               settings.regressor)
    return weights, offset


def _evaluate_stacks(X, mean, plan: SamplingPlan, rows_m, rows_c, W, off, xy_rows):
    """Held-out R² of every stack fit, summed over token chunks.

    Parameters
    ----------
    W : tensor (R, C)
        Weights of each fit on the centred tokens; ``off`` (R,) its offset.
    xy_rows : ndarray of int, shape (repeats, 2)
        The rows of the xy fits, whose constant (training-mean) prediction gives the chance RMSE.

    Returns
    -------
    r2 : ndarray (R,)
    sse : ndarray (R,)
        Σ over evaluation tokens of the squared residual.
    n_eval : ndarray (R,)
    chance_sse : ndarray (repeats, 2)
        Σ over the evaluation tokens of each xy fit of (y − training mean of y)², per coordinate.
    """
    torch = _torch()
    dev = mean.device
    rm, rc = rows_m.cpu().numpy(), rows_c.cpu().numpy()
    targets = torch.as_tensor(plan.targets)
    evaluate = torch.as_tensor(plan.evaluate[rm])                          # (R, N) bool: small
    xy = torch.as_tensor(xy_rows, device=dev)
    # Training mean of each xy coordinate, from its training tokens (the constant "chance" prediction).
    mean_train = torch.as_tensor(np.array([[plan.targets[rm[r], plan.train[rm[r]], rc[r]].mean() for r in row]
                                           for row in xy_rows]), device=dev)  # (repeats, 2)

    def terms(sl, Xc):
        y = targets[:, sl][rm, :, rc].to(dev)                              # (R, chunk)
        E = evaluate[:, sl].to(device=dev, dtype=torch.float64)
        pred = (Xc @ W.T).T + off[:, None]
        Ey = E * y
        chance = (((y[xy] - mean_train[:, :, None]) ** 2) * E[xy]).sum(2)
        return (((y - pred) ** 2) * E).sum(1), Ey.sum(1), (Ey * y).sum(1), chance

    sse, ey, ey2, chance_sse = _chunk_sums(X, mean, dev, terms)
    nE = torch.as_tensor(plan.evaluate[rm].sum(1), device=dev, dtype=torch.float64)
    sst = ey2 - ey ** 2 / nE
    tiny = sst <= 1e-12 * torch.clamp(ey2, min=1e-300)
    r2 = torch.where(tiny, torch.full_like(sse, float("nan")), 1.0 - sse / torch.where(tiny, 1.0, sst))
    return r2.cpu().numpy(), sse.cpu().numpy(), nE.cpu().numpy(), chance_sse.cpu().numpy()


def _channel_r2_sparse(X, mean, plan: SamplingPlan, rows_m, rows_c, alpha):
    """Per-channel R² when every evaluation set is all tokens or all but the training tokens.

    Then each evaluation sum is a whole-image sum (shared by all masks; for the fixed ramps shared by all
    fits) minus, at most, a sum over the few training tokens, gathered instead of multiplied by a dense mask:
    the cost is O(fits · n_train · C) plus one (columns × N) @ (N × C) product (over token chunks), not
    O(fits · N · C). Returns None for other evaluation sets.
    """
    torch = _torch()
    if plan.evaluate.all():
        complement = False
    elif np.array_equal(plan.evaluate, ~plan.train):
        complement = True
    else:
        return None
    dev = mean.device
    N = X.shape[0]
    counts = plan.train.sum(1)
    nmax = int(counts.max())
    idx_np = np.zeros((len(counts), nmax), dtype=np.int64)
    wt_np = np.zeros((len(counts), nmax))
    for m, row in enumerate(plan.train):
        where = np.flatnonzero(row)
        idx_np[m, : len(where)] = where
        wt_np[m, : len(where)] = 1.0
    wt = torch.as_tensor(wt_np, device=dev)
    Xg = _training_tokens(X, mean, idx_np) * wt[:, :, None]               # (M, nmax, C), padding zeroed
    n = wt.sum(1)
    S1, S2 = Xg.sum(1), (Xg * Xg).sum(1)
    rm, rc = rows_m.cpu().numpy(), rows_c.cpu().numpy()
    yg = torch.as_tensor(plan.targets[rm[:, None], idx_np[rm], rc[:, None]], device=dev) * wt[rows_m]  # (R, nmax)
    ty = yg.sum(1)
    # Σ_T x·y for every fit as one batched product per mask: fits of a mask sit in slots (M, P, nmax).
    slot = np.zeros(len(rm), dtype=np.int64)
    seen: dict[int, int] = {}
    for r, m in enumerate(rm.tolist()):
        slot[r] = seen.get(m, 0)
        seen[m] = slot[r] + 1
    slot_t = torch.as_tensor(slot, device=dev)
    packed = torch.zeros((Xg.shape[0], int(slot.max()) + 1, nmax), dtype=Xg.dtype, device=dev)
    packed[rows_m, slot_t] = yg
    txy = torch.bmm(packed, Xg)[rows_m, slot_t]                            # (R, C)
    # Whole-image sums over token chunks; Σ x·y is one product per distinct fixed target column (shared by all
    # masks) and one per fit of the random column (which differs per mask).
    random_col = TARGET_MATRIX_COLUMNS.index("random")
    fixed_rows, rand_rows = np.flatnonzero(rc != random_col), np.flatnonzero(rc == random_col)
    uniq, inverse = np.unique(rc[fixed_rows], return_inverse=True)
    targets = torch.as_tensor(plan.targets)

    def terms(sl, Xc):
        y = targets[:, sl][rm, :, rc].to(dev)                              # (R, chunk)
        table = targets[0, sl][:, uniq].to(dev).T @ Xc                     # (U, C)
        return y.sum(1), (y * y).sum(1), Xc.sum(0), (Xc * Xc).sum(0), table, y[rand_rows] @ Xc

    all_y, all_y2, all_x, all_x2, table, rand_yx = _chunk_sums(X, mean, dev, terms)
    all_yx = torch.empty((len(rm), X.shape[1]), dtype=Xg.dtype, device=dev)
    all_yx[torch.as_tensor(fixed_rows, device=dev)] = table[torch.as_tensor(inverse.ravel(), device=dev)]
    all_yx[torch.as_tensor(rand_rows, device=dev)] = rand_yx
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



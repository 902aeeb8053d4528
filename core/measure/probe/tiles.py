"""The tile frame of images extracted in tiles (``posvit extract --tile T --overlap O``).

A tiled image's token grid is blended from the grids of overlapping tiles, so the encoder's own positional pattern
comes back once per tile: stripes with the tile period, which ramps across the whole image miss. Here every token
gets its position *within its tile* (the tile whose centre is nearest to the token's centre, the one whose weight
dominates the blend), from which the probe builds the same ramps in the tile frame, and the **periodicity score**:
how much of the features' variance the tile phase (the position within the tile) explains.

Pure NumPy (plus torch for one grouped sum); nothing here reads stores.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import posvit_cli.core.measure.probe.solver as solver
from posvit_cli.core.measure.probe.settings import SamplingPlan

__all__ = ["TileFrame", "phase_periodicity", "tile_frame", "tile_frame_plan", "tile_ramp_columns"]


@dataclasses.dataclass(frozen=True)
class TileFrame:
    """Each token's position inside its tile.

    Attributes
    ----------
    row, col : ndarray of int, shape (h, w)
        Token row and column within the token's tile (0-based, in tokens).
    height, width : ndarray of int, shape (h, w)
        Size in tokens of the token's tile.
    tiles : (int, int)
        Tiles along rows and columns.
    """

    row: np.ndarray
    col: np.ndarray
    height: np.ndarray
    width: np.ndarray
    tiles: tuple[int, int]


def _axis_frame(n_tokens: int, starts_px, tile_px: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Position within the nearest-centred tile and that tile's length, for every token of one axis (tokens)."""
    starts = np.asarray([int(s) // patch for s in starts_px], dtype=np.int64)
    lengths = np.maximum(np.minimum(int(tile_px) // patch, n_tokens - starts), 1)
    centres = starts + lengths / 2.0
    t = np.arange(n_tokens, dtype=np.float64) + 0.5
    nearest = np.argmin(np.abs(t[:, None] - centres[None, :]), axis=1)   # ties go to the earlier tile
    pos = np.clip(np.arange(n_tokens) - starts[nearest], 0, lengths[nearest] - 1)
    return pos, lengths[nearest]


def tile_frame(grid: tuple[int, int], tiles: dict | None, patch: int) -> TileFrame | None:
    """The tile frame of an image from its recorded tile layout, or None when it was not split into tiles.

    Parameters
    ----------
    grid : (h, w)
        Token grid of the image.
    tiles : dict or None
        The image record's ``meta["tiles"]`` as ``extract --tile`` writes it: ``tile`` and ``overlap`` (pixels,
        patch multiples) and the tile starts ``rows`` and ``cols`` (pixels).
    patch : int
        Patch size in pixels (pixels per token).

    Returns
    -------
    TileFrame or None
        None for a missing layout or a single tile (the tile frame is then the image frame).
    """
    if not tiles or not patch or not tiles.get("rows") or not tiles.get("cols"):
        return None
    h, w = int(grid[0]), int(grid[1])
    ry, hy = _axis_frame(h, tiles["rows"], tiles["tile"], patch)
    cx, wx = _axis_frame(w, tiles["cols"], tiles["tile"], patch)
    n_tiles = (len(tiles["rows"]), len(tiles["cols"]))
    if n_tiles == (1, 1):
        return None
    return TileFrame(row=np.broadcast_to(ry[:, None], (h, w)), col=np.broadcast_to(cx[None, :], (h, w)),
                     height=np.broadcast_to(hy[:, None], (h, w)), width=np.broadcast_to(wx[None, :], (h, w)),
                     tiles=n_tiles)


def tile_ramp_columns(frame: TileFrame) -> np.ndarray:
    """The ramps ``lr, ud, diag, radial`` of :func:`~posvit_cli.core.measure.probe.settings.ramp_targets`, each
    computed in the token's tile (the tile's h × w in place of the image's).

    Returns
    -------
    ndarray of float64, shape (h·w, 4)
        Row-major token order, each column in [0, 1].
    """
    y, x = frame.row.astype(np.float64), frame.col.astype(np.float64)
    th, tw = frame.height.astype(np.float64), frame.width.astype(np.float64)
    lr = np.where(tw > 1, x / np.maximum(tw - 1, 1), 0.0)
    ud = np.where(th > 1, y / np.maximum(th - 1, 1), 0.0)
    side = np.maximum(np.maximum(th, tw) - 1, 1)
    diag = (y + x) / (2.0 * side)                     # mean of linspace(0, 1, max(th, tw)) along each axis
    cy, cx = frame.height // 2, frame.width // 2
    rho = np.hypot(y - cy, x - cx)
    rho_max = np.hypot(np.maximum(cy, frame.height - 1 - cy), np.maximum(cx, frame.width - 1 - cx))
    radial = 1.0 - rho / np.maximum(rho_max, 1e-12)
    return np.stack([a.ravel() for a in (lr, ud, diag, radial)], axis=-1)


def tile_frame_plan(plan: SamplingPlan, frame: TileFrame) -> SamplingPlan:
    """The same masks (and ``random``/``raster`` columns) with the four ramps replaced by their tile-frame versions."""
    targets = plan.targets.copy()
    targets[:, :, :4] = tile_ramp_columns(frame)[None]
    return dataclasses.replace(plan, targets=targets)


def phase_periodicity(features: np.ndarray, frame: TileFrame) -> dict[str, float]:
    """How much of every channel's variance the tile phase explains (one-way ANOVA per channel).

    The phase of a token is its (row, col) in its tile; tokens of equal phase form one class (K classes, N tokens).
    Per channel, with SS_t = Σ (x − x̄)², SS_b = Σ_k n_k (x̄_k − x̄)² and SS_w = SS_t − SS_b:
    η² = SS_b / SS_t and the chance-corrected ε² = (SS_b − (K − 1) · SS_w / (N − K)) / SS_t, which is ≈ 0 for
    features with no tile pattern (η² is then ≈ (K − 1)/(N − 1)) and 1 for features set entirely by the phase.

    Parameters
    ----------
    features : ndarray, shape (h, w, C)
    frame : TileFrame

    Returns
    -------
    dict
        ``periodicity`` (mean of ε² over channels with variance), ``eta2`` (mean of η²) and ``eta2_chance``
        ((K − 1)/(N − 1)); NaN when there are no more tokens than classes or no channel varies.
    """
    import torch

    h, w, C = features.shape
    N = h * w
    _, classes = np.unique(frame.row.ravel() * (int(frame.width.max()) + 1) + frame.col.ravel(), return_inverse=True)
    K = int(classes.max()) + 1
    # Sums over token chunks of float64 copies (see solver.CHUNK_TOKENS): a huge tiled image costs its features,
    # not float64 (N × C) copies of them.
    X = np.asarray(features).reshape(N, C)
    step = max(1, int(solver.CHUNK_TOKENS))
    chunks = range(0, N, step)
    mean = sum(torch.as_tensor(np.array(X[i:i + step], dtype=np.float64)).sum(0) for i in chunks) / N
    idx = torch.as_tensor(classes.ravel(), dtype=torch.int64)
    sums = torch.zeros((K, C), dtype=torch.float64)
    ss_t = torch.zeros(C, dtype=torch.float64)
    for i in chunks:
        Xc = torch.as_tensor(np.array(X[i:i + step], dtype=np.float64)) - mean
        sums.index_add_(0, idx[i:i + step], Xc)
        ss_t += (Xc * Xc).sum(0)
    counts = torch.bincount(idx, minlength=K).to(torch.float64)
    ss_b = (sums * sums / counts[:, None]).sum(0)
    varies = ss_t > 1e-12 * torch.clamp(ss_t.max(), min=1e-300)
    nan = float("nan")
    if N <= K or not bool(varies.any()):
        return {"periodicity": nan, "eta2": nan, "eta2_chance": nan if N <= 1 else (K - 1) / (N - 1)}
    ss_t, ss_b = ss_t[varies], ss_b[varies]
    ss_w = torch.clamp(ss_t - ss_b, min=0.0)
    eta2 = ss_b / ss_t
    eps2 = (ss_b - (K - 1) * ss_w / (N - K)) / ss_t
    return {"periodicity": float(eps2.mean()), "eta2": float(eta2.mean()), "eta2_chance": (K - 1) / (N - 1)}

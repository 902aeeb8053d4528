"""Scores of ``debias-train auto``: how positional a candidate head leaves the held-out images, and what it keeps.

Held-out images are read once into memory as float32 **windows** of at most ``window × window`` tokens (the
centre of larger grids), so memory is bounded by ``images × window² × C × 4`` bytes whatever the store holds.

Positional evidence (:func:`across_images_r2`, :func:`positional_scores`)
    *Across images* (what the rule uses): leave one held-out image out, fit a ridge of token coordinates on the
    others, score it on the one left out; a shared position code transfers, content does not (tiled images in
    their tile frame).
    *Within images*: ``probe``'s stack R² of the joint ``xy`` ramp (holdout protocol, ridge, 6 fresh masks per image, training
    fraction 1/36 raised to 16 tokens a fit, as the heads' reports), mean over the
    held-out images, and the same probe's ``random`` target (uniform noise drawn per fit) as its null: a
    feature set with no position scores ``xy`` about as the null does.

What is kept, without masks (:func:`neighbour_agreement`, :func:`cluster_stability`)
    *kNN agreement of the content*: for a seeded sample of query tokens per held-out image, the ``k`` nearest
    tokens of the same window by cosine similarity (the query itself excluded), before and after the head; the
    score is the mean of ``|NN_raw ∩ NN_debiased| / k`` (1 = every neighbourhood unchanged). Both are found on
    the tokens **less a smooth surface of position** (:func:`position_residual`: per channel, the least-squares
    bivariate polynomial of degree :data:`POSITION_DEGREE` in the window's coordinates). On a positional encoder
    a raw token's nearest neighbours are partly its grid neighbours, so comparing raw neighbourhoods would
    charge every head for the very position it removes (on the demo's textures: `posmean` 0.15, `svd-8` 0.32);
    on the residuals the reference is the content's geometry, and a head that removes only a smooth position
    code keeps it (a planted ramp blanked: 1.0).
    *Overclustering stability*: k-means (``kmeans_k`` clusters) of a seeded sample of debiased held-out tokens from
    two seeds; the adjusted Rand index of the two labelings (1 = the clustering does not depend on the seed). It is
    reported, not used by the rule.

What is kept, with masks (:func:`semantic_miou`)
    A closed-form ridge classifier (:func:`~posvit_cli.core.measure.semantic.heads.fit_ridge_head`) fitted on
    labelled tokens of the fit images after the head, scored on every labelled token of the held-out windows
    (one confusion matrix, :func:`~posvit_cli.core.measure.semantic.dataset.scores_from_confusion`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = ["HeldOut", "LabelledSample", "across_images_r2", "apply_window", "cluster_stability", "labelled_sample", "load_held_out",
           "neighbour_agreement", "position_residual", "positional_scores", "raw_neighbours", "semantic_miou"]


@dataclasses.dataclass
class HeldOut:
    """Held-out windows of a store, read once.

    Attributes
    ----------
    indices : list of int
        Store indices of the images.
    windows : list of ndarray (h, w, C) float32
        Raw final tokens of each window.
    grids : list of (int, int)
        Each image's whole token grid.
    origins : list of (int, int)
        ``(row, col)`` of each window's top-left token in its grid.
    names : list of str
    frames : list of TileFrame or None
        The tile frame of images extracted in tiles (:func:`~posvit_cli.core.measure.probe.tiles.tile_frame`),
        else None: the frame whose coordinates a tiled image's position code follows.
    """

    indices: list
    windows: list
    grids: list
    origins: list
    names: list
    frames: list = dataclasses.field(default_factory=list)


def _window_bounds(n: int, side: int) -> tuple[int, int]:
    """The central ``side`` tokens of an ``n``-token axis (all of it when shorter)."""
    if n <= side:
        return 0, n
    start = (n - side) // 2
    return start, start + side


def load_held_out(store, indices, *, layer: str = "final", window: int = 96) -> HeldOut:
    """Read the central window (at most ``window × window`` tokens) of each held-out image as float32."""
    from posvit_cli.core.measure.probe.dataset import tile_layout
    from posvit_cli.core.measure.probe.tiles import tile_frame

    out = HeldOut([], [], [], [], [], [])
    for i in indices:
        rec = store.record(i)
        h, w = rec.grid
        tiles = tile_layout(rec, store.patch_size).get("tiles")
        out.frames.append(tile_frame((int(h), int(w)), tiles, tiles["patch"]) if tiles else None)
        r0, r1 = _window_bounds(h, window)
        c0, c1 = _window_bounds(w, window)
        f = store.feature_rows(i, layer, r0, r1)[:, c0:c1]
        f = np.ascontiguousarray(f, dtype=np.float32)
        if not np.isfinite(f).all():
            raise PosvitError(f"features of image '{rec.name}' contain NaN or inf: re-extract it (e.g. --dtype float32)")
        out.indices.append(int(i))
        out.windows.append(f)
        out.grids.append((int(h), int(w)))
        out.origins.append((r0, c0))
        out.names.append(rec.name)
    return out


def apply_window(head, tokens: np.ndarray, grid: tuple[int, int], origin: tuple[int, int]) -> np.ndarray:
    """A head applied to a window ``(h, w, C)`` of an image whose grid is ``grid`` (None head: unchanged).

    Heads that act on each token alone ignore where the window lies; ``posmean`` subtracts its field resampled to
    the whole grid, cut to the window.
    """
    from posvit_cli.core.debias.heads import PosMeanHead

    if head is None:
        return tokens
    if isinstance(head, PosMeanHead):
        h, w = tokens.shape[:2]
        r0, c0 = origin
        field = head.field_on(grid, (r0, r0 + h))[:, c0:c0 + w]
        return (tokens - field).astype(np.float32, copy=False)
    return head.apply_numpy(tokens)


def positional_scores(windows: list, *, seed: int = 0) -> dict:
    """Stack R² of ``xy`` and of the ``random`` null, mean over windows (see the module docstring).

    Returns
    -------
    dict
        ``xy``, ``null`` (floats), ``fraction`` (the probe's training fraction).
    """
    from posvit_cli.core.measure.probe import make_settings, probe_dataset

    usable = [f for f in windows if f.shape[0] * f.shape[1] >= 32]
    if not usable:
        raise PosvitError("the held-out images have fewer than 32 tokens each: too small to probe position")
    smallest = min(f.shape[0] * f.shape[1] for f in usable)
    # The heads' before/after report's rule (published 1/36, raised so that 16 tokens train a fit): more training
    # tokens let ridge map any spatially smooth content to coordinates within an image, and every candidate,
    # debiased or not, then scores xy R2 near 1.
    fraction = min(0.5, max(1 / 36, 16 / smallest))
    settings, _ = make_settings("holdout", targets=("xy", "random"), per_channel=False, extras=False, seed=seed,
                                fraction=fraction)
    images = [{"name": f"held-out {j}", "path": "", "grid": list(f.shape[:2])} for j, f in enumerate(usable)]
    res = probe_dataset(lambda j, _ly: usable[j], images, ["final"], settings)
    stack = res["layers"]["final"]["stack_r2"]
    return {"xy": float(stack["xy"]["mean"]), "null": float(stack["random"]["mean"]), "fraction": fraction}


def _frame_coords(grid, origin, frame, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Normalised (x, y) in −1..1 of window tokens ``(rows, cols)``: in the image's tile frame when it was
    extracted in tiles (each tile's position code restarts), else over its whole grid."""
    r, c = origin[0] + rows, origin[1] + cols
    if frame is None:
        return np.stack([(c + 0.5) / grid[1] * 2 - 1, (r + 0.5) / grid[0] * 2 - 1], 1)
    return np.stack([(frame.col[r, c] + 0.5) / frame.width[r, c] * 2 - 1,
                     (frame.row[r, c] + 0.5) / frame.height[r, c] * 2 - 1], 1)


def across_images_r2(windows: list, grids: list, origins: list, *, frames: list | None = None, alpha: float = 1.0,
                     tokens: int = 2048, seed: int = 0) -> float | None:
    """R² of the (x, y) position of tokens of one held-out image, from a ridge fit on the other held-out images.

    Leave one image out: a ridge regression (standardised channels, penalty ``alpha``) of each token's normalised
    grid coordinates (−1..1 over its image's whole grid) is fitted on up to ``tokens`` seeded tokens of every other
    window and scored on up to ``tokens`` of the left-out one; the R² of x and y are averaged, then the folds. A
    position code shared by the images transfers; content does not (what a within-image probe with many training
    tokens reads off spatially smooth content does not carry over to another image), so no floor is needed: 0 =
    no position that generalises across images. Tiled images are placed in their tile frame, since each tile
    carries the encoder's positional pattern anew.

    Parameters
    ----------
    windows : list of ndarray (h, w, C)
        Held-out windows after a head.
    grids : list of (int, int)
        Each image's whole token grid.
    origins : list of (int, int)
        Each window's top-left token in its grid.
    frames : list of TileFrame or None, optional
        Tile frames of tiled images (coordinates within the tile), None entries (or None) for whole images.

    Returns
    -------
    float, or None with fewer than two windows.
    """
    if len(windows) < 2:
        return None
    rng = np.random.default_rng([int(seed), 11])
    feats, coords = [], []
    frames = frames or [None] * len(windows)
    for f, grid, origin, frame in zip(windows, grids, origins, frames):
        h, w, c = f.shape
        pick = np.sort(rng.choice(h * w, size=min(tokens, h * w), replace=False))
        rows, cols = np.divmod(pick, w)
        feats.append(f.reshape(h * w, c)[pick].astype(np.float64))
        coords.append(_frame_coords(grid, origin, frame, rows, cols))
    scores = []
    for j in range(len(windows)):
        x = np.concatenate([f for i, f in enumerate(feats) if i != j])
        y = np.concatenate([t for i, t in enumerate(coords) if i != j])
        mu, sd = x.mean(0), x.std(0)
        sd[sd < 1e-12] = 1.0
        xs = (x - mu) / sd
        beta = np.linalg.solve(xs.T @ xs + alpha * np.eye(xs.shape[1]), xs.T @ (y - y.mean(0)))
        pred = ((feats[j] - mu) / sd) @ beta + y.mean(0)
        sst = ((coords[j] - coords[j].mean(0)) ** 2).sum(0)
        r2 = 1 - ((coords[j] - pred) ** 2).sum(0) / np.where(sst > 0, sst, np.nan)
        scores.append(float(np.nanmean(r2)))
    return float(np.mean(scores))


#: Degree of the smooth surface of position taken out of every window before neighbours are compared.
POSITION_DEGREE = 3


def position_residual(tokens: np.ndarray, degree: int = POSITION_DEGREE) -> np.ndarray:
    """Tokens less their least-squares fit by a bivariate polynomial of position, per channel.

    Parameters
    ----------
    tokens : ndarray, shape (h, w, C)
        One window of a token grid.
    degree : int
        Total degree of the polynomial in the normalised coordinates (x, y) ∈ [−1, 1]² (3: 10 terms).

    Returns
    -------
    ndarray, shape (h * w, C), float64
        The residual tokens, row-major. Windows with fewer than twice as many tokens as terms are only centred.
    """
    h, w, c = tokens.shape
    x = tokens.reshape(h * w, c).astype(np.float64)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    terms = [(xx**i * yy**j).ravel() for i in range(degree + 1) for j in range(degree + 1 - i)]
    if h * w < 2 * len(terms):
        return x - x.mean(0)
    q, _ = np.linalg.qr(np.stack(terms, 1))
    return x - q @ (q.T @ x)


def _unit_rows(x: np.ndarray):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).double()
    return t / torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min(1e-12)


def _neighbours(tokens: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices ``(q, k)`` of the ``k`` most cosine-similar tokens of ``tokens (n, C)`` to each query (not itself)."""
    import torch

    x = _unit_rows(tokens)
    sim = x[torch.from_numpy(queries)] @ x.T
    sim[torch.arange(len(queries)), torch.from_numpy(queries)] = -float("inf")
    return torch.topk(sim, k, dim=1).indices.numpy()


def raw_neighbours(held: HeldOut, *, k: int = 10, queries: int = 256, seed: int = 0) -> list:
    """Per window: the seeded query token indices and their ``k`` nearest neighbours among the raw tokens less
    their smooth surface of position (:func:`position_residual`)."""
    out = []
    for j, f in enumerate(held.windows):
        n = f.shape[0] * f.shape[1]
        kk = min(k, n - 1)
        if kk < 1:
            out.append(None)
            continue
        rng = np.random.default_rng([int(seed), 7, j])
        q = np.sort(rng.choice(n, size=min(queries, n), replace=False))
        out.append((q, _neighbours(position_residual(f), q, kk)))
    return out


def neighbour_agreement(cleaned: list, raw: list) -> float:
    """Mean ``|NN_raw ∩ NN_clean| / k`` over the queries of :func:`raw_neighbours` (windows after the head, less
    their smooth surface of position)."""
    scores = []
    for f, entry in zip(cleaned, raw):
        if entry is None:
            continue
        q, nn_raw = entry
        kk = nn_raw.shape[1]
        nn = _neighbours(position_residual(f), q, kk)
        hits = (nn[:, :, None] == nn_raw[:, None, :]).any(axis=2).sum(axis=1)
        scores.append(hits / kk)
    return float(np.concatenate(scores).mean()) if scores else float("nan")


def cluster_stability(cleaned: list, *, k: int = 8, tokens: int = 4096, seed: int = 0) -> float:
    """Adjusted Rand index of k-means labelings from two seeds on a seeded sample of the windows' tokens."""
    from sklearn.metrics import adjusted_rand_score

    from posvit_cli.core.cluster.kmeans import kmeans
    from posvit_cli.core.device import torch_threads

    per = max(1, tokens // max(1, len(cleaned)))
    rng = np.random.default_rng([int(seed), 11])
    parts = []
    for f in cleaned:
        flat = f.reshape(-1, f.shape[-1])
        take = rng.choice(len(flat), size=min(per, len(flat)), replace=False)
        parts.append(flat[np.sort(take)])
    x = np.concatenate(parts).astype(np.float32)
    kk = min(k, len(x))
    if kk < 2:
        return float("nan")
    # One thread, torch's batched Lloyd: on a few thousand points, more threads (or scikit-learn's OpenMP) spend
    # their time waiting on shared cores (0.09 s against 1.8 s on a loaded 2-core machine).
    with torch_threads(1):
        a = kmeans(x, kk, seed=int(seed) * 2 + 1, max_iter=30, algorithm="batched").labels
        b = kmeans(x, kk, seed=int(seed) * 2 + 2, max_iter=30, algorithm="batched").labels
    return float(adjusted_rand_score(a, b))


# --------------------------------------------------------------------------------------------------------------
# With masks


@dataclasses.dataclass
class LabelledSample:
    """Labelled tokens of the fit images (for the ridge classifier) and token masks of the held-out windows.

    Attributes
    ----------
    parts : list of (ndarray (n, C) float32, ndarray (n,) int64, grid, rows, cols)
        Per fit image: sampled labelled tokens, their classes, the image's grid and the tokens' positions.
    held_masks : list of ndarray (h, w) int64
        Token-grid classes of each held-out window (``ignore`` where unlabelled).
    num_classes : int
    ignore : int or None
    """

    parts: list
    held_masks: list
    num_classes: int
    ignore: int | None


def labelled_sample(store, masks, fit: list, held: HeldOut, *, layer: str = "final",
                    ignore_index: int | None = 255, max_tokens: int = 20_000, seed: int = 0) -> LabelledSample:
    """Read masks (one label reader: :class:`~posvit_cli.core.measure.semantic.dataset.MaskSource`) and sample
    labelled fit tokens evenly per image, at most ``max_tokens`` in all."""
    from posvit_cli.core.measure.semantic.dataset import MaskSource, scan_masks

    source = MaskSource(store, masks)
    scan = scan_masks(source, list(fit) + list(held.indices), ignore_index=ignore_index)
    if scan.max_label < 0:
        raise PosvitError(f"the masks in '{masks}' hold no labelled pixel")
    num_classes = scan.max_label + 1
    per = max(1, max_tokens // max(1, len(fit)))
    rng = np.random.default_rng([int(seed), 13])
    parts = []
    for i in fit:
        lab = scan.tokens[i].reshape(-1)
        ok = np.nonzero(lab != ignore_index)[0] if ignore_index is not None else np.arange(lab.size)
        if ok.size == 0:
            continue
        pick = np.sort(rng.choice(ok, size=min(per, ok.size), replace=False))
        h, w = store.record(i).grid
        parts.append((_picked_rows(store, i, layer, (h, w), pick), lab[pick].astype(np.int64), (h, w), pick // w,
                      pick % w))
    if not parts:
        raise PosvitError(f"no fit image has a labelled token in '{masks}'")
    held_masks = []
    for i, (r0, c0), f in zip(held.indices, held.origins, held.windows):
        held_masks.append(scan.tokens[i][r0:r0 + f.shape[0], c0:c0 + f.shape[1]].astype(np.int64))
    return LabelledSample(parts, held_masks, num_classes, ignore_index)


def _picked_rows(store, index: int, layer: str, grid, pick: np.ndarray, band_tokens: int = 65_536) -> np.ndarray:
    """Tokens ``pick`` (sorted row-major indices) of one image as float32 ``(n, C)``, read in row bands so that a
    huge grid is never held whole."""
    h, w = grid
    rows = max(1, band_tokens // w)
    out = []
    for start in range(0, h, rows):
        stop = min(h, start + rows)
        lo, hi = np.searchsorted(pick, [start * w, stop * w])
        if hi > lo:
            band = store.feature_rows(index, layer, start, stop).reshape((stop - start) * w, -1)
            out.append(np.asarray(band[pick[lo:hi] - start * w], dtype=np.float32))
    return np.concatenate(out)


def _apply_points(head, tokens: np.ndarray, grid, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from posvit_cli.core.debias.heads import PosMeanHead

    if head is None:
        return tokens
    if isinstance(head, PosMeanHead):
        if grid[0] * grid[1] <= 65_536:
            return (tokens - head.field_on(grid)[rows, cols]).astype(np.float32, copy=False)
        out = np.empty_like(tokens, dtype=np.float32)  # a huge grid: the field one needed row at a time
        for r in np.unique(rows):
            sel = rows == r
            out[sel] = tokens[sel] - head.field_on(grid, (int(r), int(r) + 1))[0, cols[sel]]
        return out
    return head.apply_numpy(tokens)


def semantic_miou(head, sample: LabelledSample, cleaned: list) -> float:
    """mIoU on the held-out windows of a ridge classifier fitted on the fit sample, both after ``head``."""
    from posvit_cli.core.measure.semantic.dataset import scores_from_confusion
    from posvit_cli.core.measure.semantic.heads import fit_ridge_head

    X = np.concatenate([_apply_points(head, f, g, r, c) for f, _, g, r, c in sample.parts])
    y = np.concatenate([lab for _, lab, _, _, _ in sample.parts])
    clf = fit_ridge_head(X, y, sample.num_classes)
    K = sample.num_classes
    conf = np.zeros((K, K), dtype=np.int64)
    for f, lab in zip(cleaned, sample.held_masks):
        pred = clf.logits(f).argmax(-1).numpy().reshape(-1)
        truth = lab.reshape(-1)
        ok = (truth >= 0) & (truth < K)
        conf += np.bincount(truth[ok] * K + pred[ok], minlength=K * K).reshape(K, K)
    return scores_from_confusion(conf, [str(c) for c in range(K)])["miou"]

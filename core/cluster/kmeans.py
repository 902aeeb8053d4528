"""k-means on torch (CPU or CUDA): sampled greedy k-means++ seeding and exact Lloyd iterations.

Two exact Lloyd engines give the same clustering from the same seeding (up to floating-point ties):

``bounded`` (large problems)
    Lloyd's algorithm with distance bounds that skip work without changing the result: Hamerly's (2010)
    upper bound on each point's distance to its own centre and, as in Yinyang k-means (Ding et al. 2015), one
    lower bound per *group* of centres (about k/10 groups of nearby centres; one group makes it Hamerly's
    algorithm). After the centres move, upper bounds grow by the own centre's shift and each group bound
    shrinks by the largest shift in that group. Only points whose upper bound exceeds a group bound are looked
    at: their exact distance to their own centre first, then distances to the centres of the groups whose bound
    still fails, through one GEMM per group. Once the clustering settles most points are skipped. Centre sums
    are kept in float64 and updated only for points that changed cluster.
``batched`` (small problems such as per-image decompositions)
    Plain Lloyd with all restarts stacked in one batched GEMM, so 15 restarts on a 37×37 grid cost about as
    much as one.

Distances come from ``‖x‖² + ‖c‖² − 2 x·c`` one chunk of points at a time (no ``n × k`` matrix); the data are
centred first (a copy), which keeps that expansion accurate, and lower bounds carry a slack for its rounding.

Seeding is greedy k-means++ (Arthur & Vassilvitskii 2007; the variant scikit-learn uses): each new centre is the
best of ``2 + ⌊ln k⌋`` candidates drawn with probability proportional to the squared distance to the nearest
centre chosen so far, "best" meaning the candidate that lowers the total potential most. On large data it runs
on a uniform random subsample of ``init_sample`` points (default ``max(64·k, 20 000)``): seeding costs
``O(k · trials · sample · d)`` and, on all of a million points, rivals the whole Lloyd run, while the Lloyd
iterations on all points wash out the difference (the benchmark reports the inertia reached).

All randomness comes from one ``torch.Generator`` on the CPU seeded with ``seed``, so a run is reproducible and
the seeding does not depend on the device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["KMeansResult", "assign_labels", "kmeans", "kmeans_plus_plus"]

#: ``n · k · n_init`` up to which the batched engine is used (all restarts in one tensor).
SMALL_PROBLEM = 2_000_000
#: Candidates re-assigned with one dense product over all centres when more than this fraction of their
#: (group, point) pairs must be looked at; below it, per-group products over the pairs that need them.
DENSE_LOOK_FRACTION = 0.15
_DEFAULT_CHUNK_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}


@dataclasses.dataclass
class KMeansResult:
    """The best of ``n_init`` k-means runs.

    Attributes
    ----------
    centers : ndarray of float32, shape (k, d)
    labels : ndarray of int64, shape (n,)
        Index of the nearest centre of every point (the final assignment to the returned centres).
    inertia : float
        Sum of squared Euclidean distances of points to their centres (computed exactly in float64).
    n_iter : int
        Lloyd iterations (assignment + centre update) of the best run.
    converged : bool
        True when the best run stopped because no label changed (or the centre shift fell below ``tol``).
    inertias : list of float
        Inertia of every restart, in order.
    best_restart : int
    algorithm : str
        The Lloyd engine used: ``batched``, or ``yinyang`` / ``hamerly`` (the bounded engine with several
        groups of centres or one).
    """

    centers: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int
    converged: bool
    inertias: list
    best_restart: int
    algorithm: str


def kmeans(
    x,
    k: int,
    *,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float = 0.0,
    seed: int = 0,
    init: str = "k-means++",
    init_sample: int | None = None,
    algorithm: str = "auto",
    device=None,
    chunk_bytes: int | None = None,
    progress: ProgressCallback | None = None,
    task: str | None = None,
) -> KMeansResult:
    """Cluster points with k-means (squared Euclidean distance), keeping the best of ``n_init`` restarts.

    Parameters
    ----------
    x : ndarray or torch.Tensor, shape (n, d)
        Points (cast to float32).
    k : int
        Number of clusters, ``1 ≤ k ≤ n``.
    n_init : int
        Restarts from independent seedings; the one with the lowest inertia is returned.
    max_iter : int
        Maximum Lloyd iterations per restart (one iteration = assign every point, then move every centre).
    tol : float
        Stop early when the summed squared centre shift is at most ``tol`` times the mean per-dimension variance
        of ``x`` (scikit-learn's rule). ``0`` stops only when no label changes.
    seed : int
        Seed of the generator behind the seeding (restart ``r`` continues the same generator).
    init : {"k-means++", "random"} or array (k, d)
        Greedy k-means++ seeding, ``k`` distinct points drawn uniformly (faiss's default), or given initial
        centres (then ``n_init`` is 1).
    init_sample : int, optional
        Points the k-means++ seeding looks at (a uniform subsample). Default ``max(64·k, 20 000)``; ``0`` or a
        value ≥ n uses all points.
    algorithm : {"auto", "bounded", "batched"}
        Lloyd engine (see the module docstring); ``auto`` picks ``batched`` when ``n·k·n_init`` is at most
        :data:`SMALL_PROBLEM`.
    device : str or torch.device, optional
        Where to compute; default: the device of ``x`` when it is a tensor, else CPU.
    chunk_bytes : int, optional
        Largest ``chunk × k`` distance block, in bytes (default 16 MiB on CPU, 256 MiB on CUDA).
    progress : callable, optional
        ``progress(task, completed, total)`` after every iteration (total = ``n_init · max_iter``).
    task : str, optional
        Progress task name; default ``"k-means k={k}"``.

    Returns
    -------
    KMeansResult

    Raises
    ------
    PosvitError
        If ``k`` is not in ``1..n`` or an option is out of range.
    """
    import torch

    given = None
    if not isinstance(init, str):
        given = torch.as_tensor(np.asarray(init), dtype=torch.float32)
        if given.ndim != 2 or given.shape[0] != k:
            raise PosvitError(f"initial centres must have shape ({k}, d), got {tuple(given.shape)}")
        n_init = 1
    elif init not in ("k-means++", "random"):
        raise PosvitError(f"unknown k-means init '{init}': use k-means++, random or an array of centres")
    if algorithm not in ("auto", "bounded", "batched", "sklearn"):
        raise PosvitError(f"unknown k-means algorithm '{algorithm}': use auto, bounded, batched or sklearn")
    if n_init < 1 or max_iter < 1:
        raise PosvitError("k-means needs n_init ≥ 1 and max_iter ≥ 1")
    dev = torch.device(device) if device is not None else (x.device if torch.is_tensor(x) else torch.device("cpu"))
    xt = torch.as_tensor(x).to(device=dev, dtype=torch.float32)
    if xt.ndim != 2:
        raise PosvitError(f"k-means needs an (n, d) array of points, got shape {tuple(xt.shape)}")
    n, d = xt.shape
    if not 1 <= k <= n:
        raise PosvitError(f"cannot make {k} clusters from {n} points: k must be between 1 and {n}")
    if not torch.isfinite(xt).all():
        raise PosvitError("k-means input holds NaN or infinite values")
    # Centring makes ‖x‖² + ‖c‖² − 2x·c accurate (no large common offset to cancel) and changes no distance.
    mean = xt.mean(0, dtype=torch.float64).to(torch.float32)
    xc = xt - mean
    del xt
    chunk = _chunk_rows(k, n, dev, chunk_bytes)
    report_ = report(progress)
    task = task or f"k-means k={k}"
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    tol_abs = float(tol) * float(xc.var(0, unbiased=False).mean()) if tol > 0 else 0.0
    engine = algorithm
    if engine == "auto":
        # Small problems on a CPU: scikit-learn's fused Cython Lloyd beats torch's many small kernels (measured
        # 3x on 23k x 50, k=12); large ones: the bounded torch Lloyd below (3x scikit-learn at 1M x 50, k=300, one thread).
        small = n * k * n_init <= SMALL_PROBLEM
        engine = ("sklearn" if dev.type == "cpu" else "batched") if small else "bounded"

    seeds = []
    if given is not None:
        if given.shape[1] != d:
            raise PosvitError(f"initial centres have {given.shape[1]} dimensions, the points {d}")
        seeds.append(given.to(dev) - mean)
    for _ in range(n_init if given is None else 0):
        if init == "random":
            idx = torch.randperm(n, generator=gen)[:k]
            seeds.append(xc[idx.to(dev)].clone())
        else:
            seeds.append(kmeans_plus_plus(xc, k, generator=gen, sample=init_sample, chunk_rows=chunk))
    total = n_init * max_iter

    if engine == "batched":
        centers, labels, inertias, iters, conv = _lloyd_batched(xc, torch.stack(seeds), max_iter, tol_abs,
                                                                lambda i: report_(task, i, max_iter))
        best = int(np.argmin(inertias))
        report_(task, max_iter, max_iter)
        return KMeansResult(
            centers=(centers[best] + mean).cpu().numpy(), labels=labels[best].cpu().numpy(),
            inertia=float(inertias[best]), n_iter=int(iters[best]), converged=bool(conv[best]),
            inertias=[float(v) for v in inertias], best_restart=best, algorithm="batched",
        )

    if engine == "sklearn":
        return _lloyd_sklearn(xc, seeds, mean, max_iter, tol, lambda i: report_(task, i, total))

    best_res = None
    all_inertias = []
    for r, c0 in enumerate(seeds):
        offset = r * max_iter
        res = _lloyd_bounded(xc, c0, max_iter, tol_abs, chunk, lambda i, o=offset: report_(task, o + i, total))
        all_inertias.append(res[2])
        if best_res is None or res[2] < best_res[2]:
            best_res = (*res, r)
    report_(task, total, total)
    centers, labels, inertia, n_iter, converged, best = best_res
    return KMeansResult(
        centers=(centers + mean).cpu().numpy(), labels=labels.cpu().numpy(), inertia=float(inertia),
        n_iter=int(n_iter), converged=bool(converged), inertias=all_inertias, best_restart=int(best),
        algorithm="yinyang" if _n_groups(k, n) > 1 else "hamerly",
    )


def _lloyd_sklearn(xc, seeds, mean, max_iter: int, tol: float, tick) -> KMeansResult:
    """Lloyd iterations by scikit-learn from posvit's seedings (CPU), one restart per seeding."""
    import torch
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = xc.cpu().numpy()
    results = []
    with threadpool_limits(torch.get_num_threads()):
        for r, c0 in enumerate(seeds):
            km = KMeans(n_clusters=c0.shape[0], init=c0.cpu().numpy(), n_init=1, max_iter=max_iter, tol=tol,
                        algorithm="lloyd", copy_x=True)
            km.fit(x)
            results.append(km)
            tick((r + 1) * max_iter)
    inertias = [float(km.inertia_) for km in results]
    best = int(np.argmin(inertias))
    km = results[best]
    return KMeansResult(
        centers=km.cluster_centers_ + mean.cpu().numpy(), labels=km.labels_.astype(np.int64),
        inertia=inertias[best], n_iter=int(km.n_iter_), converged=bool(km.n_iter_ < max_iter),
        inertias=inertias, best_restart=best, algorithm="sklearn-lloyd",
    )


def assign_labels(x, centers, *, device=None, chunk_bytes: int | None = None):
    """Nearest centre of every point, in chunks.

    Parameters
    ----------
    x : ndarray or torch.Tensor, shape (n, d)
    centers : ndarray or torch.Tensor, shape (k, d)

    Returns
    -------
    labels : ndarray of int64, shape (n,)
    sq_dist : ndarray of float64, shape (n,): squared distance to that centre (direct, not the GEMM expansion).
    """
    import torch

    dev = torch.device(device) if device is not None else (x.device if torch.is_tensor(x) else torch.device("cpu"))
    xt = torch.as_tensor(x).to(device=dev, dtype=torch.float32)
    c = torch.as_tensor(centers).to(device=dev, dtype=torch.float32)
    mean = c.mean(0)
    xt, c = xt - mean, c - mean
    chunk = _chunk_rows(c.shape[0], xt.shape[0], dev, chunk_bytes)
    labels = torch.empty(xt.shape[0], dtype=torch.long, device=dev)
    cn = (c * c).sum(1)
    ct = c.T.contiguous()
    for s in range(0, xt.shape[0], chunk):
        labels[s : s + chunk] = _scores(xt[s : s + chunk], ct, cn).argmin(1)
    sq = _sq_dist_to(xt, c, labels, chunk)
    return labels.cpu().numpy(), sq.cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# Seeding


def kmeans_plus_plus(x, k: int, *, generator=None, sample: int | None = None, n_trials: int | None = None,
                     chunk_rows: int | None = None):
    """Greedy k-means++ seeding on a uniform subsample of the points.

    Parameters
    ----------
    x : torch.Tensor, shape (n, d), float32
    k : int
    generator : torch.Generator (CPU), optional
    sample : int, optional
        Subsample size (default ``max(64·k, 20 000)``; ``0`` = all points).
    n_trials : int, optional
        Candidates per step (default ``2 + ⌊ln k⌋``).

    Returns
    -------
    torch.Tensor, shape (k, d)
        Centres, each a data point.
    """
    import torch

    n = x.shape[0]
    if sample is None:
        sample = max(64 * k, 20_000)
    if sample and sample < n:
        idx = torch.randperm(n, generator=generator)[:sample].to(x.device)
        pts = x[idx]
    else:
        pts = x
    m = pts.shape[0]
    trials = n_trials or 2 + int(math.log(k))
    chunk = chunk_rows or m
    pn = (pts * pts).sum(1)
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(m, (1,), generator=generator))
    centers[0] = pts[first]
    closest = _sq_to_points(pts, pn, pts[first : first + 1], chunk)[0]
    for j in range(1, k):
        weights = closest.double().cpu()
        pot = float(weights.sum())
        if pot <= 0:
            # Fewer distinct points than centres so far: any point is as good as any other.
            cand = torch.randint(m, (trials,), generator=generator)
        else:
            # Inverse-CDF sampling (as numpy's searchsorted) rather than torch.multinomial, which caps categories.
            u = torch.rand(trials, generator=generator, dtype=torch.float64) * pot
            cand = torch.searchsorted(torch.cumsum(weights, 0), u).clamp_(max=m - 1)
        cand = cand.to(x.device)
        d_cand = _sq_to_points(pts, pn, pts[cand], chunk)  # (trials, m)
        torch.minimum(d_cand, closest[None, :], out=d_cand)
        best = int(d_cand.sum(1, dtype=torch.float64).argmin())
        closest = d_cand[best]
        centers[j] = pts[cand[best]]
    return centers


def _sq_to_points(pts, pn, cands, chunk: int):
    """Squared distances ``(len(cands), len(pts))``, clamped at 0."""
    import torch

    cn = (cands * cands).sum(1)
    out = torch.empty(cands.shape[0], pts.shape[0], dtype=pts.dtype, device=pts.device)
    for s in range(0, pts.shape[0], chunk):
        block = torch.addmm(pn[None, s : s + chunk], cands, pts[s : s + chunk].T, alpha=-2.0)
        out[:, s : s + chunk] = block.add_(cn[:, None]).clamp_(min=0)
    return out


# --------------------------------------------------------------------------------------------------------------
# Lloyd engines


def _chunk_rows(k: int, n: int, dev, chunk_bytes: int | None) -> int:
    budget = chunk_bytes or _DEFAULT_CHUNK_BYTES.get(dev.type, _DEFAULT_CHUNK_BYTES["cuda"])
    return int(max(256, min(n, budget // (4 * max(k, 1)))))


def _scores(xs, ct, cn):
    """``‖c‖² − 2 x·c`` for a chunk of points: the squared distance minus ``‖x‖²``, shape (m, k)."""
    import torch

    return torch.addmm(cn[None, :], xs, ct, alpha=-2.0)


def _sq_dist_to(x, centers, labels, chunk: int):
    """Exact squared distance of every point to its own centre (float64), in chunks."""
    import torch

    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        diff = x[s : s + chunk] - centers.index_select(0, labels[s : s + chunk])
        out[s : s + chunk] = (diff * diff).sum(1, dtype=torch.float64)
    return out


def _balanced_groups(centers, n_groups: int):
    """Split centres into ``n_groups`` (a power of two) equal-sized, spatially compact groups.

    Recursive median splits along each subset's direction of largest spread (a balanced k-d split), so the
    groups can be laid out as an ``(n_groups, size)`` block of the distance matrix.

    Returns
    -------
    list of torch.Tensor: centre indices of each group.
    """
    import torch

    groups = [torch.arange(centers.shape[0], device=centers.device)]
    while len(groups) < n_groups:
        nxt = []
        for g in groups:
            pts = centers[g] - centers[g].mean(0)
            # Top principal direction by a few power iterations (exact enough for a split).
            v = pts.abs().sum(0) + 1e-12
            for _ in range(8):
                v = pts.T @ (pts @ v)
                v = v / v.norm().clamp(min=1e-30)
            order = torch.argsort(pts @ v)
            half = (g.numel() + 1) // 2
            nxt += [g[order[:half]], g[order[half:]]]
        groups = nxt
    return groups


class _Layout:
    """Centres arranged group after group in ``(n_groups, size)`` slots; padding slots hold no centre.

    Distances are computed against the slot layout, so the per-group minimum is a reshape and a ``min``.
    Padding slots get an infinite norm, which makes their score infinite: they are never nearest.
    """

    def __init__(self, centers, n_groups: int):
        import torch

        k = centers.shape[0]
        groups = _balanced_groups(centers, n_groups) if n_groups > 1 else [torch.arange(k, device=centers.device)]
        self.t = len(groups)
        self.size = max(g.numel() for g in groups)
        self.slots = self.t * self.size
        slot_center = torch.full((self.slots,), -1, dtype=torch.long, device=centers.device)
        for i, g in enumerate(groups):
            slot_center[i * self.size : i * self.size + g.numel()] = g
        self.slot_center = slot_center
        self.real = slot_center >= 0

    def to_slots(self, centers):
        import torch

        out = torch.zeros(self.slots, centers.shape[1], dtype=centers.dtype, device=centers.device)
        out[self.real] = centers[self.slot_center[self.real]]
        return out

    def norms(self, centers_slots):
        cn = (centers_slots * centers_slots).sum(1)
        return cn.masked_fill(~self.real, float("inf"))


def _assign_grouped(x, xn, centers, cn, layout: _Layout, chunk: int):
    """Nearest slot of every point, exact distance to it, and lower bounds on the distance to each group.

    Returns
    -------
    labels : (m,) slot indices
    upper : (m,) float32, exact distance to the nearest centre
    group_lower : (t, m) float32, distance to the nearest centre of each group, the point's own centre excluded
    """
    import torch

    m = x.shape[0]
    t, size = layout.t, layout.size
    labels = torch.empty(m, dtype=torch.long, device=x.device)
    group_lower = torch.empty(t, m, dtype=torch.float32, device=x.device)
    cmax = cn[layout.real].max()
    cn_col = cn[:, None]
    for s in range(0, m, chunk):
        xs = x[s : s + chunk]
        r = xs.shape[0]
        # Scores laid out (slots, points): reductions over slots then run along contiguous rows of points,
        # which vectorises (a min over a short inner axis does not).
        sc = torch.addmm(cn_col, centers, xs.T, alpha=-2.0).view(t, size, r)
        gmin = sc.amin(1)  # (t, r)
        best_g = _argmin_rows(gmin)[1]  # (r,)
        if size > 1:
            own = sc.gather(0, best_g.view(1, 1, r).expand(1, size, r))[0]  # (size, r): the best group's scores
            best_in = _argmin_rows(own)[1]
            own.scatter_(0, best_in[None], float("inf"))
            second = own.amin(0)
        else:
            best_in = torch.zeros_like(best_g)
            second = torch.full((r,), float("inf"), device=x.device)
        labels[s : s + r] = best_g * size + best_in
        gmin.scatter_(0, best_g[None], second[None])
        xr = xn[None, s : s + r]
        # Absolute slack for the rounding of the GEMM expansion: a lower bound must never overshoot.
        group_lower[:, s : s + r] = (gmin + xr - 1e-5 * (xr + cmax)).clamp_(min=0).sqrt_()
    upper = _sq_dist_to(x, centers, labels, chunk).sqrt_().to(torch.float32)
    return labels, upper, group_lower


def _argmin_rows(a):
    """``a.min(0)`` (values, first index of the minimum) for a short (rows, n) matrix: torch's argmin over a
    leading axis does not vectorise on CPU; two passes that do (minimum, then first row attaining it) are faster."""
    import torch

    best = a.amin(0)
    # Row numbers as float32: AVX2 has no 64-bit integer minimum, so an int64 amin runs scalar and is ~50× slower.
    rows = torch.arange(a.shape[0], device=a.device, dtype=torch.float32)[:, None]
    return best, torch.where(a == best[None, :], rows, float(a.shape[0])).amin(0).long()


def _update_centers(x, sums, counts, centers_old, labels, upper, real):
    """New centres from float64 sums; an empty cluster takes the point farthest from its centre (sklearn's rule)."""
    import torch

    empty = ((counts == 0) & real).nonzero().flatten()
    moved = None
    if empty.numel():
        far = torch.topk(upper, min(empty.numel(), upper.numel())).indices
        moved = far[: empty.numel()]
        empty = empty[: moved.numel()]
        old = labels[moved]
        xd = x[moved].double()
        sums.index_add_(0, old, -xd)
        counts.index_add_(0, old, -torch.ones_like(old))
        sums[empty] = xd
        counts[empty] = 1
        labels[moved] = empty
        upper[moved] = 0.0
    centers = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].double(), centers_old.double())
    return centers.to(torch.float32), moved


def _n_groups(k: int, n: int) -> int:
    """Yinyang groups: about k/10, a power of two, at most 32 (the bounds cost n × groups floats)."""
    t = 1
    while t * 2 <= min(k / 10, 32):
        t *= 2
    return t


def _lloyd_bounded(x, centers0, max_iter: int, tol_abs: float, chunk: int, tick):
    """Exact Lloyd iterations with per-group distance bounds (Yinyang's global filter).

    Returns centres (k, d), labels (n,), inertia, n_iter, converged.
    """
    import torch

    n, d = x.shape
    k = centers0.shape[0]
    layout = _Layout(centers0, _n_groups(k, n))
    real = layout.real
    centers = layout.to_slots(centers0)
    cn = layout.norms(centers)
    xn = (x * x).sum(1)
    labels, upper, group_lower = _assign_grouped(x, xn, centers, cn, layout, chunk)
    sums = torch.zeros(layout.slots, d, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        sums.index_add_(0, labels[s : s + chunk], x[s : s + chunk].double())
    counts = torch.bincount(labels, minlength=layout.slots)
    converged = False
    n_iter = 0
    shift = None
    block = 65536 if x.device.type == "cpu" else 1 << 20
    state = dict(x=x, xn=xn, labels=labels, upper=upper, group_lower=group_lower, sums=sums, counts=counts,
                 layout=layout, chunk=chunk, block=block)
    for it in range(1, max_iter + 1):
        if it > 1:
            changed = _bounded_reassign(state, centers, cn, shift)
            if changed == 0:
                converged = True
                n_iter = it - 1
                break
        new_centers, moved = _update_centers(x, sums, counts, centers, labels, upper, real)
        if moved is not None:
            group_lower[:, moved] = 0.0
        shift = (new_centers - centers).norm(dim=1)
        centers = new_centers
        cn = layout.norms(centers)
        n_iter = it
        tick(it)
        if tol_abs > 0 and float((shift * shift).sum()) <= tol_abs:
            converged = True
            break
    if shift is not None and (not converged or tol_abs > 0):
        # The last update moved the centres: assign once more so the labels belong to the returned centres.
        _bounded_reassign(state, centers, cn, shift)
    inertia = float(_sq_dist_to(x, centers, labels, chunk).sum())
    order = layout.slot_center
    return centers[real][torch.argsort(order[real])], order[labels], inertia, n_iter, converged


def _bounded_reassign(state, centers, cn, shift) -> int:
    """One bounded assignment step after the centres moved by ``shift``; returns how many labels changed.

    Every point has an upper bound on the distance to its centre and, per group of centres, a lower bound on
    the distance to that group's centres (its own centre excluded). After the centres move, upper bounds grow
    by the own centre's shift and group bounds shrink by the group's largest shift. A point is looked at only
    if its upper bound exceeds both its smallest group bound and half the distance from its centre to the
    nearest other centre; then its exact distance is computed, and distances to the centres of the groups
    whose bound it still exceeds.
    """
    import torch

    x, xn, labels, upper = state["x"], state["xn"], state["labels"], state["upper"]
    group_lower, sums, counts, layout = state["group_lower"], state["sums"], state["counts"], state["layout"]
    t, size = layout.t, layout.size
    group_lower -= shift.view(t, size).amax(1)[:, None]
    group_lower.clamp_(min=0)
    upper += shift[labels]
    half_gap = 0.5 * _nearest_other_center(centers, cn, layout.real)
    bound = torch.maximum(group_lower.amin(0), half_gap[labels])
    cand_all = (upper > bound).nonzero().flatten()
    # Candidates are handled in blocks: memory stays bounded and each block's arrays stay in cache.
    block = state["block"]
    n_changed = 0
    for s in range(0, cand_all.numel(), block):
        cand = cand_all[s : s + block]
        # Tighten the candidates' upper bounds to their exact distance; some then drop out.
        xc, at, u = _candidate_rows(x, centers, labels, cand)
        old = labels[cand]
        upper[cand] = u
        # Rows of xc stay where they are: later steps gather the rows they need through ``row``.
        row = (u > bound[cand]).nonzero().flatten()
        if row.numel() == 0:
            continue
        cand, old, u = cand[row], old[row], u[row]
        if at is not None:
            row = at[row]
        new_labels = _assign_local(xc, row, xn[cand], cand, old, u, centers, cn, state)
        moved = (new_labels != old).nonzero().flatten()
        if moved.numel():
            n_changed += moved.numel()
            xm, src, dst = xc.index_select(0, row[moved]).double(), old[moved], new_labels[moved]
            ones = torch.ones(moved.numel(), dtype=counts.dtype, device=counts.device)
            sums.index_add_(0, src, -xm).index_add_(0, dst, xm)
            counts.index_add_(0, src, -ones).index_add_(0, dst, ones)
    return n_changed


def _candidate_rows(x, centers, labels, cand):
    """Rows of ``x`` holding the sorted candidates and their exact distance to their own centre.

    Returns ``(rows, at, u)``: candidate ``i`` is row ``at[i]`` (``at`` None: row ``i``). When the candidates
    fill at least half their span (usual after the first iterations), the span is a view of ``x`` and the
    distances of all its rows are computed, cheaper than gathering the rows; each row's distance is the same.
    """
    import torch

    lo, hi = int(cand[0]), int(cand[-1]) + 1
    dense = 2 * cand.numel() >= hi - lo
    rows = x[lo:hi] if dense else x.index_select(0, cand)
    own = centers.index_select(0, labels[lo:hi] if dense else labels[cand])
    u = torch.linalg.vector_norm(torch.sub(rows, own, out=own), dim=1)
    return (rows, cand - lo, u[cand - lo]) if dense else (rows, None, u)


def _assign_local(xc, row, xn, cand, old, u, centers, cn, state):
    """Re-assign candidate points, computing distances only to the groups whose lower bound is below ``u``.

    Updates ``state``'s labels, upper bounds and group bounds of the candidates in place and returns their new
    labels.

    Parameters
    ----------
    xc : (r, d) points, of which rows ``row`` (m,) are the candidates; xn : (m,) their squared norms;
    cand : (m,) their indices in the data
    old : (m,) current slot labels; u : (m,) exact distance to that centre
    """
    import torch

    labels, upper, group_lower, layout = state["labels"], state["upper"], state["group_lower"], state["layout"]
    m = row.shape[0]
    n = labels.shape[0]
    t, size = layout.t, layout.size
    look = group_lower.index_select(1, cand) < u[None, :]  # (t, m): groups that may hold a closer centre
    if t == 1 or int(look.count_nonzero()) > DENSE_LOOK_FRACTION * look.numel():
        # Most groups must be looked at anyway: one dense pass is cheaper than many small ones.
        new_labels, new_upper, new_gl = _assign_grouped(xc.index_select(0, row), xn, centers, cn, layout,
                                                        state["chunk"])
        labels[cand] = new_labels
        upper[cand] = new_upper
        group_lower.index_copy_(1, cand, new_gl)
        return new_labels
    inf = float("inf")
    dev = xc.device
    # (group, point) pairs to look at, sorted by group: one GEMM per group fills its block of a shared
    # (size, pairs) score matrix (score = squared distance − ‖x‖²). Everything after works on pairs.
    pairs = look.nonzero()
    pg, pp = pairs[:, 0], pairs[:, 1]
    per_group = torch.bincount(pg, minlength=t).tolist()
    scores = torch.empty(size, pp.numel(), device=dev)
    rows = xc.index_select(0, row[pp])  # one gather (pairs are sorted by group), then one GEMM per group in place
    offs = [0, *np.cumsum(per_group).tolist()]
    for g in (g for g in range(t) if per_group[g]):
        sl, ps = slice(g * size, (g + 1) * size), slice(offs[g], offs[g + 1])
        torch.addmm(cn[sl, None], centers[sl], rows[ps].T, alpha=-2.0, out=scores[:, ps])
    pair_min = scores.amin(0)
    best_val = torch.full((m,), inf, device=dev).scatter_reduce_(0, pp, pair_min, "amin")
    # The first group attaining the minimum (group numbers as float32: fast min on AVX2).
    is_best = pair_min == best_val[pp]
    best_g = torch.full((m,), float(t), device=dev).scatter_reduce_(
        0, pp, torch.where(is_best, pg.to(torch.float32), float(t)), "amin").long()
    # Keep the old centre unless a looked-at centre is strictly closer (the old one is at exactly u).
    better = best_val + xn < u * u
    old_g = old // size
    label_g = torch.where(better, best_g, old_g)
    # The pair (label's group, point), when that group was looked at: find the centre in it, and the group's
    # minimum without it, which is that group's new bound.
    pair_index = torch.full((t * m,), -1, dtype=torch.long, device=dev)
    pair_index[pg * m + pp] = torch.arange(pp.numel(), device=dev)
    lp = pair_index[label_g * m + torch.arange(m, device=dev)]
    in_look = lp >= 0
    sub = scores.index_select(1, lp.clamp(min=0))  # (size, m)
    ar = torch.arange(size, device=dev, dtype=torch.float32)[:, None]
    pos_new = torch.where(sub == best_val[None, :], ar, float(size)).amin(0).long().clamp_(max=size - 1)
    pos = torch.where(better, pos_new, old % size)
    new_labels = label_g * size + pos
    sub.scatter_(0, pos[None], inf)
    second = sub.amin(0)
    # New group bounds of the looked-at pairs: the group minimum, or, for the label's group, the minimum
    # without the label's centre.
    cmax = cn[layout.real].max()
    slack = 1e-5 * (xn + cmax)
    own_pair = lp[in_look]
    pair_min[own_pair] = second[in_look]
    bound = (pair_min + (xn - slack)[pp]).clamp_(min=0).sqrt_()
    group_lower.view(-1)[pg * n + cand[pp]] = bound
    # A centre the point left, in a group not looked at, joins that group's "other" centres at distance u.
    left_unlooked = (better & (pair_index[old_g * m + torch.arange(m, device=dev)] < 0)).nonzero().flatten()
    if left_unlooked.numel():
        flat = old_g[left_unlooked] * n + cand[left_unlooked]
        gl_flat = group_lower.view(-1)
        gl_flat[flat] = torch.minimum(gl_flat[flat], u[left_unlooked])
    labels[cand] = new_labels
    upper[cand] = torch.where(better, (best_val + xn + slack).clamp_(min=0).sqrt_(), u)
    return new_labels


def _nearest_other_center(centers, cn, real):
    """Distance of each slot's centre to its nearest other centre, shape (slots,); padding slots get 0."""
    import torch

    k = centers.shape[0]
    out = torch.empty(k, dtype=centers.dtype, device=centers.device)
    cnr = cn.masked_fill(~real, 0.0)
    step = max(1, (64 * 2**20) // (4 * k))
    for s in range(0, k, step):
        block = torch.addmm(cn[None, :], centers[s : s + step], centers.T, alpha=-2.0).add_(cnr[s : s + step, None])
        r = block.shape[0]
        block[torch.arange(r, device=centers.device), torch.arange(s, s + r, device=centers.device)] = float("inf")
        out[s : s + step] = block.min(1).values
    # The GEMM expansion can overstate a tiny distance; a smaller bound only costs work, never exactness.
    cmax = cnr.max()
    out = (out - 1e-5 * (2 * cmax + 1e-30)).clamp_(min=0).sqrt_()
    return out.masked_fill(~real, 0.0)


def _lloyd_batched(x, centers, max_iter: int, tol_abs: float, tick):
    """Plain Lloyd for all restarts at once: ``centers`` (R, k, d). Returns per-restart results."""
    import torch

    R, k, d = centers.shape
    n = x.shape[0]
    xd = x.double()
    active = torch.ones(R, dtype=torch.bool, device=x.device)
    sums = torch.zeros(R, k, d, dtype=torch.float64, device=x.device)
    counts = torch.zeros(R, k, dtype=torch.float64, device=x.device)
    iters = torch.zeros(R, dtype=torch.long)
    conv = torch.zeros(R, dtype=torch.bool)
    labels = torch.full((R, n), -1, dtype=torch.long, device=x.device)

    def assign(c):
        cn = (c * c).sum(2)  # (R, k)
        s = torch.baddbmm(cn[:, None, :], x.expand(R, n, d), c.transpose(1, 2), alpha=-2.0)  # (R, n, k)
        return s.argmin(2)

    for it in range(1, max_iter + 1):
        new = assign(centers)
        same = (new == labels).all(1).cpu()
        newly = same & active.cpu()
        conv |= newly
        active &= ~same.to(x.device)
        labels = torch.where(active[:, None], new, labels)
        if not bool(active.any()):
            break
        # One scatter per restart into preallocated sums: repeating the points R times would copy R·n·d doubles.
        sums.zero_()
        for r in range(R):
            sums[r].index_add_(0, labels[r], xd)
            counts[r] = torch.bincount(labels[r], minlength=k).to(torch.float64)
        new_c = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centers.double()).float()
        # Empty clusters: move to the point farthest from its centre (one per empty cluster, per restart).
        empty = counts == 0
        if bool(empty.any()):
            dist = ((x[None] - centers.gather(1, labels[..., None].expand(R, n, d))) ** 2).sum(2)
            for r in empty.any(1).nonzero().flatten().tolist():
                e = empty[r].nonzero().flatten()
                far = torch.topk(dist[r], min(e.numel(), n)).indices
                new_c[r, e[: far.numel()]] = x[far]
        shift2 = ((new_c - centers) ** 2).sum((1, 2))
        centers = torch.where(active[:, None, None], new_c, centers)
        iters += active.cpu().long()
        if tol_abs > 0:
            small = (shift2 <= tol_abs) & active
            conv |= small.cpu()
            active &= ~small
        tick(it)
        if not bool(active.any()):
            break
    labels = assign(centers)
    diff = x[None] - centers.gather(1, labels[..., None].expand(R, n, d))
    inertias = (diff * diff).sum((1, 2), dtype=torch.float64).cpu().numpy()
    return centers, labels, inertias, iters.numpy(), conv.numpy()

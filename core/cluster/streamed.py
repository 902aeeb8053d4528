"""Exact k-means of more tokens than memory holds: Lloyd passes streamed over a token source.

:mod:`~posvit_cli.core.cluster.sampled` fits k-means on a capped sample and only *labels* every token; this
engine runs the full Lloyd algorithm on every token while holding only one chunk of tokens at a time, plus the
labels (int32, 4 bytes a token) and ``k × d`` float64 sums.

It reproduces :func:`~posvit_cli.core.cluster.kmeans.kmeans` (the in-memory engine) step for step:

* one pass computes the mean (float64 sums, cast to float32) and, with ``tol > 0``, the mean per-dimension
  variance; every chunk is then centred on that mean, as the in-memory engine centres its copy;
* the seeding draws the same ``torch.randperm`` sample from the same generator, gathers those tokens in that
  order and runs the same greedy k-means++ on them, so the initial centres are the same points;
* each Lloyd pass streams every token: nearest centre by the ``‖c‖² − 2x·c`` GEMM, per-cluster sums in float64,
  counts, the squared distance to the centre (from the difference, not the GEMM expansion; summed in float64)
  and the number of labels that changed; the new
  centres are ``sums / counts`` (a cluster left empty keeps its centre unless it is refilled);
* empty clusters take the tokens farthest from their assigned centres (scikit-learn's rule, one per empty
  cluster in cluster order), each leaving the sums of its old cluster;
* it stops when a pass changes no label (``n_iter`` = the passes that moved the centres) or, with ``tol > 0``,
  when the summed squared centre shift is at most ``tol`` times the mean variance, or after ``max_iter`` updates;
  the labels and inertia returned belong to the returned centres.

So on data that fit, labels equal the in-memory engine's (barring exact distance ties) and centres agree to
float32 rounding of the sums. Each pass costs one read of the source (for a store: reading and projecting every
token again), so a run costs ``1 + n_init · (n_iter + 2)`` passes: the mean, then per restart the gathering of its
seeding sample, the Lloyd passes and (unless a pass changed no label) one final assignment.

A token source is a callable returning a fresh iterator of ``(start, tokens)`` chunks in token order, ``tokens``
a float32 ``(b, dims)`` tensor (see :mod:`~posvit_cli.core.cluster.sampled`).
"""

from __future__ import annotations

import numpy as np

from posvit_cli.core.cluster.kmeans import KMeansResult, kmeans_plus_plus
from posvit_cli.core.cluster.sampled import TokenSource, gather_rows
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = ["FIT_MODES", "kmeans_stream"]

#: How k-means is fitted on tokens beyond the in-memory cap: ``stream`` (exact Lloyd passes over all tokens, this
#: module) or ``sample`` (fit on a capped sample, then label all tokens: :mod:`~posvit_cli.core.cluster.sampled`).
FIT_MODES = ("stream", "sample")


def kmeans_stream(source: TokenSource, n: int, dims: int, k: int, *, n_init: int = 1, max_iter: int = 100,
                  tol: float = 0.0, seed: int = 0, init="k-means++", init_sample: int | None = None, device="cpu",
                  progress: ProgressCallback | None = None, task: str | None = None) -> KMeansResult:
    """k-means of every token of a source by exact Lloyd passes, streamed chunk by chunk.

    Parameters
    ----------
    source : callable
        Token source of ``n`` tokens of ``dims`` dimensions (float32 chunks, in token order).
    n, dims, k : int
        Tokens, their dimensions, clusters (``1 ≤ k ≤ n``).
    n_init, max_iter, tol, seed, init_sample
        As for :func:`~posvit_cli.core.cluster.kmeans.kmeans`.
    init : "k-means++" or array (k, dims)
        Greedy k-means++ seeding (as the in-memory engine draws it), or given initial centres (then ``n_init``
        is 1).
    device : str or torch.device
    progress : callable, optional
        ``progress(task, completed, total)`` after every Lloyd pass (total = ``n_init · max_iter``).

    Returns
    -------
    KMeansResult
        ``labels`` int32 (n,); ``algorithm`` = ``"streamed-lloyd"``.

    Raises
    ------
    PosvitError
        If ``k`` is not in ``1..n``, an option is out of range, or a token is not finite.
    """
    import torch

    if not 1 <= k <= n:
        raise PosvitError(f"cannot make {k} clusters from {n} points: k must be between 1 and {n}")
    if n_init < 1 or max_iter < 1:
        raise PosvitError("k-means needs n_init ≥ 1 and max_iter ≥ 1")
    dev = torch.device(device)
    mean, var_mean = _moments(source, n, dims, dev, need_var=tol > 0)
    tol_abs = float(tol) * var_mean if tol > 0 else 0.0
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    if isinstance(init, str):
        if init != "k-means++":
            raise PosvitError(f"unknown streamed k-means init '{init}': use k-means++ or an array of centres")
        seeds = [_seed_centres(source, n, dims, k, mean, gen, init_sample, dev) for _ in range(n_init)]
    else:
        given = torch.as_tensor(np.asarray(init), dtype=torch.float32, device=dev)
        if tuple(given.shape) != (k, dims):
            raise PosvitError(f"initial centres must have shape ({k}, {dims}), got {tuple(given.shape)}")
        seeds, n_init = [given - mean], 1
    tick = report(progress)
    task = task or f"k-means k={k}"
    total = n_init * max_iter
    best = None
    inertias = []
    for r, c0 in enumerate(seeds):
        offset = r * max_iter
        run = _lloyd_streamed(source, n, mean, c0, max_iter, tol_abs,
                              lambda i, o=offset: tick(task, o + i, total))
        inertias.append(run[2])
        if best is None or run[2] < best[2]:
            best = (*run, r)
    tick(task, total, total)
    centres, labels, inertia, n_iter, converged, r_best = best
    return KMeansResult(centers=(centres + mean).cpu().numpy(), labels=labels, inertia=float(inertia),
                        n_iter=int(n_iter), converged=bool(converged), inertias=inertias, best_restart=int(r_best),
                        algorithm="streamed-lloyd")


def _moments(source, n, dims, dev, need_var):
    """The float32 mean of all tokens (as the in-memory engine's ``x.mean(0, float64)``) and, if asked, the mean
    per-dimension population variance."""
    import torch

    s1 = torch.zeros(dims, dtype=torch.float64, device=dev)
    count = 0
    for _, x in source():
        x = x.to(device=dev, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise PosvitError("k-means input holds NaN or infinite values")
        s1 += x.sum(0, dtype=torch.float64)
        count += x.shape[0]
    if count != n:
        raise PosvitError(f"the token source gave {count} tokens, expected {n}")
    mean = (s1 / n).to(torch.float32)
    if not need_var:
        return mean, 0.0
    s2 = torch.zeros(dims, dtype=torch.float64, device=dev)
    s1c = torch.zeros(dims, dtype=torch.float64, device=dev)
    for _, x in source():
        xc = x.to(device=dev, dtype=torch.float32) - mean
        s1c += xc.sum(0, dtype=torch.float64)
        s2 += (xc.double() ** 2).sum(0)
    var = (s2 / n - (s1c / n) ** 2).clamp(min=0)
    return mean, float(var.mean())


def _seed_chunk_rows(k: int, n: int, dev) -> int:
    """The chunk the in-memory engine hands its seeding (16 MiB on CPU, 256 MiB on CUDA of ``chunk × k``)."""
    budget = 16 * 2**20 if dev.type == "cpu" else 256 * 2**20
    return int(max(256, min(n, budget // (4 * max(k, 1)))))


def _seed_centres(source, n, dims, k, mean, gen, init_sample, dev):
    """Greedy k-means++ centres (centred, (k, d) float32) drawn exactly as the in-memory engine draws them."""
    import torch

    sample = max(64 * k, 20_000) if init_sample is None else int(init_sample)
    if sample and sample < n:
        idx = torch.randperm(n, generator=gen)[:sample].numpy()
    else:
        idx = np.arange(n)
    order = np.argsort(idx, kind="stable")
    pts = torch.empty(len(idx), dims, dtype=torch.float32, device=dev)
    # gather_rows reads in token order; the rows go back to the order they were drawn in.
    pts[torch.as_tensor(order, device=dev)] = gather_rows(source, idx[order], dims, dev)
    pts -= mean
    return kmeans_plus_plus(pts, k, generator=gen, sample=0, chunk_rows=_seed_chunk_rows(k, n, dev))


class _Pass:
    """What one streamed assignment pass accumulates (float64 sums and counts, inertia, the farthest tokens)."""

    def __init__(self, k, d, dev):
        import torch

        self.sums = torch.zeros(k, d, dtype=torch.float64, device=dev)
        self.counts = torch.zeros(k, dtype=torch.float64, device=dev)
        self.inertia = 0.0
        self.changed = 0
        self.far_d2 = torch.empty(0, dtype=torch.float32, device=dev)
        self.far_idx = torch.empty(0, dtype=torch.long, device=dev)
        self.far_x = torch.empty(0, d, dtype=torch.float32, device=dev)
        self.far_label = torch.empty(0, dtype=torch.long, device=dev)

    def keep_farthest(self, d2, start, xc, lab, k):
        """Keep the ``k`` tokens farthest from their centres seen so far (candidates for empty clusters)."""
        import torch

        top = torch.topk(d2, min(k, d2.numel()))
        d2_all = torch.cat([self.far_d2, top.values])
        keep = torch.topk(d2_all, min(k, d2_all.numel())).indices
        self.far_d2 = d2_all[keep]
        self.far_idx = torch.cat([self.far_idx, top.indices + start])[keep]
        self.far_x = torch.cat([self.far_x, xc[top.indices]])[keep]
        self.far_label = torch.cat([self.far_label, lab[top.indices]])[keep]


def _assign_pass(source, mean, centres, labels, accumulate: bool) -> _Pass:
    """Assign every token to its nearest centre, updating ``labels`` (int32 ndarray) in place."""
    import torch

    k, d = centres.shape
    acc = _Pass(k, d, centres.device)
    cn = (centres * centres).sum(1)
    ct = centres.T.contiguous()
    for start, x in source():
        xc = x.to(device=centres.device, dtype=torch.float32) - mean
        lab = torch.addmm(cn[None, :], xc, ct, alpha=-2.0).argmin(1)
        diff = xc - centres.index_select(0, lab)
        # Per-token squares summed in float32 (the float64 row sum costs a quarter of a pass), the total in float64.
        d2 = (diff * diff).sum(1)
        acc.inertia += float(d2.sum(dtype=torch.float64))
        lab_np = lab.to(torch.int32).cpu().numpy()
        stop = start + lab_np.shape[0]
        acc.changed += int(np.count_nonzero(labels[start:stop] != lab_np))
        labels[start:stop] = lab_np
        if accumulate:
            acc.sums.index_add_(0, lab, xc.double())
            acc.counts += torch.bincount(lab, minlength=k).to(torch.float64)
            acc.keep_farthest(d2, start, xc, lab, k)
    return acc


def _new_centres(acc: _Pass, centres, labels):
    """Centres from the pass's sums; each empty cluster takes one of the farthest tokens (relabelled in place)."""
    import torch

    empty = (acc.counts == 0).nonzero().flatten()
    if empty.numel():
        m = min(empty.numel(), acc.far_idx.numel())
        empty = empty[:m]
        xd = acc.far_x[:m].double()
        old = acc.far_label[:m]
        acc.sums.index_add_(0, old, -xd)
        acc.counts.index_add_(0, old, -torch.ones(m, dtype=torch.float64, device=old.device))
        acc.sums[empty] = xd
        acc.counts[empty] = 1
        labels[acc.far_idx[:m].cpu().numpy()] = empty.to(torch.int32).cpu().numpy()
    new = torch.where(acc.counts[:, None] > 0, acc.sums / acc.counts.clamp(min=1)[:, None], centres.double())
    return new.to(torch.float32)


def _lloyd_streamed(source, n, mean, centres, max_iter, tol_abs, tick):
    """One restart: returns centred centres (k, d), labels int32 (n,), inertia, n_iter, converged."""
    labels = np.full(int(n), -1, dtype=np.int32)
    converged = False
    n_iter = 0
    acc = None
    for it in range(1, max_iter + 1):
        acc = _assign_pass(source, mean, centres, labels, accumulate=True)
        if it > 1 and acc.changed == 0:
            converged = True
            break
        new = _new_centres(acc, centres, labels)
        shift2 = float(((new - centres) ** 2).sum())
        centres = new
        n_iter = it
        tick(it)
        acc = None
        if tol_abs > 0 and shift2 <= tol_abs:
            converged = True
            break
    if acc is None:
        # The last update moved the centres: assign once more so the labels belong to the returned centres.
        acc = _assign_pass(source, mean, centres, labels, accumulate=False)
    return centres, labels, acc.inertia, n_iter, converged

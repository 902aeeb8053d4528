"""k-means of more tokens than memory allows: fit on a bounded uniform sample, then label every token by streaming.

Holding every token to cluster costs ``n_tokens × dims`` float32 values, twice (k-means centres a copy). When
that exceeds :data:`FIT_MAX_VALUES`, k-means is fitted on a uniform random sample of ``FIT_MAX_VALUES // dims``
tokens (without replacement, seeded, so a run is reproducible), and every token is then labelled by its nearest
centre one chunk at a time; the inertia reported is the one of all tokens. Below the cap nothing is sampled.

A token source is a callable returning a fresh iterator of ``(start, tokens)`` chunks in token order:
``tokens`` a float32 ``(b, dims)`` tensor holding tokens ``start .. start + b``. Chunk boundaries do not change
the sample (it is drawn over token indices) nor the labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

__all__ = [
    "BAND_TOKENS",
    "FIT_MAX_VALUES",
    "assign_streamed",
    "fit_sample_size",
    "gather_rows",
    "kmeans_streamed",
    "sample_tokens",
]

#: Most float32 values (tokens × dimensions) k-means is fitted on: 2**25 values = 128 MiB, i.e. 671,088 tokens
#: after a 50-dim PCA or 87,381 tokens of 384 channels. Larger problems are fitted on a sample that size (k-means
#: holds the sample, a centred copy and its working blocks: about 0.5 GB at the cap with 384 channels).
FIT_MAX_VALUES = 2**25
#: Tokens per row band when a huge image is read or labelled piecewise (32,768 × 384 float32 = 50 MB).
BAND_TOKENS = 32_768
#: Indices drawn per block when sampling (the sample is drawn block by block, so memory is O(sample)).
_SAMPLE_BLOCK = 1 << 20

TokenSource = Callable[[], Iterator[tuple[int, object]]]


def fit_sample_size(n_tokens: int, dims: int, limit: int | None = None) -> int | None:
    """Tokens to fit k-means on, or None to fit on all of them.

    Parameters
    ----------
    n_tokens, dims : int
        The tokens to cluster and their dimensions.
    limit : int, optional
        A further cap (``k · --max-points-per-cluster``).

    Returns
    -------
    int or None
        ``min(FIT_MAX_VALUES // dims, limit)`` when ``n_tokens`` exceeds it, else None.
    """
    cap = max(1, FIT_MAX_VALUES // max(1, int(dims)))
    if limit is not None:
        cap = min(cap, int(limit))
    return cap if n_tokens > cap else None


def sample_tokens(n: int, m: int, seed: int) -> np.ndarray:
    """A uniform random sample of ``m`` of ``n`` token indices, without replacement, sorted (int64, shape (m,)).

    Drawn block by block (a hypergeometric count per block of indices, then positions within it), so memory is
    O(m) however large ``n`` is.
    """
    rng = np.random.default_rng(seed)
    m = min(int(m), int(n))
    parts = []
    left_n, left_m = int(n), m
    for start in range(0, int(n), _SAMPLE_BLOCK):
        size = min(_SAMPLE_BLOCK, int(n) - start)
        if left_m == 0:
            break
        take = left_m if size == left_n else int(rng.hypergeometric(size, left_n - size, left_m))
        if take:
            parts.append(start + np.sort(rng.choice(size, take, replace=False)))
        left_n -= size
        left_m -= take
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def gather_rows(source: TokenSource, rows: np.ndarray, dims: int, device="cpu"):
    """The tokens at sorted indices ``rows`` of a token source, as one float32 ``(len(rows), dims)`` tensor."""
    import torch

    out = torch.empty(len(rows), dims, dtype=torch.float32, device=device)
    for start, x in source():
        a, b = np.searchsorted(rows, [start, start + x.shape[0]])
        if b > a:
            local = torch.as_tensor(rows[a:b] - start, device=x.device)
            out[a:b] = x.index_select(0, local).to(device=device, dtype=torch.float32)
    return out


def assign_streamed(source: TokenSource, centers, n: int, device="cpu") -> tuple[np.ndarray, float]:
    """Nearest centre of every token of a source, chunk by chunk.

    Returns
    -------
    labels : ndarray of int32, shape (n,)
    inertia : float
        Sum of squared distances of all tokens to their centres.
    """
    from posvit_cli.core.cluster.kmeans import assign_labels

    labels = np.empty(int(n), dtype=np.int32)
    inertia = 0.0
    for start, x in source():
        lab, sq = assign_labels(x, centers, device=device)
        labels[start : start + lab.shape[0]] = lab
        inertia += float(sq.sum())
    return labels, inertia


def kmeans_streamed(source: TokenSource, n: int, dims: int, k: int, *, sample: int, sample_seed: int,
                    device="cpu", **kmeans_options) -> tuple[np.ndarray, float, int]:
    """k-means fitted on a uniform sample of ``sample`` tokens of a source, then every token labelled.

    Parameters
    ----------
    source : callable
        Token source (see the module docstring) of ``n`` tokens of ``dims`` dimensions.
    sample : int
        Tokens to fit on (at least ``k``).
    sample_seed : int
        Seed of the sample.
    **kmeans_options
        Passed to :func:`~posvit_cli.core.cluster.kmeans.kmeans` (``n_init``, ``max_iter``, ``seed``, ...).

    Returns
    -------
    labels : ndarray of int32, shape (n,)
    inertia : float
        Of all ``n`` tokens.
    n_iter : int
        Lloyd iterations of the fit.
    """
    from posvit_cli.core.cluster.kmeans import kmeans

    rows = sample_tokens(n, max(int(sample), int(k)), sample_seed)
    fit_on = gather_rows(source, rows, dims, device)
    res = kmeans(fit_on, k, device=device, **kmeans_options)
    del fit_on
    labels, inertia = assign_streamed(source, res.centers, n, device)
    return labels, inertia, res.n_iter

"""Per-dimension z-score and PCA of a store's patch tokens, fitted and applied in one streamed pass each.

Everything streams from the feature store in bounded memory: per-dimension moments and the covariance are
accumulated chunk by chunk (float64), PCA is an ``eigh`` in float64, and only the projected ``(N, 50)`` tokens are
held in memory (or, above :data:`~posvit_cli.core.cluster.sampled.FIT_MAX_VALUES`, re-projected per pass). An image
of more tokens than a chunk is read in row bands, never whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "FeatureProjection",
    "fit_projection",
    "project_tokens",
    "projected_chunks",
    "projected_source",
]


_CHUNK_TOKENS = 131_072


def _iter_token_chunks(store, layer, indices, upsample_to, device, chunk_tokens=None):
    """Yield ``(image_indices, tokens (n, C) float32 tensor)`` blocks of whole images, about ``chunk_tokens`` each.

    An image of more than ``chunk_tokens`` tokens comes on its own in row bands of about
    :data:`~posvit_cli.core.cluster.sampled.BAND_TOKENS` tokens (its index with the last band), so a huge grid
    is never held whole; smaller images are read, and batched, as before.
    """
    import torch

    chunk_tokens = chunk_tokens or _CHUNK_TOKENS
    batch, ids, count = [], [], 0
    for i in indices:
        h, w = (int(v) for v in store.record(int(i)).grid)
        if h * w > chunk_tokens:
            if batch:
                yield ids, torch.cat(batch)
                batch, ids, count = [], [], 0
            yield from _image_bands(store, int(i), layer, upsample_to, device)
            continue
        f = torch.from_numpy(store.features(int(i), layer)).to(device)
        if upsample_to is not None:
            f = _upsample(f, upsample_to)
        batch.append(f.reshape(-1, f.shape[-1]))
        ids.append(int(i))
        count += batch[-1].shape[0]
        if count >= chunk_tokens:
            yield ids, torch.cat(batch)
            batch, ids, count = [], [], 0
    if batch:
        yield ids, torch.cat(batch)


def _upsample(f, size):
    """Bilinear resize of an (h, w, C) token grid to ``size`` (align_corners=False), as (H, W, C)."""
    import torch.nn.functional as F

    return F.interpolate(f.permute(2, 0, 1)[None], size=tuple(size), mode="bilinear",
                         align_corners=False)[0].permute(1, 2, 0)


def _image_bands(store, index, layer, upsample_to, device):
    """One huge image's tokens as ``([], band)`` row bands and ``([index], last band)``.

    With ``upsample_to`` the resized grid is built from the bands (separable bilinear: across each band, then
    a weighted sum of bands down the rows) and yielded whole; it has the evaluation size, not the image's.
    """
    import torch

    from posvit_cli.core.cluster.sampled import BAND_TOKENS

    h, w = (int(v) for v in store.record(index).grid)
    rows = max(1, BAND_TOKENS // w)
    out = None
    if upsample_to is not None:
        weights = _bilinear_weights(h, int(upsample_to[0]), device)  # (H_out, h)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        band = torch.from_numpy(store.feature_rows(index, layer, r0, r1)).to(device)
        if upsample_to is None:
            yield ([index] if r1 == h else []), band.reshape(-1, band.shape[-1])
            continue
        across = _upsample(band, (r1 - r0, int(upsample_to[1])))  # rows kept (scale 1 is the identity)
        part = torch.einsum("or,rwc->owc", weights[:, r0:r1], across)
        out = part if out is None else out.add_(part)
    if upsample_to is not None:
        yield [index], out.reshape(-1, out.shape[-1])


def _bilinear_weights(n_in: int, n_out: int, device):
    """(n_out, n_in) matrix of torch's 1-D bilinear resize (align_corners=False, no antialias)."""
    import torch

    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    frac = src - i0
    wts = torch.zeros(n_out, n_in, dtype=torch.float64)
    ar = torch.arange(n_out)
    wts.index_put_((ar, i0), 1 - frac, accumulate=True)
    wts.index_put_((ar, i1), frac, accumulate=True)
    return wts.to(device=device, dtype=torch.float32)


@dataclasses.dataclass
class FeatureProjection:
    """Per-dimension z-score followed by PCA, as one affine map ``y = x @ weight + bias``.

    Attributes
    ----------
    mean, scale : ndarray (C,)
        The z-score: ``z = (x − mean) / scale``.
    components : ndarray (C, p) or None
        Principal axes of ``z`` (columns, by decreasing variance); None when no PCA is applied.
    pca_mean : ndarray (C,)
        Mean of ``z`` over the vectors the PCA was fitted on (zero when fitted on all vectors).
    explained_variance_ratio : float
        Fraction of the variance of ``z`` kept by the ``p`` components (1 without PCA).
    n_vectors : int
        Vectors the z-score was computed on.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray | None
    pca_mean: np.ndarray
    explained_variance_ratio: float
    n_vectors: int

    @property
    def out_dim(self) -> int:
        return int(self.mean.shape[0] if self.components is None else self.components.shape[1])

    def affine(self, device):
        """``(weight (C, p), bias (p,))`` float32 tensors on ``device``."""
        import torch

        inv = 1.0 / self.scale
        if self.components is None:
            w = np.diag(inv)
            b = -(self.mean * inv)
        else:
            w = self.components * inv[:, None]
            b = -((self.mean * inv) + self.pca_mean) @ self.components
        return (torch.as_tensor(w, dtype=torch.float32, device=device),
                torch.as_tensor(b, dtype=torch.float32, device=device))


def fit_projection(store, layer, indices, *, pca_dim: int = 50, zscore_eps: float = 0.0,
                   pca_fit_max: int | None = None, upsample_to=None, device="cpu",
                   progress: ProgressCallback | None = None) -> FeatureProjection:
    """Fit the z-score and PCA on all tokens of the given images, streaming them once.

    Parameters
    ----------
    store : FeatureStore
    layer : str
    indices : sequence of int
        Images to use, in order (the order matters only for ``pca_fit_max``).
    pca_dim : int
        Components to keep; 0 or at least the number of channels means no PCA.
    zscore_eps : float
        0: divide by the standard deviation (scikit-learn's StandardScaler, a zero deviation becomes 1);
        ``eps > 0``: divide by ``σ + eps`` (the in-training reference).
    pca_fit_max : int, optional
        Fit the PCA on the first this many vectors only (the in-training reference uses 4,000,000).
    upsample_to : (int, int), optional
        Bilinearly upsample each token grid to this size first (in-training protocol).

    Returns
    -------
    FeatureProjection
    """
    import torch

    prog = report(progress)
    shift = None
    n = 0
    s1 = s2 = None
    n_fit = 0
    f1 = f2 = None
    done = 0
    for ids, x in _iter_token_chunks(store, layer, indices, upsample_to, device):
        x = x.to(torch.float32)
        if shift is None:
            # Moments about a nearby point (the first chunk's mean) avoid cancellation in E[x²] − E[x]².
            shift = x.mean(0, dtype=torch.float64).to(torch.float32)
            c = x.shape[1]
            s1 = torch.zeros(c, dtype=torch.float64, device=device)
            s2 = torch.zeros(c, c, dtype=torch.float64, device=device)
            if pca_fit_max:
                f1 = torch.zeros_like(s1)
                f2 = torch.zeros_like(s2)
        xs = x - shift
        s1 += xs.sum(0, dtype=torch.float64)
        s2 += (xs.T @ xs).double()
        n += xs.shape[0]
        if pca_fit_max and n_fit < pca_fit_max:
            part = xs[: pca_fit_max - n_fit]
            f1 += part.sum(0, dtype=torch.float64)
            f2 += (part.T @ part).double()
            n_fit += part.shape[0]
        done += len(ids)
        prog("z-score and PCA", done, len(indices))
    if n == 0:
        raise PosvitError("no tokens to cluster: the store is empty")
    m1 = s1 / n
    cov = s2 / n - torch.outer(m1, m1)
    var = torch.diagonal(cov).clamp(min=0)
    std = var.sqrt()
    if zscore_eps > 0:
        scale = std + zscore_eps
    else:
        scale = torch.where(std > 0, std, torch.ones_like(std))
    mean = shift.double() + m1
    c = mean.shape[0]
    pca_mean = torch.zeros(c, dtype=torch.float64, device=device)
    if pca_fit_max and n_fit < n:
        fm = f1 / n_fit
        cov_fit = f2 / n_fit - torch.outer(fm, fm)
        # Mean of z over the fitted vectors: ((shift + fm) − mean) / scale.
        pca_mean = (shift.double() + fm - mean) / scale
    else:
        cov_fit = cov
    cov_z = (cov_fit / torch.outer(scale, scale)).cpu()
    if pca_dim <= 0 or pca_dim >= c:
        return FeatureProjection(mean.cpu().numpy(), scale.cpu().numpy(), None, pca_mean.cpu().numpy(), 1.0, n)
    evals, evecs = torch.linalg.eigh(cov_z)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    comps = evecs[:, :pca_dim]
    # eigh's signs are arbitrary: make each axis's largest entry positive so runs agree across devices.
    flip = torch.sign(comps[comps.abs().argmax(0), torch.arange(pca_dim)])
    comps = comps * torch.where(flip == 0, torch.ones_like(flip), flip)
    total = float(evals.clamp(min=0).sum())
    ratio = float(evals[:pca_dim].clamp(min=0).sum()) / total if total > 0 else 1.0
    return FeatureProjection(mean.cpu().numpy(), scale.cpu().numpy(), comps.numpy(), pca_mean.cpu().numpy(), ratio, n)


def projected_chunks(store, layer, indices, projection: FeatureProjection, *, upsample_to=None, device="cpu"):
    """Yield ``(image_indices, projected tokens (b, p) float32 tensor)`` in token order (see ``_iter_token_chunks``)."""
    import torch

    w, b = projection.affine(device)
    for ids, x in _iter_token_chunks(store, layer, indices, upsample_to, device):
        yield ids, torch.addmm(b[None, :], x.to(torch.float32), w)


def projected_source(store, layer, indices, projection: FeatureProjection, *, upsample_to=None, device="cpu"):
    """The projected tokens as a token source for :mod:`~posvit_cli.core.cluster.sampled` (re-read per pass)."""

    def chunks():
        start = 0
        for _, y in projected_chunks(store, layer, indices, projection, upsample_to=upsample_to, device=device):
            yield start, y
            start += y.shape[0]

    return chunks


def project_tokens(store, layer, indices, projection: FeatureProjection, *, upsample_to=None, device="cpu",
                   progress: ProgressCallback | None = None):
    """Project every token of the given images: returns ``(Y (N, p) float32 tensor, offsets (n_img + 1,))``."""
    import torch

    prog = report(progress)
    parts, sizes = [], []
    done = 0
    for ids, y in projected_chunks(store, layer, indices, projection, upsample_to=upsample_to, device=device):
        parts.append(y)
        done += len(ids)
        prog("project tokens", done, len(indices))
    for i in indices:
        g = store.record(int(i)).grid if upsample_to is None else tuple(upsample_to)
        sizes.append(int(g[0]) * int(g[1]))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return torch.cat(parts), offsets

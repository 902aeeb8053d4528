"""Classical per-pixel features for trainable segmentation: the Weka-style filter bank.

The default set has 58 channels, computed on a greyscale image with intensities in [0, 1]:

=====================  ========  ======================================================================
group                  channels  what
=====================  ========  ======================================================================
``intensity``          1 + 5     the image itself, then its Gaussian blur at each σ
``gradient``           1 + 5     gradient magnitude of the image and of each blur
``hessian``            5 + 25    of the image and of each blur: eigenvalues λ1 ≥ λ2, modulus, trace,
                                 determinant
``dog``                10        differences of Gaussians G(σi) − G(σj) for every pair σi > σj
``membrane``           6         membrane projections: a 15×15 line kernel at 30 angles, z-projected as
                                 sum, mean, std, median, max, min (in this order)
=====================  ========  ======================================================================

Channel order: scale 0 (the image) gives ``raw, gradient, hessian×5``; then each σ in increasing order gives
``gauss, gradient, hessian×5``; then the DoGs; then the membrane projections (see :func:`feature_names`).

Definitions (the same in every backend):

- Gaussian blur: kernel ``exp(-x²/2σ²)`` truncated at ``int(4σ + 0.5)`` pixels and normalised, separable,
  boundary ``reflect`` (``d c b a | a b c d``), exactly as ``scipy.ndimage.gaussian_filter``.
- Derivatives: central differences inside, one-sided differences on the border (``numpy.gradient``);
  ``gy, gx = gradient(f)``, ``Hxx = ∂x gx``, ``Hxy = ∂y gx``, ``Hyy = ∂y gy``.
- Hessian: ``λ1,2 = (Hxx + Hyy)/2 ± sqrt((Hxx − Hyy)² + 4Hxy²)/2``, modulus ``sqrt(Hxx² + Hxy² + Hyy²)``
  (Weka's "module"), trace ``Hxx + Hyy``, determinant ``Hxx·Hyy − Hxy²``.
- Membrane kernels: a centred column of ones (``thickness`` wide) in a ``size × size`` square, rotated by
  ``180°·i/angles`` (cubic spline, then rounded to 0/1); responses are correlations with the image (boundary
  ``reflect``); the median of an even number of angles is the mean of the two middle values.

σ are true standard deviations in pixels. ``weka_compat=True`` instead reproduces the reference featuriser
(interactive-seg-backend's CPU path) channel for channel: blur σ' = ``int(0.4·σ)`` (effective {0, 0, 1, 3, 6},
duplicating channels; σ' = 0 is the image itself) with its truncation (radius ``int(t·σ' + 0.5)``,
``t = (4·0.4σ + 2)/(2·0.4σ)``: 3, 7, 13 px) and boundary ``nearest`` (``a a a | a b c d``); DoGs G(σj) − G(σi),
the smaller σ minus the larger (named ``dog_s<σj>-s<σi>``); membrane statistics stored as mean, max, min, sum,
std, median (:data:`WEKA_MEMBRANE_STATS`, the order the reference stored under other names).

Backends: on the CPU the blurs run as one FFT of the padded image and one inverse FFT per σ, and the membrane
projections as shifted sums of the sparse line kernels with a sorting network for the order statistics, in
cache-sized row blocks spread over threads; on CUDA everything runs in torch (separable convolutions, one
``conv2d`` with all rotated kernels as output channels, one sort). Both agree with the straightforward
SciPy implementation :func:`classical_features_reference` to float32 rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = [
    "FEATURE_GROUPS",
    "MEMBRANE_STATS",
    "WEKA_MEMBRANE_STATS",
    "ClassicalConfig",
    "classical_features",
    "classical_features_reference",
    "feature_names",
    "membrane_kernels",
]

#: Channel groups, in the order they can be selected.
FEATURE_GROUPS = ("intensity", "gradient", "hessian", "dog", "membrane")
#: Order of the membrane-projection statistics.
MEMBRANE_STATS = ("sum", "mean", "std", "median", "max", "min")
#: Their order under ``weka_compat``: the reference stored them so (while naming them in the order above).
WEKA_MEMBRANE_STATS = ("mean", "max", "min", "sum", "std", "median")
HESSIAN_PARTS = ("eig1", "eig2", "modulus", "trace", "det")
TRUNCATE = 4.0
#: The reference multiplied each σ by this before truncating it to an integer.
WEKA_SIGMA_MULTIPLIER = 0.4
# Revision of the ``weka_compat`` features recorded in saved configurations: models trained with the earlier
# approximation (no revision) used other blurs, DoG signs and membrane order, and are refused.
_WEKA_REVISION = 2
# Row blocks of about this many pixels keep intermediate arrays in cache.
_BLOCK_PIXELS = 65536


@dataclasses.dataclass(frozen=True)
class ClassicalConfig:
    """Which classical features to compute.

    Attributes
    ----------
    sigmas : tuple of float
        Gaussian scales in pixels (true standard deviations), increasing.
    groups : tuple of str
        Channel groups to include (subset of :data:`FEATURE_GROUPS`).
    weka_compat : bool
        Reproduce the reference featuriser (interactive-seg-backend's CPU path) channel for channel: blur with
        ``int(0.4·σ)``, its kernel truncation and its ``nearest`` boundary, its DoG sign and its membrane order.
    membrane_size : int
        Side of the membrane line kernel in pixels (odd).
    membrane_angles : int
        Number of rotations over 180°.
    membrane_thickness : int
        Width of the line in pixels.
    """

    sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    groups: tuple[str, ...] = FEATURE_GROUPS
    weka_compat: bool = False
    membrane_size: int = 15
    membrane_angles: int = 30
    membrane_thickness: int = 1

    def __post_init__(self) -> None:
        sig = tuple(float(s) for s in self.sigmas)
        object.__setattr__(self, "sigmas", sig)
        object.__setattr__(self, "groups", tuple(self.groups))
        if any(s <= 0 for s in sig) or list(sig) != sorted(set(sig)):
            raise PosvitError(f"sigmas must be positive, distinct and increasing, got {list(sig)}")
        unknown = [g for g in self.groups if g not in FEATURE_GROUPS]
        if unknown:
            raise PosvitError(f"unknown feature group(s) {', '.join(unknown)}: use {', '.join(FEATURE_GROUPS)}")
        if not self.groups:
            raise PosvitError("no classical feature group selected")
        if self.membrane_size < 3 or self.membrane_size % 2 == 0:
            raise PosvitError(f"membrane kernel size must be odd and at least 3, got {self.membrane_size}")
        if self.membrane_angles < 1 or not 1 <= self.membrane_thickness <= self.membrane_size:
            raise PosvitError("membrane angles must be ≥ 1 and thickness between 1 and the kernel size")

    @property
    def blur_sigmas(self) -> tuple[float, ...]:
        """The σ actually used for each nominal σ (``int(0.4σ)`` with ``weka_compat``)."""
        if self.weka_compat:
            return tuple(float(int(0.4 * s)) for s in self.sigmas)
        return self.sigmas

    @property
    def blur_radii(self) -> tuple[int, ...]:
        """Half-width in pixels of the Gaussian kernel used for each nominal σ.

        ``int(4σ + 0.5)`` by default. With ``weka_compat`` the reference's truncation: it passed the blur
        σ' = ``int(0.4σ)`` with ``truncate = (4·0.4σ + 2)/(2·0.4σ)`` (computed from 0.4σ, not σ'), so the
        radius is ``int(truncate·σ' + 0.5)``: 3, 7 and 13 pixels for σ = 4, 8, 16 (0 where σ' = 0).
        """
        if not self.weka_compat:
            return tuple(_radius(s) for s in self.blur_sigmas)
        radii = []
        for s in self.sigmas:
            scaled = WEKA_SIGMA_MULTIPLIER * s
            kernel_width = 4 * scaled + 1  # the reference's intermediate, kept so that it rounds the same way
            truncate = (kernel_width + 1) / (2 * scaled)
            radii.append(int(truncate * int(scaled) + 0.5))
        return tuple(radii)

    @property
    def blur_mode(self) -> str:
        """Boundary of the Gaussian blurs (SciPy's name): ``reflect`` (d c b a | a b c d), or with
        ``weka_compat`` the reference's ``nearest`` (a a a a | a b c d)."""
        return "nearest" if self.weka_compat else "reflect"

    @property
    def membrane_stats(self) -> tuple[str, ...]:
        """Order of the membrane statistics: :data:`MEMBRANE_STATS`, or :data:`WEKA_MEMBRANE_STATS`."""
        return WEKA_MEMBRANE_STATS if self.weka_compat else MEMBRANE_STATS

    @property
    def membrane_line_width(self) -> int:
        """Columns of ones in the membrane kernel: the thickness; with ``weka_compat`` the reference's
        ``2·(thickness // 2) + 1`` (it widened an even thickness by one)."""
        if self.weka_compat:
            return 2 * (self.membrane_thickness // 2) + 1
        return self.membrane_thickness

    @property
    def halo(self) -> int:
        """Pixels of context each side that make a tile's features equal to the whole image's.

        The widest Gaussian's radius plus two pixels for the second differences, or the membrane kernel's
        radius, whichever is larger.
        """
        reach = 0
        if any(g in self.groups for g in ("gradient", "hessian")):
            reach = 2
        blur = max((r for s, r in zip(self.blur_sigmas, self.blur_radii) if s > 0), default=0)
        if not any(g in self.groups for g in ("intensity", "gradient", "hessian", "dog")):
            blur = 0
        mem = self.membrane_size // 2 if "membrane" in self.groups else 0
        return max(blur + reach, mem)

    def to_dict(self) -> dict:
        out = {
            "sigmas": list(self.sigmas),
            "groups": list(self.groups),
            "weka_compat": self.weka_compat,
            "membrane_size": self.membrane_size,
            "membrane_angles": self.membrane_angles,
            "membrane_thickness": self.membrane_thickness,
        }
        if self.weka_compat:
            out["weka_revision"] = _WEKA_REVISION
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ClassicalConfig:
        """The configuration :meth:`to_dict` wrote.

        Raises
        ------
        PosvitError
            For a ``weka_compat`` configuration saved before those features matched the reference.
        """
        if d.get("weka_compat") and int(d.get("weka_revision", 1)) < _WEKA_REVISION:
            raise PosvitError("this segmenter was trained with posvit's earlier --weka-compat features (other blurs, "
                              "DoG signs and membrane order than the reference's): train it again")
        return cls(
            sigmas=tuple(d["sigmas"]),
            groups=tuple(d["groups"]),
            weka_compat=bool(d.get("weka_compat", False)),
            membrane_size=int(d.get("membrane_size", 15)),
            membrane_angles=int(d.get("membrane_angles", 30)),
            membrane_thickness=int(d.get("membrane_thickness", 1)),
        )


def _radius(sigma: float) -> int:
    return int(TRUNCATE * sigma + 0.5)


def _fmt(s: float) -> str:
    return f"{s:g}"


def feature_names(config: ClassicalConfig | None = None) -> list[str]:
    """Channel names of :func:`classical_features`, in channel order.

    Examples
    --------
    >>> len(feature_names())
    58
    >>> feature_names()[:3]
    ['raw', 'gradient', 'hessian_eig1']
    """
    cfg = config or ClassicalConfig()
    g = cfg.groups
    names: list[str] = []
    for scale in [None, *cfg.sigmas]:
        suffix = "" if scale is None else f"_s{_fmt(scale)}"
        if "intensity" in g:
            names.append("raw" if scale is None else f"gauss{suffix}")
        if "gradient" in g:
            names.append(f"gradient{suffix}")
        if "hessian" in g:
            names.extend(f"hessian_{p}{suffix}" for p in HESSIAN_PARTS)
    if "dog" in g:
        s = cfg.sigmas
        names.extend(f"dog_s{_fmt(s[a])}-s{_fmt(s[b])}" for a, b in _dog_pairs(len(s), cfg.weka_compat))
    if "membrane" in g:
        names.extend(f"membrane_{m}" for m in cfg.membrane_stats)
    return names


def _dog_pairs(n: int, weka_compat: bool) -> list[tuple[int, int]]:
    """Index pairs ``(a, b)`` of the DoG channels, each G(σa) − G(σb), in channel order.

    The larger σ runs in the outer loop. By default the larger blur minus the smaller; with ``weka_compat`` the
    reference's smaller minus larger.
    """
    return [(j, i) if weka_compat else (i, j) for i in range(n) for j in range(i)]


def membrane_kernels(size: int = 15, angles: int = 30, thickness: int = 1) -> np.ndarray:
    """The rotated line kernels of the membrane projections.

    Parameters
    ----------
    size : int
        Kernel side in pixels (odd).
    angles : int
        Number of rotations; kernel ``i`` is rotated by ``180°·i/angles``.
    thickness : int
        Width of the line in pixels.

    Returns
    -------
    ndarray of float32, shape (angles, size, size)
        Values 0 or 1.
    """
    from scipy.ndimage import rotate

    base = np.zeros((size, size), np.float64)
    lo = size // 2 - (thickness - 1) // 2
    base[:, lo : lo + thickness] = 1.0
    out = np.empty((angles, size, size), np.float32)
    for i in range(angles):
        rotated = rotate(base, 180.0 * i / angles, reshape=False, order=3, mode="constant")
        out[i] = np.clip(np.rint(rotated), 0.0, 1.0)
    return out


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2:
        raise PosvitError(f"classical features need a greyscale (H, W) image, got shape {img.shape}")
    if min(img.shape) < 2:
        raise PosvitError(f"image of {img.shape[0]}×{img.shape[1]} px is too small for derivative features")
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        raise PosvitError("image contains NaN or inf")
    return img


# --------------------------------------------------------------------------------------------------------------
# Derivatives shared by the NumPy and torch backends (slicing and arithmetic only)


def _gradient(f, empty_like):
    """``numpy.gradient`` of a 2-D array: (d/dy, d/dx), one-sided on the border."""
    gy = empty_like(f)
    gx = empty_like(f)
    gy[1:-1] = (f[2:] - f[:-2]) * 0.5
    gy[0] = f[1] - f[0]
    gy[-1] = f[-1] - f[-2]
    gx[:, 1:-1] = (f[:, 2:] - f[:, :-2]) * 0.5
    gx[:, 0] = f[:, 1] - f[:, 0]
    gx[:, -1] = f[:, -1] - f[:, -2]
    return gy, gx


def _scale_features(f, want_grad: bool, want_hess: bool, sqrt, empty_like) -> list:
    """Gradient magnitude and the five Hessian values of one scale image, in channel order."""
    out = []
    gy, gx = _gradient(f, empty_like)
    if want_grad:
        out.append(sqrt(gx * gx + gy * gy))
    if want_hess:
        hxy, hxx = _gradient(gx, empty_like)
        hyy, _ = _gradient(gy, empty_like)
        del gx, gy
        xx, yy, xy2 = hxx * hxx, hyy * hyy, hxy * hxy
        p = hxx * hyy
        trace = hxx + hyy
        diff = hxx - hyy
        root = sqrt(diff * diff + 4.0 * xy2)
        out.append((trace + root) * 0.5)
        out.append((trace - root) * 0.5)
        out.append(sqrt(xx + yy + xy2))
        out.append(trace)
        out.append(p - xy2)
    return out


def _scale_block_numpy(f: np.ndarray, y0: int, y1: int, want_grad: bool, want_hess: bool, dst: np.ndarray) -> None:
    """Derivative features of rows ``y0:y1`` of ``f`` into ``dst[:, y0:y1]``.

    Second differences reach two rows, so a slab two rows larger on each side (clipped at the image border,
    where the one-sided differences of :func:`numpy.gradient` apply) gives exactly the whole-image values.
    """
    H = f.shape[0]
    s0, s1 = max(0, y0 - 2), min(H, y1 + 2)
    slab = f[s0:s1]
    a, b = y0 - s0, y0 - s0 + (y1 - y0)
    if slab.shape[0] < 2:  # a single-row slab cannot happen for H >= 2 and blocks >= 1 row, but stay safe
        slab = f
        a, b = y0, y1
    feats = _scale_features(slab, want_grad, want_hess, np.sqrt, np.empty_like)
    for k, arr in enumerate(feats):
        dst[k, y0:y1] = arr[a:b]


# --------------------------------------------------------------------------------------------------------------
# Sorting network for the membrane order statistics


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators of Batcher's odd-even merge sort for ``n`` wires (a power of two)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


def _selection_network(n: int, wanted: Sequence[int]) -> list[tuple[int, int]]:
    """Comparators that put the order statistics ``wanted`` of ``n`` values on their wires.

    A Batcher network for the next power of two, restricted to ``n`` wires (the missing wires act as +inf and
    never move), pruned backwards to the comparators that can influence a wanted wire.
    """
    size = 1 << max(0, (n - 1).bit_length())
    pairs = [(i, j) for i, j in _batcher_pairs(size) if j < n]
    need = set(wanted)
    kept = []
    for i, j in reversed(pairs):
        if i in need or j in need:
            kept.append((i, j))
            need |= {i, j}
    return kept[::-1]


def _membrane_block_numpy(padded, taps, y0: int, y1: int, width: int, network, n_angles: int, out) -> None:
    """Membrane statistics for output rows ``y0:y1``, written to ``out[k][y0:y1]``.

    ``out`` holds six (H, W) planes for sum, mean, std, median, max and min (:data:`MEMBRANE_STATS`).
    """
    rows = y1 - y0
    resp = []
    for offsets in taps:
        (ay, ax), rest = offsets[0], offsets[1:]
        acc = padded[y0 + ay : y1 + ay, ax : ax + width].copy()
        for dy, dx in rest:
            acc += padded[y0 + dy : y1 + dy, dx : dx + width]
        resp.append(acc)
    total = resp[0].copy()
    for r in resp[1:]:
        total += r
    mean = total / np.float32(n_angles)
    var = np.zeros((rows, width), np.float32)
    tmp = np.empty((rows, width), np.float32)
    for r in resp:
        np.subtract(r, mean, out=tmp)
        tmp *= tmp
        var += tmp
    var /= np.float32(n_angles)
    out[0][y0:y1] = total
    out[1][y0:y1] = mean
    out[2][y0:y1] = np.sqrt(var)
    wires = resp
    for i, j in network:
        np.minimum(wires[i], wires[j], out=tmp)
        np.maximum(wires[i], wires[j], out=wires[j])
        wires[i], tmp = tmp, wires[i]
    mid = n_angles // 2
    if n_angles % 2:
        out[3][y0:y1] = wires[mid]
    else:
        out[3][y0:y1] = (wires[mid - 1] + wires[mid]) * np.float32(0.5)
    out[4][y0:y1] = wires[n_angles - 1]
    out[5][y0:y1] = wires[0]


def _membrane_numpy(img: np.ndarray, cfg: ClassicalConfig, out: np.ndarray, pool) -> None:
    """The six membrane statistics of ``img`` into ``out`` (6, H, W), in the order of ``cfg.membrane_stats``."""
    kernels = membrane_kernels(cfg.membrane_size, cfg.membrane_angles, cfg.membrane_line_width)
    out = [out[cfg.membrane_stats.index(m)] for m in MEMBRANE_STATS]
    r = cfg.membrane_size // 2
    padded = np.pad(img, r, mode="symmetric")
    taps = [list(zip(*(a.tolist() for a in np.nonzero(k)))) for k in kernels]
    n = cfg.membrane_angles
    mid = n // 2
    wanted = sorted({0, n - 1, mid, max(mid - 1, 0)})
    network = _selection_network(n, wanted)
    H, W = img.shape
    block = max(1, min(H, _BLOCK_PIXELS // max(W, 1)))
    starts = range(0, H, block)
    jobs = [(y, min(H, y + block)) for y in starts]
    run = lambda yy: _membrane_block_numpy(padded, taps, yy[0], yy[1], W, network, n, out)  # noqa: E731
    if pool is None:
        for yy in jobs:
            run(yy)
    else:
        list(pool.map(run, jobs))


# --------------------------------------------------------------------------------------------------------------
# Gaussian blurs

# numpy.pad's names for SciPy's boundary modes.
_NUMPY_PAD = {"reflect": "symmetric", "nearest": "edge"}


def _gaussian_kernel1d(sigma: float, radius: int) -> np.ndarray:
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blurs_fft(img: np.ndarray, sigmas: Sequence[float], radii: Sequence[int], mode: str,
               workers: int) -> list[np.ndarray]:
    """Gaussian blurs from one FFT of the padded image (exact linear convolution).

    Parameters
    ----------
    img : ndarray of float32, shape (H, W)
    sigmas, radii : sequences of float and int
        σ of each blur (0: the image itself) and the half-width of its kernel in pixels.
    mode : {"reflect", "nearest"}
        Boundary, as SciPy names it.
    workers : int
        FFT threads.

    Returns
    -------
    list of ndarray of float32, shape (H, W)
    """
    import scipy.fft as sfft

    H, W = img.shape
    positive = [r for s, r in zip(sigmas, radii) if s > 0]
    if not positive:
        return [img for _ in sigmas]
    pad = max(positive)
    # Blurring preserves constants: transforming the image minus its mean keeps the FFT's rounding error
    # proportional to the image's variation rather than to its brightness.
    offset = np.float32(img.mean(dtype=np.float64))
    padded = np.pad(img - offset, pad, mode=_NUMPY_PAD[mode])
    nh = sfft.next_fast_len(H + 2 * pad, real=True)
    nw = sfft.next_fast_len(W + 2 * pad, real=True)
    spectrum = sfft.rfft2(padded, s=(nh, nw), workers=workers)
    del padded

    def transfer(sigma: float, radius: int, n: int, real: bool) -> np.ndarray:
        k = _gaussian_kernel1d(sigma, radius)
        r = (k.size - 1) // 2
        circ = np.zeros(n)
        circ[: r + 1] = k[r:]
        if r:
            circ[n - r :] = k[:r]
        f = sfft.rfft(circ) if real else sfft.fft(circ)
        return f.real.astype(np.float32)  # a symmetric kernel has a real spectrum

    out = []
    for s, r in zip(sigmas, radii):
        if s <= 0:
            out.append(img)
            continue
        prod = spectrum * transfer(s, r, nh, False)[:, None]
        prod *= transfer(s, r, nw, True)[None, :]
        full = sfft.irfft2(prod, s=(nh, nw), workers=workers)
        blurred = np.ascontiguousarray(full[pad : pad + H, pad : pad + W], dtype=np.float32)
        blurred += offset
        out.append(blurred)
    return out


# --------------------------------------------------------------------------------------------------------------
# Public entry points


def _threads(threads: int | None) -> int:
    if threads:
        return max(1, int(threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def classical_features(
    image: np.ndarray,
    config: ClassicalConfig | None = None,
    *,
    device: str = "cpu",
    backend: str = "auto",
    threads: int | None = None,
) -> np.ndarray:
    """Compute the classical filter bank of a greyscale image.

    Parameters
    ----------
    image : ndarray, shape (H, W)
        Greyscale intensities, normally in [0, 1] (:func:`posvit_cli.core.io.images.to_float`).
    config : ClassicalConfig, optional
        Feature set; the 58-channel default when omitted.
    device : str
        ``cpu`` or a torch device such as ``cuda`` / ``cuda:1``.
    backend : {"auto", "numpy", "torch"}
        ``auto``: NumPy/SciPy (threaded) on the CPU, torch on other devices. The NumPy backend measured fastest
        on CPUs (a 30-output-channel ``conv2d`` and ``torch.sort`` are several times slower there).
    threads : int, optional
        CPU threads; defaults to the cores this process may use.

    Returns
    -------
    ndarray of float32, shape (H, W, C)
        Channels in the order of :func:`feature_names`. The array is a channel-last *view* of a channel-first
        buffer (each channel is contiguous), so selecting pixels or row blocks is cheap; call
        ``numpy.ascontiguousarray`` if pixel-contiguous memory is needed.

    Raises
    ------
    PosvitError
        For a non-2-D image, one smaller than 2×2 pixels, or NaN/inf intensities.
    """
    cfg = config or ClassicalConfig()
    img = _check_image(image)
    if backend not in ("auto", "numpy", "torch"):
        raise PosvitError(f"unknown feature backend '{backend}': use auto, numpy or torch")
    if backend == "torch" or (backend == "auto" and str(device) != "cpu"):
        return _classical_torch(img, cfg, device)
    if str(device) != "cpu":
        raise PosvitError("the numpy feature backend runs on the CPU only")
    n_threads = _threads(threads)
    names = feature_names(cfg)
    H, W = img.shape
    buf = np.empty((len(names), H, W), np.float32)
    g = cfg.groups
    want_grad, want_hess = "gradient" in g, "hessian" in g
    need_blurs = any(x in g for x in ("intensity", "gradient", "hessian", "dog"))
    blurs = _blurs_fft(img, cfg.blur_sigmas, cfg.blur_radii, cfg.blur_mode, n_threads) if need_blurs else []
    per_scale = int("intensity" in g) + int(want_grad) + 5 * int(want_hess)
    block = max(1, min(H, _BLOCK_PIXELS // max(W, 1)))
    blocks = [(y, min(H, y + block)) for y in range(0, H, block)]
    jobs = []
    n_scales = len(cfg.sigmas) + 1 if need_blurs else 0
    for k in range(n_scales):
        f = img if k == 0 else blurs[k - 1]
        c = k * per_scale
        if "intensity" in g:
            buf[c] = f
            c += 1
        if want_grad or want_hess:
            jobs.extend((f, y0, y1, buf[c : c + per_scale - int("intensity" in g)]) for y0, y1 in blocks)

    def do_block(job) -> None:
        f, y0, y1, dst = job
        _scale_block_numpy(f, y0, y1, want_grad, want_hess, dst)

    pool = ThreadPoolExecutor(n_threads, thread_name_prefix="posvit-features") if n_threads > 1 else None
    try:
        if pool is None:
            for job in jobs:
                do_block(job)
        else:
            list(pool.map(do_block, jobs))
        c = per_scale * (len(cfg.sigmas) + 1) if need_blurs else 0
        if "dog" in g:
            for a, b in _dog_pairs(len(cfg.sigmas), cfg.weka_compat):
                np.subtract(blurs[a], blurs[b], out=buf[c])
                c += 1
        if "membrane" in g:
            _membrane_numpy(img, cfg, buf[c : c + 6], pool)
    finally:
        if pool is not None:
            pool.shutdown()
    return buf.transpose(1, 2, 0)


def _pad_index(n: int, pad: int, device, mode: str = "reflect"):
    """Indices that pad a length-``n`` axis by ``pad`` on each side with ``reflect`` (d c b a | a b c d) or
    ``nearest`` (a a a | a b c d)."""
    import torch

    idx = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest":
        return idx.clamp(0, n - 1)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


@contextlib.contextmanager
def _ieee_convolutions():
    """Full-fp32 cuDNN convolutions for the duration (cuDNN defaults to TF32).

    TF32 keeps 10 mantissa bits: harmless for a blur, but the Hessian determinant and the eigenvalues are
    differences of nearly equal products of such blurs, and they lost up to half their range on an H100.
    """
    import torch

    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = old


def _classical_torch(img: np.ndarray, cfg: ClassicalConfig, device) -> np.ndarray:
    """The filter bank in torch on ``device`` (used for CUDA)."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(img)).to(dev)
    H, W = img.shape
    g = cfg.groups

    def pad2(t, p, mode="reflect"):
        return t.index_select(0, _pad_index(H, p, dev, mode)).index_select(1, _pad_index(W, p, dev, mode))

    def blur(s: float, r: int):
        if s <= 0:
            return x
        k = torch.from_numpy(_gaussian_kernel1d(s, r).astype(np.float32)).to(dev)
        p = pad2(x, r, cfg.blur_mode)[None, None]
        p = F.conv2d(p, k.view(1, 1, 1, -1))
        p = F.conv2d(p, k.view(1, 1, -1, 1))
        return p[0, 0]

    with torch.inference_mode(), _ieee_convolutions():
        blurs = [blur(s, r) for s, r in zip(cfg.blur_sigmas, cfg.blur_radii)] if any(
            v in g for v in ("intensity", "gradient", "hessian", "dog")) else []
        chans = []
        if blurs:
            for f in [x, *blurs]:
                if "intensity" in g:
                    chans.append(f)
                if "gradient" in g or "hessian" in g:
                    chans.extend(_scale_features(f, "gradient" in g, "hessian" in g, torch.sqrt, torch.empty_like))
        if "dog" in g:
            chans.extend(blurs[a] - blurs[b] for a, b in _dog_pairs(len(blurs), cfg.weka_compat))
        if "membrane" in g:
            ker = torch.from_numpy(
                membrane_kernels(cfg.membrane_size, cfg.membrane_angles, cfg.membrane_line_width)
            ).to(dev)[:, None]
            r = cfg.membrane_size // 2
            resp = F.conv2d(pad2(x, r)[None, None], ker)[0]
            n = resp.shape[0]
            srt = torch.sort(resp, dim=0).values
            mid = n // 2
            median = srt[mid] if n % 2 else (srt[mid - 1] + srt[mid]) * 0.5
            total = resp.sum(0)
            stats = dict(zip(MEMBRANE_STATS, [total, total / n, resp.std(0, unbiased=False), median, srt[-1], srt[0]]))
            chans.extend(stats[m] for m in cfg.membrane_stats)
        out = torch.stack(chans).cpu().numpy()
    return out.transpose(1, 2, 0)


def classical_features_reference(image: np.ndarray, config: ClassicalConfig | None = None) -> np.ndarray:
    """The straightforward NumPy/SciPy implementation of :func:`classical_features` (slow; for checks).

    ``scipy.ndimage.gaussian_filter`` per σ, ``numpy.gradient`` for the derivatives, and the membrane
    projections by correlating the image with each rotated kernel (``scipy.ndimage.correlate``) and taking
    ``numpy`` statistics over the stack.

    Returns
    -------
    ndarray of float32, shape (H, W, C)
    """
    from scipy import ndimage as ndi

    cfg = config or ClassicalConfig()
    img = _check_image(image)
    g = cfg.groups
    blurs = [img if s <= 0 else ndi.gaussian_filter(img, s, mode=cfg.blur_mode, radius=r)
             for s, r in zip(cfg.blur_sigmas, cfg.blur_radii)]
    chans = []
    if any(v in g for v in ("intensity", "gradient", "hessian", "dog")):
        for f in [img, *blurs]:
            if "intensity" in g:
                chans.append(f)
            gy, gx = np.gradient(f)
            if "gradient" in g:
                chans.append(np.sqrt(gx**2 + gy**2))
            if "hessian" in g:
                hxy, hxx = np.gradient(gx)
                hyy, _ = np.gradient(gy)
                tr = hxx + hyy
                root = np.sqrt((hxx - hyy) ** 2 + 4 * hxy**2)
                chans += [(tr + root) / 2, (tr - root) / 2, np.sqrt(hxx**2 + hxy**2 + hyy**2), tr, hxx * hyy - hxy**2]
    if "dog" in g:
        chans += [blurs[a] - blurs[b] for a, b in _dog_pairs(len(blurs), cfg.weka_compat)]
    if "membrane" in g:
        kernels = membrane_kernels(cfg.membrane_size, cfg.membrane_angles, cfg.membrane_line_width)
        stack = np.stack([ndi.correlate(img, k, mode="reflect") for k in kernels])
        stats = dict(zip(MEMBRANE_STATS, [stack.sum(0), stack.mean(0), stack.std(0), np.median(stack, 0),
                                          stack.max(0), stack.min(0)]))
        chans += [stats[m] for m in cfg.membrane_stats]
    return np.stack([np.asarray(c, np.float32) for c in chans], axis=-1)


"""Synthetic greyscale micrographs with dense ground truth, for the examples, the tests and posvit's own encoder.

Every structure is built on a torus: random fields come from FFTs, distances wrap around the edges and objects
that cross an edge re-enter on the other side. No position in a generated image is special, so any positional
signal an encoder shows on these images comes from the encoder, not from the data. (An optional illumination
ramp, an acquisition artefact, is the one deliberate exception.)

Kinds with ground truth (mask class indices, in this order):

``grains``
    Two-phase polycrystal (relaxed Voronoi tessellation): 0 ``phase_a`` (bright grains), 1 ``phase_b`` (dark
    grains), 2 ``boundary`` (etched grain boundaries).
``particles``
    Battery-electrode look: 0 ``binder`` (textured carbon-binder matrix), 1 ``particle`` (bright, shaded
    ellipses of active material), 2 ``pore`` (dark).
``cracks``
    0 ``matrix`` (a faint polycrystal or a smooth texture), 1 ``crack`` (dark, tapered, branching random walks).

Textures without ground truth (for positional probes): ``fractal`` (band-limited 1/f^β Gaussian field) and
``spinodal`` (thresholded band-pass field: the labyrinth of spinodal decomposition).

A generator returns a :class:`Structure` (noise-free intensity and mask); :func:`acquire` adds the microscope
(blur, illumination ramp, gamma/contrast, Poisson and Gaussian noise); :func:`scribbles` draws sparse training
labels inside the classes of a mask; :func:`make_sample` does all three from one seed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = [
    "CLASS_NAMES",
    "KINDS",
    "STRUCTURE_KINDS",
    "TEXTURE_KINDS",
    "Acquisition",
    "Sample",
    "Structure",
    "acquire",
    "crack_structure",
    "fractal_texture",
    "gaussian_field",
    "grain_structure",
    "make_sample",
    "make_structure",
    "particle_structure",
    "scribbles",
    "spinodal_texture",
    "to_uint8",
]

#: Class names of each kind with ground truth; mask value ``i`` is ``CLASS_NAMES[kind][i]``.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "grains": ("phase_a", "phase_b", "boundary"),
    "particles": ("binder", "particle", "pore"),
    "cracks": ("matrix", "crack"),
}
STRUCTURE_KINDS = tuple(CLASS_NAMES)
TEXTURE_KINDS = ("fractal", "spinodal")
KINDS = STRUCTURE_KINDS + TEXTURE_KINDS


@dataclasses.dataclass
class Structure:
    """A noise-free synthetic micrograph.

    Attributes
    ----------
    kind : str
    clean : ndarray of float32, shape (H, W)
        Intensity in [0, 1] before the microscope (:func:`acquire`).
    mask : ndarray of uint8, shape (H, W), or None
        Class index of every pixel (see :data:`CLASS_NAMES`); None for textures.
    params : dict
        The parameters drawn for this structure (JSON-serialisable).
    """

    kind: str
    clean: np.ndarray
    mask: np.ndarray | None
    params: dict

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES.get(self.kind, ())


# --------------------------------------------------------------------------------------------------------------
# Periodic building blocks


def gaussian_field(shape, rng: np.random.Generator, amplitude) -> np.ndarray:
    """A periodic Gaussian random field with a given radial amplitude spectrum, standardised.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` in pixels.
    rng : numpy Generator
    amplitude : callable
        ``amplitude(k)`` for radial frequency ``k`` in cycles per pixel (an ndarray); the square root of the
        power spectrum. Its value at ``k = 0`` is ignored (the field has zero mean).

    Returns
    -------
    ndarray of float32, shape (H, W)
        Zero mean, unit standard deviation; periodic in both axes.
    """
    import scipy.fft

    H, W = shape
    white = rng.standard_normal((H, W), dtype=np.float32)
    ky = np.fft.fftfreq(H).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(W).astype(np.float32)[None, :]
    k = np.sqrt(ky * ky + kx * kx)
    amp = np.asarray(amplitude(np.maximum(k, 1e-6)), dtype=np.float32)
    amp[0, 0] = 0.0
    field = scipy.fft.irfft2(scipy.fft.rfft2(white) * amp, s=(H, W)).astype(np.float32)
    sd = float(field.std())
    return field / sd if sd > 0 else field


def _smooth_amplitude(corr_length: float):
    """Amplitude spectrum of white noise blurred by a Gaussian of ``corr_length`` px."""
    c = 2.0 * math.pi**2 * corr_length**2
    return lambda k: np.exp(-c * k * k)


def _periodic_edt(sources: np.ndarray, pad: int):
    """Euclidean distance to the nearest ``True`` pixel of ``sources`` on the torus, and that pixel's index.

    Exact for every pixel whose nearest source lies within ``pad`` pixels (the caller checks ``dist <= pad``).

    Returns
    -------
    dist : ndarray of float32, shape (H, W)
    iy, ix : ndarray of intp, shape (H, W)
        Row and column of the nearest source pixel.
    """
    from scipy import ndimage as ndi

    H, W = sources.shape
    padded = np.pad(sources, pad, mode="wrap")
    dist, (iy, ix) = ndi.distance_transform_edt(~padded, return_indices=True)
    sl = (slice(pad, pad + H), slice(pad, pad + W))
    return dist[sl].astype(np.float32), (iy[sl] - pad) % H, (ix[sl] - pad) % W


def _voronoi(shape, seeds: np.ndarray) -> np.ndarray:
    """Label each pixel with the index of its nearest seed on the torus (Voronoi cells).

    ``seeds`` are ``(n, 2)`` (row, col) pixel positions; seeds on the same pixel merge into the first one.
    """
    H, W = shape
    iy = np.floor(seeds[:, 0]).astype(np.intp) % H
    ix = np.floor(seeds[:, 1]).astype(np.intp) % W
    ids = np.full((H, W), -1, np.int32)
    ids[iy[::-1], ix[::-1]] = np.arange(len(seeds), dtype=np.int32)[::-1]  # the first seed wins a shared pixel
    spacing = math.sqrt(H * W / max(len(seeds), 1))
    pad = int(min(max(H, W), math.ceil(3 * spacing) + 2))
    while True:
        dist, ny, nx = _periodic_edt(ids >= 0, pad)
        if dist.max() <= pad or pad >= max(H, W):
            return ids[ny, nx]
        pad = min(max(H, W), 2 * pad)


def _relaxed_seeds(shape, n: int, rng: np.random.Generator, iterations: int) -> np.ndarray:
    """``n`` seed positions, made more even by Lloyd iterations (cell centroids on the torus, on a coarse grid)."""
    H, W = shape
    seeds = rng.random((n, 2)) * np.array([H, W])
    if iterations <= 0:
        return seeds
    # Centroids need only a few pixels per cell: iterate on a coarse copy of the torus.
    scale = min(1.0, math.sqrt(64.0 * n / (H * W)) if n else 1.0)
    h, w = max(8, round(H * scale)), max(8, round(W * scale))
    yy, xx = np.mgrid[0:h, 0:w]
    ang_y = 2 * np.pi * (yy + 0.5) / h
    ang_x = 2 * np.pi * (xx + 0.5) / w
    cy, sy, cx, sx = np.cos(ang_y).ravel(), np.sin(ang_y).ravel(), np.cos(ang_x).ravel(), np.sin(ang_x).ravel()
    for _ in range(iterations):
        small = seeds * np.array([h / H, w / W])
        lab = _voronoi((h, w), small).ravel()
        # Circular means: the centroid of a cell that wraps around an edge is still inside the cell.
        my = np.arctan2(np.bincount(lab, sy, n), np.bincount(lab, cy, n))
        mx = np.arctan2(np.bincount(lab, sx, n), np.bincount(lab, cx, n))
        empty = np.bincount(lab, minlength=n) == 0
        new = np.stack([(my % (2 * np.pi)) / (2 * np.pi) * H, (mx % (2 * np.pi)) / (2 * np.pi) * W], axis=1)
        seeds = np.where(empty[:, None], seeds, new)
    return seeds


def _label_edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of another label (both sides of every cell boundary), wrapping at the edges."""
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        for step in (1, -1):
            edge |= labels != np.roll(labels, step, axis=axis)
    return edge


def _to_unit(field: np.ndarray, centre: float, spread: float) -> np.ndarray:
    return np.clip(centre + spread * field, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Structures with ground truth


def grain_structure(
    shape,
    rng: np.random.Generator,
    *,
    grain_size: float = 28.0,
    phase_fraction: float = 0.4,
    boundary_width: float = 2.0,
    relax: int = 2,
    levels: tuple[float, float, float] = (0.66, 0.4, 0.1),
    texture: float = 1.0,
) -> Structure:
    """A two-phase polycrystal with etched grain boundaries.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` in pixels.
    rng : numpy Generator
    grain_size : float
        Mean grain diameter in pixels (square root of the mean grain area).
    phase_fraction : float
        Probability that a grain belongs to phase B.
    boundary_width : float
        Boundary thickness in pixels (at least 2: one pixel on each side of the cell edge).
    relax : int
        Lloyd iterations on the seeds; more gives more equiaxed grains.
    levels : (float, float, float)
        Noise-free intensity of phase A, phase B and boundaries, in [0, 1].
    texture : float
        Scale of within-class variation (per-grain orientation contrast, fine texture); 0 makes every class one
        flat level, so the clean image and the mask map one to one.

    Returns
    -------
    Structure
        Mask classes 0 phase A, 1 phase B, 2 boundary.
    """
    H, W = shape
    n = max(2, round(H * W / grain_size**2))
    seeds = _relaxed_seeds(shape, n, rng, relax)
    labels = _voronoi(shape, seeds)
    phase_b = rng.random(n) < phase_fraction
    boundary = _label_edges(labels)
    if boundary_width > 2.0:
        boundary = _grow(boundary, (boundary_width - 2.0) / 2.0)
    mask = np.where(boundary, 2, phase_b[labels].astype(np.uint8)).astype(np.uint8)
    clean = np.asarray(levels, np.float32)[mask]
    if texture:
        grain_offset = rng.normal(0.0, 0.045, n).astype(np.float32)
        fine = gaussian_field(shape, rng, _smooth_amplitude(1.5))
        clean = clean + texture * np.where(boundary, 0.015 * fine, grain_offset[labels] + 0.025 * fine)
    params = dict(grains=int(n), grain_size=float(grain_size), phase_fraction=float(phase_fraction),
                  boundary_width=float(boundary_width), relax=int(relax), levels=[float(v) for v in levels],
                  texture=float(texture))
    return Structure("grains", np.clip(clean, 0.0, 1.0).astype(np.float32), mask, params)


def particle_structure(
    shape,
    rng: np.random.Generator,
    *,
    radius: float = 12.0,
    particle_fraction: float = 0.45,
    pore_fraction: float = 0.12,
    max_aspect: float = 1.6,
    levels: tuple[float, float, float] = (0.42, 0.8, 0.08),
    texture: float = 1.0,
) -> Structure:
    """Particles of active material in a textured binder, with pores: a battery-electrode cross-section.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` in pixels.
    rng : numpy Generator
    radius : float
        Median particle semi-major axis in pixels (log-normal sizes).
    particle_fraction : float
        Expected area fraction covered by particles (overlaps included, so the measured fraction scatters).
    pore_fraction : float
        Area fraction of pores, exact: the pores are the lowest pixels of a smooth field outside the particles
        (fewer if the binder is smaller than this).
    max_aspect : float
        Particles are ellipses with aspect ratio uniform in ``[1, max_aspect]``.
    levels : (float, float, float)
        Noise-free intensity of binder, particle and pore.
    texture : float
        Scale of within-class variation (binder texture, particle shading); 0 gives flat classes.

    Returns
    -------
    Structure
        Mask classes 0 binder, 1 particle, 2 pore.
    """
    H, W = shape
    radius = min(radius, min(H, W) / 6)
    # Boolean model: covered fraction = 1 - exp(-(total area)/(image area)).
    total_area = -math.log(1.0 - min(particle_fraction, 0.95)) * H * W
    sizes, aspects, angles = [], [], []
    area = 0.0
    while area < total_area:
        m = max(8, int((total_area - area) / (math.pi * radius**2)) + 8)
        a = np.minimum(radius * np.exp(rng.normal(0.0, 0.3, m)), min(H, W) / 3)
        asp = rng.uniform(1.0, max_aspect, m)
        ang = rng.uniform(0.0, np.pi, m)
        cum = area + np.cumsum(np.pi * a * a / asp)
        take = int(np.searchsorted(cum, total_area)) + 1
        take = min(take, m)
        sizes.append(a[:take])
        aspects.append(asp[:take])
        angles.append(ang[:take])
        area = float(cum[take - 1])
    a = np.concatenate(sizes)
    b = a / np.concatenate(aspects)
    theta = np.concatenate(angles)
    centres = rng.random((len(a), 2)) * np.array([H, W])
    shade = rng.normal(0.0, 0.04, len(a)).astype(np.float32)

    height = np.zeros((H, W), np.float32)  # dome height sqrt(1 - q) of the topmost particle
    pid = np.full((H, W), -1, np.int32)
    for i in range(len(a)):
        cy, cx = centres[i]
        r = int(math.ceil(a[i])) + 1
        ys = np.arange(int(cy) - r, int(cy) + r + 1)
        xs = np.arange(int(cx) - r, int(cx) + r + 1)
        dy = (ys - cy)[:, None]
        dx = (xs - cx)[None, :]
        c, s = math.cos(theta[i]), math.sin(theta[i])
        q = ((dx * c + dy * s) / a[i]) ** 2 + ((dy * c - dx * s) / b[i]) ** 2
        dome = np.sqrt(np.clip(1.0 - q, 0.0, None)).astype(np.float32)
        win = np.ix_(ys % H, xs % W)
        top = (q < 1.0) & (dome > height[win])
        height[win] = np.where(top, dome, height[win])
        pid[win] = np.where(top, i, pid[win])
    particle = pid >= 0

    pore_field = gaussian_field(shape, rng, _smooth_amplitude(max(1.5, 0.35 * radius)))
    free = ~particle
    n_pore = min(int(round(pore_fraction * H * W)), int(free.sum()))
    pore = np.zeros((H, W), bool)
    if n_pore:
        flat = np.flatnonzero(free)
        order = np.argpartition(pore_field.ravel()[flat], n_pore - 1)[:n_pore]
        pore.ravel()[flat[order]] = True

    mask = np.zeros((H, W), np.uint8)
    mask[particle] = 1
    mask[pore] = 2
    clean = np.asarray(levels, np.float32)[mask]
    if texture:
        fine = gaussian_field(shape, rng, _smooth_amplitude(1.0))
        binder_var = 0.07 * fine
        particle_var = shade[np.maximum(pid, 0)] + 0.12 * (height - 0.6) + 0.015 * fine
        pore_var = 0.02 * fine
        clean = clean + texture * np.choose(mask, [binder_var, particle_var, pore_var])
    params = dict(particles=int(len(a)), radius=float(radius), particle_fraction=float(particle_fraction),
                  pore_fraction=float(pore_fraction), max_aspect=float(max_aspect),
                  levels=[float(v) for v in levels], texture=float(texture))
    return Structure("particles", np.clip(clean, 0.0, 1.0).astype(np.float32), mask, params)


def _walk(start, angle: float, length: int, turn: float, rng: np.random.Generator, step: float = 0.7) -> np.ndarray:
    """A persistent random walk: ``(n, 2)`` float positions with heading noise ``turn`` rad per pixel."""
    n = max(2, int(length / step))
    heading = angle + np.cumsum(rng.normal(0.0, turn * math.sqrt(step), n))
    d = np.stack([np.sin(heading), np.cos(heading)], axis=1) * step
    return np.asarray(start, float) + np.cumsum(d, axis=0)


def crack_structure(
    shape,
    rng: np.random.Generator,
    *,
    crack_density: float = 1.0 / 70.0,
    crack_length: float = 140.0,
    max_width: float = 4.0,
    branch_prob: float = 0.6,
    turn: float = 0.06,
    matrix: str = "grains",
    levels: tuple[float, float] = (0.6, 0.08),
    texture: float = 1.0,
) -> Structure:
    """Tapered, branching cracks (persistent random walks) in a matrix.

    Parameters
    ----------
    shape : (int, int)
        ``(H, W)`` in pixels.
    rng : numpy Generator
    crack_density : float
        Total crack length per image area, in 1/px.
    crack_length : float
        Median length of a primary crack in pixels (log-normal).
    max_width : float
        Width of a primary crack at its middle, in pixels; cracks taper to one pixel at their tips.
    branch_prob : float
        Probability that a crack sprouts a branch (branches are 30-60 % as long and 60 % as wide).
    turn : float
        Heading noise in radians per pixel (larger = more tortuous).
    matrix : {"grains", "texture"}
        A faint polycrystal or a smooth texture around the cracks.
    levels : (float, float)
        Noise-free intensity of matrix and crack.
    texture : float
        Scale of within-class variation; 0 gives flat classes.

    Returns
    -------
    Structure
        Mask classes 0 matrix, 1 crack.
    """
    H, W = shape
    n_primary = max(1, round(crack_density * H * W / crack_length))
    centre = np.zeros((H, W), bool)
    half_width = np.zeros((H, W), np.float32)

    def draw(path: np.ndarray, width: float) -> None:
        t = np.linspace(0.0, 1.0, len(path))
        hw = np.maximum(0.5, 0.5 * width * np.sin(np.pi * t) ** 0.6).astype(np.float32)
        iy = np.floor(path[:, 0]).astype(np.intp) % H
        ix = np.floor(path[:, 1]).astype(np.intp) % W
        centre[iy, ix] = True
        np.maximum.at(half_width, (iy, ix), hw)

    n_branches = 0
    for _ in range(n_primary):
        length = crack_length * math.exp(rng.normal(0.0, 0.35))
        width = max_width * rng.uniform(0.6, 1.0)
        path = _walk(rng.random(2) * np.array([H, W]), rng.uniform(0, 2 * np.pi), int(length), turn, rng)
        draw(path, width)
        if rng.random() < branch_prob:
            j = rng.integers(len(path) // 5, 4 * len(path) // 5)
            d = path[min(j + 1, len(path) - 1)] - path[j - 1]
            heading = math.atan2(d[0], d[1]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
            draw(_walk(path[j], heading, int(length * rng.uniform(0.3, 0.6)), turn, rng), 0.6 * width)
            n_branches += 1
    dist, ny, nx = _periodic_edt(centre, int(math.ceil(max_width)) + 2)
    crack = dist <= half_width[ny, nx]
    mask = crack.astype(np.uint8)
    clean = np.asarray(levels, np.float32)[mask]
    if texture:
        if matrix == "grains":
            n = max(2, round(H * W / 40.0**2))
            labels = _voronoi(shape, _relaxed_seeds(shape, n, rng, 1))
            var = rng.normal(0.0, 0.04, n).astype(np.float32)[labels] - 0.08 * _label_edges(labels)
        else:
            var = 0.06 * gaussian_field(shape, rng, _smooth_amplitude(6.0))
        fine = gaussian_field(shape, rng, _smooth_amplitude(1.2))
        clean = clean + texture * np.where(crack, 0.02 * fine, var + 0.02 * fine)
    params = dict(cracks=int(n_primary), branches=int(n_branches), crack_density=float(crack_density),
                  crack_length=float(crack_length), max_width=float(max_width), branch_prob=float(branch_prob),
                  turn=float(turn), matrix=matrix, levels=[float(v) for v in levels], texture=float(texture))
    return Structure("cracks", np.clip(clean, 0.0, 1.0).astype(np.float32), mask, params)


# --------------------------------------------------------------------------------------------------------------
# Textures without ground truth


def fractal_texture(shape, rng: np.random.Generator, *, beta: float = 2.6, largest_scale: float = 64.0,
                    contrast: float = 0.16) -> Structure:
    """A band-limited fractal (1/f^β power spectrum) Gaussian field: rough surfaces, unresolved fine structure.

    Parameters
    ----------
    beta : float
        Power-spectrum exponent (2 to 3.5 look like natural rough surfaces).
    largest_scale : float
        Wavelength in pixels above which the spectrum is cut off, so the texture is homogeneous at image scale.
    contrast : float
        Standard deviation of the clean intensity around 0.5.
    """
    k_low = 1.0 / largest_scale
    field = gaussian_field(shape, rng, lambda k: k ** (-beta / 2) * (1.0 - np.exp(-((k / k_low) ** 2))))
    params = dict(beta=float(beta), largest_scale=float(largest_scale), contrast=float(contrast))
    return Structure("fractal", _to_unit(field, 0.5, contrast), None, params)


def spinodal_texture(shape, rng: np.random.Generator, *, wavelength: float = 18.0, volume_fraction: float = 0.5,
                     levels: tuple[float, float] = (0.3, 0.7), texture: float = 1.0) -> Structure:
    """A thresholded band-pass Gaussian field: the interconnected labyrinth of spinodal decomposition.

    Parameters
    ----------
    wavelength : float
        Characteristic period of the labyrinth in pixels.
    volume_fraction : float
        Area fraction of the bright phase.
    levels : (float, float)
        Intensity of the dark and the bright phase.
    """
    k0 = 1.0 / wavelength
    field = gaussian_field(shape, rng, lambda k: np.exp(-((k - k0) ** 2) / (2 * (0.3 * k0) ** 2)))
    bright = field > np.quantile(field, 1.0 - volume_fraction)
    clean = np.where(bright, levels[1], levels[0]).astype(np.float32)
    if texture:
        clean = clean + texture * 0.03 * gaussian_field(shape, rng, _smooth_amplitude(1.5))
    params = dict(wavelength=float(wavelength), volume_fraction=float(volume_fraction),
                  levels=[float(v) for v in levels], texture=float(texture))
    return Structure("spinodal", np.clip(clean, 0.0, 1.0).astype(np.float32), None, params)


def make_structure(kind: str, shape, rng: np.random.Generator, **overrides) -> Structure:
    """A structure of ``kind`` with randomly drawn parameters (any of them fixed by ``overrides``).

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    shape : (int, int)
        ``(H, W)`` in pixels.
    rng : numpy Generator
    **overrides
        Keyword arguments of the kind's generator, replacing the drawn values.

    Raises
    ------
    PosvitError
        For an unknown kind.
    """
    u = rng.uniform
    if kind == "grains":
        a = u(0.55, 0.78)
        p = dict(grain_size=u(16, 44), phase_fraction=u(0.25, 0.6), boundary_width=float(rng.choice([2.0, 3.0, 4.0])),
                 relax=int(rng.integers(1, 4)), levels=(a, a - u(0.18, 0.32), u(0.04, 0.14)))
        fn = grain_structure
    elif kind == "particles":
        p = dict(radius=u(7, 18), particle_fraction=u(0.35, 0.55), pore_fraction=u(0.06, 0.16),
                 max_aspect=u(1.1, 1.8), levels=(u(0.35, 0.5), u(0.74, 0.88), u(0.03, 0.12)))
        fn = particle_structure
    elif kind == "cracks":
        p = dict(crack_density=u(1 / 110, 1 / 50), crack_length=u(80, 200), max_width=u(2.5, 6.0),
                 branch_prob=u(0.3, 0.8), turn=u(0.03, 0.1), matrix=str(rng.choice(["grains", "texture"])),
                 levels=(u(0.5, 0.7), u(0.03, 0.12)))
        fn = crack_structure
    elif kind == "fractal":
        p = dict(beta=u(2.0, 3.4), largest_scale=u(24, 96), contrast=u(0.1, 0.2))
        fn = fractal_texture
    elif kind == "spinodal":
        lo = u(0.2, 0.4)
        p = dict(wavelength=u(10, 32), volume_fraction=u(0.35, 0.65), levels=(lo, lo + u(0.25, 0.45)))
        fn = spinodal_texture
    else:
        raise PosvitError(f"unknown kind '{kind}': use {', '.join(KINDS)}")
    p.update(overrides)
    return fn(tuple(int(v) for v in shape), rng, **p)


# --------------------------------------------------------------------------------------------------------------
# The microscope


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """How a clean structure is imaged.

    Attributes
    ----------
    blur_sigma : float
        Gaussian point-spread function, standard deviation in pixels (periodic).
    ramp : float
        Peak-to-peak relative gain of a linear illumination ramp (0 = even illumination).
    ramp_angle : float
        Direction of increasing illumination, radians (0 = left to right, π/2 = top to bottom).
    gamma : float
        Detector response exponent.
    contrast, offset : float
        Linear intensity map ``0.5 + contrast * (v - 0.5) + offset`` after gamma.
    photons : float or None
        Mean photon count at intensity 1 (Poisson shot noise); None for none.
    noise_sigma : float
        Gaussian read noise, in intensity units.
    """

    blur_sigma: float = 0.8
    ramp: float = 0.0
    ramp_angle: float = 0.0
    gamma: float = 1.0
    contrast: float = 1.0
    offset: float = 0.0
    photons: float | None = None
    noise_sigma: float = 0.02

    @classmethod
    def random(cls, rng: np.random.Generator, *, ramp_max: float = 0.0) -> Acquisition:
        """Plausible settings: mild blur, gamma 0.8-1.25, contrast 0.8-1.2, shot and/or read noise."""
        return cls(
            blur_sigma=float(rng.uniform(0.4, 1.6)),
            ramp=float(rng.uniform(0.0, ramp_max)) if ramp_max > 0 else 0.0,
            ramp_angle=float(rng.uniform(0.0, 2 * np.pi)),
            gamma=float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))),
            contrast=float(rng.uniform(0.8, 1.2)),
            offset=float(rng.uniform(-0.06, 0.06)),
            photons=float(rng.choice([np.exp(rng.uniform(np.log(30), np.log(400))), np.inf])),
            noise_sigma=float(rng.uniform(0.005, 0.05)),
        )

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["photons"] is not None and not np.isfinite(d["photons"]):
            d["photons"] = None
        return d


def acquire(clean: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Image a clean structure: blur, uneven illumination, gamma and contrast, then shot and read noise.

    Parameters
    ----------
    clean : ndarray of float, shape (H, W)
        Intensity in [0, 1].
    acq : Acquisition
    rng : numpy Generator
        Source of the noise.

    Returns
    -------
    ndarray of float32, shape (H, W)
        Recorded intensity, clipped to [0, 1].
    """
    from scipy import ndimage as ndi

    img = np.asarray(clean, np.float32)
    if acq.blur_sigma > 0:
        img = ndi.gaussian_filter(img, acq.blur_sigma, mode="wrap")
    if acq.ramp:
        H, W = img.shape
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        proj = (xx / max(W - 1, 1)) * math.cos(acq.ramp_angle) + (yy / max(H - 1, 1)) * math.sin(acq.ramp_angle)
        proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
        img = img * (1.0 + acq.ramp * (proj - 0.5))
    img = np.clip(img, 0.0, 1.0) ** acq.gamma
    img = 0.5 + acq.contrast * (img - 0.5) + acq.offset
    img = np.clip(img, 0.0, 1.0)
    if acq.photons is not None and np.isfinite(acq.photons):
        img = rng.poisson(img * acq.photons).astype(np.float32) / np.float32(acq.photons)
    if acq.noise_sigma > 0:
        img = img + rng.normal(0.0, acq.noise_sigma, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Quantise an intensity image in [0, 1] to 8 bits (round to nearest)."""
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Scribbles


def scribbles(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    strokes_per_class: int | None = None,
    length: int = 48,
    width: int = 3,
    margin: float = 4.0,
) -> np.ndarray:
    """Sparse training labels: thin strokes inside each class, away from its boundaries.

    Each stroke is a persistent walk that stays on pixels at least ``margin`` pixels (Chebyshev distance on the
    torus) from any other class; for classes too thin for that (grain boundaries, crack tips) the margin shrinks
    until a quarter of the class qualifies. Strokes are then thickened to ``width`` pixels without leaving the
    class.

    Parameters
    ----------
    mask : ndarray of int, shape (H, W)
        Class indices ``0..K-1``.
    rng : numpy Generator
    strokes_per_class : int, optional
        Strokes drawn per class present in the mask; by default one per 20,000 pixels of image (at least 2), so
        about 1-2 % of the pixels end up labelled at any image size.
    length : int
        Maximum stroke length in pixels (a stroke ends early where its class ends).
    width : int
        Stroke thickness in pixels (odd numbers give symmetric strokes).
    margin : float
        Minimum distance in pixels from a stroke's centre line to another class.

    Returns
    -------
    ndarray of uint8, shape (H, W)
        0 = unlabelled, ``k + 1`` = class ``k``.
    """
    mask = np.asarray(mask)
    H, W = mask.shape
    out = np.zeros((H, W), np.uint8)
    n_strokes = strokes_per_class if strokes_per_class is not None else max(2, round(H * W / 20000))
    for k in np.unique(mask):
        inside = mask == k
        allowed = _interior(inside, margin)
        cand = np.flatnonzero(allowed)
        if not cand.size:
            continue
        centre = np.zeros((H, W), bool)
        for _ in range(n_strokes):
            y, x = divmod(int(rng.choice(cand)), W)
            d = int(rng.integers(8))
            signs = rng.choice([-1, 1], size=(length, 3))
            wobble = rng.random(length) < 0.15
            for i in range(length):
                centre[y, x] = True
                # Keep going straight when the class allows (sometimes veer by 45°); otherwise turn as little
                # as possible, never straight back.
                s1, s2, s3 = signs[i]
                turns = (s1, 0, -s1, 2 * s2, -2 * s2, 3 * s3, -3 * s3) if wobble[i] else (
                    0, s1, -s1, 2 * s2, -2 * s2, 3 * s3, -3 * s3)
                for t in turns:
                    nd = (d + t) % 8
                    ny, nx = (y + _STEPS[nd][0]) % H, (x + _STEPS[nd][1]) % W
                    if allowed[ny, nx] and not centre[ny, nx]:
                        y, x, d = ny, nx, nd
                        break
                else:
                    break
        if width > 1:
            centre = _grow(centre, (width - 1) / 2.0) & inside
        out[centre] = k + 1
    return out


_STEPS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def _interior(inside: np.ndarray, margin: float) -> np.ndarray:
    """Pixels of a class at least ``margin`` px (Chebyshev, on the torus) from other classes.

    For a class too thin to have such pixels in bulk (grain boundaries, crack tips) the margin shrinks until at
    least a quarter of the class qualifies; at margin 0 that is the whole class.
    """
    from scipy import ndimage as ndi

    total = int(inside.sum())
    m = int(margin)
    while m > 0:
        core = ndi.minimum_filter(inside, size=2 * m + 1, mode="wrap")
        if core.sum() >= 0.25 * total:
            return core
        m -= 1
    return inside


def _grow(region: np.ndarray, radius: float) -> np.ndarray:
    """Dilate a boolean image by a disk of ``radius`` px, wrapping at the edges."""
    from scipy import ndimage as ndi

    if radius <= 0:
        return region
    return ndi.maximum_filter(region, footprint=_disk(radius), mode="wrap")


def _disk(r: float) -> np.ndarray:
    n = int(math.ceil(r))
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
    return (yy * yy + xx * xx) <= r * r + 1e-9


# --------------------------------------------------------------------------------------------------------------
# One sample from one seed


@dataclasses.dataclass
class Sample:
    """A generated micrograph with its ground truth.

    Attributes
    ----------
    kind : str
    seed : int
    image : ndarray of uint8, shape (H, W)
    mask : ndarray of uint8, shape (H, W), or None
    scribbles : ndarray of uint8, shape (H, W), or None
        0 = unlabelled, ``k + 1`` = class ``k``.
    class_names : tuple of str
    params : dict
        Structure and acquisition parameters (JSON-serialisable).
    """

    kind: str
    seed: int
    image: np.ndarray
    mask: np.ndarray | None
    scribbles: np.ndarray | None
    class_names: tuple[str, ...]
    params: dict


def make_sample(
    kind: str,
    size,
    seed: int,
    *,
    ramp_max: float = 0.0,
    with_scribbles: bool = True,
    scribble_options: dict | None = None,
    acquisition: Acquisition | None = None,
    **overrides,
) -> Sample:
    """Generate one micrograph, its mask and scribbles, deterministically from ``seed``.

    Structure, acquisition and scribbles draw from independent streams of ``seed``, so changing the scribble
    settings leaves the image unchanged.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    size : int or (int, int)
        Side or ``(H, W)`` in pixels.
    seed : int
    ramp_max : float
        Largest illumination ramp drawn (0: even illumination).
    with_scribbles : bool
        Draw scribbles (kinds with ground truth only).
    scribble_options : dict, optional
        Keyword arguments of :func:`scribbles`.
    acquisition : Acquisition, optional
        Fixed imaging settings instead of random ones.
    **overrides
        Structure parameters (see :func:`make_structure`).
    """
    shape = (int(size), int(size)) if np.isscalar(size) else tuple(int(v) for v in size)
    s_struct, s_acq, s_scrib = np.random.SeedSequence(int(seed)).spawn(3)
    structure = make_structure(kind, shape, np.random.default_rng(s_struct), **overrides)
    rng_acq = np.random.default_rng(s_acq)
    acq = acquisition or Acquisition.random(rng_acq, ramp_max=ramp_max)
    image = to_uint8(acquire(structure.clean, acq, rng_acq))
    scrib = None
    if with_scribbles and structure.mask is not None:
        scrib = scribbles(structure.mask, np.random.default_rng(s_scrib), **(scribble_options or {}))
    params = {"structure": structure.params, "acquisition": acq.as_dict()}
    return Sample(kind, int(seed), image, structure.mask, scrib, structure.class_names, params)

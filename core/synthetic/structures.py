"""Noise-free synthetic micrographs with dense ground truth, and textures without (see :mod:`.generate`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.synthetic.fields import (
    gaussian_field, grow_region, label_edges, periodic_edt, relaxed_seeds, smooth_amplitude, voronoi_labels,
)

__all__ = [
    "CLASS_NAMES",
    "KINDS",
    "STRUCTURE_KINDS",
    "TEXTURE_KINDS",
    "Structure",
    "crack_structure",
    "fractal_texture",
    "grain_structure",
    "make_structure",
    "particle_structure",
    "spinodal_texture",
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


def _to_unit(field: np.ndarray, centre: float, spread: float) -> np.ndarray:
    return np.clip(centre + spread * field, 0.0, 1.0).astype(np.float32)


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
    seeds = relaxed_seeds(shape, n, rng, relax)
    labels = voronoi_labels(shape, seeds)
    phase_b = rng.random(n) < phase_fraction
    boundary = label_edges(labels)
    if boundary_width > 2.0:
        boundary = grow_region(boundary, (boundary_width - 2.0) / 2.0)
    mask = np.where(boundary, 2, phase_b[labels].astype(np.uint8)).astype(np.uint8)
    clean = np.asarray(levels, np.float32)[mask]
    if texture:
        grain_offset = rng.normal(0.0, 0.045, n).astype(np.float32)
        fine = gaussian_field(shape, rng, smooth_amplitude(1.5))
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

    pore_field = gaussian_field(shape, rng, smooth_amplitude(max(1.5, 0.35 * radius)))
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
        fine = gaussian_field(shape, rng, smooth_amplitude(1.0))
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
    dist, ny, nx = periodic_edt(centre, int(math.ceil(max_width)) + 2)
    crack = dist <= half_width[ny, nx]
    mask = crack.astype(np.uint8)
    clean = np.asarray(levels, np.float32)[mask]
    if texture:
        if matrix == "grains":
            n = max(2, round(H * W / 40.0**2))
            labels = voronoi_labels(shape, relaxed_seeds(shape, n, rng, 1))
            var = rng.normal(0.0, 0.04, n).astype(np.float32)[labels] - 0.08 * label_edges(labels)
        else:
            var = 0.06 * gaussian_field(shape, rng, smooth_amplitude(6.0))
        fine = gaussian_field(shape, rng, smooth_amplitude(1.2))
        clean = clean + texture * np.where(crack, 0.02 * fine, var + 0.02 * fine)
    params = dict(cracks=int(n_primary), branches=int(n_branches), crack_density=float(crack_density),
                  crack_length=float(crack_length), max_width=float(max_width), branch_prob=float(branch_prob),
                  turn=float(turn), matrix=matrix, levels=[float(v) for v in levels], texture=float(texture))
    return Structure("cracks", np.clip(clean, 0.0, 1.0).astype(np.float32), mask, params)


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
        clean = clean + texture * 0.03 * gaussian_field(shape, rng, smooth_amplitude(1.5))
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

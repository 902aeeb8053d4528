"""The microscope of the synthetic micrographs: blur, illumination ramp, gamma/contrast, Poisson and Gaussian noise."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = [
    "Acquisition",
    "acquire",
    "to_uint8",
]


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

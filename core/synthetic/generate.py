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

Modules: :mod:`~posvit_cli.core.synthetic.fields` (periodic random fields and torus geometry),
:mod:`~posvit_cli.core.synthetic.structures` (the kinds, :class:`Structure`, :func:`make_structure`),
:mod:`~posvit_cli.core.synthetic.acquisition` (:class:`Acquisition`, :func:`acquire`, :func:`to_uint8`),
:mod:`~posvit_cli.core.synthetic.scribbles` (:func:`scribbles`) and this one (:class:`Sample`,
:func:`make_sample`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.synthetic.acquisition import Acquisition, acquire, to_uint8
from posvit_cli.core.synthetic.scribbles import scribbles
from posvit_cli.core.synthetic.structures import make_structure

__all__ = ["Sample", "make_sample"]


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
        One of :data:`~posvit_cli.core.synthetic.structures.KINDS`.
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

"""RASA views rotate as Franca's ``RandomRotation(90)``: any angle in [−90°, 90°] (not only quarter turns),
nearest-neighbour sampling, corners filled with 0; quarter turns stay available as an option."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from posvit_cli.core.debias.rasa import ViewOptions, _augmenter, _make_view, rotate_view, rotation_angle
from posvit_cli.core.errors import PosvitError


def _angles(rotation, n=2000):
    torch.manual_seed(0)
    return [rotation_angle(rotation) for _ in range(n)]


def test_rotation_angles_are_continuous_in_minus_90_to_90():
    drawn = _angles("any")
    angles = np.array([a for a in drawn if a is not None])
    # p = 0.5 of the views are rotated (binomial 2000 · 0.5 ± 5σ).
    assert abs(len(angles) - 1000) < 5 * np.sqrt(500)
    assert angles.min() >= -90 and angles.max() <= 90
    # Continuous: no angle is a multiple of 90°, and they spread uniformly (each 30° bin holds 1/6 ± 5σ).
    assert not np.any(np.isclose(angles % 90, 0))
    assert angles.min() < -89 and angles.max() > 89
    counts, _ = np.histogram(angles, bins=6, range=(-90, 90))
    assert np.all(np.abs(counts / len(angles) - 1 / 6) < 5 * np.sqrt((1 / 6) * (5 / 6) / len(angles)))
    # The earlier views: quarter turns only.
    assert set(a for a in _angles("quarter-turns") if a is not None) == {-90.0, 90.0}


def test_rotation_is_nearest_neighbour_with_zero_fill():
    rng = np.random.default_rng(0)
    # Distinct positive values: any interpolation other than nearest would create values not in the input.
    x = torch.from_numpy(rng.permutation(np.arange(1, 3 * 40 * 40 + 1)).reshape(3, 40, 40).astype(np.float32))
    for angle in (-73.3, -45.0, 12.5, 45.0, 89.0):
        y = rotate_view(x, angle)
        assert y.shape == x.shape
        assert set(torch.unique(y).tolist()) <= set(x.flatten().tolist()) | {0.0}
    # 45°: each corner of the square lies outside the rotated image, so it is the fill 0 ...
    y = rotate_view(x, 45.0)
    assert all(float(v) == 0.0 for v in y[:, [0, 0, -1, -1], [0, -1, 0, -1]].flatten())
    # ... and the centre pixel is still an input pixel; a quarter turn is exact (torch.rot90, no fill).
    assert float(y[0, 20, 20]) != 0.0
    assert torch.equal(rotate_view(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(rotate_view(x, -90.0), torch.rot90(x, 3, dims=(-2, -1)))


def test_augmented_views_rotate_by_any_angle_unless_quarter_turns_are_asked():
    # A constant grey image stays constant through crop, jitter, greyscale, blur and flips, so black (0) pixels
    # in a view can only come from a rotation by an angle that is not a quarter turn.
    enc = types.SimpleNamespace(patch_size=8, in_chans=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    img = np.full((64, 64, 3), 0.6, dtype=np.float32)
    fn = _augmenter(32, True)
    corners = {}
    for rotation in ("any", "quarter-turns"):
        opts = ViewOptions(crop=32, rotation=rotation).validate()
        views = [_make_view(img, enc, opts, fn, seed) for seed in range(40)]
        corners[rotation] = sum(bool((v == 0).all(0)[0, 0]) for v in views)
        assert all(float(v.min()) >= 0 for v in views)
    assert 8 <= corners["any"] <= 32  # about half the views are rotated, and then the corner is black
    assert corners["quarter-turns"] == 0
    with pytest.raises(PosvitError, match="--rotation"):
        ViewOptions(rotation="d4").validate()

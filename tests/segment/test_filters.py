"""The classical filter bank under ``weka_compat``: the reference featuriser's blurs, DoG sign and membrane order.

The expected values are written out by hand from the reference's documented behaviour (interactive-seg-backend's
CPU featuriser): blur σ' = int(0.4σ) with ``truncate = (4·0.4σ + 2)/(2·0.4σ)`` and boundary ``nearest``, DoGs
G(smaller σ) − G(larger σ), membrane statistics stored as mean, max, min, sum, std, median.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.segment.filters import ClassicalConfig, classical_features, feature_names, membrane_kernels

WEKA = ClassicalConfig(weka_compat=True)
BACKENDS = ["numpy", "torch"]


def hand_kernel(sigma: float, radius: int) -> np.ndarray:
    """A normalised Gaussian ``exp(-x²/2σ²)`` on ``-radius..radius``."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def channel(feats: np.ndarray, cfg: ClassicalConfig, name: str) -> np.ndarray:
    return feats[..., feature_names(cfg).index(name)]


def test_weka_blur_radii_follow_the_reference_truncation():
    # σ=4: σ'=1, truncate (6.4+2)/3.2 = 2.625 → int(2.625 + .5) = 3;
    # σ=8: σ'=3, truncate 2.3125 → int(6.9375 + .5) = 7;
    # σ=16: σ'=6, truncate 2.15625 → int(12.9375 + .5) = 13. σ=1, 2 are not blurred (σ'=0).
    assert WEKA.blur_sigmas == (0.0, 0.0, 1.0, 3.0, 6.0)
    assert WEKA.blur_radii[2:] == (3, 7, 13)
    assert WEKA.blur_mode == "nearest" and ClassicalConfig().blur_mode == "reflect"
    assert WEKA.halo == 13 + 2  # the widest kernel plus the second differences (membrane radius 7 is less)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weka_blurs_of_an_impulse_have_the_truncated_support(backend):
    img = np.zeros((64, 64), np.float32)
    img[32, 32] = 1.0
    feats = classical_features(img, WEKA, backend=backend, threads=1)
    for sigma, blur, radius in ((4, 1.0, 3), (8, 3.0, 7), (16, 6.0, 13)):
        k = hand_kernel(blur, radius)
        expected = np.zeros((64, 64))
        expected[32 - radius : 33 + radius, 32 - radius : 33 + radius] = np.outer(k, k)
        got = channel(feats, WEKA, f"gauss_s{sigma}")
        np.testing.assert_allclose(got, expected, atol=1e-7)
        assert np.count_nonzero(np.abs(got[32]) > 1e-6) == 2 * radius + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_weka_blurs_extend_the_border_pixel_nearest(backend):
    # A bright first column: 'nearest' repeats it outside the image, so at column c the blur is the kernel's mass
    # at offsets ≤ −c (reflect would mirror the dark columns 1, 2, 3 there instead).
    img = np.zeros((20, 24), np.float32)
    img[:, 0] = 1.0
    feats = classical_features(img, WEKA, backend=backend, threads=1)
    for sigma, blur, radius in ((4, 1.0, 3), (16, 6.0, 13)):
        k = hand_kernel(blur, radius)
        tail = np.cumsum(k)  # tail[radius - c] = mass at offsets -radius..-c
        expected = np.array([tail[radius - c] if c <= radius else 0.0 for c in range(24)])
        got = channel(feats, WEKA, f"gauss_s{sigma}")
        np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), atol=1e-6)
    assert got[0, 0] > 0.5  # more than half the kernel lies on the repeated bright column


@pytest.mark.parametrize("backend", BACKENDS)
def test_weka_dogs_are_the_smaller_blur_minus_the_larger(backend):
    img = np.zeros((41, 41), np.float32)
    img[20, 20] = 1.0
    feats = classical_features(img, WEKA, backend=backend, threads=1)
    names = feature_names(WEKA)
    assert names[-16:-6] == ["dog_s1-s2", "dog_s1-s4", "dog_s2-s4", "dog_s1-s8", "dog_s2-s8", "dog_s4-s8",
                             "dog_s1-s16", "dog_s2-s16", "dog_s4-s16", "dog_s8-s16"]
    centre = hand_kernel(1.0, 3)[3] ** 2  # the σ=4 blur (σ'=1, radius 3) of the impulse at its centre
    assert channel(feats, WEKA, "dog_s1-s4")[20, 20] == pytest.approx(1.0 - centre, abs=1e-6)  # impulse − blur > 0
    np.testing.assert_array_equal(channel(feats, WEKA, "dog_s1-s2"), 0.0)  # both unblurred (σ' = 0)
    assert channel(feats, WEKA, "dog_s8-s16")[20, 20] > 0  # a narrower blur is higher at the peak
    # The default bank keeps G(larger) − G(smaller) under its own names.
    assert feature_names()[-16] == "dog_s2-s1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_weka_membrane_channels_are_stored_mean_max_min_sum_std_median(backend):
    img = ndi.gaussian_filter(np.random.default_rng(3).random((30, 34)), 1.0).astype(np.float32)
    feats = classical_features(img, WEKA, backend=backend, threads=1)
    assert feature_names(WEKA)[-6:] == ["membrane_mean", "membrane_max", "membrane_min", "membrane_sum",
                                        "membrane_std", "membrane_median"]
    stack = np.stack([ndi.correlate(img.astype(np.float64), k, mode="reflect") for k in membrane_kernels()])
    expected = [stack.mean(0), stack.max(0), stack.min(0), stack.sum(0), stack.std(0), np.median(stack, 0)]
    for got, want in zip(np.moveaxis(feats[..., -6:], -1, 0), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The default bank's order is unchanged.
    default = classical_features(img, backend=backend, threads=1)
    np.testing.assert_allclose(default[..., -6], stack.sum(0), rtol=1e-5, atol=1e-5)


def test_weka_membrane_kernel_widens_an_even_thickness_as_the_reference():
    assert ClassicalConfig(weka_compat=True, membrane_thickness=2).membrane_line_width == 3
    assert ClassicalConfig(weka_compat=True, membrane_thickness=3).membrane_line_width == 3
    assert ClassicalConfig(membrane_thickness=2).membrane_line_width == 2


def test_segmenter_configs_from_the_earlier_weka_compat_are_refused():
    saved = WEKA.to_dict()
    assert ClassicalConfig.from_dict(saved) == WEKA
    old = {k: v for k, v in saved.items() if k != "weka_revision"}
    with pytest.raises(PosvitError, match="earlier --weka-compat"):
        ClassicalConfig.from_dict(old)
    assert "weka_revision" not in ClassicalConfig().to_dict()  # default models are written as before

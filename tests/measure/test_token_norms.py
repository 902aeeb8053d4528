"""Token-norm artefacts (core/measure/norms.py and `posvit probe`'s token_norms section): planted high-norm tokens
at known positions are found exactly, clean noise flags none, bands change nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import NORM_PLANTED as PLANTED, noise_grid, write_store



@pytest.fixture
def store_path(tmp_path):
    return write_store(tmp_path / "n.h5", [noise_grid(0, planted=PLANTED), noise_grid(1)], names=["art.png", "clean.png"])


def test_planted_tokens_exactly_flagged_and_clean_image_has_none(store_path):
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.measure.norms import store_token_norms

    with FeatureStore(store_path) as fs:
        res = store_token_norms(fs)
    art, clean = res["images"]
    assert art["n_outliers"] == 3 and art["share"] == 3 / 256
    assert sorted(map(tuple, art["positions"])) == sorted(PLANTED)
    assert art["max"] == pytest.approx(20.0, rel=1e-6) and art["outlier_median"] == pytest.approx(20.0, rel=1e-6)
    assert 0.8 < art["median"] < 1.2 and art["median"] < art["threshold"] < 20
    assert clean["n_outliers"] == 0 and clean["share"] == 0 and clean["positions"] == []
    assert res["images_with_outliers"] == 1 and res["mean_share"] == pytest.approx(3 / 512)
    # border distances min(r, c, 15-r, 15-c) of the planted tokens: 2, 7, 3 -> mean 4 against the uniform mean
    d = np.array([[min(r, c, 15 - r, 15 - c) for c in range(16)] for r in range(16)])
    assert art["border"]["mean_distance"] == pytest.approx(4.0)
    assert art["border"]["uniform_distance"] == pytest.approx(d.mean())
    assert res["border"]["ratio"] == pytest.approx(4.0 / d.mean())
    assert clean["border"]["ratio"] is None


def test_corner_outliers_have_border_ratio_zero_and_scale_does_not_matter(tmp_path):
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.measure.norms import store_token_norms

    corners = [(0, 0), (0, 15), (15, 0), (15, 15)]
    g = noise_grid(2, planted=corners, factor=8.0)
    p = write_store(tmp_path / "c.h5", [g, g * 1000.0])
    with FeatureStore(p) as fs:
        res = store_token_norms(fs)
    for im in res["images"]:
        assert sorted(map(tuple, im["positions"])) == corners
        assert im["border"]["ratio"] == 0 and im["border"]["on_border"] == 1.0
    assert res["images"][1]["threshold"] == pytest.approx(1000 * res["images"][0]["threshold"], rel=1e-5)


def test_banded_norms_equal_the_whole_grid(store_path):
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.measure.norms import image_norms, norm_map, store_token_norms

    with FeatureStore(store_path) as fs:
        whole = fs.features(0, "final", dtype=np.float32).astype(np.float64)
        one_row = norm_map(fs, 0, band_tokens=1)
        all_rows = norm_map(fs, 0, band_tokens=10**9)
        assert np.array_equal(one_row, all_rows)
        np.testing.assert_allclose(one_row, np.linalg.norm(whole, axis=-1), rtol=1e-13)
        assert image_norms(fs, 0, band_tokens=16).summary() == image_norms(fs, 0).summary()
        assert store_token_norms(fs, band_tokens=5) == store_token_norms(fs)


def test_constant_norm_features_flag_nothing_and_k_is_checked(tmp_path):
    from posvit_cli.core.errors import PosvitError
    from posvit_cli.core.measure.norms import outlier_mask

    g = noise_grid(3)
    unit = g / np.linalg.norm(g, axis=-1, keepdims=True)   # L2-normalised features: every norm 1 (± rounding)
    mask, threshold, spread = outlier_mask(np.linalg.norm(unit.astype(np.float64), axis=-1))
    assert not mask.any() and spread == 0.01 and threshold == pytest.approx(np.exp(0.06), rel=1e-6)
    with pytest.raises(PosvitError, match="positive"):
        outlier_mask(np.ones((2, 2)), 0)


def test_probe_json_has_token_norms_and_leaves_probe_numbers_alone(cli, store_path):
    args = ["probe", store_path, "--fraction", "0.5", "--repeats", "1", "--json"]
    res = cli(args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    tn = doc["token_norms"]
    assert tn["layer"] == "final" and tn["k"] == 6.0
    assert [im["share"] for im in tn["images"]] == [3 / 256, 0.0]
    assert sorted(map(tuple, tn["images"][0]["positions"])) == sorted(PLANTED)
    assert "token norms (final): high-norm outliers" in res.stderr and "in 1 of 2 images" in res.stderr
    off = cli([*args, "--no-token-norms", "-q"])
    assert off.exit_code == 0, off.output
    plain = json.loads(off.stdout)
    assert "token_norms" not in plain
    assert plain["results"] == doc["results"]
    strict = json.loads(cli([*args, "-q", "--norm-k", "1000"]).stdout)["token_norms"]
    assert strict["images_with_outliers"] == 0

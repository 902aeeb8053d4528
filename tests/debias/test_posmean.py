"""`posvit debias-train posmean` (per-position mean removal) and `blank --fill mean`, with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_store

from posvit_cli.core.debias.heads import PosMeanHead, apply_head_to_store, load_head
from posvit_cli.core.debias.posmean import resample_grid, store_means
from posvit_cli.core.features.store import FeatureStore


def _cli(*args):
    from typer.testing import CliRunner

    from posvit_cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    return r


def _centres(n: int) -> np.ndarray:
    """Token centres along an axis of n tokens, as fractions of the image."""
    return (np.arange(n) + 0.5) / n


def _field(h: int, w: int, C: int, linear: bool = False) -> np.ndarray:
    """A planted per-position field P(y, x), shape (h, w, C), a function of the token centres."""
    y, x = np.meshgrid(_centres(h), _centres(w), indexing="ij")
    k = np.arange(C)[None, None, :]
    if linear:
        return (2.0 * (k % 3 - 1) * y[..., None] + 1.5 * (k % 2 * 2 - 1) * x[..., None]).astype(np.float64)
    return 2.0 * np.sin(3 * y[..., None] + k) + 1.5 * np.cos(4 * x[..., None] - k) + 2 * y[..., None] * x[..., None]


def _antithetic_noise(rng, n: int, shape) -> list[np.ndarray]:
    """Content noise in pairs (z, −z): its dataset mean is exactly 0 at every position."""
    out = []
    for _ in range(n // 2):
        z = rng.normal(size=shape)
        out += [z, -z]
    return out


def test_posmean_recovers_a_planted_field_and_the_probe_falls_to_the_noise(tmp_path):
    h, w, C, n = 12, 14, 16, 16
    rng = np.random.default_rng(0)
    P = _field(h, w, C)
    noise = [0.3 * z for z in _antithetic_noise(rng, n, (h, w, C))]
    offset = rng.normal(size=C)  # a position-free global mean token: kept by the head
    planted = write_store(tmp_path / "planted.h5", [(z + P + offset).astype(np.float32) for z in noise])
    plain = write_store(tmp_path / "noise.h5", [(z + offset).astype(np.float32) for z in noise])
    r = _cli("debias-train", "posmean", planted, "-o", tmp_path / "pm.safetensors", "--report-images", 8, "--json",
             "-q")
    summary = json.loads(r.stdout)
    head = load_head(tmp_path / "pm.safetensors")
    assert isinstance(head, PosMeanHead) and head.method == "posmean" and list(head.field.shape) == [h, w, C]
    np.testing.assert_allclose(head.field, P - P.mean(axis=(0, 1)), atol=2e-5)
    # Cleaned tokens = the noise plus the global mean token (offset + mean of P over positions).
    with FeatureStore(planted) as s:
        clean = head.apply_numpy(s.features(0))
    np.testing.assert_allclose(clean, noise[0] + offset + P.mean(axis=(0, 1)), atol=5e-5)
    r2 = _cli("debias-train", "posmean", plain, "-o", tmp_path / "pm0.safetensors", "--report-images", 8, "--json",
              "-q")
    noise_summary = json.loads(r2.stdout)
    before, after = summary["report"]["before"]["xy"], summary["report"]["after"]["xy"]
    noise_r2 = noise_summary["report"]["before"]["xy"]
    assert before > 0.6 and after == pytest.approx(noise_r2, abs=1e-3) and noise_r2 < 0.2
    # No positional field and a mean of exactly zero noise: the field is 0 and the head changes nothing.
    assert np.abs(load_head(tmp_path / "pm0.safetensors").field).max() < 1e-5


def test_posmean_field_of_independent_noise_is_near_zero(tmp_path):
    rng = np.random.default_rng(1)
    n = 64
    store = write_store(tmp_path / "s.h5", [rng.normal(size=(6, 8, 4)).astype(np.float32) + 3 for _ in range(n)])
    with FeatureStore(store) as s:
        field = store_means(s, (6, 8))["field"]
    field = field - field.mean(axis=(0, 1))
    # Per position the mean of n unit-variance values: RMS about 1/sqrt(n) = 0.125 (no planted field: 0).
    assert np.sqrt(np.mean(field**2)) < 2 / np.sqrt(n)


def test_posmean_resamples_to_other_grids_at_the_token_centres(tmp_path):
    h, w, C = 12, 16, 6
    P = _field(h, w, C, linear=True)
    rng = np.random.default_rng(2)
    noise = _antithetic_noise(rng, 8, (h, w, C))
    src = write_store(tmp_path / "s.h5", [(z + P).astype(np.float32) for z in noise])
    _cli("debias-train", "posmean", src, "-o", tmp_path / "pm.safetensors", "--report-images", 0, "-q")
    head = load_head(tmp_path / "pm.safetensors")
    ref_mean = P.mean(axis=(0, 1))
    for H, W in [(6, 8), (4, 10), (12, 16)]:
        # A linear field sampled at the new grid's token centres (all inside the reference's outer centres).
        expected = _field(H, W, C, linear=True) - ref_mean
        np.testing.assert_allclose(head.field_on((H, W)), expected, atol=2e-5)
    # Row bands of a grid give the rows of the whole resampled field.
    whole = resample_grid(head.field, (7, 9))
    np.testing.assert_allclose(resample_grid(head.field, (7, 9), rows=(2, 5)), whole[2:5])
    # Applied to a store of another grid, in row bands of 2 rows: each image loses the field at its centres.
    H, W = 6, 8
    other = [(z + _field(H, W, C, linear=True)).astype(np.float32) for z in _antithetic_noise(rng, 4, (H, W, C))]
    small = write_store(tmp_path / "small.h5", other)
    with FeatureStore(small) as s:
        apply_head_to_store(head, s, tmp_path / "clean.h5", band_bytes=2 * W * C * 4)
    with FeatureStore(tmp_path / "clean.h5") as c:
        for i, g in enumerate(other):
            np.testing.assert_allclose(c.features(i), g - _field(H, W, C, linear=True) + ref_mean, atol=5e-5)


def test_store_means_in_row_bands_equal_the_whole_pass(tmp_path):
    rng = np.random.default_rng(3)
    grids = [rng.normal(size=(11, 7, 5)).astype(np.float32) for _ in range(3)] + \
            [rng.normal(size=(5, 9, 5)).astype(np.float32)]
    with FeatureStore(write_store(tmp_path / "s.h5", grids)) as s:
        whole = store_means(s, (11, 7))
        banded = store_means(s, (11, 7), band_bytes=2 * 9 * 5 * 4)
    np.testing.assert_allclose(banded["field"], whole["field"], atol=1e-12)
    expected = (sum(g[..., None].astype(np.float64).sum(axis=(0, 1, 3)) for g in grids)
                / sum(g.shape[0] * g.shape[1] for g in grids))
    np.testing.assert_allclose(banded["channel_mean"], expected, atol=1e-12)
    ref = sum(g.astype(np.float64) for g in grids[:3]) + resample_grid(grids[3].astype(np.float64), (11, 7))
    np.testing.assert_allclose(whole["field"], ref / 4, atol=1e-12)


def test_blank_fill_mean_sets_channels_to_their_dataset_mean(tmp_path):
    rng = np.random.default_rng(4)
    grids = [(rng.normal(size=(5, 6, 8)) + np.arange(8)).astype(np.float32) for _ in range(5)]
    store = write_store(tmp_path / "s.h5", grids)
    r = _cli("debias-train", "blank", store, "--blank", "5,2", "--fill", "mean", "-o", tmp_path / "b.safetensors",
             "--report-images", 0, "--json", "-q")
    assert json.loads(r.stdout)["fill"] == "mean"
    head = load_head(tmp_path / "b.safetensors")
    means = np.concatenate([g.reshape(-1, 8) for g in grids]).astype(np.float64).mean(axis=0)
    out = head.apply_numpy(grids[1])
    for c in (2, 5):
        assert np.all(out[..., c] == np.float32(means[c]))
    np.testing.assert_array_equal(np.delete(out, [2, 5], axis=-1), np.delete(grids[1], [2, 5], axis=-1))
    assert head.info["fill"] == "mean" and head.provenance()["fill"] == "mean"
    # The default stays zero.
    _cli("debias-train", "blank", store, "--blank", "5,2", "-o", tmp_path / "z.safetensors", "--report-images", 0,
         "-q")
    zero = load_head(tmp_path / "z.safetensors").apply_numpy(grids[1])
    assert np.all(zero[..., [2, 5]] == 0) and load_head(tmp_path / "z.safetensors").fill_values is None


def test_help_lists_posmean_and_the_fill_choices():
    assert "posmean" in _cli("debias-train", "--help").output
    assert "Write a posmean head" in _cli("debias-train", "posmean", "--help").output
    out = _cli("debias-train", "blank", "--help").output
    assert "--fill" in out and "zero|mean" in out and "default: zero" in out

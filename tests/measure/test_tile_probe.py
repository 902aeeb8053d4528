"""The tile-frame probe of stores extracted in tiles: known answers for ramps that restart in every tile (the
per-tile positional pattern of ``extract --tile``) against ramps across the whole image, and the CLI report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_store

PATCH = 16
# An 8 × 24 token grid made of three 8 × 8 tiles side by side, recorded as `extract --tile 128 --overlap 0` does.
TILES = {"tile": 128, "overlap": 0, "rows": [0], "cols": [0, 128, 256]}
TILING = {"tiling": {"tile": 128, "overlap": 0}, "patch_size": PATCH}


def _write_tiled_store(path, grids, tiles=TILES, layers=("final",)):
    """``write_store`` with each image's ``meta["tiles"]`` and the ``tiling`` provenance of ``extract --tile``."""
    return write_store(path, grids, layers=layers, provenance=TILING, meta={"tiles": tiles})


def _grid(rng, x, y, channels=16, noise=0.02):
    """Channel 0 = x/7, channel 1 = y/7, the others smooth functions of (x, y), plus a little noise."""
    h, w = x.shape
    f = np.empty((h, w, channels), np.float32)
    f[..., 0], f[..., 1] = x / 7.0, y / 7.0
    for c in range(2, channels):
        a, b, phi = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0, 2 * np.pi)
        f[..., c] = np.sin(a * x + b * y + phi)
    return f + noise * rng.standard_normal(f.shape).astype(np.float32)


def _sawtooth_grid(rng):
    """A ramp that restarts in every 8 × 8 tile: the features depend on the position within the tile only."""
    y, x = np.mgrid[0:8, 0:24].astype(np.float64)
    return _grid(rng, x % 8, y)


def _image_ramp_grid(rng):
    """A ramp across the whole 24-token width; every other channel is noise (no tile pattern)."""
    y, x = np.mgrid[0:8, 0:24].astype(np.float64)
    f = 0.3 * rng.standard_normal((8, 24, 16)).astype(np.float32)
    f[..., 0] = x / 23.0
    return f


def _probe(path):
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.measure.probe import make_settings, probe_store

    settings, _ = make_settings(targets=("lr", "ud", "xy", "random"), fraction=0.25, repeats=3, extras=False)
    with FeatureStore(str(path)) as fs:
        return probe_store(fs, settings)


def test_tile_frame_of_an_overlapping_layout_assigns_each_token_to_the_nearest_tile_centre():
    """The layout `extract img.png -m posvit-tiny --tile 64 --overlap 16` records for a 96 × 160 px image."""
    from posvit_cli.core.measure.probe.tiles import tile_frame

    tiles = {"tile": 64, "overlap": 16, "rows": [0, 32], "cols": [0, 48, 96]}
    frame = tile_frame((12, 20), tiles, 8)
    # column tiles start at tokens 0, 6, 12 (8 long, centres 4, 10, 16): tokens 7–12 belong to the second
    assert frame.col[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 7]
    # row tiles start at tokens 0 and 4 (centres 4 and 8): tokens 0–5 in the first, 6–11 in the second
    assert frame.row[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    assert frame.tiles == (2, 3) and int(frame.width.max()) == 8
    assert tile_frame((12, 20), {"tile": 64, "overlap": 16, "rows": [0], "cols": [0]}, 8) is None  # one tile
    assert tile_frame((12, 20), None, 8) is None


def test_a_ramp_restarting_in_every_tile_scores_in_the_tile_frame_and_is_periodic(tmp_path):
    rng = np.random.default_rng(0)
    doc = _probe(_write_tiled_store(tmp_path / "saw.h5", [_sawtooth_grid(rng) for _ in range(3)]))
    block = doc["results"]["final"]
    tile = block["tile_frame"]
    image_lr, tile_lr = block["stack_r2"]["lr"]["mean"], tile["stack_r2"]["lr"]["mean"]
    assert tile_lr > 0.9
    # a sawtooth explains about var(x mod 8) / var(x) ≈ 0.11 of the image-wide ramp
    assert image_lr < 0.4 and tile_lr - image_lr > 0.5
    assert tile["stack_r2"]["xy"]["mean"] > 0.9
    assert "random" not in tile["stack_r2"]  # controls are not refitted in the tile frame
    assert tile["images"] == [0, 1, 2]
    assert tile["periodicity"]["mean"] > 0.8
    assert doc["images"][0]["tiles"] == {**TILES, "patch": PATCH}


def test_a_ramp_across_the_whole_image_scores_in_the_image_frame_and_is_not_periodic(tmp_path):
    rng = np.random.default_rng(1)
    doc = _probe(_write_tiled_store(tmp_path / "ramp.h5", [_image_ramp_grid(rng) for _ in range(3)]))
    block = doc["results"]["final"]
    tile = block["tile_frame"]
    image_lr, tile_lr = block["stack_r2"]["lr"]["mean"], tile["stack_r2"]["lr"]["mean"]
    assert image_lr > 0.9
    assert tile_lr < 0.4 and image_lr - tile_lr > 0.5
    assert tile["periodicity"]["mean"] < 0.1


def test_periodicity_is_one_for_features_set_by_the_phase_and_about_zero_for_noise():
    from posvit_cli.core.measure.probe.tiles import phase_periodicity, tile_frame

    frame = tile_frame((8, 24), TILES, PATCH)
    rng = np.random.default_rng(2)
    phase_only = np.tile(rng.standard_normal((8, 8, 5)), (1, 3, 1))
    assert phase_periodicity(phase_only, frame)["periodicity"] == pytest.approx(1.0)
    noise = np.mean([phase_periodicity(rng.standard_normal((8, 24, 64)), frame)["periodicity"] for _ in range(5)])
    assert abs(noise) < 0.05
    # the raw η² of noise sits at its chance level (K − 1)/(N − 1) = 63/191, which the score subtracts
    raw = phase_periodicity(rng.standard_normal((8, 24, 64)), frame)
    assert raw["eta2_chance"] == pytest.approx(63 / 191) and abs(raw["eta2"] - 63 / 191) < 0.05


def test_untiled_stores_have_no_tile_frame_block(tmp_path):
    rng = np.random.default_rng(3)
    doc = _probe(write_store(tmp_path / "plain.h5", [_sawtooth_grid(rng) for _ in range(2)]))
    assert "tile_frame" not in doc["results"]["final"]
    assert "tiles" not in doc["images"][0]


def test_cli_table_and_json_show_both_frames(cli, tmp_path):
    rng = np.random.default_rng(4)
    store = _write_tiled_store(tmp_path / "saw.h5", [_sawtooth_grid(rng) for _ in range(2)])
    res = cli(["probe", store, "--targets", "lr,ud,random", "--fraction", "0.25", "--repeats", "2", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    block = doc["results"]["final"]
    assert block["stack_r2"]["lr"]["mean"] < 0.4 and block["tile_frame"]["stack_r2"]["lr"]["mean"] > 0.9
    assert block["tile_frame"]["periodicity"]["mean"] > 0.8
    assert "tile-frame R² (2 tiled)" in res.stderr and "tile periodicity" in res.stderr
    lr_row = next(line for line in res.stderr.splitlines() if line.strip("│ ").startswith("lr "))
    tile_lr = block["tile_frame"]["stack_r2"]["lr"]
    assert f"{tile_lr['mean']:.3f} ± {tile_lr['std']:.3f}" in lr_row

    plain = write_store(tmp_path / "plain.h5", [_sawtooth_grid(rng) for _ in range(2)])
    res = cli(["probe", plain, "--targets", "lr,ud", "--fraction", "0.25", "--repeats", "2"])
    assert res.exit_code == 0, res.output
    assert "tile-frame" not in res.stderr and "periodicity" not in res.stderr


def test_cli_layer_table_shows_tile_columns_for_every_layer(cli, tmp_path):
    rng = np.random.default_rng(5)
    store = _write_tiled_store(tmp_path / "saw2.h5", [_sawtooth_grid(rng) for _ in range(2)],
                               layers=("block0", "final"))
    res = cli(["probe", store, "--all-layers", "--targets", "lr,xy", "--fraction", "0.25", "--repeats", "2",
               "--no-extras", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert "tile-frame xy" in res.stderr and "tile periodicity" in res.stderr
    for ly in ("block0", "final"):
        tf = doc["results"][ly]["tile_frame"]
        assert tf["stack_r2"]["xy"]["mean"] > 0.9
        row = next(line for line in res.stderr.splitlines() if line.strip("│ ").startswith(ly + " "))
        assert f"{tf['stack_r2']['xy']['mean']:.2f}" in row and f"{tf['periodicity']['mean']:.2f}" in row

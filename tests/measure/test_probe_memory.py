"""The probe's memory is bounded on huge token grids: sums over all tokens run over chunks (same results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.measure.probe import (
    make_settings, probe_dataset, probe_image, probe_store, ramp_targets, sampling_plan, solver,
)

from conftest import write_store


def _ramped_grid(rng, h, w, C):
    f = rng.normal(size=(h, w, C)) * rng.uniform(0.5, 3, C) + 2.0
    ramps = ramp_targets(h, w, ("lr", "ud", "radial"))
    f[..., 1] = 3 * ramps["lr"] + 0.05 * rng.normal(size=(h, w))
    f[..., 4] += ramps["ud"] + 0.5 * ramps["radial"]
    f[..., 7] = -0.75                                                   # a constant channel
    return f


@pytest.mark.parametrize(
    "protocol, sampling, regressor, fraction",
    # the three per-channel paths: held-out complement (sparse), all tokens (sparse), outside the box (dense)
    [("holdout", "random", "ridge", 0.1), ("dino-saw", "random", "ridge", 0.1),
     ("holdout", "grid-holdout", "ridge", 0.1), ("holdout", "random", "ols", 0.4)],
)
def test_chunked_sums_equal_one_chunk(monkeypatch, protocol, sampling, regressor, fraction):
    """A 7-token chunk (so 29 chunks, the last one short) gives the scores of a single chunk to 1e-10."""
    rng = np.random.default_rng(11)
    h, w, C = 13, 15, 10
    f = _ramped_grid(rng, h, w, C).astype(np.float32)
    s, _ = make_settings(protocol, sampling=sampling, fraction=fraction, step=3, regressor=regressor, repeats=2)
    plan = sampling_plan((h, w), s, np.random.default_rng(2))
    monkeypatch.setattr(solver, "CHUNK_TOKENS", h * w)
    whole = probe_image(f, s, plan)
    monkeypatch.setattr(solver, "CHUNK_TOKENS", 7)
    chunked = probe_image(f, s, plan)
    assert whole.channel["lr"][:, 1].min() > 0.9                        # the planted ramp is found
    for t in s.targets:
        np.testing.assert_allclose(chunked.stack[t], whole.stack[t], rtol=0, atol=1e-10, err_msg=t)
        np.testing.assert_allclose(chunked.channel[t], whole.channel[t], rtol=0, atol=1e-10, err_msg=t)
    np.testing.assert_allclose(chunked.coordinate_rmse, whole.coordinate_rmse, rtol=0, atol=1e-10)
    np.testing.assert_allclose(chunked.coordinate_rmse_chance, whole.coordinate_rmse_chance, rtol=0, atol=1e-10)
    assert np.isnan(chunked.channel["lr"][:, 7]).sum() == 0             # constant channel: R² defined (≤ 0)


_PEAK_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from posvit_cli.core.measure.probe import make_settings, probe_dataset, ramp_targets

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
h, w, C = 400, 400, 64
rng = np.random.default_rng(0)
f = rng.standard_normal((h, w, C), dtype=np.float32)
f[..., 3] = ramp_targets(h, w, ("lr",))["lr"].astype(np.float32)
s, _ = make_settings("holdout")                      # the defaults: every target, per channel, extras
starts = list(range(0, 16 * h - 1024, 896)) + [16 * h - 1024]      # tiles of 1024 px, 128 px overlap
tiles = {"tile": 1024, "overlap": 128, "rows": starts, "cols": starts, "patch": 16}
images = [{"name": "big", "path": "big.png", "grid": (h, w), "tiles": tiles}]   # tile-frame fits too
with open("/proc/self/clear_refs", "w") as fh:       # reset the peak RSS to the current RSS
    fh.write("5")
before = status("VmRSS")
out = probe_dataset(lambda i, ly: f, images, ["final"], s)
peak = status("VmHWM")
r2 = out["layers"]["final"]["stack_r2"]["lr"]["mean"]
assert out["layers"]["final"]["tile_frame"]["images"] == [0]
print(json.dumps({"features": f.nbytes, "above": peak - before, "lr": r2}))
"""


def test_probe_peak_memory_on_a_large_grid_is_bounded():
    """A 400 × 400 × 64 grid (41 MB of float32) extracted in 7 × 7 tiles: the probe's peak RSS above its start
    (defaults, tile-frame fits and periodicity included) stays under 3× the features + 150 MB (it was about
    0.5 GB when every sum materialised float64 (N × C) and (fits × N) arrays)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = 3 * got["features"] + 150 * 2**20
    assert got["lr"] > 0.9
    assert got["above"] < bound, f"peak {got['above'] / 2**20:.0f} MiB above start, bound {bound / 2**20:.0f} MiB"


def test_float16_store_probes_as_its_float32_cast(tmp_path):
    """probe_store reads float16 features as stored (no float32 copy); the scores are bit-identical to probing
    the same values cast to float32, the classifier's included."""
    rng = np.random.default_rng(4)
    grids = [_ramped_grid(rng, 12, 14, 16).astype(np.float16) for _ in range(3)]
    path = write_store(tmp_path / "half.h5", grids, dtype="float16")
    s, _ = make_settings("holdout", fraction=0.2)
    with FeatureStore(path) as fs:
        assert fs.features(0, dtype=None).dtype == np.float16
        got = probe_store(fs, s)["results"]
    cast = [g.astype(np.float32) for g in grids]
    images = [{"name": f"img{i:03d}.png", "path": "", "grid": g.shape[:2]} for i, g in enumerate(cast)]
    want = probe_dataset(lambda i, ly: cast[i], images, ["final"], s)["layers"]
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert got["final"]["position_accuracy"]["images_scored"] == 3


def test_tile_periodicity_over_chunks_equals_one_chunk(monkeypatch):
    """The tile-phase ANOVA sums over 7-token chunks give the one-chunk scores (and a planted tile pattern)."""
    from posvit_cli.core.measure.probe.tiles import phase_periodicity, tile_frame

    rng = np.random.default_rng(8)
    h = w = 12
    frame = tile_frame((h, w), {"tile": 64, "overlap": 16, "rows": [0, 48, 128], "cols": [0, 48, 128]}, 16)
    f = rng.normal(size=(h, w, 6)).astype(np.float32)
    f[..., 2] += 4 * np.sin(frame.row + 2 * frame.col)                # set by the tile phase
    monkeypatch.setattr(solver, "CHUNK_TOKENS", h * w)
    whole = phase_periodicity(f, frame)
    monkeypatch.setattr(solver, "CHUNK_TOKENS", 7)
    chunked = phase_periodicity(f, frame)
    assert whole["eta2"] > whole["eta2_chance"]
    for key in ("periodicity", "eta2", "eta2_chance"):
        assert chunked[key] == pytest.approx(whole[key], abs=1e-12), key

"""Heads made from a store holding huge images stay in bounded memory: RASA caches a seeded sample of at most
``MAX_IMAGE_TOKENS`` tokens per image read in row bands, runs large steps in parts, and the before/after report
reads and cleans huge grids in bands. The caps are monkeypatched tiny here; below them nothing changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_store

from posvit_cli.core.debias import rasa, report, token_cache
from posvit_cli.core.debias.heads import ProjectionHead
from posvit_cli.core.debias.rasa import RasaConfig, TokenCache, grid_coordinates, load_token_cache, train_rasa
from posvit_cli.core.features.store import FeatureStore

H, W, D = 40, 50, 16


class _Spy:
    """Records the token rows of every read of a FeatureStore (whole grids as ``(0, h)``)."""

    def __init__(self, store, monkeypatch):
        self.reads = []
        features, rows = store.features, store.feature_rows

        def whole(index, layer=None, dtype=np.float32):
            self.reads.append((0, store.record(index).grid[0]))
            return features(index, layer, dtype)

        def band(index, layer, start, stop, dtype=np.float32):
            self.reads.append((start, stop))
            return rows(index, layer, start, stop, dtype)

        monkeypatch.setattr(store, "features", whole)
        monkeypatch.setattr(store, "feature_rows", band)


@pytest.fixture
def position_store(tmp_path):
    """One 40×50 grid whose tokens carry their own (row, col) in channels 0 and 1, as float16."""
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    f = np.random.default_rng(0).normal(size=(H, W, D)).astype(np.float32)
    f[..., 0], f[..., 1] = yy, xx
    return write_store(tmp_path / "pos.h5", [f], dtype="float16")


def test_a_huge_image_gives_a_seeded_sample_read_in_row_bands(position_store, monkeypatch):
    monkeypatch.setattr(token_cache, "MAX_IMAGE_TOKENS", 300)
    monkeypatch.setattr(token_cache, "READ_BAND_TOKENS", 100)  # bands of 2 rows of 50 tokens
    with FeatureStore(position_store) as s:
        spy = _Spy(s, monkeypatch)
        a = load_token_cache(s, seed=3)
        rows_read = [stop - start for start, stop in spy.reads if stop - start > 1]
        b = load_token_cache(s, seed=3)
        c = load_token_cache(s, seed=4)
        uncapped = load_token_cache(s, image_tokens=H * W)
    assert len(a) == 300 and a.sampled and a.offsets.tolist() == [0, 300] and a.grids == {"40x50": 1}
    assert rows_read and max(rows_read) == 2  # never the whole 40-row grid
    assert a.tokens.dtype == torch.float16  # as stored, no float32 copy of the cache
    t = a.tokens.float()
    assert torch.allclose(a.coords[:, 0] * (H - 1), t[:, 0]) and torch.allclose(a.coords[:, 1] * (W - 1), t[:, 1])
    assert len({(int(y), int(x)) for y, x in t[:, :2].tolist()}) == 300  # distinct tokens
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert len(uncapped) == H * W and not uncapped.sampled
    assert torch.equal(uncapped.coords, torch.from_numpy(grid_coordinates(H, W)))


def test_below_the_cap_the_cache_is_read_as_before(position_store):
    with FeatureStore(position_store) as s:
        cache = load_token_cache(s, max_tokens=500, seed=2)
        f = s.features(0).reshape(-1, D)
    idx = np.sort(np.random.default_rng(2).choice(H * W, size=500, replace=False))  # the documented draw
    assert len(cache) == 500 and cache.sampled
    assert torch.equal(cache.tokens, torch.from_numpy(f[idx]).half())
    assert torch.equal(cache.coords, torch.from_numpy(grid_coordinates(H, W)[idx]))


def test_rasa_fitted_on_a_sample_of_one_huge_image_finds_the_planted_planes(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(2, D))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    semantic = rng.normal(size=(H, W, D)).astype(np.float32)
    feats = semantic + ((grid_coordinates(H, W) - 0.5) @ (8.0 * A)).reshape(H, W, D).astype(np.float32)
    write_store(tmp_path / "huge.h5", [feats])
    monkeypatch.setattr(token_cache, "MAX_IMAGE_TOKENS", 400)
    monkeypatch.setattr(token_cache, "READ_BAND_TOKENS", 150)
    with FeatureStore(tmp_path / "huge.h5") as s:
        cache = load_token_cache(s)
    assert len(cache) == 400
    result = train_rasa(cache, RasaConfig(lr=5e-2, batch_images=1, rounds=4, epochs=60))
    basis = ProjectionHead(result.planes).basis().numpy()  # (D, 8) orthonormal
    residual = A - (A @ basis) @ basis.T
    assert np.linalg.norm(residual, axis=1).max() < 0.1  # both planted directions lie in the removed planes
    assert result.rounds[-1].probe_mse_after > 0.9 * result.rounds[-1].constant_mse


def test_a_step_in_parts_equals_the_step_whole(monkeypatch):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, 20, 30, 8)).astype(np.float32)
    z[..., 0] += np.linspace(0, 3, 30)[None, None, :]
    cache = TokenCache(torch.from_numpy(z.reshape(-1, 8)), torch.from_numpy(np.tile(grid_coordinates(20, 30), (3, 1))),
                       n_images=3)
    cfg = RasaConfig(lr=1e-2, batch_images=2, rounds=2, epochs=2)
    whole = train_rasa(cache, cfg)
    monkeypatch.setattr(rasa, "STEP_CHUNK_TOKENS", 97)  # a step of 900 or 1800 tokens runs in 10-19 parts
    parts = train_rasa(cache, cfg)
    assert np.allclose(whole.planes, parts.planes, atol=1e-5)
    assert all(abs(a.loss - b.loss) < 1e-6 for a, b in zip(whole.rounds, parts.rounds))


def test_the_report_reads_and_cleans_huge_grids_in_bands(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(H, W, D)).astype(np.float32)
    feats[..., :2] += 30 * grid_coordinates(H, W).reshape(H, W, 2)
    write_store(tmp_path / "s.h5", [feats])
    head = ProjectionHead(np.eye(D, dtype=np.float32)[:2][None])  # removes channels 0 and 1
    with FeatureStore(tmp_path / "s.h5") as s:
        whole = report.store_report(s, head, 4)
        monkeypatch.setattr(report, "REPORT_BAND_TOKENS", 120)  # bands of 2 rows
        spy = _Spy(s, monkeypatch)
        banded = report.store_report(s, head, 4)
    assert spy.reads and max(stop - start for start, stop in spy.reads) == 2
    assert whole["before"]["xy"] > 0.9 and whole["after"]["xy"] < 0.2  # the planted channels were removed
    for side in ("before", "after"):
        for target, r2 in whole[side].items():
            assert banded[side][target] == pytest.approx(r2, abs=1e-6)


def test_svd_size_auto_of_a_tiled_store_is_one_tile(tmp_path):
    tiles = {"tiles": {"tile": 256, "overlap": 32, "rows": [0, 224, 448, 672], "cols": [0, 224, 448, 672]}}
    g = np.zeros((58, 58, 4), np.float32)  # 928 px images at 16 px per token
    write_store(tmp_path / "tiled.h5", [g, g], meta=tiles)
    write_store(tmp_path / "plain.h5", [g, g])
    with FeatureStore(tmp_path / "tiled.h5") as tiled, FeatureStore(tmp_path / "plain.h5") as plain:
        assert report.encoder_input_size(tiled) == (256, 256)  # the encoder saw 256 px tiles, not 928 px images
        assert report.encoder_input_size(plain) == (928, 928) == report.most_common_size(plain)

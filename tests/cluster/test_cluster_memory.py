"""`posvit cluster` in bounded memory: huge grids are read in row bands, k-means is fitted on a capped sample
(``fit="sample"``; the exact streamed engine has its own tests in test_streamed_kmeans.py).

The caps are monkeypatched tiny so that a 20×24-token grid plays the huge image: k-means must see at most the
capped number of tokens, the image's whole grid must never be read at once, and a planted two-cluster grid must
still be split exactly, with the same labels whatever the band size.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_store

H, W, C = 20, 24, 6
#: The fit cap in tokens once FIT_MAX_VALUES is patched to FIT_TOKENS × the dimensions.
FIT_TOKENS = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(seed=0):
    """Left half of the grid near +4 on every channel, right half near −4: the planted labels (h, w)."""
    rng = np.random.default_rng(seed)
    half = (np.arange(W) >= W // 2).astype(np.int64)
    planted = np.broadcast_to(half, (H, W)).copy()
    grid = (np.where(planted[..., None] == 1, -4.0, 4.0) + rng.normal(scale=0.5, size=(H, W, C)))
    return grid.astype(np.float32), planted


def _same_partition(labels, planted) -> bool:
    labels = np.asarray(labels).reshape(planted.shape)
    return bool(np.array_equal(labels, planted) or np.array_equal(labels, 1 - planted))


@pytest.fixture
def caps(monkeypatch):
    """Tiny caps: a fit sample of FIT_TOKENS tokens, chunks of 100 tokens, bands of 2 rows; records k-means fit
    sizes and fails on any whole-grid read of an image larger than a chunk."""
    from posvit_cli.core.cluster import kmeans as km
    from posvit_cli.core.cluster import projection, sampled
    from posvit_cli.core.features.store import FeatureStore

    dims = {"value": C}
    monkeypatch.setattr(sampled, "FIT_MAX_VALUES", FIT_TOKENS * C)
    monkeypatch.setattr(sampled, "BAND_TOKENS", 2 * W)
    monkeypatch.setattr(projection, "_CHUNK_TOKENS", 100)
    fitted = []
    real_kmeans = km.kmeans

    def spy_kmeans(x, k, **kw):
        fitted.append(int(x.shape[0]))
        return real_kmeans(x, k, **kw)

    monkeypatch.setattr(km, "kmeans", spy_kmeans)
    real_features = FeatureStore.features

    def no_whole_grid(self, index, layer=None, dtype=np.float32):
        h, w = self.record(index).grid
        assert h * w <= 100, f"whole {h}x{w} grid read at once"
        return real_features(self, index, layer, dtype)

    monkeypatch.setattr(FeatureStore, "features", no_whole_grid)
    return {"fitted": fitted, "dims": dims, "sampled": sampled}


def test_sample_tokens_is_uniform_sorted_and_reproducible(monkeypatch):
    from posvit_cli.core.cluster import sampled

    monkeypatch.setattr(sampled, "_SAMPLE_BLOCK", 7)  # many blocks: the hypergeometric split is exercised
    a = sampled.sample_tokens(100, 30, seed=3)
    assert len(a) == 30 and len(np.unique(a)) == 30
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 100
    assert np.array_equal(a, sampled.sample_tokens(100, 30, seed=3))
    assert not np.array_equal(a, sampled.sample_tokens(100, 30, seed=4))
    assert np.array_equal(sampled.sample_tokens(10, 50, seed=0), np.arange(10))
    # Uniform: over many seeds every index is drawn about 30 % of the time.
    freq = np.bincount(np.concatenate([sampled.sample_tokens(100, 30, seed=s) for s in range(400)]), minlength=100)
    assert freq.min() > 0.2 * 400 and freq.max() < 0.4 * 400
    assert sampled.fit_sample_size(10, 4) is None
    assert sampled.fit_sample_size(sampled.FIT_MAX_VALUES, 4) == sampled.FIT_MAX_VALUES // 4
    assert sampled.fit_sample_size(10**9, 50, limit=512) == 512


def test_band_wise_assignment_equals_one_shot():
    import torch

    from posvit_cli.core.cluster.kmeans import assign_labels
    from posvit_cli.core.cluster.sampled import assign_streamed

    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.normal(size=(1000, 5)).astype(np.float32))
    centers = rng.normal(size=(7, 5)).astype(np.float32)
    whole, sq = assign_labels(x, centers)

    def bands(step):
        return lambda: ((s, x[s : s + step]) for s in range(0, 1000, step))

    for step in (1, 33, 1000):
        labels, inertia = assign_streamed(bands(step), centers, 1000)
        assert labels.dtype == np.int32
        assert np.array_equal(labels, whole)
        assert inertia == pytest.approx(float(sq.sum()), rel=1e-9)


def test_dataset_kmeans_of_a_huge_grid_fits_on_the_capped_sample_and_splits_the_planted_halves(tmp_path, caps,
                                                                                                  monkeypatch):
    from posvit_cli.core.cluster.overclustering import cluster_dataset
    from posvit_cli.core.features.store import FeatureStore

    grid, planted = _planted()
    store = write_store(tmp_path / "huge.h5", [grid, grid[:5, :6]], dtype="float16")
    with FeatureStore(store) as fs:
        out = cluster_dataset(fs, [2], pca_dim=0, n_init=2, max_iter=50, fit="sample")
        assert caps["fitted"] and max(caps["fitted"]) == FIT_TOKENS
        labels = out["maps"]["kmeans_k2"]
        assert _same_partition(labels[0], planted)
        assert _same_partition(labels[1], planted[:5, :6]) and labels[1][0, 0] == labels[0][0, 0]
        # The same labels and inertia whatever the band height.
        monkeypatch.setattr(caps["sampled"], "BAND_TOKENS", 10**6)
        again = cluster_dataset(fs, [2], pca_dim=0, n_init=2, max_iter=50, fit="sample")
    assert all(np.array_equal(a, b) for a, b in zip(labels, again["maps"]["kmeans_k2"]))
    assert again["results"][0]["inertia_per_seed"] == pytest.approx(out["results"][0]["inertia_per_seed"])


def test_per_image_kmeans_of_a_huge_grid_is_sampled_and_banded(tmp_path, caps):
    import torch

    from posvit_cli.core.cluster.overclustering import per_image_kmeans
    from posvit_cli.core.features.store import FeatureStore

    grid, planted = _planted(seed=2)
    store = write_store(tmp_path / "huge.h5", [grid])
    with FeatureStore(store) as fs:
        out = per_image_kmeans(fs, [2], n_init=3, max_iter=50, fit="sample")
    assert caps["fitted"] == [FIT_TOKENS]
    assert _same_partition(out["maps"]["kmeans_k2"][0], planted)
    # Inertia of all tokens of the standardised grid (population std), as the unsampled path reports it.
    x = torch.as_tensor(grid.reshape(-1, C))
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    lab = torch.as_tensor(out["maps"]["kmeans_k2"][0].ravel()).long()
    cent = torch.stack([z[lab == j].mean(0) for j in range(2)])
    expect = float(((z - cent[lab]) ** 2).sum())
    # Centres fitted on the sample sit a little off the full means: at least the optimum, not far above.
    assert expect <= out["results"][0]["inertia_mean"] <= 1.1 * expect


@pytest.mark.parametrize("protocol", ["standard", "in-training"])
def test_overclustering_of_a_huge_grid_against_masks_is_exact(tmp_path, caps, protocol):
    from PIL import Image

    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.cluster.overclustering import overcluster_eval
    from posvit_cli.core.features.store import FeatureStore

    grid, planted = _planted(seed=3)
    mdir = tmp_path / "masks"
    mdir.mkdir()
    Image.fromarray(planted.repeat(16, 0).repeat(16, 1).astype(np.uint8)).save(mdir / "img000.png")
    store = write_store(tmp_path / "huge.h5", [grid])
    with FeatureStore(store) as fs:
        masks = load_masks(fs, mdir, eval_size=(H, W), num_classes=2)
        out = overcluster_eval(fs, masks, [2], protocol=protocol, seeds=[0], n_init=2, pca_dim=3, keep_maps=True,
                               fit="sample")
    # The cap counts values: 3 PCA dimensions allow twice the tokens of the 6 channels.
    assert caps["fitted"] == [FIT_TOKENS * C // 3]
    assert out["results"][0]["miou_mean"] == pytest.approx(1.0)
    assert _same_partition(out["maps"]["kmeans_k2"][0], planted)


def test_banded_upsampling_matches_the_whole_grid_resize(tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F

    from posvit_cli.core.cluster import projection
    from posvit_cli.core.cluster.projection import FeatureProjection, projected_chunks
    from posvit_cli.core.features.store import FeatureStore

    grid, _ = _planted()
    store = write_store(tmp_path / "huge.h5", [grid])
    proj = FeatureProjection(np.zeros(C), np.ones(C), None, np.zeros(C), 1.0, H * W)
    ref = F.interpolate(torch.as_tensor(grid).permute(2, 0, 1)[None], size=(13, 37), mode="bilinear",
                        align_corners=False)[0].permute(1, 2, 0).reshape(-1, C)
    monkeypatch.setattr(projection, "_CHUNK_TOKENS", 100)
    for band in (W, 3 * W, 10**6):
        monkeypatch.setattr("posvit_cli.core.cluster.sampled.BAND_TOKENS", band)
        with FeatureStore(store) as fs:
            (ids, y), = list(projected_chunks(fs, "final", [0], proj, upsample_to=(13, 37)))
        assert ids == [0]
        assert torch.allclose(y, ref, atol=1e-5)


def test_mask_value_check_runs_in_row_bands_with_the_same_verdict(tmp_path, monkeypatch):
    from PIL import Image

    from posvit_cli.core.cluster import masks as masks_mod
    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.io.labels import LabelCheck

    # A 1-based mask (values 1 and 2, no 0) whose two values sit in different bands: the off-by-one warning
    # needs both, so it only fires if every band reaches the same check.
    mask = np.ones((64, 64), np.uint8)
    mask[40:] = 2
    mdir = tmp_path / "masks"
    mdir.mkdir()
    Image.fromarray(mask).save(mdir / "img000.png")
    store = write_store(tmp_path / "f.h5", [np.zeros((4, 4, 3), np.float32)])
    monkeypatch.setattr(masks_mod, "CHECK_BAND_ROWS", 8, raising=False)
    rows_seen = []
    real_add = LabelCheck.add

    def spy_add(self, image, source=None, ignored=None):
        rows_seen.append(np.asarray(getattr(image, "values", image)).shape[0])
        return real_add(self, image, source, ignored)

    monkeypatch.setattr(LabelCheck, "add", spy_add)
    with FeatureStore(store) as fs, pytest.warns(PosvitWarning, match="1-based"):
        out = masks_mod.load_masks(fs, mdir, eval_size=(8, 8))
    assert rows_seen == [8] * 8
    assert out.labels[0, :5].tolist() == [[1] * 8] * 5 and out.labels[0, 5:].tolist() == [[2] * 8] * 3

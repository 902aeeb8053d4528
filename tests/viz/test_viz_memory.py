"""Bounded memory in the viz figures: store grids are read in bands of token rows, never whole, and the numbers
equal those of the whole-grid computation."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_store
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.viz import maps

pytestmark = pytest.mark.filterwarnings("ignore:source image not found")


def planted_grids(seed=0, shapes=((9, 11), (7, 11)), C=6):
    rng = np.random.default_rng(seed)
    grids = []
    for h, w in shapes:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        g = rng.normal(size=(h, w, C)).astype(np.float32)
        g[..., 2] += 3 * xx / w  # a planted ramp
        g[..., 4] += 2 * yy / h
        grids.append(g)
    return grids


@pytest.fixture
def banded_store(tmp_path, monkeypatch):
    """A two-image store whose whole-grid reads fail and whose band reads are logged; bands are one token row."""
    grids = planted_grids()
    path = write_store(tmp_path / "s.h5", grids)
    bands = []
    real_rows = FeatureStore.feature_rows

    def whole(self, *a, **k):
        raise AssertionError("a figure read a whole token grid")

    def rows(self, index, layer, start, stop, dtype=np.float32):
        bands.append(stop - start)
        return real_rows(self, index, layer, start, stop, dtype)

    monkeypatch.setattr(FeatureStore, "features", whole)
    monkeypatch.setattr(FeatureStore, "feature_rows", rows)
    monkeypatch.setattr(maps, "CHUNK_TOKENS", 11)  # one token row (11 tokens) per band
    store = FeatureStore(path)
    yield store, grids, bands
    store.close()


def test_cosine_similarity_in_bands_equals_the_whole_grid_formula(monkeypatch):
    g = planted_grids()[0]
    X = g.reshape(-1, 6).astype(np.float64)
    q = X[3 * 11 + 5]
    want = (X @ q / (np.linalg.norm(X, axis=1) * np.linalg.norm(q) + 1e-8)).reshape(9, 11)
    want[3, 5] = 1.0
    monkeypatch.setattr(maps, "CHUNK_TOKENS", 7)  # fewer tokens than a row: bands of one row each
    np.testing.assert_allclose(maps.cosine_similarity_map(g, 3, 5), want, rtol=0, atol=1e-12)
    assert maps.cosine_similarity_map(g, 3, 5)[3, 5] == 1.0


def test_grid_channels_reads_bands_and_keeps_only_the_channels(monkeypatch):
    g = planted_grids()[0]
    monkeypatch.setattr(maps, "CHUNK_TOKENS", 22)  # two rows per band, the last band one row
    got = maps.grid_channels(g, [4, 2])
    assert got.shape == (9, 11, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(got, g[..., [4, 2]])


def test_pca_figure_reads_bands_and_matches_the_whole_grid_pca(banded_store, tmp_path):
    from posvit_cli.core.viz.pca_figure import pca_figure

    store, grids, bands = banded_store
    entry = pca_figure(store, tmp_path / "out", indices=[0, 1], variants=("raw", "std"), foreground=True)[0]
    assert bands and max(bands) == 1  # only one-row bands were read, never a whole grid
    for j, g in enumerate(grids):
        for v, name in (("raw", "raw"), ("std", "standardised")):
            fg = maps.foreground_mask(g, standardise=v == "std")
            want = maps.fit_pca([g], 3, standardise=v == "std", masks=[fg]).explained
            np.testing.assert_allclose(entry.numbers["images"][j]["explained"][name], want, rtol=1e-9, atol=1e-12)
            assert entry.numbers["images"][j]["foreground_fraction"][name] == pytest.approx(float(fg.mean()), abs=0)


def test_similarity_figure_reads_bands_and_matches_the_whole_grid_map(banded_store, tmp_path):
    from posvit_cli.core.viz.similarity import similarity_figure

    store, grids, bands = banded_store
    entry = similarity_figure(store, tmp_path / "out", [(5, 3)], units="token", indices=[0, 1])[0]
    assert bands and max(bands) == 1
    for j, g in enumerate(grids):
        sim = maps.cosine_similarity_map(g, 3, 5)
        q = entry.numbers["images"][j]["queries"][0]
        assert q["token"] == {"x": 5, "y": 3}
        assert q["mean_similarity"] == pytest.approx(float(sim.mean()), abs=1e-12)
        assert q["similarity_distance_corr"] == pytest.approx(maps.similarity_distance_correlation(sim, 3, 5),
                                                              abs=1e-12)


def test_channels_figure_reads_bands_and_scales_by_the_whole_grids(banded_store, tmp_path):
    from posvit_cli.core.viz.channels import channels_figure
    from posvit_cli.core.viz.scores import ChannelScores

    store, grids, bands = banded_store
    r2 = {"lr": np.linspace(0, 1, 6), "ud": np.linspace(1, 0, 6)}
    scores = ChannelScores(r2, [2, 4], {"lr": [2], "ud": [4]}, {"lr": 0.5}, "test")
    entry = channels_figure(store, tmp_path / "out", scores, indices=[0, 1])[0]
    assert bands and max(bands) == 1
    for k, c in enumerate([2, 4]):
        allv = np.concatenate([g[..., c].ravel() for g in grids])
        assert entry.numbers["channels"][k]["scale"] == pytest.approx(list(np.percentile(allv, [1, 99])), abs=1e-12)


def test_compare_figure_reads_bands_and_matches_the_whole_grid_numbers(banded_store, tmp_path):
    from posvit_cli.core.viz.compare import compare_figure

    store, grids, bands = banded_store
    entry = compare_figure([store], tmp_path / "out", max_images=2, points=[(5, 3)], units="token")[0]
    assert bands and max(bands) == 1
    for j, g in enumerate(grids):
        model = entry.numbers["images"][j]["models"][0]
        np.testing.assert_allclose(model["explained"], maps.fit_pca([g], 3).explained, rtol=1e-9, atol=1e-12)
        sim = maps.cosine_similarity_map(g, 3, 5)
        assert model["queries"][0]["similarity_distance_corr"] == pytest.approx(
            maps.similarity_distance_correlation(sim, 3, 5), abs=1e-12)


def test_the_score_probes_a_float16_store_as_stored(tmp_path, monkeypatch):
    """The on-the-spot probe gets float16 grids (half the memory of a float32 copy) and scores as before."""
    import posvit_cli.core.measure.probe as probe
    from posvit_cli.core.viz import scores

    grids = planted_grids(shapes=((12, 12), (12, 12)))
    path = write_store(tmp_path / "h.h5", grids, dtype="float16")
    seen = []
    real = probe.probe_dataset

    def spy(read, *a, **k):
        def logged(j, ly):
            f = read(j, ly)
            seen.append(f.dtype)
            return f
        return real(logged, *a, **k)

    monkeypatch.setattr(probe, "probe_dataset", spy)
    with FeatureStore(path) as store:
        got = scores.score_store(store, [0, 1], "final")
        assert seen and set(seen) == {np.dtype(np.float16)}
        seen.clear()
        monkeypatch.setattr(scores, "_features_as_stored", lambda s, i, ly: s.features(i, ly))  # the float32 way
        want = scores.score_store(store, [0, 1], "final")
    assert got.mean == pytest.approx(want.mean, abs=1e-9)
    assert got.per_image == pytest.approx(want.per_image, abs=1e-9)


def whole_image_display(path, fp, out_hw, intensity):
    """The display image by the whole-image recipe: float32 [0, 1] of every pixel, RGB, crop, uint8, resize."""
    from PIL import Image

    from posvit_cli.core.io.images import read_image, to_channels, to_float

    img = to_float(read_image(path), intensity)
    if img.ndim == 3 and img.shape[-1] not in (1, 3):
        img = img[..., :1] if img.shape[-1] == 2 else img[..., :3]
    img = to_channels(img, 3)[int(fp.top): int(fp.bottom), int(fp.left): int(fp.right)]
    pil = Image.fromarray(np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8))
    return np.asarray(pil.resize((out_hw[1], out_hw[0]), Image.Resampling.LANCZOS))


@pytest.mark.parametrize("mode,intensity", [("I;16", "auto"), ("I;16", "percentile:2,98"), ("L", "auto"),
                                            ("RGB", "auto"), ("RGBA", "minmax"), ("LA", "auto"), ("F", "dtype")])
def test_the_source_image_is_brought_to_display_in_bands_as_a_whole(tmp_path, monkeypatch, mode, intensity):
    from PIL import Image

    from posvit_cli.core.viz import geometry

    rng = np.random.default_rng(1)
    H, W = 45, 60
    yy, xx = np.mgrid[0:H, 0:W]
    if mode == "I;16":
        im = Image.fromarray((300 + 40 * xx + 7 * yy + rng.integers(0, 50, (H, W))).astype(np.uint16))
    elif mode == "F":
        im = Image.fromarray((xx / W + rng.normal(0, 0.2, (H, W))).astype(np.float32))
    else:
        n = len(mode)
        arr = rng.integers(0, 256, (H, W, n)).astype(np.uint8)
        arr[..., 0] = (xx * 4).astype(np.uint8)
        im = Image.fromarray(arr[..., 0] if n == 1 else arr, mode)
    path = tmp_path / ("im.tif" if mode == "F" else "im.png")
    im.save(path)
    fp = geometry.Footprint(5.0, 8.0, 37.0, 56.0, (2, 3), (H, W))  # a crop
    want = whole_image_display(path, fp, (20, 30), intensity)
    monkeypatch.setattr(geometry, "DISPLAY_BAND_PIXELS", 50)  # one row per band
    got = geometry.load_display_image(path, fp, (20, 30), intensity)
    assert got.shape == (20, 30, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_a_big_16_bit_source_image_costs_a_few_bytes_per_pixel_for_display(tmp_path, monkeypatch):
    """No float32 RGB copy of the source image (12 bytes a pixel, and more for temporaries): the decoded 16-bit
    pixels and one uint8 copy. (The whole-image recipe allocates about 38 bytes a pixel.)"""
    import tracemalloc

    from PIL import Image

    from posvit_cli.core.viz import geometry

    H = W = 1200
    yy, xx = np.mgrid[0:H, 0:W]
    Image.fromarray((xx * 30 + yy).astype(np.uint16)).save(tmp_path / "big.png")
    fp = geometry.Footprint(0.0, 0.0, float(H), float(W), (75, 75), (H, W))
    monkeypatch.setattr(geometry, "DISPLAY_BAND_PIXELS", 1 << 16)
    tracemalloc.start()
    try:
        out = geometry.load_display_image(tmp_path / "big.png", fp, (64, 64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (64, 64, 3)
    assert peak < 8 * H * W, f"{peak / (H * W):.1f} bytes a pixel"

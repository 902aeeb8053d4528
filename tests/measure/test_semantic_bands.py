"""The semantic probe (used by `posvit report`) reads grids above ``BAND_TOKENS`` tokens in row bands, never
whole, and gets exactly the samples and confusion matrix of a whole read. The cap is monkeypatched tiny here."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from conftest import write_store

from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.measure.semantic import AffineHead, MaskSource, gather_samples, scan_masks, score_store
from posvit_cli.core.measure.semantic import dataset as semantic_dataset

GRID, K, C = (10, 12), 3, 6


@pytest.fixture
def labelled_store(tmp_path):
    """Two 10×12 float16 grids whose channel c is 4·[class == c] + noise; masks at 16 px per token."""
    rng = np.random.default_rng(0)
    feats = []
    (tmp_path / "m").mkdir()
    for i in range(2):
        lab = rng.integers(0, K, size=GRID)
        lab[0, :2] = 255  # ignored
        f = 4.0 * np.eye(C)[np.minimum(lab, C - 1)] * (lab != 255)[..., None] + rng.normal(size=(*GRID, C))
        feats.append(f.astype(np.float32))
        Image.fromarray(np.kron(lab, np.ones((16, 16), int)).astype(np.uint8)).save(tmp_path / "m" / f"img{i:03d}.png")
    return write_store(tmp_path / "s.h5", feats, dtype="float16"), tmp_path / "m"


def _run(store_path, masks, resolution):
    head = AffineHead(np.eye(C, K, dtype=np.float32), np.zeros(K, np.float32))
    with FeatureStore(store_path) as st:
        reads = []
        whole, rows = st.features, st.feature_rows
        st.features = lambda i, layer=None, dtype=np.float32: (reads.append(GRID[0]), whole(i, layer, dtype))[1]
        st.feature_rows = lambda i, layer, a, b, dtype=np.float32: (reads.append(b - a), rows(i, layer, a, b, dtype))[1]
        src = MaskSource(st, masks)
        scan = scan_masks(src, [0, 1], ignore_index=255)
        X, y, _ = gather_samples(st, "final", src, scan, [0, 1], ignore_index=255, resolution=resolution,
                                 max_samples=150, pixels_per_token=2, seed=0)
        conf = score_store(head, st, "final", src, [0, 1], num_classes=K, ignore_index=255, resolution=resolution)
    return X, y, conf, reads


@pytest.mark.parametrize("resolution", ["tokens", "pixels"])
def test_huge_grids_are_read_in_row_bands_with_the_same_results(labelled_store, monkeypatch, resolution):
    store_path, masks = labelled_store
    X0, y0, conf0, reads0 = _run(store_path, masks, resolution)
    monkeypatch.setattr(semantic_dataset, "BAND_TOKENS", 36)  # bands of 3 rows of 12 tokens
    X1, y1, conf1, reads1 = _run(store_path, masks, resolution)
    assert max(reads0) == GRID[0]  # below the cap: whole grids, as before
    if resolution == "tokens":
        assert max(reads1) <= 3  # above it: never the whole grid
    np.testing.assert_array_equal(X0, X1)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(conf0, conf1)
    assert conf0.sum() == 2 * (GRID[0] * GRID[1] - 2) * (1 if resolution == "tokens" else 256)
    # The planted classes are read off the right channels (pixels blur at class borders).
    assert np.trace(conf0) / conf0.sum() > (0.95 if resolution == "tokens" else 0.8)

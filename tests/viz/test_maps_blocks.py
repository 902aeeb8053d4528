"""The PCA colourings read a huge grid in bounded float64 blocks, with the same result as in one piece."""

from __future__ import annotations

import numpy as np
import pytest

from posvit_cli.core.viz import maps


@pytest.mark.parametrize("standardise", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_blocks_give_the_whole_array_result(monkeypatch, standardise, masked):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:9, 0:11].astype(np.float32)
    grids = [rng.normal(size=(9, 11, 6)).astype(np.float32) for _ in range(2)]
    grids[0][..., 2] += 3 * xx / 10  # a planted ramp the first component follows
    mask = (xx > 2) if masked else None
    masks = [mask, mask]
    whole = maps.fit_pca(grids, 3, standardise=standardise, masks=masks)
    rgb_whole = whole.to_rgb(grids[0], mask)
    monkeypatch.setattr(maps, "CHUNK_TOKENS", 7)  # 99 tokens in 15 blocks, the last one short
    blocks = maps.fit_pca(grids, 3, standardise=standardise, masks=masks)
    for name in ("mean", "components", "explained", "low", "high"):
        np.testing.assert_allclose(getattr(blocks, name), getattr(whole, name), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(blocks.to_rgb(grids[0], mask), rgb_whole, atol=1e-10)
    # and the blocks agree with a plain whole-array computation of the same recipe
    X = np.concatenate([g.reshape(-1, 6)[None if mask is None else mask.ravel()].reshape(-1, 6).astype(np.float64)
                        if not standardise else
                        ((g.reshape(-1, 6).astype(np.float64)
                          - g.reshape(-1, 6)[mask.ravel() if masked else slice(None)].mean(0))
                         / g.reshape(-1, 6)[mask.ravel() if masked else slice(None)].std(0))[
                            mask.ravel() if masked else slice(None)]
                        for g in grids])
    evals = np.linalg.eigvalsh(np.cov(X.T, bias=True))[::-1][:3]
    # (fit_pca forms the covariance as E[xxᵀ] − μμᵀ, np.cov by deviations: equal to rounding)
    np.testing.assert_allclose(blocks.explained, evals / np.trace(np.cov(X.T, bias=True)), rtol=1e-6)


def test_a_non_finite_token_in_a_late_block_is_refused(monkeypatch):
    g = np.zeros((5, 5, 3), np.float32)
    g[4, 4, 1] = np.nan
    monkeypatch.setattr(maps, "CHUNK_TOKENS", 4)
    with pytest.raises(Exception, match="NaN or inf"):
        maps.fit_pca([g], 3)

"""The bounded (Yinyang) Lloyd engine gives exactly the labels of a plain Lloyd from the same initial centres.

Pins the equivalence kept by the speed work on ``core/cluster/kmeans.py`` (issue 19 §5): the bounds, the
candidate spans read in place and the per-group GEMMs only skip work; every iteration's labels, hence the final
labels, centres and inertia, are those of a straightforward float64 Lloyd on planted data.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _planted(seed: int, n: int = 12_000, d: int = 8, blobs: int = 60):
    """Overlapping Gaussian blobs: many points sit near cluster borders, so the bounds fail for a good share."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(blobs, d)) * 3.0
    return (centres[rng.integers(0, blobs, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _reference_lloyd(x, c0, iters: int):
    """Plain Lloyd: all n × k distances in float64, argmin, mean of each cluster (no cluster goes empty here)."""
    x64 = x.astype(np.float64)
    c = c0.astype(np.float64)
    labels = None
    for _ in range(iters):
        d2 = (x64 * x64).sum(1)[:, None] - 2 * x64 @ c.T + (c * c).sum(1)[None, :]
        new = d2.argmin(1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        counts = np.bincount(labels, minlength=c.shape[0])
        assert counts.min() > 0
        c = np.stack([x64[labels == j].mean(0) for j in range(c.shape[0])])
    d2 = (x64 * x64).sum(1)[:, None] - 2 * x64 @ c.T + (c * c).sum(1)[None, :]
    labels = d2.argmin(1)
    return labels, float(((x64 - c[labels]) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounded_engine_equals_plain_lloyd_on_planted_data(seed):
    from posvit_cli.core.cluster.kmeans import kmeans

    x = _planted(seed)
    rng = np.random.default_rng(100 + seed)
    c0 = x[rng.choice(x.shape[0], 40, replace=False)]
    res = kmeans(x, 40, init=c0, max_iter=25, algorithm="bounded", chunk_bytes=1 << 16)
    assert res.algorithm == "yinyang"  # k = 40: four groups of centres, so the group bounds are in play
    ref_labels, ref_inertia = _reference_lloyd(x, c0, 25)
    assert np.array_equal(res.labels, ref_labels)
    assert res.inertia == pytest.approx(ref_inertia, rel=1e-6)


def test_bounded_engine_is_deterministic_for_a_seed():
    from posvit_cli.core.cluster.kmeans import kmeans

    x = _planted(3)
    a = kmeans(x, 40, seed=5, max_iter=20, algorithm="bounded")
    b = kmeans(x, 40, seed=5, max_iter=20, algorithm="bounded")
    assert np.array_equal(a.labels, b.labels) and a.inertia == b.inertia

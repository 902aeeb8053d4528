"""The streamed exact k-means engine: Lloyd passes over a token source, chunk by chunk.

Known answers: on data that fit, the in-memory engine's result for the same seed (labels equal, centres to
float32 rounding, the same iteration count); the same result for any chunk size; planted separated clusters
recovered exactly; and, with the memory cap patched tiny, `cluster` streams a store and still returns the
in-memory clustering.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _blobs(n=6000, k=6, d=5, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


def _source(x, step):
    import torch

    xt = torch.as_tensor(x)
    return lambda: ((s, xt[s : s + step]) for s in range(0, xt.shape[0], step))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_equals_the_in_memory_engine_for_the_same_seed(seed):
    from posvit_cli.core.cluster.kmeans import kmeans
    from posvit_cli.core.cluster.streamed import kmeans_stream

    # Overlapping blobs (spread 1.5): dozens of Lloyd iterations, so a wrong step or count would show.
    x, _ = _blobs(spread=1.5, seed=seed)
    # init_sample below n: the seeding draws a subsample, which the streamed engine must draw identically.
    ref = kmeans(x, 6, n_init=2, seed=seed, init_sample=2000, algorithm="bounded")
    got = kmeans_stream(_source(x, 777), len(x), x.shape[1], 6, n_init=2, seed=seed, init_sample=2000)
    assert ref.n_iter > 3
    assert got.labels.dtype == np.int32
    assert np.array_equal(got.labels, ref.labels)
    np.testing.assert_allclose(got.centers, ref.centers, rtol=0, atol=1e-5)
    assert got.n_iter == ref.n_iter and got.converged == ref.converged
    assert got.best_restart == ref.best_restart
    assert got.inertia == pytest.approx(ref.inertia, rel=1e-6)
    assert got.inertias == pytest.approx(ref.inertias, rel=1e-6)


def test_tolerance_and_iteration_cap_stop_where_the_in_memory_engine_stops():
    from posvit_cli.core.cluster.kmeans import kmeans
    from posvit_cli.core.cluster.streamed import kmeans_stream

    x, _ = _blobs(spread=1.5, seed=4)
    for opts in ({"tol": 1e-3}, {"max_iter": 3}):
        ref = kmeans(x, 6, seed=4, algorithm="bounded", **opts)
        got = kmeans_stream(_source(x, 1000), len(x), x.shape[1], 6, seed=4, **opts)
        assert got.n_iter == ref.n_iter and got.converged == ref.converged, opts
        assert np.array_equal(got.labels, ref.labels), opts
        np.testing.assert_allclose(got.centers, ref.centers, rtol=0, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    from posvit_cli.core.cluster.streamed import kmeans_stream

    x, _ = _blobs(n=1500, spread=1.5, seed=5)
    runs = [kmeans_stream(_source(x, step), len(x), x.shape[1], 6, seed=3, n_init=2) for step in (7, 97, len(x))]
    assert runs[0].n_iter > 3
    for other in runs[1:]:
        assert np.array_equal(other.labels, runs[0].labels)
        np.testing.assert_allclose(other.centers, runs[0].centers, rtol=0, atol=1e-5)
        assert other.n_iter == runs[0].n_iter
        assert other.inertia == pytest.approx(runs[0].inertia, rel=1e-6)


def test_planted_separated_clusters_are_recovered_exactly():
    from posvit_cli.core.cluster.streamed import kmeans_stream

    x, truth = _blobs(n=3000, k=5, spread=30.0, seed=7)
    res = kmeans_stream(_source(x, 256), len(x), x.shape[1], 5, seed=0, n_init=3)
    # A bijection between found and planted clusters, and each centre at its blob's mean.
    pairs = set(zip(res.labels.tolist(), truth.tolist()))
    assert len(pairs) == 5 and len({a for a, _ in pairs}) == 5
    for found, planted in pairs:
        np.testing.assert_allclose(res.centers[found], x[truth == planted].mean(0), atol=1e-4)
    assert res.converged


def test_an_empty_cluster_takes_the_farthest_token_as_in_memory():
    from posvit_cli.core.cluster.kmeans import kmeans
    from posvit_cli.core.cluster.streamed import kmeans_stream

    x = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)  # 3 distinct points, 5 copies each
    # Two centres on the same point: the second is empty after the first pass and must move to a far token.
    ref = kmeans(x, 3, init=x[[0, 0, 5]], algorithm="bounded")
    got = kmeans_stream(_source(x, 4), len(x), 3, 3, init=x[[0, 0, 5]])
    assert got.inertia == pytest.approx(0.0, abs=1e-9)
    assert np.array_equal(got.labels, ref.labels) and len(np.unique(got.labels)) == 3


def test_bad_arguments_are_refused():
    from posvit_cli.core.cluster.streamed import kmeans_stream
    from posvit_cli.core.errors import PosvitError

    x, _ = _blobs(n=20)
    with pytest.raises(PosvitError, match="k must be between 1 and 20"):
        kmeans_stream(_source(x, 8), 20, 5, 21)
    with pytest.raises(PosvitError, match="shape"):
        kmeans_stream(_source(x, 8), 20, 5, 2, init=np.zeros((3, 5)))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(PosvitError, match="NaN"):
        kmeans_stream(_source(bad, 8), 20, 5, 2)


# --------------------------------------------------------------------------------------------------------------
# `cluster` beyond the memory cap

FIT_TOKENS = 60
CHUNK = 100


@pytest.fixture
def tiny_cap(monkeypatch):
    """A fit cap of FIT_TOKENS tokens and chunks of CHUNK tokens; records the largest chunk the streamed engine
    is handed and fails if k-means is ever fitted in memory."""
    from posvit_cli.core.cluster import kmeans as km
    from posvit_cli.core.cluster import overclustering, projection, sampled, streamed

    seen = {"largest_chunk": 0, "passes": 0}
    real_stream = streamed.kmeans_stream

    def spy_stream(source, *a, **kw):
        def watched():
            seen["passes"] += 1
            for start, x in source():
                seen["largest_chunk"] = max(seen["largest_chunk"], int(x.shape[0]))
                yield start, x

        return real_stream(watched, *a, **kw)

    def no_in_memory_fit(*a, **kw):
        raise AssertionError("k-means fitted in memory beyond the cap")

    def patch():
        monkeypatch.setattr(sampled, "FIT_MAX_VALUES", FIT_TOKENS * 4)
        monkeypatch.setattr(sampled, "BAND_TOKENS", 40)
        monkeypatch.setattr(projection, "_CHUNK_TOKENS", CHUNK)
        monkeypatch.setattr(overclustering, "kmeans_stream", spy_stream)
        monkeypatch.setattr(km, "kmeans", no_in_memory_fit)

    return seen, patch


def _store(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 1.5
    grids = [(centres[rng.integers(0, 4, (h, w))] + rng.normal(size=(h, w, 6))).astype(np.float32)
             for h, w in [(9, 11), (12, 10), (20, 24), (7, 7)]]
    return write_store(tmp_path / "tokens.h5", grids)


def test_dataset_clustering_beyond_the_cap_streams_and_equals_the_in_memory_clustering(tmp_path, tiny_cap):
    from posvit_cli.core.cluster.overclustering import cluster_dataset
    from posvit_cli.core.features.store import FeatureStore

    seen, patch = tiny_cap
    store = _store(tmp_path)
    with FeatureStore(store) as fs:
        # In memory first (the real cap: all 857 tokens fit), then streamed under the tiny cap.
        ref = cluster_dataset(fs, [4], seeds=[0, 1], pca_dim=4, n_init=2, max_iter=100)
        patch()
        got = cluster_dataset(fs, [4], seeds=[0, 1], pca_dim=4, n_init=2, max_iter=100)
    assert got["settings"]["fit_beyond_cap"] == "stream"
    # Bounded memory: no chunk above CHUNK tokens (the 20×24 image comes in 40-token bands), many passes.
    assert 0 < seen["largest_chunk"] <= CHUNK and seen["passes"] > 10
    for a, b in zip(ref["maps"]["kmeans_k4"], got["maps"]["kmeans_k4"]):
        assert np.array_equal(a, b)
    assert got["results"][0]["inertia_per_seed"] == pytest.approx(ref["results"][0]["inertia_per_seed"], rel=1e-5)


def test_per_image_clustering_of_a_huge_grid_streams_and_equals_the_in_memory_one(tmp_path, tiny_cap):
    from posvit_cli.core.cluster.overclustering import per_image_kmeans
    from posvit_cli.core.features.store import FeatureStore

    seen, patch = tiny_cap
    store = _store(tmp_path)
    with FeatureStore(store) as fs:
        ref = per_image_kmeans(fs, [3], n_init=2, max_iter=100)
        patch()
        # Every image is above the 40-token cap (6 channels): all stream, none is fitted in memory.
        got = per_image_kmeans(fs, [3], n_init=2, max_iter=100)
    assert seen["passes"] > 5 and seen["largest_chunk"] <= 40
    for a, b in zip(ref["maps"]["kmeans_k3"], got["maps"]["kmeans_k3"]):
        assert np.array_equal(a, b)
    assert got["results"][0]["inertia_mean"] == pytest.approx(ref["results"][0]["inertia_mean"], rel=1e-5)


def test_cli_fit_option_is_recorded_and_checked(tmp_path, cli):
    import json

    store = _store(tmp_path)
    r = cli(["cluster", store, "-k", "3", "--fit", "sample", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["fit_beyond_cap"] == "sample"
    r = cli(["cluster", store, "-k", "3", "--fit", "all"])
    assert r.exit_code == 2 and "--fit" in r.output

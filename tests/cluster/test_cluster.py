"""`posvit cluster` and its core: matching, mIoU, k-means, spatial entropy, position dependence, label stores, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import write_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------------------
# Matching and mIoU: hand-computed cases


def test_hungarian_on_hand_made_3x3_confusion():
    from posvit_cli.core.cluster.matching import apply_matching, match_clusters
    from posvit_cli.core.measure.metrics import iou_per_class, miou

    # rows: classes 0..2, columns: clusters 0..2
    conf = np.array([[5, 1, 0], [2, 0, 6], [0, 4, 1]])
    # IoU(c, j) = n / (|c| + |j| − n): the best one-to-one sum is 5/8 + 6/9 + 4/6 with clusters 0→0, 2→1, 1→2.
    mapping = match_clusters(conf, "hungarian")
    assert mapping.tolist() == [0, 2, 1]
    cc = apply_matching(conf, mapping)
    assert cc.tolist() == [[5, 0, 1], [2, 6, 0], [0, 1, 4]]
    assert iou_per_class(cc) == pytest.approx([5 / 8, 6 / 9, 4 / 6])
    assert miou(cc) == pytest.approx((5 / 8 + 6 / 9 + 4 / 6) / 3)


def test_many_to_one_precision_and_iou_on_hand_made_confusion():
    from posvit_cli.core.cluster.matching import apply_matching, match_clusters
    from posvit_cli.core.measure.metrics import iou_per_class

    conf = np.array([[5, 1, 0, 3], [2, 0, 6, 3], [0, 4, 1, 0]])
    # Precision = majority class; cluster 3 is a 3/3 tie between classes 0 and 1: the first class wins.
    mapping = match_clusters(conf, "precision")
    assert mapping.tolist() == [0, 2, 1, 0]
    cc = apply_matching(conf, mapping)
    assert cc.tolist() == [[8, 0, 1], [5, 6, 0], [0, 1, 4]]
    assert iou_per_class(cc).mean() == pytest.approx((8 / 14 + 6 / 12 + 4 / 6) / 3)

    # A mixed cluster (6 px of a 100-px class, 4 px of a 4-px class): precision picks the big class, IoU the
    # small one.
    conf = np.array([[90, 6, 4], [0, 4, 0]])
    assert match_clusters(conf, "precision").tolist() == [0, 0, 0]
    assert match_clusters(conf, "iou").tolist() == [0, 1, 0]
    p = iou_per_class(apply_matching(conf, match_clusters(conf, "precision")))
    i = iou_per_class(apply_matching(conf, match_clusters(conf, "iou")))
    assert p.tolist() == pytest.approx([100 / 104, 0.0])
    assert i.tolist() == pytest.approx([94 / 100, 4 / 10])


def test_empty_cluster_maps_to_class_zero_and_matching_equals_relabelled_pixels():
    from posvit_cli.core.cluster.matching import apply_matching, match_clusters
    from posvit_cli.core.measure.metrics import confusion_matrix

    conf = np.array([[0, 3, 0], [0, 1, 5]])
    assert match_clusters(conf, "precision")[0] == 0
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, 5000)
    pred = (gt * 3 + rng.integers(0, 3, 5000)) % 11
    noisy = rng.random(5000) < 0.2
    pred[noisy] = rng.integers(0, 11, noisy.sum())
    conf = confusion_matrix(gt, pred, 4, num_pred=11)
    for method in ("precision", "iou"):
        mapping = match_clusters(conf, method)
        assert np.array_equal(apply_matching(conf, mapping), confusion_matrix(gt, mapping[pred], 4))


# Fewer clusters than classes (k < C). Rows: classes 0..2, columns: clusters 0..1.
#   cluster 0 holds 6 px of class 0 and 2 of class 1; cluster 1 holds 4 px of class 0 and 3 of class 2.
# Leopart's rule (greedy precision, many-to-one at every k ≠ C): both clusters are mostly class 0 (6/8, 4/7), so
#   class 0 gets all 15 px: IoU 10/15; classes 1 and 2 are never predicted: 0. mIoU = (2/3)/3 = 2/9.
# Hungarian (one-to-one, max summed IoU): IoU(0,0) = 6/12, IoU(2,1) = 3/7 is the best pair (sum 13/14 against
#   2/8 + 4/13 and 2/8 + 3/7), so cluster 0 → class 0 (IoU 6/12), cluster 1 → class 2 (IoU 3/7), class 1: 0.
#   mIoU = (1/2 + 3/7)/3 = 13/42.
_K_BELOW_C = np.array([[6, 4], [2, 0], [0, 3]])
_K_BELOW_C_MIOU = {"precision": 2 / 9, "hungarian": 13 / 42}


def test_k_below_classes_hand_computed_precision_and_hungarian():
    from posvit_cli.core.cluster.matching import matched_iou
    from posvit_cli.core.cluster.overclustering import matchings_for

    miou, iou, mapping = matched_iou(_K_BELOW_C, "precision")
    assert mapping.tolist() == [0, 0]
    assert iou.tolist() == pytest.approx([10 / 15, 0.0, 0.0])
    assert miou == pytest.approx(2 / 9)
    miou, iou, mapping = matched_iou(_K_BELOW_C, "hungarian")
    assert mapping.tolist() == [0, 2]
    assert iou.tolist() == pytest.approx([6 / 12, 0.0, 3 / 7])
    assert miou == pytest.approx(13 / 42)
    # Which matchings run: Hungarian only at k = C by default; at every k ≤ C under the "hungarian" rule.
    assert matchings_for(2, 3) == ["precision"]
    assert matchings_for(2, 3, "in-training") == ["iou", "precision"]
    assert matchings_for(3, 3) == ["hungarian"] and matchings_for(5, 3) == ["precision"]
    assert matchings_for(2, 3, rule="hungarian") == ["hungarian"]
    assert matchings_for(5, 3, rule="hungarian") == ["precision"]


def _k_below_classes_store(tmp_path):
    """One 3×5-token image whose two feature blobs and three mask classes give the confusion ``_K_BELOW_C``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    # Token order (row-major): cluster 0 = 6 tokens of class 0 and 2 of class 1; cluster 1 = 4 of class 0, 3 of 2.
    cluster = np.array([0] * 8 + [1] * 7)
    classes = np.array([0] * 6 + [1] * 2 + [0] * 4 + [2] * 3)
    means = np.stack([np.full(8, -10.0), np.full(8, 10.0)])
    grid = (means[cluster] + rng.normal(scale=0.1, size=(15, 8))).reshape(3, 5, 8).astype(np.float32)
    mdir = tmp_path / "masks"
    mdir.mkdir()
    Image.fromarray(classes.reshape(3, 5).repeat(16, 0).repeat(16, 1).astype(np.uint8)).save(mdir / "img000.png")
    return write_store(tmp_path / "feats.h5", [grid], names=["img000.png"]), mdir


def test_overcluster_k_below_classes_uses_many_to_one_unless_hungarian_is_asked(tmp_path, cli):
    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.cluster.overclustering import overcluster_eval
    from posvit_cli.core.features.store import FeatureStore

    store, mdir = _k_below_classes_store(tmp_path)
    with FeatureStore(store) as fs:
        masks = load_masks(fs, mdir, eval_size=(30, 50), num_classes=3)  # 10 × 10 pixels per token
        ref = overcluster_eval(fs, masks, [2, 3], seeds=[0], n_init=2)
        old = overcluster_eval(fs, masks, [2], seeds=[0], n_init=2, matching="hungarian")
    by_k = {r["k"]: r for r in ref["results"]}
    assert by_k[2]["matching"] == "precision"
    assert by_k[2]["miou_mean"] == pytest.approx(_K_BELOW_C_MIOU["precision"])
    assert by_k[2]["clusters_to_background"] == 1.0
    assert by_k[3]["matching"] == "hungarian"
    assert ref["settings"]["matching_rule"] == "reference"
    assert [r["matching"] for r in old["results"]] == ["hungarian"]
    assert old["results"][0]["miou_mean"] == pytest.approx(_K_BELOW_C_MIOU["hungarian"])
    # The command: the default follows the reference, --matching hungarian keeps the earlier rule.
    for flag, method in ((), "precision"), (("--matching", "hungarian"), "hungarian"):
        r = cli(["cluster", store, "-k", "2", "--masks", mdir, "--eval-size", "30x50", "--num-classes", "3",
                 "--seeds", "0", "--n-init", "2", "--device", "cpu", "--json", "-q", *flag])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)["results"][0]
        assert res["matching"] == method
        assert res["miou_mean"] == pytest.approx(_K_BELOW_C_MIOU[method])
    r = cli(["cluster", store, "-k", "2", "--masks", mdir, "--matching", "greedy"])
    assert r.exit_code == 2


# --------------------------------------------------------------------------------------------------------------
# Synthetic stores: blob features laid out as class masks


def _blob_dataset(tmp_path, *, n_img=6, grid=8, patch=16, classes=4, dim=24, ignore_rows=0, noise_blob=False,
                  seed=0):
    """Features = one well-separated Gaussian blob per class, on a 2×2 block layout of each image's grid."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes + 1, dim)) * 12
    grids, names = [], []
    mdir = tmp_path / "masks"
    mdir.mkdir()
    for i in range(n_img):
        blocks = rng.permutation(np.arange(4) % classes)
        lab = blocks.reshape(2, 2).repeat(grid // 2, 0).repeat(grid // 2, 1)
        feat_lab = lab.copy()
        mask = lab.repeat(patch, 0).repeat(patch, 1).astype(np.uint8)
        if ignore_rows:
            # Ignored tokens carry features of a blob that belongs to no class: they would cost IoU if counted.
            mask[: ignore_rows * patch] = 255
            if noise_blob:
                feat_lab[:ignore_rows] = classes
        grids.append((means[feat_lab] + rng.normal(size=(grid, grid, dim))).astype(np.float32))
        names.append(f"img{i:03d}.png")
        Image.fromarray(mask).save(mdir / f"img{i:03d}.png")
    store = write_store(tmp_path / "feats.h5", grids, names=names, provenance={"patch_size": patch})
    return store, mdir


def test_blobs_give_miou_one_for_k_equal_classes_and_many_to_one(tmp_path):
    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.cluster.overclustering import overcluster_eval
    from posvit_cli.core.features.store import FeatureStore

    store, mdir = _blob_dataset(tmp_path, ignore_rows=2)
    with FeatureStore(store) as fs:
        masks = load_masks(fs, mdir)
        assert masks.num_classes == 4
        out = overcluster_eval(fs, masks, [4, 12], seeds=[0, 1], n_init=3)
    by_k = {r["k"]: r for r in out["results"]}
    assert by_k[4]["matching"] == "hungarian"
    assert by_k[4]["miou_mean"] == 1.0 and by_k[4]["miou_std"] == 0.0
    assert by_k[12]["matching"] == "precision"
    assert by_k[12]["miou_mean"] >= 0.99
    # 2 of 8 token rows are ignored: exactly 3/4 of the 100×100 evaluation pixels count.
    assert out["n_eval_pixels"] == 6 * 100 * 75
    assert set(by_k[4]["iou_per_class"]) == {"0", "1", "2", "3"}


def test_class_absent_from_masks_counts_zero(tmp_path):
    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.cluster.overclustering import overcluster_eval
    from posvit_cli.core.features.store import FeatureStore

    store, mdir = _blob_dataset(tmp_path)
    with FeatureStore(store) as fs:
        masks = load_masks(fs, mdir, num_classes=5, class_names=["bg", "a", "b", "c", "never"])
        out = overcluster_eval(fs, masks, [8], seeds=[0], n_init=2)
    r = out["results"][0]
    assert out["classes_absent_from_masks"] == ["never"]
    assert r["iou_per_class"]["never"] == 0.0
    assert r["miou_mean"] == pytest.approx(4 / 5)


def test_ignored_pixels_never_count(tmp_path):
    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.cluster.overclustering import overcluster_eval
    from posvit_cli.core.features.store import FeatureStore

    # The ignored tokens carry a fifth blob; its clusters hold only ignored pixels, so they change nothing.
    store, mdir = _blob_dataset(tmp_path, ignore_rows=3, noise_blob=True)
    with FeatureStore(store) as fs:
        kept = overcluster_eval(fs, load_masks(fs, mdir), [8], seeds=[0], n_init=3)
        # The same masks with nothing ignored: 255 becomes a class of its own and the score collapses.
        counted = overcluster_eval(fs, load_masks(fs, mdir, ignore_index=None), [8], seeds=[0], n_init=3)
    assert kept["results"][0]["miou_mean"] == 1.0
    assert counted["settings"]["num_classes"] == 256
    assert counted["results"][0]["miou_mean"] < 0.1


def test_in_training_protocol_reports_iou_and_precision_matching(tmp_path):
    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.cluster.overclustering import overcluster_eval
    from posvit_cli.core.features.store import FeatureStore

    store, mdir = _blob_dataset(tmp_path, n_img=4)
    with FeatureStore(store) as fs:
        out = overcluster_eval(fs, load_masks(fs, mdir, eval_size=(32, 32)), [4, 8], protocol="in-training")
    rows = {(r["k"], r["matching"]) for r in out["results"]}
    assert rows == {(4, "hungarian"), (8, "iou"), (8, "precision")}
    assert out["settings"]["seeds"] == [1] and out["settings"]["max_iter"] == 50
    assert out["n_tokens"] == 4 * 32 * 32  # features upsampled to the evaluation grid
    # Bilinear features blend blobs at block borders, so a few border pixels may go astray.
    assert min(r["miou_mean"] for r in out["results"]) >= 0.9


# --------------------------------------------------------------------------------------------------------------
# z-score + PCA


def test_streamed_zscore_pca_matches_numpy(tmp_path):
    from posvit_cli.core.cluster.projection import fit_projection, project_tokens
    from posvit_cli.core.features.store import FeatureStore

    rng = np.random.default_rng(3)
    grids = [(rng.normal(size=(5, 7, 12)) * np.linspace(0.1, 5, 12) + 40).astype(np.float32) for _ in range(9)]
    grids[0][..., 3] = 2.0  # a constant channel: scale 1, as scikit-learn's StandardScaler
    path = write_store(tmp_path / "f.h5", grids)
    x = np.concatenate([g.reshape(-1, 12) for g in grids]).astype(np.float64)
    with FeatureStore(path) as fs:
        for fit_max in (None, 100):
            proj = fit_projection(fs, "final", range(9), pca_dim=4, pca_fit_max=fit_max)
            y, offsets = project_tokens(fs, "final", range(9), proj)
            mu, sd = x.mean(0), x.std(0)
            sd[sd == 0] = 1
            z = (x - mu) / sd
            zf = z[: fit_max or len(z)]
            evals, evecs = np.linalg.eigh(np.cov(zf.T, bias=True))
            v = evecs[:, ::-1][:, :4]
            ref = (z - zf.mean(0)) @ v
            got = y.numpy().astype(np.float64)
            signs = np.sign((got * ref).sum(0))
            assert np.allclose(got, ref * signs, atol=2e-3), fit_max
            assert proj.explained_variance_ratio == pytest.approx(evals[::-1][:4].sum() / evals.sum(), rel=1e-6)
    assert offsets.tolist() == list(range(0, 9 * 35 + 1, 35))


# --------------------------------------------------------------------------------------------------------------
# k-means


def _blobs(n, d, centres, spread, seed):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)) * 10
    lab = rng.integers(0, centres, n)
    return (c[lab] + rng.normal(size=(n, d)) * spread).astype(np.float32), lab


def test_kmeans_matches_sklearn_inertia_on_easy_data():
    from sklearn.cluster import KMeans

    from posvit_cli.core.cluster.kmeans import kmeans

    x, _ = _blobs(3000, 8, 6, 0.5, 0)
    ours = kmeans(x, 6, n_init=3, seed=0)
    ref = KMeans(6, n_init=3, random_state=0).fit(x)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-5)
    assert ours.labels.shape == (3000,) and ours.centers.shape == (6, 8)


@pytest.mark.parametrize("algorithm,dense_fraction", [("bounded", 0.15), ("bounded", 0.0), ("bounded", 1.01),
                                                     ("batched", None)])
def test_kmeans_engines_equal_sklearn_lloyd_from_the_same_start(algorithm, dense_fraction, monkeypatch):
    from sklearn.cluster import KMeans

    import posvit_cli.core.cluster.kmeans as km
    from posvit_cli.core.cluster.kmeans import kmeans

    if dense_fraction is not None:  # 0: every re-assignment dense; 1.01: always per group
        monkeypatch.setattr(km, "DENSE_LOOK_FRACTION", dense_fraction)

    # Overlapping blobs and k ≠ the number of blobs: many points change cluster for many iterations.
    x, _ = _blobs(4000, 6, 30, 6.0, 1)
    start = x[np.random.default_rng(2).choice(len(x), 25, replace=False)]
    ours = kmeans(x, 25, init=start, max_iter=30, algorithm=algorithm)
    ref = KMeans(25, init=start, n_init=1, max_iter=30, tol=0, algorithm="lloyd").fit(x)
    assert ours.n_iter == ref.n_iter_
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-5)
    assert np.mean(ours.labels == ref.labels_) > 0.995


def test_kmeans_handles_empty_clusters_and_k_equal_n():
    from posvit_cli.core.cluster.kmeans import kmeans

    x = np.repeat(np.eye(3, dtype=np.float32), 5, axis=0)  # 3 distinct points, 5 copies each
    res = kmeans(x, 3, n_init=2, seed=1)
    assert res.inertia == pytest.approx(0.0, abs=1e-9)
    assert len(np.unique(res.labels)) == 3
    # Start two centres on the same point: one cluster is empty and must be re-seeded on a far point.
    res = kmeans(x, 3, init=x[[0, 0, 5]], algorithm="bounded")
    assert res.inertia == pytest.approx(0.0, abs=1e-9)
    y = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
    res = kmeans(y, 7)
    assert sorted(res.labels.tolist()) == list(range(7)) and res.inertia == pytest.approx(0.0, abs=1e-9)


def test_kmeans_is_reproducible_and_rejects_k_above_n():
    from posvit_cli.core.errors import PosvitError
    from posvit_cli.core.cluster.kmeans import kmeans

    x, _ = _blobs(500, 4, 5, 2.0, 4)
    a, b = kmeans(x, 5, n_init=2, seed=7), kmeans(x, 5, n_init=2, seed=7)
    assert np.array_equal(a.labels, b.labels) and a.inertia == b.inertia
    with pytest.raises(PosvitError, match="cannot make 501 clusters from 500 points"):
        kmeans(x, 501)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_kmeans_cuda_agrees_with_cpu():
    from posvit_cli.core.cluster.kmeans import kmeans

    x, _ = _blobs(20000, 16, 40, 3.0, 5)
    cpu = kmeans(x, 40, seed=0, device="cpu")
    gpu = kmeans(x, 40, seed=0, device="cuda")
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)


# --------------------------------------------------------------------------------------------------------------
# Spatial entropy


def test_spatial_entropy_quadrants_and_content_clusters():
    from posvit_cli.core.cluster.entropy import spatial_entropy

    h = w = 16
    quad = (np.arange(h)[:, None] >= h // 2) * 2 + (np.arange(w)[None, :] >= w // 2)
    # Each quadrant cluster is uniform over a quarter of the grid: entropy log(M/4) / log(M).
    expect = 1 - math.log(4) / math.log(h * w)
    assert spatial_entropy([quad] * 5, 4) == pytest.approx(expect)
    # Per image, positions count in 4 × 4 blocks: a quadrant covers 4 of 16 blocks uniformly.
    assert spatial_entropy([quad] * 5, 4, per_image=True) == pytest.approx(math.log(4) / math.log(16))
    # One cluster per cell: entropy 0.
    assert spatial_entropy([np.arange(h * w).reshape(h, w)], h * w) == pytest.approx(0.0)
    # Content clusters: labels independent of position, pooled over many images → close to 1.
    rng = np.random.default_rng(0)
    content = [rng.integers(0, 4, (h, w)) for _ in range(200)]
    assert spatial_entropy(content, 4) > 0.99
    assert spatial_entropy(content, 4, per_image=True) > 0.95
    # The shuffled reference of the quadrant clustering is high: the low value comes from position.
    assert spatial_entropy([quad] * 200, 4, shuffle_seed=0) > 0.99
    assert spatial_entropy([quad] * 20, 4, per_image=True, shuffle_seed=0) > 0.95


# --------------------------------------------------------------------------------------------------------------
# The command


def test_cli_overcluster_writes_results_and_label_store(tmp_path, cli):
    from posvit_cli.core.features.store import FeatureStore

    store, mdir = _blob_dataset(tmp_path)
    out = tmp_path / "labels.h5"
    r = cli(["cluster", store, "-k", "4,8", "--masks", mdir, "--seeds", "0-1", "--n-init", "2", "-o", out,
             "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "hungarian" in r.output and "100.00 ± 0.00" in r.output
    res = json.loads((tmp_path / "labels.cluster.json").read_text())
    assert [x["k"] for x in res["results"]] == [4, 8]
    assert res["results"][0]["miou_per_seed"] == [1.0, 1.0]
    with FeatureStore(out) as labels, FeatureStore(store) as feats:
        assert [x.path for x in labels.records] == [x.path for x in feats.records]
        assert [x.orig_size for x in labels.records] == [x.orig_size for x in feats.records]
        assert {"kmeans_k4", "kmeans_k4_hungarian_class", "kmeans_k8"} <= set(labels.map_names())
        cls = labels.token_map(0, "kmeans_k4_hungarian_class")
        assert cls.shape == (8, 8)
    # The matched class map reproduces the planted layout (the mask at token resolution).
    from PIL import Image

    mask = np.asarray(Image.open(mdir / "img000.png"))[::16, ::16]
    assert np.array_equal(cls, mask)


def test_cli_per_image_decomposition_writes_maps_that_read_back(tmp_path, cli):
    from posvit_cli.core.features.store import FeatureStore

    rng = np.random.default_rng(0)
    grids, regions = [], []
    for i in range(3):
        reg = np.zeros((10, 12), int)
        reg[:, 4:8] = 1
        reg[5:, 8:] = 2
        reg = np.roll(reg, i, axis=1)
        means = rng.normal(size=(3, 16)) * 8
        grids.append((means[reg] + rng.normal(size=(10, 12, 16))).astype(np.float32))
        regions.append(reg)
    store = write_store(tmp_path / "f.h5", grids)
    out = tmp_path / "decomp.zarr"
    r = cli(["cluster", store, "-k", "3", "--per-image", "-o", out, "--json", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["settings"]["mode"] == "per-image" and data["settings"]["n_init"] == 15
    with FeatureStore(out) as labels:
        assert len(labels) == 3 and labels.map_names() == ["kmeans_k3"]
        for i, reg in enumerate(regions):
            lab = labels.token_map(i, "kmeans_k3")
            # Same partition as the planted regions, up to renaming the clusters.
            pairs = set(zip(reg.ravel().tolist(), lab.ravel().tolist()))
            assert len(pairs) == 3 and len({p[1] for p in pairs}) == 3


def test_cli_dataset_clustering_from_a_pipe(tmp_path, cli):
    store, _ = _blob_dataset(tmp_path)
    r = cli(["cluster", "-", "-k", "4", "--json", "-q"], input=store.read_bytes())
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["settings"]["mode"] == "dataset" and data["results"][0]["k"] == 4
    assert 0.0 < data["results"][0]["spatial_entropy"] <= 1.0
    dep = data["results"][0]["position_dependence"]
    assert dep["bins"] == 2 and dep["draws"] == 99 and 0.0 < dep["p_value"] <= 1.0


def _half_and_blob_stores(tmp_path, n_img=8, h=12, w=16, C=8):
    """Two stores: features of every image split top/bottom (position), or along a random blob per image (content)."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=C) * 6, rng.normal(size=C) * 6
    bottom = np.repeat((np.arange(h) >= h // 2)[:, None], w, 1)
    half, blob = [], []
    for _ in range(n_img):
        region = ndi.gaussian_filter(rng.normal(size=(h, w)), 2.0, mode="wrap") > 0
        half.append((np.where(bottom[..., None], b, a) + rng.normal(size=(h, w, C))).astype(np.float32))
        blob.append((np.where(region[..., None], b, a) + rng.normal(size=(h, w, C))).astype(np.float32))
    return write_store(tmp_path / "half.h5", half), write_store(tmp_path / "blob.h5", blob)


@pytest.mark.parametrize("mode", [[], ["--per-image"]])
def test_cli_position_dependence_tells_a_position_split_from_a_content_split(tmp_path, cli, mode):
    half, blob = _half_and_blob_stores(tmp_path)
    r = cli(["cluster", half, "-k", "2", *mode, "--results-json", tmp_path / "half.json"])
    assert r.exit_code == 0, r.output
    dep = json.loads((tmp_path / "half.json").read_text())["results"][0]["position_dependence"]
    assert dep["mi_bits"] == pytest.approx(1.0) and dep["dependence"] == pytest.approx(1.0)
    assert dep["p_value"] == pytest.approx(0.01) and dep["position_driven"]
    assert "position dep." in r.output and "1.00 (p=0.01) *" in r.output and "spatial entropy" not in r.output
    r = cli(["cluster", blob, "-k", "2", *mode, "--json", "-q"])
    dep = json.loads(r.stdout)["results"][0]["position_dependence"]
    assert not dep["position_driven"] and abs(dep["dependence"]) < 0.1 and dep["p_value"] > 0.1


def test_cli_position_bins_and_null_draws_are_used_and_recorded(tmp_path, cli):
    half, _ = _half_and_blob_stores(tmp_path, n_img=4)
    r = cli(["cluster", half, "-k", "2", "--position-bins", "4", "--null-draws", "39", "--json", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    dep = data["results"][0]["position_dependence"]
    assert (dep["bins"], dep["draws"], dep["p_value"]) == (4, 39, 1 / 40) and dep["position_driven"]
    assert data["settings"]["position_bins"] == 4 and data["settings"]["null_draws"] == 39
    r = cli(["cluster", half, "-k", "2", "--null-draws", "10"])
    assert r.exit_code == 2 and "--null-draws" in r.output


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def test_missing_masks_are_named(tmp_path, cli):
    store, mdir = _blob_dataset(tmp_path)
    (mdir / "img002.png").unlink()
    (mdir / "img004.png").unlink()
    r = cli(["cluster", store, "-k", "4", "--masks", mdir])
    assert r.exit_code == 2
    flat = " ".join(r.output.split())
    assert "no mask" in flat and "for 2 of 6 images of '" in flat and ": img002, img004" in flat
    assert "Traceback" not in r.output


def test_mask_of_another_size_is_resized_with_a_warning(tmp_path, cli):
    from PIL import Image

    store, mdir = _blob_dataset(tmp_path)
    big = np.asarray(Image.open(mdir / "img001.png"))
    Image.fromarray(big.repeat(2, 0).repeat(2, 1)).save(mdir / "img001.png")
    r = cli(["cluster", store, "-k", "4", "--masks", mdir, "--seeds", "0", "--n-init", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and "img001.png' is 256×256 px but its image is 128×128" in r.output
    data = json.loads(r.stdout)
    assert data["results"][0]["miou_mean"] == 1.0
    assert data["masks_resized"][0].endswith("img001.png")


def test_k_larger_than_tokens_is_refused(tmp_path, cli):
    store, mdir = _blob_dataset(tmp_path, n_img=2)
    r = cli(["cluster", store, "-k", "4,500", "--masks", mdir])
    assert r.exit_code == 2
    assert "k=500 is larger than the number of tokens to cluster (128)" in r.output
    r = cli(["cluster", store, "-k", "65", "--per-image"])
    assert r.exit_code == 2 and "k=65 is larger than the 64 tokens of image 'img000'" in r.output


def test_mask_value_at_or_above_num_classes_is_refused(tmp_path, cli):
    from PIL import Image

    store, mdir = _blob_dataset(tmp_path)
    m = np.asarray(Image.open(mdir / "img003.png")).copy()
    m[40:50, 40:50] = 7
    Image.fromarray(m).save(mdir / "img003.png")
    r = cli(["cluster", store, "-k", "4", "--masks", mdir, "--num-classes", "4"])
    assert r.exit_code == 2
    assert "img003.png' holds label 7, which is ≥ --num-classes 4 and is not the ignore index 255" in r.output


def test_bad_options_are_one_line_errors(tmp_path, cli):
    store, mdir = _blob_dataset(tmp_path, n_img=2)
    for args, msg in [
        (["-k", "4,x"], "comma-separated list of int"),
        (["--seeds", "3-1"], "--seeds range '3-1' runs backwards: did you mean 1-3?"),
        (["--protocol", "leopart"], "'leopart' is not one of"),
        (["--eval-size", "0"], "--eval-size '0' must be"),
        (["--masks", tmp_path / "nowhere"], "does not exist"),
        (["--class-names", "a,b", "--num-classes", "3", "--masks", mdir], "2 class names given for 3 classes"),
    ]:
        r = cli(["cluster", store, *args])
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output, (args, r.output)

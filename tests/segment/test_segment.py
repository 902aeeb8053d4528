"""posvit segment: classical features, ViT pixel features, classifiers, CRF, scribbles, metrics and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from conftest import TINY_MODEL, run_posvit, write_store
from posvit_cli.core.segment.filters import (
    ClassicalConfig,
    classical_features,
    classical_features_reference,
    feature_names,
    membrane_kernels,
)
from posvit_cli.core.segment.classifiers import ClassifierConfig, PixelClassifier, balanced_weights, load_classifier
from posvit_cli.core.segment.crf import CrfConfig, crf_halo, mean_field_crf
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.metrics import class_average_miou
from posvit_cli.core.segment.scribbles import correction_scribbles, draw_scribbles
from posvit_cli.core.segment.evaluate import SegmentationScores, block_average, class_fractions
from posvit_cli.core.segment.classes import ClassTable, LabelledImage
from posvit_cli.core.segment.segmenter import (
    FeatureSpec,
    load_grey,
    load_segmenter,
    pixel_features,
    segment_image,
    train_segmenter,
)
from posvit_cli.core.segment.vit_pixels import ReducedTokens, fit_shared_pca, reduce_tokens, upsample_region


# ------------------------------------------------------------------------------------------------------ helpers
def two_phase(n: int, seed: int, fine: float = 1.0, coarse: float = 8.0, blob: float = 20.0):
    """An image whose two classes differ only in texture scale (same mean and variance), and its ground truth."""
    rng = np.random.default_rng(seed)
    gt = np.where(ndi.gaussian_filter(rng.standard_normal((n, n)), blob) > 0, 1, 2).astype(np.uint8)

    def texture(s):
        t = ndi.gaussian_filter(rng.standard_normal((n, n)), s)
        return (t - t.mean()) / t.std()

    img = np.where(gt == 1, texture(fine), texture(coarse))
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32), gt


def save_png(path, arr):
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def seg_data(tmp_path):
    """Three 96×96 two-phase images, their dense ground truth and scribbles (≈1–3 % of pixels)."""
    dirs = {k: tmp_path / k for k in ("imgs", "labels", "gt")}
    for d in dirs.values():
        d.mkdir()
    for i in range(3):
        img, gt = two_phase(96, i, blob=12)
        save_png(dirs["imgs"] / f"im{i}.png", (img * 255).astype(np.uint8))
        save_png(dirs["gt"] / f"im{i}.png", gt - 1)  # dense masks are 0-based (docs/labels.md)
        save_png(dirs["labels"] / f"im{i}.png", draw_scribbles(gt, 3, seed=i).astype(np.uint8))
    return dirs


def small_cfg():
    """A fast classical set for CLI tests."""
    return ["--sigmas", "1,2,4", "--trees", "20", "--depth", "4"]


# ------------------------------------------------------------------------------------------ classical features
def test_default_feature_set_has_58_named_channels_in_documented_order():
    names = feature_names()
    assert len(names) == 58 and len(set(names)) == 58
    assert names[:7] == ["raw", "gradient", "hessian_eig1", "hessian_eig2", "hessian_modulus", "hessian_trace",
                         "hessian_det"]
    assert names[7] == "gauss_s1" and names[-16] == "dog_s2-s1" and names[-7] == "dog_s16-s8"
    assert names[-6:] == ["membrane_sum", "membrane_mean", "membrane_std", "membrane_median", "membrane_max",
                          "membrane_min"]
    assert len(feature_names(ClassicalConfig(groups=("intensity", "membrane")))) == 6 + 6
    assert ClassicalConfig(weka_compat=True).blur_sigmas == (0.0, 0.0, 1.0, 3.0, 6.0)
    assert ClassicalConfig().halo == 66  # int(4·16 + 0.5) + 2


def test_membrane_kernels_are_rotated_binary_lines():
    k = membrane_kernels()
    assert k.shape == (30, 15, 15) and set(np.unique(k)) <= {0.0, 1.0}
    vertical = np.zeros((15, 15), np.float32)
    vertical[:, 7] = 1
    np.testing.assert_array_equal(k[0], vertical)
    np.testing.assert_array_equal(k[15], vertical.T)  # 90°
    assert all(13 <= k[i].sum() <= 15 for i in range(30))


@pytest.mark.parametrize("weka", [False, True])
def test_fast_features_equal_the_straightforward_scipy_implementation(weka):
    img = ndi.gaussian_filter(np.random.default_rng(0).random((41, 57)), 1.5).astype(np.float32)
    cfg = ClassicalConfig(weka_compat=weka)
    ref = classical_features_reference(img, cfg)
    fast = classical_features(img, cfg)
    assert fast.shape == ref.shape == (41, 57, 58)
    scale = np.abs(ref).reshape(-1, 58).max(0) + 1e-12
    rel = (np.abs(fast - ref).reshape(-1, 58).max(0) / scale).max()
    assert rel < 2e-3  # float32 FFT rounding on the tiny σ=16 Hessians; most channels agree to 1e-6
    np.testing.assert_allclose(fast[..., -6:], ref[..., -6:], rtol=1e-6, atol=1e-5)  # membrane: summation order
    torch_out = classical_features(img, cfg, backend="torch")
    np.testing.assert_allclose(torch_out, ref, atol=1e-4)
    single = classical_features(img, cfg, threads=1)
    np.testing.assert_array_equal(single, fast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_equal_the_reference():
    # cuDNN convolves in TF32 unless told otherwise; the Hessian channels lost up to half their range to it.
    img = ndi.gaussian_filter(np.random.default_rng(0).random((96, 80)), 1.5).astype(np.float32)
    # The float32 CPU backends are within 0.9% of the float64-ish reference on the σ=16 Hessian determinant
    # (a difference of tiny products); TF32 was 47% off.
    ref = classical_features_reference(img)
    out = classical_features(img, device="cuda")
    scale = np.abs(ref).reshape(-1, 58).max(0) + 1e-12
    assert (np.abs(out - ref).reshape(-1, 58).max(0) / scale).max() < 2e-2
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_features_of_a_tile_with_its_halo_equal_the_whole_image():
    img = np.random.default_rng(1).random((150, 140)).astype(np.float32)
    spec = FeatureSpec(ClassicalConfig(sigmas=(1.0, 4.0)), None)
    whole = pixel_features(img, (0, 150), (0, 140), spec, None)
    part = pixel_features(img, (40, 90), (70, 140), spec, None)
    np.testing.assert_allclose(part, whole[40:90, 70:140], atol=2e-6)


def test_bad_images_for_features_are_rejected():
    with pytest.raises(PosvitError, match="greyscale"):
        classical_features(np.zeros((8, 8, 3)))
    with pytest.raises(PosvitError, match="too small"):
        classical_features(np.zeros((1, 8)))
    with pytest.raises(PosvitError, match="increasing"):
        ClassicalConfig(sigmas=(4, 2))


def test_sixteen_bit_and_float_tiffs_are_scaled_to_unit_range(tmp_path):
    import tifffile

    ramp = np.linspace(1000, 3000, 64 * 64).reshape(64, 64)
    tifffile.imwrite(tmp_path / "a.tif", ramp.astype(np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", (ramp / 7.0).astype(np.float32))
    for name in ("a.tif", "b.tif"):
        g = load_grey(tmp_path / name)
        assert g.dtype == np.float32 and g.min() == 0.0 and abs(g.max() - 1.0) < 1e-6


# --------------------------------------------------------------------------------------------- ViT pixel maps
def test_reduced_tokens_put_a_planted_direction_first_and_upsample_consistently():
    h, w = 6, 8
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(-1, 1, w), (h, 1))
    tokens = np.concatenate([np.repeat(ramp[..., None], 4, -1) * 3, rng.normal(size=(h, w, 4)) * 0.1], -1)
    red = reduce_tokens(tokens, dims=2)
    assert red.shape == (h, w, 2) and red.min() >= 0 and red.max() <= 1
    assert abs(np.corrcoef(red[..., 0].ravel(), ramp.ravel())[0, 1]) > 0.99
    rt = ReducedTokens(red, covered=(42, 56))  # 7-px tokens: token (i, j) is centred on pixel (7i + 3, 7j + 3)
    whole = upsample_region(rt, (0, 42), (0, 56))
    np.testing.assert_array_equal(upsample_region(rt, (10, 30), (5, 50)), whole[10:30, 5:50])
    np.testing.assert_allclose(whole[3::7, 3::7], red, atol=1e-6)
    np.testing.assert_allclose(whole[:3, :3], np.broadcast_to(red[0, 0], (3, 3, 2)), atol=1e-6)  # edge tokens extend to the border
    np.testing.assert_allclose(whole[6, 3], (4 * red[0, 0] + 3 * red[1, 0]) / 7, atol=1e-6)
    shared = fit_shared_pca([tokens.reshape(-1, 8)], dims=2)
    np.testing.assert_allclose(reduce_tokens(tokens, 2, shared), red, atol=1e-5)


# ------------------------------------------------------------------------------------------------ classifiers
def test_balanced_weights_give_each_class_equal_total_weight():
    y = np.array([0] * 90 + [1] * 10)
    w = balanced_weights(y, 2)
    assert np.isclose(w[y == 0].sum(), w[y == 1].sum()) and np.isclose(w.sum(), y.size)


@pytest.mark.parametrize("kind", ["xgboost", "random-forest", "logistic"])
def test_classifiers_round_trip_without_pickle(kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 1).astype(int)
    clf = PixelClassifier.fit(X, y, 3, ClassifierConfig(kind=kind, trees=10, depth=3))
    p = clf.predict_proba(X)
    assert p.shape == (300, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert (p.argmax(1) == y).mean() > 0.8
    meta, files = clf.to_files()
    again = load_classifier(json.loads(json.dumps(meta)), files)
    np.testing.assert_array_equal(again.predict_proba(X), p)


def test_logistic_probabilities_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    clf = PixelClassifier.fit(X, y, 2, ClassifierConfig(kind="logistic", balance=False))
    Z = (X - X.mean(0)) / X.std(0)
    ref = LogisticRegression(max_iter=1000).fit(Z, y).predict_proba(Z)
    np.testing.assert_allclose(clf.predict_proba(X), ref, atol=1e-4)


# ------------------------------------------------------------------------------------------------- known answers
def test_texture_scale_classes_reach_miou_090_from_one_percent_scribbles(tmp_path):
    img, gt = two_phase(192, 2)
    held_img, held_gt = two_phase(192, 102)
    scribbles = draw_scribbles(gt, 3, length=64, seed=2)
    assert 0.005 < (scribbles > 0).mean() <= 0.01
    save_png(tmp_path / "a.png", (img * 255).astype(np.uint8))
    save_png(tmp_path / "b.png", (held_img * 255).astype(np.uint8))
    classes = ClassTable([1, 2], ["fine", "coarse"])
    seg = train_segmenter([LabelledImage(str(tmp_path / "a.png"), classes.to_index(scribbles))], classes,
                          FeatureSpec(ClassicalConfig(), None), ClassifierConfig())
    pred, _ = segment_image(seg, load_grey(tmp_path / "a.png"))
    assert class_average_miou(gt, pred) >= 0.9
    held, _ = segment_image(seg, load_grey(tmp_path / "b.png"))
    assert class_average_miou(held_gt, held) >= 0.9


def test_miou_of_hand_made_label_maps_equals_the_hand_computed_values():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 2, 2]])
    pred = np.array([[1, 1, 1, 2], [1, 1, 2, 2], [3, 1, 2, 2], [1, 3, 3, 2]])
    s = SegmentationScores(ignore_value=0)
    e = s.add("a", pred, gt)
    # class 1: |∩| 5, |∪| 7; class 2: 6 of 8; class 3 (only predicted) is ignored per image, as in the reference
    assert e["class_avg_miou"] == pytest.approx((5 / 7 + 6 / 8) / 2)
    s.add("b", np.ones((4, 4), int), np.ones((4, 4), int))
    summ = s.summary()
    assert summ["class_avg_miou_mean"] == pytest.approx(((5 / 7 + 6 / 8) / 2 + 1.0) / 2)
    # dataset-wide: one confusion matrix; class 3, predicted but never true, scores 0 and counts
    assert summ["per_class_iou"] == {"1": pytest.approx(21 / 23), "2": pytest.approx(6 / 8), "3": 0.0}
    assert summ["dataset_miou"] == pytest.approx((21 / 23 + 6 / 8 + 0) / 3)


@pytest.mark.parametrize("band_rows", [1, 3])
def test_scores_in_row_bands_equal_the_hand_computed_values(monkeypatch, band_rows):
    """Bands of 1 and 3 rows cut every class: the per-image, dataset and per-class scores are unchanged."""
    import posvit_cli.core.segment.evaluate as evaluate

    monkeypatch.setattr(evaluate, "BAND_ROWS", band_rows)
    test_miou_of_hand_made_label_maps_equals_the_hand_computed_values()
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 2, 2]])
    fr = class_fractions(gt, [1, 2], grid=2)
    np.testing.assert_array_equal(fr[..., 0], [[1, 0], [0.5, 0]])
    rng = np.random.default_rng(0)
    probs = rng.random((7, 9, 3))
    monkeypatch.setattr(evaluate, "BAND_ROWS", 512)
    whole = block_average(probs, 3)
    monkeypatch.setattr(evaluate, "BAND_ROWS", band_rows)
    np.testing.assert_allclose(block_average(probs, 3), whole, rtol=1e-13)


def test_eval_command_reports_the_hand_computed_miou(tmp_path, cli):
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    # ground truth: classes 0..1 and 255 = unlabelled; predictions: class k is value k + 1 (docs/labels.md)
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 1, 1]], np.uint8)
    pred = np.array([[1, 1, 1, 2], [1, 1, 2, 2], [3, 1, 2, 2], [1, 3, 3, 2]], np.uint8)
    save_png(tmp_path / "pred" / "x.png", pred)
    save_png(tmp_path / "gt" / "x.png", gt)
    r = cli(["segment", "eval", tmp_path / "pred", "--masks", tmp_path / "gt", "--json", "-q", "--grid", "4"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["images"][0]["class_avg_miou"] == pytest.approx((5 / 7 + 6 / 8) / 2)
    assert out["summary"]["dataset_miou"] == pytest.approx((5 / 7 + 6 / 8 + 0) / 3)


def test_class_maps_are_block_averaged():
    labels = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    fr = class_fractions(labels, [1, 2], grid=2)
    np.testing.assert_array_equal(fr[..., 0], [[1, 0], [1, 0]])
    np.testing.assert_allclose(block_average(fr, 2), fr)


def test_positional_diagnostic_flags_the_classifier_trained_with_a_position_channel(tmp_path, cli):
    # A homogeneous texture; class 1 scribbled on the left, class 2 on the right: only position separates them.
    rng = np.random.default_rng(0)
    n = 128
    img = ndi.gaussian_filter(rng.standard_normal((n, n)), 1.0)
    img = ((img - img.min()) / (img.max() - img.min()) * 255).astype(np.uint8)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "labels").mkdir()
    save_png(tmp_path / "imgs" / "h.png", img)
    lab = np.zeros((n, n), np.uint8)
    for k in range(6):
        y = 10 + 20 * k
        lab[y, 8:40] = 1
        lab[y, 88:120] = 2
    save_png(tmp_path / "labels" / "h.png", lab)
    # "ViT" tokens (8×8 grid of 16-px patches) whose strongest direction is a left-right ramp.
    ramp = np.tile(np.linspace(-1, 1, 8), (8, 1))[..., None]
    tokens = np.concatenate([np.repeat(ramp, 4, -1) * 3, rng.normal(size=(8, 8, 4)) * 0.2], -1)
    store = write_store(tmp_path / "f.h5", [tokens], names=[str(tmp_path / "imgs" / "h.png")])
    common = ["--sigmas", "1,2", "--trees", "30", "-q"]
    biased = tmp_path / "biased.posvit-seg"
    clean = tmp_path / "clean.posvit-seg"
    r = cli(["segment", "train", tmp_path / "imgs", "--labels", tmp_path / "labels", "-o", biased, "-f", store,
             "--vit-dims", "2", *common])
    assert r.exit_code == 0, r.output
    r = cli(["segment", "train", tmp_path / "imgs", "--labels", tmp_path / "labels", "-o", clean, *common])
    assert r.exit_code == 0, r.output
    res = {}
    for name, model, extra in (("biased", biased, ["-f", store]), ("clean", clean, [])):
        r = cli(["segment", "eval", model, "--images", tmp_path / "imgs", *extra, "--json", "-q"])
        assert r.exit_code == 0, r.output
        res[name] = json.loads(r.stdout)["images"][0]
    assert res["biased"]["positionally_biased"] and res["biased"]["positional_r2"]["lr"] > 0.5
    assert not res["clean"]["positionally_biased"] and res["clean"]["positional_r2"]["max"] < 0.2


# --------------------------------------------------------------------------------------------- model and apply
def test_saved_model_gives_identical_labels_in_a_fresh_process(seg_data, tmp_path):
    classes = ClassTable([1, 2], ["fine", "coarse"])
    images = [LabelledImage(str(p), classes.to_index(np.array(Image.open(seg_data["labels"] / p.name))))
              for p in sorted(seg_data["imgs"].iterdir())]
    seg = train_segmenter(images, classes, FeatureSpec(ClassicalConfig(sigmas=(1.0, 2.0, 4.0)), None),
                          ClassifierConfig(trees=20))
    model = seg.save(tmp_path / "m.posvit-seg")
    expected = {p.name: segment_image(seg, load_grey(p))[0] for p in seg_data["imgs"].iterdir()}
    r = run_posvit(["segment", "apply", model, seg_data["imgs"], "-o", tmp_path / "out", "-q"])
    assert r.returncode == 0, r.stderr.decode()
    for name, labels in expected.items():
        written = np.array(Image.open(tmp_path / "out" / name))
        np.testing.assert_array_equal(written, labels)
    assert Image.open(tmp_path / "out" / "im0.png").mode == "P"  # palette PNG: viewable, reads back as values
    again = load_segmenter(model)
    assert again.classes.names == ["fine", "coarse"] and again.feature_names == seg.feature_names


def test_tiled_apply_equals_untiled_apply_with_vit_features_and_crf(tmp_path):
    img, gt = two_phase(100, 5, blob=10)
    img = img[:, :90]
    gt = gt[:, :90]
    path = save_png(tmp_path / "a.png", (img * 255).astype(np.uint8))
    classes = ClassTable([1, 2], ["a", "b"])
    tokens = np.random.default_rng(0).normal(size=(7, 6, 8))
    red = ReducedTokens(reduce_tokens(tokens, 3), covered=(100, 90))
    from posvit_cli.core.segment.vit_pixels import VitConfig

    spec = FeatureSpec(ClassicalConfig(sigmas=(1.0, 3.0)), VitConfig(dims=3))
    seg = train_segmenter([LabelledImage(str(path), classes.to_index(draw_scribbles(gt, 3, seed=0)))], classes,
                          spec, ClassifierConfig(trees=20), reduced_for=lambda p, hw: red)
    grey = load_grey(path)
    whole, p_whole = segment_image(seg, grey, red, tile=None, probabilities=True)
    tiled, p_tiled = segment_image(seg, grey, red, tile=32, probabilities=True)
    np.testing.assert_allclose(p_tiled, p_whole, atol=1e-5)  # halo-exact features; float rounding only
    assert (tiled == whole).mean() > 0.999
    crf = CrfConfig(iterations=2, spatial_sigma=1.0, bilateral_radius=2)
    assert crf_halo(crf) == 2 * (4 + 4)
    c_whole, _ = segment_image(seg, grey, red, tile=None, crf=crf)
    c_tiled, _ = segment_image(seg, grey, red, tile=40, crf=crf)
    assert (c_tiled == c_whole).mean() > 0.999


def test_crf_cleans_noisy_probabilities_and_tolerates_zeros():
    rng = np.random.default_rng(0)
    truth = np.zeros((60, 60), int)
    truth[:, 30:] = 1
    guide = truth.astype(np.float32)
    p1 = np.clip(np.where(truth == 1, 0.7, 0.3) + rng.normal(0, 0.3, truth.shape), 0, 1)
    probs = np.stack([1 - p1, p1], -1).astype(np.float32)  # holds exact zeros and ones
    out = mean_field_crf(probs, guide)
    assert np.isfinite(out).all() and np.allclose(out.sum(-1), 1, atol=1e-5)
    assert (out.argmax(-1) == truth).mean() > (probs.argmax(-1) == truth).mean() + 0.1
    assert (out.argmax(-1) == truth).mean() > 0.98


# -------------------------------------------------------------------------------------------------- scribbles
def test_scribbles_stay_inside_their_class_away_from_boundaries():
    gt = np.ones((80, 80), np.uint8)
    gt[:, 40:] = 2
    gt[70:, :] = 0  # unlabelled ground truth gets no scribble
    lab = draw_scribbles(gt, 2, margin=4, seed=3)
    assert set(np.unique(lab)) == {0, 1, 2}
    assert (lab[lab > 0] == gt[lab > 0]).all() and not lab[70:].any()
    dist = ndi.distance_transform_edt(np.pad(gt == 1, 1))[1:-1, 1:-1]
    assert dist[lab == 1].min() > 4
    pred = gt.copy()
    pred[10:30, 5:30] = 2  # a wrong blob inside class 1
    more = correction_scribbles(gt, pred, lab, regions=1, margin=2, seed=0)
    added = (more > 0) & (lab == 0)
    assert added.any() and (more[added] == 1).all()
    assert added[10:30, 5:30].sum() == added.sum()


# ------------------------------------------------------------------------------------------- CLI: train/apply
def test_train_apply_with_vit_features_on_the_fly_and_from_a_store(seg_data, tmp_path, cli):
    model = tmp_path / "v.posvit-seg"
    r = cli(["segment", "train", seg_data["imgs"], "--labels", seg_data["labels"], "-o", model, "-m", TINY_MODEL,
             "-w", "random", *small_cfg(), "--json", "-q"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["features"] == len(feature_names(ClassicalConfig(sigmas=(1, 2, 4)))) + 9
    r = cli(["segment", "apply", model, seg_data["imgs"], "-o", tmp_path / "a", "--probabilities", "-q", "--json"])
    assert r.exit_code == 0, r.output
    outputs = json.loads(r.stdout)["outputs"]
    import tifffile

    probs = tifffile.imread(outputs[0]["probabilities"])
    assert probs.shape == (2, 96, 96) and np.allclose(probs.sum(0), 1, atol=1e-5)
    store = tmp_path / "f.h5"
    r = cli(["extract", seg_data["imgs"], "-m", TINY_MODEL, "-w", "random", "-o", store, "-q"])
    assert r.exit_code == 0, r.output
    r = cli(["segment", "apply", model, seg_data["imgs"], "-o", tmp_path / "b", "-f", store, "-q"])
    assert r.exit_code == 0, r.output
    for i in range(3):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "a" / f"im{i}.png")),
                                      np.array(Image.open(tmp_path / "b" / f"im{i}.png")))
    other = tmp_path / "g.h5"
    r = cli(["extract", seg_data["imgs"], "-m", TINY_MODEL, "-w", "random", "--seed", "1", "-o", other, "-q"])
    r = cli(["segment", "apply", model, seg_data["imgs"], "-o", tmp_path / "c", "-f", other, "-q"])
    assert r.exit_code == 2 and "weights_sha256" in r.output


# --------------------------------------------------------------------------------------------- CLI: bad input
def _train(cli, imgs, labels, out, *extra):
    return cli(["segment", "train", imgs, "--labels", labels, "-o", out, *small_cfg(), "-q", *extra])


def test_labels_of_another_size_are_an_error(seg_data, tmp_path, cli):
    save_png(seg_data["labels"] / "im1.png", np.ones((50, 96), np.uint8))
    r = _train(cli, seg_data["imgs"], seg_data["labels"], tmp_path / "m.posvit-seg")
    assert r.exit_code == 2 and "are 50×96 px but image" in r.output and "Traceback" not in r.output


def test_images_with_empty_labels_are_left_out_and_all_empty_is_an_error(seg_data, tmp_path, cli):
    save_png(seg_data["labels"] / "im1.png", np.zeros((96, 96), np.uint8))
    r = _train(cli, seg_data["imgs"], seg_data["labels"], tmp_path / "m.posvit-seg", "--json")
    assert r.exit_code == 0, r.output
    assert "have no labelled pixel: image left out" in r.output
    assert len(json.loads(r.stdout[r.stdout.index("{"):])["training"]["images"]) == 2
    for i in (0, 2):
        save_png(seg_data["labels"] / f"im{i}.png", np.zeros((96, 96), np.uint8))
    r = _train(cli, seg_data["imgs"], seg_data["labels"], tmp_path / "n.posvit-seg")
    assert r.exit_code == 2 and "no labelled pixel" in r.output


def test_a_class_missing_from_some_images_is_fine_but_a_never_labelled_named_class_is_an_error(seg_data, tmp_path, cli):
    lab = np.array(Image.open(seg_data["labels"] / "im0.png"))
    lab[lab == 2] = 0
    save_png(seg_data["labels"] / "im0.png", lab)  # im0 now has class 1 only: documented, still trains
    r = _train(cli, seg_data["imgs"], seg_data["labels"], tmp_path / "m.posvit-seg", "--class-names", "fine,coarse")
    assert r.exit_code == 0, r.output
    r = _train(cli, seg_data["imgs"], seg_data["labels"], tmp_path / "n.posvit-seg", "--class-names", "fine,coarse,pore")
    assert r.exit_code == 2 and "class 'pore' (value 3) has no labelled pixel" in r.output


def test_rgb_label_images_are_mapped_by_colour_with_a_printed_table(seg_data, tmp_path, cli):
    rgb_dir = tmp_path / "rgb"
    rgb_dir.mkdir()
    colours = {1: (255, 0, 0), 2: (0, 255, 0)}
    for i in range(3):
        lab = np.array(Image.open(seg_data["labels"] / f"im{i}.png"))
        rgb = np.zeros(lab.shape + (3,), np.uint8)
        for v, c in colours.items():
            rgb[lab == v] = c
        save_png(rgb_dir / f"im{i}_labels.png", rgb)
    model = tmp_path / "m.posvit-seg"
    r = cli(["segment", "train", seg_data["imgs"], "--labels", rgb_dir, "-o", model, *small_cfg()])
    assert r.exit_code == 0, r.output
    assert "label colours → classes" in r.output and "(0, 255, 0)" in r.output
    seg = load_segmenter(model)
    # black is unlabelled; the other colours, sorted, are classes 1, 2: green (0x00ff00) before red (0xff0000)
    assert seg.classes.colours == [(0, 255, 0), (255, 0, 0)] and seg.classes.names == ["#00ff00", "#ff0000"]
    r = cli(["segment", "apply", model, seg_data["imgs"] / "im0.png", "-o", tmp_path / "out", "-q"])
    assert r.exit_code == 0, r.output
    pal = Image.open(tmp_path / "out" / "im0.png").getpalette()
    assert pal[3:9] == [0, 255, 0, 255, 0, 0]


def test_unreadable_images_are_errors_in_training_and_skipped_in_apply(seg_data, tmp_path, cli):
    model = tmp_path / "m.posvit-seg"
    assert _train(cli, seg_data["imgs"], seg_data["labels"], model).exit_code == 0
    (seg_data["imgs"] / "broken.png").write_bytes(b"not a png")
    save_png(seg_data["labels"] / "broken.png", np.ones((96, 96), np.uint8))
    r = _train(cli, seg_data["imgs"], seg_data["labels"], tmp_path / "n.posvit-seg")
    assert r.exit_code == 2 and "cannot decode image" in r.output and "broken.png" in r.output
    r = cli(["segment", "apply", model, seg_data["imgs"], "-o", tmp_path / "out", "-q"])
    assert r.exit_code == 0 and "skipped" in r.output and (tmp_path / "out" / "im0.png").exists()
    r = cli(["segment", "apply", model, seg_data["imgs"], "-o", tmp_path / "out2", "--strict", "-q"])
    assert r.exit_code == 2 and "broken.png" in r.output


def test_other_user_errors_are_one_line_exit_2(seg_data, tmp_path, cli):
    m = tmp_path / "m.posvit-seg"
    assert _train(cli, seg_data["imgs"], seg_data["labels"], m).exit_code == 0
    cases = [
        (["segment", "train", seg_data["imgs"], "--labels", seg_data["labels"], "-o", m], "already exists"),
        (["segment", "train", seg_data["imgs"], "--labels", seg_data["labels"], "-o", tmp_path / "x.pkl"], ".posvit-seg"),
        (["segment", "train", seg_data["imgs"], "--labels", tmp_path / "nowhere", "-o", tmp_path / "y.posvit-seg"],
         "does not exist"),
        (["segment", "apply", tmp_path / "nope.posvit-seg", seg_data["imgs"], "-o", tmp_path / "o"], "does not exist"),
        (["segment", "apply", m, seg_data["imgs"], "-o", seg_data["imgs"]], "overwrite an input image"),
        (["segment", "eval", m, "--masks", seg_data["gt"]], "--images"),
        (["segment", "apply", m, seg_data["imgs"], "-o", tmp_path / "o", "-f", tmp_path / "f.h5"], "no ViT"),
    ]
    for args, msg in cases:
        r = cli(args)
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output


# ---------------------------------------------------------------------------------------------------- bench
def test_bench_reports_rounds_with_and_without_vit_features(seg_data, cli, tmp_path):
    r = cli(["segment", "bench", seg_data["imgs"], "--masks", seg_data["gt"], "--train", "2", "--rounds", "1",
             "-m", TINY_MODEL, "-w", "random", "--sigmas", "1,2,4", "--trees", "15", "--depth", "4",
             "-o", tmp_path / "b.json", "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out == json.loads((tmp_path / "b.json").read_text())
    assert [c["name"] for c in out["configs"]] == ["classical", f"classical+{TINY_MODEL}"]
    assert out["test_images"] == [str(seg_data["imgs"] / "im2.png")]
    for c in out["configs"]:
        assert [x["round"] for x in c["rounds"]] == [0, 1]
        assert c["rounds"][1]["labelled_pixels"] > c["rounds"][0]["labelled_pixels"]
        assert all(0.5 < x["class_avg_miou_mean"] <= 1 for x in c["rounds"])
    # both configurations start from the same scribbles
    assert out["configs"][0]["rounds"][0]["labelled_pixels"] == out["configs"][1]["rounds"][0]["labelled_pixels"]


def test_shared_pca_model_from_a_natively_tiled_store(tmp_path, cli):
    # 100×100 image, patch 16, tiled extraction: the token grid covers the top-left 96×96 px (native crop).
    img, gt = two_phase(100, 7, blob=10)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "labels").mkdir()
    save_png(tmp_path / "imgs" / "t.png", (img * 255).astype(np.uint8))
    save_png(tmp_path / "labels" / "t.png", draw_scribbles(gt, 3, seed=0).astype(np.uint8))
    store = tmp_path / "tiled.h5"
    r = cli(["extract", tmp_path / "imgs", "-m", TINY_MODEL, "-w", "random", "--tile", "64", "--overlap", "16",
             "-o", store, "-q"])
    assert r.exit_code == 0, r.output
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.segment.vit_pixels import TokenSource

    with FeatureStore(store) as st:
        src = TokenSource(st)
        rec = src.record_for(tmp_path / "imgs" / "t.png")
        assert rec.meta.get("tiles") and src.covered(rec) == (96, 96) and rec.grid == (6, 6)
    model = tmp_path / "s.posvit-seg"
    r = cli(["segment", "train", tmp_path / "imgs", "--labels", tmp_path / "labels", "-o", model, "-f", store,
             "--pca", "shared", "--vit-dims", "4", *small_cfg(), "-q"])
    assert r.exit_code == 0, r.output
    import zipfile

    assert "pca.npz" in zipfile.ZipFile(model).namelist()
    assert load_segmenter(model).shared_pca.components.shape == (4, 64)
    r = cli(["segment", "apply", model, tmp_path / "imgs", "-o", tmp_path / "out", "-f", store, "-q"])
    assert r.exit_code == 0, r.output
    assert np.array(Image.open(tmp_path / "out" / "t.png")).shape == (100, 100)


def test_label_files_next_to_their_images_are_paired_and_not_trained_on(seg_data, tmp_path, cli):
    for i in range(3):
        (seg_data["labels"] / f"im{i}.png").rename(seg_data["imgs"] / f"im{i}_labels.png")
    r = _train(cli, seg_data["imgs"], seg_data["imgs"], tmp_path / "m.posvit-seg", "--json")
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output
    used = json.loads(r.stdout[r.stdout.index("{"):])["training"]["images"]
    assert sorted(used) == [str(seg_data["imgs"] / f"im{i}.png") for i in range(3)]


def test_subsampling_training_pixels_never_drops_a_rare_class(tmp_path):
    from posvit_cli.core.segment.segmenter import gather_training_pixels

    img, _ = two_phase(64, 0)
    path = save_png(tmp_path / "a.png", (img * 255).astype(np.uint8))
    labels = np.full((64, 64), -1, np.int16)
    labels[:40] = 0  # 2560 px of class 0
    labels[60, :5] = 1  # 5 px of class 1
    X, y = gather_training_pixels([LabelledImage(str(path), labels)], FeatureSpec(ClassicalConfig(sigmas=(1.0,)), None),
                                  None, n_classes=2, max_samples=100)
    assert X.shape == (100, len(feature_names(ClassicalConfig(sigmas=(1.0,))))) and np.bincount(y).tolist() == [95, 5]


# ------------------------------------------------------------------------------------------- reliability faults
def _tiny_seg_data(root, n=2, side=32):
    """``n`` 32×32 two-phase images named like conftest.write_store's records, and their scribbles."""
    imgs, labels = root / "imgs", root / "labels"
    imgs.mkdir()
    labels.mkdir()
    for i in range(n):
        img, gt = two_phase(side, i, blob=4)
        save_png(imgs / f"img{i:03d}.png", (img * 255).astype(np.uint8))
        save_png(labels / f"img{i:03d}.png", draw_scribbles(gt, 3, seed=i).astype(np.uint8))
    return imgs, labels


def test_non_finite_store_features_are_a_user_error_naming_the_store_and_image(tmp_path, cli):
    imgs, labels = _tiny_seg_data(tmp_path)
    rng = np.random.default_rng(0)
    grids = [rng.standard_normal((2, 2, 8)).astype(np.float32) for _ in range(2)]
    good = write_store(tmp_path / "good.h5", grids)
    grids[1][1, 0, 3] = np.nan
    bad = write_store(tmp_path / "bad.h5", grids)
    fast = ["--sigmas", "1", "--trees", "5", "--depth", "2", "--vit-dims", "2", "-q"]
    r = cli(["segment", "train", imgs, "--labels", labels, "-o", tmp_path / "m.posvit-seg", "-f", bad, *fast])
    assert r.exit_code == 2, r.output
    assert "img001.png" in r.output and "bad.h5" in r.output and "NaN" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.posvit-seg").exists()
    model = tmp_path / "ok.posvit-seg"
    r = cli(["segment", "train", imgs, "--labels", labels, "-o", model, "-f", good, *fast])
    assert r.exit_code == 0, r.output
    r = cli(["segment", "apply", model, imgs, "-o", tmp_path / "out", "-f", bad, "-q"])
    assert r.exit_code == 2 and "img001.png" in r.output and "bad.h5" in r.output, r.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # img000 not written either


def _tiny_model(cli, imgs, labels, model):
    r = cli(["segment", "train", imgs, "--labels", labels, "-o", model, "--sigmas", "1", "--trees", "5", "--depth", "2",
             "-q"])
    assert r.exit_code == 0, r.output
    return model


def test_apply_refuses_to_replace_existing_outputs_before_writing_anything(tmp_path, cli):
    imgs, labels = _tiny_seg_data(tmp_path)
    model = _tiny_model(cli, imgs, labels, tmp_path / "m.posvit-seg")
    out = tmp_path / "out"
    out.mkdir()
    (out / "img001.png").write_bytes(b"keep me")
    r = cli(["segment", "apply", model, imgs, "-o", out, "-q"])
    assert r.exit_code == 2 and "img001.png" in r.output and "--overwrite" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert (out / "img001.png").read_bytes() == b"keep me"
    assert sorted(f.name for f in out.iterdir()) == ["img001.png"]  # nothing else written either
    (out / "img000_probs.tif").write_bytes(b"old")
    (out / "img001.png").unlink()
    r = cli(["segment", "apply", model, imgs, "-o", out, "--probabilities", "-q"])
    assert r.exit_code == 2 and "img000_probs.tif" in r.output, r.output
    assert (out / "img000_probs.tif").read_bytes() == b"old" and not (out / "img000.png").exists()
    (out / "img001.png").write_bytes(b"keep me")
    r = cli(["segment", "apply", model, imgs, "-o", out, "--probabilities", "--overwrite", "-q"])
    assert r.exit_code == 0, r.output
    assert np.array(Image.open(out / "img001.png")).shape == (32, 32)
    import tifffile

    assert tifffile.imread(out / "img000_probs.tif").shape == (2, 32, 32)


def test_an_anti_aliased_pixel_in_rgb_scribbles_is_warned_about_by_colour_count_and_file(tmp_path, cli):
    imgs, labels = tmp_path / "imgs", tmp_path / "labels"
    imgs.mkdir()
    labels.mkdir()
    img, gt = two_phase(64, 0, blob=6)
    save_png(imgs / "a.png", (img * 255).astype(np.uint8))
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[gt == 1] = (255, 0, 0)
    rgb[gt == 2] = (0, 255, 0)  # dense: 4096 labelled px, so 0.1 % is 4 px
    save_png(labels / "a.png", rgb)
    args = ["segment", "train", imgs, "--labels", labels, "--sigmas", "1", "--trees", "3", "--depth", "2", "-q"]
    r = cli([*args, "-o", tmp_path / "clean.posvit-seg"])
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    rgb[0, 0] = (250, 3, 2)  # the anti-aliased edge pixel of the report
    save_png(labels / "a.png", rgb)
    r = cli([*args, "-o", tmp_path / "m.posvit-seg"])
    assert r.exit_code == 0, r.output
    warned = [ln for ln in r.output.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1, r.output
    assert "#fa0302" in warned[0] and "only 1 px" in warned[0] and str(labels / "a.png") in warned[0], warned
    assert "anti-aliasing" in warned[0] and "indexed (palette) PNG" in warned[0]


def test_probabilities_on_a_full_disk_are_one_error_line_and_leave_no_file(tmp_path, cli, monkeypatch):
    import errno
    import os

    imgs, labels = _tiny_seg_data(tmp_path, n=1)
    model = _tiny_model(cli, imgs, labels, tmp_path / "m.posvit-seg")
    claimed = []

    def full_disk(fd, offset, length):
        claimed.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    out = tmp_path / "out"
    r = cli(["segment", "apply", model, imgs, "-o", out, "--probabilities", "-q"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert f"no space left on device for '{out / 'img000_probs.tif'}' (1 MB needed)" in lines[0], r.output
    assert claimed and claimed[0] >= 2 * 32 * 32 * 4  # the whole file is claimed before it is mapped
    assert sorted(p.name for p in out.iterdir()) == []  # no hidden .img000_probs.tif.*.tmp.tif, no output

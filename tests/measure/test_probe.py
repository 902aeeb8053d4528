"""Known-answer tests of the positional probe engine (core/measure/probe/)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.probe import (
    ProbeSettings,
    fingerprint,
    make_settings,
    positional_channels,
    probe_dataset,
    probe_image,
    probe_store,
    ramp_targets,
    read_probe_result,
    sampling_plan,
    stack_r2,
    write_channel_csv,
    write_probe_result,
)
from posvit_cli.core.features.store import FeatureStore

from conftest import write_store

# Planted channels: each carries exactly one ramp (plus a little noise); every other channel is noise.
PLANTED = {"lr": 3, "ud": 17, "radial": 9, "diag": 25}


def planted_grid(rng, h=16, w=20, channels=32, noise=0.02):
    f = rng.normal(size=(h, w, channels))
    ramps = ramp_targets(h, w, tuple(PLANTED))
    for name, c in PLANTED.items():
        f[..., c] = ramps[name] + noise * rng.normal(size=(h, w))
    return f.astype(np.float32)


def images_of(grids):
    return [{"name": f"img{i}", "path": f"img{i}.png", "grid": g.shape[:2]} for i, g in enumerate(grids)]


def run(grids, layers=("final",), **settings):
    protocol = settings.pop("protocol", "holdout")
    s, _ = make_settings(protocol, **settings)
    return probe_dataset(lambda i, ly: grids[i], images_of(grids), list(layers), s)["layers"]


# --------------------------------------------------------------------------------------------------------------
# Targets and masks


def test_ramp_targets_hand_computed_on_a_non_square_grid():
    t = ramp_targets(2, 3, ("lr", "ud", "diag", "radial", "xy", "raster"))
    np.testing.assert_allclose(t["lr"], [[0, 0.5, 1], [0, 0.5, 1]])
    np.testing.assert_allclose(t["ud"], [[0, 0, 0], [1, 1, 1]])
    # linspace(0, 1, 3) = [0, .5, 1]; rows take its first 2 entries
    np.testing.assert_allclose(t["diag"], [[0, 0.25, 0.5], [0.25, 0.5, 0.75]])
    # centre (1, 1): distances [[√2, 1, √2], [1, 0, 1]], ρmax = √2
    np.testing.assert_allclose(t["radial"], [[0, 1 - 1 / math.sqrt(2), 0], [1 - 1 / math.sqrt(2), 1, 1 - 1 / math.sqrt(2)]])
    assert t["xy"].shape == (2, 3, 2)
    np.testing.assert_allclose(t["raster"].ravel(), np.arange(6) / 6)


def test_dino_saw_masks_follow_the_reference_definition():
    s, dev = make_settings("dino-saw")
    assert dev == [] and s.alpha == 1.0 and s.repeats == 6 and s.seed == 100001 and s.regressor == "ridge"
    plan = sampling_plan((37, 37), s, np.random.default_rng(0))
    # ⌊1369 / 36⌋ = 38 tokens per mask; R² over all tokens; one independent mask per target and repeat
    assert set(plan.train.sum(1)) == {38}
    assert plan.evaluate.all()
    n_roles = len(s.targets)
    assert plan.train.shape[0] == 6 * n_roles
    assert len({plan.train[m].tobytes() for m in range(plan.train.shape[0])}) == plan.train.shape[0]
    # grid-holdout: every 6th row/col of the top-left 0.7 box; a centred box for radial
    g, _ = make_settings("dino-saw", sampling="grid-holdout")
    assert g.cutoff == 0.7
    plan = sampling_plan((20, 20), g, np.random.default_rng(0))
    lr = plan.train[plan.mask_of["lr"][0]].reshape(20, 20)
    assert sorted(zip(*np.nonzero(lr))) == [(y, x) for y in (0, 6, 12) for x in (0, 6, 12)]
    radial = plan.train[plan.mask_of["radial"][0]].reshape(20, 20)
    # a 14-token centred box: rows/cols [ceil(3), floor(17)) = [3, 17), grid points 3, 9, 15
    assert sorted(zip(*np.nonzero(radial))) == [(y, x) for y in (3, 9, 15) for x in (3, 9, 15)]
    with pytest.raises(PosvitError, match="gives 0 training token"):
        sampling_plan((5, 5), make_settings("dino-saw")[0], np.random.default_rng(0))


def test_holdout_masks_are_shared_by_targets_and_disjoint_from_evaluation():
    s, _ = make_settings("holdout", fraction=0.25, repeats=3)
    plan = sampling_plan((12, 10), s, np.random.default_rng(0))
    assert plan.train.shape[0] == 3
    assert not (plan.train & plan.evaluate).any() and (plan.train | plan.evaluate).all()
    assert all((plan.mask_of[t] == [0, 1, 2]).all() for t in s.targets)
    gh, _ = make_settings("holdout", sampling="grid-holdout", step=2)
    plan = sampling_plan((10, 10), gh, np.random.default_rng(0))
    box = np.zeros((10, 10), bool)
    box[:7, :7] = True
    lr_mask = plan.mask_of["lr"][0]
    assert (plan.evaluate[lr_mask] == ~box.ravel()).all()            # extrapolation to the bottom/right 30 %
    assert not (plan.train[lr_mask] & ~box.ravel()).any()


def test_dino_saw_step_sets_the_random_fraction_and_overrides_are_reported():
    s, dev = make_settings("dino-saw", step=4, alpha=10.0)
    assert s.fraction == pytest.approx(1 / 16)
    assert any(d.startswith("alpha=10") for d in dev) and any(d.startswith("step=4") for d in dev)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": ("lr", "left")}, "unknown target 'left'"),
        ({"sampling": "checkerboard"}, "unknown sampling"),
        ({"fraction": 1.5}, "--fraction"),
        ({"regressor": "lasso"}, "unknown regressor"),
        ({"alpha": 0.0}, "--alpha > 0"),
        ({"sampling": "grid-holdout", "cutoff": 1.0}, "below 1"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(PosvitError, match=message):
        make_settings("holdout", **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Closed form = scikit-learn


def _sklearn_r2(X, Y, train, evaluate, regressor, alpha):
    from sklearn.linear_model import LinearRegression, Ridge
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X[train])
    model = Ridge(alpha=alpha) if regressor == "ridge" else LinearRegression()
    model.fit(scaler.transform(X[train]), Y[train])
    return r2_score(Y[evaluate], model.predict(scaler.transform(X[evaluate])))


_DUAL, _PRIMAL, _OLS, _OLS_MIN_NORM = ("ridge", 0.08, 4), ("ridge", 0.6, 2), ("ols", 0.6, 2), ("ols", 0.08, 4)


@pytest.mark.parametrize(
    "protocol, sampling, regressor, fraction, step",
    # every evaluation mode (held-out complement, outside-the-box, all tokens) with every solver
    [("holdout", "random", *c) for c in (_DUAL, _PRIMAL, _OLS)]
    + [("holdout", "grid-holdout", *c) for c in (_DUAL, _PRIMAL, _OLS)]
    + [("holdout", "grid", *_OLS_MIN_NORM), ("dino-saw", "random", *_DUAL), ("dino-saw", "random", *_OLS),
       ("dino-saw", "grid-holdout", *_PRIMAL)],
)
def test_stack_and_channel_r2_equal_sklearn(protocol, sampling, regressor, fraction, step):
    """Dual ridge (n < C), primal ridge (n > C) and least squares (also minimum-norm, n < C) agree with
    StandardScaler + Ridge / LinearRegression on the same masks."""
    rng = np.random.default_rng(3)
    h, w, C = 11, 13, 24
    f = rng.normal(size=(h, w, C)) * rng.uniform(0.5, 3, C) + 4.0
    f[..., 5] += np.linspace(0, 2, w)[None, :]
    f[..., 6] = 1.25                                                   # a constant channel: scale 1, no slope
    s, _ = make_settings(protocol, sampling=sampling, fraction=fraction, step=step, regressor=regressor,
                         alpha=2.5, repeats=2)
    plan = sampling_plan((h, w), s, np.random.default_rng(1))
    res = probe_image(f, s, plan)
    X = f.reshape(-1, C).astype(np.float64)
    cols = {"lr": [0], "ud": [1], "diag": [2], "radial": [3], "xy": [0, 1], "random": [4], "raster": [5]}
    for t in s.targets:
        for r, m in enumerate(plan.mask_of[t]):
            tr, ev = plan.train[m], plan.evaluate[m]
            Y = plan.targets[m][:, cols[t]]
            expected = _sklearn_r2(X, Y, tr, ev, regressor, 2.5)
            assert res.stack[t][r] == pytest.approx(expected, abs=1e-9), (t, r)
            for c in (5, 6):
                per_col = [_sklearn_r2(X[:, c:c + 1], Y[:, k], tr, ev, regressor, 2.5) for k in range(len(cols[t]))]
                assert res.channel[t][r, c] == pytest.approx(np.mean(per_col), abs=1e-9), (t, r, c)


def test_per_channel_r2_equals_sklearn_for_every_channel():
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(5)
    f = planted_grid(rng, 9, 14, 32)
    s, _ = make_settings("holdout", fraction=0.2, repeats=1, targets=("lr",))
    plan = sampling_plan((9, 14), s, np.random.default_rng(0))
    res = probe_image(f, s, plan)
    X = f.reshape(-1, 32).astype(np.float64)
    tr, ev = plan.train[0], plan.evaluate[0]
    y = plan.targets[0][:, 0]
    for c in range(32):
        sc = StandardScaler().fit(X[tr, c:c + 1])
        m = Ridge(alpha=1.0).fit(sc.transform(X[tr, c:c + 1]), y[tr])
        assert res.channel["lr"][0, c] == pytest.approx(r2_score(y[ev], m.predict(sc.transform(X[ev, c:c + 1]))), abs=1e-10)


# --------------------------------------------------------------------------------------------------------------
# Known answers on planted and null features


def test_planted_ramps_score_near_one_and_are_named_exactly(tmp_path):
    rng = np.random.default_rng(0)
    grids = [planted_grid(rng) for _ in range(4)]                     # 16 × 20: non-square
    path = write_store(tmp_path / "planted.h5", grids)
    s, _ = make_settings("holdout", fraction=0.25, top_k=1)
    with FeatureStore(path) as fs:
        result = probe_store(fs, s)
    block = result["results"]["final"]
    for t in ("lr", "ud", "diag", "radial", "xy"):
        assert block["stack_r2"][t]["mean"] > 0.97, t
    for ramp, channel in PLANTED.items():
        assert block["channel_r2"][ramp]["mean"][channel] > 0.97
        assert block["top_channels"][ramp] == [channel]
    assert block["stack_r2"]["random"]["mean"] < 0.02
    assert positional_channels(result, k=1) == sorted(PLANTED.values()) == block["positional_channels"]
    # xy is the mean of the lr and ud R² of the same fits
    np.testing.assert_allclose(
        block["stack_r2"]["xy"]["per_image"],
        (np.array(block["stack_r2"]["lr"]["per_image"]) + block["stack_r2"]["ud"]["per_image"]) / 2,
    )
    # the 2-D coordinate regressor is almost exact on exact ramps, far below the constant prediction
    assert block["coordinate_rmse"]["mean"] < 0.1 * block["coordinate_rmse"]["chance_mean"]
    assert result["store"]["model"] == "synthetic" and result["images"][0]["grid"] == [16, 20]


def test_pure_noise_scores_about_zero_held_out_but_not_under_dino_saw():
    rng = np.random.default_rng(1)
    grids = [rng.normal(size=(16, 16, 4)) for _ in range(8)]
    # 128 training tokens for 4 channels: a held-out null near −(C + 1)/n, not the strongly negative α=1 null
    block = run(grids, fraction=0.5)["final"]
    for t, v in block["stack_r2"].items():
        assert -0.12 < v["mean"] < 0.03, (t, v["mean"])
    assert -0.15 < block["stack_r2"]["random"]["mean"] <= 0.0
    for t, v in block["channel_r2"].items():
        assert max(v["mean"]) < 0.03, t
    assert block["coordinate_rmse"]["mean"] >= 0.98 * block["coordinate_rmse"]["chance_mean"]
    # the published protocol scores the training tokens too: on noise with more channels its R² sits well
    # above the held-out one (the fitted half of the tokens pulls it up)
    wider = [rng.normal(size=(16, 16, 16)) for _ in range(8)]
    held = run(wider, fraction=0.5, extras=False)["final"]["stack_r2"]
    leaky = run(wider, protocol="dino-saw", fraction=0.5, extras=False)["final"]["stack_r2"]
    for t in held:
        assert held[t]["mean"] < -0.1 and leaky[t]["mean"] > held[t]["mean"] + 0.1, t


def test_token_index_classifier_finds_a_position_embedding_and_not_noise():
    rng = np.random.default_rng(2)
    pe = rng.normal(size=(6, 6, 64))
    with_pe = [pe + 0.1 * rng.normal(size=pe.shape) for _ in range(5)]
    acc = run(with_pe, fraction=0.3)["final"]["position_accuracy"]
    assert acc["mean"] == 1.0 and acc["images_scored"] == 5 and acc["chance_mean"] == pytest.approx(1 / 36)
    noise = [rng.normal(size=(6, 6, 64)) for _ in range(5)]
    assert run(noise, fraction=0.3)["final"]["position_accuracy"]["mean"] < 0.15
    single = run(with_pe[:1], fraction=0.3)["final"]["position_accuracy"]
    assert single["mean"] is None and "2 images" in single["reason"]


def test_multi_layer_fingerprint(tmp_path):
    rng = np.random.default_rng(4)
    finals = [planted_grid(rng, 12, 12, 32) for _ in range(3)]
    path = tmp_path / "layers.h5"
    from posvit_cli.core.features.writer import StoreWriter

    with StoreWriter(path, provenance={"model": "synthetic", "patch_size": 16, "channels": 32},
                     layers=["block1", "final"], dtype="float32") as w:
        for i, g in enumerate(finals):
            w.add(f"im{i}.png", {"block1": rng.normal(size=g.shape).astype(np.float32), "final": g},
                  orig_size=(192, 192), proc_size=(192, 192))
    s, _ = make_settings("holdout", fraction=0.25, extras=False)
    with FeatureStore(path) as fs:
        result = probe_store(fs, s, layers=fs.layers)
    layers, fp = fingerprint(result, "lr")
    assert layers == ["block1", "final"] and fp.shape == (2, 32)
    assert fp[1, PLANTED["lr"]] > 0.95 and fp[0].max() < 0.1
    assert result["primary_layer"] == "final"
    assert result["results"]["block1"]["stack_r2"]["lr"]["mean"] < 0.1
    # positional channels of another layer on request
    assert PLANTED["lr"] not in positional_channels(result, k=1, layer="block1")


def test_mixed_grid_sizes_in_one_store(tmp_path):
    rng = np.random.default_rng(6)
    grids = [planted_grid(rng, 10, 14), planted_grid(rng, 14, 10), planted_grid(rng, 10, 14)]
    path = write_store(tmp_path / "mixed.h5", grids)
    s, _ = make_settings("holdout", fraction=0.3)
    with FeatureStore(path) as fs:
        result = probe_store(fs, s)
    block = result["results"]["final"]
    assert block["stack_r2"]["lr"]["mean"] > 0.95
    # the classifier needs two images of a grid size: the lone 14×10 image is not scored
    assert block["position_accuracy"]["per_image"][1] is None and block["position_accuracy"]["images_scored"] == 2


def test_seeded_runs_are_identical_and_seeds_matter():
    rng = np.random.default_rng(7)
    grids = [rng.normal(size=(37, 37, 8)) for _ in range(2)]
    a = run(grids, protocol="dino-saw")["final"]
    b = run(grids, protocol="dino-saw")["final"]
    c = run(grids, protocol="dino-saw", seed=1)["final"]
    assert json.dumps(a) == json.dumps(b)
    assert a["stack_r2"]["lr"]["per_repeat"] != c["stack_r2"]["lr"]["per_repeat"]


def test_stack_r2_contract():
    rng = np.random.default_rng(8)
    f = planted_grid(rng, 12, 12, 32)
    out = stack_r2(f, ("lr", "ud", "xy", "random"), alpha=1.0, fraction=0.3, repeats=3, seed=0)
    assert set(out) == {"lr", "ud", "xy", "random"} and all(isinstance(v, float) for v in out.values())
    assert out["lr"] > 0.95 and out["ud"] > 0.95 and out["random"] < 0.05
    assert out == stack_r2(f, ("lr", "ud", "xy", "random"), alpha=1.0, fraction=0.3, repeats=3, seed=0)
    # tiny grids: at least two training tokens, as before
    assert set(stack_r2(f[:3, :3], ("lr",), fraction=1 / 36)) == {"lr"}
    with pytest.raises(PosvitError, match="1×1"):
        stack_r2(f[:1, :1])
    with pytest.raises(PosvitError, match="NaN"):
        stack_r2(np.full((4, 4, 3), np.nan))


def test_nonfinite_features_name_every_bad_image():
    rng = np.random.default_rng(9)
    grids = [rng.normal(size=(8, 8, 4)) for _ in range(4)]
    grids[1][2, 3, 0] = np.nan
    grids[3][0, 0, 1] = np.inf
    with pytest.raises(PosvitError, match=r"2 image\(s\).*'img1', 'img3'"):
        run(grids, fraction=0.25)


# --------------------------------------------------------------------------------------------------------------
# Results read back


def test_result_round_trip_csv_and_strict_json(tmp_path):
    rng = np.random.default_rng(10)
    grids = [planted_grid(rng, 12, 9, 30) for _ in range(2)]
    grids[0][..., 11] = 0.0                                            # constant channel: R² still finite
    path = write_store(tmp_path / "s.h5", grids)
    s, _ = make_settings("holdout", fraction=0.3, targets=("lr", "ud", "diag", "radial"))
    with FeatureStore(path) as fs:
        result = probe_store(fs, s)
    out = write_probe_result(tmp_path / "res" / "probe.json", result)
    text = out.read_text()
    assert "NaN" not in text
    back = read_probe_result(out)
    assert positional_channels(back) == positional_channels(result)
    assert positional_channels(back, k=1, ramps=("lr",)) == [PLANTED["lr"]]
    with pytest.raises(PosvitError, match="'xy' was not probed"):
        positional_channels(back, ramps=("xy",))
    with pytest.raises(PosvitError, match="layer 'block3' was not probed"):
        positional_channels(back, layer="block3")
    csv = write_channel_csv(tmp_path / "c.csv", back).read_text().splitlines()
    assert csv[0].startswith("layer,channel,lr_mean,lr_std,ud_mean")
    assert len(csv) == 1 + 30
    assert "lr" in csv[1 + PLANTED["lr"]].rsplit(",", 1)[1].split(";")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(PosvitError, match="not a posvit probe result"):
        read_probe_result(tmp_path / "other.json")
    with pytest.raises(PosvitError, match="does not exist"):
        read_probe_result(tmp_path / "missing.json")


def test_settings_record_the_protocol():
    d = ProbeSettings().validated().as_dict()
    assert d["evaluated_on"] == "held-out tokens" and d["targets"][0] == "lr"
    d = make_settings("dino-saw")[0].as_dict()
    assert d["evaluated_on"] == "all tokens" and d["masks"] == "one per target and repeat"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("regressor, fraction", [("ridge", 0.05), ("ridge", 0.5), ("ols", 0.5), ("ols", 0.05)])
def test_cuda_matches_cpu(regressor, fraction):
    rng = np.random.default_rng(11)
    grids = [planted_grid(rng, 14, 18, 40) for _ in range(3)]
    s, _ = make_settings("holdout", fraction=fraction, regressor=regressor)
    images = images_of(grids)
    cpu = probe_dataset(lambda i, ly: grids[i], images, ["final"], s, device="cpu")["layers"]["final"]
    gpu = probe_dataset(lambda i, ly: grids[i], images, ["final"], s, device="cuda")["layers"]["final"]
    for t in s.targets:
        np.testing.assert_allclose(gpu["stack_r2"][t]["per_image"], cpu["stack_r2"][t]["per_image"], atol=1e-8)
        np.testing.assert_allclose(gpu["channel_r2"][t]["mean"], cpu["channel_r2"][t]["mean"], atol=1e-8)
    assert gpu["top_channels"] == cpu["top_channels"]
    assert gpu["position_accuracy"]["per_image"] == pytest.approx(cpu["position_accuracy"]["per_image"], abs=0.02)

"""Semantic probe (linear-probe segmentation on cached features): known answers, the dataset-wide confusion
matrix, bilinear upsampling, robustness stores and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_store
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.semantic import (
    AffineHead,
    MaskSource,
    SemanticSettings,
    bilinear_taps,
    gather_samples,
    image_split,
    scan_masks,
    score_store,
    scores_from_confusion,
    semantic_probe,
    upsample_argmax,
)
from posvit_cli.core.features.store import FeatureStore

PATCH = 16  # write_store's patch size: masks are drawn at 16 px per token


def _save_masks(folder, token_labels, names=None):
    """Token-grid labels (h, w) → mask PNGs at 16 px per token, named like write_store's images."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, lab in enumerate(token_labels):
        name = (names[i] if names else f"img{i:03d}.png").rsplit(".", 1)[0]
        big = np.kron(np.asarray(lab), np.ones((PATCH, PATCH), dtype=np.int64)).astype(np.uint8)
        Image.fromarray(big).save(folder / f"{name}.png")
    return folder


def _linear_dataset(rng, n, K=3, C=12, grid=(6, 8), ignore_some=False):
    """Classes per token; features = one-hot(class) @ M + noise: classes are a linear function of the channels."""
    M = np.random.default_rng(99).normal(size=(K, C)) * 3
    feats, labels = [], []
    for _ in range(n):
        lab = rng.integers(0, K, size=grid)
        f = np.eye(K)[lab] @ M + 0.2 * rng.normal(size=(*grid, C))
        if ignore_some:
            lab = lab.copy()
            lab[0, :3] = 255
            f[0, :3] = 50 * rng.normal(size=(3, C))  # junk features under ignored pixels must not matter
        feats.append(f.astype(np.float32))
        labels.append(lab)
    return feats, labels


@pytest.mark.parametrize("head", ["linear", "ridge"])
def test_linear_classes_reach_miou_one_and_ignored_pixels_never_count(tmp_path, head):
    rng = np.random.default_rng(0)
    tf, tl = _linear_dataset(rng, 12, ignore_some=True)
    vf, vl = _linear_dataset(rng, 5, ignore_some=True)
    write_store(tmp_path / "train.h5", tf)
    write_store(tmp_path / "val.h5", vf, names=[f"v{i}.png" for i in range(5)])
    _save_masks(tmp_path / "m", tl)
    _save_masks(tmp_path / "m", vl, names=[f"v{i}.png" for i in range(5)])
    with FeatureStore(tmp_path / "train.h5") as tr, FeatureStore(tmp_path / "val.h5") as va:
        res = semantic_probe(tr, tmp_path / "m", SemanticSettings(head=head), val_store=va)
    r = res["results"]
    assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0
    # 5 images × (48 tokens − 3 ignored): ignored tokens are neither trained on nor scored.
    assert r["pixels_scored"] == 5 * 45
    assert res["training"]["samples"]["available"] == 12 * 45 - len(res["split"]["early_stopping_images"]) * 45
    assert res["masks"]["num_classes"] == 3 and res["split"]["scored_on"] == "the validation store"


def _position_dataset(rng, n, grid=(8, 8), C_noise=24):
    """Classes that depend only on position (left/right half); features: 2 positional ramps + noise."""
    h, w = grid
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    lab = (xs >= w / 2).astype(np.int64)
    feats = []
    for _ in range(n):
        pos = np.stack([xs / (w - 1), ys / (h - 1)], -1) + 0.01 * rng.normal(size=(h, w, 2))
        noise = rng.normal(size=(h, w, C_noise))
        feats.append(np.concatenate([pos, noise], -1).astype(np.float32))
    return feats, [lab] * n


def test_probe_tells_semantics_from_position(tmp_path):
    """Position-only classes: a positional feature model scores high; without its positional channels the same
    features score at chance. Content classes survive removing the positional channels."""
    rng = np.random.default_rng(1)
    tf, tl = _position_dataset(rng, 16)
    vf, vl = _position_dataset(rng, 6)
    names_v = [f"v{i}.png" for i in range(6)]
    _save_masks(tmp_path / "m", tl)
    _save_masks(tmp_path / "m", vl, names=names_v)
    scores = {}
    for kind, sl in (("positional", slice(None)), ("without_position", slice(2, None))):
        write_store(tmp_path / f"t_{kind}.h5", [f[..., sl] for f in tf])
        write_store(tmp_path / f"v_{kind}.h5", [f[..., sl] for f in vf], names=names_v)
        with FeatureStore(tmp_path / f"t_{kind}.h5") as tr, FeatureStore(tmp_path / f"v_{kind}.h5") as va:
            scores[kind] = semantic_probe(tr, tmp_path / "m", SemanticSettings(), val_store=va)["results"]["miou"]
    assert scores["positional"] > 0.95
    # Two balanced classes: a prediction that ignores the input scores about 1/3 (random) or 1/4 (constant).
    assert scores["without_position"] < 0.45

    # Content classes with the same positional channels present: removing them keeps the score.
    K = 3
    M = np.random.default_rng(5).normal(size=(K, 24)) * 3
    content_t = [rng.integers(0, K, size=(8, 8)) for _ in range(16)]
    content_v = [rng.integers(0, K, size=(8, 8)) for _ in range(6)]
    _save_masks(tmp_path / "mc", content_t)
    _save_masks(tmp_path / "mc", content_v, names=names_v)
    mix_t = [np.concatenate([f[..., :2], np.eye(K)[c] @ M + 0.2 * f[..., 2:]], -1) for f, c in zip(tf, content_t)]
    mix_v = [np.concatenate([f[..., :2], np.eye(K)[c] @ M + 0.2 * f[..., 2:]], -1) for f, c in zip(vf, content_v)]
    write_store(tmp_path / "ct.h5", [f[..., 2:] for f in mix_t])
    write_store(tmp_path / "cv.h5", [f[..., 2:] for f in mix_v], names=names_v)
    with FeatureStore(tmp_path / "ct.h5") as tr, FeatureStore(tmp_path / "cv.h5") as va:
        assert semantic_probe(tr, tmp_path / "mc", SemanticSettings(), val_store=va)["results"]["miou"] == 1.0


def test_miou_from_one_confusion_matrix_equals_the_hand_computed_value(tmp_path):
    """Two 1×4 images, a fixed head that predicts the one-hot channel.

    A: gt [0, 0, 1, 255], pred [0, 1, 1, 0];  B: gt [1, 1, 1, 0], pred [1, 1, 0, 0].
    Dataset matrix (ignored pixel left out): [[2, 1], [1, 3]] → IoU 2/4 and 3/5 → mIoU 0.55, accuracy 5/7.
    The per-image average would be (0.5 + 7/12) / 2 = 0.5417: a different number.
    """
    gt = [np.array([[0, 0, 1, 255]]), np.array([[1, 1, 1, 0]])]
    pred = [np.array([[0, 1, 1, 0]]), np.array([[1, 1, 0, 0]])]
    write_store(tmp_path / "s.h5", [np.eye(2, dtype=np.float32)[p] for p in pred])
    _save_masks(tmp_path / "m", gt)
    head = AffineHead(np.eye(2, dtype=np.float32), np.zeros(2, np.float32))
    with FeatureStore(tmp_path / "s.h5") as st:
        src = MaskSource(st, tmp_path / "m")
        for resolution in ("tokens", "pixels"):
            conf = score_store(head, st, "final", src, [0, 1], num_classes=2, ignore_index=255, resolution=resolution)
            scale = 1 if resolution == "tokens" else PATCH * PATCH
            if resolution == "tokens":
                np.testing.assert_array_equal(conf, [[2, 1], [1, 3]])
            res = scores_from_confusion(conf, ["a", "b"])
            if resolution == "tokens":
                assert res["miou"] == pytest.approx(0.55, abs=1e-15)
                assert res["pixel_accuracy"] == pytest.approx(5 / 7, abs=1e-15)
                assert res["iou_per_class"] == {"a": 0.5, "b": 0.6}
            assert res["pixels_scored"] == 7 * scale
    # A class absent from the ground truth but predicted counts 0; one never seen nor predicted is left out.
    res = scores_from_confusion(np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert res["iou_per_class"] == {"a": 0.75, "b": 0.0, "c": None}
    assert res["miou"] == pytest.approx(0.375) and res["classes_absent"] == ["c"]


@pytest.mark.parametrize("n_in,n_out", [(4, 64), (5, 80), (7, 33), (3, 3), (6, 5), (1, 9)])
def test_bilinear_taps_and_upsampled_argmax_match_torch(n_in, n_out):
    import torch.nn.functional as F

    x = torch.randn(1, 1, 1, n_in, generator=torch.Generator().manual_seed(n_in * 100 + n_out), dtype=torch.float64)
    ref = F.interpolate(x, size=(1, n_out), mode="bilinear", align_corners=False)[0, 0, 0].numpy()
    i0, i1, lam = bilinear_taps(n_in, n_out)
    mine = (1 - lam) * x[0, 0, 0].numpy()[i0] + lam * x[0, 0, 0].numpy()[i1]
    np.testing.assert_allclose(mine, ref, atol=1e-6)
    logits = torch.randn(n_in, n_in + 2, 4, generator=torch.Generator().manual_seed(7))
    out_hw = (n_out, n_out + 5)
    want = F.interpolate(logits.permute(2, 0, 1)[None], size=out_hw, mode="bilinear", align_corners=False)[0]
    got = upsample_argmax(logits, out_hw, max_elements=64)                 # many small bands
    top2 = want.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-5                                     # ignore float ties
    assert torch.equal(got[clear], want.argmax(0)[clear]) and clear.float().mean() > 0.99


def test_pixel_samples_are_the_upsampled_features_at_those_pixels(tmp_path):
    """Training samples of --resolution pixels: features bilinearly interpolated at the sampled pixels."""
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    f = rng.normal(size=(3, 5, 6)).astype(np.float32)
    lab = rng.integers(0, 2, size=(3, 5))
    write_store(tmp_path / "s.h5", [f])
    _save_masks(tmp_path / "m", [lab])
    with FeatureStore(tmp_path / "s.h5") as st:
        src = MaskSource(st, tmp_path / "m")
        scan = scan_masks(src, [0], ignore_index=255)
        X, y, info = gather_samples(st, "final", src, scan, [0], ignore_index=255, resolution="pixels",
                                    max_samples=10**6, pixels_per_token=2, seed=0)
    assert info["used"] == 2 * 15 and X.shape == (30, 6)
    up = F.interpolate(torch.from_numpy(f).permute(2, 0, 1)[None], size=(48, 80), mode="bilinear",
                       align_corners=False)[0].permute(1, 2, 0).reshape(-1, 6).numpy()
    big = np.kron(lab, np.ones((16, 16), int)).ravel()
    # Match each sample to its pixel through the label and the interpolated value.
    d = np.abs(X.astype(np.float32)[:, None, :] - up[None]).max(-1)
    hit = d.argmin(1)
    assert (d.min(1) < 2e-3).all() and (big[hit] == y).all()


def test_split_depends_only_on_the_image_names():
    names = [f"im{i}" for i in range(20)]
    rest, held = image_split(names, 0.2, seed=3, salt=0)
    assert len(held) == 4 and sorted(rest + held) == list(range(20))
    shuffled = names[::-1]
    rest2, held2 = image_split(shuffled, 0.2, seed=3, salt=0)
    assert sorted(shuffled[i] for i in held2) == sorted(names[i] for i in held)
    assert image_split(names, 0.2, seed=4, salt=0)[1] != held
    assert image_split(["a", "b"], 0.01, 0, 0) == ([0], [1]) or image_split(["a", "b"], 0.01, 0, 0) == ([1], [0])


def test_seeded_runs_are_identical(tmp_path):
    rng = np.random.default_rng(2)
    f, lab = _linear_dataset(rng, 8)
    for i in range(8):
        f[i] = f[i] + rng.normal(size=f[i].shape).astype(np.float32) * 2.0      # not perfectly separable
    write_store(tmp_path / "s.h5", f)
    _save_masks(tmp_path / "m", lab)
    with FeatureStore(tmp_path / "s.h5") as st:
        a = semantic_probe(st, tmp_path / "m", SemanticSettings(seed=5, epochs=6))
        b = semantic_probe(st, tmp_path / "m", SemanticSettings(seed=5, epochs=6))
    assert a["results"]["confusion_matrix"] == b["results"]["confusion_matrix"]
    assert a["training"]["train_loss"] == b["training"]["train_loss"]


def test_robustness_store_of_an_equivariant_model_scores_the_same(tmp_path):
    rng = np.random.default_rng(4)
    tf, tl = _linear_dataset(rng, 10)
    vf, vl = _linear_dataset(rng, 4)
    vnames = [f"v{i}.png" for i in range(4)]
    for f in vf:  # make the probe imperfect, so equal scores are not just 1.0 everywhere
        f += rng.normal(size=f.shape).astype(np.float32) * 3
    prov = {"preprocessing": {"size": "native"}}
    write_store(tmp_path / "t.h5", tf, provenance=prov)
    write_store(tmp_path / "v.h5", vf, names=vnames, provenance=prov)
    # An equivariant model: the transformed store (mapped back) holds the same features, in another order.
    write_store(tmp_path / "v.roll.h5", vf[::-1], names=vnames[::-1], provenance={**prov, "transform": "roll:0,3"})
    # A model that is not: other features.
    write_store(tmp_path / "v.flip.h5", [np.ascontiguousarray(f[::-1]) for f in vf], names=vnames,
                provenance={**prov, "transform": "flip-ud"})
    _save_masks(tmp_path / "m", tl)
    _save_masks(tmp_path / "m", vl, names=vnames)
    with FeatureStore(tmp_path / "t.h5") as tr, FeatureStore(tmp_path / "v.h5") as va, \
            FeatureStore(tmp_path / "v.roll.h5") as ro, FeatureStore(tmp_path / "v.flip.h5") as fl:
        res = semantic_probe(tr, tmp_path / "m", SemanticSettings(), val_store=va, robustness=[ro, fl])
    rows = {r["transform"]: r for r in res["robustness"]}
    assert list(rows) == ["identity", "roll:0,3", "flip-ud"]
    assert rows["roll:0,3"]["miou"] == rows["identity"]["miou"] == res["results"]["miou"] < 1.0
    assert rows["roll:0,3"]["delta_miou"] == 0.0
    assert rows["flip-ud"]["miou"] < rows["identity"]["miou"] - 0.1


def test_robustness_stores_must_hold_the_scored_images_at_the_same_grid(tmp_path):
    rng = np.random.default_rng(6)
    tf, tl = _linear_dataset(rng, 6)
    vf, vl = _linear_dataset(rng, 3)
    vnames = [f"v{i}.png" for i in range(3)]
    write_store(tmp_path / "t.h5", tf)
    write_store(tmp_path / "v.h5", vf, names=vnames)
    write_store(tmp_path / "few.h5", vf[:2], names=vnames[:2], provenance={"transform": "flip-lr"})
    write_store(tmp_path / "grid.h5", [np.ascontiguousarray(f.transpose(1, 0, 2)) for f in vf], names=vnames,
                provenance={"transform": "rot90"})
    write_store(tmp_path / "other.h5", vf, names=vnames, provenance={"model": "another", "transform": "rot90"})
    _save_masks(tmp_path / "m", tl)
    _save_masks(tmp_path / "m", vl, names=vnames)
    s = SemanticSettings(head="ridge")
    with FeatureStore(tmp_path / "t.h5") as tr, FeatureStore(tmp_path / "v.h5") as va:
        for bad, msg in (("few.h5", "lacks 1 scored image"), ("grid.h5", "8×6 token grid"),
                         ("other.h5", "another model")):
            with FeatureStore(tmp_path / bad) as b, pytest.raises(PosvitError, match=msg):
                semantic_probe(tr, tmp_path / "m", s, val_store=va, robustness=[b])


# --------------------------------------------------------------------------------------------------------------
# Command line


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and text in lines[0], result.output


def _usage_error(result, text):
    """Click refused the command line (exit 2) before any work, naming ``text``."""
    assert result.exit_code == 2, result.output
    assert text in " ".join(result.output.replace("│", " ").split()), result.output
    assert "Traceback" not in result.output


def _no_created(doc):
    return {k: v for k, v in doc.items() if k not in ("created", "seconds", "training", "command")}


def test_cli_semantic_probe_json_and_file(tmp_path, cli):
    rng = np.random.default_rng(7)
    f, lab = _linear_dataset(rng, 10)
    write_store(tmp_path / "s.h5", f)
    _save_masks(tmp_path / "m", lab)
    out = tmp_path / "sem.json"
    r = cli(["probe", "semantic", tmp_path / "s.h5", "--masks", tmp_path / "m", "--class-names", "a,b,c",
             "--head", "ridge", "-o", out, "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "posvit-semantic-probe-result" and doc["results"]["miou"] == 1.0
    assert set(doc["results"]["iou_per_class"]) == {"a", "b", "c"} and "command" in doc
    assert json.loads(out.read_text())["results"] == doc["results"]
    assert len(doc["split"]["scored_images"]) == 2 and doc["store"]["val"] is None
    r = cli(["probe", "semantic", tmp_path / "s.h5", "--masks", tmp_path / "m", "--head", "ridge"])
    assert r.exit_code == 0 and "mIoU" in r.output and "1.000" in r.output
    assert "deprecated" not in r.output


def test_cli_old_one_command_spelling_warns_and_gives_the_same_json(tmp_path, cli):
    """`posvit probe STORE --masks DIR` (last release) runs the semantic probe, warns once, same document."""
    rng = np.random.default_rng(9)
    f, lab = _linear_dataset(rng, 8)
    write_store(tmp_path / "s.h5", f)
    _save_masks(tmp_path / "m", lab)
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    common = ["--masks", tmp_path / "m", "--class-names", tmp_path / "names.txt", "--head", "ridge", "--json",
              "-q", "--device", "cpu"]
    new = cli(["probe", "semantic", tmp_path / "s.h5", *common])
    old = cli(["probe", tmp_path / "s.h5", *common])
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert "deprecated" not in new.stderr
    warnings = [ln for ln in old.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "use posvit probe semantic STORE --masks DIR" in warnings[0], old.stderr
    new_doc, old_doc = json.loads(new.stdout), json.loads(old.stdout)
    assert old_doc["results"]["miou"] == 1.0 and old_doc["masks"]["class_names"] == ["a", "b", "c"]
    assert _no_created(old_doc) == _no_created(new_doc)
    # the old --semantic flag and the old --batch-size spelling still work, and warn
    flag = cli(["probe", tmp_path / "s.h5", "--semantic", *common, "--batch-size", "64"])
    assert flag.exit_code == 0, flag.output
    assert "--batch-size (tokens per step of the semantic probe) is deprecated" in " ".join(flag.stderr.split())
    flag_doc = json.loads(flag.stdout)
    assert flag_doc["settings"]["batch_size"] == 64 and flag_doc["results"] == new_doc["results"]


def test_cli_options_belong_to_their_subcommand(tmp_path, cli):
    rng = np.random.default_rng(10)
    f, lab = _linear_dataset(rng, 4)
    write_store(tmp_path / "s.h5", f)
    _save_masks(tmp_path / "m", lab)
    s, m = tmp_path / "s.h5", tmp_path / "m"
    for option in (["--targets", "lr"], ["--top-k", "3"], ["--protocol", "holdout"], ["--all-layers"]):
        _usage_error(cli(["probe", "semantic", s, "--masks", m, *option]), f"No such option: {option[0]}")
    _usage_error(cli(["probe", s, "--val", s]), "No such option: --val")
    _usage_error(cli(["probe", "positional", s, "--epochs", "3"]), "No such option: --epochs")
    _usage_error(cli(["probe", "semantic", s]), "Missing option '--masks'")
    _usage_error(cli(["probe", s, "--semantic"]), "Missing option '--masks'")
    _usage_error(cli(["probe", "semantic", s, "--masks", m, "--head", "svm"]), "'svm' is not one of 'linear', 'ridge'")
    _usage_error(cli(["probe", "semantic", s, "--masks", m, "--num-classes", "1"]), "Invalid value for '--num-classes'")


def test_cli_help_lists_the_choices(cli):
    import re

    flat = lambda r: re.sub(r"[\s│]+", " ", r.output)  # noqa: E731
    positional = cli(["probe", "--help"])
    assert positional.exit_code == 0
    for choices in ("holdout|dino-saw", "random|grid|grid-holdout", "ridge|ols"):
        assert choices in flat(positional), choices
    assert "posvit probe semantic" in flat(positional) and "--masks" not in flat(positional).split("semantic")[0]
    semantic = cli(["probe", "semantic", "--help"])
    assert semantic.exit_code == 0
    assert "linear|ridge" in flat(semantic) and "tokens|pixels" in flat(semantic)
    assert "--token-batch" in flat(semantic) and "--targets" not in flat(semantic)
    assert cli(["probe", "positional", "--help"]).output == positional.output


def test_cli_semantic_bad_input(tmp_path, cli):
    rng = np.random.default_rng(8)
    f, lab = _linear_dataset(rng, 4)
    write_store(tmp_path / "s.h5", f)
    write_store(tmp_path / "other.h5", [g[..., :6] for g in f], provenance={"model": "dinov2-s-reg"})
    _save_masks(tmp_path / "m", lab)
    _save_masks(tmp_path / "few", lab[:2])
    s, m = tmp_path / "s.h5", tmp_path / "m"
    sem = ["probe", "semantic"]
    _one_line_error(cli([*sem, s, "--masks", m, "--num-classes", "2"]),
                    "holds label 2, which is ≥ --num-classes 2")
    _one_line_error(cli([*sem, s, "--masks", m, "--val", tmp_path / "other.h5"]),
                    "validation store")
    _one_line_error(cli([*sem, s, "--masks", m, "--val", tmp_path / "other.h5"]), "another model")
    _one_line_error(cli([*sem, s, "--masks", tmp_path / "few"]), "no mask in")
    _one_line_error(cli([*sem, s, "--masks", tmp_path / "nope"]), "does not exist")
    _one_line_error(cli([*sem, s, "--masks", m, "--class-names", "a,b", "--num-classes", "3"]),
                    "2 class names given for --num-classes 3")
    _one_line_error(cli([*sem, s, "--masks", m, "--robustness", tmp_path / "missing.h5"]), "does not exist")
    _one_line_error(cli([*sem, s, "--masks", m, "--val-masks", m]), "--val-masks needs --val")

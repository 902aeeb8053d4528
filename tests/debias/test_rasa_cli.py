"""`posvit debias-train rasa|blank|svd|tta` and `posvit extract --head` end to end on a tiny random ViT:
head files, store-in/store-out cleaning equal to cleaning at extraction, the view cache, and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_MODEL, write_store

from posvit_cli.core.debias.heads import load_head
from posvit_cli.core.features.store import FeatureStore

FAST_RASA = ["--rounds", "2", "--epochs", "1", "--batch-images", "2", "--lr-head", "1e-2", "--threads", "1",
             "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Eight 64×96 greyscale textures (4 × 6 tokens at patch 16)."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(8):
        a = gaussian_filter(rng.random((64, 96)), 2)
        a = (a - a.min()) / (a.max() - a.min())
        Image.fromarray((a * 255).astype(np.uint8)).save(d / f"tex{i}.png")
    return d


@pytest.fixture(scope="module")
def store(images, tmp_path_factory):
    from typer.testing import CliRunner

    from posvit_cli.app import app

    out = tmp_path_factory.mktemp("store") / "s.h5"
    r = CliRunner().invoke(app, ["extract", str(images), "-m", TINY_MODEL, "-w", "random", "--dtype", "float32",
                                 "-o", str(out), "-q", "--threads", "1"])
    assert r.exit_code == 0, r.output
    return out


def _final(path):
    with FeatureStore(path) as s:
        return {r.path: s.features(r.index, "final") for r in s.records}, s.provenance


def test_posmean_head_from_a_store_and_extract_head_equals_cleaning_the_store(images, store, tmp_path, cli):
    head_path = tmp_path / "posmean.safetensors"
    r = cli(["debias-train", "posmean", store, "-o", head_path, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["images"] == 8 and doc["grid"] == [4, 6] and doc["report"]["after"]["xy"] < doc["report"]["before"]["xy"]
    head = load_head(head_path, channels=64)
    raw, _ = _final(store)
    mean_field = np.mean(list(raw.values()), axis=0, dtype=np.float64)
    np.testing.assert_allclose(head.field, mean_field - mean_field.mean(axis=(0, 1)), atol=1e-5)
    at_extraction, from_store = tmp_path / "a.h5", tmp_path / "b.h5"
    r = cli(["extract", images, "-m", TINY_MODEL, "-w", "random", "--dtype", "float32", "--head", head_path,
             "-o", at_extraction, "-q", "--threads", "1"])
    assert r.exit_code == 0, r.output
    r = cli(["extract", store, "--head", head_path, "-o", from_store, "-q"])
    assert r.exit_code == 0, r.output
    (a, prov_a), (b, prov_b) = _final(at_extraction), _final(from_store)
    for path, f in raw.items():
        expected = head.apply_numpy(f)
        assert np.allclose(a[path], expected, atol=1e-5) and np.allclose(b[path], expected, atol=1e-5)
    assert prov_a["debias"][-1]["method"] == prov_b["debias"][-1]["method"] == "posmean"


def test_rasa_head_from_a_store_and_extract_head_equals_cleaning_the_store(images, store, tmp_path, cli):
    head_path = tmp_path / "rasa.safetensors"
    r = cli(["debias-train", "rasa", store, "-o", head_path, "--json", *FAST_RASA])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["planes"] == 2 and doc["images"] == 8 and doc["tokens"] == 8 * 24 and len(doc["rounds"]) == 2
    assert set(doc["report"]["before"]) == {"lr", "ud", "diag", "radial", "xy"}
    assert "round 2/2" in r.stderr and "coordinate MSE" in r.stderr
    head = load_head(head_path, channels=64)
    assert head.info["backbone"]["model"] == TINY_MODEL and head.info["training"]["rounds"] == 2
    assert head.info["input"]["grids"] == {"4x6": 8} and head.info["input"]["size"] == [64, 96] and head.info["command"].startswith("posvit")

    at_extraction = tmp_path / "a.h5"
    r = cli(["extract", images, "-m", TINY_MODEL, "-w", "random", "--dtype", "float32", "--head", head_path,
             "-o", at_extraction, "-q", "--threads", "1"])
    assert r.exit_code == 0, r.output
    from_store = tmp_path / "b.zarr"
    r = cli(["extract", store, "--head", head_path, "-o", from_store, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["images"] == 8
    raw, _ = _final(store)
    a, prov_a = _final(at_extraction)
    b, prov_b = _final(from_store)
    for path, f in raw.items():
        expected = head.apply_numpy(f)
        assert np.allclose(a[path], expected, atol=1e-5) and np.allclose(b[path], expected, atol=1e-5)
        assert np.abs(expected - f).max() > 1e-3
    for prov in (prov_a, prov_b):
        assert prov["debias"][-1]["method"] == "rasa" and prov["debias"][-1]["head"] == str(head_path)
    assert prov_b["model"] == TINY_MODEL and prov_b["debias"][-1]["applied_to_store"] == str(store)


def test_franca_format_output_reads_back(store, tmp_path, cli):
    r = cli(["debias-train", "rasa", store, "-o", tmp_path / "h.pth", "--head-format", "franca",
             "--exact", "--report-images", "0", "-q", *FAST_RASA])
    assert r.exit_code == 0, r.output
    assert "cannot mark a head exact" in r.output
    import torch

    sd = torch.load(tmp_path / "h.pth", weights_only=True)
    assert sorted(sd) == ["pos_pred.weight", "pre_pos_layers.0.weight"] and sd["pos_pred.weight"].shape == (2, 64)
    assert load_head(tmp_path / "h.pth", channels=64).rounds == 2


def test_rasa_from_images_extracts_views_once(images, tmp_path, cli):
    out = tmp_path / "h.safetensors"
    args = ["debias-train", "rasa", images, "-m", TINY_MODEL, "-w", "random", "--crop", "48",
            "--report-images", "0", "-q", *FAST_RASA]
    r = cli([*args, "--views", "2", "-o", out])
    assert r.exit_code == 0, r.output
    with FeatureStore(tmp_path / "h.views.h5") as views:
        assert len(views) == 16 and {r.grid for r in views.records} == {(3, 3)}
        assert views.records[1].path.endswith("tex0.png#view1")
        rot = views.provenance["augmentation"]["rotation"]
        assert rot["p"] == 0.5 and rot["degrees"] == [-90, 90] and rot["angles"] == "any"
        assert rot["interpolation"] == "nearest" and rot["fill"] == 0 and views.provenance["views"] == 2
    assert load_head(out).info["input"]["images"] == 16
    r = cli([*args, "--views", "2", "-o", out, "--overwrite"])  # the same seed draws the same views
    assert r.exit_code == 0, r.output
    # --rotation quarter-turns reaches the views (the earlier ±90° rotations) and is recorded.
    r = cli([*args, "--rotation", "quarter-turns", "--cache", tmp_path / "q.h5", "-o", tmp_path / "hq.safetensors"])
    assert r.exit_code == 0, r.output
    with FeatureStore(tmp_path / "q.h5") as views:
        assert views.provenance["augmentation"]["rotation"]["angles"] == "quarter-turns"
    _usage_error(cli([*args, "--rotation", "d4", "-o", tmp_path / "hd.safetensors"]), "--rotation")
    # Without augmentation a view is the short-side resize + centre crop that `extract --size crop:48` makes.
    r = cli([*args, "--no-augment", "--cache", tmp_path / "plain.h5", "-o", tmp_path / "h2.safetensors"])
    assert r.exit_code == 0, r.output
    r = cli(["extract", images, "-m", TINY_MODEL, "-w", "random", "--size", "crop:48", "--dtype", "float32",
             "-o", tmp_path / "ref.h5", "-q", "--threads", "1"])
    assert r.exit_code == 0, r.output
    plain, _ = _final(tmp_path / "plain.h5")
    ref, _ = _final(tmp_path / "ref.h5")
    assert plain.keys() == ref.keys()
    assert all(np.allclose(plain[k], ref[k], atol=2e-2) for k in ref)  # cache stored as float16
    r = cli([*args, "--cache", tmp_path / "h.views.h5", "-o", tmp_path / "other.safetensors"])
    assert r.exit_code == 2 and "view cache" in r.output and "exists" in r.output


def _ramp_store(path, n=4, h=9, w=11, C=16):
    rng = np.random.default_rng(0)
    grids = []
    for _ in range(n):
        f = rng.normal(size=(h, w, C)).astype(np.float32)
        f[..., 3] = np.linspace(0, 1, w)[None, :]
        f[..., 7] = np.linspace(0, 1, h)[:, None]
        grids.append(f)
    return write_store(path, grids)


def test_blank_from_the_store_a_list_and_a_probe_result(tmp_path, cli):
    from posvit_cli.core.measure.probe import make_settings, probe_store, write_probe_result

    s = _ramp_store(tmp_path / "s.h5")
    r = cli(["debias-train", "blank", s, "--blank", "auto", "--top-k", "1", "-o", tmp_path / "a.safetensors",
             "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {3, 7} <= set(doc["channels_zeroed"]) and doc["report"]["after"]["xy"] < doc["report"]["before"]["xy"]
    # the before/after R² says how it was measured (fewer images, a raised fraction on tiny grids)
    n = doc["report"]["images"]
    assert doc["report"]["protocol"] == (f"holdout probe, {n} images, fraction {doc['report']['fraction']:.3g}, "
                                         "6 repeats, seed 0")
    shown = cli(["debias-train", "blank", s, "--blank", "auto", "-o", tmp_path / "shown.safetensors"])
    assert "R2 protocol" in shown.stderr and "holdout probe" in shown.stderr
    r = cli(["debias-train", "blank", "--blank", "1,2", "-o", tmp_path / "b.safetensors", "-q"])
    assert r.exit_code == 0, r.output
    assert load_head(tmp_path / "b.safetensors").channels_zeroed == [1, 2]
    with FeatureStore(s) as fs:
        write_probe_result(tmp_path / "p.json", probe_store(fs, make_settings(extras=False)[0]))
    r = cli(["debias-train", "blank", "--blank", tmp_path / "p.json", "--top-k", "1",
             "-o", tmp_path / "c.safetensors", "--json", "-q"])
    assert r.exit_code == 0, r.output
    head = load_head(tmp_path / "c.safetensors", channels=16)
    assert {3, 7} <= set(head.channels_zeroed) and head.channels == 16
    r = cli(["extract", s, "--head", tmp_path / "c.safetensors", "-o", tmp_path / "clean.h5", "-q"])
    assert r.exit_code == 0, r.output
    clean, _ = _final(tmp_path / "clean.h5")
    assert all(np.abs(f[..., head.channels_zeroed]).max() == 0 for f in clean.values())


def test_svd_from_the_store_provenance(store, tmp_path, cli):
    r = cli(["debias-train", "svd", store, "--rank", "4", "-o", tmp_path / "svd.safetensors", "--json",
             "-q", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["size"] == [64, 96] and doc["rank"] == 4 and 0 < doc["explained"] <= 1
    head = load_head(tmp_path / "svd.safetensors", channels=64)
    assert head.method == "svd" and head.exact and head.planes.shape == (1, 4, 64)
    r = cli(["debias-train", "svd", "-m", TINY_MODEL, "-w", "random", "--size", "32x48", "--rank", "3",
             "-o", tmp_path / "svd2.safetensors", "--json", "-q", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["size"] == [32, 48]


def test_tta_head_at_extraction_on_a_roll_equivariant_model(images, tmp_path, cli):
    r = cli(["debias-train", "tta", "--transform", "rolls:2", "-o", tmp_path / "tta.safetensors", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["transforms"] == ["identity", "roll:0,1", "roll:1,0", "roll:1,1"]
    base = ["extract", images / "tex0.png", images / "tex1.png", "-m", TINY_MODEL, "-w", "random", "--dtype", "float32",
            "-q", "--threads", "1"]
    outs = {}
    for name, extra in {"alibi": ["--method", "alibi"], "alibi_tta": ["--method", "alibi", "--head", tmp_path /
                        "tta.safetensors"], "plain": [], "plain_tta": ["--head", tmp_path / "tta.safetensors"]}.items():
        r = cli([*base, *extra, "-o", tmp_path / f"{name}.h5"])
        assert r.exit_code == 0, r.output
        outs[name] = _final(tmp_path / f"{name}.h5")[0]
    for k in outs["alibi"]:
        assert np.allclose(outs["alibi_tta"][k], outs["alibi"][k], atol=1e-4)
        assert np.abs(outs["plain_tta"][k] - outs["plain"][k]).max() > 1e-2
    assert _final(tmp_path / "alibi_tta.h5")[1]["debias"][0]["transforms"] == ["identity", "roll:0,1", "roll:1,0",
                                                                               "roll:1,1"]
    r = cli(["extract", tmp_path / "alibi.h5", "--head", tmp_path / "tta.safetensors", "-o", tmp_path / "x.h5"])
    assert r.exit_code == 2 and "extract the images again" in r.output


def test_tta_report_on_images(images, tmp_path, cli):
    r = cli(["debias-train", "tta", images, "-m", TINY_MODEL, "-w", "random", "--transform", "flips",
             "--report-images", "2", "-o", tmp_path / "t.safetensors", "--json", "-q", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["report"]["images"] == 2


def _one_line_error(r, *fragments):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in r.output, r.output


def _usage_error(r, *fragments):
    """A bad option: exit 2 and one `error:` line naming the offending option; no usage box, no traceback."""
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and r.output.count("\n") == 1 and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in r.output, r.output


def test_bad_inputs_exit_2_with_one_line(images, store, tmp_path, cli):
    out = tmp_path / "h.safetensors"
    _usage_error(cli(["debias-train", "rasa", "-o", out, store, "--rounds", "0"]), "--rounds", "greater than or equal to 1")
    _usage_error(cli(["debias-train", "rasa", "-o", out, store, "--token-fraction", "2"]), "--token-fraction")
    _one_line_error(cli(["debias-train", "rasa", "-o", out, store, "--token-fraction", "0"]), "--token-fraction")
    _one_line_error(cli(["debias-train", "tta", "-o", out, "--transform", "spin"]), "unknown transform 'spin'")
    # franca holds RASA planes only: the other heads have no --head-format, and a misspelt option is an error
    _usage_error(cli(["debias-train", "blank", "-o", out, "--head-format", "franca"]), "No such option", "--head-format")
    _usage_error(cli(["debias-train", "rasa", "-o", out, store, "--head-format", "onnx"]), "--head-format", "onnx")
    _one_line_error(cli(["debias-train", "blank", "-o", out, "--blank", tmp_path / "missing.json"]), "does not exist")
    _one_line_error(cli(["debias-train", "blank", "-o", out, store, "--blank", "none"]), "nothing to blank")
    _one_line_error(cli(["debias-train", "blank", "-o", out, store, "--blank", "70"]), "channel 70")
    _usage_error(cli(["debias-train", "svd", "-o", out, "--rank", "0", store]), "--rank", "greater than or equal to 1")
    _one_line_error(cli(["debias-train", "rasa", "-o", out, TINY_MODEL + ".png", "--views", "2", "--no-augment"]), "--views")
    _one_line_error(cli(["debias-train", "rasa", store, "-o", tmp_path / "h.onnx"]), ".safetensors")
    _one_line_error(cli(["debias-train", "blank", "-o", tmp_path / "h.pth"]), "RASA planes only")
    _one_line_error(cli(["debias-train", "rasa", store, "-o", tmp_path / "h.pth"]), "--head-format franca")
    _one_line_error(cli(["debias-train", "tta", "-o", out, store]), "tta runs the encoder")
    write_store(tmp_path / "b3.h5", [np.zeros((3, 3, 8), np.float32)], layers=("block3",))
    _one_line_error(cli(["debias-train", "rasa", "-o", out, tmp_path / "b3.h5"]), "--layers final")
    synthetic = write_store(tmp_path / "syn.h5", [np.random.default_rng(0).normal(size=(3, 3, 8)).astype(np.float32)])
    _one_line_error(cli(["debias-train", "svd", "-o", out, synthetic]), "does not name the encoder")
    out.write_bytes(b"")
    _one_line_error(cli(["debias-train", "blank", "-o", out, "--blank", "1"]), "exists", "--overwrite")
    # A head of another width: refused at extraction and when cleaning a store.
    from posvit_cli.core.debias.heads import ProjectionHead, save_head

    wide = save_head(ProjectionHead(np.ones((1, 2, 384), np.float32), info={"backbone": {"model": "dinov2-s-reg"}}),
                     tmp_path / "wide.safetensors")
    _one_line_error(cli(["extract", store, "--head", wide, "-o", tmp_path / "c.h5"]), "384-channel", "64 channels")
    _one_line_error(cli(["extract", images, "-m", TINY_MODEL, "-w", "random", "--head", wide, "-o",
                         tmp_path / "d.h5"]), "384-channel")
    _one_line_error(cli(["extract", store, "--head", tmp_path / "nothing.safetensors", "-o", tmp_path / "e.h5"]),
                    "does not exist")
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "c.h5.partial").exists()


def test_deprecated_method_option_works_and_warns(store, tmp_path, cli):
    """`--method X` (anywhere, or `--method=X`) still reaches subcommand X for one release, with one warning line."""
    r = cli(["debias-train", "--method", "rasa", store, "-o", tmp_path / "r.safetensors", "--json", *FAST_RASA])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["planes"] == 2
    warned = [ln for ln in r.stderr.splitlines() if "is deprecated" in ln]
    assert warned == ["warning: `posvit debias-train --method rasa` is deprecated and will be removed in the next "
                      "release: use `posvit debias-train rasa`"], r.stderr
    r = cli(["debias-train", store, "--method=blank", "--blank", "1,2", "-o", tmp_path / "b.safetensors", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["channels_zeroed"] == [1, 2]
    assert "`posvit debias-train --method blank` is deprecated" in r.stderr
    r = cli(["debias-train", "-o", tmp_path / "s.safetensors", "--method", "svd", store, "--rank", "2", "--json",
             "--report-images", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rank"] == 2 and "`posvit debias-train --method svd` is deprecated" in r.stderr
    r = cli(["debias-train", "--method", "tta", "--transform", "flips", "-o", tmp_path / "t.safetensors", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["transforms"] == ["identity", "flip-lr", "flip-ud"]
    assert "`posvit debias-train --method tta` is deprecated" in r.stderr


def test_missing_method_says_which_methods_take_a_store_or_images(images, store, tmp_path, cli):
    """No method: one line naming the methods for a store and for images, exit 2, nothing written."""
    out = tmp_path / "x.safetensors"
    for first, example in ((store, f"posvit debias-train rasa {store}"), (images, f"posvit debias-train alibi {images}")):
        r = cli(["debias-train", first, "-o", out])
        _one_line_error(r, "name the method first", "rasa, blank, svd, posmean take a feature store", "alibi and nope take images",
                        example)
    r = cli(["debias-train", "-o", out, store])
    _one_line_error(r, "name the method first")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unknown_option_is_a_usage_error_not_swallowed(store, tmp_path, cli):
    out = tmp_path / "h.safetensors"
    _usage_error(cli(["debias-train", "rasa", store, "-o", out, "--round", "2"]), "No such option", "--round")
    # An option of another method is refused by this one.
    _usage_error(cli(["debias-train", "blank", store, "-o", out, "--rank", "4"]), "No such option", "--rank")
    _usage_error(cli(["debias-train", "svd", store, "-o", out, "--blank", "1"]), "No such option", "--blank")
    _usage_error(cli(["debias-train", "tta", "-o", out, "--rounds", "2"]), "No such option", "--rounds")
    assert not out.exists()


@pytest.mark.parametrize("method, fragments", [
    ("alibi", ["constant", "geometric", "learned", "euclidean", "manhattan", "cosine", "mse", "fp32", "bf16"]),
    ("nope", ["cosine", "mse", "x>=1", "0<=x<=1"]),
    ("rasa", ["tokens", "images-in-order", "posvit", "franca", "x>=1", "0<=x<=1"]),
    ("blank", ["--top-k", "x>=1", "--report-images", "x>=0"]),
    ("svd", ["--rank", "x>=1", "fp32", "bf16"]),
    ("tta", ["--transform", "reference", "fp32", "bf16"]),
])
def test_subcommand_help_lists_its_choices(method, fragments):
    from typer.testing import CliRunner

    from posvit_cli.app import app

    # A wide terminal keeps Rich from breaking a choice list across lines.
    r = CliRunner().invoke(app, ["debias-train", method, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert r.exit_code == 0, r.output
    for f in fragments:
        assert f in r.output, (f, r.output)


def test_tta_old_transforms_spelling_still_works_and_warns(tmp_path, cli):
    new = cli(["debias-train", "tta", "--transform", "flips", "-o", tmp_path / "a.safetensors", "--json"])
    old = cli(["debias-train", "tta", "--transforms", "flips", "-o", tmp_path / "b.safetensors", "--json"])
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert json.loads(old.stdout)["transforms"] == json.loads(new.stdout)["transforms"] == [
        "identity", "flip-lr", "flip-ud"]
    assert "--transforms is deprecated" in old.stderr and "use --transform" in old.stderr
    assert "deprecated" not in new.stderr

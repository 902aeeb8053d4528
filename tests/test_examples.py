"""The example data generator, the shipped example set and the shipped encoder (posvit-tiny)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import REPO
from posvit_cli.core.synthetic import acquisition, fields, structures
from posvit_cli.core.synthetic import generate as syn
from posvit_cli.core.io.images import read_image
from posvit_cli.core.io.labels import decode_labels

DATA = REPO / "examples" / "data"
MODELS = REPO / "examples" / "models"
CARD_JSON = MODELS / "posvit-tiny.probe.json"


def _script(name: str):
    """Import a script from ``examples/`` (scripts are not installed; the tests run from the repository)."""
    spec = importlib.util.spec_from_file_location(f"_examples_{name}", REPO / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def manifest():
    return json.loads((DATA / "manifest.json").read_text())


@pytest.fixture(scope="module")
def card():
    return json.loads(CARD_JSON.read_text())


# --------------------------------------------------------------------------------------------------------------
# The generator


@pytest.mark.parametrize("kind", structures.KINDS)
def test_same_seed_gives_identical_arrays_and_another_seed_differs(kind):
    a = syn.make_sample(kind, 96, seed=3, ramp_max=0.2)
    b = syn.make_sample(kind, 96, seed=3, ramp_max=0.2)
    c = syn.make_sample(kind, 96, seed=4, ramp_max=0.2)
    assert a.image.dtype == np.uint8 and a.image.shape == (96, 96)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.params == b.params
    assert not np.array_equal(a.image, c.image)
    if kind in structures.STRUCTURE_KINDS:
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.scribbles, b.scribbles)
    else:
        assert a.mask is None and a.scribbles is None


def test_unknown_kind_is_a_one_line_user_error():
    from posvit_cli.core.errors import PosvitError

    with pytest.raises(PosvitError, match="unknown kind 'grain'.*grains"):
        syn.make_sample("grain", 64, seed=0)


def test_scribble_settings_do_not_change_the_image():
    a = syn.make_sample("grains", 96, seed=5)
    b = syn.make_sample("grains", 96, seed=5, scribble_options={"strokes_per_class": 7, "width": 1})
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.scribbles, b.scribbles)


@pytest.mark.parametrize("kind", structures.STRUCTURE_KINDS)
def test_flat_structure_is_its_mask(kind):
    """With within-class texture off, every class is one grey level: the image and the mask are the same partition."""
    s = structures.make_structure(kind, (160, 192), np.random.default_rng(11), texture=0.0)
    k = len(structures.CLASS_NAMES[kind])
    assert s.mask.shape == (160, 192) and s.mask.dtype == np.uint8
    assert set(np.unique(s.mask)) == set(range(k))  # every class present, nothing unassigned
    levels = np.asarray(s.params["levels"], np.float32)
    assert len(np.unique(levels)) == k
    np.testing.assert_array_equal(s.clean, levels[s.mask])
    per_level = [(s.clean == levels[c]).sum() for c in range(k)]
    np.testing.assert_array_equal(per_level, np.bincount(s.mask.ravel(), minlength=k))
    # An ideal microscope (no blur, no noise, linear response) keeps the classes apart at 8 bits.
    img = acquisition.to_uint8(acquisition.acquire(s.clean, acquisition.Acquisition(blur_sigma=0.0, noise_sigma=0.0), np.random.default_rng(0)))
    np.testing.assert_array_equal(img, acquisition.to_uint8(levels)[s.mask])


def test_pore_count_is_exact_and_particle_coverage_follows_the_boolean_model():
    H, W = 384, 320
    s = structures.particle_structure((H, W), np.random.default_rng(2), radius=10.0, particle_fraction=0.45,
                               pore_fraction=0.12, texture=0.0)
    counts = np.bincount(s.mask.ravel(), minlength=3)
    assert counts.sum() == H * W
    assert counts[2] == round(0.12 * H * W)  # pores: the lowest pixels of a field outside the particles
    assert abs(counts[1] / (H * W) - 0.45) < 0.05


def test_grain_phase_fraction_and_boundary_width():
    s = structures.grain_structure((512, 512), np.random.default_rng(4), grain_size=24.0, phase_fraction=0.3,
                            boundary_width=4.0, texture=0.0)
    counts = np.bincount(s.mask.ravel(), minlength=3)
    assert abs(counts[1] / (counts[0] + counts[1]) - 0.3) < 0.06
    # A boundary 4 px wide around grains of mean diameter 24 px covers about 4 * perimeter / area ≈ 0.3.
    assert 0.2 < counts[2] / counts.sum() < 0.45
    thin = structures.grain_structure((512, 512), np.random.default_rng(4), grain_size=24.0, boundary_width=2.0, texture=0.0)
    assert (thin.mask == 2).sum() < 0.7 * counts[2]


def test_voronoi_and_fields_live_on_a_torus():
    """Shifting the seeds by (dy, dx) rolls the tessellation by (dy, dx): no edge or position is special."""
    rng = np.random.default_rng(0)
    seeds = rng.random((40, 2)) * [90, 120]
    lab = fields.voronoi_labels((90, 120), seeds)
    shifted = fields.voronoi_labels((90, 120), (seeds + [30, 77]) % [90, 120])
    np.testing.assert_array_equal(np.roll(lab, (30, 77), axis=(0, 1)), shifted)
    # A field is periodic: its wrap-around differences are as small as its interior ones.
    f = fields.gaussian_field((128, 128), rng, fields.smooth_amplitude(4.0))
    inner = np.abs(np.diff(f, axis=1)).mean()
    assert np.abs(f[:, 0] - f[:, -1]).mean() < 2 * inner


@pytest.mark.parametrize("kind", structures.STRUCTURE_KINDS)
def test_scribbles_lie_inside_their_class_away_from_boundaries(kind):
    s = syn.make_sample(kind, 256, seed=8)
    k = len(s.class_names)
    assert s.scribbles.max() <= k
    for c in range(k):
        stroke = s.scribbles == c + 1
        assert stroke.any(), f"class {s.class_names[c]} has no scribble"
        assert np.all(s.mask[stroke] == c)
        inside = s.mask == c
        # Where the class is wide, strokes keep 4 - 1 = 3 px (centre-line margin minus half the stroke width)
        # from other classes.
        core = ndi.minimum_filter(inside, size=2 * 4 + 1, mode="wrap")
        if core.sum() >= 0.25 * inside.sum():
            assert np.all(ndi.minimum_filter(inside, size=2 * 3 + 1, mode="wrap")[stroke])
    assert 0.002 < (s.scribbles > 0).mean() < 0.08


# --------------------------------------------------------------------------------------------------------------
# The shipped example set


def test_shipped_set_matches_its_manifest(manifest):
    images = manifest["images"]
    assert {e["kind"] for e in images} == set(structures.KINDS)
    for e in images:
        img = read_image(DATA / e["file"])
        assert img.dtype == np.uint8 and img.shape == tuple(e["size"])
        if e["kind"] in structures.STRUCTURE_KINDS:
            mask = decode_labels(DATA / e["mask"])
            scrib = decode_labels(DATA / e["scribbles"])
            k = len(e["class_names"])
            assert mask.shape == scrib.shape == img.shape
            assert np.bincount(mask.ravel(), minlength=k).tolist() == e["class_pixels"]
            assert scrib.max() <= k and np.bincount(scrib.ravel(), minlength=k + 1)[1:].tolist() == e["scribble_pixels"]
            labelled = scrib > 0
            assert np.all(mask[labelled] == scrib[labelled] - 1)
        else:
            assert e["file"].startswith("textures/") and "mask" not in e
    stems = sorted(p.stem for p in (DATA / "micrographs").glob("*.png"))
    assert stems == sorted(p.stem for p in (DATA / "masks").glob("*.png"))
    assert stems == sorted(p.stem for p in (DATA / "scribbles").glob("*.png"))


def test_shipped_set_regenerates_from_its_seeds(manifest):
    """The README's regeneration command is honest: each kind's first 256² image comes back from its seed."""
    seen = set()
    for e in manifest["images"]:
        if e["kind"] in seen or e["size"] != [256, 256]:
            continue
        seen.add(e["kind"])
        s = syn.make_sample(e["kind"], 256, e["seed"], ramp_max=e["ramp_max"])
        shipped = read_image(DATA / e["file"]).astype(int)
        # FFT round-off may move a rare pixel across a grey level on another platform.
        assert np.mean(np.abs(shipped - s.image) > 1) < 1e-3
        if e["kind"] in structures.STRUCTURE_KINDS:
            np.testing.assert_array_equal(decode_labels(DATA / e["mask"]), s.mask)
            np.testing.assert_array_equal(decode_labels(DATA / e["scribbles"]), s.scribbles)
    assert seen == set(structures.KINDS)


# --------------------------------------------------------------------------------------------------------------
# The shipped encoder


def test_shipped_encoder_loads_offline_with_its_training_normalisation(card):
    from posvit_cli.core.features.encoders import bundled_weights_path, load_encoder, read_checkpoint_meta

    enc = load_encoder("posvit-tiny")
    assert enc.weights == "bundled:posvit-tiny.safetensors"
    assert (enc.patch_size, enc.embed_dim, enc.depth, enc.in_chans, enc.num_prefix_tokens) == (8, 192, 6, 1, 1)
    meta = read_checkpoint_meta(bundled_weights_path("posvit-tiny.safetensors"))
    assert meta["timm_name"] == "vit_tiny_patch16_224"
    assert meta["training"]["steps"] == card["training"]["steps"]
    assert enc.mean == (pytest.approx(meta["mean"][0]),) and 0.2 < enc.mean[0] < 0.8
    from safetensors import safe_open

    with safe_open(str(bundled_weights_path("posvit-tiny.safetensors")), framework="pt") as f:
        assert f.get_tensor("pos_embed").dtype.is_floating_point and str(f.get_tensor("pos_embed").dtype) == "torch.float16"
    assert bundled_weights_path("posvit-tiny.safetensors").stat().st_size < 8e6


def test_cli_extract_with_the_shipped_encoder_reproduces_the_model_card(tmp_path, card, cli):
    """`posvit extract TEXTURES --model posvit-tiny` works offline with no other flag and gives the card's bias."""
    from posvit_cli.core.measure.probe import stack_r2
    from posvit_cli.core.features.store import FeatureStore

    out = tmp_path / "tex.h5"
    r = cli(["extract", DATA / "textures", "--model", "posvit-tiny", "-o", out, "--quiet"])
    assert r.exit_code == 0, r.output
    probe = {k: card["probe"][k] for k in ("alpha", "fraction", "repeats")}
    expected = card["conditions"]["trained"]
    with FeatureStore(out) as store:
        assert len(store) == 12
        assert store.provenance["weights"] == "bundled:posvit-tiny.safetensors"
        per_image = {}
        for i, rec in enumerate(store.records):
            f = store.features(i, "final")
            assert list(f.shape) == expected["grid"] + [192]
            per_image[rec.name] = stack_r2(f, card["targets"], **probe, seed=i)
    for t in card["targets"]:
        got = np.mean([v[t] for v in per_image.values()])
        assert got == pytest.approx(expected["mean"][t], abs=0.02), t
    for name, v in per_image.items():
        assert v["xy"] == pytest.approx(expected["per_image_xy"][name], abs=0.05), name


def test_controls_reproduce_the_model_card(card):
    """The untrained and the pos_embed-zeroed encoders give the card's (far lower) numbers on the same images."""
    import timm

    from posvit_cli.core.measure.probe import stack_r2

    mod = _script("train_tiny_encoder")
    encs = mod.card_encoders()
    probe = {k: card["probe"][k] for k in ("alpha", "fraction", "repeats")}
    paths = sorted((DATA / "textures").glob("*.png"))[::4]  # 3 of the 12 images keep this test quick
    # The untrained control is timm's seeded random initialisation: its exact numbers hold under the same timm.
    same_init = timm.__version__ == card["versions"]["timm"]
    for name in ("trained", "untrained", "pos_embed_zeroed"):
        expected = card["conditions"][name]["per_image_xy"]
        got = {}
        for img, f in mod.extract_folder(encs[name], paths).items():
            seed = list(expected).index(img)  # the card seeds each probe with the image's index among all 12
            got[img] = stack_r2(f, ("xy",), **probe, seed=seed)["xy"]
        if name == "untrained" and not same_init:
            assert np.mean(list(got.values())) < 0
            continue
        for img, value in got.items():
            assert value == pytest.approx(expected[img], abs=0.05), (name, img)
    c = card["conditions"]
    assert c["trained"]["mean"]["xy"] > 0.9
    assert c["untrained"]["mean"]["xy"] < 0 and c["pos_embed_zeroed"]["mean"]["xy"] < 0
    assert c["trained"]["xy_native"] > c["untrained"]["xy_native"] + 0.5


# --------------------------------------------------------------------------------------------------------------
# The training script


def test_training_resumes_exactly(tmp_path):
    """A run stopped after 2 steps and resumed ends with the same weights as an uninterrupted 4-step run."""
    import torch

    mod = _script("train_tiny_encoder")
    common = ["--images", "10", "--batch", "4", "--steps", "4", "--warmup", "2", "--log-every", "1",
              "--probe-every", "100", "--checkpoint-every", "2", "--threads", "1", "--probe-images", "2",
              "--data-cache", str(tmp_path / "data.npz")]
    assert mod.main(["train", "--workdir", str(tmp_path / "a"), *common]) == 0
    assert mod.main(["train", "--workdir", str(tmp_path / "b"), *common, "--stop-after", "2"]) == 0
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert mod.main(["train", "--workdir", str(tmp_path / "b"), *common]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key, value in a["mae"].items():
        assert torch.equal(value, b["mae"][key]), key
    rows_a = (tmp_path / "a" / "loss.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert len(rows_a) == len(rows_b) == 5
    assert [r.split(",")[1] for r in rows_a] == [r.split(",")[1] for r in rows_b]  # identical losses
    out = tmp_path / "tiny.safetensors"
    assert mod.main(["export", "--workdir", str(tmp_path / "a"), "--out", str(out)]) == 0
    from posvit_cli.core.features.encoders import load_encoder

    enc = load_encoder(None, out)
    assert enc.name == "posvit-tiny" and enc.mean[0] == pytest.approx(a["config"]["mean"])

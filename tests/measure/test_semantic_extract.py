"""`posvit extract --transform` and `--size` lists end to end: features of transformed images mapped back to the
original frame on odd/even, square/non-square grids; roll-equivariant models; the resolution sweep's stores;
the robustness table of `posvit probe semantic --masks --robustness` on real extractions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from posvit_cli.core.features.encoders import load_encoder
from posvit_cli.core.io.images import read_image, to_channels, to_float
from posvit_cli.core.io.preprocess import parse_size, resize_and_normalise
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.io.transforms import parse_transform

# Token grids 5×7 (odd, non-square), 3×3 (odd, square), 4×6 (even, non-square), 4×4 (even, square); patch 16.
SIZES = {"odd_rect": (80, 112), "odd_square": (48, 48), "even_rect": (64, 96), "even_square": (64, 64)}
SPECS = ["flip-ud", "flip-lr", "rot90", "rot90:3", "roll:1,2", "roll:-2,3", "flip-lr+rot90"]


@pytest.fixture
def grid_images(tmp_path):
    d = tmp_path / "grids"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).save(d / f"{name}.png")
    return d


def _direct(path, encoder, transform):
    img = to_channels(to_float(read_image(path)), encoder.in_chans)
    x, _ = resize_and_normalise(img, parse_size("native"), encoder.patch_size, encoder.mean, encoder.std)
    with torch.inference_mode():
        moved = transform.apply(x[None])
        tokens = encoder.forward_tokens(moved, ["final"])[0]["final"]
    return tokens, transform.invert_tokens(tokens)[0].numpy()


def test_transformed_features_are_mapped_back_on_every_grid(tmp_path, grid_images, cli):
    out = tmp_path / "t.h5"
    r = cli(["extract", grid_images, "-m", TINY_MODEL, "-w", "random", "--transform", ",".join(SPECS), "-o", out,
             "--dtype", "float32", "--device", "cpu", "-q", "--json"])  # compared with CPU below
    assert r.exit_code == 0, r.output
    stores = json.loads(r.stdout)["stores"]
    assert [s["transform"] for s in stores] == [parse_transform(s).spec for s in SPECS]
    enc = load_encoder(TINY_MODEL, "random")
    for s in stores:
        t = parse_transform(s["transform"], patch=16)
        with FeatureStore(s["output"]) as st:
            assert st.provenance["transform"] == t.spec
            for rec in st.records:
                h, w = SIZES[rec.name][0] // 16, SIZES[rec.name][1] // 16
                raw, back = _direct(rec.path, enc, t)
                # The encoder saw the transformed grid (transposed after an odd number of quarter turns) ...
                assert tuple(raw.shape[1:3]) == t.grid_after(h, w)
                # ... and the store holds it mapped back to the original frame.
                assert rec.grid == (h, w) and rec.proc_size == SIZES[rec.name]
                np.testing.assert_allclose(st.features(rec.index), back, atol=1e-4, rtol=1e-4)
                np.testing.assert_array_equal(t.invert_tokens(t.apply_tokens(torch.from_numpy(back)[None]))[0].numpy(),
                                              back)


@pytest.mark.parametrize("method", ["alibi", "nope"])
def test_a_roll_equivariant_model_gives_identical_features_for_every_roll(tmp_path, grid_images, cli, method):
    out = tmp_path / "r.h5"
    r = cli(["extract", grid_images, "-m", TINY_MODEL, "-w", "random", "--method", method, "--transform",
             "rolls:3,roll:-1,5", "-o", out, "--dtype", "float32", "-q", "--json"])
    assert r.exit_code == 0, r.output
    stores = {s["transform"]: s["output"] for s in json.loads(r.stdout)["stores"]}
    assert len(stores) == 10 and stores["identity"].endswith("r.h5")
    with FeatureStore(stores.pop("identity")) as base:
        assert base.provenance["transform"] is None
        for spec, path in stores.items():
            with FeatureStore(path) as st:
                for rec in st.records:
                    np.testing.assert_allclose(st.features(rec.index), base.features(rec.index), atol=2e-5)
    # The same rolls with the learned position embedding kept are not equivariant (the check can fail).
    r = cli(["extract", grid_images / "odd_rect.png", "-m", TINY_MODEL, "-w", "random", "--transform",
             "identity,roll:1,2", "-o", tmp_path / "p.h5", "--dtype", "float32", "-q"])
    assert r.exit_code == 0, r.output
    with FeatureStore(tmp_path / "p.h5") as a, FeatureStore(tmp_path / "p.roll-1_2.h5") as b:
        assert np.abs(a.features(0) - b.features(0)).max() > 1e-3


def test_size_list_writes_one_store_per_size(tmp_path, grid_images, cli):
    r = cli(["extract", grid_images / "odd_rect.png", "-m", TINY_MODEL, "-w", "random", "--size", "64,96,short:48",
             "-o", tmp_path / "s.zarr", "-q", "--json"])
    assert r.exit_code == 0, r.output
    outs = [s["output"] for s in json.loads(r.stdout)["stores"]]
    assert [o.rsplit("/", 1)[1] for o in outs] == ["s.64.zarr", "s.96.zarr", "s.short48.zarr"]
    grids = []
    for o in outs:
        with FeatureStore(o) as st:
            grids.append(st.record(0).grid)
    assert grids == [(4, 4), (6, 6), (3, 4)]


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and text in lines[0], result.output


def test_extract_sweep_bad_input(tmp_path, grid_images, cli):
    base = ["extract", grid_images, "-m", TINY_MODEL, "-w", "random", "-q"]
    _one_line_error(cli([*base, "--size", "100", "-o", tmp_path / "a.h5"]),
                    "100 px is not a multiple of the 16-px patch of test_vit (use 96 or 112)")
    _one_line_error(cli([*base, "--size", "64,crop:50", "-o", tmp_path / "a.h5"]), "use 48 or 64")
    _one_line_error(cli([*base, "--size", "64,64", "-o", tmp_path / "a.h5"]), "names the same size twice")
    _one_line_error(cli([*base, "--transform", "spin", "-o", tmp_path / "a.h5"]), "unknown transform 'spin'")
    _one_line_error(cli([*base, "--transform", "flip-ud,zoom:2", "-o", tmp_path / "a.h5"]), "unknown transform")
    _one_line_error(cli([*base, "--transform", "flip-ud", "--tile", "64", "-o", tmp_path / "a.h5"]),
                    "cannot be combined with --tile")
    _one_line_error(cli([*base, "--size", "64,96", "-o", "-"]), "cannot all go to stdout")
    assert not list(tmp_path.glob("a*"))


def _block_images(folder, masks, n, seed):
    """Images of 16-px blocks, bright (class 1) or dark (class 0), with noise; masks at full resolution."""
    folder.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        lab = rng.integers(0, 2, size=(4, 6))
        big = np.kron(lab, np.ones((16, 16), dtype=np.int64))
        img = np.clip(0.25 + 0.5 * big + 0.08 * rng.normal(size=big.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"b{seed}_{i}.png")
        Image.fromarray(big.astype(np.uint8)).save(masks / f"b{seed}_{i}.png")


def test_robustness_table_of_a_roll_equivariant_model(tmp_path, cli):
    """ALiBi (torus) features: every roll scores exactly the untransformed mIoU with the same head."""
    _block_images(tmp_path / "train", tmp_path / "masks", 8, seed=1)
    _block_images(tmp_path / "val", tmp_path / "masks", 3, seed=2)
    common = ["-m", TINY_MODEL, "-w", "random", "--method", "alibi", "--dtype", "float32", "-q"]
    assert cli(["extract", tmp_path / "train", *common, "-o", tmp_path / "t.h5"]).exit_code == 0
    assert cli(["extract", tmp_path / "val", *common, "-o", tmp_path / "v.h5"]).exit_code == 0
    rob = tmp_path / "rob"
    rob.mkdir()
    r = cli(["extract", tmp_path / "val", *common, "--transform", "roll:1,2,roll:0,3,flip-ud", "-o", rob / "v.h5"])
    assert r.exit_code == 0, r.output
    r = cli(["probe", "semantic", tmp_path / "t.h5", "--masks", tmp_path / "masks", "--val", tmp_path / "v.h5",
             "--robustness", rob, "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {row["transform"]: row for row in doc["robustness"]}
    assert set(rows) == {"identity", "roll:1,2", "roll:0,3", "flip-ud"}
    assert doc["results"]["miou"] > 0.6
    for spec in ("roll:1,2", "roll:0,3"):
        assert rows[spec]["miou"] == pytest.approx(rows["identity"]["miou"], abs=1e-12)
    r = cli(["probe", "semantic", tmp_path / "t.h5", "--masks", tmp_path / "masks", "--val", tmp_path / "v.h5",
             "--robustness", rob / "v.roll-1_2.h5", "--robustness", rob / "v.flip-ud.h5"])
    assert r.exit_code == 0 and "robustness" in r.output and "roll:1,2" in r.output

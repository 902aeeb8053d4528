"""`posvit probe shift`: crop-shift correspondence with known answers (torus equivariance, a planted position code,
hand-made nearest neighbours), its JSON document and `posvit viz shift`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.shift import (
    ABSOLUTE, CONTENT, OTHER, OUTSIDE, SHIFT_SCHEMA, match_tokens, nearest_neighbours, parse_shift,
    shift_correspondence, shift_views,
)


def _random_png(path, h, w, seed):
    from PIL import Image

    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------------------
# (3) Hand-made tokens with known nearest neighbours


def _one_hot_grid(h, w):
    """Token ``(r, c)`` is the basis vector ``r * w + c``: every token its own direction."""
    return np.eye(h * w, dtype=np.float32).reshape(h, w, h * w)


def test_hand_made_crop_matches_give_exact_fractions_and_displacement():
    views = shift_views((4, 4), (1, 1), "crop")  # two 3×3 crops; A's (r, c) shows B's (r-1, c-1)
    assert views.view_hw == (3, 3) and views.origin_a == (0, 0) and views.origin_b == (1, 1)
    b = _one_hot_grid(3, 3)
    a = np.zeros_like(b)
    a[0, 0] = b[2, 2]  # outside the overlap: never scored, whatever it matches
    a[1, 1] = b[0, 0] + 0.1 * b[1, 1]  # content-correct (0, 0) beats its own position
    a[1, 2] = b[1, 2]  # its own grid position: absolute
    a[2, 1] = b[0, 2]  # elsewhere: content (1, 0), match (0, 2): displacement √5
    a[2, 2] = b[1, 1]  # content
    m = match_tokens(a, b, views)
    expected = np.full((3, 3), OUTSIDE)
    expected[1, 1] = expected[2, 2] = CONTENT
    expected[1, 2] = ABSOLUTE
    expected[2, 1] = OTHER
    np.testing.assert_array_equal(m.categories, expected)
    s = m.summary()
    assert s["overlap_tokens"] == 4
    assert (s["fraction_content"], s["fraction_absolute"], s["fraction_other"]) == (0.5, 0.25, 0.25)
    assert s["displacement_error"] == pytest.approx((np.sqrt(2) + np.sqrt(5)) / 4)  # absolute: the shift, √2
    assert s["chance"] == pytest.approx(1 / 9)


def test_hand_made_roll_displacement_wraps_on_the_torus():
    views = shift_views((3, 4), (1, 1), "roll")  # A's (r, c) shows B's ((r-1) % 3, (c-1) % 4)
    b = _one_hot_grid(3, 4)
    a = np.stack([np.stack([b[(r - 1) % 3, (c - 1) % 4] for c in range(4)]) for r in range(3)])
    a[0, 0] = b[0, 3]  # content (2, 3); (0, 3) is one row away across the wrap, not two
    a[1, 2] = b[1, 2]  # absolute
    m = match_tokens(a, b, views)
    assert m.n_tokens == 12
    assert m.categories[0, 0] == OTHER and m.categories[1, 2] == ABSOLUTE
    assert m.fraction(CONTENT) == pytest.approx(10 / 12)
    assert m.displacement[0, 0] == pytest.approx(1.0)
    assert m.displacement[1, 2] == pytest.approx(np.sqrt(2))  # content (0, 1), match (1, 2)


def test_nearest_neighbours_in_chunks_equal_one_block():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 8)), rng.normal(size=(23, 8))
    full = nearest_neighbours(q, r)
    expected = np.argmax((q / np.linalg.norm(q, axis=1, keepdims=True)) @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T, axis=1)
    np.testing.assert_array_equal(full, expected)
    np.testing.assert_array_equal(nearest_neighbours(q, r, block=30), full)  # one query per chunk


def test_shifts_are_checked():
    assert parse_shift("2,-3") == (2, -3)
    for bad in ("0,0", "2", "a,b"):
        with pytest.raises(PosvitError, match="--shift"):
            parse_shift(bad)
    with pytest.raises(PosvitError, match="no overlap"):
        shift_views((4, 6), (2, 1), "crop")
    with pytest.raises(PosvitError, match="onto itself"):
        shift_views((4, 6), (4, 6), "roll")
    assert shift_views((5, 6), (-2, 1), "crop").origin_a == (2, 0)


# --------------------------------------------------------------------------------------------------------------
# (1) A roll-equivariant encoder follows the content exactly


@pytest.mark.parametrize("method", ["alibi", "nope"])
def test_torus_models_match_every_rolled_token_at_the_content_offset(tmp_path, one_torch_thread, method):
    from posvit_cli.core.features.alibi import retrofit
    from posvit_cli.core.features.encoders import load_encoder

    path = _random_png(tmp_path / "noise.png", 64, 80, seed=1)  # 4 × 5 tokens at patch 16, non-square
    enc = retrofit(load_encoder(TINY_MODEL, "random", seed=0), method)
    shifts = [(1, 2), (3, 4), (2, -1)]
    doc = shift_correspondence(enc, [path], shifts=shifts, mode="roll")
    assert doc["schema"] == SHIFT_SCHEMA
    for block, shift in zip(doc["summary"], shifts):
        assert block["shift"] == list(shift) and block["overlap_tokens"] == 20
        assert block["fraction_content"]["mean"] == 1.0
        assert block["fraction_absolute"]["mean"] == 0.0
        assert block["displacement_error"]["mean"] == 0.0
    assert all(np.all(np.asarray(s["map"]) == CONTENT) for s in doc["images"][0]["shifts"])


# --------------------------------------------------------------------------------------------------------------
# (2) A dominant position code pulls every token to its own grid position


class _PlantedEncoder:
    """Tokens = ``content`` × (patch-mean colour through a fixed projection) + ``position`` × a fixed random code
    per absolute token position of the input: the textbook positionally biased encoder."""

    patch_size, in_chans, mean, std = 8, 3, (0.5,) * 3, (0.25,) * 3

    def __init__(self, content: float, position: float, channels: int = 32):
        g = torch.Generator().manual_seed(0)
        self.project = torch.randn(3 * 4, channels, generator=g)
        self.code = torch.randn(16, 16, channels, generator=g)
        self.content, self.position = content, position

    def grid(self, height, width):
        return height // 8, width // 8

    def provenance(self):
        return {"model": "planted", "weights": "random", "patch_size": 8, "modifications": []}

    def forward_tokens(self, x, layers, keep_prefix=False):
        B, C, H, W = x.shape
        h, w = self.grid(H, W)
        # 2×2 sub-patch means per channel: a patch's content, identical wherever the patch lands.
        pooled = torch.nn.functional.avg_pool2d(x, 4).reshape(B, C, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5)
        content = pooled.reshape(B, h, w, C * 4) @ self.project
        tokens = self.content * content + self.position * self.code[:h, :w]
        return {layers[0]: tokens}, None


@pytest.mark.parametrize("mode", ["crop", "roll"])
def test_a_dominant_position_code_matches_the_absolute_position(tmp_path, mode):
    paths = [_random_png(tmp_path / f"noise{i}.png", 64, 72, seed=i) for i in range(2)]  # 8 × 9 tokens
    biased = shift_correspondence(_PlantedEncoder(0.05, 10.0), paths, shifts=[(2, 3)], mode=mode)
    s = biased["summary"][0]
    assert s["fraction_absolute"]["mean"] == 1.0 and s["fraction_content"]["mean"] == 0.0
    assert s["displacement_error"]["mean"] == pytest.approx(np.hypot(2, 3))  # the match is the shift away
    free = shift_correspondence(_PlantedEncoder(1.0, 0.0), paths, shifts=[(2, 3)], mode=mode)["summary"][0]
    assert free["fraction_content"]["mean"] == 1.0 and free["fraction_absolute"]["mean"] == 0.0
    tokens = 2 * (4 * 3 if mode == "crop" else 8 * 9)  # crop: (8 - 4) × (9 - 6) overlap tokens per image
    assert s["overlap_tokens"] == free["overlap_tokens"] == tokens


# --------------------------------------------------------------------------------------------------------------
# (4) The command line


def test_cli_writes_the_result_and_a_refused_run_leaves_it(tmp_path, cli, one_torch_thread):
    paths = [_random_png(tmp_path / f"img{i}.png", 48, 64, seed=i) for i in range(2)]  # 3 × 4 tokens
    out = tmp_path / "shift.json"
    r = cli(["probe", "shift", *paths, "-m", TINY_MODEL, "-w", "random", "--shift", "1,1", "--shift", "1,-1",
             "--device", "cpu", "-o", out, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert json.loads(r.stdout)["summary"] == doc["summary"]
    assert doc["schema"] == SHIFT_SCHEMA and doc["schema_version"] == 1 and doc["layer"] == "final"
    assert doc["settings"]["mode"] == "crop" and doc["settings"]["shifts"] == [[1, 1], [1, -1]]
    assert doc["model"]["model"] == TINY_MODEL and doc["command"].startswith("posvit")
    assert [im["name"] for im in doc["images"]] == ["img0.png", "img1.png"]
    for block in doc["summary"]:
        assert block["n_images"] == 2 and block["overlap_tokens"] == 2 * 1 * 2  # (3 - 2) × (4 - 2) per image
        for key in ("fraction_content", "fraction_absolute", "fraction_other", "displacement_error"):
            assert set(block[key]) == {"mean", "std"}
        total = sum(block[k]["mean"] for k in ("fraction_content", "fraction_absolute", "fraction_other"))
        assert total == pytest.approx(1.0)
    im = doc["images"][0]["shifts"][0]
    assert im["view_grid"] == [2, 3] and np.asarray(im["map"]).shape == (2, 3)
    assert (np.asarray(im["map"]) == OUTSIDE).sum() == 6 - 2

    before = out.read_bytes()
    r = cli(["probe", "shift", *paths, "-m", TINY_MODEL, "-w", "random", "--shift", "2,1", "--device", "cpu",
             "-o", out])
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--shift 2,1" in errors[0] and "img0.png" in errors[0]
    assert "Traceback" not in r.output
    assert out.read_bytes() == before

    figs = tmp_path / "figs"
    r = cli(["viz", "shift", out, "-o", figs, "-n", "1", "--json", "-q"])
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout)["figures"][0]
    assert fig["kind"] == "shift" and (figs / fig["file"]).stat().st_size > 0
    assert len(fig["numbers"]["images"]) == 1 and fig["numbers"]["summary"] == doc["summary"]


def test_map_colours_blend_the_category_over_the_grey_image_and_leave_outside_tokens():
    from posvit_cli.core.viz.shift import CATEGORY_COLOURS, OVERLAY_ALPHA, category_rgb, select_result_images

    cats = np.array([[CONTENT, ABSOLUTE], [OTHER, OUTSIDE]], dtype=np.int8)
    base = np.full((2, 2, 3), 100, dtype=np.uint8)  # grey 100 stays 100 in luminance
    rgb = category_rgb(cats, base).astype(float)
    for (r, c), cat in (((0, 0), CONTENT), ((0, 1), ABSOLUTE), ((1, 0), OTHER)):
        want = (1 - OVERLAY_ALPHA) * 100 + OVERLAY_ALPHA * np.asarray(CATEGORY_COLOURS[cat], dtype=float)
        np.testing.assert_allclose(rgb[r, c], np.rint(want), atol=1)
    np.testing.assert_array_equal(rgb[1, 1], [100, 100, 100])
    doc = {"images": [{"name": "a.png"}, {"name": "b.png"}]}
    assert select_result_images(doc, ["b", "0"]) == [1, 0] and select_result_images(doc, None, 1) == [0]
    with pytest.raises(PosvitError, match="'c' is not in the crop-shift result"):
        select_result_images(doc, ["c"])

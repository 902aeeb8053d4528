"""`posvit extract --tile T --tile-shifts N`: shifted tile grids average the per-tile positional pattern away.

Known answers from fake encoders on a 64×64 image, patch 4, tile 16 px (4 tokens), overlap 0, so the token grid is
16×16 and the plain grid tiles it exactly:

- an encoder whose output is the token's (column, row) inside its tile repeats 0,1,2,3 in every tile, so the tile
  phase explains all of it (periodicity 1). With N grids offset by k·4/N tokens, a token in the interior (away from
  the first and last tile, where the shifted grids coincide with the plain one) is covered by one tile of every
  grid, at in-tile column (x − k·4/N) mod 4; the mean over k is (x mod 4/N) + (4/N)(N − 1)/2: the constant 1.5 for
  N = 4 and the sawtooth (x mod 2) + 1 for N = 2;
- an encoder whose output depends on the patch's pixels only gives the same token wherever the tile is, so the
  shifted average equals plain tiling and the untiled extraction exactly.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MODEL
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.extract import (ExtractOptions, centre_window, extract_images, shift_offsets,
                                              shifted_tile_starts, tile_starts)
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.writer import StoreWriter
from posvit_cli.core.measure.probe.tiles import phase_periodicity, tile_frame

PATCH, TILE, SIDE = 4, 16, 64


class _FakeEncoder:
    """The attributes and ``forward_tokens`` that extraction uses; ``mode`` picks what the tokens are."""

    name, in_chans, embed_dim, num_prefix_tokens = "fake", 1, 2, 0
    patch_size = PATCH
    mean, std = (0.0,), (1.0,)

    def __init__(self, mode: str):
        self.mode = mode

    def forward_tokens(self, x, layers, keep_prefix=False):
        B, _, H, W = x.shape
        h, w = H // PATCH, W // PATCH
        if self.mode == "position":  # (column, row) of the token inside the tile it was given
            col = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
            row = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
            t = torch.stack([col, row], -1)[None].expand(B, h, w, 2)
        elif self.mode == "edge":  # content plus 1 per tile edge the token is on (row and column): a border artefact
            edge_col = torch.zeros(w)
            edge_col[0] = edge_col[-1] = 1.0
            edge_row = torch.zeros(h)
            edge_row[0] = edge_row[-1] = 1.0
            art = edge_row[:, None] + edge_col[None, :]
            p = x[:, 0].reshape(B, h, PATCH, w, PATCH)
            art = art[None].expand(B, h, w)
            t = torch.stack([art + p.mean((2, 4)), art], -1)
        else:  # mean and max of the patch's pixels: content only
            p = x[:, 0].reshape(B, h, PATCH, w, PATCH)
            t = torch.stack([p.mean((2, 4)), p.amax((2, 4))], -1)
        return {layer: t for layer in layers}, None


def _extract(tmp_path, mode, name, image, **kw):
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    with StoreWriter(tmp_path / name, provenance={"channels": 2}, layers=["final"], dtype="float32") as w:
        extract_images([path], _FakeEncoder(mode), w, ExtractOptions(layers=["final"], workers=0, **kw))
    with FeatureStore(tmp_path / name) as st:
        return st.features(0), st.record(0).meta.get("tiles")


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)


def test_shift_geometry():
    assert shift_offsets(16, 0, 4, 4) == [0, 4, 8, 12] and shift_offsets(512, 64, 16, 2) == [0, 224]
    assert shifted_tile_starts(64, 16, 0, 4, 0) == tile_starts(64, 16, 0, 4) == [0, 16, 32, 48]
    # Full-size tiles only: the first starts at 0, the last ends at the image border.
    assert shifted_tile_starts(64, 16, 0, 4, 4) == [0, 4, 20, 36, 48]
    with pytest.raises(PosvitError, match="tile-shifts 5"):
        shift_offsets(16, 0, 4, 5)  # a 4-patch step has no 5 distinct patch offsets


def test_shifted_grids_average_the_in_tile_position_away(tmp_path):
    img = _image()
    plain, meta = _extract(tmp_path, "position", "p1.h5", img, tile=TILE, overlap=0)
    two, meta2 = _extract(tmp_path, "position", "p2.h5", img, tile=TILE, overlap=0, tile_shifts=2)
    four, _ = _extract(tmp_path, "position", "p4.h5", img, tile=TILE, overlap=0, tile_shifts=4)
    x = np.arange(SIDE // PATCH)
    np.testing.assert_array_equal(plain[..., 0], np.broadcast_to(x % 4, (16, 16)))
    # The probe's tile frame comes from the plain grid, which the meta keeps.
    assert meta2["rows"] == meta["rows"] == [0, 16, 32, 48] and meta2["shifts"] == 2 and meta2["offsets"] == [0, 8]
    frame = tile_frame(plain.shape[:2], meta, PATCH)
    p_plain = phase_periodicity(plain, frame)["periodicity"]
    assert p_plain == pytest.approx(1.0, abs=1e-9)
    interior = slice(4, 12)  # tokens covered by exactly one tile of every grid
    np.testing.assert_allclose(two[interior, interior, 0], np.broadcast_to(x[interior] % 2 + 1.0, (8, 8)), atol=1e-6)
    np.testing.assert_allclose(two[interior, interior, 1], np.broadcast_to((x[interior] % 2 + 1.0)[:, None], (8, 8)),
                               atol=1e-6)
    np.testing.assert_allclose(four[interior, interior], 1.5, atol=1e-6)
    p_two = phase_periodicity(two, frame)["periodicity"]
    p_four = phase_periodicity(four, frame)["periodicity"]
    assert p_four < p_two < p_plain - 0.05, (p_plain, p_two, p_four)


def test_shifted_grids_keep_the_content(tmp_path):
    img = _image(1)
    untiled, _ = _extract(tmp_path, "content", "u.h5", img)
    plain, _ = _extract(tmp_path, "content", "c1.h5", img, tile=TILE, overlap=4)
    assert not np.allclose(untiled[..., 0], untiled[0, 0, 0])
    for n in (2, 3):
        shifted, meta = _extract(tmp_path, "content", f"c{n}.h5", img, tile=TILE, overlap=4, tile_shifts=n)
        assert meta["shifts"] == n
        np.testing.assert_allclose(shifted, plain, atol=1e-6)
    np.testing.assert_allclose(plain, untiled, atol=1e-6)


def test_shifts_are_recorded_and_a_different_resume_is_refused(tmp_path, cli):
    Image.fromarray(_image(2)).save(tmp_path / "big.png")
    out = tmp_path / "f.h5"
    args = ["extract", tmp_path / "big.png", "-m", TINY_MODEL, "-w", "random", "-o", out, "-q", "--device", "cpu",
            "--tile", "32", "--overlap", "0"]
    res = cli([*args, "--tile-shifts", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tiled"] == 1
    with FeatureStore(out) as st:
        assert st.provenance["tiling"] == {"tile": 32, "overlap": 0, "shifts": 2}
        assert st.record(0).meta["tiles"]["offsets"] == [0, 16]
    res = cli([*args, "--resume"])
    assert res.exit_code == 2 and "tiling" in res.output, res.output
    res = cli([*args, "--tile-shifts", "2", "--resume", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["already_done"] == 1, res.output
    res = cli(["extract", tmp_path / "big.png", "-m", TINY_MODEL, "-w", "random", "-o", tmp_path / "g.h5", "-q",
               "--tile-shifts", "2"])
    assert res.exit_code == 2 and "give --tile" in res.output, res.output


# --------------------------------------------------------------------------------------------------------------
# --tile-blend centre


def test_centre_window_is_symmetric_positive_and_peaks_at_the_centre():
    for n in (1, 4, 7, 8, 32):
        w = centre_window(n)
        assert w.shape == (n,) and w.dtype == np.float32
        np.testing.assert_array_equal(w, w[::-1])
        assert (w > 0).all() and w.max() <= 1.0
        assert w.argmax() == (n - 1) // 2 and w[0] == w.min()
    np.testing.assert_allclose(centre_window(8), np.sin(np.pi * (np.arange(8) + 0.5) / 8) ** 2, rtol=1e-6)
    assert centre_window(512)[0] == pytest.approx(1e-3)  # floored: image-border tokens stay covered


def test_centre_blend_keeps_constant_and_content_features(tmp_path):
    flat = np.full((SIDE, SIDE), 77, np.uint8)
    f, meta = _extract(tmp_path, "content", "flat.h5", flat, tile=32, overlap=8, tile_shifts=4, tile_blend="centre")
    assert meta["blend"] == "centre"
    # The weights are normalised per token, so a constant field stays constant (to float32 rounding).
    np.testing.assert_allclose(f, 77 / 255, rtol=1e-6, atol=0)
    img = _image(3)
    untiled, _ = _extract(tmp_path, "content", "u.h5", img)
    for n in (1, 2):
        centre, _ = _extract(tmp_path, "content", f"cc{n}.h5", img, tile=TILE, overlap=8, tile_shifts=n,
                             tile_blend="centre")
        np.testing.assert_allclose(centre, untiled, atol=1e-6)


def test_centre_blend_suppresses_an_artefact_at_tile_edges(tmp_path):
    """Tile 32 px (8 tokens), overlap 8 px (2 tokens), 80² px: tiles at tokens 0, 6, 12. At a seam a token is
    an edge token (artefact 1) of one tile and the second token (0) of the other: linear ramps weigh them
    0.25 : 0.75, the centre window sin²(π/16) : sin²(3π/16), so the artefact falls from 0.25 to 0.1098 per axis."""
    img = np.random.default_rng(4).integers(0, 256, (80, 80), dtype=np.uint8)
    lin, meta = _extract(tmp_path, "edge", "lin.h5", img, tile=32, overlap=8)
    cen, _ = _extract(tmp_path, "edge", "cen.h5", img, tile=32, overlap=8, tile_blend="centre")
    assert meta["cols"] == [0, 24, 48] and "blend" not in meta
    w = np.sin(np.pi * (np.arange(8) + 0.5) / 8) ** 2
    seam = w[0] / (w[0] + w[1])
    assert seam == pytest.approx(0.1098, abs=1e-4)
    for art, expected in ((lin[..., 1], 0.25), (cen[..., 1], seam)):
        one_axis = art[9]  # token row 9 is on no tile edge: the column artefact alone
        np.testing.assert_allclose(one_axis[[6, 7, 12, 13]], expected, atol=1e-6)
        np.testing.assert_allclose(one_axis[[1, 5, 8, 11, 14, 18]], 0.0, atol=1e-6)
    # With content, the weaker seam artefact explains less of the features. Measured inside the image: the tokens
    # on the image border are covered by one tile edge alone, so they keep the whole artefact with either blend.
    frame = tile_frame(lin.shape[:2], meta, PATCH)
    inner = (slice(1, -1), slice(1, -1))
    frame = dataclasses.replace(frame, row=frame.row[inner], col=frame.col[inner], height=frame.height[inner],
                                width=frame.width[inner])
    p_lin = phase_periodicity(lin[inner][..., :1], frame)["periodicity"]
    p_cen = phase_periodicity(cen[inner][..., :1], frame)["periodicity"]
    assert p_cen < p_lin - 0.1, (p_lin, p_cen)


def test_tile_blend_is_recorded_only_when_not_the_default(tmp_path, cli):
    Image.fromarray(_image(5)).save(tmp_path / "big.png")
    args = ["extract", tmp_path / "big.png", "-m", TINY_MODEL, "-w", "random", "-q", "--device", "cpu", "--tile", "32",
            "--overlap", "16"]
    res = cli([*args, "-o", tmp_path / "lin.h5", "--tile-blend", "linear"])
    assert res.exit_code == 0, res.output
    res = cli([*args, "-o", tmp_path / "cen.h5", "--tile-blend", "centre"])
    assert res.exit_code == 0, res.output
    with FeatureStore(tmp_path / "lin.h5") as st:
        assert st.provenance["tiling"] == {"tile": 32, "overlap": 16} and "blend" not in st.record(0).meta["tiles"]
    with FeatureStore(tmp_path / "cen.h5") as st:
        assert st.provenance["tiling"] == {"tile": 32, "overlap": 16, "blend": "centre"}
    res = cli([*args, "-o", tmp_path / "cen.h5", "--resume"])
    assert res.exit_code == 2 and "tiling" in res.output, res.output
    res = cli(["extract", tmp_path / "big.png", "-m", TINY_MODEL, "-w", "random", "-o", tmp_path / "g.h5", "-q",
               "--tile-blend", "centre"])
    assert res.exit_code == 2 and "give --tile" in res.output, res.output
    res = cli([*args, "-o", tmp_path / "x.h5", "--tile-blend", "middle"])
    assert res.exit_code == 2 and "centre" in res.output, res.output

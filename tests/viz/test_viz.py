"""`posvit viz`: known-answer tests of the maps, the figures' pixels, the index page, the commands and bad input."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL, write_store

P = 16  # patch size of the stores written here


# --------------------------------------------------------------------------------------------------------------
# Helpers


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header, after checking the signature: a valid PNG, read by hand."""
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def images_for(tmp_path, grids, names=None, seed=0):
    """Write one smooth random PNG per grid, sized grid × 16 px; returns their paths."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "src"
    d.mkdir(exist_ok=True)
    paths = []
    for k, (h, w) in enumerate(grids):
        p = d / f"{(names or [f'im{k}' for k in range(len(grids))])[k]}.png"
        Image.fromarray((rng.random((h * P, w * P)) * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    return paths


def planted_rgb(h, w, C=24, seed=0, mix=True):
    """Features whose first three principal directions carry three known patterns, strongest first.

    Returns (tokens (h, w, C), patterns (3, h, w)).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.where(xx < w // 2, -1.0, 1.0) * 3.0            # left/right halves: "red"
    b = np.where(yy < h // 2, -1.0, 1.0) * 2.0            # top/bottom halves: "green"
    c = np.where((yy + xx) % 2 == 0, -1.0, 1.0) * 1.0     # checkerboard: "blue"
    pats = np.stack([a, b, c])
    if mix:
        Q, _ = np.linalg.qr(rng.standard_normal((C, C)))
        basis = Q[:3]                                     # three orthonormal directions in channel space
    else:
        basis = np.eye(C)[:3]
    tokens = np.einsum("khw,kc->hwc", pats, basis) + 0.01 * rng.standard_normal((h, w, C))
    return tokens.astype(np.float32), pats


def ramp_store(path, n=3, h=10, w=12, C=16, ramps=True, seed=0, names=None, provenance=None):
    """A store of noise features, with channel 5 = left-right ramp and 9 = up-down ramp when ``ramps``."""
    rng = np.random.default_rng(seed)
    grids = []
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        g = rng.standard_normal((h, w, C)).astype(np.float32)
        if ramps:
            g[..., 5] = 4.0 * xx / (w - 1)
            g[..., 9] = 4.0 * yy / (h - 1)
        grids.append(g)
    return write_store(path, grids, names=names, provenance=provenance)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.targets = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("href", "src") and v and not v.startswith("#"):
                self.targets.add(v)


def index_links(folder) -> set[str]:
    from urllib.parse import unquote

    parser = _Links()
    parser.feed((Path(folder) / "index.html").read_text(encoding="utf-8"))
    return {unquote(t) for t in parser.targets}


def produced_files(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
            if p.is_file() and p.suffix in (".png", ".svg")}


# --------------------------------------------------------------------------------------------------------------
# Maps: known answers


@pytest.mark.parametrize("channels", [24, 384])  # full eigh below 33 channels, Lanczos top-3 above
def test_pca_recovers_planted_rgb_patterns(channels):
    from posvit_cli.core.viz.maps import pca_rgb

    tokens, pats = planted_rgb(12, 16, C=channels)
    for standardise in (False,):
        rgb, basis = pca_rgb(tokens, standardise=standardise)
        assert rgb.shape == (12, 16, 3) and rgb.min() >= 0 and rgb.max() <= 1
        corr = np.array([[abs(np.corrcoef(rgb[..., ch].ravel(), p.ravel())[0, 1]) for p in pats] for ch in range(3)])
        # Every colour channel reproduces one pattern, each pattern one channel (up to sign and order) ...
        assert corr.max(axis=1).min() > 0.999
        assert sorted(corr.argmax(axis=1).tolist()) == [0, 1, 2]
        # ... and with distinct variances the order is fixed: strongest pattern in red.
        assert corr.argmax(axis=1).tolist() == [0, 1, 2]
        # Variance shares 9 : 4 : 1 of the planted amplitudes.
        np.testing.assert_allclose(basis.explained, np.array([9, 4, 1]) / 14, atol=2e-3)


def test_pca_colours_are_exact_and_sign_fixed():
    from posvit_cli.core.viz.maps import pca_rgb

    tokens, pats = planted_rgb(8, 8, C=6, mix=False)
    rgb, _ = pca_rgb(tokens)
    # The largest loading of each axis is positive, so red is 1 where the planted pattern is high: min-max
    # puts the two halves at exactly 0 and 1 (up to the 1 % noise).
    assert np.all(rgb[:, 4:, 0] > 0.98) and np.all(rgb[:, :4, 0] < 0.02)
    assert np.all(rgb[4:, :, 1] > 0.97) and np.all(rgb[:4, :, 1] < 0.03)


def test_shared_pca_colours_images_alike_and_foreground_mask():
    from posvit_cli.core.viz.maps import fit_pca, foreground_mask

    t1, _ = planted_rgb(8, 10, seed=0, mix=False)
    t2 = t1[:, ::-1].copy()  # the same features, mirrored
    basis = fit_pca([t1, t2], 3)
    np.testing.assert_allclose(basis.to_rgb(t2), basis.to_rgb(t1)[:, ::-1], atol=1e-6)
    # A bright object in the middle of a dark border: PC1 separates them; the border side is background.
    rng = np.random.default_rng(1)
    obj = rng.standard_normal((12, 12, 8)) * 0.05
    obj[3:9, 4:10, 0] += 5.0
    fg = foreground_mask(obj, standardise=False)
    expect = np.zeros((12, 12), bool)
    expect[3:9, 4:10] = True
    assert np.array_equal(fg, expect)
    assert np.array_equal(foreground_mask(-obj, standardise=False), expect)  # either sign of the axis


def test_similarity_query_is_exactly_one_and_cosines_known():
    from posvit_cli.core.viz.maps import cosine_similarity_map

    rng = np.random.default_rng(0)
    t = rng.standard_normal((5, 7, 32))
    t[4, 6] = 3.0 * t[1, 2]                       # parallel: cosine 1
    t[0, 0] = -t[1, 2]                            # opposite: cosine -1
    q = t[1, 2]
    t[2, 2] = rng.standard_normal(32)
    t[2, 2] -= (t[2, 2] @ q) / (q @ q) * q        # orthogonal: cosine 0
    sim = cosine_similarity_map(t, 1, 2)
    assert sim[1, 2] == 1.0
    assert sim.max() <= 1.0 and sim.min() >= -1.0
    assert sim[4, 6] == pytest.approx(1.0, abs=1e-7)
    assert sim[0, 0] == pytest.approx(-1.0, abs=1e-7)
    assert sim[2, 2] == pytest.approx(0.0, abs=1e-9)


def test_eta_squared_hand_computed():
    from posvit_cli.core.viz.maps import position_eta_squared

    cols = np.tile(np.arange(16), (6, 1))
    assert position_eta_squared(cols) == (pytest.approx(1.0), pytest.approx(0.0, abs=1e-15))
    stripes = cols // 4                           # 4 stripes of width 4: η² = 1 − (4² − 1)/(16² − 1)
    ex, ey = position_eta_squared(stripes)
    assert ex == pytest.approx(1 - 15 / 255, abs=1e-12) and ey == pytest.approx(0.0, abs=1e-15)
    checker = (np.add.outer(np.arange(6), np.arange(16)) % 2)
    assert position_eta_squared(checker)[0] == pytest.approx(0.0, abs=1e-12)


def test_upsample_nearest_and_bilinear():
    from posvit_cli.core.viz.maps import upsample

    v = np.arange(6.0).reshape(2, 3)
    near = upsample(v, (4, 6), "nearest")
    assert np.array_equal(near, np.repeat(np.repeat(v, 2, 0), 2, 1))
    bil = upsample(v, (4, 6), "bilinear")
    # Pixel (1, 1) sits at token coordinate (0.25, 0.25): 0.75·0.75·0 + 0.75·0.25·1 + 0.25·0.75·3 + 0.25·0.25·4.
    assert bil[1, 1] == pytest.approx(1.0)
    assert bil[0, 0] == 0.0 and bil[-1, -1] == 5.0  # held constant beyond the outer token centres


def test_footprint_crop_and_tiles_and_pixel_to_token():
    from posvit_cli.core.features.store import ImageRecord
    from posvit_cli.core.viz.geometry import query_token, token_footprint
    from posvit_cli.core.errors import PosvitError

    rec = ImageRecord(0, "wide.png", (160, 320), (96, 96), (6, 6), "6x6", 0)
    fp = token_footprint(rec, {"size": "crop:96"})
    # 320×160 → short side 96: resized to 192×96, centre 96×96 crop from x = 48, i.e. x 80..240 of the original.
    assert (fp.top, fp.left, fp.bottom, fp.right) == (0.0, 80.0, 160.0, 240.0)
    assert fp.pixel_to_token(80, 0) == (0, 0) and fp.pixel_to_token(239.9, 159.9) == (5, 5)
    with pytest.raises(PosvitError, match="outside the part its features cover"):
        query_token((10, 80), "px", fp, "wide")
    tiled = ImageRecord(0, "big.png", (1000, 1010), (992, 1008), (62, 63), "62x63", 0, {"tiles": {}})
    ft = token_footprint(tiled, {"size": "native"})
    assert (ft.bottom, ft.right) == (992.0, 1008.0)
    full = token_footprint(ImageRecord(0, "a.png", (100, 200), (96, 192), (6, 12), "6x12", 0), {"size": "native"})
    assert (full.bottom, full.right) == (100.0, 200.0) and full.aspect == 2.0
    assert query_token((199, 99), "px", full, "a") == (5, 11)
    assert query_token((0.5, 0.5), "frac", full, "a") == (3, 6)
    assert query_token((11, 5), "token", full, "a") == (5, 11)


# --------------------------------------------------------------------------------------------------------------
# Figures: pixels and sizes


def test_rendered_figure_is_a_png_with_the_panels_pixel_for_pixel(tmp_path):
    from posvit_cli.core.viz.layout import ColourBar, Panel, PanelGrid, render_grid, save_figure
    from posvit_cli.core.viz.maps import pca_rgb, to_uint8, upsample

    tokens, _ = planted_rgb(6, 12, C=8, mix=False)   # a 2:1 grid
    rgb = to_uint8(upsample(pca_rgb(tokens)[0], (60, 120), "nearest"))
    grid = PanelGrid([[Panel(rgb, title="var"), Panel(None, size=(60, 120), placeholder="missing")]],
                     title="test figure", row_labels=["row"], col_headers=["a", "b"],
                     colourbar=ColourBar("coolwarm", 0.5, 1.0, "cosine"))
    fig = render_grid(grid)
    files = save_figure(fig.figure, tmp_path / "fig", ("png", "svg"))
    H, W = fig.size
    assert png_size(files[0]) == (W, H)
    img = np.asarray(Image.open(files[0]).convert("RGB"))
    assert img.shape == (H, W, 3)
    x0, y0, x1, y1 = fig.boxes[(0, 0)]
    assert (x1 - x0, y1 - y0) == (120, 60)              # true 2:1 aspect
    assert np.array_equal(img[y0:y1, x0:x1], rgb)       # drawn 1:1, no resampling
    # Known colours: the right half of the grid is the high side of PC1 (red 255), the left the low side.
    assert img[y0 + 5, x0 + 100, 0] >= 250 and img[y0 + 5, x0 + 10, 0] <= 5
    assert tuple(img[2, 2]) == (255, 255, 255)          # white margin
    assert files[1].read_text().lstrip().startswith("<?xml")


def test_similarity_panel_known_colours_and_aspect():
    from posvit_cli.core.viz.geometry import Footprint, fit_size
    from posvit_cli.core.viz.maps import blend, colormap_rgb
    from posvit_cli.core.viz.similarity import similarity_panel

    rng = np.random.default_rng(0)
    t = rng.standard_normal((5, 10, 16))
    fp = Footprint(0.0, 0.0, 80.0, 160.0, (5, 10), (80, 160))
    hw = fit_size(fp.height, fp.width, 200)
    assert hw == (100, 200)                                # the image's aspect ratio
    base = np.full(hw + (3,), 100, np.uint8)
    rgb, sim, _ = similarity_panel(t, fp, (2, 3), hw, base, method="nearest")
    assert rgb.shape == (100, 200, 3) and sim[2, 3] == 1.0
    top = colormap_rgb(np.array([1.0]), "coolwarm", 0.5, 1.0)[0]
    # The query patch (rows 40..59, columns 60..79) is coolwarm's top colour at opacity 0.7 over grey 100.
    expect = blend(np.full(3, 100, np.uint8), top, 0.7)
    assert np.array_equal(rgb[40:60, 60:80], np.broadcast_to(expect, (20, 20, 3)))
    assert tuple(expect) == tuple(int(round(0.3 * 100 + 0.7 * c)) for c in top)


# --------------------------------------------------------------------------------------------------------------
# Commands


def test_pca_command_raw_png_pixels_and_index(cli, tmp_path):
    tokens, _ = planted_rgb(6, 12, C=8, mix=False)
    names = images_for(tmp_path, [(6, 12)])
    store = write_store(tmp_path / "f.h5", [tokens], names=names)
    out = tmp_path / "out"
    r = cli(["viz", "pca", store, "-o", out, "--raw", "--standardise", "off", "--no-score", "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    fig = doc["figures"][0]
    assert fig["kind"] == "pca"
    H, W = fig["numbers"]["size"]
    assert png_size(out / fig["file"]) == (W, H)
    raw = [f for f in fig["extra"] if f.startswith("raw/")]
    assert len(raw) == 1
    assert png_size(out / raw[0]) == (192, 96)             # the image's own size, 192×96 px
    px = np.asarray(Image.open(out / raw[0]).convert("RGB"))
    assert px[10, 150, 0] >= 250 and px[10, 20, 0] <= 5     # red: right half high, left half low
    assert px[80, 20, 1] >= 248 and px[10, 20, 1] <= 7      # green: bottom half high
    assert index_links(out) == produced_files(out)


def test_similarity_command_aspect_and_query(cli, tmp_path):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 10, 16)).astype(np.float32)
    names = images_for(tmp_path, [(5, 10)])
    store = write_store(tmp_path / "f.h5", [g], names=names)
    out = tmp_path / "out"
    r = cli(["viz", "similarity", store, "-o", out, "--at", "55,40", "--at", "0,0", "--units", "px",
             "--raw", "--upsample", "nearest", "--json", "-q"])
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout)["figures"][0]
    q = fig["numbers"]["images"][0]["queries"]
    assert q[0]["token"] == {"x": 3, "y": 2} and q[1]["token"] == {"x": 0, "y": 0}
    raws = sorted(f for f in fig["extra"] if f.startswith("raw/"))
    assert len(raws) == 2
    assert png_size(out / raws[0]) == (160, 80)            # width 160, height 80: the image's 2:1 aspect
    px = np.asarray(Image.open(out / raws[0]).convert("RGB"))
    from posvit_cli.core.viz.maps import colormap_rgb

    top = colormap_rgb(np.array([1.0]), "coolwarm", 0.5, 1.0)[0]
    assert np.array_equal(px[32:48, 48:64].reshape(-1, 3), np.broadcast_to(top, (256, 3)))  # the query patch
    score = fig["numbers"]["score"]
    assert score["target"] == "xy" and score["source"].startswith("probed here")


def test_channels_command_finds_planted_ramps(cli, tmp_path):
    store = ramp_store(tmp_path / "f.h5", n=3)
    out = tmp_path / "out"
    r = cli(["viz", "channels", store, "-o", out, "--top-k", "1", "--json", "-q"])
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout)["figures"][0]
    rows = {c["channel"]: c for c in fig["numbers"]["channels"]}
    assert 5 in rows and 9 in rows
    assert "lr" in rows[5]["top_of"] and "ud" in rows[9]["top_of"]
    assert rows[5]["r2_by_target"]["lr"] > 0.99 and rows[9]["r2_by_target"]["ud"] > 0.99
    assert png_size(out / fig["file"])[0] > 0


def test_probe_plots_from_results(cli, tmp_path):
    from posvit_cli.core.measure.probe import make_settings, probe_store, write_probe_result
    from posvit_cli.core.features.store import FeatureStore

    settings, _ = make_settings("holdout", fraction=0.25, repeats=2, extras=False)
    paths = []
    for name, ramps in (("before", True), ("after", False)):
        with FeatureStore(ramp_store(tmp_path / f"{name}.h5", ramps=ramps, seed=1)) as fs:
            paths.append(write_probe_result(tmp_path / f"{name}.json", probe_store(fs, settings)))
    out = tmp_path / "out"
    r = cli(["viz", "probe", *paths, "--label", "biased", "--label", "clean", "-o", out, "--json", "-q"])
    assert r.exit_code == 0, r.output
    figs = json.loads(r.stdout)["figures"]
    kinds = [Path(f["file"]).name.split("_")[0] for f in figs]
    assert kinds == ["probe-channels", "probe-channels", "probe-stack-r2"]
    for f in figs:
        assert png_size(out / f["file"])[0] > 0
        assert any(e.endswith(".svg") for e in f["extra"])
    stack = figs[-1]["numbers"]["results"]
    before = json.loads(Path(paths[0]).read_text())["results"]["final"]["stack_r2"]["lr"]["mean"]
    assert stack[0]["stack_r2"]["lr"] == pytest.approx(before) and before > 0.99
    assert stack[1]["stack_r2"]["lr"] < 0.5
    assert figs[0]["numbers"]["ramps"]["lr"]["top"][0] == 5 and figs[0]["numbers"]["ramps"]["ud"]["top"][0] == 9


def test_fingerprint_plot_for_several_layers(cli, tmp_path):
    from posvit_cli.core.measure.probe import make_settings, probe_store, write_probe_result
    from posvit_cli.core.features.store import FeatureStore

    rng = np.random.default_rng(0)
    grids = [rng.standard_normal((8, 8, 12)).astype(np.float32) for _ in range(2)]
    store = write_store(tmp_path / "l.h5", grids, layers=("block0", "final"))
    settings, _ = make_settings("holdout", fraction=0.25, repeats=1, extras=False)
    with FeatureStore(store) as fs:
        res = write_probe_result(tmp_path / "l.json", probe_store(fs, settings, layers=["block0", "final"]))
    r = cli(["viz", "probe", res, "-o", tmp_path / "out", "--json", "-q"])
    assert r.exit_code == 0, r.output
    files = [f["file"] for f in json.loads(r.stdout)["figures"]]
    assert any(f.startswith("probe-fingerprint") for f in files)


def test_clusters_command_eta_and_legend(cli, tmp_path):
    h, w = 6, 16
    names = images_for(tmp_path, [(h, w), (h, w)])
    stripes = np.tile(np.arange(w) // 4, (h, 1)).astype(np.int32)
    maps = {"stripes": [stripes, stripes], "kmeans_k2": [np.tile(np.arange(w) % 2, (h, 1))] * 2}
    store = write_store(tmp_path / "c.h5", [np.zeros((h, w, 1), np.float32)] * 2, names=names, layers=(),
                        provenance={"channels": 0}, maps=maps)
    out = tmp_path / "out"
    r = cli(["viz", "clusters", store, "-o", out, "--json", "-q"])
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout)["figures"][0]
    assert fig["numbers"]["mean_eta2"]["stripes"]["x"] == pytest.approx(1 - 15 / 255)
    # Alternating columns: class means 7 and 8 around 7.5, between-variance 1/4 of total (16² − 1)/12.
    assert fig["numbers"]["mean_eta2"]["kmeans_k2"]["x"] == pytest.approx(3 / 255)
    r = cli(["viz", "clusters", store, "-o", out, "--map", "nope", "-q"])
    assert r.exit_code == 2 and "map 'nope' is not in" in r.output


def _quadrant_segmentation_numbers(cli, tmp_path) -> dict:
    """``viz segmentation`` numbers of four 24×32 quadrants with 64 px of class 0 predicted as 3."""
    imgs, pred, gt = tmp_path / "imgs", tmp_path / "pred", tmp_path / "gt"
    for d in (imgs, pred, gt):
        d.mkdir(parents=True)
    yy, xx = np.mgrid[0:48, 0:64]
    truth = ((xx >= 32).astype(np.uint8) + 2 * (yy >= 24)).astype(np.uint8)   # four 24×32 quadrants
    guess = truth.copy()
    guess[:8, :8] = 3                                                         # 64 px of class 0 called 3
    Image.fromarray((np.random.default_rng(0).random((48, 64)) * 255).astype(np.uint8)).save(imgs / "a.png")
    Image.fromarray(truth).save(gt / "a.png")
    Image.fromarray(guess + 1).save(pred / "a_pred.png")                      # predictions: class k is k + 1
    r = cli(["viz", "segmentation", imgs, pred, "--masks", gt, "-o", tmp_path / "out", "--json", "-q"])
    assert r.exit_code == 0, r.output
    q = 24 * 32
    expect = ((q - 64) / q + 1 + 1 + q / (q + 64)) / 4
    numbers = json.loads(r.stdout)["figures"][0]["numbers"]
    assert numbers["miou"] == pytest.approx(expect, abs=1e-12)
    return numbers


def test_segmentation_command_hand_computed_miou(cli, tmp_path):
    _quadrant_segmentation_numbers(cli, tmp_path)


def test_segmentation_statistics_in_row_bands_equal_the_whole_image(cli, tmp_path, monkeypatch):
    """Bands of 5 rows cut the quadrants and the 8-row error block: the counts and the mIoU are unchanged."""
    import posvit_cli.core.viz.label_maps as label_maps

    whole = _quadrant_segmentation_numbers(cli, tmp_path / "whole")
    monkeypatch.setattr(label_maps, "BAND_ROWS", 5)
    banded = _quadrant_segmentation_numbers(cli, tmp_path / "banded")
    assert banded["images"][0]["class_fractions"] == whole["images"][0]["class_fractions"]
    q = 24 * 32
    assert whole["images"][0]["class_fractions"] == {"0": (q - 64) / (4 * q), "1": 0.25, "2": 0.25,
                                                     "3": (q + 64) / (4 * q)}


def test_compare_headers_carry_each_models_score(cli, tmp_path):
    names = images_for(tmp_path, [(10, 12)] * 2)
    biased = ramp_store(tmp_path / "a.h5", n=2, names=names, ramps=True, provenance={"model": "biased"})
    clean = ramp_store(tmp_path / "b.h5", n=2, names=names, ramps=False, provenance={"model": "clean"})
    out = tmp_path / "out"
    r = cli(["viz", "compare", biased, clean, "-o", out, "--at", "8,8", "--json", "-q"])
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout)["figures"][0]
    models = fig["numbers"]["models"]
    assert [m["label"] for m in models] == ["biased", "clean"]
    assert models[0]["score"]["mean"] > 0.95 and models[1]["score"]["mean"] < 0.3
    assert "biased: xy R² 0.9" in fig["caption"]
    H, W = fig["numbers"]["size"]
    assert png_size(out / fig["file"]) == (W, H)


def test_index_merges_runs_and_links_every_file(cli, tmp_path):
    store = ramp_store(tmp_path / "f.h5", n=2)
    out = tmp_path / "out"
    assert cli(["viz", "pca", store, "-o", out, "-q", "--raw", "--no-score"]).exit_code == 0
    assert cli(["viz", "similarity", store, "-o", out, "-q", "--at", "0,0", "--units", "token"]).exit_code == 0
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.measure.probe import make_settings, probe_store, write_probe_result

    with FeatureStore(store) as fs:
        res = write_probe_result(tmp_path / "p.json", probe_store(fs, make_settings(fraction=0.25, repeats=1)[0]))
    assert cli(["viz", "probe", res, "-o", out, "-q"]).exit_code == 0
    files = produced_files(out)
    assert any(f.startswith("pca_") for f in files) and any(f.endswith(".svg") for f in files)
    assert index_links(out) == files                       # every file linked, nothing dangling
    # A rerun replaces its entry instead of adding one; the page is plain offline HTML.
    assert cli(["viz", "pca", store, "-o", out, "-q", "--raw", "--no-score"]).exit_code == 0
    manifest = json.loads((out / "viz-index.json").read_text())
    assert len([e for e in manifest["entries"] if e["kind"] == "pca"]) == 1
    page = (out / "index.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_missing_source_image_draws_features_alone(cli, tmp_path):
    store = ramp_store(tmp_path / "f.h5", n=1, names=[str(tmp_path / "gone.png")])
    r = cli(["viz", "pca", store, "-o", tmp_path / "out", "--no-score"])
    assert r.exit_code == 0, r.output
    assert "source image not found for gone" in r.output
    assert (tmp_path / "out" / "index.html").exists()


def test_pipe_from_extract(image_dir, tmp_path):
    src = tmp_path / "two"
    src.mkdir()
    for name in ("grey0.png", "colour.png"):
        (src / name).write_bytes((image_dir / name).read_bytes())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "posvit_cli"]
    extract = subprocess.Popen([*cmd, "extract", src, "-m", TINY_MODEL, "--weights", "random", "-q"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    viz = subprocess.run([*cmd, "viz", "pca", "-o", out, "-q"], stdin=extract.stdout, capture_output=True,
                         timeout=600)
    extract.stdout.close()
    assert extract.wait(timeout=600) == 0, extract.stderr.read().decode()
    assert viz.returncode == 0, viz.stderr.decode()
    pngs = list(out.glob("pca_*.png"))
    assert len(pngs) == 1 and png_size(pngs[0])[0] > 0
    manifest = json.loads((out / "viz-index.json").read_text())
    names = [im["name"] for im in manifest["entries"][0]["numbers"]["images"]]
    assert sorted(names) == ["colour", "grey0"]


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def _one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.output
    assert "Traceback" not in result.output


def test_query_point_outside_the_image(cli, tmp_path):
    store = ramp_store(tmp_path / "f.h5", n=1, h=4, w=6)            # 96×64 px
    out = tmp_path / "out"
    r = cli(["viz", "similarity", store, "-o", out, "--at", "96,10"])
    _one_line_error(r, r"query point 96,10 px is outside image 'img000' \(96×64 px")
    r = cli(["viz", "similarity", store, "-o", out, "--at", "6,0", "--units", "token"])
    _one_line_error(r, r"outside image 'img000': its grid is 6 columns × 4 rows")
    r = cli(["viz", "similarity", store, "-o", out, "--at", "1;2;3"])
    _one_line_error(r, r"cannot read query point")
    assert not list(out.glob("*.png"))                                # nothing drawn


def test_probe_result_of_another_model(cli, tmp_path):
    from posvit_cli.core.measure.probe import make_settings, probe_store, write_probe_result
    from posvit_cli.core.features.store import FeatureStore

    other = ramp_store(tmp_path / "other.h5", n=1, provenance={"model": "dinov2-s-reg"})
    with FeatureStore(other) as fs:
        res = write_probe_result(tmp_path / "other.json", probe_store(fs, make_settings(fraction=0.25, repeats=1)[0]))
    mine = ramp_store(tmp_path / "mine.h5", n=1, provenance={"model": "mae-b"})
    for args in (["pca", mine, "--probe", res], ["channels", mine, "--probe", res],
                 ["compare", mine, "--probe", res]):
        r = cli(["viz", *args, "-o", tmp_path / "out"])
        _one_line_error(r, r"was made from model 'dinov2-s-reg', but .* holds features of model 'mae-b'")


def test_empty_store_and_maps_only_store(cli, tmp_path):
    empty = write_store(tmp_path / "empty.h5", [], provenance={"channels": 16})
    for sub in ("pca", "similarity", "channels", "clusters", "compare"):
        r = cli(["viz", sub, empty, "-o", tmp_path / "out"])
        _one_line_error(r, r"holds no images: nothing to draw")
    maps_only = write_store(tmp_path / "m.h5", [np.zeros((2, 3, 1), np.float32)], layers=(),
                            provenance={"channels": 0}, maps={"kmeans_k2": [np.zeros((2, 3), np.int32)]})
    r = cli(["viz", "pca", maps_only, "-o", tmp_path / "out"])
    _one_line_error(r, r"holds no feature layers .* `posvit viz clusters`")


def test_other_bad_options(cli, tmp_path):
    store = ramp_store(tmp_path / "f.h5", n=1)
    (tmp_path / "file.txt").write_text("x")
    _one_line_error(cli(["viz", "pca", store, "-o", tmp_path / "file.txt"]), r"is a file")
    _one_line_error(cli(["viz", "pca", store, "-o", tmp_path / "o", "--images", "nope"]), r"image 'nope' is not in")
    _one_line_error(cli(["viz", "pca", store, "-o", tmp_path / "o", "--standardise", "maybe"]), r"--standardise")
    _one_line_error(cli(["viz", "channels", store, "-o", tmp_path / "o", "--channels", "99"]),
                    r"channel 99 does not exist")
    _one_line_error(cli(["viz", "probe", tmp_path / "file.txt", "-o", tmp_path / "o"]), r"cannot read .* as a probe")

"""`posvit viz norms`: the token-norm figure is written, indexed, and carries each image's outlier share."""

from __future__ import annotations

import json

import numpy as np

from conftest import NORM_PLANTED as PLANTED, noise_grid, write_store
from test_viz import images_for, index_links, png_size, produced_files



def test_norms_figure_written_with_its_share(cli, tmp_path):
    names = images_for(tmp_path, [(16, 16), (16, 16)])
    store = write_store(tmp_path / "f.h5", [noise_grid(0, planted=PLANTED), noise_grid(1)], names=names)
    out = tmp_path / "out"
    r = cli(["viz", "norms", store, "-o", out, "--panel-size", "64", "--json"])
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout)["figures"][0]
    assert fig["kind"] == "norms" and fig["file"].startswith("norms_")
    H, W = fig["numbers"]["size"]
    assert png_size(out / fig["file"]) == (W, H)
    nums = fig["numbers"]
    assert [im["share"] for im in nums["images"]] == [3 / 256, 0.0]
    assert sorted(map(tuple, nums["images"][0]["positions"])) == sorted(PLANTED)
    assert nums["mean_share"] == 3 / 512 and nums["images_with_outliers"] == 1
    assert "mean outlier share 0.59 %, 1 of 2 images with outliers" in fig["caption"]
    assert "Token L2 norms" in r.stderr
    assert index_links(out) == produced_files(out)
    assert "Token norms" in (out / "index.html").read_text(encoding="utf-8")


def test_norms_figure_panel_titles_carry_the_share(tmp_path, monkeypatch):
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.viz import layout
    from posvit_cli.core.viz.norms import norms_figure

    store = write_store(tmp_path / "f.h5", [noise_grid(0, planted=PLANTED)], names=images_for(tmp_path, [(16, 16)]))
    seen = []
    real = layout.render_grid

    def spy(grid):
        seen.append(grid)
        return real(grid)

    import posvit_cli.core.viz.pictures as pictures

    monkeypatch.setattr(pictures, "render_grid", spy)
    with FeatureStore(store) as fs:
        norms_figure(fs, tmp_path / "o", k=6.0)
    panel = seen[0].rows[0][1]
    assert panel.title.startswith("3/256 outlier tokens (1.17 %)")
    assert len(panel.markers) == 3
    # the map: 16 px per token at the default 256 px panel; the planted tokens are the brightest (viridis yellow)
    r, c = PLANTED[0]
    assert panel.image.shape == (256, 256, 3)
    assert np.array_equal(panel.image[r * 16 + 8, c * 16 + 8], panel.image.reshape(-1, 3)[panel.image.sum(-1).argmax()])


def test_norms_bad_input_is_one_error_line(cli, tmp_path):
    empty = write_store(tmp_path / "empty.h5", [], provenance={"channels": 16})
    r = cli(["viz", "norms", empty, "-o", tmp_path / "out"])
    assert r.exit_code == 2 and "holds no images: nothing to draw" in r.output
    bad = noise_grid(0)
    bad[3, 4, 0] = np.nan
    r = cli(["viz", "norms", write_store(tmp_path / "nan.h5", [bad]), "-o", tmp_path / "out"])
    assert r.exit_code == 2 and "holds NaN or inf features" in r.output and "img000" in r.output
    r = cli(["viz", "norms", write_store(tmp_path / "ok.h5", [noise_grid(0)]), "-o", tmp_path / "out",
             "--norm-k", "0"])
    assert r.exit_code == 2 and "--norm-k must be positive" in r.output

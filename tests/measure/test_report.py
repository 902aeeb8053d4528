"""`posvit report`: one table across stores (planted position and content signals come out in the right rows),
transformed stores join their row by provenance, the resolution sweep end to end, outputs and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL, write_store
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.probe import make_settings
from posvit_cli.core.measure.report import compare_stores, group_stores, read_report, report_markdown, store_label
from posvit_cli.core.features.store import FeatureStore

K = 3
# 8 × 8 grids: the default 1/36 of the tokens would train on one token.
POSITIONAL = make_settings("holdout", targets=("xy", "lr", "ud", "random"), fraction=0.25, per_channel=False,
                           extras=False)[0]


def _dataset(tmp_path, n=12, grid=(8, 8)):
    """Content classes (linear in 8 channels) plus two positional ramp channels and noise."""
    rng = np.random.default_rng(0)
    h, w = grid
    ys, xs = np.mgrid[0:h, 0:w] / np.array([h - 1, w - 1])[:, None, None]
    M = rng.normal(size=(K, 8)) * 3
    masks = tmp_path / "masks"
    masks.mkdir()
    positional, clean = [], []
    for i in range(n):
        lab = rng.integers(0, K, size=grid)
        content = np.eye(K)[lab] @ M + 0.2 * rng.normal(size=(h, w, 8))
        ramps = np.stack([xs, ys], -1) * 5 + 0.01 * rng.normal(size=(h, w, 2))
        positional.append(np.concatenate([content, ramps], -1).astype(np.float32))
        clean.append(np.concatenate([content, 0.01 * rng.normal(size=(h, w, 2))], -1).astype(np.float32))
        Image.fromarray(np.kron(lab, np.ones((16, 16), np.int64)).astype(np.uint8)).save(masks / f"img{i:03d}.png")
    prov = {"preprocessing": {"size": "native"}}
    write_store(tmp_path / "raw.h5", positional, provenance=prov)
    write_store(tmp_path / "clean.h5", clean, provenance={**prov, "debias": [{"method": "rasa", "head_sha256": "ab"}]})
    # A transformed copy of the clean store, deceptively named like the raw one: provenance decides.
    write_store(tmp_path / "raw.roll.h5", clean, provenance={**prov, "transform": "roll:0,2",
                                                             "debias": [{"method": "rasa", "head_sha256": "ab"}]})
    return masks


def test_report_rows_show_the_planted_signals(tmp_path):
    masks = _dataset(tmp_path)
    with FeatureStore(tmp_path / "raw.h5") as raw, FeatureStore(tmp_path / "clean.h5") as clean, \
            FeatureStore(tmp_path / "raw.roll.h5") as roll:
        rows = group_stores([raw, roll, clean])
        assert [(b.source, [t.source for t in ts]) for b, ts in rows] == [
            (raw.source, []), (clean.source, [roll.source])]
        doc = compare_stores([raw, roll, clean], masks=masks, ks=(3, 12), cluster_seeds=(0,), positional=POSITIONAL,
                             cluster_threads=1)
    by = {r["name"]: r for r in doc["rows"]}
    assert list(by) == ["raw", "clean"]
    assert by["raw"]["positional"]["stack_r2"]["xy"] > 0.95
    assert by["clean"]["positional"]["stack_r2"]["xy"] < 0.3
    assert by["raw"]["semantic"]["miou"] == 1.0 and by["clean"]["semantic"]["miou"] == 1.0
    assert by["clean"]["debias"] == ["rasa"] and by["raw"]["debias"] == []
    rob = by["clean"]["robustness"]
    assert [r["transform"] for r in rob] == ["roll:0,2"] and rob[0]["miou"] == 1.0 and rob[0]["delta_miou"] == 0.0
    cl = {(c["k"], c["matching"]): c for c in by["clean"]["cluster"]}
    assert set(cl) == {(3, "hungarian"), (12, "precision")}
    assert cl[(3, "hungarian")]["miou_mean"] > 0.99
    md = report_markdown(doc)
    assert "| raw | synthetic | none |" in md and "| clean | synthetic | rasa |" in md
    assert "mIoU roll:0,2" in md and "cluster mIoU k=3 (hungarian)" in md
    # Clusters of content classes drawn independently per token: no position dependence, in JSON and table.
    for c in by["clean"]["cluster"]:
        dep = c["position_dependence"]
        assert dep["draws"] == 99 and not dep["position_driven"] and abs(dep["dependence"]) < 0.1
    assert "position dep. k=3" in md and "entropy k=" not in md and "(p=" in md
    assert "spatial_entropy" in by["clean"]["cluster"][0]  # the old measure stays in the JSON


def test_report_outlier_token_column_counts_the_planted_high_norm_tokens(tmp_path):
    from conftest import NORM_PLANTED, noise_grid
    from posvit_cli.core.measure.report import report_table

    write_store(tmp_path / "reg.h5", [noise_grid(i) for i in range(3)])
    write_store(tmp_path / "art.h5", [noise_grid(i, planted=NORM_PLANTED if i else ()) for i in range(3)])
    with FeatureStore(tmp_path / "reg.h5") as reg, FeatureStore(tmp_path / "art.h5") as art:
        doc = compare_stores([reg, art], positional=POSITIONAL)
    reg_tn, art_tn = (r["token_norms"] for r in doc["rows"])
    assert reg_tn["mean_share"] == 0.0 and reg_tn["n_outliers"] == 0
    # Two of three images hold 3 outliers in 256 tokens.
    assert art_tn["mean_share"] == pytest.approx(2 / 3 * 3 / 256) and art_tn["max_share"] == 3 / 256
    assert art_tn["n_outliers"] == 6 and art_tn["images_with_outliers"] == 2
    header, body = report_table(doc)
    col = header.index("outlier tokens")
    assert [row[col] for row in body] == ["0.00 %", "0.78 %"]


def test_cli_report_writes_markdown_and_json(tmp_path, cli):
    masks = _dataset(tmp_path, n=8)
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    r = cli(["report", tmp_path / "raw.h5", tmp_path / "clean.h5", tmp_path / "raw.roll.h5", "--masks", masks,
             "--names", "dinov2,rasa", "--head", "ridge", "--fraction", "0.25", "-k", "3", "--seeds", "0", "--cluster-threads", "1", "-o", md, "-o", js,
             "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "posvit-report" and [row["name"] for row in doc["rows"]] == ["dinov2", "rasa"]
    assert read_report(js)["rows"] == doc["rows"]
    assert "| dinov2 |" in md.read_text() and "R² xy" in md.read_text()
    r = cli(["report", tmp_path / "raw.h5", tmp_path / "clean.h5", "--fraction", "0.25"])  # positional only
    assert r.exit_code == 0 and "R² xy" in r.output and "semantic" not in r.output

    # viz report draws the same numbers, one colour per row, and indexes the figure.
    r = cli(["viz", "report", js, "-o", tmp_path / "viz", "--json"])
    assert r.exit_code == 0, r.output
    fig = json.loads(r.stdout)["figures"]
    assert len(fig) == 1 and fig[0]["kind"] == "report"
    drawn = fig[0]["numbers"]["rows"]
    assert [d["name"] for d in drawn] == ["dinov2", "rasa"]
    for d, row in zip(drawn, doc["rows"]):
        assert d["xy_r2"] == row["positional"]["stack_r2"]["xy"]
        assert d["semantic_miou"] == row["semantic"]["miou"]
        assert d["cluster_miou"]["3"] == row["cluster"][0]["miou_mean"]
    assert (tmp_path / "viz" / fig[0]["file"]).stat().st_size > 1000
    assert fig[0]["file"] in (tmp_path / "viz" / "index.html").read_text()
    r = cli(["viz", "report", md, "-o", tmp_path / "viz"])  # the Markdown table is not the document
    assert r.exit_code == 2 and "cannot read" in r.output


def test_cli_report_old_cluster_seeds_spelling_works_and_warns(tmp_path, cli):
    masks = _dataset(tmp_path, n=6)
    stores = [tmp_path / "raw.h5", "--masks", masks, "--head", "ridge", "-k", "3", "--cluster-threads", "1",
              "--fraction", "0.25", "--json", "-q"]
    new = cli(["report", *stores, "--seeds", "1,3"])
    old = cli(["report", *stores, "--cluster-seeds", "1,3"])
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    new_doc, old_doc = json.loads(new.stdout), json.loads(old.stdout)
    assert old_doc["settings"]["cluster"]["seeds"] == [1, 3] == new_doc["settings"]["cluster"]["seeds"]
    for old_row, new_row in zip(old_doc["rows"], new_doc["rows"]):  # the same numbers (timings aside)
        assert old_row["cluster"] == new_row["cluster"] and old_row["positional"] == new_row["positional"]
        assert old_row["semantic"]["miou"] == new_row["semantic"]["miou"]
    assert "--cluster-seeds is deprecated" in old.stderr and "use --seeds" in old.stderr
    assert "deprecated" not in new.stderr


def test_parse_seeds():
    from posvit_cli._cli import parse_seeds

    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("1,3") == [1, 3]
    assert parse_seeds("0-2,7, 2") == [0, 1, 2, 7]
    assert parse_seeds("5") == [5]
    with pytest.raises(PosvitError, match=r"--seeds range '3-1' runs backwards: did you mean 1-3\?"):
        parse_seeds("3-1")
    with pytest.raises(PosvitError, match="cannot read --cluster-seeds 'x'"):
        parse_seeds("x", "--cluster-seeds")
    with pytest.raises(PosvitError, match="--seeds is empty"):
        parse_seeds(" , ")
    with pytest.raises(PosvitError, match="negative seed -2"):
        parse_seeds("-2")


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and text in lines[0], result.output


def test_report_bad_input(tmp_path, cli):
    masks = _dataset(tmp_path, n=6)
    raw, clean, roll = tmp_path / "raw.h5", tmp_path / "clean.h5", tmp_path / "raw.roll.h5"
    _one_line_error(cli(["report", raw, roll]), "matches no untransformed store")
    _one_line_error(cli(["report", roll]), "every store given is a transformed copy")
    _one_line_error(cli(["report", raw, clean, "--names", "a"]), "1 names given for 2 untransformed stores")
    _one_line_error(cli(["report", raw, "-o", tmp_path / "r.txt"]), "name a .md (Markdown) or .json file")
    _one_line_error(cli(["report", raw, raw]), "named twice")
    _one_line_error(cli(["report", raw]), "raise --fraction")
    _one_line_error(cli(["report", raw, "--masks", masks, "--num-classes", "2", "--no-cluster", "--fraction", "0.25"]),
                    "≥ --num-classes 2")
    _one_line_error(cli(["report", raw, "--seeds", "a-b", "--masks", masks]), "cannot read --seeds 'a-b'")
    _one_line_error(cli(["report", raw, "--seeds", "3-1", "--masks", masks]), "did you mean 1-3?")
    assert not list(tmp_path.glob("r.*"))
    with pytest.raises(PosvitError, match="no stores"):
        compare_stores([])
    assert store_label("runs/raw.448.zarr.zip") == "raw.448" and store_label("x.zarr/") == "x"


def test_resolution_sweep_end_to_end(tmp_path, cli):
    """extract --size 64,128 (one store each) → report: one row per size, positional R², semantic and
    overclustering columns."""
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(3)
    for i in range(8):
        lab = rng.integers(0, 2, size=(4, 4))
        big = np.kron(lab, np.ones((32, 32), np.int64))
        img = np.clip(0.25 + 0.5 * big + 0.05 * rng.normal(size=big.shape), 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(imgs / f"s{i}.png")
        Image.fromarray(big.astype(np.uint8)).save(masks / f"s{i}.png")
    r = cli(["extract", imgs, "-m", TINY_MODEL, "-w", "random", "--size", "64,128", "-o", tmp_path / "raw.h5", "-q"])
    assert r.exit_code == 0, r.output
    r = cli(["report", tmp_path / "raw.64.h5", tmp_path / "raw.128.h5", "--masks", masks, "-k", "2",
             "--seeds", "0", "--cluster-threads", "1", "--fraction", "0.25", "--json", "-q"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [(row["name"], row["size"], row["grid"]) for row in rows] == [
        ("raw.64", "square:64", [4, 4]), ("raw.128", "square:128", [8, 8])]
    for row in rows:
        assert row["positional"]["stack_r2"]["xy"] is not None
        assert row["semantic"]["miou"] > 0.5 and row["cluster"][0]["k"] == 2


def test_cli_report_help_lists_choices_and_rounded_defaults(cli):
    import re

    r = cli(["report", "--help"])
    assert r.exit_code == 0
    flat = re.sub(r"[\s│]+", " ", r.output)
    assert "linear|ridge" in flat and "tokens|pixels" in flat
    assert "[default: (0.0278)]" in flat and "0.027777" not in flat
    assert "--seeds" in flat and "--cluster-seeds" not in flat  # the old spelling is hidden


def test_report_content_match_is_probe_shift_on_the_stores_encoder_and_replays_its_head(tmp_path, cli):
    """The content/grid match column is `posvit probe shift` (default settings) of the encoder rebuilt from the
    store, on its images; a store cleaned by a head is measured through that head, found where the store recorded
    it; a moved head leaves the cell empty with a note."""
    from scipy.ndimage import gaussian_filter

    from posvit_cli.core.debias.auto_shift import shift_pairs, shift_scores
    from posvit_cli.core.debias.heads import load_head
    from posvit_cli.core.features.rebuild import encoder_from_provenance

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):  # faint, smooth texture: the random ViT's position embedding wins some matches
        a = gaussian_filter(rng.random((128, 144)), 4)
        Image.fromarray((120 + (a - a.min()) / np.ptp(a) * 12).astype(np.uint8)).save(imgs / f"t{i}.png")
    raw, clean = tmp_path / "raw.h5", tmp_path / "clean.h5"
    head = tmp_path / "pm.safetensors"
    for args in (["extract", imgs, "-m", TINY_MODEL, "-w", "random", "-o", raw, "-q"],
                 ["debias-train", "posmean", raw, "-o", head, "--report-images", "0", "-q"],
                 ["extract", raw, "--head", head, "-o", clean, "-q"]):
        r = cli(args)
        assert r.exit_code == 0, r.output
    r = cli(["probe", "shift", imgs, "-m", TINY_MODEL, "-w", "random", "--json", "-q"])
    assert r.exit_code == 0, r.output
    probe = json.loads(r.stdout)
    r = cli(["report", raw, clean, "--no-cluster", "--fraction", "0.5", "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rows = {r["name"]: r for r in doc["rows"]}
    (summary,) = probe["summary"]
    assert rows["raw"]["shift"]["shift_content"] == pytest.approx(summary["fraction_content"]["mean"], abs=1e-12)
    assert rows["raw"]["shift"]["shift_absolute"] == pytest.approx(summary["fraction_absolute"]["mean"], abs=1e-12)
    with FeatureStore(str(raw)) as fs:
        pairs, _ = shift_pairs(fs, range(len(fs)), encoder_from_provenance(fs.provenance, fs.source))
        expected = shift_scores(load_head(head), pairs)
    assert rows["clean"]["shift"] == pytest.approx(expected, abs=1e-12)
    assert rows["clean"]["shift"] != rows["raw"]["shift"]
    head.rename(tmp_path / "moved.safetensors")
    doc = json.loads(cli(["report", clean, "--no-cluster", "--fraction", "0.5", "--json", "-q"]).stdout)
    assert doc["rows"][0]["shift"] is None
    assert any("pm.safetensors' was not found" in n for n in doc["notes"]), doc["notes"]

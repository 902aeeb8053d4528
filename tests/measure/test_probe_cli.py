"""`posvit probe` on the command line: outputs, protocols, the pipe from extract and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_MODEL, run_posvit, write_store
from test_probe import PLANTED, planted_grid


@pytest.fixture
def planted_store(tmp_path):
    rng = np.random.default_rng(0)
    return write_store(tmp_path / "planted.h5", [planted_grid(rng) for _ in range(3)])


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_probe_writes_json_csv_and_a_table(cli, planted_store, tmp_path):
    out, csv = tmp_path / "r.json", tmp_path / "c.csv"
    res = cli(["probe", planted_store, "--fraction", "0.25", "--top-k", "1", "-o", out, "--csv", csv, "--json"])
    doc = _json(res)
    assert doc["results"]["final"]["positional_channels"] == sorted(PLANTED.values())
    assert json.loads(out.read_text())["results"]["final"]["top_channels"] == doc["results"]["final"]["top_channels"]
    assert csv.read_text().splitlines()[0].startswith("layer,channel,lr_mean")
    assert doc["settings"]["fraction"] == 0.25 and doc["settings"]["protocol"] == "holdout"
    assert doc["store"]["model"] == "synthetic" and "command" in doc
    # the human-readable report goes to stderr, never stdout
    assert "stack R²" in res.stderr and "most positional channels" in res.stderr
    assert "stack R²" not in res.stdout


def test_old_short_flags_work_and_warn(cli, planted_store):
    """-r and -k (now --recursive and cluster counts elsewhere) still mean --repeats and --top-k, with a warning."""
    new = _json(cli(["probe", planted_store, "--fraction", "0.25", "--repeats", "2", "--top-k", "1", "--json", "-q"]))
    res = cli(["probe", planted_store, "--fraction", "0.25", "-r", "2", "-k", "1", "--json", "-q"])
    old = _json(res)
    assert old["settings"]["repeats"] == 2 and old["settings"]["top_k"] == 1
    assert old["results"] == new["results"]
    warned = " ".join(res.stderr.split())
    assert "-r (for --repeats) is deprecated" in warned and "-k (for --top-k) is deprecated" in warned
    assert cli(["probe", "positional", planted_store, "--fraction", "0.25", "-q"]).exit_code == 0


def test_quiet_without_json_prints_nothing_on_stdout(cli, planted_store, tmp_path):
    res = cli(["probe", planted_store, "--fraction", "0.25", "--quiet", "-o", tmp_path / "r.json"])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""
    assert (tmp_path / "r.json").exists()


def test_dino_saw_is_reproducible_on_the_command_line(cli, tmp_path):
    rng = np.random.default_rng(1)
    store = write_store(tmp_path / "noise.h5", [rng.normal(size=(37, 37, 16)).astype(np.float32) for _ in range(2)])
    runs = [_json(cli(["probe", store, "--protocol", "dino-saw", "--no-extras", "--json", "-q"])) for _ in range(2)]
    for doc in runs:
        doc.pop("created")
    assert runs[0] == runs[1]
    assert runs[0]["settings"]["seed"] == 100001 and runs[0]["settings"]["evaluated_on"] == "all tokens"
    warned = cli(["probe", store, "--protocol", "dino-saw", "--alpha", "5", "--no-extras", "-q"])
    assert warned.exit_code == 0 and "not the published setting" in warned.stderr


def test_all_layers_fingerprint_table(cli, tmp_path):
    from posvit_cli.core.features.writer import StoreWriter

    rng = np.random.default_rng(2)
    path = tmp_path / "layers.h5"
    with StoreWriter(path, provenance={"model": "synthetic", "patch_size": 16, "channels": 32},
                     layers=["block0", "final"], dtype="float32") as w:
        for i in range(2):
            g = planted_grid(rng, 12, 12, 32)
            w.add(f"im{i}.png", {"block0": rng.normal(size=g.shape).astype(np.float32), "final": g},
                  orig_size=(192, 192), proc_size=(192, 192))
    res = cli(["probe", path, "--all-layers", "--fraction", "0.25", "--json"])
    doc = _json(res)
    assert doc["layers"] == ["block0", "final"] and doc["primary_layer"] == "final"
    assert "per layer" in res.stderr
    only = _json(cli(["probe", path, "--layer", "0", "--fraction", "0.25", "--json", "-q"]))
    assert only["layers"] == ["block0"]


def test_extract_piped_into_probe(image_dir):
    """`posvit extract imgs/ | posvit probe` with real pipes and a random tiny ViT."""
    ext = run_posvit(["extract", image_dir, "--model", TINY_MODEL, "--weights", "random", "--quiet"])
    assert ext.returncode == 0, ext.stderr.decode()
    res = run_posvit(["probe", "--fraction", "0.25", "--repeats", "2", "--json", "--quiet"], input=ext.stdout)
    assert res.returncode == 0, res.stderr.decode()
    doc = json.loads(res.stdout)
    assert doc["store"]["n_images"] == 7 and doc["store"]["model"] == TINY_MODEL
    assert doc["store"]["channels"] == 64 and len(doc["results"]["final"]["channel_r2"]["lr"]["mean"]) == 64
    assert {tuple(im["grid"]) for im in doc["images"]} == {(6, 8), (4, 4)}
    assert doc["store"]["preprocessing"] is not None and "weights_sha256" in doc["store"]


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2


def _fails(res, message, after_progress=False):
    """Exit 2 with exactly one error line (the last line; progress bars may precede it), no traceback."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert "Traceback" not in res.stderr
    if not after_progress:
        assert len(lines) == 1, res.stderr
    assert message in errors[0], errors[0]


def test_empty_store(cli, tmp_path):
    store = write_store(tmp_path / "empty.h5", [], provenance={"channels": 8})
    _fails(cli(["probe", store]), "holds no images")


def test_maps_only_store(cli, tmp_path):
    store = write_store(tmp_path / "maps.h5", [np.zeros((4, 5, 1))], layers=(), provenance={"channels": 0},
                        maps={"labels": [np.zeros((4, 5), np.int32)]})
    _fails(cli(["probe", store]), "no feature layers (a maps-only store: labels)")


def test_one_by_one_grid(cli, tmp_path):
    store = write_store(tmp_path / "dot.h5", [np.ones((1, 1, 8), np.float32)], names=["dot.png"])
    _fails(cli(["probe", store]), "'dot' has a 1×1 token grid")


def test_nonfinite_features_name_the_images(cli, tmp_path):
    rng = np.random.default_rng(3)
    grids = [rng.normal(size=(12, 12, 8)).astype(np.float32) for _ in range(3)]
    grids[0][0, 0, 0] = np.nan
    grids[2][5, 5, 5] = np.inf
    store = write_store(tmp_path / "bad.h5", grids, names=["good_a.png", "broken.png", "worse.png"])
    store_names = write_store(tmp_path / "bad2.h5", grids, names=["cracked.png", "fine.png", "dark.png"])
    _fails(cli(["probe", store, "--fraction", "0.2"]), "'good_a', 'worse'", after_progress=True)
    _fails(cli(["probe", store_names, "--fraction", "0.2"]), "NaN or inf: 'cracked', 'dark'", after_progress=True)


def test_unknown_target(cli, planted_store):
    _fails(cli(["probe", planted_store, "--targets", "lr,updown"]), "unknown target 'updown'")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "block9"], "layer 'block9' is not in"),
        (["--layer", "final", "--all-layers"], "either --layer or --all-layers"),
        (["--fraction", "0.001"], "training token(s) with --fraction"),
        (["--alpha", "0"], "--alpha > 0"),
    ],
)
def test_bad_options(cli, planted_store, args, message):
    _fails(cli(["probe", planted_store, *args]), message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sampling", "spiral"], "'spiral' is not one of 'random', 'grid', 'grid-holdout'"),
        (["--protocol", "paper"], "'paper' is not one of 'holdout', 'dino-saw'"),
        (["--regressor", "lasso"], "'lasso' is not one of 'ridge', 'ols'"),
        (["--repeats", "0"], "Invalid value for '--repeats': Input should be greater than or equal to 1"),
        (["--fraction", "1.5"], "Invalid value for '--fraction'"),
    ],
)
def test_bad_choices_and_ranges_are_usage_errors(cli, planted_store, args, message):
    """Choices and ranges are checked by Click before any work: exit 2 with the allowed values named."""
    res = cli(["probe", planted_store, *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


def test_missing_store(cli, tmp_path):
    _fails(cli(["probe", tmp_path / "nowhere.h5"]), "does not exist")


def test_a_too_small_grid_is_left_out_and_named_not_the_whole_store(cli, tmp_path):
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:12, 0:12].astype(np.float32)
    grids = [rng.normal(0, 0.1, (12, 12, 8)).astype(np.float32) for _ in range(2)]
    for g in grids:
        g[..., 2] += xx / 11  # a planted left-right ramp in channel 2
    alone = write_store(tmp_path / "two.h5", grids, names=["a.png", "b.png"])
    mixed = write_store(tmp_path / "three.h5", [grids[0], np.ones((1, 1, 8), np.float32), grids[1]],
                        names=["a.png", "dot.png", "b.png"])
    r = cli(["probe", mixed, "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert "left 1 image(s) out of the probe" in r.stderr and "'dot'" in r.stderr
    doc, ref = json.loads(r.stdout), json.loads(cli(["probe", alone, "--json", "-q"]).stdout)
    assert [im["name"] for im in doc["images"]] == ["a", "b"]
    assert doc["results"]["final"]["stack_r2"] == ref["results"]["final"]["stack_r2"]  # as if it were not there
    assert any("dot" in n for n in doc["notes"])

"""One vocabulary across posvit: every --help renders cleanly, short flags mean one thing, old spellings warn."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_MODEL

# -------------------------------------------------------------------------------------------------- the tree


def _command_tree():
    from typer.main import get_command

    from posvit_cli.app import app

    def walk(command, path):
        yield path, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(get_command(app), []))


TREE = _command_tree()

def _paths():
    return [pytest.param(path, id=" ".join(path) or "posvit") for path, _ in TREE]


def _visible_options(command):
    return [p for p in command.params if getattr(p, "param_type_name", "") == "option" and not p.hidden]


def _help(path):
    from typer.testing import CliRunner

    from posvit_cli.app import app

    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "240", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    return r.stdout


def _significant_digits(text: str) -> int:
    mantissa = text.lower().split("e")[0].lstrip("+-").replace(".", "").lstrip("0")
    return len(mantissa.rstrip("0")) if "." in text.lower().split("e")[0] else len(mantissa)


def test_the_tree_has_every_command():
    names = {" ".join(p) for p, _ in TREE}
    assert {"extract", "probe", "debias-train", "cluster", "report", "doctor", "segment train", "segment apply",
            "segment eval", "segment bench", "viz pca", "viz segmentation", "store info", "store merge"} <= names


@pytest.mark.parametrize("path", _paths())
def test_help_renders_lists_choices_and_shows_no_bool_nor_long_floats(path):
    command = dict((tuple(p), c) for p, c in TREE)[tuple(path)]
    text = _help(path)
    flat = " ".join(text.split())
    assert "<bool>" not in text
    for param in _visible_options(command):
        choices = getattr(getattr(param, "type_descriptor", None), "choices", None)
        if choices:
            for choice in choices:
                value = getattr(choice, "value", choice)
                assert str(value) in flat, f"{param.opts[0]} does not list its choice {value}"
        if isinstance(param.default, float) and param.show_default in (None, True):  # a string is shown instead
            assert _significant_digits(repr(param.default)) <= 4, f"{param.opts[0]} default {param.default!r}"
    for shown in re.findall(r"default: ([-+0-9.e]+)\]", flat):
        if "." in shown or "e" in shown:
            assert _significant_digits(shown) <= 4, f"default {shown} printed unrounded"


def test_significant_digits_counter():
    assert _significant_digits("0.0278") == 3
    assert _significant_digits("0.027777777777777776") == 17
    assert _significant_digits("3.0") == 1
    assert _significant_digits("1e-05") == 1


#: The one meaning of each short flag that several commands share.
SHORT_FLAGS = {"-o": "--output", "-r": "--recursive", "-l": "--layer", "-k": "--k", "-m": "--model",
               "-w": "--weights", "-b": "--batch-size", "-q": "--quiet", "-h": "--help"}


@pytest.mark.parametrize("path", _paths())
def test_shared_short_flags_mean_one_thing(path):
    command = dict((tuple(p), c) for p, c in TREE)[tuple(path)]
    for param in _visible_options(command):
        longs = [o for o in param.opts if o.startswith("--")]
        for short in (o for o in param.opts if re.fullmatch(r"-[A-Za-z]", o)):
            if short in SHORT_FLAGS:
                assert SHORT_FLAGS[short] in longs, f"{short} is {longs} here, {SHORT_FLAGS[short]} elsewhere"


def test_every_short_flag_maps_to_one_long_name_across_merged_commands():
    meaning: dict[str, set[str]] = {}
    for path, command in TREE:
        for param in _visible_options(command):
            longs = sorted(o for o in param.opts if o.startswith("--"))
            for short in (o for o in param.opts if re.fullmatch(r"-[A-Za-z]", o)):
                meaning.setdefault(short, set()).add(longs[0] if longs else short)
    assert {s: m for s, m in meaning.items() if len(m) > 1} == {}
    assert meaning["-l"] == {"--layer"} and meaning["-r"] == {"--recursive"} and meaning["-k"] == {"--k"}


def test_device_defaults_to_auto_everywhere():
    for path, command in TREE:
        for param in _visible_options(command):
            if "--device" in param.opts:
                assert param.default == "auto", " ".join(path)


# ---------------------------------------------------------------------------------------- old spellings
def _deprecated(output: str, old: str) -> bool:
    return any(ln.startswith("warning:") and f"{old} is deprecated" in ln for ln in output.splitlines())


def _label_folders(tmp_path):
    """Three 32×32 images of two textures (left/right halves) with dense ground truth (classes 0, 1), its perfect
    prediction (values 1, 2: class k is k + 1) and scribbles."""
    imgs, gt, scribbles, pred = tmp_path / "imgs", tmp_path / "gt", tmp_path / "scribbles", tmp_path / "pred"
    for d in (imgs, gt, scribbles, pred):
        d.mkdir()
    rng = np.random.default_rng(0)
    truth = np.zeros((32, 32), np.uint8)
    truth[:, 16:] = 1
    for i in range(3):
        img = np.where(truth == 0, 60, 190) + rng.normal(0, 5, (32, 32))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(imgs / f"im{i}.png")
        Image.fromarray(truth).save(gt / f"im{i}.png")
        Image.fromarray(truth + 1).save(pred / f"im{i}.png")
        lines = np.zeros_like(truth)
        lines[4:28, 6] = 1
        lines[4:28, 25] = 2
        Image.fromarray(lines).save(scribbles / f"im{i}.png")
    return imgs, gt, scribbles


def test_segment_eval_gt_still_works_and_warns(tmp_path, cli):
    imgs, gt, _ = _label_folders(tmp_path)
    pred = tmp_path / "pred"
    new = cli(["segment", "eval", pred, "--masks", gt, "--json", "-q", "--grid", "4"])
    old = cli(["segment", "eval", pred, "--gt", gt, "--json", "-q", "--grid", "4"])
    assert new.exit_code == 0 and old.exit_code == 0, old.output
    assert _deprecated(old.output, "--gt") and not _deprecated(new.output, "--gt")
    assert json.loads(old.stdout)["summary"]["dataset_miou"] == json.loads(new.stdout)["summary"]["dataset_miou"] == 1.0
    both = cli(["segment", "eval", pred, "--gt", gt, "--masks", gt])
    assert both.exit_code == 2 and "give --masks once" in both.output


def test_segment_train_old_l_and_classes_still_work_and_warn(tmp_path, cli):
    imgs, gt, scribbles = _label_folders(tmp_path)
    fast = ["--sigmas", "1", "--trees", "5", "--depth", "2", "--json", "-q"]
    r = cli(["segment", "train", imgs, "-l", scribbles, "--classes", "dark,bright", "-o", tmp_path / "m.posvit-seg",
             *fast])
    assert r.exit_code == 0, r.output
    assert _deprecated(r.output, "-l (for --labels)") and _deprecated(r.output, "--classes")
    assert json.loads(r.stdout)["classes"]["names"] == ["dark", "bright"]
    # the old spellings give the model the new ones give
    r2 = cli(["segment", "train", imgs, "--labels", scribbles, "--class-names", "dark,bright", "-o",
              tmp_path / "n.posvit-seg", *fast])
    assert r2.exit_code == 0 and not _deprecated(r2.output, "--classes")
    a, b = json.loads(r.stdout), json.loads(r2.stdout)
    assert a["classes"] == b["classes"] and a["training"]["pixels_per_class"] == b["training"]["pixels_per_class"]
    # and -l next to --layer would be ambiguous no more: segment train's -l is not --layer's short form
    assert cli(["segment", "train", imgs, "-o", tmp_path / "x.posvit-seg"]).exit_code == 2


def test_segment_bench_gt_still_works_and_warns(tmp_path, cli):
    imgs, gt, _ = _label_folders(tmp_path)
    r = cli(["segment", "bench", imgs, "--gt", gt, "--train", "2", "--rounds", "0", "--sigmas", "1", "--trees", "5",
             "--depth", "2", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert _deprecated(r.output, "--gt")
    out = json.loads(r.stdout)
    assert out["test_images"] == [str(imgs / "im2.png")]
    assert out["configs"][0]["rounds"][0]["class_avg_miou_mean"] > 0.9  # two flat textures, split by intensity


def test_viz_segmentation_truth_and_label_still_work_and_warn(tmp_path, cli):
    imgs, gt, _ = _label_folders(tmp_path)
    r = cli(["viz", "segmentation", imgs, tmp_path / "pred", "--truth", gt, "--label", "mine", "-o", tmp_path / "out", "--json",
             "-q"])
    assert r.exit_code == 0, r.output
    assert _deprecated(r.output, "--truth") and _deprecated(r.output, "--label")
    fig = json.loads(r.stdout)["figures"][0]
    assert fig["numbers"]["miou"] == 1.0
    assert "mine" in json.dumps(fig)


def _ramp_store(path):
    from conftest import write_store

    yy, xx = np.mgrid[0:6, 0:8].astype(np.float32)
    rng = np.random.default_rng(0)
    grids = []
    for _ in range(2):
        g = rng.normal(0, 0.1, (6, 8, 8)).astype(np.float32)
        g[..., 3] += xx / 7.0  # a planted left-right ramp in channel 3
        grids.append(g)
    return write_store(path, grids)


def test_viz_channels_old_k_still_works_and_warns(tmp_path, cli):
    store = _ramp_store(tmp_path / "f.h5")
    r = cli(["viz", "channels", store, "-o", tmp_path / "out", "-k", "1", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert _deprecated(r.output, "-k (for --top-k)")
    rows = {c["channel"]: c for c in json.loads(r.stdout)["figures"][0]["numbers"]["channels"]}
    assert "lr" in rows[3]["top_of"]


def test_viz_pca_old_label_still_works_and_warns(tmp_path, cli):
    store = _ramp_store(tmp_path / "f.h5")
    r = cli(["viz", "pca", store, "-o", tmp_path / "out", "--label", "oldname", "--no-score", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert _deprecated(r.output, "--label")
    assert "oldname" in json.dumps(json.loads(r.stdout))


def test_extract_old_transforms_still_works_and_warns(tmp_path, cli):
    img = tmp_path / "imgs"
    img.mkdir()
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(img / "a.png")
    common = [img, "-m", TINY_MODEL, "-w", "random", "--device", "cpu", "-q"]
    old = cli(["extract", *common, "--transforms", "flip-lr", "-o", tmp_path / "old.h5"])
    new = cli(["extract", *common, "--transform", "flip-lr", "-o", tmp_path / "new.h5"])
    assert old.exit_code == 0 and new.exit_code == 0, old.output
    assert _deprecated(old.output, "--transforms") and not _deprecated(new.output, "--transforms")
    from posvit_cli.core.features.store import FeatureStore

    with FeatureStore(tmp_path / "old.h5") as a, FeatureStore(tmp_path / "new.h5") as b:
        assert a.provenance.get("transform") == b.provenance.get("transform") == "flip-lr"
        assert np.array_equal(a.features(0), b.features(0))


def test_bad_choice_and_out_of_range_values_are_one_error_line(cli, tmp_path):
    for args, pattern in [
        (["cluster", "x.h5", "--protocol", "leopart"], r"'leopart' is not one of 'standard', 'in-training'"),
        (["segment", "apply", "m.posvit-seg", "a.png", "-o", tmp_path, "--tile", "3"], r"--tile"),
        (["extract", "a.png", "--precision", "fp8"], r"'fp8' is not one of"),
        (["viz", "pca", "x.h5", "--upsample", "cubic"], r"'cubic' is not one of"),
    ]:
        r = cli(args)
        assert r.exit_code == 2, (args, r.output)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), (args, r.output)


def test_output_rule_is_documented_in_options():
    import posvit_cli.options as options

    doc = options.__doc__
    assert "store outputs" in doc and "folder outputs" in doc and "-o" in doc

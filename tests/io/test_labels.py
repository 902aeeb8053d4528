"""The label convention: one reader (grey, palette, RGB, TIFF), the off-by-one check, and the commands using them.

Dense masks hold class indices 0..C-1 with an ignore value (255); scribbles and predictions hold 0 = unlabelled and
k + 1 = class k (docs/labels.md).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import write_store
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.io.labels import (
    ColourLabelsError, LabelCheck, LabelImageError, UnknownColourError, check_label_range, decode_labels,
    read_label_image,
)

#: A 4×6 class map with every class 0..2 and two unlabelled (255) pixels.
CLASSES = np.array([[0, 0, 1, 1, 2, 2],
                    [0, 0, 1, 1, 2, 2],
                    [0, 1, 1, 2, 2, 2],
                    [255, 255, 0, 0, 1, 1]], np.uint8)
COLOURS = [(200, 0, 0), (0, 160, 0), (0, 0, 90)]
#: The class index of each pixel, -1 where unlabelled.
INDEX = np.where(CLASSES == 255, -1, CLASSES.astype(np.int64))


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, PosvitWarning)]


# --------------------------------------------------------------------------------------------------------------
# The reader


def test_grey_png_mask_gives_class_indices_and_the_ignore_mask(tmp_path):
    Image.fromarray(CLASSES).save(tmp_path / "m.png")
    m = read_label_image(tmp_path / "m.png", "mask")
    assert m.values.dtype == np.int32
    np.testing.assert_array_equal(m.values, CLASSES)
    np.testing.assert_array_equal(m.ignored, CLASSES == 255)
    np.testing.assert_array_equal(m.classes, INDEX)
    # with no ignore value, 255 is a class like any other
    assert not read_label_image(tmp_path / "m.png", "mask", ignore_index=None).ignored.any()


def test_palette_png_decodes_to_palette_indices_not_colours(tmp_path):
    im = Image.fromarray(CLASSES, mode="P")
    pal = [0] * 768
    for i, c in enumerate(COLOURS):
        pal[3 * i: 3 * i + 3] = c
    pal[3 * 255: 3 * 255 + 3] = (224, 224, 192)  # VOC's border colour
    im.putpalette(pal)
    im.save(tmp_path / "voc.png")
    assert Image.open(tmp_path / "voc.png").mode == "P"
    m = read_label_image(tmp_path / "voc.png", "mask")
    np.testing.assert_array_equal(m.values, CLASSES)
    np.testing.assert_array_equal(m.ignored, CLASSES == 255)


def test_rgb_mask_maps_colours_through_the_table_and_black_is_unlabelled(tmp_path):
    rgb = np.zeros(CLASSES.shape + (3,), np.uint8)
    for k, c in enumerate(COLOURS):
        rgb[CLASSES == k] = c
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    m = read_label_image(tmp_path / "rgb.png", "mask", colours=COLOURS)
    np.testing.assert_array_equal(m.classes, INDEX)
    assert m.values[3, 0] == 255 and m.colours == COLOURS
    # the same file as scribbles: 0 = unlabelled, colour k = value k + 1
    s = read_label_image(tmp_path / "rgb.png", "scribbles", colours=COLOURS)
    np.testing.assert_array_equal(s.values, np.where(CLASSES == 255, 0, CLASSES.astype(int) + 1))
    # "sorted": the file's own colours by 0xRRGGBB code -- (0,0,90) < (0,160,0) < (200,0,0)
    srt = read_label_image(tmp_path / "rgb.png", "mask", colours="sorted")
    np.testing.assert_array_equal(srt.classes, np.where(INDEX < 0, -1, 2 - INDEX))
    # typed errors, no message matching: no table, and a colour outside the table
    with pytest.raises(ColourLabelsError, match="colour"):
        read_label_image(tmp_path / "rgb.png", "mask")
    with pytest.raises(UnknownColourError, match=r"\(200, 0, 0\)"):
        read_label_image(tmp_path / "rgb.png", "mask", colours=COLOURS[1:])
    assert issubclass(ColourLabelsError, PosvitError) and issubclass(UnknownColourError, LabelImageError)


def test_grey_stored_as_rgb_is_read_as_values(tmp_path):
    Image.fromarray(np.repeat(CLASSES[..., None], 3, axis=-1)).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_label_image(tmp_path / "g.png", "mask").values, CLASSES)


def test_16_bit_tiff_mask_keeps_values_above_255(tmp_path):
    big = CLASSES.astype(np.uint16) * 300  # classes 0, 300, 600 and 76500 → a 16-bit ignore value
    big[CLASSES == 255] = 65535
    tifffile.imwrite(tmp_path / "m.tif", big)
    m = read_label_image(tmp_path / "m.tif", "mask", ignore_index=65535)
    np.testing.assert_array_equal(m.values, big.astype(np.int64))
    np.testing.assert_array_equal(m.ignored, CLASSES == 255)
    assert set(np.unique(m.classes)) == {-1, 0, 300, 600}


def test_scribbles_and_predictions_are_one_based(tmp_path):
    scrib = np.array([[0, 0, 1], [2, 0, 3]], np.uint8)
    Image.fromarray(scrib).save(tmp_path / "s.png")
    for role in ("scribbles", "prediction"):
        s = read_label_image(tmp_path / "s.png", role)
        np.testing.assert_array_equal(s.classes, [[-1, -1, 0], [1, -1, 2]])
        np.testing.assert_array_equal(s.ignored, scrib == 0)


def test_undecodable_and_float_labels_raise_typed_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(LabelImageError, match="cannot read label image"):
        decode_labels(tmp_path / "bad.png")
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.5, 1.0]], np.float32))
    with pytest.raises(LabelImageError, match="non-integer"):
        decode_labels(tmp_path / "f.tif")


# --------------------------------------------------------------------------------------------------------------
# The off-by-one check


def _check(role, C, arrays, ignore=255):
    chk = LabelCheck(role, C)
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        chk.add(a, f"masks/{'ab'[i]}.png", (a == ignore) if role == "mask" else None)
    return _warnings_of(chk.finish)


def test_one_based_masks_warn_once_naming_the_file_and_the_fix():
    msg, caught = _check("mask", 3, [[[1, 2, 255]], [[3, 3, 1]]])
    assert caught == [msg]
    assert msg.startswith("masks/b.png holds 1..3 but classes are 0..2: labels look 1-based; subtract 1")
    # the number of classes unknown: no mask holds 0, values 1..M
    msg, _ = _check("mask", None, [[[1, 2]], [[3, 255]]])
    assert "masks/b.png holds 1..3 and no mask holds 0" in msg and "1-based" in msg
    # 1-based with 0 as unlabelled (the old segment convention): values exactly 0..C
    msg, _ = _check("mask", 2, [[[0, 1, 2]]])
    assert "holds 0..2 but classes are 0..1" in msg and "0 as unlabelled" in msg


def test_correct_masks_do_not_warn():
    for C, arrays in [(3, [[[0, 1, 2, 255]], [[2, 1]]]),      # all classes
                      (3, [[[1, 2]], [[0, 255]]]),              # 0 in another file
                      (None, [[[0, 1, 2]]]),
                      (None, [[[1, 1]]]),                       # one value: no evidence
                      (4, [[[1, 2, 3]]])]:                      # 0 missing but C-1 is the top: not 1..C
        msg, caught = _check("mask", C, arrays)
        assert msg is None and caught == [], (C, arrays)


def test_zero_based_predictions_warn_and_one_based_do_not():
    msg, caught = _check("prediction", 3, [[[0, 1, 2]]])
    assert caught == [msg] and "masks/a.png holds 0..2 but classes are 1..3" in msg and "0-based" in msg
    assert _check("prediction", 3, [[[1, 2, 3]]])[0] is None
    assert _check("prediction", None, [[[1, 2]], [[2, 1]]])[0] is None
    # scribbles: 0 is normal; 0..C-1 with C never is the shifted case
    assert "scribbles look 0-based" in _check("scribbles", 3, [[[0, 0, 0, 1, 2]]])[0]
    assert _check("scribbles", 3, [[[0, 0, 0, 1, 3]]])[0] is None


def test_range_error_says_one_based():
    with pytest.raises(PosvitError, match=r"holds label 3, which is ≥ --num-classes 3.*look 1-based"):
        check_label_range(np.array([[1, 2, 3]]), "masks/a.png", 3, 255)


# --------------------------------------------------------------------------------------------------------------
# The commands


def _blob_store(tmp_path, one_based):
    """Two classes laid out left/right in features and masks (8×8 tokens of 16 px)."""
    rng = np.random.default_rng(0)
    mdir = tmp_path / "masks"
    mdir.mkdir()
    grids, names = [], []
    means = rng.normal(size=(2, 16)) * 10
    for i in range(4):
        lab = np.zeros((8, 8), int)
        lab[:, 4 * (i % 2): 4 * (i % 2) + 4] = 1
        grids.append((means[lab] + rng.normal(size=(8, 8, 16))).astype(np.float32))
        names.append(f"img{i}.png")
        mask = lab.repeat(16, 0).repeat(16, 1).astype(np.uint8) + (1 if one_based else 0)
        Image.fromarray(mask).save(mdir / f"img{i}.png")
    return write_store(tmp_path / "f.h5", grids, names=names), mdir


@pytest.mark.parametrize("one_based", [False, True])
def test_cluster_warns_on_one_based_masks_only(tmp_path, cli, one_based):
    store, mdir = _blob_store(tmp_path, one_based)
    r = cli(["cluster", store, "-k", "2", "--masks", mdir, "--seeds", "0", "--n-init", "1", "--device", "cpu",
             "-o", tmp_path / "l.h5"])
    assert r.exit_code == 0, r.output
    if one_based:
        assert r.output.count("labels look 1-based") == 1
        assert "img0.png holds 1..2 and no mask holds 0" in r.output
    else:
        assert "1-based" not in r.output and "100.00" in r.output


def _eval_case(tmp_path, gt):
    for d in ("pred", "gt"):
        (tmp_path / d).mkdir(exist_ok=True)
    pred = np.ones((8, 8), np.uint8)
    pred[:, 4:] = 2                                   # predictions: class 0 → 1, class 1 → 2
    Image.fromarray(pred).save(tmp_path / "pred" / "x.png")
    Image.fromarray(gt.astype(np.uint8)).save(tmp_path / "gt" / "x.png")


def test_segment_eval_scores_zero_based_ground_truth_and_warns_on_one_based(tmp_path, cli):
    truth = np.zeros((8, 8), np.uint8)
    truth[:, 4:] = 1
    _eval_case(tmp_path, truth)
    args = ["segment", "eval", tmp_path / "pred", "--masks", tmp_path / "gt", "--json", "--grid", "4"]
    r = cli(args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["dataset_miou"] == 1.0
    assert "look" not in r.stderr
    # the same truth 1-based: warned, naming the file and the fix
    _eval_case(tmp_path, truth + 1)
    r = cli(args)
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning:") == 1
    assert "x.png holds 1..2 and no mask holds 0" in r.stderr and "subtract 1 from the ground truth" in r.stderr
    # the old spelling keeps the old reading (1-based, 0 unlabelled) and says it is deprecated
    r = cli(args + ["--gt-offset", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["summary"]["dataset_miou"] == 1.0
    assert "--gt-offset is deprecated" in r.stderr


def test_segment_eval_ignore_index_leaves_pixels_out(tmp_path, cli):
    truth = np.zeros((8, 8), np.uint8)
    truth[:, 4:] = 1
    truth[:, 6:] = 255            # unlabelled columns 6, 7
    _eval_case(tmp_path, truth)
    pred = np.ones((8, 8), np.uint8)
    pred[:, 4:6] = 2              # columns 6, 7 predicted as class 0: wrong only if 255 counted
    Image.fromarray(pred).save(tmp_path / "pred" / "x.png")
    base = ["segment", "eval", tmp_path / "pred", "--masks", tmp_path / "gt", "--json", "-q", "--grid", "4"]
    assert json.loads(cli(base).stdout)["summary"]["dataset_miou"] == 1.0
    out = json.loads(cli(base + ["--ignore-index", "-1"]).stdout)["summary"]
    # 255 is now a class of its own (value 256) that is never predicted: IoU 0
    assert out["dataset_miou"] < 1.0


def test_viz_segmentation_legend_names_follow_class_indices(tmp_path, cli):
    imgs, pred, gt = tmp_path / "imgs", tmp_path / "pred", tmp_path / "gt"
    for d in (imgs, pred, gt):
        d.mkdir()
    truth = np.zeros((32, 48), np.uint8)
    truth[:, 16:] = 1
    truth[:, 32:] = 2
    truth[:4] = 255
    Image.fromarray((np.random.default_rng(0).random((32, 48)) * 255).astype(np.uint8)).save(imgs / "a.png")
    Image.fromarray(truth).save(gt / "a.png")
    Image.fromarray(np.where(truth == 255, 1, truth + 1).astype(np.uint8)).save(pred / "a.png")  # segment apply
    r = cli(["viz", "segmentation", imgs, pred, "--masks", gt, "--class-names", "matrix,grain,pore",
             "-o", tmp_path / "out", "--json"])
    assert r.exit_code == 0, r.output
    numbers = json.loads(r.stdout)["figures"][0]["numbers"]
    assert [(e["class"], e["name"]) for e in numbers["legend"]] == [(0, "matrix"), (1, "grain"), (2, "pore")]
    assert numbers["miou"] == 1.0
    assert "look" not in r.stderr
    # 0-based predictions: the legend would shift, so the run says so once
    Image.fromarray(np.where(truth == 255, 0, truth).astype(np.uint8)).save(pred / "a.png")
    r = cli(["viz", "segmentation", imgs, pred, "--class-names", "matrix,grain,pore", "-o", tmp_path / "o2",
             "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("values look 0-based") == 1 and "a.png holds 0..2 but classes are 1..3" in r.stderr


def test_training_scribbles_that_look_zero_based_are_named(tmp_path, cli):
    from posvit_cli.core.segment.training_labels import load_training_labels

    (tmp_path / "imgs").mkdir()
    (tmp_path / "lab").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a.png")
    scrib = np.zeros((8, 8), np.uint8)
    scrib[0, :4] = 1                    # classes painted 0 (lost: 0 is unlabelled) and 1
    Image.fromarray(scrib).save(tmp_path / "lab" / "a.png")
    with pytest.raises(PosvitError, match=r"class 'b' \(value 2\).*0-based: add 1"):
        load_training_labels([tmp_path / "imgs" / "a.png"], tmp_path / "lab", class_names=["a", "b"])


def test_rare_colours_are_the_anti_aliased_handful_not_small_classes():
    from posvit_cli.core.io.labels import rare_colours

    a = np.zeros((64, 64, 3), np.uint8)
    a[:20, :] = (255, 0, 0)  # 1280 px
    a[40:, :] = (0, 255, 0)  # 1536 px
    a[30, 0] = (250, 3, 2)  # one anti-aliased pixel
    a[31, :2] = (128, 0, 0)  # two more
    b = np.zeros((64, 64, 3), np.uint8)
    b[30:33, 10:20] = (0, 0, 255)  # a small but real class: 30 px (not < 20)
    b[0, 0] = (128, 0, 0)
    # 2850 labelled px, 0.1 % of them is 2.85 px: only the 1 px colour is below both limits (< 20 px and < 0.1 %);
    # at 1 % (28.5 px) the 3 px colour (2 in a.png, 1 in b.png: named by a.png) is too, the 30 px class never is
    assert rare_colours({"a.png": a, "b.png": b}) == [((250, 3, 2), 1, "a.png")]
    assert rare_colours({"a.png": a, "b.png": b}, max_fraction=0.01) == [((250, 3, 2), 1, "a.png"),
                                                                         ((128, 0, 0), 3, "a.png")]
    assert rare_colours({"b.png": b}) == []  # 31 labelled px: nothing is below 0.1 % of them


def test_label_values_are_int32_unless_a_value_needs_int64(tmp_path):
    small = np.array([[0, 1], [2, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", small)
    assert decode_labels(tmp_path / "s.tif").dtype == np.int32
    huge = np.array([[0, 1], [2, 2**32 - 2]], np.uint32)         # a 32-bit instance label beyond int32
    tifffile.imwrite(tmp_path / "h.tif", huge)
    values = decode_labels(tmp_path / "h.tif")
    assert values.dtype == np.int64
    np.testing.assert_array_equal(values, huge.astype(np.int64))


def test_reading_a_large_prediction_costs_one_int32_copy_per_array(tmp_path):
    import tracemalloc

    pred = np.ones((2000, 2000), np.uint8)
    pred[:, :1000] = 2
    pred[:10, :10] = 0                                            # unlabelled
    Image.fromarray(pred).save(tmp_path / "p.png")
    tracemalloc.start()
    m = read_label_image(tmp_path / "p.png", "prediction")
    classes = m.classes
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert classes[0, 0] == -1 and classes[-1, 0] == 1 and classes[-1, -1] == 0
    # decoded uint8 (4 MB) + values int32 (16 MB) + ignored (4 MB) + classes int32 (16 MB); int64 and a
    # np.where temporary cost 3x that
    assert peak < 45e6, peak

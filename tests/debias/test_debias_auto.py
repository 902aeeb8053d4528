"""`posvit debias-train auto`: known answers of the choice on stores with and without planted position."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_MODEL, write_store

H = W = 16
C = 64
PROTOS = 24


def _planted(path, *, ramp: float, n: int = 12, seed: int = 0, masks=None, label: str = "proto"):
    """A store of ``n`` 16×16 grids: each token one of 24 content prototypes (channels 2..63) plus small noise, and
    channels 0 and 1 pure position (x and y ramps of amplitude ``ramp``, nothing else but 0.01 noise).

    ``masks``: a folder to write 256×256 px class masks into: ``proto`` (the prototype: content) or ``half``
    (left/right half of the image: carried by the x ramp only).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((PROTOS, C))
    protos[:, :2] = 0
    yy, xx = np.mgrid[0:H, 0:W]
    grids, names = [], []
    for i in range(n):
        cls = rng.integers(0, PROTOS, size=(H, W))
        g = protos[cls] + 0.05 * rng.standard_normal((H, W, C))
        g[..., :2] = 0.01 * rng.standard_normal((H, W, 2))
        g[..., 0] += ramp * (xx / (W - 1) * 2 - 1)
        g[..., 1] += ramp * (yy / (H - 1) * 2 - 1)
        grids.append(g.astype(np.float32))
        names.append(f"img{i:03d}.png")
        if masks is not None:
            lab = cls if label == "proto" else (xx >= W // 2).astype(np.int64)
            big = np.kron(lab, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
            Image.fromarray(big).save(masks / f"img{i:03d}.png")
    return write_store(path, grids, names=names)


def _pooled_xy_r2(store) -> float:
    """R² of (x, y) from all channels by one pooled least-squares fit over every token (1 = position decodable)."""
    X, Y = [], []
    for rec in store.records:
        h, w = rec.grid
        f = store.features(rec.index, "final").reshape(h * w, -1)
        yy, xx = np.mgrid[0:h, 0:w]
        X.append(f)
        Y.append(np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64))
    X = np.concatenate(X).astype(np.float64)
    X = np.concatenate([X, np.ones((len(X), 1))], 1)
    Y = np.concatenate(Y)
    beta, *_ = np.linalg.lstsq(X, Y, rcond=None)
    res = ((Y - X @ beta) ** 2).sum(0)
    tot = ((Y - Y.mean(0)) ** 2).sum(0)
    return float((1 - res / tot).mean())


def _run(store_path, **kw):
    from posvit_cli.core.debias.auto import AutoSettings, run_auto
    from posvit_cli.core.features.store import FeatureStore

    masks = kw.pop("masks", None)
    fs = FeatureStore(str(store_path))
    try:
        return run_auto(fs, AutoSettings(**kw), masks=masks)
    finally:
        fs.close()


def _rows(table):
    return {r["name"]: r for r in table["rows"]}


def test_planted_position_is_removed_by_the_chosen_head(tmp_path, one_torch_thread):
    from posvit_cli.core.debias.heads import apply_head_to_store
    from posvit_cli.core.features.store import FeatureStore

    masks = tmp_path / "masks"
    masks.mkdir()
    src = _planted(tmp_path / "p.h5", ramp=0.5, masks=masks)
    head, table = _run(src, masks=masks, families=("none", "blank", "posmean", "rasa"))
    rows = _rows(table)
    chosen = rows[table["chosen"]]
    assert table["chosen"] != "none" and head is not None
    assert table["kept_metric"] == "miou"
    # The planted ramps are decodable on held-out images (16 training tokens a fit for 64 channels: R2 0.75) ...
    assert rows["none"]["xy"] > 0.6
    assert chosen["xy"] < 0.0                               # ... and gone after the chosen head
    assert chosen["kept"] >= rows["none"]["kept"] - 0.05    # content (the prototypes) survives
    assert {"posmean", "blank-2", "rasa-1", "rasa-8"} <= set(rows)
    with FeatureStore(str(src)) as fs:
        assert _pooled_xy_r2(fs) > 0.99
        apply_head_to_store(head, fs, tmp_path / "clean.h5")
    with FeatureStore(str(tmp_path / "clean.h5")) as clean:
        assert _pooled_xy_r2(clean) < 0.1


def test_no_position_keeps_none(tmp_path, one_torch_thread):
    src = _planted(tmp_path / "flat.h5", ramp=0.0)
    head, table = _run(src, families=("none", "blank", "posmean", "rasa"))
    rows = _rows(table)
    assert table["kept_metric"] == "knn_agreement"
    assert rows["none"]["knn_agreement"] == pytest.approx(1.0)
    assert rows["none"]["xy"] < 0.0                         # nothing positional to decode
    assert table["chosen"] == "none" and head is None


def test_max_loss_refuses_a_head_that_loses_what_the_masks_need(tmp_path, one_torch_thread):
    """Classes = left/right half: only the planted x ramp carries them, so removing position loses the mIoU."""
    masks = tmp_path / "masks"
    masks.mkdir()
    src = _planted(tmp_path / "half.h5", ramp=0.5, masks=masks, label="half")
    fams = ("none", "blank", "posmean")
    _, strict = _run(src, masks=masks, families=fams, max_loss=0.05)
    rows = _rows(strict)
    assert rows["none"]["miou"] > 0.9
    assert rows["posmean"]["miou"] < rows["none"]["miou"] - 0.3
    assert strict["chosen"] == "none"
    _, loose = _run(src, masks=masks, families=fams, max_loss=1.0)
    assert loose["chosen"] != "none"
    assert _rows(loose)[loose["chosen"]]["xy"] < rows["none"]["xy"] - 0.8


def test_max_r2_rule_and_its_refusal(tmp_path, one_torch_thread):
    from posvit_cli.core.debias.auto import choose, AutoSettings
    from posvit_cli.core.errors import PosvitError

    rows = [{"name": "none", "rank": [0, 0], "xy": 0.9, "null": -0.1, "above_null": 1.0, "kept": 1.0},
            {"name": "blank-2", "rank": [1, 2], "xy": 0.3, "null": -0.1, "above_null": 0.4, "kept": 0.97},
            {"name": "rasa-8", "rank": [4, 8], "xy": 0.0, "null": -0.1, "above_null": 0.1, "kept": 0.80}]
    assert choose(rows, AutoSettings(max_loss=0.05))[0] == "blank-2"      # rasa-8 loses 0.2 > 0.05
    assert choose(rows, AutoSettings(max_loss=0.25))[0] == "rasa-8"
    assert choose(rows, AutoSettings(max_r2=0.5))[0] == "blank-2"
    assert choose(rows, AutoSettings(max_r2=0.05))[0] == "rasa-8"
    with pytest.raises(PosvitError, match="no candidate reaches"):
        choose(rows, AutoSettings(max_r2=-0.5))
    # Below 0 there is no linear evidence of position: a lower (more negative) R2 is no reason to leave `none`.
    flat = [dict(rows[0], xy=-0.3), dict(rows[1], xy=-0.6, kept=1.0)]
    assert choose(flat, AutoSettings())[0] == "none"
    # Within the tie of the best, the simpler candidate wins.
    near = [rows[0], dict(rows[1], xy=0.04), dict(rows[2], xy=0.0, kept=1.0)]
    assert choose(near, AutoSettings())[0] == "blank-2"


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items()
                if k not in ("seconds", "created", "total_seconds", "output", "command")}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def test_cli_writes_an_ordinary_head_and_a_deterministic_table(tmp_path, cli, image_dir, one_torch_thread):
    from posvit_cli.core.debias.heads import apply_head_to_store, load_head
    from posvit_cli.core.features.store import FeatureStore

    src = _planted(tmp_path / "p.h5", ramp=0.5)
    tables = []
    for run in (1, 2):
        head_path, table_path = tmp_path / f"h{run}.safetensors", tmp_path / f"t{run}.json"
        res = cli(["debias-train", "auto", src, "-o", head_path, "--table", table_path, "--seed", "3",
                   "--candidates", "blank,posmean,rasa"])
        assert res.exit_code == 0, res.output
        doc = json.loads(table_path.read_text())
        assert doc["schema"] == "posvit-debias-auto"
        assert sum(r["chosen"] for r in doc["rows"]) == 1
        tables.append(_strip_timing(doc))
    assert tables[0] == tables[1]
    assert "candidate" in res.output and "✓" in res.output
    head = load_head(tmp_path / "h1.safetensors", channels=C)
    assert head.info["auto"]["chosen"] == tables[0]["chosen"]
    with FeatureStore(str(src)) as fs:
        apply_head_to_store(head, fs, tmp_path / "clean.h5")
    with FeatureStore(str(tmp_path / "clean.h5")) as clean:
        assert clean.debias[-1]["method"] == head.method
        # Not "none" (the planted ramps are there): the least positional head within the kNN budget. Here that is
        # a RASA head (the blank heads lose 0.054 of the kNN agreement, just over the budget), whose planes leave
        # a weak ramp that an unregularised fit on all tokens still finds: less than raw, not nothing.
        rows = _rows(tables[0])
        chosen = rows[tables[0]["chosen"]]
        eligible = [r for r in rows.values() if r["kept"] >= rows["none"]["kept"] - 0.05]
        assert tables[0]["chosen"] != "none" and chosen in eligible
        assert max(0, chosen["xy_across"]) <= min(max(0, r["xy_across"]) for r in eligible) + 0.05
        assert chosen["xy_across"] < 0.3 and rows["none"]["xy_across"] > 0.95
        with FeatureStore(str(src)) as raw:
            assert _pooled_xy_r2(clean) < _pooled_xy_r2(raw) - 0.4
    # An ordinary head for `extract --head` (the tiny test ViT has the store's 64 channels).
    res = cli(["extract", image_dir, "--model", TINY_MODEL, "--weights", "random", "--head",
               tmp_path / "h1.safetensors", "-o", tmp_path / "x.h5"])
    assert res.exit_code == 0, res.output
    with FeatureStore(str(tmp_path / "x.h5")) as x:
        assert x.debias[-1]["head_sha256"] == head.sha256


def test_cli_refusals_leave_files_untouched(tmp_path, cli):
    src = _planted(tmp_path / "p.h5", ramp=0.5, n=4)
    head_path = tmp_path / "h.safetensors"
    head_path.write_bytes(b"old")
    res = cli(["debias-train", "auto", src, "-o", head_path])
    assert res.exit_code == 2 and "exists" in res.output
    assert head_path.read_bytes() == b"old"
    res = cli(["debias-train", "auto", src, "-o", head_path, "--overwrite", "--max-r2", "-5",
               "--candidates", "posmean"])
    assert res.exit_code == 2 and "no candidate reaches" in res.output
    assert head_path.read_bytes() == b"old"
    res = cli(["debias-train", "auto", src, "-o", tmp_path / "x.safetensors", "--candidates", "pca"])
    assert res.exit_code == 2 and "unknown candidate family" in res.output


def test_svd_candidates_from_the_rebuilt_encoder_and_the_combined_projection(tmp_path, cli, image_dir,
                                                                               one_torch_thread):
    """A store of the tiny random ViT names its encoder: svd-k and svd-k+rasa-r are fitted; the combination
    removes the span of both the svd vectors and the RASA planes."""
    import torch

    from posvit_cli.core.debias.auto import AutoSettings, fit_candidates, split_images
    from posvit_cli.core.features.store import FeatureStore

    res = cli(["extract", image_dir, "--model", TINY_MODEL, "--weights", "random", "-o", tmp_path / "t.h5", "-q"])
    assert res.exit_code == 0, res.output
    settings = AutoSettings(families=("none", "svd", "rasa", "svd+rasa"), combos=((2, 2),))
    with FeatureStore(str(tmp_path / "t.h5")) as fs:
        fit, held = split_images(fs, settings.holdout_fraction, 0, settings.max_holdout)
        assert fit and held and not set(fit) & set(held)
        cands, notes, facts = fit_candidates(fs, fit, settings)
    by = {c.name: c for c in cands}
    assert not notes
    assert {"svd-1", "svd-2", "svd-4", "svd-8", "rasa-1", "rasa-8", "svd-2+rasa-2"} <= set(by)
    svd2, rasa2, both = by["svd-2"].head, by["rasa-2"].head, by["svd-2+rasa-2"].head
    assert svd2.basis().shape[1] == 2 and rasa2.basis().shape[1] == 4
    assert both.basis().shape[1] == 6 and both.exact
    # The first r planes of the one 8-round fit are the r-round head.
    assert torch.equal(by["rasa-8"].head.planes[:2], rasa2.planes)
    directions = torch.cat([svd2.basis().T, rasa2.basis().T]).float()
    assert both.apply(directions).abs().max() < 1e-5
    assert svd2.apply(directions[:2]).abs().max() < 1e-5


def test_cli_none_writes_the_identity_head_and_notes_skipped_svd(tmp_path, cli):
    import torch

    from posvit_cli.core.debias.heads import load_head

    src = _planted(tmp_path / "flat.h5", ramp=0.0, n=6)
    res = cli(["debias-train", "auto", src, "-o", tmp_path / "h.safetensors", "--candidates", "posmean,svd",
               "--max-loss", "0"])
    assert res.exit_code == 0, res.output
    assert "svd skipped" in res.output
    head = load_head(tmp_path / "h.safetensors", channels=C)
    assert head.info["auto"]["chosen"] == "none"
    res = cli(["debias-train", "auto", src, "-o", tmp_path / "h2.safetensors", "--candidates", "posmean",
               "--max-loss", "0", "--json", "-q"])
    doc = json.loads(res.stdout)
    assert doc["chosen"] == "none" and [r["name"] for r in doc["rows"]] == ["none", "posmean"]
    x = torch.randn(3, C)
    assert torch.equal(head.apply(x), x)


def test_kept_score_compares_the_content_not_the_grid_neighbours():
    """Strong planted ramps make every raw token's nearest neighbours its grid neighbours. Blanking the two ramp
    channels removes nothing but position: the kNN agreement of the content (neighbours found on the tokens less a
    smooth surface of position) stays near 1, where raw neighbourhoods would say almost nothing was kept; zeroing
    half of the content channels loses the content and the score says so."""
    from posvit_cli.core.debias.auto_scores import HeldOut, neighbour_agreement, position_residual, raw_neighbours

    rng = np.random.default_rng(3)
    protos = rng.standard_normal((PROTOS, C))
    protos[:, :2] = 0
    yy, xx = np.mgrid[0:H, 0:W]
    windows = []
    for _ in range(3):
        g = protos[rng.integers(0, PROTOS, size=(H, W))] + 0.05 * rng.standard_normal((H, W, C))
        g[..., 0] = 40 * (xx / (W - 1) * 2 - 1)
        g[..., 1] = 40 * (yy / (H - 1) * 2 - 1)
        windows.append(g.astype(np.float32))
    held = HeldOut([0, 1, 2], windows, [(H, W)] * 3, [(0, 0)] * 3, ["a", "b", "c"])
    blanked = [w.copy() for w in windows]
    for w in blanked:
        w[..., :2] = w[..., :2].mean(axis=(0, 1))
    ref = raw_neighbours(held, k=10, queries=64, seed=0)
    assert neighbour_agreement(windows, ref) == 1.0
    assert neighbour_agreement(blanked, ref) > 0.9
    gutted = [w.copy() for w in windows]
    for w in gutted:
        w[..., 2:60] = 0
    assert neighbour_agreement(gutted, ref) < 0.8
    # The residual takes out a cubic surface exactly, and nothing of tokens that do not vary smoothly.
    cubic = np.stack([xx**3 - 2 * xx * yy, yy**2 + 1.0], -1).astype(np.float64)
    assert np.abs(position_residual(cubic)).max() < 1e-9
    # What raw neighbourhoods would have said about the blanked ramps (the measure this replaces):
    import posvit_cli.core.debias.auto_scores as scores

    raw_ref = [(q, scores._neighbours(w.reshape(H * W, C), q, 10)) for (q, _), w in zip(ref, windows)]
    hits = [(scores._neighbours(b.reshape(H * W, C), q, 10)[:, :, None] == nn[:, None, :]).any(2).mean()
            for (q, nn), b in zip(raw_ref, blanked)]
    assert np.mean(hits) < 0.3


def test_across_image_r2_finds_a_shared_code_and_not_smooth_content_and_reads_tiles_in_their_frame():
    """Known answers of the score the rule ranks by: channels that are the same ramp in every image transfer from
    image to image (R² ≈ 1); a smooth content gradient whose direction differs per image is decodable within one
    image but does not transfer (R² ≤ 0); a tiled image's code restarts in every tile and is read in the tile
    frame (R² ≈ 1 there, far lower in whole-image coordinates)."""
    from posvit_cli.core.debias.auto_scores import across_images_r2
    from posvit_cli.core.measure.probe.tiles import tile_frame

    rng = np.random.default_rng(5)
    h = w = 24
    yy, xx = np.mgrid[0:h, 0:w] / (h - 1) * 2 - 1

    def image(code, angle):
        g = 0.3 * rng.standard_normal((h, w, 16))
        g[..., 0] += code * xx
        g[..., 1] += code * yy
        g[..., 2] += np.cos(angle) * xx + np.sin(angle) * yy  # smooth content, its own direction per image
        return g.astype(np.float32)

    grids, origins = [(h, w)] * 4, [(0, 0)] * 4
    shared = [image(3.0, a) for a in (0.3, 1.9, 3.5, 5.0)]
    content = [image(0.0, a) for a in (0.3, 1.9, 3.5, 5.0)]
    assert across_images_r2(shared, grids, origins) > 0.95
    assert across_images_r2(content, grids, origins) < 0.05
    assert across_images_r2(shared[:1], grids[:1], origins[:1]) is None
    # Two 2 × 2-tiled images (12-token tiles, no overlap) whose code restarts in every tile, and two whole ones.
    layout = {"tile": 192, "overlap": 0, "rows": [0, 192], "cols": [0, 192], "patch": 16}
    frame = tile_frame((h, w), layout, 16)
    ty, tx = (frame.row + 0.5) / frame.height * 2 - 1, (frame.col + 0.5) / frame.width * 2 - 1
    tiled = [0.3 * rng.standard_normal((h, w, 16)).astype(np.float32) for _ in range(4)]
    for g in tiled:
        g[..., 0] += 3 * tx
        g[..., 1] += 3 * ty
    frames = [frame] * 4
    assert across_images_r2(tiled, grids, origins, frames=frames) > 0.95
    assert across_images_r2(tiled, grids, origins) < 0.5


# --------------------------------------------------------------------------------------------------------------
# Crop-shift correspondence columns


def _encoded_store(tmp_path, cli, n: int = 6):
    """A store of the tiny random ViT (which its provenance names, so the encoder can be rebuilt) on ``n`` smooth
    random 128×160 px greyscale images (8×10 tokens: the probe's default shift 2,3 leaves 6×7-token views), of
    low contrast (grey 128 ± 12), so that the random position embedding competes with the content: the matches
    are neither all content nor all grid."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(4)
    for i in range(n):
        a = gaussian_filter(rng.random((128, 160)), 3)
        a = (a - a.min()) / (a.max() - a.min())
        Image.fromarray((128 + (a - 0.5) * 24).astype(np.uint8)).save(d / f"tex{i}.png")
    res = cli(["extract", d, "--model", TINY_MODEL, "--weights", "random", "-o", tmp_path / "s.h5", "-q"])
    assert res.exit_code == 0, res.output
    return tmp_path / "s.h5", d


def test_shift_columns_are_the_crop_shift_probe_of_each_head(tmp_path, cli, one_torch_thread):
    """`none`'s columns are exactly what `probe shift` gives on the same held-out images (default shift, crop,
    the store's size rule); an identity head gives the same; a head that subtracts a strong field of random
    vectors, one per grid position, pulls every token to its grid position in both views (grid match 1), which
    only holds when each view is cleaned on its own grid (on the image's frame the field would follow the
    content)."""
    from posvit_cli.core.debias.auto import rebuild_encoder
    from posvit_cli.core.debias.auto_shift import shift_pairs, shift_scores
    from posvit_cli.core.debias.heads import BlankHead, PosMeanHead
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.io.preprocess import parse_size
    from posvit_cli.core.measure.shift import shift_correspondence

    src, images = _encoded_store(tmp_path, cli)
    head, table = _run(src, families=("none", "posmean", "svd"), svd_ranks=(2,), shift_images=2)
    rows = _rows(table)
    facts = table["fit"]["shift"]
    assert facts["images"] == table["split"]["held_out"][:2] and facts["shift"] == [2, 3]
    assert facts["view_grids"] == [[6, 7]] * 2
    assert not [n for n in table["notes"] if "content/grid" in n]
    for r in rows.values():
        assert 0.0 <= r["shift_content"] <= 1.0 and 0.0 <= r["shift_absolute"] <= 1.0
    with FeatureStore(str(src)) as fs:
        encoder, why = rebuild_encoder(fs)
        assert why is None
        direct = shift_correspondence(encoder, [images / f"{n}.png" for n in facts["images"]],
                                      size=parse_size("native"))
        (summary,) = direct["summary"]
        assert 0.0 < summary["fraction_content"]["mean"] < 1.0 and 0.0 < summary["fraction_absolute"]["mean"] < 1.0
        assert rows["none"]["shift_content"] == summary["fraction_content"]["mean"]
        assert rows["none"]["shift_absolute"] == summary["fraction_absolute"]["mean"]
        held = [r.index for r in fs.records if r.name in facts["images"]]
        pairs, notes = shift_pairs(fs, held, encoder)
    assert not notes
    none = shift_scores(None, pairs)
    assert none == {"shift_content": rows["none"]["shift_content"], "shift_absolute": rows["none"]["shift_absolute"]}
    assert shift_scores(BlankHead([], C), pairs) == none
    field = 1e3 * np.random.default_rng(0).standard_normal((6, 7, C)).astype(np.float32)
    assert shift_scores(PosMeanHead(field), pairs) == {"shift_content": 0.0, "shift_absolute": 1.0}


def test_shift_columns_missing_with_a_note_when_the_images_moved(tmp_path, cli, one_torch_thread):
    src, images = _encoded_store(tmp_path, cli)
    images.rename(tmp_path / "elsewhere")
    res = cli(["debias-train", "auto", src, "-o", tmp_path / "h.safetensors", "--candidates", "posmean",
               "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    assert all(r["shift_content"] is None and r["shift_absolute"] is None for r in doc["rows"])
    assert doc["fit"]["shift"] is None
    (note,) = [n for n in doc["notes"] if "content/grid match skipped" in n]
    assert "not found" in note and "tex" in note
    assert "content match" in res.output and "not found" in res.output
    # --no-shift: not attempted, no note, no columns.
    res = cli(["debias-train", "auto", src, "-o", tmp_path / "h2.safetensors", "--candidates", "posmean",
               "--no-shift"])
    assert res.exit_code == 0, res.output
    assert "content match" not in res.output and "content/grid" not in res.output

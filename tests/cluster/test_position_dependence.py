"""Position dependence of a clustering: MI(label; grid block) against rolled copies, with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from posvit_cli.core.cluster import position_dependence as P
from posvit_cli.core.cluster.position_dependence import breaking_offsets, label_block_mi, position_dependence

H, W = 20, 24  # scikit-image's coins (303 × 384 px) at about 16 px per token


def _top_bottom(h=H, w=W):
    return np.repeat((np.arange(h) >= h // 2).astype(np.int64)[:, None], w, axis=1)


def _textures(n, seed, h=H, w=W, sigma=2.0):
    """Content splits of random textures: thresholded smoothed noise, a different texture per image."""
    rng = np.random.default_rng(seed)
    return [(ndi.gaussian_filter(rng.normal(size=(h, w)), sigma, mode="wrap") > 0).astype(np.int64)
            for _ in range(n)]


# --------------------------------------------------------------------------------------------------------------
# Hand-computable mutual information


def test_mi_of_hand_made_count_tables_is_exact():
    # Two labels, two blocks, each label in its own block: 1 bit; independent: 0 bits.
    mi, top = label_block_mi(np.array([[[2, 0], [0, 2]], [[1, 1], [1, 1]]]))
    assert mi.tolist() == [1.0, 0.0] and top.tolist() == [1.0, 1.0]
    # p(l, b) = [[1/2, 0], [1/4, 1/4]]: H(l) = 1, H(b) = H(3/4, 1/4), H(l, b) = 1.5.
    h_b = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    mi, top = label_block_mi(np.array([[[2, 0], [1, 1]]]))
    assert mi[0] == pytest.approx(1 + h_b - 1.5, abs=1e-15) and top[0] == pytest.approx(h_b, abs=1e-15)


def test_top_bottom_split_is_exactly_one_bit_and_quadrants_two():
    r = position_dependence([_top_bottom()], draws=5)
    assert r["mi_bits"] == 1.0 and r["max_bits"] == 1.0
    quad = (np.arange(H)[:, None] >= H // 2) * 2 + (np.arange(W)[None, :] >= W // 2)
    r = position_dependence([quad] * 3, draws=5)
    assert r["mi_bits"] == pytest.approx(2.0, abs=1e-12) and r["max_bits"] == pytest.approx(2.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Known answers of the verdict


@pytest.mark.parametrize("per_image", [False, True])
def test_top_bottom_split_of_every_image_is_position_driven(per_image):
    r = position_dependence([_top_bottom()] * 12, per_image=per_image, draws=99, seed=0)
    assert r["mi_bits"] == 1.0 and r["dependence"] == pytest.approx(1.0, abs=1e-12)
    assert r["p_value"] == pytest.approx(1 / 100) and r["position_driven"]
    assert r["excess_bits"] > 0.5 and r["null_std"] > 0


def test_one_top_bottom_split_is_position_driven_because_partition_keeping_rolls_are_not_null_draws():
    # Rolling a 20-row top/bottom split by 0 or 10 rows reproduces it; were those offsets drawn, p could not go
    # below 2/20 = 0.1 whatever the draws. They are left out, so one image reaches p = 1/(1 + draws).
    assert list(breaking_offsets(20, 2)) == [o for o in range(20) if o not in (0, 10)]
    assert list(breaking_offsets(21, 2)) == list(range(1, 21))  # unequal halves: only 0 keeps the partition
    assert list(breaking_offsets(3, 4)) == [0, 1, 2]  # one-token blocks: every roll keeps it, none left out
    r = position_dependence([_top_bottom()], draws=1999, seed=0)
    assert r["dependence"] == pytest.approx(1.0) and r["p_value"] == pytest.approx(1 / 2000)
    assert r["position_driven"]


@pytest.mark.parametrize("per_image", [False, True])
def test_content_split_of_random_textures_is_not_position_driven(per_image):
    runs = [position_dependence(_textures(10, seed), per_image=per_image, draws=99, seed=seed) for seed in range(10)]
    p = np.array([r["p_value"] for r in runs])
    dep = np.array([r["dependence"] for r in runs])
    # The observed MI is above 0 (blobs do not fill blocks evenly) but no higher than its rolled copies'.
    assert all(r["mi_bits"] > 0 and r["null_mean_bits"] > 0 for r in runs)
    assert sum(r["position_driven"] for r in runs) <= 1
    assert np.median(p) > 0.2 and abs(dep.mean()) < 0.03 and dep.max() < 0.1


# --------------------------------------------------------------------------------------------------------------
# Invariances


def test_renaming_clusters_or_rolling_the_inputs_by_half_changes_nothing():
    textures = _textures(6, 3)
    base = position_dependence(textures, draws=30, seed=4)
    renamed = position_dependence([np.array([5, 2])[t] for t in textures], draws=30, seed=4)
    assert renamed["mi_bits"] == pytest.approx(base["mi_bits"], abs=1e-12)
    assert renamed["null_mean_bits"] == pytest.approx(base["null_mean_bits"], abs=1e-12)
    assert renamed["p_value"] == base["p_value"]
    # Rolling a top/bottom split by half the grid swaps the halves: the same partition, the same numbers.
    split = [_top_bottom()] * 4
    assert position_dependence(split, draws=30) == position_dependence([np.roll(s, H // 2, 0) for s in split],
                                                                      draws=30)


def test_roll_invariant_maps_score_zero_and_p_one():
    # One cluster: no information, nothing to beat.
    r = position_dependence([np.zeros((H, W), np.int64)] * 3, draws=20)
    assert r["mi_bits"] == 0.0 and r["p_value"] == 1.0 and r["dependence"] == 0.0 and not r["position_driven"]
    # Stripes one token wide: every block holds both labels equally, for every roll.
    stripes = np.repeat((np.arange(W) % 2)[None, :], H, axis=0)
    r = position_dependence([stripes] * 3, draws=20)
    assert r["mi_bits"] == pytest.approx(0.0, abs=1e-12) and r["p_value"] == 1.0 and not r["position_driven"]


def test_a_centre_band_is_invisible_to_quadrants_and_found_by_4x4_blocks():
    band = np.zeros((H, W), np.int64)
    band[H // 4: 3 * H // 4] = 1
    r2 = position_dependence([band] * 8, bins=2, draws=50)
    r4 = position_dependence([band] * 8, bins=4, draws=50)
    assert r2["mi_bits"] == pytest.approx(0.0, abs=1e-12) and not r2["position_driven"]
    assert r4["mi_bits"] == 1.0 and r4["position_driven"] and r4["dependence"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------
# The null is what it says, deterministic, and bounded on huge grids


def test_null_equals_np_roll_of_each_image_by_the_seeded_offsets():
    # Two grid sizes: counts pooled per grid size, MIs weighted by tokens.
    maps = _textures(3, 1) + _textures(2, 2, h=9, w=7, sigma=1.0)
    r = position_dependence(maps, draws=7, seed=11)
    rng = np.random.default_rng(11)
    grids = {}
    for m in maps:
        grids.setdefault(m.shape, []).append(m)
    null = []
    for _ in range(7):
        mi = tokens = 0.0
        for (h, w), labs in grids.items():
            dy = rng.choice(breaking_offsets(h, 2), len(labs))
            dx = rng.choice(breaking_offsets(w, 2), len(labs))
            block = (np.arange(h)[:, None] * 2 // h) * 2 + np.arange(w)[None, :] * 2 // w
            counts = np.zeros((2, 4))
            for lab, a, b in zip(labs, dy, dx):
                np.add.at(counts, (np.roll(lab, (a, b), (0, 1)), block), 1)
            mi += label_block_mi(counts[None])[0][0] * counts.sum()
            tokens += counts.sum()
        null.append(mi / tokens)
    assert r["null_mean_bits"] == pytest.approx(np.mean(null), abs=1e-12)
    assert r["null_std"] == pytest.approx(np.std(null), abs=1e-12)


def test_same_seed_same_result_other_seed_other_null():
    textures = _textures(5, 7)
    a = position_dependence(textures, draws=40, seed=1)
    assert a == position_dependence(textures, draws=40, seed=1)
    b = position_dependence(textures, draws=40, seed=2)
    assert b["mi_bits"] == a["mi_bits"] and b["null_mean_bits"] != a["null_mean_bits"]


@pytest.mark.parametrize("per_image", [False, True])
def test_a_625x625_grid_counted_in_row_bands_gives_the_same_answer(monkeypatch, per_image):
    rng = np.random.default_rng(0)
    big = (ndi.uniform_filter(rng.normal(size=(625, 625)), 25, mode="wrap") > 0).astype(np.int64)
    big[:300] += 2  # the top 300 rows get their own clusters: position dependent
    whole = position_dependence([big, big[:, ::-1]], per_image=per_image, draws=4, seed=0)
    monkeypatch.setattr(P, "CHUNK_TOKENS", 10_000)  # 16 rows per band
    banded = position_dependence([big, big[:, ::-1]], per_image=per_image, draws=4, seed=0)
    assert banded == whole and whole["dependence"] > 0.2


def test_bad_input_is_refused_in_one_line():
    from posvit_cli.core.errors import PosvitError

    with pytest.raises(PosvitError, match="negative label -1"):
        position_dependence([np.full((4, 4), -1)])
    with pytest.raises(PosvitError, match="must be integers"):
        position_dependence([np.zeros((4, 4))])
    with pytest.raises(PosvitError, match="bins must be at least 2"):
        position_dependence([np.zeros((4, 4), int)], bins=1)
    with pytest.raises(PosvitError, match="no label maps"):
        position_dependence([])


def test_per_image_counts_in_chunks_of_images_give_the_same_answer(monkeypatch):
    maps = _textures(9, 5) + [_top_bottom()] * 3
    whole = position_dependence(maps, per_image=True, draws=20, seed=3)
    monkeypatch.setattr(P, "CHUNK_TOKENS", 1000)  # two 20 × 24 images per chunk
    chunked = position_dependence(maps, per_image=True, draws=20, seed=3)
    for key in ("mi_bits", "null_mean_bits", "null_std", "max_bits", "dependence"):
        assert chunked[key] == pytest.approx(whole[key], abs=1e-12)
    assert chunked["p_value"] == whole["p_value"]

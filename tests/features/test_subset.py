"""`posvit store subset`: keep or drop images of a store by name, pattern or list."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_store
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.subset import select_images, subset_store


@pytest.fixture
def three(tmp_path):
    rng = np.random.default_rng(0)
    grids = [rng.normal(size=(4, 5, 6)).astype(np.float32) for _ in range(3)]
    grids.append(np.ones((1, 1, 6), np.float32))
    labels = [np.arange(g.shape[0] * g.shape[1], dtype=np.int32).reshape(g.shape[:2]) for g in grids]
    return write_store(tmp_path / "s.h5", grids, names=["a1.png", "a2.png", "b1.png", "dot.png"],
                       maps={"labels": labels}), grids


def test_keep_and_drop_by_name_pattern_and_list(three, tmp_path):
    src, grids = three
    with FeatureStore(src) as s:
        assert select_images(s, drop=["dot"]) == [0, 1, 2]
        assert select_images(s, keep=["a*"]) == [0, 1]
        assert select_images(s, keep=["a*", "b1.png"], drop=["a2"]) == [0, 2]
    kept, dropped = subset_store(src, tmp_path / "sub.h5", drop=["dot"])
    assert (kept, dropped) == (3, 1)
    with FeatureStore(tmp_path / "sub.h5") as sub, FeatureStore(src) as s:
        assert [r.name for r in sub.records] == ["a1", "a2", "b1"]
        for i in range(3):
            np.testing.assert_array_equal(sub.features(i), s.features(i))
            np.testing.assert_array_equal(sub.token_map(i, "labels"), s.token_map(i, "labels"))
        assert sub.provenance["subset_of"]["kept"] == 3 and sub.provenance["model"] == s.provenance["model"]


def test_a_selector_that_matches_nothing_or_leaves_nothing_is_refused_and_writes_nothing(three, tmp_path):
    src, _ = three
    with pytest.raises(PosvitError, match="no image 'a3'"):
        subset_store(src, tmp_path / "x.h5", keep=["a3"])
    with pytest.raises(PosvitError, match="leaves no image of the 4"):
        subset_store(src, tmp_path / "x.h5", drop=["*"])
    assert not (tmp_path / "x.h5").exists()
    # an existing output is kept as it was without --overwrite
    (tmp_path / "y.h5").write_bytes(b"mine")
    with pytest.raises(PosvitError):
        subset_store(src, tmp_path / "y.h5", drop=["dot"])
    assert (tmp_path / "y.h5").read_bytes() == b"mine"


def test_store_subset_command(three, tmp_path, cli):
    src, _ = three
    names = tmp_path / "keep.txt"
    names.write_text("# the a images\na1\na2.png\n")
    r = cli(["store", "subset", src, "--keep", f"@{names}", "-o", tmp_path / "a.h5", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["kept"] == 2
    with FeatureStore(tmp_path / "a.h5") as s:
        assert [r.name for r in s.records] == ["a1", "a2"]
    r = cli(["store", "subset", src, "-o", tmp_path / "b.h5"])
    assert r.exit_code == 2 and "--keep" in r.output and not (tmp_path / "b.h5").exists()
    r = cli(["store", "subset", src, "--drop", "dot", "-o", tmp_path / "c.h5", "-q"])
    assert r.exit_code == 0 and cli(["probe", tmp_path / "c.h5", "--fraction", "0.5", "-q"]).exit_code == 0

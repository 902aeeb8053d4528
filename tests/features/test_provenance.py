"""Typed provenance accessors, the one feature-identity check, the one list of store suffixes, and the one merge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.provenance import IDENTITY_KEYS, identity_differences
from posvit_cli.core.features.store import (
    STORE_SUFFIXES,
    FeatureStore,
    is_store_path,
    store_format,
)
from posvit_cli.core.features.merge import merge_stores
from posvit_cli.core.features.writer import StoreWriter
from posvit_cli.core.io.preprocess import ResizeMode

PROVENANCE = {
    "model": "test_vit",
    "weights": "random",
    "weights_sha256": "cd" * 32,
    "modifications": [{"name": "alibi"}],
    "patch_size": 16,
    "channels": 4,
    "preprocessing": {"size": "short:224", "intensity": "percentile:1,99", "mean": [0.5], "std": [0.25]},
    "prefix_tokens": 1,
    "debias": [{"method": "rasa", "head_sha256": "ef" * 32}, {"method": "blank", "channels_zeroed": [1]}],
    "transform": "rot90",
    "tiling": {"tile": 512, "overlap": 64},
}


def _store(path, provenance=PROVENANCE, dtype="float32", n=2, first=0):
    rng = np.random.default_rng(first)
    with StoreWriter(path, provenance=provenance, layers=["final"], dtype=dtype) as w:
        for i in range(first, first + n):
            w.add(f"/imgs/im{i}.png", {"final": rng.normal(size=(2, 3, 4))}, orig_size=(32, 48), proc_size=(32, 48),
                  prefix={"final": rng.normal(size=(1, 4))})
    return path


def test_typed_accessors_read_what_the_provenance_says(tmp_path):
    with FeatureStore(_store(tmp_path / "a.h5")) as st:
        assert (st.model, st.weights, st.weights_sha256) == ("test_vit", "random", "cd" * 32)
        assert st.modifications == [{"name": "alibi"}]
        assert st.size_rule == "short:224" and st.resize_mode == ResizeMode("short", 224)
        assert st.intensity == "percentile:1,99"
        assert st.preprocessing["mean"] == [0.5]
        assert st.debias_methods == ["rasa", "blank"] and st.debias[1]["channels_zeroed"] == [1]
        assert st.transform == "rot90" and st.tiling == {"tile": 512, "overlap": 64}
        assert st.dtype == "float32" and st.n_prefix_tokens == 1
        assert st.identity["layers"] == ["final"] and set(st.identity) == set(IDENTITY_KEYS)
        # Copies: editing what an accessor returned does not change the store's provenance.
        st.preprocessing["size"] = "native"
        st.debias.clear()
        assert st.size_rule == "short:224" and len(st.debias) == 2


def test_typed_accessors_defaults_for_a_bare_store(tmp_path):
    with FeatureStore(_store(tmp_path / "b.zarr", provenance={"channels": 4}, dtype="float16")) as st:
        assert st.model is None and st.weights_sha256 is None and st.modifications == []
        assert st.size_rule == "native" and st.resize_mode == ResizeMode("native")
        assert st.intensity == "auto" and st.debias == [] and st.debias_methods == []
        assert st.transform is None and st.tiling is None
        assert st.dtype == "float16" and st.n_prefix_tokens == 0


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("model", "other_vit", "model"),
        ("weights_sha256", "00" * 32, "weights_sha256"),
        ("modifications", [], "modifications"),
        ("patch_size", 14, "patch_size"),
        ("debias", [{"method": "rasa", "head_sha256": "11" * 32}], "debias"),
        ("preprocessing", {**PROVENANCE["preprocessing"], "size": "native"}, "preprocessing.size"),
        ("preprocessing", {**PROVENANCE["preprocessing"], "std": [0.5]}, "preprocessing.std"),
        ("tiling", None, "tiling"),
        ("transform", "flip_lr", "transform"),
        ("prefix_tokens", 0, "prefix_tokens"),
    ],
)
def test_stores_differing_in_one_identity_key_are_refused_naming_it(tmp_path, key, value, named):
    a = _store(tmp_path / "a.h5")
    b = _store(tmp_path / "b.h5", provenance={**PROVENANCE, key: value}, first=2)
    with FeatureStore(a) as sa, FeatureStore(b) as sb:
        assert identity_differences(sa.provenance, sb.provenance) == [named]
    with pytest.raises(PosvitError, match=rf"cannot merge '.*b\.h5' with '.*a\.h5': {named} differ$"):
        merge_stores([a, b], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "m.h5.partial").exists()


def test_identity_ignores_what_does_not_change_features_and_what_the_caller_allows():
    a = dict(PROVENANCE, command="posvit extract x", posvit_version="1", channels=4, dtype="float16")
    # Descriptive debias entries (where a head was applied) and non-identity keys do not count.
    b = dict(a, command="other", debias=[{**d, "applied_to_store": "s.h5"} for d in PROVENANCE["debias"]])
    assert identity_differences(a, b) == []
    # None, 0 and [] all mean "none"; a stored dtype may differ when the caller says so.
    assert identity_differences(dict(a, tiling=None), dict(a, tiling=0)) == []
    c = dict(a, dtype="float32")
    assert identity_differences(a, c) == ["dtype"] and identity_differences(a, c, ignore=("dtype",)) == []
    # A document that predates a key is not held against the store under missing_ok.
    old = {k: v for k, v in a.items() if k != "modifications"}
    assert identity_differences(old, a) == ["modifications"]
    assert identity_differences(old, a, missing_ok=True) == []
    with pytest.raises(ValueError, match="not identity keys"):
        identity_differences(a, b, ignore=("dtpye",))


@pytest.mark.parametrize(
    "path, expected",
    [
        ("feats.h5", True), ("F.HDF5", True), ("x.hdf", True), ("v.zarr", True), ("v.zarr/", True),
        ("v.zarr.zip", True), ("v.ZIP", True), ("runs/a.448.h5", True),
        ("img.png", False), ("feats.h5.partial", False), ("-", False), ("h5", False), ("notes.zarr.txt", False),
    ],
)
def test_is_store_path(path, expected):
    assert is_store_path(path) is expected


def test_store_suffixes_agree_with_store_format():
    assert {store_format("x" + s) for s in STORE_SUFFIXES} == {"hdf5", "zarr", "zarr-zip"}
    assert store_format("x.zarr.zip") == store_format("x.zip") == "zarr-zip"
    assert store_format("x.zarr.partial") == "zarr"  # the writer's unfinished store keeps its backend
    # Longest first, so a .zarr.zip is never taken for a .zip of something else.
    assert STORE_SUFFIXES.index(".zarr.zip") < STORE_SUFFIXES.index(".zip")


def test_merge_via_both_spellings_gives_identical_stores(tmp_path, cli):
    shard_prov = dict(PROVENANCE)
    a = _store(tmp_path / "s0.h5", provenance={**shard_prov, "shard": "0/2"}, first=0)
    b = _store(tmp_path / "s1.zarr", provenance={**shard_prov, "shard": "1/2"}, first=2)
    r1 = cli(["store", "merge", a, b, "-o", tmp_path / "m1.h5", "--json", "-q"])
    r2 = cli(["extract", "--merge", a, b, "-o", tmp_path / "m2.h5", "--json", "-q"])
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    j1, j2 = json.loads(r1.stdout), json.loads(r2.stdout)
    assert j1["images"] == j2["images"] == 4 and j1["merged"] == j2["merged"] == [str(a), str(b)]
    with FeatureStore(tmp_path / "m1.h5") as m1, FeatureStore(tmp_path / "m2.h5") as m2:
        assert [r.path for r in m1.records] == [r.path for r in m2.records] == [f"/imgs/im{i}.png" for i in range(4)]
        assert [m1.checksum(i) for i in range(4)] == [m2.checksum(i) for i in range(4)]
        assert m1.provenance == m2.provenance and m1.provenance["merged_shards"] == ["0/2", "1/2"]
    # The same refusal through both spellings.
    c = _store(tmp_path / "c.h5", provenance={**shard_prov, "patch_size": 8}, first=4)
    for args in (["store", "merge", a, c, "-o", tmp_path / "x.h5"], ["extract", "--merge", a, c, "-o", tmp_path / "y.h5"]):
        r = cli(args)
        assert r.exit_code == 2 and "patch_size differ" in r.output


def test_posvit_error_is_a_value_error():
    from posvit_cli.core.features.records import canonical_layer_name

    # Callers used to NumPy / scikit-image catch bad arguments as ValueError.
    with pytest.raises(ValueError, match="unknown layer"):
        canonical_layer_name("penultimate")
    assert issubclass(PosvitError, ValueError)

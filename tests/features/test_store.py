"""Feature store: round-trips on both backends, lazy reads, ragged grids, atomic writes, resume, merge, pipes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.store import (
    FeatureStore,
    canonical_layer_name,
    read_bytes_store,
    store_format,
)
from posvit_cli.core.features.merge import merge_stores
from posvit_cli.core.features.writer import StoreWriter

FORMATS = ["f.h5", "f.zarr", "f.zarr.zip"]

PROVENANCE = {
    "model": "test_vit",
    "timm_name": "test_vit",
    "weights": "random",
    "weights_sha256": "ab" * 32,
    "patch_size": 16,
    "channels": 8,
    "layers": ["final", "block2"],
    "preprocessing": {"size": "native", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "intensity": "auto"},
    "prefix_tokens": 1,
    "debias": [],
    "transform": None,
    "tiling": None,
    "command": "posvit extract imgs -o f.h5",
}


def _images(rng):
    """Three 4×5 grids and one 6×3 grid (ragged), 8 channels, with prefix tokens and a label map."""
    shapes = [(4, 5), (4, 5), (6, 3), (4, 5)]
    out = []
    for i, (h, w) in enumerate(shapes):
        out.append(
            dict(
                path=f"/data/img_{i}.png",
                feats={"final": rng.normal(size=(h, w, 8)), "block2": rng.normal(size=(h, w, 8))},
                prefix={"final": rng.normal(size=(1, 8)), "block2": rng.normal(size=(1, 8))},
                maps={"labels": rng.integers(0, 5, size=(h, w)).astype(np.int32)},
                orig_size=(h * 16 + 3, w * 16 + 1),
                proc_size=(h * 16, w * 16),
                meta={"note": i},
            )
        )
    return out


def _write(path, items, dtype="float32", **kw):
    with StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"], dtype=dtype, **kw) as w:
        for it in items:
            w.add(it["path"], it["feats"], orig_size=it["orig_size"], proc_size=it["proc_size"],
                  prefix=it["prefix"], maps=it["maps"], meta=it["meta"])
            w.commit()
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_values_dtypes_provenance(tmp_path, name):
    rng = np.random.default_rng(0)
    items = _images(rng)
    path = _write(tmp_path / name, items)
    assert not (tmp_path / (name + ".partial")).exists()
    with FeatureStore(path) as st:
        assert len(st) == 4
        assert st.layers == ["final", "block2"]
        assert st.default_layer == "final"
        assert st.complete
        for key, value in PROVENANCE.items():
            if key not in ("layers",):
                assert st.provenance[key] == value, key
        assert st.provenance["dtype"] == "float32"
        for i, it in enumerate(items):
            r = st.record(i)
            assert r.path == it["path"] and r.name == f"img_{i}"
            assert r.orig_size == it["orig_size"] and r.proc_size == it["proc_size"]
            assert r.grid == it["feats"]["final"].shape[:2]
            assert r.meta == it["meta"]
            for layer in ("final", "block2"):
                np.testing.assert_array_equal(st.features(i, layer), it["feats"][layer].astype(np.float32))
                np.testing.assert_array_equal(st.prefix_tokens(i, layer), it["prefix"][layer].astype(np.float32))
            got = st.token_map(i, "labels")
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, it["maps"]["labels"])
        assert st.features(0).dtype == np.float32


@pytest.mark.parametrize("name", FORMATS)
def test_float16_default_storage(tmp_path, name):
    rng = np.random.default_rng(1)
    items = _images(rng)
    path = _write(tmp_path / name, items, dtype="float16")
    with FeatureStore(path) as st:
        assert st.stack(group="4x5").dtype == np.float16
        np.testing.assert_array_equal(st.features(2), items[2]["feats"]["final"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("name", ["f.h5", "f.zarr"])
def test_same_size_images_read_as_one_array_and_ragged_groups(tmp_path, name):
    rng = np.random.default_rng(2)
    items = _images(rng)
    path = _write(tmp_path / name, items)
    with FeatureStore(path) as st:
        groups = {g.name: g for g in st.groups}
        assert set(groups) == {"4x5", "6x3"}
        np.testing.assert_array_equal(groups["4x5"].indices, [0, 1, 3])
        assert not st.is_uniform
        stack = st.stack(group="4x5")
        assert stack.shape == (3, 4, 5, 8)
        np.testing.assert_array_equal(np.asarray(stack[2]), items[3]["feats"]["final"].astype(np.float32))
        with pytest.raises(PosvitError, match="several grid sizes"):
            st.stack()
    uniform = [it for it in items if it["feats"]["final"].shape[:2] == (4, 5)]
    path2 = _write(tmp_path / ("u_" + name), uniform)
    with FeatureStore(path2) as st:
        assert st.is_uniform
        whole = np.asarray(st.stack()[...])
        assert whole.shape == (3, 4, 5, 8)


def test_reads_are_lazy(tmp_path, monkeypatch):
    """Reading one image touches one image's rows, never the whole dataset."""
    rng = np.random.default_rng(3)
    path = tmp_path / "big.h5"
    with StoreWriter(path, provenance={**PROVENANCE, "channels": 16}, layers=["final"]) as w:
        for i in range(50):
            w.add(f"i{i}.png", {"final": rng.normal(size=(8, 8, 16))}, orig_size=(128, 128), proc_size=(128, 128))
        w.commit()
    with FeatureStore(path) as st:
        arr = st._backend.array("groups/8x8/features/final")
        calls = []
        cls = type(arr)
        orig = cls.__getitem__

        def spy(self, key):
            calls.append(key)
            return orig(self, key)

        monkeypatch.setattr(cls, "__getitem__", spy)
        st.features(17)
        assert calls == [17]


def test_iterating_a_large_store_stays_in_bounded_memory(tmp_path):
    import tracemalloc

    rng = np.random.default_rng(4)
    path = tmp_path / "many.h5"
    one = rng.normal(size=(16, 16, 64)).astype(np.float32)  # 64 KiB per image
    with StoreWriter(path, provenance={**PROVENANCE, "channels": 64}, layers=["final"]) as w:
        for i in range(400):  # ~26 MB of float32 features in all
            w.add(f"i{i}.png", {"final": one}, orig_size=(256, 256), proc_size=(256, 256))
        w.commit()
    with FeatureStore(path) as st:
        tracemalloc.start()
        total = 0.0
        for _, f in st.iter_features():
            total += float(f[0, 0, 0])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert total == pytest.approx(400 * float(np.float16(one[0, 0, 0])), rel=1e-3)
    assert peak < 4 * 2**20, f"iteration peaked at {peak / 2**20:.1f} MiB"


def test_refuses_overwrite_and_replaces_with_flag(tmp_path):
    rng = np.random.default_rng(5)
    items = _images(rng)
    path = _write(tmp_path / "f.h5", items)
    with pytest.raises(PosvitError, match="already exists"):
        StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"])
    _write(path, items[:1], overwrite=True)
    with FeatureStore(path) as st:
        assert len(st) == 1


@pytest.mark.parametrize("name", FORMATS)
def test_interrupted_write_is_partial_and_resumes(tmp_path, name):
    rng = np.random.default_rng(6)
    items = _images(rng)
    path = tmp_path / name
    with pytest.raises(RuntimeError):
        with StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"], dtype="float32") as w:
            for it in items[:2]:
                w.add(it["path"], it["feats"], orig_size=it["orig_size"], proc_size=it["proc_size"],
                      prefix=it["prefix"], maps=it["maps"], meta=it["meta"])
                w.commit()
            # A third image is half-written (rows reserved, never committed) when the run dies.
            w.begin_image("/data/half.png", (4, 5), 8, orig_size=(64, 80), proc_size=(64, 80),
                          prefix=items[0]["prefix"], maps=items[0]["maps"])
            raise RuntimeError("killed")
    assert not path.exists(), "an unfinished store must never appear under its final name"
    partial = tmp_path / (name + ".partial")
    assert partial.exists()
    with pytest.raises(PosvitError, match="--resume"):
        FeatureStore(path)
    with pytest.raises(PosvitError, match="unfinished"):
        StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"])
    with StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"], dtype="float32", resume=True) as w:
        assert w.done == {items[0]["path"], items[1]["path"]}
        for it in items[2:]:
            w.add(it["path"], it["feats"], orig_size=it["orig_size"], proc_size=it["proc_size"],
                  prefix=it["prefix"], maps=it["maps"], meta=it["meta"])
            w.commit()
    whole = _write(tmp_path / ("whole_" + name), items)
    with FeatureStore(path) as a, FeatureStore(whole) as b:
        assert [r.path for r in a.records] == [r.path for r in b.records]
        assert [(r.group, r.row) for r in a.records] == [(r.group, r.row) for r in b.records]
        for i in range(len(b)):
            for layer in b.layers:
                np.testing.assert_array_equal(a.features(i, layer), b.features(i, layer))
            np.testing.assert_array_equal(a.token_map(i, "labels"), b.token_map(i, "labels"))


def test_resume_refuses_other_settings(tmp_path):
    rng = np.random.default_rng(7)
    items = _images(rng)
    path = tmp_path / "f.h5"
    w = StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"])
    w.add(items[0]["path"], items[0]["feats"], orig_size=(64, 80), proc_size=(64, 80), prefix=items[0]["prefix"])
    w.commit()
    w.abort()
    other = {**PROVENANCE, "model": "dinov2-s"}
    with pytest.raises(PosvitError, match="model"):
        StoreWriter(path, provenance=other, layers=["final", "block2"], resume=True)


def test_resume_appends_to_a_finished_store(tmp_path):
    rng = np.random.default_rng(8)
    items = _images(rng)
    path = _write(tmp_path / "f.zarr.zip", items[:2])
    with StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"], dtype="float32", resume=True) as w:
        assert len(w.done) == 2
        it = items[2]
        w.add(it["path"], it["feats"], orig_size=it["orig_size"], proc_size=it["proc_size"], prefix=it["prefix"],
              maps=it["maps"])
    with FeatureStore(path) as st:
        assert len(st) == 3


def test_stream_round_trip_through_bytes(tmp_path):
    rng = np.random.default_rng(9)
    items = _images(rng)
    buf = io.BytesIO()
    with StoreWriter("-", provenance=PROVENANCE, layers=["final", "block2"], dtype="float32", stream=buf) as w:
        for it in items:
            w.add(it["path"], it["feats"], orig_size=it["orig_size"], proc_size=it["proc_size"], prefix=it["prefix"])
    data = buf.getvalue()
    assert data[:4] == b"\x89HDF"
    st = read_bytes_store(data)
    assert len(st) == 4
    np.testing.assert_array_equal(st.features(2, "block2"), items[2]["feats"]["block2"].astype(np.float32))
    st.close()


def test_zipped_zarr_streams_too(tmp_path):
    rng = np.random.default_rng(10)
    path = _write(tmp_path / "f.zarr.zip", _images(rng))
    st = read_bytes_store(path.read_bytes())
    assert len(st) == 4 and st.format == "zarr-zip"
    st.close()


def test_merge_shards(tmp_path):
    rng = np.random.default_rng(11)
    items = _images(rng)
    a = _write(tmp_path / "a.h5", items[0::2])
    b = _write(tmp_path / "b.zarr", items[1::2])
    n = merge_stores([a, b], tmp_path / "m.h5")
    assert n == 4
    with FeatureStore(tmp_path / "m.h5") as st:
        assert sorted(r.path for r in st.records) == sorted(it["path"] for it in items)
        by_path = {r.path: r.index for r in st.records}
        for it in items:
            np.testing.assert_array_equal(st.features(by_path[it["path"]]), it["feats"]["final"].astype(np.float32))
            np.testing.assert_array_equal(st.prefix_tokens(by_path[it["path"]]), it["prefix"]["final"].astype(np.float32))
        assert st.provenance["merged_from"] == [str(a), str(b)]


def test_merge_refuses_different_models(tmp_path):
    rng = np.random.default_rng(12)
    items = _images(rng)
    a = _write(tmp_path / "a.h5", items[:1])
    with StoreWriter(tmp_path / "b.h5", provenance={**PROVENANCE, "model": "other"}, layers=["final", "block2"]) as w:
        it = items[1]
        w.add(it["path"], it["feats"], orig_size=(64, 80), proc_size=(64, 80), prefix=it["prefix"])
    with pytest.raises(PosvitError, match="model"):
        merge_stores([a, tmp_path / "b.h5"], tmp_path / "m.h5")


def test_maps_only_store(tmp_path):
    path = tmp_path / "labels.h5"
    with StoreWriter(path, provenance={"channels": 0, "model": "kmeans"}, layers=[]) as w:
        w.add("a.png", {}, maps={"kmeans_k3": np.arange(12, dtype=np.int32).reshape(3, 4)}, orig_size=(48, 64),
              proc_size=(48, 64))
    with FeatureStore(path) as st:
        assert st.layers == [] and st.map_names() == ["kmeans_k3"]
        assert st.record(0).grid == (3, 4)
        with pytest.raises(PosvitError, match="maps only"):
            st.features(0)


def test_bad_inputs(tmp_path):
    with pytest.raises(PosvitError, match="does not exist"):
        FeatureStore(tmp_path / "missing.h5")
    with pytest.raises(PosvitError, match="store format"):
        store_format("feats.npy")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(PosvitError, match="cannot read"):
        FeatureStore(tmp_path / "junk.h5")
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(PosvitError, match="not a posvit feature store"):
        FeatureStore(tmp_path / "other.h5")
    with pytest.raises(PosvitError, match="standard input"):
        read_bytes_store(b"hello world, this is text")
    with pytest.raises(PosvitError, match="does not exist"):
        StoreWriter(tmp_path / "nodir" / "f.h5", provenance=PROVENANCE, layers=["final"])
    with pytest.raises(PosvitError, match="unknown layer"):
        canonical_layer_name("penultimate")
    rng = np.random.default_rng(13)
    path = _write(tmp_path / "ok.h5", _images(rng))
    with FeatureStore(path) as st, pytest.raises(PosvitError, match="not in"):
        st.features(0, "block7")


def test_float16_overflow_warns(tmp_path):
    from posvit_cli.core.errors import PosvitWarning

    with pytest.warns(PosvitWarning, match="float32"):
        with StoreWriter(tmp_path / "f.h5", provenance={**PROVENANCE, "channels": 2}, layers=["final"]) as w:
            w.add("a.png", {"final": np.full((2, 2, 2), 1e6)}, orig_size=(32, 32), proc_size=(32, 32))


def test_store_info_is_json_ready(tmp_path):
    rng = np.random.default_rng(14)
    path = _write(tmp_path / "f.h5", _images(rng))
    with FeatureStore(path) as st:
        info = st.info()
    json.dumps(info)
    assert info["groups"] == {"4x5": 3, "6x3": 1} and info["n_images"] == 4


def test_damaged_hdf5_partial_gives_a_clear_error(tmp_path):
    """A partial file mangled by a kill during a write is refused with one line, never an HDF5 traceback."""
    rng = np.random.default_rng(15)
    items = _images(rng)
    path = tmp_path / "f.h5"
    w = StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"])
    for it in items[:2]:
        w.add(it["path"], it["feats"], orig_size=(64, 80), proc_size=(64, 80), prefix=it["prefix"])
        w.commit()
    w.abort()
    partial = tmp_path / "f.h5.partial"
    data = bytearray(partial.read_bytes())
    data[64:4096] = b"\xff" * (4096 - 64)  # clobber the superblock area and early metadata
    partial.write_bytes(bytes(data))
    with pytest.raises(PosvitError, match="--overwrite"):
        StoreWriter(path, provenance=PROVENANCE, layers=["final", "block2"], resume=True)
    assert not (tmp_path / "f.h5.partial.salvage").exists()

"""Stores open as they are in the array ecosystem: xarray and dask read posvit's Zarr and HDF5 stores.

The snippets below are the ones in docs/feature-store.md ("Opening a store with Dask or xarray"), run as they
are written there (a test checks that the page still holds them word for word).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from posvit_cli.core.features.backends import H5Backend, ZarrBackend
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.writer import StoreWriter

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "feature-store.md"

# Run with ``path`` (the store) and ``grid`` (one of its grid groups, e.g. "37x37") already set.
ZARR_SNIPPET = '''\
import dask.array as da
import xarray as xr
import zarr

store = zarr.storage.ZipStore(path, mode="r") if str(path).endswith(".zip") else path
tree = xr.open_datatree(store, engine="zarr", consolidated=False)  # every group, lazily
features = xr.open_zarr(store, group=f"groups/{grid}/features", consolidated=False)
images = xr.open_zarr(store, group="images", consolidated=False)
final = da.from_zarr(store, component=f"groups/{grid}/features/final")
'''

HDF5_SNIPPET = '''\
import dask.array as da
import h5py
import xarray as xr

f = h5py.File(path, "r")

def dataset(group):  # the arrays of one HDF5 group as an xarray Dataset, lazily, with the stored axis names
    return xr.Dataset({name: ([dim.label for dim in arr.dims], da.from_array(arr, chunks=arr.chunks))
                       for name, arr in f[group].items()})

features = dataset(f"groups/{grid}/features")
images = dataset("images")
final = da.from_array(f[f"groups/{grid}/features/final"])
'''

LAYERS = ("final", "block0")
# Two grid groups (three 4x5 images, one 3x3), two layers, 2 prefix tokens and a label map per image.
GRIDS = [(4, 5), (4, 5), (3, 3), (4, 5)]
C, P = 6, 2


def _write(path, dtype):
    """A small store with every kind of array the writer makes; returns what was written per image."""
    rng = np.random.default_rng(0)
    written = []
    with StoreWriter(path, provenance={"model": "synthetic", "patch_size": 16, "channels": C}, layers=list(LAYERS),
                     dtype=dtype, overwrite=True) as w:
        for i, (h, wd) in enumerate(GRIDS):
            feats = {layer: rng.standard_normal((h, wd, C)).astype(dtype) for layer in LAYERS}
            feats["final"][0, 0] = 0  # a zero token must read as 0, not as a masked fill value
            prefix = {layer: rng.standard_normal((P, C)).astype(dtype) for layer in LAYERS}
            labels = rng.integers(0, 4, (h, wd)).astype(np.int32)
            w.add(f"img{i}.png", feats, orig_size=(h * 16, wd * 16), proc_size=(h * 16, wd * 16), prefix=prefix,
                  maps={"labels": labels})
            written.append((feats, prefix, labels))
        w.commit()
    return written


def _read_all(path, dtype):
    """What FeatureStore reads for every image (records, features, prefix tokens, labels) and the 4x5 stack,
    read before another reader opens the file (one process cannot open an HDF5 file with two locking modes)."""
    store = FeatureStore(path)
    out = [(store.record(i),
            {layer: store.features(i, layer, dtype=dtype) for layer in LAYERS},
            {layer: store.prefix_tokens(i, layer, dtype=dtype) for layer in LAYERS},
            store.token_map(i, "labels"))
           for i in range(len(GRIDS))]
    stack = np.asarray(store.stack("final", group="4x5"))
    store.close()
    return out, stack


def _check(ours, written, features_of, prefix_of, maps_of):
    """Every image's arrays, as another reader sees them, equal FeatureStore's and what was written (exactly)."""
    for (rec, feats, prefix, labels), (w_feats, w_prefix, w_labels) in zip(ours, written):
        for layer in LAYERS:
            np.testing.assert_array_equal(feats[layer], w_feats[layer])
            np.testing.assert_array_equal(prefix[layer], w_prefix[layer])
            np.testing.assert_array_equal(features_of(rec.group)[layer].values[rec.row], feats[layer])
            np.testing.assert_array_equal(prefix_of(rec.group)[layer].values[rec.row], prefix[layer])
        np.testing.assert_array_equal(labels, w_labels)
        np.testing.assert_array_equal(maps_of(rec.group)["labels"].values[rec.row], labels)


def _check_dims(features, prefix, maps, images, grid):
    h, w = grid
    for layer in LAYERS:
        assert features[layer].dims == ("image", "y", "x", "channel")
        assert prefix[layer].dims == ("image", "token", "channel")
    assert dict(features.sizes)["y"] == h and dict(features.sizes)["x"] == w
    assert dict(prefix.sizes)["token"] == P
    assert maps["labels"].dims == ("image", "y", "x")
    assert images["sizes"].dims == ("image", "size")
    assert images["row"].dims == ("image",)
    assert dict(images.sizes)["image"] == len(GRIDS)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", ["f.zarr", "f.zarr.zip"])
def test_zarr_store_opens_in_xarray_and_dask(tmp_path, name, dtype):
    path = str(tmp_path / name)
    written = _write(path, dtype)
    ours, stack = _read_all(path, dtype)
    grid = "4x5"
    ns = {"path": path, "grid": grid}
    exec(ZARR_SNIPPET, ns)
    features, images, final, tree = ns["features"], ns["images"], ns["final"], ns["tree"]

    _check_dims(features, tree[f"groups/{grid}/prefix"].dataset, tree[f"groups/{grid}/maps"].dataset, images,
                (4, 5))
    assert features["final"].dtype == np.dtype(dtype)
    assert [str(p) for p in images["path"].values] == [rec.path for rec, *_ in ours]
    assert [str(g) for g in images["group"].values] == [rec.group for rec, *_ in ours]
    np.testing.assert_array_equal(images["row"].values, [rec.row for rec, *_ in ours])
    _check(ours, written,
           lambda g: tree[f"groups/{g}/features"].dataset,
           lambda g: tree[f"groups/{g}/prefix"].dataset,
           lambda g: tree[f"groups/{g}/maps"].dataset)
    np.testing.assert_array_equal(final.compute(), features["final"].values)
    np.testing.assert_array_equal(final.compute(), stack)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_hdf5_store_opens_as_dask_arrays_and_an_xarray_dataset(tmp_path, dtype):
    path = str(tmp_path / "f.h5")
    written = _write(path, dtype)
    ours, stack = _read_all(path, dtype)
    grid = "4x5"
    ns = {"path": path, "grid": grid}
    exec(HDF5_SNIPPET, ns)
    f, dataset = ns["f"], ns["dataset"]
    try:
        features, images, final = ns["features"], ns["images"], ns["final"]
        _check_dims(features, dataset(f"groups/{grid}/prefix"), dataset(f"groups/{grid}/maps"), images, (4, 5))
        assert features["final"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(images["row"].values, [rec.row for rec, *_ in ours])
        _check(ours, written,
               lambda g: dataset(f"groups/{g}/features"),
               lambda g: dataset(f"groups/{g}/prefix"),
               lambda g: dataset(f"groups/{g}/maps"))
        np.testing.assert_array_equal(final.compute(), stack)
    finally:
        f.close()


def test_docs_hold_the_tested_snippets():
    text = DOCS.read_text()
    assert "## Opening a store with Dask or xarray" in text
    assert ZARR_SNIPPET in text
    assert HDF5_SNIPPET in text


@pytest.mark.parametrize("name", ["f.h5", "f.zarr", "f.zarr.zip"])
def test_store_written_without_dimension_names_still_reads(tmp_path, monkeypatch, cli, name):
    """Stores written before the arrays had names (old posvit) read as before: posvit never needs the names."""
    for cls in (H5Backend, ZarrBackend):
        for method in ("create_array", "create_string_array"):
            plain = getattr(cls, method)
            takes_dims = "dims" in inspect.signature(plain).parameters

            def unnamed(self, *args, _plain=plain, _takes_dims=takes_dims, **kwargs):
                kwargs.pop("dims", None)
                return _plain(self, *args, **kwargs, **({"dims": None} if _takes_dims else {}))

            monkeypatch.setattr(cls, method, unnamed)
    path = str(tmp_path / name)
    written = _write(path, "float32")
    monkeypatch.undo()

    store = FeatureStore(path)
    arr = store.stack("final", group="4x5")
    if name.endswith(".h5"):
        assert [dim.label for dim in arr.dims] == ["", "", "", ""]  # really an old, unnamed store
    else:
        assert arr.metadata.dimension_names is None
    for i, (feats, prefix, labels) in enumerate(written):
        np.testing.assert_array_equal(store.features(i, "block0"), feats["block0"])
        np.testing.assert_array_equal(store.prefix_tokens(i, "final"), prefix["final"])
        np.testing.assert_array_equal(store.token_map(i, "labels"), labels)
    store.close()
    res = cli(["store", "info", path, "--checksums", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_images"] == len(GRIDS)

    # The documented way to add the names: merging the one store rewrites it.
    renamed = str(tmp_path / ("renamed" + name[1:]))
    assert cli(["store", "merge", path, "-o", renamed, "-q"]).exit_code == 0
    if not name.endswith(".h5"):
        features = xr.open_zarr(zarr.storage.ZipStore(renamed, mode="r") if renamed.endswith(".zip") else renamed,
                                group="groups/4x5/features", consolidated=False)
        assert features["final"].dims == ("image", "y", "x", "channel")
    else:
        with h5py.File(renamed, "r") as f:
            assert [dim.label for dim in f["groups/4x5/features/final"].dims] == ["image", "y", "x", "channel"]

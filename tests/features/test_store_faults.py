"""Feature-store writing under faults: refused resumes, two writers, nothing readable, damaged Zarr, full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_MODEL, write_store
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.store import FeatureStore
from posvit_cli.core.features.writer import StoreWriter

FORMATS = ["f.h5", "f.zarr", "f.zarr.zip"]
EXTRACT = ["-m", TINY_MODEL, "-w", "random", "-q", "--dtype", "float32", "--device", "cpu", "--batch-size", "2"]


def _snapshot(folder):
    """Every file under ``folder`` (relative path → SHA-256 of its bytes): what "left untouched" compares."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _grids(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(n)]


# -- 1. a refused --resume leaves the finished store where and as it was -----------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_refused_resume_leaves_the_finished_store_byte_identical(tmp_path, name):
    path = write_store(tmp_path / name, _grids(), provenance={"preprocessing": {"size": "native"}})
    before = _snapshot(tmp_path)
    other = {"model": "synthetic", "patch_size": 16, "channels": 4, "preprocessing": {"size": "square:128"}}
    with pytest.raises(PosvitError, match=r"preprocessing.size differ"):
        StoreWriter(path, provenance=other, layers=["final"], dtype="float32", resume=True)
    assert _snapshot(tmp_path) == before  # same files, same bytes: no .partial, no .lock, the store in place
    with FeatureStore(path) as st:
        assert len(st) == 3


@pytest.mark.parametrize("fmt", ["h5", "zarr.zip"])
def test_refused_resume_through_the_cli(tmp_path, image_dir, cli, fmt):
    out = tmp_path / f"f.{fmt}"
    assert cli(["extract", image_dir, *EXTRACT, "-o", out]).exit_code == 0
    before = _snapshot(tmp_path)
    res = cli(["extract", image_dir, *EXTRACT, "--size", "64", "-o", out, "--resume"])
    assert res.exit_code == 2, res.output
    assert "cannot resume" in res.output and "preprocessing" in res.output
    assert _snapshot(tmp_path) == before


# -- 2. one writer per output ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_a_second_writer_to_the_same_output_is_refused(tmp_path, name):
    path = tmp_path / name
    first = StoreWriter(path, provenance={"channels": 4}, layers=["final"], dtype="float32")
    first.add("a.png", {"final": _grids(1)[0]}, orig_size=(32, 48), proc_size=(32, 48))
    first.commit()
    lock = tmp_path / (name + ".lock")
    assert lock.read_text().strip() == str(os.getpid())
    for kwargs in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(PosvitError, match=rf"is being written by another posvit process \(pid {os.getpid()}\)"):
            StoreWriter(path, provenance={"channels": 4}, layers=["final"], dtype="float32", **kwargs)
    first.add("b.png", {"final": _grids(2)[1]}, orig_size=(32, 48), proc_size=(32, 48))
    assert first.close() == path
    assert not lock.exists()
    with FeatureStore(path) as st:
        assert [r.path for r in st.records] == ["a.png", "b.png"]
    # The lock is gone with the writer: the next one may start.
    StoreWriter(path, provenance={"channels": 4}, layers=["final"], dtype="float32", resume=True).abort()
    assert not lock.exists()


def test_extract_refused_while_another_process_writes(tmp_path, image_dir, cli):
    out = tmp_path / "f.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from posvit_cli.core.features.backends import StoreLock; lock = StoreLock(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        res = cli(["extract", image_dir, *EXTRACT, "-o", out])
        assert res.exit_code == 2, res.output
        assert f"is being written by another posvit process (pid {holder.pid})" in res.output
        assert not out.exists() and not (tmp_path / "f.h5.partial").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder exited without removing its lock file (as a killed process would): the file does not block.
    assert (tmp_path / "f.h5.lock").exists()
    res = cli(["extract", image_dir, *EXTRACT, "-o", out])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "f.h5.lock").exists()
    with FeatureStore(out) as st:
        assert len(st) == 7


# -- 3. nothing readable is an error, not an empty store ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["h5", "zarr.zip"])
def test_a_folder_of_unreadable_images_fails_and_leaves_no_store(tmp_path, cli, fmt):
    d = tmp_path / "broken"
    d.mkdir()
    for i in range(3):
        (d / f"b{i}.png").write_bytes(b"not a png at all")
    out = tmp_path / f"f.{fmt}"
    res = cli(["extract", d, *EXTRACT, "-o", out])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "none of the 3 images could be read" in errors[0] and "b0.png" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no store, no .partial, no .lock


@pytest.mark.parametrize("name", ["in.h5", "in.zarr"])
def test_a_store_given_as_images_is_refused_before_anything_is_written(tmp_path, cli, name):
    source = write_store(tmp_path / name, _grids())
    before = _snapshot(tmp_path)
    res = cli(["extract", source, *EXTRACT, "-o", tmp_path / "out.h5"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is a feature store" in errors[0]
    assert "--head HEAD" in errors[0] and "--merge" in errors[0]
    assert _snapshot(tmp_path) == before  # no out.h5, no out.h5.partial


# -- 4. a damaged Zarr store is an error, never zeros ------------------------------------------------------------


def test_a_missing_zarr_chunk_is_an_error_naming_the_image(tmp_path, cli):
    grids = _grids(3)
    grids[2][:] = 0.0  # an all-zero image is data, not damage: its chunk is written like any other
    path = write_store(tmp_path / "f.zarr", grids)
    chunk = path / "groups" / "2x3" / "features" / "final" / "c" / "1" / "0" / "0" / "0"
    assert chunk.is_file()
    assert cli(["store", "info", path, "--checksums", "-q"]).exit_code == 0
    chunk.unlink()
    with FeatureStore(path) as st:
        np.testing.assert_array_equal(st.features(0), grids[0])
        np.testing.assert_array_equal(st.features(2), np.zeros((2, 3, 4), np.float32))
        with pytest.raises(PosvitError, match=r"store '.*f\.zarr' is damaged: the features of image 'img001\.png' "
                                              r"\(layer final\) are missing \(chunk '.*c/1/0/0/0' absent\)"):
            st.features(1)
        with pytest.raises(PosvitError, match="img001.png"):
            st.feature_rows(1, "final", 0, 1)
        with pytest.raises(PosvitError, match="img001.png"):
            st.checksum(1)
    res = cli(["store", "info", path, "--checksums"])
    assert res.exit_code == 2, res.output
    assert "is damaged" in res.output and "img001.png" in res.output
    # segmentation reads the same tokens in bands through the checked reader
    from posvit_cli.core.segment.vit_pixels import TokenSource

    src = TokenSource(FeatureStore(path))
    rec = src.store.record(1)
    with pytest.raises(PosvitError, match="img001.png"):
        list(src._bands(rec)())


# -- 5. store info describes an unfinished store -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["f.h5", "f.zarr"])
def test_store_info_describes_an_unfinished_store(tmp_path, cli, name):
    import json

    path = tmp_path / name
    w = StoreWriter(path, provenance={"channels": 4, "model": "synthetic", "preprocessing": {"size": "short:64"}},
                    layers=["final"], dtype="float32")
    for i, g in enumerate(_grids(2)):
        w.add(f"i{i}.png", {"final": g}, orig_size=(32, 48), proc_size=(32, 48))
        w.commit()
    w.abort()  # interrupted: the store stays at .partial
    partial = tmp_path / (name + ".partial")
    for given in (partial, path):  # the partial itself, or the store it will become
        res = cli(["store", "info", given, "--json", "-q"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout)
        assert info["complete"] is False and info["n_images"] == 2 and info["source"] == str(partial)
        assert [im["path"] for im in info["images"]] == ["i0.png", "i1.png"]
        assert info["provenance"]["preprocessing"] == {"size": "short:64"} and info["provenance"]["model"] == "synthetic"
        assert "--resume" in info["unfinished"] and "--overwrite" in info["unfinished"]
    res = cli(["store", "info", partial])
    assert res.exit_code == 0, res.output
    assert "UNFINISHED" in res.output and "2 committed" in res.output and "--resume" in res.output


# -- 6. a full disk is one error line, and the partial store resumes ---------------------------------------------


def test_full_disk_during_an_hdf5_extract_is_one_line_and_resumable(tmp_path, image_dir, cli, monkeypatch):
    import h5py

    whole = tmp_path / "whole.h5"
    assert cli(["extract", image_dir, *EXTRACT, "-o", whole]).exit_code == 0
    real_setitem = h5py.Dataset.__setitem__
    feature_writes = []

    def disk_fills_up(self, key, value):
        if "/features/" in self.name:
            feature_writes.append(key)
            if len(feature_writes) > 4:  # the fifth image's features find the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_fills_up)
    out = tmp_path / "f.h5"
    res = cli(["extract", image_dir, *EXTRACT, "-o", out])
    monkeypatch.undo()
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "Exception ignored" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    partial = tmp_path / "f.h5.partial"
    with FeatureStore(partial, allow_partial=True) as st:
        saved = len(st)
    assert 0 < saved <= 4
    assert errors[0] == (f"error: no space left on device while writing '{out}': {saved} images are saved in "
                         f"'{partial}'; free space and run again with --resume")
    assert not out.exists() and not (tmp_path / "f.h5.lock").exists()
    res = cli(["extract", image_dir, *EXTRACT, "-o", out, "--resume"])
    assert res.exit_code == 0, res.output
    with FeatureStore(out) as a, FeatureStore(whole) as b:
        assert sorted(r.path for r in a.records) == sorted(r.path for r in b.records)
        index = {r.path: r.index for r in a.records}
        for r in b.records:
            np.testing.assert_array_equal(a.features(index[r.path]), b.features(r.index))


def test_a_full_temporary_disk_while_streaming_a_store_is_one_line(tmp_path, cli, image_dir, monkeypatch):
    """`extract ... -o -` builds the store in a temporary file first (TMPDIR): a full TMPDIR is one line too."""
    import h5py

    real_setitem = h5py.Dataset.__setitem__

    def disk_full(self, key, value):
        if "/features/" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_full)
    res = cli(["extract", image_dir, *EXTRACT, "-o", "-"])
    monkeypatch.undo()
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "Exception ignored" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0], res.stderr
    assert res.stdout_bytes == b""  # nothing half-written into the pipe

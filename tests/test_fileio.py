"""Atomic outputs and tagged JSON documents (core/fileio.py), which every command's file output goes through."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import atomic_path, file_mode, read_tagged_json, write_json_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_completed_write_replaces_the_file_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "out.tif"
    with atomic_path(target, keep_suffix=True) as tmp:
        assert tmp.endswith(".tif") and os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as fh:
            fh.write("new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == file_mode()
    with pytest.raises(PosvitError, match="does not exist"):
        with atomic_path(tmp_path / "missing" / "x", make_parents=False):
            pass


def test_tagged_json_round_trip_and_refusals(tmp_path):
    p = write_json_atomic(tmp_path / "r.json", {"schema": "posvit-x", "schema_version": 1, "v": np.float32(0.5),
                                                "a": np.arange(3)})
    doc = read_tagged_json(p, "posvit-x", 1, "x result")
    assert doc["v"] == 0.5 and doc["a"] == [0, 1, 2]
    with pytest.raises(PosvitError, match="upgrade posvit"):
        read_tagged_json(p, "posvit-x", 0, "x result")
    with pytest.raises(PosvitError, match="no 'posvit-y' schema tag"):
        read_tagged_json(p, "posvit-y", 1, "y result")
    write_text_atomic(tmp_path / "bad.json", "{not json")
    with pytest.raises(PosvitError, match="cannot read"):
        read_tagged_json(tmp_path / "bad.json", "posvit-x", 1, "x result")
    with pytest.raises(PosvitError, match=r"does not exist \(make one\)"):
        read_tagged_json(tmp_path / "none.json", "posvit-x", 1, "x result", hint="make one")
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == "posvit-x"


def test_json_clean_gives_strict_json_with_known_values(tmp_path):
    from pathlib import Path

    from posvit_cli.core.fileio import json_clean, json_text

    doc = {"nan": float("nan"), "inf": -np.inf, "f32": np.float32(0.5), "i64": np.int64(7), "flag": np.bool_(True),
           "arr": np.array([1.0, np.nan]), "pair": (1, 2), "path": Path("a/b.h5"), 3: "key"}
    out = json_clean(doc)
    assert out == {"nan": None, "inf": None, "f32": 0.5, "i64": 7, "flag": True, "arr": [1.0, None], "pair": [1, 2],
                   "path": "a/b.h5", "3": "key"}
    assert type(out["f32"]) is float and type(out["i64"]) is int and type(out["flag"]) is bool
    assert json.loads(json_text(doc)) == out
    with pytest.raises(TypeError):
        json_text({"x": object()})  # no silent str() unless asked
    assert json_text({"x": RuntimeError("boom")}, default=str, indent=None) == '{"x": "boom"}'
    # Every JSON file written goes through the cleaner: no NaN literal that strict readers reject.
    p = write_json_atomic(tmp_path / "r.json", {"r2": np.float32("nan")})
    assert p.read_text() == '{\n  "r2": null\n}\n'


def _only(tmp_path, *names):
    return sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_failed_probability_tiff_leaves_the_old_file(tmp_path):
    from posvit_cli.core.segment.segmenter import ProbabilityWriter

    target = tmp_path / "prob.tif"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with ProbabilityWriter(target, (2, 4, 4), ["a", "b"]) as pw:
            pw.array[:] = 0.5
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and _only(tmp_path, "prob.tif")
    with ProbabilityWriter(target, (2, 4, 4), ["a", "b"]) as pw:
        pw.array[:] = 0.25
    import tifffile

    assert tifffile.imread(target).shape == (2, 4, 4) and _only(tmp_path, "prob.tif")


def test_failed_zip_of_a_zarr_store_leaves_the_old_zip(tmp_path, monkeypatch):
    import zipfile

    from posvit_cli.core.features.backends import zip_dir

    src = tmp_path / "s.zarr.partial"
    (src / "g").mkdir(parents=True)
    (src / "g" / "c0").write_bytes(b"chunk")
    target = tmp_path / "s.zarr.zip"
    target.write_bytes(b"old")

    def broken(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        zip_dir(src, target)
    assert target.read_bytes() == b"old" and _only(tmp_path, "s.zarr.partial", "s.zarr.zip")
    monkeypatch.undo()
    zip_dir(src, target)
    assert zipfile.ZipFile(target).read("g/c0") == b"chunk"


def test_failed_encoder_checkpoint_and_training_log_leave_the_old_files(tmp_path, monkeypatch):
    import types

    import safetensors.torch
    import torch

    from posvit_cli.core.debias.retrofit.state import LOG_COLUMNS, write_log_csv
    from posvit_cli.core.features.encoders import save_encoder_checkpoint

    ckpt = tmp_path / "enc.safetensors"
    ckpt.write_bytes(b"old")
    enc = types.SimpleNamespace(model=torch.nn.Linear(2, 2), checkpoint_meta=lambda: {"model": "x", "r2": float("nan")})

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_encoder_checkpoint(ckpt, enc)
    assert ckpt.read_bytes() == b"old" and _only(tmp_path, "enc.safetensors")
    monkeypatch.undo()
    save_encoder_checkpoint(ckpt, enc)
    with safetensors.safe_open(str(ckpt), "pt") as f:
        assert json.loads(f.metadata()["posvit"]) == {"model": "x", "r2": None}

    log = tmp_path / "log.csv"
    log.write_text("old")

    class Unprintable:
        def __str__(self):
            raise RuntimeError("bad value")

    with pytest.raises(RuntimeError, match="bad value"):
        write_log_csv([{LOG_COLUMNS[0]: 1}, {LOG_COLUMNS[0]: Unprintable()}], log)
    assert log.read_text() == "old" and _only(tmp_path, "enc.safetensors", "log.csv")

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

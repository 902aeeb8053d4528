"""The README demo end to end (reduced setting), its summary checked against stored expectations."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_quick_demo_reproduces_its_summary(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    spec = json.loads((REPO / "examples" / "demo_expected_quick.json").read_text())
    rows = {r["features"]: r for r in summary["rows"]}
    assert set(rows) == set(spec["expected"])
    for name, expected in spec["expected"].items():
        for key, value in expected.items():
            tol = spec["tolerance"][key]
            if name == "ALiBi retrofit" and key == "xy_stack_r2":
                tol = spec["tolerance_alibi_xy_stack_r2"]
            assert rows[name][key] == pytest.approx(value, abs=tol), (name, key, rows[name][key])
    raw, alibi = rows["raw posvit-tiny"], rows["ALiBi retrofit"]
    # The findings the demo exists to show, independent of the exact numbers.
    assert raw["xy_stack_r2"] > 0.9 and alibi["xy_stack_r2"] < 0.0
    assert alibi["overcluster_miou_k3"] > raw["overcluster_miou_k3"] + 0.1
    assert alibi["segment_miou"] > raw["segment_miou"] + 0.05
    assert "Every output is in" in proc.stderr and (out / "viz" / "index.html").is_file()
    for f in ("probe_raw.json", "rasa.safetensors", "alibi.safetensors", "clusters_alibi.h5", "textures_rasa.h5",
              "report.md", "report.json"):
        assert (out / f).exists(), f
    assert "report_raw_vs_RASA_vs_ALiBi.png" in (out / "viz" / "index.html").read_text()


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--out", str(tmp_path / "mine")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a posvit demo folder" in proc.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"

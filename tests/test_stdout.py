"""Data goes to stdout only into a pipe (or with ``-o -``); JSON on stdout is strict."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_MODEL, run_posvit

POSVIT = [sys.executable, "-m", "posvit_cli"]
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _env(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "TMPDIR": str(tmpdir)}


def test_store_into_a_redirected_file_is_refused_and_the_file_stays_empty(tmp_path, image_dir):
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.run([*POSVIT, "extract", str(image_dir), "-m", "posvit-tiny"], stdout=out,
                              stderr=subprocess.PIPE, timeout=300, env=_env(tmp_path))
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, err
    assert len(err) == 1 and err[0].startswith("error:") and "-o" in err[0], err
    assert log.stat().st_size == 0


def test_extract_piped_into_probe_streams_the_store(tmp_path, image_dir):
    extract = subprocess.Popen([*POSVIT, "extract", str(image_dir), "-m", TINY_MODEL, "-w", "random", "-q",
                                "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=_env(tmp_path))
    probe = subprocess.run([*POSVIT, "probe", "--fraction", "0.25", "--repeats", "2", "--json", "-q"],
                           stdin=extract.stdout, capture_output=True,
                           timeout=300, env=_env(tmp_path))
    extract.stdout.close()
    assert extract.wait(timeout=300) == 0, extract.stderr.read().decode()
    assert probe.returncode == 0, probe.stderr.decode()
    doc = json.loads(probe.stdout)
    assert doc["store"]["n_images"] == 7 and doc["store"]["model"] == TINY_MODEL


def test_dash_output_streams_into_a_pipe_and_reads_back_as_the_store(tmp_path, image_dir):
    common = [str(image_dir), "-m", TINY_MODEL, "-w", "random", "-q", "--device", "cpu"]
    proc = run_posvit(["extract", *common, "-o", "-"])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout[:8] == HDF5_MAGIC
    info = run_posvit(["store", "info", "-", "--json", "-q"], input=proc.stdout)
    assert info.returncode == 0, info.stderr.decode()
    assert json.loads(info.stdout)["n_images"] == 7  # the six grey PNGs and the colour one


def test_dash_output_is_written_even_into_a_file(tmp_path, image_dir):
    # -o - is an explicit request: the user asked for the bytes on stdout, wherever it points.
    path = tmp_path / "f.h5"
    with open(path, "wb") as out:
        proc = subprocess.run([*POSVIT, "extract", str(image_dir), "-m", TINY_MODEL, "-w", "random", "-q",
                               "--device", "cpu", "-o", "-"], stdout=out, stderr=subprocess.PIPE, timeout=300,
                              env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    assert path.read_bytes()[:8] == HDF5_MAGIC


def test_stdout_is_pipe_tells_pipes_from_files_and_terminals(tmp_path):
    code = "from posvit_cli._cli import stdout_is_pipe; import sys; sys.stderr.write(str(stdout_is_pipe()))"
    piped = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert piped.stderr.decode() == "True"
    with open(tmp_path / "out.txt", "wb") as f:
        to_file = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.PIPE)
    assert to_file.stderr.decode() == "False"
    with open(os.devnull, "wb") as f:
        to_null = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.PIPE)
    assert to_null.stderr.decode() == "False"


def test_store_output_without_a_pipe_asks_for_o(monkeypatch):
    from posvit_cli import _cli
    from posvit_cli.core.errors import PosvitError

    monkeypatch.setattr(_cli, "stdout_is_pipe", lambda: False)
    with pytest.raises(PosvitError, match="pass -o"):
        _cli.store_output(None)
    assert _cli.store_output("-") == "-"
    assert _cli.store_output("f.h5") == "f.h5"
    monkeypatch.setattr(_cli, "stdout_is_pipe", lambda: True)
    assert _cli.store_output(None) == "-"


def test_emit_json_writes_nan_and_inf_as_null(capsys):
    from posvit_cli._cli import emit_json

    emit_json({"r2": float("nan"), "values": [1.5, float("inf"), -float("inf")], "np": np.float32("nan"),
               "array": np.array([0.25, np.nan]), "count": np.int64(3)})
    text = capsys.readouterr().out
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {text}"))
    assert doc == {"r2": None, "values": [1.5, None, None], "np": None, "array": [0.25, None], "count": 3}


def test_written_json_files_are_strict_too(tmp_path):
    from posvit_cli.core.fileio import write_json_atomic

    path = write_json_atomic(tmp_path / "r.json", {"miou": math.nan, "k": [4, 8]})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"miou": None, "k": [4, 8]}


@pytest.mark.parametrize("text, seeds", [("0-4", [0, 1, 2, 3, 4]), ("3", [3]), ("0,2,5", [0, 2, 5]),
                                         ("0-2,7", [0, 1, 2, 7]), ("4-4", [4])])
def test_parse_seeds_reads_lists_and_ranges(text, seeds):
    from posvit_cli._cli import parse_seeds

    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [("3-1", "runs backwards"), ("a,b", "cannot read --seeds"),
                                           ("", "empty"), ("1-x", "cannot read --seeds")])
def test_parse_seeds_rejects_bad_lists_in_one_line(text, message):
    from posvit_cli._cli import parse_seeds
    from posvit_cli.core.errors import PosvitError

    with pytest.raises(PosvitError, match=message) as info:
        parse_seeds(text)
    assert "\n" not in str(info.value)


def test_tables_in_a_redirected_log_are_not_cut_to_80_columns(tmp_path):
    """stderr into a file without COLUMNS: the probe's table keeps whole numbers (mean ± std), which an 80-column
    console would cut to '0.91±0.…'."""
    from conftest import write_store

    rng = np.random.default_rng(0)
    ramp = np.linspace(-1, 1, 12, dtype=np.float32)
    grids = [np.concatenate([rng.standard_normal((12, 12, 6)).astype(np.float32),
                             np.broadcast_to(ramp[None, :, None], (12, 12, 1)),
                             np.broadcast_to(ramp[:, None, None], (12, 12, 1))], axis=-1) for _ in range(3)]
    store = write_store(tmp_path / "s.h5", grids)
    env = {k: v for k, v in _env(tmp_path).items() if k != "COLUMNS"}
    with open(tmp_path / "run.log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "posvit_cli", "probe", str(store), "--fraction", "0.3"],
                           stdout=subprocess.DEVNULL, stderr=log, timeout=300, env=env)
    text = (tmp_path / "run.log").read_text()
    assert r.returncode == 0, text
    rows = [ln for ln in text.splitlines() if "±" in ln]
    assert rows and not any("…" in ln for ln in rows), text
    assert max(len(ln) for ln in text.splitlines()) > 80

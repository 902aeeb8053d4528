"""Failures the user can fix outside posvit (permissions, full or read-only disks) are one line and exit 2."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import typer
from PIL import Image

from posvit_cli._cli import cli_context


def _exit_and_stderr(capsys, exc):
    with pytest.raises(typer.Exit) as info:
        with cli_context():
            raise exc
    return info.value.exit_code, capsys.readouterr().err.strip().splitlines()


def test_permission_and_disk_errors_name_the_final_file_not_the_temporary_one(capsys, tmp_path):
    tmp_name = str(tmp_path / ".x.h5.k3j_9a0b.tmp.h5")  # atomic_path's temporary file beside x.h5
    code, err = _exit_and_stderr(capsys, PermissionError(errno.EACCES, "Permission denied", tmp_name))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: cannot write '{tmp_path / 'x.h5'}': permission denied"), err
    code, err = _exit_and_stderr(capsys, OSError(errno.ENOSPC, "No space left on device", "out/y.png"))
    assert code == 2 and err[0].startswith("error: cannot write 'out/y.png': no space left on device"), err
    code, err = _exit_and_stderr(capsys, OSError(errno.EROFS, "Read-only file system", "out/z.json"))
    assert code == 2 and err[0].startswith("error: cannot write 'out/z.json': read-only file system"), err
    # h5py sets errno but no filename: the file is the one HDF5 quotes in its message.
    h5 = PermissionError(errno.EACCES, "Unable to synchronously create file (unable to open file: name = "
                                       "'out/feats.h5', errno = 13, error message = 'Permission denied')")
    code, err = _exit_and_stderr(capsys, h5)
    assert code == 2 and err[0].startswith("error: cannot write 'out/feats.h5': permission denied"), err


def test_other_os_errors_stay_unexpected_failures(capsys):
    code, err = _exit_and_stderr(capsys, OSError(errno.EIO, "Input/output error", "x.h5"))
    assert code == 1 and len(err) == 1 and err[0].startswith("error: OSError:") and "--debug" in err[0]
    code, err = _exit_and_stderr(capsys, RuntimeError("boom"))
    assert code == 1 and err[0].startswith("error: RuntimeError: boom")


def test_a_read_only_output_folder_is_one_line_exit_2(tmp_path, cli, monkeypatch):
    imgs, labels = tmp_path / "imgs", tmp_path / "labels"
    imgs.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(imgs / "a.png")
    scribbles = np.zeros((32, 32), np.uint8)
    scribbles[2:6, 2:30], scribbles[26:30, 2:30] = 1, 2
    Image.fromarray(scribbles).save(labels / "a.png")
    model = tmp_path / "m.posvit-seg"
    r = cli(["segment", "train", imgs, "--labels", labels, "-o", model, "--sigmas", "1", "--trees", "3", "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() == 0:  # root writes into read-only folders: make the label writer fail the way it would
        from posvit_cli.core.segment import segmenter

        def denied(path, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        monkeypatch.setattr(segmenter, "write_label_image", denied)
    else:
        out.chmod(0o555)
    try:
        r = cli(["segment", "apply", model, imgs, "-o", out, "-q"])
    finally:
        out.chmod(0o755)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: cannot write '{out / 'a.png'}': permission denied"), r.output
    assert list(out.iterdir()) == []


@pytest.fixture
def micro_store(tmp_path, monkeypatch):
    from conftest import write_store

    monkeypatch.chdir(tmp_path)
    return write_store(tmp_path / "micro.h5", [np.random.default_rng(0).standard_normal((2, 2, 8)).astype(np.float32)])


def test_debias_train_without_a_method_names_the_methods_and_writes_nothing(micro_store, tmp_path, cli):
    r = cli(["debias-train", "micro.h5", "-o", "x"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "'micro.h5' is a feature store" in lines[0] and "rasa, blank, svd, posmean take a feature store" in lines[0]
    assert "alibi and nope take images" in lines[0] and "posvit debias-train rasa micro.h5" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro.h5"]  # no x.train/ or x


def test_debias_train_image_method_given_a_store_says_which_methods_take_one(micro_store, tmp_path, cli):
    from conftest import TINY_MODEL

    r = cli(["debias-train", "alibi", "micro.h5", "-o", "x.safetensors", "-m", TINY_MODEL, "-w", "random",
             "--device", "cpu", "-q"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "'micro.h5' is a feature store" in lines[0] and "alibi|nope take images" in lines[0], r.output
    assert "rasa|blank|svd|posmean take a feature store" in lines[0] and "posvit debias-train rasa micro.h5" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro.h5"]


def test_sigterm_stops_cluster_like_ctrl_c_with_no_output_left(tmp_path, cli, monkeypatch):
    import signal
    import time

    from conftest import write_store
    from posvit_cli.core.cluster import overclustering

    store = write_store(tmp_path / "f.h5", [np.random.default_rng(i).standard_normal((4, 4, 8)).astype(np.float32)
                                            for i in range(2)])

    class TestHandlerRan(Exception):
        """Raised by this test's own SIGTERM handler: the command installed none."""

    def killed_while_clustering(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before the sleep ends
        time.sleep(10)
        raise AssertionError("SIGTERM was not delivered")

    def test_handler(signum, frame):
        raise TestHandlerRan

    monkeypatch.setattr(overclustering, "cluster_dataset", killed_while_clustering)
    old = signal.signal(signal.SIGTERM, test_handler)  # without the command's handler SIGTERM would end pytest
    try:
        r = cli(["cluster", store, "-k", "2", "-o", tmp_path / "labels.h5", "--device", "cpu", "-q"])
        assert signal.getsignal(signal.SIGTERM) is test_handler  # the command put the previous handler back
    finally:
        signal.signal(signal.SIGTERM, old)
    assert r.exit_code == 130 and r.output.strip() == "error: interrupted", r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # no labels.h5, no labels.cluster.json


@pytest.mark.parametrize("args, says", [
    (["debias-train", "blank", "--blank", "1,2", "--fill", "mean", "-o", "out.safetensors", "--overwrite"],
     "no feature store on standard input"),
    (["debias-train", "posmean", "missing.h5", "-o", "out.safetensors", "--overwrite"], "'missing.h5' does not exist"),
    (["debias-train", "posmean", "micro.h5", "-o", "out.safetensors"], "--overwrite"),
    (["viz", "norms", "micro.h5", "--images", "nothere", "-o", "out"], "nothere"),
    (["viz", "norms", "micro.h5", "--norm-k", "-1", "-o", "out"], "--norm-k"),
    (["extract", "imgs", "-m", "test_vit", "-w", "random", "--tile", "64", "--tile-blend", "cubic", "-o",
      "out.h5", "--overwrite"], "cubic"),
])
def test_refused_runs_of_the_newer_options_leave_every_file_as_it_was(micro_store, tmp_path, cli, args, says):
    """A refused run (missing store, existing output, unknown image or value) exits 2 with one error line and changes nothing:
    the existing output file (or folder) keeps its bytes and no file appears."""
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "index.html").write_text("old index")
    for name in ("out.safetensors", "out.h5"):
        (tmp_path / name).write_bytes(b"old bytes")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = cli(args, input="")
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert says in r.output, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before

"""`posvit debias-train alibi|nope`: the distillation recipe on tiny models, with known answers.

A tiny teacher with a planted positional ramp loses it in the student; a resumed run equals an uninterrupted one
bit for bit; the checkpoint reloads through `extract`; two gloo processes follow the one-process loss curve.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from posvit_cli.core.debias.retrofit import (
    RetrofitConfig, epoch_order, gram_loss, learning_rate, most_positional_channels, noise_images, parse_blank,
    parse_stages, split_train_val, step_batches, train_retrofit,
)
from posvit_cli.core.features.encoders import load_encoder, read_checkpoint_meta
from posvit_cli.core.errors import PosvitError

from conftest import REPO, TINY_MODEL, write_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def train_dir(tmp_path):
    """Twelve smooth-texture greyscale PNGs (80 × 100 px)."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    d = tmp_path / "train"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        a = gaussian_filter(rng.random((80, 100)), 2)
        a = (a - a.min()) / (a.max() - a.min())
        Image.fromarray((a * 255).astype(np.uint8)).save(d / f"t{i:02d}.png")
    return d


def _planted_teacher():
    """A random test_vit whose position embedding carries strong x and y ramps in channels 5 and 9."""
    teacher = load_encoder(TINY_MODEL, "random", seed=0)
    pe = teacher.model.pos_embed  # (1, 1 + 10·10, 64)
    with torch.no_grad():
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 10), torch.linspace(-1, 1, 10), indexing="ij")
        pe[0, 1:, 5] = 3 * xs.flatten()
        pe[0, 1:, 9] = 3 * ys.flatten()
    return teacher


def _small_config(**kw) -> RetrofitConfig:
    base = dict(stages=parse_stages("64:2", "1e-3", "4"), micro_batch=2, eval_every=2, log_every=1, workers=0,
                blank=[5, 9], val_fraction=0.1, r2_repeats=2, r2_fraction=0.3, checkpoint_every=2)
    base.update(kw)
    return RetrofitConfig(**base)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------------------
# Pieces with hand-computed answers


def test_parse_stages_defaults_and_errors():
    st = parse_stages("224:15,518:1")
    assert [(s.size, s.epochs, s.lr, s.batch_size) for s in st] == [(224, 15, 1e-4, 256), (518, 1, 1e-5, 32)]
    st = parse_stages("96:0.5", "3e-4", "8")
    assert (st[0].size, st[0].epochs, st[0].lr, st[0].batch_size) == (96, 0.5, 3e-4, 8)
    assert [s.lr for s in parse_stages("64:1,96:1,128:1", "1e-3")] == [1e-3] * 3
    for bad in ("224", "224:0", "x:1", ""):
        with pytest.raises(PosvitError):
            parse_stages(bad)
    with pytest.raises(PosvitError, match="3 values for 2 stages"):
        parse_stages("64:1,96:1", "1,2,3")
    assert parse_blank("47, 113,47") == [47, 113] and parse_blank("auto") == "auto" and parse_blank("none") == []


def test_learning_rate_schedule():
    assert learning_rate(5, 10, 1.0) == 1.0
    assert [learning_rate(s, 10, 1.0, warmup_steps=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # Cosine from the peak (first step after warm-up) to min_ratio·peak (last step).
    assert learning_rate(2, 10, 1.0, 2, "cosine") == pytest.approx(1.0)
    assert learning_rate(9, 10, 1.0, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert learning_rate(0, 5, 2.0, 0, "cosine") == pytest.approx(2.0)
    assert learning_rate(2, 5, 2.0, 0, "cosine") == pytest.approx(1.0)  # half-way: cos(π/2)


def test_data_order_and_sharding():
    o1, o2 = epoch_order(10, 0, 0, 0), epoch_order(10, 0, 0, 1)
    assert torch.equal(o1, epoch_order(10, 0, 0, 0)) and not torch.equal(o1, o2)
    assert sorted(o1.tolist()) == list(range(10))
    one = step_batches(o1, 1, 4, 0, 1, 2)
    assert one == [o1[4:6].tolist(), o1[6:8].tolist()]
    r0, r1 = step_batches(o1, 1, 4, 0, 2, 8), step_batches(o1, 1, 4, 1, 2, 8)
    assert sorted(r0[0] + r1[0]) == sorted(o1[4:8].tolist())  # two processes share one global batch
    train, val = split_train_val([Path(f"{i}.png") for i in range(20)], 0.1, 500, 0)
    assert len(val) == 2 and len(train) == 18 and not set(train) & set(val)
    assert split_train_val([Path(f"{i}.png") for i in range(20)], 0.1, 500, 0) == (train, val)


def test_gram_loss_known_values():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert gram_loss(x, x) == 0
    # Normalised Gram of x is the identity; of y (two parallel tokens) all ones: mean squared diff = 2/4.
    y = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    assert float(gram_loss(x, y)) == pytest.approx(0.5)


def test_auto_blank_finds_planted_channels(tmp_path):
    rng = np.random.default_rng(1)
    h, w, c = 12, 16, 20
    grids = []
    for _ in range(3):
        f = rng.normal(size=(h, w, c))
        ys, xs = np.mgrid[0:h, 0:w]
        f[..., 3] += 5 * xs / (w - 1)
        f[..., 7] += 5 * ys / (h - 1)
        f[..., 11] = -np.hypot(ys - h // 2, xs - w // 2) + 0.1 * rng.normal(size=(h, w))
        grids.append(f)
    chans = most_positional_channels(grids, top_k=1, fraction=0.2)
    assert chans == [3, 7, 11]  # lr → 3, ud → 7, radial → 11, diag → 3 or 7
    assert {3, 7, 11} <= set(most_positional_channels(grids, fraction=0.2))
    # A `posvit probe` result file names the channels for --blank (top 2 per ramp).
    from posvit_cli.core.measure.probe import make_settings, probe_store, write_probe_result
    from posvit_cli.core.features.store import FeatureStore

    with FeatureStore(write_store(tmp_path / "p.h5", grids)) as fs:
        result = probe_store(fs, make_settings("holdout", fraction=0.2, extras=False)[0])
    write_probe_result(tmp_path / "probe.json", result)
    assert parse_blank(str(tmp_path / "probe.json")) == most_positional_channels(grids, fraction=0.2)


# --------------------------------------------------------------------------------------------------------------
# Training with known outcomes


def test_planted_positional_channel_is_distilled_away(train_dir, tmp_path):
    teacher = _planted_teacher()
    logs = []
    cfg = _small_config(stages=parse_stages("64:16", "2e-3", "8"), micro_batch=8, eval_every=8, log_every=8,
                        r2_repeats=3, checkpoint_every=0, blank="auto")
    res = train_retrofit(teacher, sorted(train_dir.glob("*.png")), cfg, output=None, run_dir=tmp_path / "run",
                         monitor=noise_images(3, 256, seed=1), on_log=logs.append)
    # Automatic blanking names the planted ramp channels.
    assert {5, 9} <= set(res.channels_blanked)
    teacher_xy = res.teacher_r2["64"]["xy"]
    evals = [r for r in logs if r.get("event") == "eval"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == res.steps == 16
    assert teacher_xy > 0.7
    assert last["r2_xy"] < teacher_xy - 1.0  # the student cannot say where a patch is
    assert last["val_cosine"] > first["val_cosine"] + 0.02  # ... but learns the rest of the teacher
    assert last["val_cosine"] > 0.89
    assert _rows(res.log_csv)[-1]["val_cosine"]


def _state_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_resume_equals_uninterrupted_bit_exact(train_dir, tmp_path):
    images = sorted(train_dir.glob("*.png"))
    cfg = _small_config(stages=parse_stages("64:3,80:1", "1e-3,5e-4", "4"), checkpoint_every=2, blank="auto",
                        warmup=0.2, schedule="cosine", monitor_size="crop:64")
    mon = noise_images(2, 64, seed=2)

    full = train_retrofit(load_encoder(TINY_MODEL, "random"), images, cfg, output=tmp_path / "full.safetensors",
                          run_dir=tmp_path / "full", monitor=mon)

    def stop_at_4(task, done, total):
        if task.startswith("stage 1") and done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_retrofit(load_encoder(TINY_MODEL, "random"), images, cfg, output=tmp_path / "cut.safetensors",
                       run_dir=tmp_path / "cut", monitor=mon, progress=stop_at_4)
    assert not (tmp_path / "cut.safetensors").exists()
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert json.loads(state["meta"])["global_step"] == 2
    resumed = train_retrofit(load_encoder(TINY_MODEL, "random"), images, cfg, output=tmp_path / "cut.safetensors",
                             run_dir=tmp_path / "cut", resume=tmp_path / "cut", monitor=mon)
    assert resumed.steps == full.steps == 8
    a, b = _state_tensors(tmp_path / "full.safetensors"), _state_tensors(tmp_path / "cut.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = ("elapsed_s", "images_per_s")
    ra = [{k: v for k, v in r.items() if k not in timing} for r in _rows(full.log_csv)]
    rb = [{k: v for k, v in r.items() if k not in timing} for r in _rows(resumed.log_csv)]
    assert ra == rb and len(ra) == 8 + 1  # step 0 evaluation + one row per step
    # A finished run is not resumed again.
    with pytest.raises(PosvitError, match="finished"):
        train_retrofit(load_encoder(TINY_MODEL, "random"), images, cfg, output=None, run_dir=tmp_path / "cut",
                       resume=tmp_path / "cut", monitor=mon)


def test_teacher_store_targets_equal_on_the_fly_targets(train_dir, tmp_path, cli):
    images = sorted(train_dir.glob("*.png"))
    store = tmp_path / "teacher.h5"
    r = cli(["extract", train_dir, "--model", TINY_MODEL, "--weights", "random", "--size", "crop:64",
             "--dtype", "float32", "--device", "cpu", "-o", store, "-q"])  # the training below runs on CPU
    assert r.exit_code == 0, r.output
    cfg = _small_config(stages=parse_stages("64:1", "1e-3", "4"), eval_every=0, monitor_size="crop:64")
    mon = noise_images(1, 64)
    a = train_retrofit(load_encoder(TINY_MODEL, "random"), images, cfg, output=None, run_dir=tmp_path / "a",
                       monitor=mon)
    b = train_retrofit(load_encoder(TINY_MODEL, "random"), images, cfg, output=None, run_dir=tmp_path / "b",
                       monitor=mon, teacher_stores=[store])
    la = [float(r["train_loss"]) for r in _rows(a.log_csv) if r["train_loss"]]
    lb = [float(r["train_loss"]) for r in _rows(b.log_csv) if r["train_loss"]]
    assert len(la) == 2 and np.allclose(la, lb, rtol=1e-5, atol=1e-7)
    # A store of another width does not fit.
    bad = write_store(tmp_path / "w.h5", [np.zeros((4, 4, 32), np.float32)],
                      provenance={"preprocessing": {"size": "crop:64"}})
    with pytest.raises(PosvitError, match="width mismatch"):
        train_retrofit(load_encoder(TINY_MODEL, "random"), images, cfg, output=None, run_dir=tmp_path / "c",
                       monitor=mon, teacher_stores=[bad])


# --------------------------------------------------------------------------------------------------------------
# The command


def _train_args(images, out, *extra, method="alibi", legacy=False):
    """A short CPU run; ``legacy`` spells the method the deprecated way (``--method X`` after the images)."""
    head = ["debias-train", images, "--method", method] if legacy else ["debias-train", method, images]
    return [*head, "--model", TINY_MODEL, "--weights", "random", "-o", out,
            "--stages", "64:1", "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-3", "--workers", "0",
            "--monitor-size", "crop:64", "--eval-every", "1", "--device", "cpu", *extra]


def test_cli_trains_and_extract_reloads_the_checkpoint(train_dir, tmp_path, cli):
    (train_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "student.safetensors"
    r = cli(_train_args(train_dir, out, "--blank", "5,9", "--json"))
    assert r.exit_code == 2 and "cannot be read" in r.output and "broken.png" in r.output
    # The deprecated spelling (`--method alibi` after the images) still trains, and says it is deprecated.
    r = cli(_train_args(train_dir, out, "--blank", "5,9", "--json", "--skip-unreadable", "--slopes", "geometric",
                        legacy=True))
    assert r.exit_code == 0, r.output
    assert "warning: `posvit debias-train --method alibi` is deprecated" in r.stderr
    assert "use `posvit debias-train alibi`" in r.stderr
    assert "skipped unreadable image" in r.output
    # the monitor's R² says how it was measured, beside the number
    assert "R2 protocol" in r.stderr and "holdout probe on the monitor images (crop:64 size)" in " ".join(r.stderr.split())
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["steps"] == 2 and res["channels_blanked"] == [5, 9] and res["train_images"] == 11
    meta = read_checkpoint_meta(out)
    assert meta["method"] == "alibi" and meta["channels_blanked"] == [5, 9]
    assert meta["modifications"] == [{"name": "alibi", "config": {"slopes": "geometric", "slope": 1.0,
                                                                  "distance": "euclidean", "wrap": True,
                                                                  "normalize": True}}]
    assert meta["recipe"]["stages"] == [{"size": 64, "epochs": 1.0, "lr": 1e-3, "batch_size": 4}]
    assert meta["base_model"] == TINY_MODEL and meta["teacher"]["weights"] == "random"
    rows = _rows(tmp_path / "student.train" / "log.csv")
    assert [r["step"] for r in rows] == ["0", "1", "2"] and rows[-1]["r2_xy"]

    store = tmp_path / "s.h5"
    r = cli(["extract", train_dir / "t00.png", "--weights", out, "-o", store, "--size", "64", "-q"])
    assert r.exit_code == 0, r.output
    from posvit_cli.core.features.store import FeatureStore

    with FeatureStore(store) as fs:
        assert fs.provenance["model"] == TINY_MODEL and fs.provenance["modifications"][0]["name"] == "alibi"

    # The output is not overwritten by accident; a finished run is not resumed; another method's run is refused.
    r = cli(_train_args(train_dir, out, "--skip-unreadable"))
    assert r.exit_code == 2 and "exists" in r.output
    r = cli(_train_args(train_dir, out, "--skip-unreadable", "--resume", tmp_path / "student.train",
                        method="nope"))
    assert r.exit_code == 2 and "`debias-train alibi` run, not `debias-train nope`" in r.output
    r = cli(_train_args(train_dir, out, "--skip-unreadable", "--resume", out))
    assert r.exit_code == 2 and "encoder checkpoint, not a training state" in r.output


def test_cli_bad_inputs(train_dir, tmp_path, cli):
    out = tmp_path / "x.safetensors"
    r = cli(_train_args(train_dir, out, "--model", "test_resnet"))
    assert r.exit_code == 2 and ("not a Vision Transformer" in r.output or "cannot build" in r.output)
    r = cli(_train_args(train_dir, out, method="spin", legacy=True))
    assert r.exit_code == 2 and "unknown --method 'spin'" in r.output and not out.exists()
    r = cli(_train_args(train_dir, out, method="spin"))
    assert r.exit_code == 2 and "No such command 'spin'" in r.output
    # A renamed or misspelt option is an error, not silently ignored; so is an option of another method.
    r = cli(_train_args(train_dir, out, "--slopes-mode", "geometric"))
    assert r.exit_code == 2 and "No such option" in r.output and "--slopes-mode" in r.output
    r = cli(_train_args(train_dir, out, "--slopes", "geometric", method="nope"))
    assert r.exit_code == 2 and "No such option" in r.output and "--slopes" in r.output
    r = cli(_train_args(train_dir, out, "--rounds", "3"))
    assert r.exit_code == 2 and "No such option" in r.output and "--rounds" in r.output
    assert not out.exists() and not (tmp_path / "x.train").exists()
    r = cli(_train_args(train_dir, out, "--batch-size", "64"))
    assert r.exit_code == 2 and "larger than the 11 training images" in r.output
    r = cli(_train_args(train_dir, out, "--blank", "64"))
    assert r.exit_code == 2 and "channel 64 does not exist" in r.output
    r = cli(_train_args(train_dir, tmp_path / "x.pt"))
    assert r.exit_code == 2 and ".safetensors" in r.output
    # Width mismatch: a retrofitted 96-channel student for a 64-channel teacher.
    from posvit_cli.core.features.alibi import retrofit
    from posvit_cli.core.features.encoders import save_encoder_checkpoint

    wide = retrofit(load_encoder("test_vit3", "random"), "alibi")
    ck = save_encoder_checkpoint(tmp_path / "wide.safetensors", wide)
    r = cli(_train_args(train_dir, out, "--student-init", ck))
    assert r.exit_code == 2 and "width mismatch" in r.output and "96 channels" in r.output
    # A retrofitted checkpoint is no teacher (its model is read from the checkpoint: no --model needed).
    args = [a for a in _train_args(train_dir, out) if a not in ("--model", TINY_MODEL)]
    args[args.index("random")] = str(ck)
    r = cli(args)
    assert r.exit_code == 2 and "already retrofitted" in r.output


def test_nope_method_and_student_init_continue(train_dir, tmp_path, cli):
    first = tmp_path / "n1.safetensors"
    r = cli(_train_args(train_dir, first, "--blank", "none", method="nope", legacy=True))
    assert r.exit_code == 0, r.output
    assert "warning: `posvit debias-train --method nope` is deprecated" in r.stderr
    assert read_checkpoint_meta(first)["modifications"] == [{"name": "nope", "config": {}}]
    # A second stage (e.g. 518 px in the published recipe) starts from the first result.
    second = tmp_path / "n2.safetensors"
    r = cli(_train_args(train_dir, second, "--blank", "none", "--student-init", first,
                        "--stages", "80:1", "--lr", "1e-5", method="nope"))
    assert r.exit_code == 0, r.output
    enc = load_encoder(None, second)
    assert enc.model.pos_embed is None
    r = cli(_train_args(train_dir, tmp_path / "n3.safetensors", "--student-init", first))
    assert r.exit_code == 2 and "retrofitted with ['nope'], not alibi" in r.output


# --------------------------------------------------------------------------------------------------------------
# Several processes


def test_torchrun_two_gloo_processes_follow_the_single_process_curve(train_dir, tmp_path):
    def run(nproc, out):
        args = _train_args(train_dir, out, "--stages", "64:3", "--eval-every", "0", "--log-every", "1",
                           "--blank", "5,9", "--threads", "1", "-q")
        args = [str(a) for a in args]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        if nproc == 1:
            cmd = [sys.executable, "-m", "posvit_cli", *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "posvit_cli", *args]
        p = subprocess.run(cmd, capture_output=True, env=env, cwd=REPO, timeout=600)
        assert p.returncode == 0, p.stderr.decode()[-3000:]
        rows = _rows(Path(str(out).replace(".safetensors", ".train")) / "log.csv")
        return [float(r["train_loss"]) for r in rows if r["train_loss"]]

    one = run(1, tmp_path / "one.safetensors")
    two = run(2, tmp_path / "two.safetensors")
    assert len(one) == len(two) == 6
    # Same global batches, gradients averaged over processes: the same curve up to summation order.
    assert np.allclose(one, two, rtol=1e-4)
    assert len(set(np.round(one, 6))) > 1
    a, b = _state_tensors(tmp_path / "one.safetensors"), _state_tensors(tmp_path / "two.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4

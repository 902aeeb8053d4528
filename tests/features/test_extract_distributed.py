"""`posvit extract` under torchrun (ranks write parts, rank 0 joins them) and `--shard auto` (Slurm job arrays,
torchrun ranks)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_MODEL
from posvit_cli.commands.extract import rank_part_path
from posvit_cli.core.distributed import auto_shard, dist_env
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.features.store import FeatureStore

OPTS = ["-m", TINY_MODEL, "-w", "random", "--device", "cpu", "--batch-size", "1"]
DIST_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
             "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    """No Slurm array or torchrun variables from the machine running the tests."""
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _records(path):
    with FeatureStore(path) as st:
        return [(r.path, st.features(r.index)) for r in st.records]


def _assert_equal_stores(a, b):
    ra, rb = _records(a), _records(b)
    assert [p for p, _ in ra] == [p for p, _ in rb]  # same images, same order
    for (p, x), (_, y) in zip(ra, rb):
        assert np.array_equal(x, y), p


def _torchrun(args, cwd):
    """Two CPU processes under torchrun (gloo), on a free port."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "posvit_cli", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_torchrun_two_ranks_give_the_one_process_store(tmp_path, image_dir, cli, clean_env):
    assert cli(["extract", image_dir, *OPTS, "-q", "-o", tmp_path / "one.h5"]).exit_code == 0
    res = _torchrun(["extract", image_dir, *OPTS, "-o", tmp_path / "two.h5"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_equal_stores(tmp_path / "two.h5", tmp_path / "one.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "one.h5", "two.h5"]  # no part left
    said = " ".join((res.stdout + res.stderr).split())
    assert said.count("posvit extract →") == 1 and "images written │ 7 │" in said  # rank 0's table only
    with FeatureStore(tmp_path / "two.h5") as st:
        assert st.provenance["merged_shards"] == ["0/2", "1/2"]


@pytest.mark.slow  # a second torchrun launch (~30 s on two cores): `make test-slow`
def test_torchrun_resume_continues_each_ranks_part(tmp_path, image_dir, cli, clean_env):
    """Rank 1 (images grey0, grey2, grey4) was interrupted after grey0: without --resume rank 0 says rank 1
    failed and keeps its own part; with --resume rank 0's part is kept and rank 1 extracts only the rest."""
    part = tmp_path / "two.rank1-of-2.h5"
    assert cli(["extract", image_dir / "grey0.png", *OPTS, "-q", "-o", part]).exit_code == 0
    os.replace(part, str(part) + ".partial")  # as an interrupted rank leaves it
    failed = _torchrun(["extract", image_dir, *OPTS, "-o", tmp_path / "two.h5"], tmp_path)
    said = " ".join((failed.stdout + failed.stderr).split())
    assert failed.returncode != 0 and "error: rank 1 of 2 failed" in said and "--resume" in said
    assert not (tmp_path / "two.h5").exists() and (tmp_path / "two.rank0-of-2.h5").exists()  # rank 0's part kept
    res = _torchrun(["extract", image_dir, *OPTS, "--resume", "-o", tmp_path / "two.h5"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    said = " ".join((res.stdout + res.stderr).split())
    assert "already in store │ 5 │" in said and "images written │ 2 │" in said
    assert cli(["extract", image_dir, *OPTS, "-q", "-o", tmp_path / "one.h5"]).exit_code == 0
    _assert_equal_stores(tmp_path / "two.h5", tmp_path / "one.h5")
    assert not list(tmp_path.glob("two.rank*"))


@pytest.mark.parametrize(("env", "shard"), [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, "2/3"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, "2/3"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "3",
      "SLURM_ARRAY_TASK_STEP": "2"}, "2/3"),  # --array=3-7:2
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "1", "WORLD_SIZE": "2"}, "0/2"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "1/2"),
])
def test_shard_auto_reads_the_slurm_array_then_torchrun(tmp_path, image_dir, cli, clean_env, env, shard):
    assert auto_shard(env) == shard
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert cli(["extract", image_dir, *OPTS, "-q", "--shard", "auto", "-o", tmp_path / "auto.h5"]).exit_code == 0
    for k in env:
        clean_env.delenv(k)
    assert cli(["extract", image_dir, *OPTS, "-q", "--shard", shard, "-o", tmp_path / "given.h5"]).exit_code == 0
    _assert_equal_stores(tmp_path / "auto.h5", tmp_path / "given.h5")
    with FeatureStore(tmp_path / "auto.h5") as st:
        assert st.provenance["shard"] == shard and len(st) == len(range(int(shard[0]), 7, int(shard[2])))


@pytest.mark.parametrize(("env", "message"), [
    ({}, "--shard auto: no Slurm array or torchrun environment; give --shard i/n"),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3"}, "not one of 3 evenly spaced tasks"),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, "first 1, step 1"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, "not one of 3"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_STEP": "3"}, "not one of 3"),  # 9 is off the steps of --array=1-7:3
    ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not a positive number"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_ID='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in 0..1"),
])
def test_shard_auto_refuses_a_missing_or_bad_environment(tmp_path, image_dir, cli, clean_env, env, message):
    with pytest.raises(PosvitError, match=message.replace("?", r"\?")):
        auto_shard(env)
    for k, v in env.items():
        clean_env.setenv(k, v)
    res = cli(["extract", image_dir, *OPTS, "--shard", "auto", "-o", tmp_path / "auto.h5"])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in " ".join(res.output.split())
    assert not list(tmp_path.glob("auto*"))


def test_dist_env_reads_torchrun_variables():
    assert dist_env({}) == dist_env({"WORLD_SIZE": "1", "RANK": "0"})
    assert not dist_env({}).enabled
    info = dist_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (3, 4, 1, True, False)
    with pytest.raises(PosvitError, match="RANK=\\(unset\\)"):
        dist_env({"WORLD_SIZE": "2"})


def test_each_rank_writes_its_part_beside_the_output():
    assert rank_part_path("out/feats.h5", 1, 4) == "out/feats.rank1-of-4.h5"
    assert rank_part_path("feats.zarr.zip", 0, 2) == "feats.rank0-of-2.zarr.zip"
    assert rank_part_path("feats.224.zarr", 3, 8) == "feats.224.rank3-of-8.zarr"

"""Where this process sits among several: the environment ``torchrun`` and Slurm job arrays set, and the one
collective step a multi-process extraction needs (every rank tells the others how it did).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a Slurm job array sets ``SLURM_ARRAY_TASK_ID``,
``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_MIN`` and ``SLURM_ARRAY_TASK_STEP``. Both are read here only, so
every command agrees on them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from posvit_cli.core.errors import PosvitError

__all__ = ["DistInfo", "auto_shard", "dist_env", "gather_from_ranks"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    """An integer environment variable (``default`` when unset), refused with one line when it is not one."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise PosvitError(f"environment variable {name}='{raw}' is not an integer") from None


def dist_env(environ: Mapping[str, str] | None = None) -> DistInfo:
    """This process's rank, world size and local rank from ``torchrun``'s environment (one process without it).

    Parameters
    ----------
    environ : mapping, optional
        The environment to read (default ``os.environ``).

    Raises
    ------
    PosvitError
        If ``WORLD_SIZE`` > 1 and ``RANK`` is missing or not in ``[0, WORLD_SIZE)``.
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    if world is None or world <= 1:
        return DistInfo()
    rank = _env_int(environ, "RANK")
    if rank is None or not 0 <= rank < world:
        raise PosvitError(f"WORLD_SIZE={world} but RANK={environ.get('RANK', '(unset)')}: RANK must be in "
                          f"0..{world - 1} (start the processes with torchrun)")
    local = _env_int(environ, "LOCAL_RANK", 0)
    return DistInfo(rank=rank, world_size=world, local_rank=local or 0)


def auto_shard(environ: Mapping[str, str] | None = None) -> str:
    """The shard ``i/n`` of this process for ``--shard auto``: the Slurm array task, else the ``torchrun`` rank.

    Under a Slurm job array ``i`` is ``SLURM_ARRAY_TASK_ID`` less ``SLURM_ARRAY_TASK_MIN`` (0 when unset),
    divided by ``SLURM_ARRAY_TASK_STEP`` (1 when unset), and ``n`` is ``SLURM_ARRAY_TASK_COUNT``; under
    ``torchrun`` they are ``RANK`` and ``WORLD_SIZE``.

    Raises
    ------
    PosvitError
        If neither environment is set, or its values do not make a shard ``0 <= i < n`` (an array given as an
        irregular list such as ``--array=1,4,9``).
    """
    environ = os.environ if environ is None else environ
    task = _env_int(environ, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        count = _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
        first = _env_int(environ, "SLURM_ARRAY_TASK_MIN", 0) or 0
        step = _env_int(environ, "SLURM_ARRAY_TASK_STEP", 1) or 1
        if count is None or count < 1:
            raise PosvitError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not a "
                              "positive number; give --shard i/n")
        i, off_step = divmod(task - first, step)
        if off_step or not 0 <= i < count:
            raise PosvitError(f"--shard auto: Slurm array task {task} (first {first}, step {step}) is not one of "
                              f"{count} evenly spaced tasks: use an array such as --array=0-{count - 1}, or give "
                              "--shard i/n")
        return f"{i}/{count}"
    if environ.get("RANK", "").strip() and environ.get("WORLD_SIZE", "").strip():
        dist = dist_env(environ)
        return f"{dist.rank}/{dist.world_size}"
    raise PosvitError("--shard auto: no Slurm array or torchrun environment; give --shard i/n")


def gather_from_ranks(value, dist: DistInfo) -> list:
    """Every rank's ``value`` (any picklable object), in rank order; waits until all ranks have given theirs.

    Joins a gloo process group for the exchange (on CPU, whatever device computed) unless one is already
    joined, and leaves it afterwards. In a one-process run it returns ``[value]``.
    """
    if not dist.enabled:
        return [value]
    import torch.distributed as tdist

    joined_here = not tdist.is_initialized()
    if joined_here:
        tdist.init_process_group(backend="gloo", rank=dist.rank, world_size=dist.world_size)
    try:
        values: list = [None] * dist.world_size
        tdist.all_gather_object(values, value)
        return values
    finally:
        if joined_here:
            tdist.destroy_process_group()

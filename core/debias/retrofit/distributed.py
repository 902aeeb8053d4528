"""Multi-process set-up under ``torchrun``: join the process group (NCCL on GPUs, gloo on CPU) and pick each
rank's device.
"""

from __future__ import annotations

import dataclasses
import os


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


def setup_distributed(device):
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1) and pick this rank's device.

    Parameters
    ----------
    device : torch.device
        The requested device; on CUDA each rank takes ``cuda:LOCAL_RANK``.

    Returns
    -------
    dist_info : DistInfo
    device : torch.device
    """
    import torch
    import torch.distributed as tdist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local), device


def shutdown_distributed() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    """Wait for every process (no-op in a one-process run)."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()

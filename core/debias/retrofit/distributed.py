"""Multi-process set-up under ``torchrun``: join the process group (NCCL on GPUs, gloo on CPU) and pick each
rank's device.
"""

from __future__ import annotations

from posvit_cli.core.distributed import DistInfo, dist_env

__all__ = ["DistInfo", "barrier", "setup_distributed", "shutdown_distributed"]


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

    info = dist_env()
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return info, device


def shutdown_distributed() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: DistInfo) -> None:
    """Wait for every process (no-op in a one-process run)."""
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()

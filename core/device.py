"""Choosing the torch device and numeric precision."""

from __future__ import annotations

import contextlib

from posvit_cli.core.errors import PosvitError

__all__ = ["autocast", "resolve_device", "resolve_precision", "torch_threads"]


def resolve_device(spec: str = "auto"):
    """Return a ``torch.device`` for ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises
    ------
    PosvitError
        If CUDA is requested but torch sees no GPU.
    """
    import torch

    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PosvitError(f"device '{spec}' was requested but torch sees no CUDA GPU; use --device cpu")
        dev = torch.device(s)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PosvitError(f"device '{spec}' does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
        return dev
    raise PosvitError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N")


def resolve_precision(spec: str, device) -> str:
    """``auto`` → ``bf16`` on CUDA and ``fp32`` on CPU; ``fp32`` and ``bf16`` pass through."""
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if s not in ("fp32", "bf16"):
        raise PosvitError(f"unknown precision '{spec}': use auto, fp32 or bf16")
    return s


def autocast(device, precision: str):
    """An autocast context for ``bf16`` (CPU or CUDA), or a no-op for ``fp32``."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run a block with ``threads`` torch intra-op threads (None: leave torch's setting), then restore it.

    Small per-image solves (the probes, k-means on a few thousand tokens) gain little from intra-op threads and,
    on shared or oversubscribed cores, their synchronisation can make them ten times slower; callers therefore
    pass 1 for such work and None for large products.
    """
    import torch

    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(old)

"""`posvit doctor`: versions, device, threads, and which encoders have weights available offline."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Annotated

import typer

from posvit_cli._cli import DebugOpt, JsonOpt, QuietOpt, cli_context, console, emit_json

PACKAGES = ("torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "scikit-image", "xgboost", "h5py",
            "zarr", "safetensors", "typer", "rich", "pillow", "tifffile")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def doctor(
    models: Annotated[bool, typer.Option("--models/--no-models", help="List the encoder short names and whether their weights are available offline.")] = True,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check the installation: versions, device, threads, and offline model weights."""
    with cli_context(debug, quiet):
        import torch

        from posvit_cli import __version__
        from posvit_cli.core.features.encoders import ENCODERS, weights_available_offline

        info = {
            "posvit": __version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": {p: _version(p) for p in PACKAGES},
            "device": {
                "cuda_available": torch.cuda.is_available(),
                "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                "default": "cuda" if torch.cuda.is_available() else "cpu",
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            },
            "hf_hub_offline": bool(os.environ.get("HF_HUB_OFFLINE")),
        }
        if models:
            info["models"] = {
                name: {
                    "timm_name": spec.pretrained_name,
                    "description": spec.description,
                    "offline_weights": weights_available_offline(spec),
                }
                for name, spec in ENCODERS.items()
            }
        if json_out:
            emit_json(info)
        if not quiet:
            _print(info)


def _print(info: dict) -> None:
    from rich.table import Table

    t = Table(title="posvit doctor", show_header=False, title_justify="left")
    t.add_row("posvit", info["posvit"])
    t.add_row("python", f"{info['python']} ({info['platform']})")
    for p, v in info["packages"].items():
        t.add_row(p, v)
    d = info["device"]
    gpus = ", ".join(d["cuda_devices"]) or "none"
    t.add_row("device", f"{d['default']} (CUDA GPUs: {gpus})")
    t.add_row("cpu", f"{d['cpu_count']} cores, torch threads {d['torch_threads']}, {d['cpu_capability']}")
    t.add_row("HF_HUB_OFFLINE", "set" if info["hf_hub_offline"] else "not set")
    console.print(t)
    if "models" in info:
        m = Table(title="encoders", title_justify="left")
        m.add_column("name")
        m.add_column("timm model")
        m.add_column("weights offline")
        m.add_column("description")
        for name, row in info["models"].items():
            m.add_row(name, row["timm_name"], "yes" if row["offline_weights"] else "no", row["description"])
        console.print(m)

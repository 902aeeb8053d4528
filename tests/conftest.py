"""Shared fixtures: offline hub, tiny generated images, stores written from arrays, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")

REPO = Path(__file__).resolve().parents[1]
#: The smallest timm ViT (64 channels, 6 blocks, patch 16, ~0.3 M parameters): fast random-weight tests.
TINY_MODEL = "test_vit"


def write_store(path, grids, *, names=None, provenance=None, layers=("final",), maps=None, dtype="float32",
                meta=None):
    """Write a store straight from arrays: ``grids`` is a list of (h, w, C) arrays (one per image); ``meta`` is
    recorded with every image (e.g. ``{"tiles": ...}`` as ``extract --tile`` writes it)."""
    from posvit_cli.core.features.writer import StoreWriter

    grids = [np.asarray(g) for g in grids]
    prov = {"model": "synthetic", "patch_size": 16, "channels": int(grids[0].shape[-1]) if grids else 0}
    prov.update(provenance or {})
    names = names or [f"img{i:03d}.png" for i in range(len(grids))]
    with StoreWriter(path, provenance=prov, layers=list(layers), dtype=dtype, overwrite=True) as w:
        for i, (n, g) in enumerate(zip(names, grids)):
            h, wd = g.shape[:2]
            p = prov["patch_size"]
            w.add(
                n,
                {layer: g for layer in layers},
                orig_size=(h * p, wd * p),
                proc_size=(h * p, wd * p),
                maps=None if maps is None else {k: v[i] for k, v in maps.items()},
                meta=meta,
            )
        w.commit()
    return Path(path)


#: Token positions of the planted high-norm outliers of :func:`noise_grid` in the token-norm tests.
NORM_PLANTED = [(2, 3), (8, 8), (12, 5)]


def noise_grid(seed=0, h=16, w=16, C=16, planted=(), factor=20.0):
    """Gaussian noise of norm about 1 per token; ``planted`` tokens scaled to norm ``factor`` exactly."""
    g = np.random.default_rng(seed).standard_normal((h, w, C)) / np.sqrt(C)
    for r, c in planted:
        g[r, c] *= factor / np.linalg.norm(g[r, c])
    return g.astype(np.float32)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tiny models on a shared 2-core machine, where OpenMP spin-waits of
    more threads cost up to 10×."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def image_dir(tmp_path):
    """Six 8-bit greyscale PNGs (96×128) and one RGB PNG (64×64) of smooth random texture."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        a = gaussian_filter(rng.random((96, 128)), 2)
        a = (a - a.min()) / (a.max() - a.min())
        Image.fromarray((a * 255).astype(np.uint8)).save(d / f"grey{i}.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(d / "colour.png")
    return d


@pytest.fixture
def cli():
    """Invoke the posvit app in-process: ``cli(["extract", ...], input=bytes)`` → click Result."""
    from typer.testing import CliRunner

    from posvit_cli.app import app

    runner = CliRunner()

    def invoke(args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


def run_posvit(args, *, input=None, check=False, cwd=None, timeout=600):
    """Run ``posvit`` in a subprocess (real pipes, real exit codes)."""
    cmd = [sys.executable, "-m", "posvit_cli", *[str(a) for a in args]]
    return subprocess.run(cmd, input=input, capture_output=True, check=check, cwd=cwd, timeout=timeout)

"""Encoder checkpoints: the file they are written to."""

from __future__ import annotations

import os
import stat
import subprocess
import sys


def test_alibi_checkpoint_follows_the_umask(tmp_path):
    """A retrofit (ALiBi) checkpoint gets the mode every other output gets (0644 under umask 022), not mkstemp's
    0600. Run in a fresh process so the umask is 022 from the start, as in a shell."""
    path = tmp_path / "alibi.safetensors"
    code = (
        "from posvit_cli.core.features.alibi import AlibiConfig\n"
        "from posvit_cli.core.features.encoders import load_encoder, save_encoder_checkpoint\n"
        "enc = load_encoder('test_vit', 'random', modifications=[{'name': 'alibi', "
        "'config': AlibiConfig().to_dict()}])\n"
        f"save_encoder_checkpoint({str(path)!r}, enc)\n"
    )
    old = os.umask(0o022)
    try:
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       timeout=300)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind

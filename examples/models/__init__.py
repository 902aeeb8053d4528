"""Weights shipped with posvit: ``posvit-tiny.safetensors`` (see ``posvit-tiny.md``), found by the encoder registry."""

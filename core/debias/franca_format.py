"""Franca's RASA head layout: reading its state dicts (prefixes, whole models, Lightning checkpoints).

``pre_pos_layers.{i}.weight`` ``[2, D]`` for the first ``T − 1`` rounds and ``pos_pred.weight`` ``[2, D]`` for the
last, optionally under ``rasa_head.``/``module.``/``model.`` prefixes or inside a whole model;
:func:`~posvit_cli.core.debias.heads.load_head` reads heads through :func:`planes_from_franca`.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from posvit_cli.core.errors import PosvitError, PosvitWarning

__all__ = ["FRANCA_KEY", "planes_from_franca", "strip_prefixes", "unwrap_state"]

# Prefixes under which Franca's code and checkpoints keep the head's weights.
FRANCA_PREFIXES = ("module.", "rasa_head.", "model.")
# Modules that hold the head inside a whole model: Franca's hub backbone, and its Lightning training module.
HEAD_MODULES = ("rasa_head", "head")
FRANCA_KEY = re.compile(r"^(?:pre_pos_layers\.(\d+)|pos_pred)\.weight$")


def strip_prefixes(state: dict, source: str) -> dict:
    """Keys of a Franca head without ``module.``/``model.`` prefixes; a whole model keeps only its head.

    Whole models: Franca's hub backbone (``rasa_head.*`` next to the ViT) and the Lightning module it trains the
    head in (``backbone.*`` next to ``head.*``). The other tensors are ignored, with one warning.
    """
    for _ in range(3):
        for p in FRANCA_PREFIXES:
            if state and all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
    for module in HEAD_MODULES:
        inner = {k[len(module) + 1:]: v for k, v in state.items() if k.startswith(module + ".")}
        if any(FRANCA_KEY.match(k) for k in inner):
            if len(inner) < len(state):
                warnings.warn(f"'{source}' is a whole model: using its RASA head ({module}.*), ignoring "
                              f"{len(state) - len(inner)} other tensors (the backbone)", PosvitWarning, stacklevel=3)
            return inner
    return state


def planes_from_franca(state: dict, source: str):
    import torch

    state = strip_prefixes(state, source)
    pre: dict[int, Any] = {}
    last = None
    bad = []
    for k, v in state.items():
        m = FRANCA_KEY.match(k)
        if not m:
            bad.append(k)
        elif m.group(1) is None:
            last = v
        else:
            pre[int(m.group(1))] = v
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3})" if len(bad) > 3 else "")
        raise PosvitError(
            f"'{source}' is not a RASA head: unexpected keys {shown} (expected pre_pos_layers.{{i}}.weight and "
            "pos_pred.weight)"
        )
    if last is None:
        raise PosvitError(f"'{source}' has no pos_pred.weight: not a RASA head")
    if sorted(pre) != list(range(len(pre))):
        raise PosvitError(f"'{source}': pre_pos_layers are numbered {sorted(pre)}, expected 0..{len(pre) - 1}")
    planes = [pre[i] for i in range(len(pre))] + [last]
    shapes = {tuple(p.shape) for p in planes}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != 2:
        raise PosvitError(f"'{source}': RASA planes must all be [2, D], got shapes {sorted(shapes)}")
    return torch.stack([torch.as_tensor(p).float() for p in planes])


def unwrap_state(obj: Any, source: str) -> dict:
    import torch

    for _ in range(3):
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            obj = next(iter(obj.values()))
        elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise PosvitError(f"'{source}' does not hold a state dict of tensors: not a head file")
    return obj

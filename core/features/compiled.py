"""Compiled feature extraction: ``torch.compile`` of the encoder's forward, checked against eager.

:class:`CompiledForward` is a drop-in for :meth:`Encoder.forward_tokens`. It compiles the forward with static
shapes (``dynamic=False``), so each input shape (grid size × batch) gets its own specialised graph, compiled
once on first use. The first batch of every shape also runs eagerly and the two outputs are compared token by
token: if any token's cosine to eager fp32 falls below :data:`COSINE_TOLERANCE`, or compilation fails (no C
compiler, an unsupported operation), that shape — and, after a compile failure, every later one — runs eagerly,
with one :class:`PosvitWarning`. Features therefore never differ from eager beyond the tolerance silently.

Measured on a shared 2-core CPU (ViT-S/14 at 224 px, batch 8; ``benchmarks/extract_speed.py``): the compiled
forward is about 1.1× the eager one, and compiling takes about two minutes per shape, so eager stays the default.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from posvit_cli.core.errors import PosvitWarning

__all__ = ["COSINE_TOLERANCE", "CompiledForward", "compiled_forward", "min_token_cosine"]

#: The least per-token cosine between compiled and eager fp32 features that compiled extraction accepts.
COSINE_TOLERANCE = 0.99999


def min_token_cosine(a: dict, b: dict) -> float:
    """Least cosine between matching tokens of two ``{layer: tensor (..., C)}`` dicts (1.0 for empty dicts).

    Tokens that are zero in both count as equal (cosine 1).
    """
    import torch

    least = 1.0
    for layer, x in a.items():
        x, y = x.float().reshape(-1, x.shape[-1]), b[layer].float().reshape(-1, x.shape[-1])
        num = (x * y).sum(1)
        den = x.norm(dim=1) * y.norm(dim=1)
        cos = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(num))
        if cos.numel():
            least = min(least, float(cos.min()))
    return least


class CompiledForward:
    """``encoder.forward_tokens`` through ``torch.compile(dynamic=False)``, one checked graph per input shape.

    Parameters
    ----------
    encoder : Encoder
        The encoder whose ``forward_tokens`` is compiled.
    tolerance : float
        Least per-token cosine to the eager output accepted on each shape's first batch.

    Attributes
    ----------
    shapes : dict of tuple to str
        Per input shape ``(B, C, H, W)`` seen: ``"compiled"`` or ``"eager"`` (fell back).
    fallback : str or None
        Why compilation was given up (every shape then runs eagerly), or None.
    """

    def __init__(self, encoder, tolerance: float = COSINE_TOLERANCE):
        self.encoder = encoder
        self.tolerance = tolerance
        self.shapes: dict[tuple, str] = {}
        self.fallback: str | None = None
        self._compiled = None

    @property
    def used(self) -> bool:
        """Whether every batch so far went through the compiled forward (False before the first batch)."""
        return bool(self.shapes) and self.fallback is None and all(v == "compiled" for v in self.shapes.values())

    def provenance(self) -> dict:
        """What to record in a store: whether only compiled features were written, the token grids ``[h, w]`` that
        ran compiled, and why compilation was given up (or None)."""
        grids = sorted({self.encoder.grid(*key[0][-2:]) for key, how in self.shapes.items() if how == "compiled"})
        return {"used": self.used, "grids_compiled": [list(g) for g in grids], "fallback": self.fallback}

    def _give_up(self, reason: str) -> None:
        if self.fallback is None:
            self.fallback = reason
            warnings.warn(f"torch.compile unavailable, extracting eagerly (same features, eager speed): {reason}",
                          PosvitWarning, stacklevel=3)

    def __call__(self, x, layers: Sequence[str], keep_prefix: bool = False):
        """Same as :meth:`Encoder.forward_tokens`: ``({layer: (B, h, w, C)}, {layer: (B, P, C)} or None)``."""
        eager = self.encoder.forward_tokens
        key = (tuple(x.shape), tuple(layers), keep_prefix, str(x.dtype))
        how = self.shapes.get(key)
        if self.fallback is not None or how == "eager":
            self.shapes.setdefault(key, "eager")
            return eager(x, layers, keep_prefix)
        if how == "compiled":
            return self._compiled(x, layers, keep_prefix)
        return self._first_batch(key, x, layers, keep_prefix)

    def _first_batch(self, key, x, layers, keep_prefix):
        import torch

        eager = self.encoder.forward_tokens
        reference = eager(x, layers, keep_prefix)
        try:
            if self._compiled is None:
                self._compiled = torch.compile(eager, dynamic=False)
            out = self._compiled(x, layers, keep_prefix)
        except Exception as exc:  # no C compiler, an operation inductor cannot lower, ...
            self.shapes[key] = "eager"
            self._give_up(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            return reference
        tokens, prefix = out
        cos = min(min_token_cosine(reference[0], tokens), min_token_cosine(reference[1] or {}, prefix or {}))
        if cos < self.tolerance:
            self.shapes[key] = "eager"
            warnings.warn(f"compiled features of shape {tuple(x.shape)} differ from eager (least token cosine "
                          f"{cos:.7f} < {self.tolerance}): extracting that shape eagerly", PosvitWarning, stacklevel=3)
            return reference
        self.shapes[key] = "compiled"
        return out


def compiled_forward(encoder) -> CompiledForward:
    """The encoder's :class:`CompiledForward`, made once per encoder so later extractions reuse its graphs."""
    cached = getattr(encoder, "compiled_forward_cache", None)
    if cached is None:
        cached = CompiledForward(encoder)
        encoder.compiled_forward_cache = cached
    return cached

"""Grid transforms of images by whole patches, with their exact inverses on token grids.

A transform acts on a batch of images ``(B, C, H, W)`` (sides multiples of the patch size) and, equivalently, on
the token grids ``(B, h, w, C)`` an encoder returns for them. Four kinds exist:

``flip-ud``, ``flip-lr``
    Mirror the rows or the columns.
``rot90`` (``rot90:K``, ``rot180``, ``rot270``)
    Rotate by K quarter turns counter-clockwise (torch's :func:`torch.rot90` convention, from the row axis
    towards the column axis). An odd K on a non-square image gives the transposed grid ``(w, h)``.
``roll:DY,DX``
    Shift by DY rows and DX columns of *whole patches* with wrap-around (a torus roll).

Compositions are written with ``+`` and apply left to right (``flip-lr+roll:2,0``). ``identity`` does nothing.

For a model that is equivariant to a transform ``T`` (for example a ViT without absolute position information and
torus rolls), ``T.invert_tokens(model(T.apply(x))) == model(x)``. Test-time averaging must invert every
transform in token space *before* averaging, otherwise it averages spatially misaligned features (the
transform-average baseline of the references forgets this and fails on rot90 of non-square images).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from posvit_cli.core.errors import PosvitError

__all__ = [
    "GridTransform",
    "TRANSFORM_SETS",
    "average_over_transforms",
    "parse_transform",
    "parse_transform_set",
    "split_transform_list",
]


@dataclasses.dataclass(frozen=True)
class _Step:
    """One elementary transform: ``kind`` in flip-ud, flip-lr, rot90, roll; ``a``/``b`` its parameters."""

    kind: str
    a: int = 0
    b: int = 0

    @property
    def spec(self) -> str:
        if self.kind == "rot90":
            return "rot90" if self.a == 1 else f"rot90:{self.a}"
        if self.kind == "roll":
            return f"roll:{self.a},{self.b}"
        return self.kind


@dataclasses.dataclass(frozen=True)
class GridTransform:
    """A composition of whole-patch grid transforms (see the module docstring).

    Attributes
    ----------
    steps : tuple
        Elementary transforms, applied in order.
    patch : int
        Patch size in pixels (rolls move images by ``patch`` pixels per token).
    """

    steps: tuple[_Step, ...]
    patch: int = 1

    @property
    def spec(self) -> str:
        """The canonical text form (``identity`` for no steps), accepted by :func:`parse_transform`."""
        return "+".join(s.spec for s in self.steps) or "identity"

    def __str__(self) -> str:
        return self.spec

    # -- images (B, C, H, W) ------------------------------------------------------------------------------------
    def apply(self, x):
        """Transform a batch of images.

        Parameters
        ----------
        x : torch.Tensor, shape (B, C, H, W)
            H and W multiples of :attr:`patch` (a roll moves whole patches).

        Returns
        -------
        torch.Tensor, shape (B, C, H, W), or (B, C, W, H) after an odd number of quarter turns
        """
        import torch

        if x.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
        for s in self.steps:
            if s.kind == "flip-ud":
                x = torch.flip(x, dims=(-2,))
            elif s.kind == "flip-lr":
                x = torch.flip(x, dims=(-1,))
            elif s.kind == "rot90":
                x = torch.rot90(x, s.a, dims=(-2, -1))
            else:
                H, W = x.shape[-2:]
                if H % self.patch or W % self.patch:
                    raise PosvitError(f"cannot roll a {H}×{W} px image by whole {self.patch}-px patches")
                x = torch.roll(x, shifts=(s.a * self.patch, s.b * self.patch), dims=(-2, -1))
        return x

    # -- token grids (B, h, w, C) -------------------------------------------------------------------------------
    def apply_tokens(self, t):
        """Transform token grids the way :meth:`apply` moves the patches they come from.

        Parameters
        ----------
        t : torch.Tensor, shape (B, h, w, C)
        """
        import torch

        for s in self.steps:
            t = self._step_tokens(torch, t, s, inverse=False)
        return t

    def invert_tokens(self, t):
        """Map token grids of transformed images back to the original frame (the exact inverse of
        :meth:`apply_tokens`).

        Parameters
        ----------
        t : torch.Tensor, shape (B, h', w', C)
            Tokens of ``apply(x)``.

        Returns
        -------
        torch.Tensor, shape (B, h, w, C)
            The grid of the untransformed image.
        """
        import torch

        if t.ndim != 4:
            raise ValueError(f"token grids must be (B, h, w, C), got shape {tuple(t.shape)}")
        for s in reversed(self.steps):
            t = self._step_tokens(torch, t, s, inverse=True)
        return t

    @staticmethod
    def _step_tokens(torch, t, s: _Step, inverse: bool):
        if s.kind == "flip-ud":
            return torch.flip(t, dims=(1,))
        if s.kind == "flip-lr":
            return torch.flip(t, dims=(2,))
        if s.kind == "rot90":
            return torch.rot90(t, -s.a if inverse else s.a, dims=(1, 2))
        sign = -1 if inverse else 1
        return torch.roll(t, shifts=(sign * s.a, sign * s.b), dims=(1, 2))

    def grid_after(self, h: int, w: int) -> tuple[int, int]:
        """The token grid ``(h', w')`` of a transformed ``h × w`` grid."""
        quarter_turns = sum(s.a for s in self.steps if s.kind == "rot90")
        return (w, h) if quarter_turns % 2 else (h, w)


_NAMES = ("identity", "flip-ud", "flip-lr", "rot90", "rot180", "rot270", "roll")


def _parse_step(text: str, spec: str) -> list[_Step]:
    s = text.strip().lower()
    if s in ("identity", "id", "none", ""):
        return []
    if s in ("flip-ud", "flipud", "vflip"):
        return [_Step("flip-ud")]
    if s in ("flip-lr", "fliplr", "hflip"):
        return [_Step("flip-lr")]
    if s in ("rot180", "rot270") or s.startswith("rot90"):
        if s == "rot180":
            k = 2
        elif s == "rot270":
            k = 3
        else:
            _, sep, num = s.partition(":")
            try:
                k = int(num) if sep else 1
            except ValueError:
                raise PosvitError(f"transform '{spec}': rot90:K needs a whole number of quarter turns K") from None
        k %= 4
        return [_Step("rot90", k)] if k else []
    if s.startswith("roll"):
        _, sep, nums = s.partition(":")
        try:
            dy, dx = (int(v) for v in nums.split(","))
        except ValueError:
            raise PosvitError(f"transform '{spec}': write roll:DY,DX (whole patches, e.g. roll:2,-3)") from None
        if not sep:
            raise PosvitError(f"transform '{spec}': write roll:DY,DX (whole patches, e.g. roll:2,-3)")
        return [_Step("roll", dy, dx)] if (dy or dx) else []
    raise PosvitError(f"unknown transform '{text}' in '{spec}': use {', '.join(_NAMES)}:DY,DX or compositions with +")


def parse_transform(spec: str, patch: int = 1) -> GridTransform:
    """Parse a transform such as ``flip-lr``, ``rot90``, ``rot90:3``, ``roll:2,-1`` or ``flip-ud+roll:0,4``.

    Parameters
    ----------
    spec : str
        See the module docstring. Roll shifts are in whole patches.
    patch : int
        Patch size in pixels (for :meth:`GridTransform.apply` of rolls).

    Raises
    ------
    PosvitError
        For an unknown transform or malformed parameters.
    """
    if patch < 1:
        raise PosvitError(f"patch size must be at least 1, got {patch}")
    steps: list[_Step] = []
    for part in str(spec).split("+"):
        steps.extend(_parse_step(part, spec))
    return GridTransform(tuple(steps), int(patch))


#: Named transform sets for test-time averaging (each includes the identity).
TRANSFORM_SETS: dict[str, tuple[str, ...]] = {
    "flips": ("identity", "flip-lr", "flip-ud"),
    "rot90": ("identity", "rot90", "rot180", "rot270"),
    "d4": ("identity", "rot90", "rot180", "rot270", "flip-lr", "flip-ud", "flip-lr+rot90", "flip-ud+rot90"),
    "reference": ("identity", "flip-lr", "flip-ud", "rot90"),
}


def split_transform_list(spec: str) -> list[str]:
    """The items of a comma-separated transform list, ``roll:DY,DX`` kept whole; empty items dropped.

    Examples
    --------
    >>> split_transform_list("flip-ud, roll:1,2,rot90")
    ['flip-ud', 'roll:1,2', 'rot90']
    """
    parts = [p.strip() for p in str(spec).split(",")]
    items, i = [], 0
    while i < len(parts):
        p = parts[i]
        # roll:DY,DX contains a comma: glue the next part back on.
        if p.lower().split("+")[-1].startswith("roll:") and "," not in p and i + 1 < len(parts):
            p = f"{p},{parts[i + 1]}"
            i += 1
        i += 1
        if p:
            items.append(p)
    return items


def parse_transform_set(spec: str, patch: int = 1) -> list[GridTransform]:
    """Parse a comma-separated list of transforms and named sets into distinct transforms.

    Items are transforms (:func:`parse_transform`; roll parameters use ``;`` or the form ``roll:DY,DX`` kept
    whole), the named sets of :data:`TRANSFORM_SETS` and ``rolls:N`` (the N×N shifts ``(i, j)``, ``0 <= i, j <
    N`` patches). Duplicates are dropped, order kept.

    Examples
    --------
    >>> [t.spec for t in parse_transform_set("flips,roll:1,2")]
    ['identity', 'flip-lr', 'flip-ud', 'roll:1,2']

    Raises
    ------
    PosvitError
        For unknown items, ``rolls:N`` with N < 1, or an empty set.
    """
    items: list[str] = []
    for p in split_transform_list(spec):
        low = p.lower()
        if low in TRANSFORM_SETS:
            items.extend(TRANSFORM_SETS[low])
        elif low.startswith("rolls:"):
            try:
                n = int(low.split(":", 1)[1])
            except ValueError:
                raise PosvitError(f"transform set '{spec}': rolls:N needs a whole number N") from None
            if n < 1:
                raise PosvitError(f"transform set '{spec}': rolls:N needs N >= 1")
            items.extend(f"roll:{a},{b}" for a in range(n) for b in range(n))
        else:
            items.append(p)
    out: dict[str, GridTransform] = {}
    for it in items:
        t = parse_transform(it, patch)
        out.setdefault(t.spec, t)
    if not out:
        raise PosvitError(f"transform set '{spec}' is empty")
    return list(out.values())


def average_over_transforms(
    forward: Callable, x, transforms: Sequence[GridTransform]
) -> tuple[dict, dict | None]:
    """Average an encoder's token grids over transformed copies of the input, each mapped back first.

    Parameters
    ----------
    forward : callable ``x -> (tokens, prefix)``
        ``tokens`` a dict of ``(B, h, w, C)`` tensors, ``prefix`` a dict of ``(B, P, C)`` tensors or None (the
        :meth:`Encoder.forward_tokens` contract).
    x : torch.Tensor, shape (B, C, H, W)
    transforms : sequence of GridTransform

    Returns
    -------
    tokens : dict of str to torch.Tensor (B, h, w, C)
        Mean over transforms of ``T.invert_tokens(forward(T.apply(x)))`` (float32).
    prefix : dict or None
        Mean of the prefix tokens (CLS and registers are global: nothing to invert).
    """
    sums: dict = {}
    psums: dict | None = None
    for t in transforms:
        tokens, prefix = forward(t.apply(x))
        for name, v in tokens.items():
            v = t.invert_tokens(v.float())
            sums[name] = v if name not in sums else sums[name] + v
        if prefix:
            psums = psums or {}
            for name, v in prefix.items():
                psums[name] = v.float() if name not in psums else psums[name] + v.float()
    n = float(len(transforms))
    return {k: v / n for k, v in sums.items()}, ({k: v / n for k, v in psums.items()} if psums else None)

"""Debiasing heads: small maps applied to final patch tokens (RASA planes, SVD subspaces, channel blanking) or
to the encoder's forward pass (test-time transform averaging), with one file format and one interface.

Every head has :meth:`Head.apply` (tokens ``(..., C)`` → tokens), :meth:`Head.token_postprocess` (the hook
``posvit extract --head`` calls on each extracted layer) and :meth:`Head.provenance` (what a store records in its
``debias`` list). Test-time averaging needs the encoder itself: its head has ``needs_encoder`` set and wraps the
encoder instead (:meth:`TTAHead.wrap_encoder`).

File format (``.safetensors``):

posvit layout
    Tensors: ``planes`` float32 ``[T, r, D]`` for projection heads (RASA: the trained ``W_t`` of every round in
    training order, ``r = 2``, row 0 predicts the row (y), row 1 the column (x); SVD: ``T = 1``, ``r = k``
    singular vectors), ``channels_zeroed`` int64 ``[k]`` for blanking (with ``fill_values`` float32 ``[k]`` when
    they are set to their dataset means, not 0), ``position_mean`` float32 ``[H, W, D]`` for ``posmean`` (the
    mean token field less its mean over positions), nothing for test-time averaging.
    Metadata: ``format = "posvit-head"``, ``format_version``, ``method``, ``channels`` (D, or ``"any"``) and
    ``posvit``: a JSON document with the rest (exact flag, backbone, input size, training settings and logs).
Franca layout (read and written)
    ``pre_pos_layers.{i}.weight`` ``[2, D]`` for the first ``T − 1`` rounds and ``pos_pred.weight`` ``[2, D]``
    for the last, optionally under a ``rasa_head.`` and/or ``module.`` prefix, or inside a whole model (Franca's
    hub backbone; a Lightning checkpoint of its training module, ``head.*`` next to ``backbone.*``, possibly under
    ``"state_dict"``); a ``.pth``/``.pt``/``.ckpt`` state dict (loaded with ``weights_only=True``) or
    ``.safetensors``. Franca's released heads have 9 or 10 planes.

A RASA plane removes ``span(GS(W_t))``, the orthonormalised rows of ``W_t``: ``z ← z − (z·u_r)u_r − (z·u_c)u_c``,
sequentially in training order (the references' behaviour), or, for an ``exact`` head, once through the orthogonal
projector onto the complement of all planes (``I − QQᵀ``, ``Q`` from a QR of every plane vector).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posvit_cli.core.debias.franca_format import planes_from_franca, unwrap_state
from posvit_cli.core.errors import PosvitError, PosvitWarning
from posvit_cli.core.fileio import atomic_path, json_text, sha256_file
from posvit_cli.core.features.provenance import INPUT_KEYS, STORAGE_KEYS, identity_differences
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "HEAD_FORMAT",
    "HEAD_METHODS",
    "BlankHead",
    "Head",
    "PosMeanHead",
    "ProjectionHead",
    "TTAHead",
    "apply_head_to_store",
    "gram_schmidt",
    "load_head",
    "save_head",
]

HEAD_FORMAT = "posvit-head"
HEAD_FORMAT_VERSION = 1
HEAD_METHODS = ("rasa", "svd", "blank", "posmean", "tta")
# A plane vector shorter than this (relative) after orthogonalisation carries no new direction.
_DEGENERATE = 1e-8


def _torch():
    import torch

    return torch


def gram_schmidt(rows) -> Any:
    """Orthonormalise rows in order (each normalised, then made orthogonal to the earlier ones, then normalised).

    For two rows this is RASA's plane construction: ``u_r = w_0/‖w_0‖``, ``v = w_1/‖w_1‖``,
    ``u_c = (v − (v·u_r)u_r) / ‖…‖``. Rows that add no new direction (zero, or in the span of earlier rows) are
    dropped.

    Parameters
    ----------
    rows : torch.Tensor, shape (r, D)

    Returns
    -------
    torch.Tensor of float64, shape (r', D), r' <= r
        Orthonormal rows.
    """
    torch = _torch()
    out: list = []
    for w in torch.as_tensor(rows, dtype=torch.float64):
        n = torch.linalg.vector_norm(w)
        if not torch.isfinite(n) or n <= 0:
            continue
        v = w / n
        for _ in range(2):  # twice: re-orthogonalisation keeps rows orthogonal to float64 precision
            for u in out:
                v = v - (v @ u) * u
        nv = torch.linalg.vector_norm(v)
        if nv < _DEGENERATE:
            continue
        out.append(v / nv)
    if not out:
        return torch.zeros((0, int(torch.as_tensor(rows).shape[-1])), dtype=torch.float64)
    return torch.stack(out)


class Head:
    """Base class of debiasing heads.

    Attributes
    ----------
    method : str
        One of :data:`HEAD_METHODS`.
    channels : int or None
        Feature width ``D`` the head fits; None for heads of any width.
    info : dict
        JSON-ready description: backbone, input size, training settings and logs.
    source : str or None
        The file the head was read from.
    """

    needs_encoder = False
    method = "?"

    def __init__(self, channels: int | None, info: dict | None = None):
        self.channels = None if channels is None else int(channels)
        self.info = dict(info or {})
        self.source: str | None = None
        self.sha256: str | None = None

    # -- applying ------------------------------------------------------------------------------------------------
    def apply(self, tokens):
        """Debias tokens.

        Parameters
        ----------
        tokens : torch.Tensor, shape (..., D)

        Returns
        -------
        torch.Tensor, same shape and dtype
        """
        raise NotImplementedError

    def apply_rows(self, tokens, grid: tuple[int, int], start: int):
        """:meth:`apply` to rows ``start:start + len`` ``(rows, w, D)`` of an image whose token grid is ``grid``.

        Heads that act on each token alone ignore where the rows are; ``posmean`` needs it.
        """
        return self.apply(tokens)

    def apply_numpy(self, tokens: np.ndarray) -> np.ndarray:
        """:meth:`apply` for a NumPy array ``(..., D)``; returns float32."""
        torch = _torch()
        return self.apply(torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.float32))).numpy()

    def to(self, device) -> Head:
        """Move the head's tensors to a device (returns self)."""
        return self

    def token_postprocess(self, device) -> Callable:
        """The hook of :class:`~posvit_cli.core.features.extract.ExtractOptions`: ``fn(layer, tokens (B, h, w, C))``.

        Only the ``final`` layer is changed (heads are trained on final normed tokens).
        """
        self.to(device)

        def postprocess(layer: str, tokens):
            return self.apply(tokens) if layer == "final" else tokens

        return postprocess

    def check_channels(self, channels: int, what: str = "these features") -> None:
        """Raise when the head was made for features of another width."""
        if self.channels is not None and int(channels) != self.channels:
            backbone = self.info.get("backbone") or {}
            made = f" of {backbone['model']}" if backbone.get("model") else ""
            raise PosvitError(
                f"head '{self.source or self.method}' was made for {self.channels}-channel features{made}; "
                f"{what} have {int(channels)} channels: use a head trained on the same model"
            )

    def check_backbone(self, provenance: dict | None, what: str = "these features") -> None:
        """Warn when the head was trained on another model (or other weights) than ``provenance`` names."""
        mine = {k: v for k, v in (self.info.get("backbone") or {}).items() if v is not None}
        theirs = {k: v for k, v in (provenance or {}).items() if v is not None}
        if not mine.get("model") or not theirs.get("model"):
            return
        # Channels are checked (as an error) by check_channels; debiasing and input may legitimately differ.
        diff = identity_differences(mine, theirs, ignore=("channels", "debias") + INPUT_KEYS + STORAGE_KEYS,
                                    missing_ok=True)
        if "model" in diff:
            warnings.warn(
                f"head '{self.source or self.method}' was trained on {mine['model']} features; {what} come from "
                f"{theirs['model']}",
                PosvitWarning, stacklevel=2,
            )
        elif "weights_sha256" in diff:
            warnings.warn(
                f"head '{self.source or self.method}' was trained on {mine['model']} with other weights "
                f"(sha256 {mine['weights_sha256'][:12]}…) than {what} ({theirs['weights_sha256'][:12]}…)",
                PosvitWarning, stacklevel=2,
            )
        elif diff:
            warnings.warn(
                f"head '{self.source or self.method}' was trained on {mine['model']} features with other "
                f"{', '.join(diff)} than {what}",
                PosvitWarning, stacklevel=2,
            )

    # -- description ---------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """Method-specific facts for provenance and reports."""
        return {}

    def provenance(self) -> dict:
        """The entry a store records in its provenance ``debias`` list when this head is applied."""
        backbone = self.info.get("backbone") or {}
        return {
            "method": self.method,
            "head": self.source,
            "head_sha256": self.sha256,
            "channels": self.channels,
            **self.summary(),
            "trained_on": {k: backbone.get(k) for k in ("model", "weights_sha256") if backbone.get(k)},
        }

    # -- serialisation -------------------------------------------------------------------------------------------
    def _tensors(self) -> dict:
        return {}

    def _meta(self) -> dict:
        return {}


class ProjectionHead(Head):
    """Removes linear subspaces from the tokens: RASA planes (``method="rasa"``) or an SVD subspace (``"svd"``).

    Parameters
    ----------
    planes : array-like, shape (T, r, D)
        Plane ``t`` spans the rows of ``planes[t]`` (orthonormalised with :func:`gram_schmidt`); for RASA these
        are the trained ``W_t`` (row 0 → y, row 1 → x).
    method : {"rasa", "svd"}
    exact : bool
        Remove the span of all planes at once with an orthogonal projector instead of plane after plane in
        training order.
    info : dict, optional
    """

    def __init__(self, planes, method: str = "rasa", exact: bool = False, info: dict | None = None):
        torch = _torch()
        p = torch.as_tensor(np.asarray(planes, dtype=np.float32) if not torch.is_tensor(planes) else planes)
        p = p.detach().to("cpu", torch.float32)
        if p.ndim != 3 or p.shape[0] < 1 or p.shape[1] < 1 or p.shape[2] < 1:
            raise PosvitError(f"a projection head needs planes of shape [T, r, D], got {tuple(p.shape)}")
        if not torch.isfinite(p).all():
            raise PosvitError("the head's planes contain NaN or inf")
        super().__init__(int(p.shape[2]), info)
        self.method = method
        self.planes = p
        self.exact = bool(exact)
        self._bases64 = [gram_schmidt(w) for w in p]
        self._device = torch.device("cpu")
        self._cast()

    def _cast(self) -> None:
        torch = _torch()
        self._bases = [b.to(self._device, torch.float32) for b in self._bases64]
        self._q = self.basis().to(self._device, torch.float32)

    def to(self, device) -> ProjectionHead:
        torch = _torch()
        device = torch.device(device)
        if device != self._device:
            self._device = device
            self._cast()
        return self

    @property
    def rounds(self) -> int:
        """Number of planes ``T``."""
        return int(self.planes.shape[0])

    def bases(self) -> list:
        """Orthonormal rows ``(r_t, D)`` (float64) of every plane, in training order."""
        return list(self._bases64)

    def basis(self):
        """An orthonormal basis ``Q`` (float64, ``(D, K)``) of the span of all planes (QR, rank-revealing)."""
        torch = _torch()
        stacked = torch.cat(self._bases64, dim=0)
        if stacked.shape[0] == 0:
            return torch.zeros((self.channels, 0), dtype=torch.float64)
        q, r = torch.linalg.qr(stacked.T)
        keep = r.diagonal().abs() > _DEGENERATE
        return q[:, keep]

    def matrix(self):
        """The head as one ``(D, D)`` float64 matrix ``L`` acting on row vectors: ``clean = z @ L``.

        Sequential heads: ``L = (I − P_1)(I − P_2)…(I − P_T)``; exact heads: ``L = I − QQᵀ`` (symmetric and
        idempotent).
        """
        torch = _torch()
        eye = torch.eye(self.channels, dtype=torch.float64)
        if self.exact:
            q = self.basis()
            return eye - q @ q.T
        L = eye
        for u in self._bases64:
            L = L - (L @ u.T) @ u
        return L

    def apply(self, tokens):
        torch = _torch()
        dtype = tokens.dtype
        z = tokens if tokens.dtype == torch.float32 else tokens.float()
        if z.shape[-1] != self.channels:
            self.check_channels(z.shape[-1])
        if z.device != self._device:
            self.to(z.device)
        if self.exact:
            z = z - (z @ self._q) @ self._q.T
        else:
            for u in self._bases:  # training order: plane t acts on the output of planes 1..t-1
                z = z - (z @ u.T) @ u
        return z.to(dtype)

    def summary(self) -> dict:
        return {"planes": self.rounds, "rank": int(self.basis().shape[1]), "exact": self.exact}

    def _tensors(self) -> dict:
        return {"planes": self.planes.contiguous()}

    def _meta(self) -> dict:
        return {"exact": self.exact}


class BlankHead(Head):
    """Sets chosen channels to zero (the channel-blanking baseline).

    Parameters
    ----------
    channels_zeroed : sequence of int
        Channel indices.
    channels : int or None
        Feature width the channels were chosen on (None: any width larger than every index).
    """

    method = "blank"

    def __init__(self, channels_zeroed: Sequence[int], channels: int | None = None, info: dict | None = None,
                 fill_values=None):
        idx = sorted({int(c) for c in channels_zeroed})
        # fill_values: one value per channel of ``channels_zeroed`` (ascending), e.g. the dataset means; None = 0.
        self.fill_values = None if fill_values is None else np.asarray(fill_values, dtype=np.float32).reshape(-1)
        if self.fill_values is not None and self.fill_values.shape[0] != len(idx):
            raise PosvitError(f"a blank head needs one fill value per channel ({len(idx)}), got "
                              f"{self.fill_values.shape[0]}")
        if any(c < 0 for c in idx):
            raise PosvitError("channel indices to blank must be 0 or more")
        if channels is not None and idx and idx[-1] >= channels:
            raise PosvitError(f"channel {idx[-1]} does not exist in {channels}-channel features")
        super().__init__(channels, info)
        self.channels_zeroed = idx

    def check_channels(self, channels: int, what: str = "these features") -> None:
        super().check_channels(channels, what)
        if self.channels_zeroed and self.channels_zeroed[-1] >= int(channels):
            raise PosvitError(
                f"head '{self.source or 'blank'}' blanks channel {self.channels_zeroed[-1]}, but {what} have only "
                f"{int(channels)} channels"
            )

    def apply(self, tokens):
        self.check_channels(tokens.shape[-1])
        out = tokens.clone()
        if self.channels_zeroed:
            if self.fill_values is None:
                out[..., self.channels_zeroed] = 0
            else:
                out[..., self.channels_zeroed] = _torch().from_numpy(self.fill_values).to(out.device, out.dtype)
        return out

    def summary(self) -> dict:
        return {"channels_zeroed": list(self.channels_zeroed), "fill": "zero" if self.fill_values is None else "mean"}

    def _tensors(self) -> dict:
        torch = _torch()
        out = {"channels_zeroed": torch.tensor(self.channels_zeroed, dtype=torch.int64)}
        if self.fill_values is not None:
            out["fill_values"] = torch.from_numpy(self.fill_values.copy())
        return out


class PosMeanHead(Head):
    """Subtracts the dataset-mean token field (less its mean over positions), resampled to each image's grid.

    Parameters
    ----------
    field : array-like, shape (H, W, D)
        Mean token at each position of the reference grid minus its mean over positions (float32), from
        :func:`~posvit_cli.core.debias.posmean.store_means`. Other grids get it resampled bilinearly with token
        centres aligned (:func:`~posvit_cli.core.debias.posmean.resample_grid`).
    """

    method = "posmean"

    def __init__(self, field, info: dict | None = None):
        f = np.asarray(field.numpy() if hasattr(field, "numpy") else field, dtype=np.float32)
        if f.ndim != 3 or min(f.shape) < 1:
            raise PosvitError(f"a posmean head needs a field of shape [H, W, D], got {tuple(f.shape)}")
        if not np.isfinite(f).all():
            raise PosvitError("the head's mean field contains NaN or inf")
        super().__init__(int(f.shape[2]), info)
        self.field = f
        self._cache: dict = {}

    def field_on(self, grid: tuple[int, int], rows: tuple[int, int] | None = None) -> np.ndarray:
        """The field resampled to ``grid`` (rows ``start:stop`` only when given), float32 ``(rows, w, D)``."""
        from posvit_cli.core.debias.posmean import resample_grid

        key = (tuple(int(v) for v in grid), rows)
        if key in self._cache:
            return self._cache[key]
        out = resample_grid(self.field, grid, rows)
        if out.nbytes <= 2**25:  # keep whole small grids (batches of one size); bands of huge grids are read once
            if len(self._cache) >= 8:
                self._cache.clear()
            self._cache[key] = out
        return out

    def apply(self, tokens):
        """Tokens of whole grids, shape ``(..., h, w, D)``."""
        if tokens.ndim < 3:
            raise PosvitError("a posmean head acts on token grids (..., h, w, D), not on loose tokens")
        return self.apply_rows(tokens, tuple(tokens.shape[-3:-1]), 0)

    def apply_rows(self, tokens, grid: tuple[int, int], start: int):
        torch = _torch()
        self.check_channels(tokens.shape[-1])
        field = self.field_on(grid, (int(start), int(start) + int(tokens.shape[-3])))
        out = tokens.float() - torch.from_numpy(field).to(tokens.device)
        return out.to(tokens.dtype)

    def summary(self) -> dict:
        return {"grid": list(self.field.shape[:2]),
                "field_rms": float(np.sqrt(np.mean(self.field.astype(np.float64) ** 2)))}

    def _tensors(self) -> dict:
        return {"position_mean": _torch().from_numpy(self.field.copy())}


class TTAHead(Head):
    """Test-time averaging over grid transforms, each inverted in token space before averaging.

    Parameters
    ----------
    transforms : str
        A transform set for :func:`~posvit_cli.core.io.transforms.parse_transform_set` (``flips,rot90,rolls:2``).
    """

    method = "tta"
    needs_encoder = True

    def __init__(self, transforms: str, info: dict | None = None):
        from posvit_cli.core.io.transforms import parse_transform_set

        self.transforms = [t.spec for t in parse_transform_set(transforms)]
        super().__init__(None, info)

    def apply(self, tokens):
        raise PosvitError(
            "test-time averaging runs the encoder on transformed images: apply this head while extracting "
            "(posvit extract IMAGES --head HEAD), not to stored features"
        )

    def token_postprocess(self, device) -> Callable:
        return self.apply

    def wrap_encoder(self, encoder) -> _TransformAveragedEncoder:
        """An encoder whose :meth:`forward_tokens` averages over this head's transforms (other attributes pass
        through)."""
        from posvit_cli.core.io.transforms import parse_transform

        return _TransformAveragedEncoder(encoder, [parse_transform(s, encoder.patch_size) for s in self.transforms])

    def summary(self) -> dict:
        return {"transforms": list(self.transforms)}

    def _meta(self) -> dict:
        return {"transforms": list(self.transforms)}


class _TransformAveragedEncoder:
    """Wraps an :class:`~posvit_cli.core.features.encoders.Encoder`: tokens averaged over transformed inputs."""

    def __init__(self, encoder, transforms):
        self._encoder = encoder
        self.transforms = list(transforms)

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def forward_tokens(self, x, layers, keep_prefix: bool = False):
        from posvit_cli.core.io.transforms import average_over_transforms

        return average_over_transforms(
            lambda xt: self._encoder.forward_tokens(xt, layers, keep_prefix=keep_prefix), x, self.transforms
        )


# --------------------------------------------------------------------------------------------------------------
# Files


def save_head(head: Head, path: str | os.PathLike, *, layout: str = "posvit") -> Path:
    """Write a head atomically.

    Parameters
    ----------
    head : Head
    path : str or path-like
        ``.safetensors`` (either layout) or ``.pth``/``.pt`` (Franca layout only: a plain torch state dict).
    layout : {"posvit", "franca"}
        ``franca`` writes ``pre_pos_layers.{i}.weight`` / ``pos_pred.weight`` (RASA heads only); in a
        ``.safetensors`` file posvit's metadata rides along, so nothing is lost.

    Returns
    -------
    Path
    """
    torch = _torch()
    from safetensors.torch import save_file

    path = Path(path)
    suffix = path.suffix.lower()
    if layout not in ("posvit", "franca"):
        raise PosvitError(f"unknown head format '{layout}': use posvit or franca")
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise PosvitError(f"head file '{path}': use a .safetensors name (or .pth for Franca's format)")
    if suffix != ".safetensors" and layout != "franca":
        raise PosvitError(f"head file '{path}': posvit heads are .safetensors (.pth only with --head-format franca)")
    doc = {"method": head.method, "channels": head.channels, **head._meta(), **head.info}
    meta = {
        "format": HEAD_FORMAT,
        "format_version": str(HEAD_FORMAT_VERSION),
        "method": head.method,
        "channels": "any" if head.channels is None else str(head.channels),
        "layout": layout,
        "posvit": json_text(doc, indent=None, default=str),
    }
    if layout == "franca":
        if not isinstance(head, ProjectionHead) or head.method != "rasa" or head.planes.shape[1] != 2:
            raise PosvitError("Franca's head format holds RASA planes only ([2, D] per round)")
        if head.exact and suffix != ".safetensors":
            warnings.warn(
                "Franca's .pth format cannot mark a head exact: readers will apply its planes sequentially",
                PosvitWarning, stacklevel=2,
            )
        T = head.rounds
        tensors = {f"pre_pos_layers.{i}.weight": head.planes[i].clone() for i in range(T - 1)}
        tensors["pos_pred.weight"] = head.planes[T - 1].clone()
    else:
        tensors = {k: v.clone() for k, v in head._tensors().items()}
    if suffix == ".safetensors":
        with atomic_path(path, make_parents=False) as tmp:
            save_file(tensors, tmp, metadata=meta)
    else:
        with atomic_path(path, make_parents=False) as tmp:
            torch.save(tensors, tmp)
    return Path(path)


def load_head(
    path: str | os.PathLike, channels: int | None = None, *, backbone: dict | None = None
) -> Head:
    """Read a head written by :func:`save_head`, or a RASA head in Franca's format.

    Parameters
    ----------
    path : str or path-like
        ``.safetensors`` (posvit or Franca layout) or ``.pth``/``.pt`` (Franca layout, loaded with
        ``weights_only=True``).
    channels : int, optional
        Width of the features the head will be applied to: a head of another width is refused.
    backbone : dict, optional
        Provenance of those features (``model``, ``weights_sha256``): a head trained on another model warns.

    Raises
    ------
    PosvitError
        Missing or unreadable file, a file that is not a head, or a head of another width.
    """
    torch = _torch()
    p = Path(path)
    if not p.is_file():
        raise PosvitError(f"head file '{path}' does not exist (make one with `posvit debias-train rasa`)")
    suffix = p.suffix.lower()
    meta: dict = {}
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:
            raise PosvitError(f"cannot read head '{path}' ({type(exc).__name__}: {exc})") from None
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PosvitError(f"cannot read head '{path}' as a torch state dict ({type(exc).__name__}: {exc})") from None
        state = unwrap_state(obj, str(path))
    else:
        raise PosvitError(f"head file '{path}': expected .safetensors (posvit) or .pth (Franca)")

    doc: dict = {}
    if meta.get("format") == HEAD_FORMAT:
        if int(meta.get("format_version", "0")) > HEAD_FORMAT_VERSION:
            raise PosvitError(f"head '{path}' uses head format {meta['format_version']}: upgrade posvit")
        try:
            doc = json.loads(meta.get("posvit", "{}"))
        except json.JSONDecodeError:
            raise PosvitError(f"head '{path}' has damaged metadata") from None
    method = meta.get("method") or doc.get("method") or "rasa"
    info = {k: v for k, v in doc.items() if k not in ("method", "channels", "exact", "transforms")}

    if "planes" in state:
        head: Head = ProjectionHead(state["planes"], method=method, exact=bool(doc.get("exact", False)), info=info)
    elif method == "blank" and "channels_zeroed" in state:
        width = doc.get("channels")
        fill = state["fill_values"].numpy() if "fill_values" in state else None
        head = BlankHead(state["channels_zeroed"].tolist(), None if width is None else int(width), info=info,
                         fill_values=fill)
    elif method == "posmean" and "position_mean" in state:
        head = PosMeanHead(state["position_mean"], info=info)
    elif method == "tta":
        if "transforms" not in doc:
            raise PosvitError(f"head '{path}' names no transforms")
        head = TTAHead(",".join(doc["transforms"]), info=info)
    elif state:
        planes = planes_from_franca(state, str(path))
        if not doc:
            info = {"format": "franca", "source_file": p.name}
        head = ProjectionHead(planes, method="rasa", exact=bool(doc.get("exact", False)), info=info)
    else:
        raise PosvitError(f"'{path}' holds no head (no tensors and no posvit head metadata)")
    head.source = str(path)
    head.sha256 = sha256_file(p)
    if channels is not None:
        head.check_channels(channels, "the encoder's tokens")
    if backbone is not None:
        head.check_backbone(backbone, "the encoder's tokens")
    return head


# --------------------------------------------------------------------------------------------------------------
# Store in, store out


def apply_head_to_store(
    head: Head,
    source,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    compression: str | None = None,
    command: str = "",
    band_bytes: int = 64 * 2**20,
    progress: ProgressCallback | None = None,
) -> dict:
    """Write a copy of a feature store with a head applied to its ``final`` tokens (no encoder is run).

    Other layers, prefix tokens, per-token maps and per-image metadata are copied unchanged; the provenance is
    copied with the head appended to its ``debias`` list. Huge grids are processed in row bands of about
    ``band_bytes``, so memory stays bounded.

    Parameters
    ----------
    head : Head
        A token head (not test-time averaging, which needs the encoder).
    source : FeatureStore
    output : str or path-like
        ``.h5``, ``.zarr``, ``.zarr.zip`` or ``"-"`` (stdout).
    overwrite : bool
    dtype : {"float16", "float32"}, optional
        Storage type (default: the source's).
    compression : str, optional
    command : str
        The command line, for provenance.
    band_bytes : int
        Upper bound of one row band's float32 size.
    progress : callable, optional
        ``progress("apply head", done, total)``.

    Returns
    -------
    dict
        ``images``, ``output`` (path or None for stdout), ``layer``, ``seconds``.

    Raises
    ------
    PosvitError
        A head that needs the encoder, a store without a ``final`` layer, or a width mismatch.
    """
    import time

    from posvit_cli.core.features.writer import StoreWriter

    progress = report(progress)
    t0 = time.perf_counter()
    if head.needs_encoder:
        raise PosvitError(
            f"a {head.method} head runs the encoder on transformed images: extract the images again with "
            "`posvit extract IMAGES --head HEAD`"
        )
    if not source.layers:
        raise PosvitError(f"'{source.source}' holds no feature layers (a maps-only store)")
    if "final" not in source.layers:
        raise PosvitError(
            f"heads act on final tokens; '{source.source}' stores {', '.join(source.layers)}: extract with --layers final"
        )
    head.check_channels(source.channels, f"the tokens of '{source.source}'")
    head.check_backbone(source.provenance, f"the tokens of '{source.source}'")
    prov = dict(source.provenance)
    if any(isinstance(d, dict) and d.get("head_sha256") and d.get("head_sha256") == head.sha256
           for d in source.debias):
        warnings.warn(f"'{source.source}' was already cleaned with this head; applying it again", PosvitWarning,
                      stacklevel=2)
    prov["debias"] = list(prov.get("debias") or []) + [{**head.provenance(), "applied_to_store": source.source}]
    if command:
        prov["command"] = command
    prov.pop("complete", None)
    dtype = dtype or source.dtype
    maps = source.map_names()
    total = len(source)
    progress("apply head", 0, total)
    torch = _torch()
    writer = StoreWriter(output, provenance=prov, layers=source.layers, dtype=dtype, overwrite=overwrite,
                         compression=compression)
    try:
        for rec in source.records:
            prefix = None
            if source.prefix_tokens(rec.index, source.layers[0]) is not None:
                prefix = {ly: source.prefix_tokens(rec.index, ly) for ly in source.layers}
            rec_maps = {}
            for m in maps:
                with contextlib.suppress(PosvitError):
                    rec_maps[m] = source.token_map(rec.index, m)
            handle = writer.begin_image(
                rec.path, rec.grid, source.channels, orig_size=rec.orig_size, proc_size=rec.proc_size,
                prefix=prefix, maps=rec_maps or None, meta=rec.meta,
            )
            h, w = rec.grid
            rows = max(1, int(band_bytes // max(1, w * source.channels * 4)))
            for ly in source.layers:
                for r0 in range(0, h, rows):
                    band = source.feature_rows(rec.index, ly, r0, min(h, r0 + rows))
                    if ly == "final":
                        with torch.inference_mode():
                            band = head.apply_rows(torch.from_numpy(band), (h, w), r0).numpy()
                    handle.write_rows(ly, r0, band)
            handle.finish()
            writer.commit()
            progress("apply head", rec.index + 1, total)
    except BaseException:
        # Nothing to resume here (re-running is as fast): leave no partial store behind.
        writer.abort()
        if writer.work_path is not None and writer.work_path.exists():
            import shutil

            if writer.work_path.is_dir():
                shutil.rmtree(writer.work_path, ignore_errors=True)
            else:
                writer.work_path.unlink(missing_ok=True)
        raise
    writer.close(complete=True)
    final = None if str(output) == "-" else str(output)
    return {"images": total, "output": final, "layer": "final", "seconds": round(time.perf_counter() - t0, 3)}

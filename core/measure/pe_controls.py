"""Causal position-encoding controls: probe the same images with the model's position code zeroed, shuffled
across positions or shifted by whole patches.

The positional probe (:mod:`~posvit_cli.core.measure.probe`) says *how much* position the tokens carry, not
*where it comes from*. A ViT can read position from its position embedding, or infer it from content and from the
image borders (zero padding at the edges of attention, boundary statistics). Running the same images again with the
position code replaced separates the two: R² that drops under ``zero``/``shuffle`` was read from the embedding; R²
that survives is inferred from content or borders.

Controls, on the ``h × w`` token grid the model actually uses (after timm resamples a learned ``pos_embed`` to the
input's grid):

``none``
    The model as it is (the reference).
``zero``
    No position code: the patch tokens get no embedding (learned ``pos_embed``) or the identity rotation (RoPE).
``shuffle``
    The codes of the grid permuted across positions by a seeded permutation ``src``: token ``k`` gets the code of
    token ``src[k]`` (:func:`control_sources`). Every code is still present, but no longer where it belongs.
``shift``
    The grid of codes rolled by whole patches ``(dy, dx)`` on the torus: token ``(i, j)`` gets the code of token
    ``((i - dy) mod h, (j - dx) mod w)``.

The control is installed by :func:`position_control`, a context manager that wraps the model's ``_pos_embed``
(timm's ``VisionTransformer`` and ``Eva``, where the learned embedding is added to the patch tokens and RoPE
tables are produced) for the duration of the block and removes the wrapper on exit, also on an exception. The
weights are never written to, so the model is bit-exactly as before afterwards. Prefix tokens (CLS, registers)
keep their own embedding. Models without any position code (ALiBi or NoPE retrofits,
:mod:`~posvit_cli.core.features.alibi`) have nothing to control: :func:`probe_controls` probes them once and
reports every other control as ``"no position embedding"`` instead of repeating identical numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import tagged_header
from posvit_cli.core.progress import ProgressCallback, report

__all__ = [
    "CONTROLS",
    "CONTROL_TARGETS",
    "PE_CONTROLS_SCHEMA",
    "PE_CONTROLS_SCHEMA_VERSION",
    "control_sources",
    "parse_controls",
    "position_control",
    "position_encodings",
    "probe_controls",
]

CONTROLS = ("none", "zero", "shuffle", "shift")
#: Targets of the control probe: the ramps and the ``random`` null.
CONTROL_TARGETS = ("lr", "ud", "xy", "radial", "random")
PE_CONTROLS_SCHEMA = "posvit-pe-controls"
PE_CONTROLS_SCHEMA_VERSION = 1
NO_POSITION_EMBEDDING = "no position embedding"
# timm token assemblies whose patch rows are ``patch tokens + embedding`` and whose RoPE table (if any) is the
# second element of the returned pair: the layouts the wrapper knows how to edit.
_SUPPORTED_ASSEMBLIES = ("VisionTransformer._pos_embed", "Eva._pos_embed")


def parse_controls(spec: str | Sequence[str]) -> list[str]:
    """Control names from ``"zero,shuffle,shift"`` (or a list), with ``none`` (the reference) put first.

    Raises
    ------
    PosvitError
        For an unknown or repeated name.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for n in names:
        if n not in CONTROLS:
            raise PosvitError(f"unknown position control '{n}': use {', '.join(CONTROLS)}")
    if len(set(names)) != len(names):
        raise PosvitError(f"a position control is named twice in '{','.join(names)}'")
    return ["none"] + [n for n in names if n != "none"]


def position_encodings(model) -> list[str]:
    """The position codes a timm ViT uses: ``"pos_embed"`` (learned, added), ``"rope"`` (rotary), both or none."""
    found = []
    if getattr(model, "pos_embed", None) is not None:
        found.append("pos_embed")
    if getattr(model, "rope", None) is not None:
        found.append("rope")
    return found


def control_sources(grid: tuple[int, int], control: str, *, shift: tuple[int, int] = (2, 3),
                    seed: int = 0) -> np.ndarray | None:
    """Which position's code each token gets under a control.

    Parameters
    ----------
    grid : (int, int)
        Token grid ``(h, w)``.
    control : {"none", "zero", "shuffle", "shift"}
    shift : (int, int)
        ``(dy, dx)`` in patches, for ``shift``.
    seed : int
        Seed of the ``shuffle`` permutation (the same for every image of a grid size).

    Returns
    -------
    ndarray of int64, shape (h * w,), or None
        ``src`` with token ``k`` (row-major) taking the code of token ``src[k]``; None for ``zero`` (no code).
    """
    h, w = (int(v) for v in grid)
    index = np.arange(h * w, dtype=np.int64)
    if control == "none":
        return index
    if control == "zero":
        return None
    if control == "shuffle":
        return np.random.default_rng([int(seed), h, w]).permutation(h * w).astype(np.int64)
    if control == "shift":
        dy, dx = (int(v) for v in shift)
        return np.roll(index.reshape(h, w), (dy, dx), axis=(0, 1)).ravel()
    raise PosvitError(f"unknown position control '{control}': use {', '.join(CONTROLS)}")


def _check_assembly(model) -> None:
    handler = getattr(getattr(type(model), "_pos_embed", None), "__qualname__", "")
    if handler not in _SUPPORTED_ASSEMBLIES:
        name = type(model).__name__
        raise PosvitError(f"position controls need timm's VisionTransformer or Eva token assembly; {name} assembles "
                          "its tokens otherwise (e.g. SAM, distilled DeiT): not supported")


def _controlled_assembly(original, model, control: str, shift, seed):
    """``_pos_embed`` replacement: the original, with the patch rows' embedding and the RoPE table re-indexed."""
    import torch

    learned_zero: dict = {}  # the embedding at each grid (computed once per grid, device and dtype)

    def assembly(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        if x.ndim != 4:
            raise PosvitError("position controls need a model built with dynamic_img_size (tokens as a B×h×w×C grid)")
        B, h, w, C = x.shape
        n = h * w
        tokens, rope = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        if tokens.shape[1] != int(getattr(model, "num_prefix_tokens", 0)) + n:
            raise PosvitError(f"unexpected token layout ({tokens.shape[1]} tokens for a {h}×{w} grid): "
                              "position controls cannot edit it")
        src = control_sources((h, w), control, shift=shift, seed=seed)
        src_t = None if src is None else torch.from_numpy(src).to(tokens.device)
        if getattr(model, "pos_embed", None) is not None:
            key = (h, w, x.device, x.dtype)
            if key not in learned_zero:
                # The embedding as the model applies it at this grid (resampled by timm): the patch rows of the
                # assembly of an all-zero input.
                base = original(torch.zeros((1, h, w, C), device=x.device, dtype=x.dtype), *args, **kwargs)
                learned_zero[key] = (base[0] if isinstance(base, tuple) else base)[:, -n:]
            emb = learned_zero[key]
            content = x.reshape(B, n, C)
            patch = content if src_t is None else content + emb[:, src_t]
            tokens = torch.cat([tokens[:, : tokens.shape[1] - n], patch.to(tokens.dtype)], dim=1)
        if rope is not None:
            rope = _controlled_rope(rope, n, src_t)
        return (tokens, rope, *out[2:]) if isinstance(out, tuple) else tokens

    return assembly


def _controlled_rope(rope, n: int, src_t):
    if rope.ndim != 2 or rope.shape[0] != n:
        raise PosvitError(f"this model's RoPE table has shape {tuple(rope.shape)}, not (tokens, 2·dim) "
                          "(mixed or per-depth RoPE): position controls support timm's axial RoPE only")
    if src_t is not None:
        return rope[src_t]
    # The identity rotation: sin 0, cos 1 (timm concatenates the sin and cos halves).
    half = rope.shape[1] // 2
    out = rope.new_zeros(rope.shape)
    out[:, half:] = 1
    return out


@contextlib.contextmanager
def position_control(model, control: str, *, shift: tuple[int, int] = (2, 3), seed: int = 0) -> Iterator[list[str]]:
    """Run a timm ViT with its position code replaced by a control, inside a ``with`` block.

    Parameters
    ----------
    model : torch.nn.Module or Encoder
        A timm ``VisionTransformer``/``Eva`` built with ``dynamic_img_size`` (``Encoder.model``), or an encoder.
    control : {"none", "zero", "shuffle", "shift"}
        See the module docstring and :func:`control_sources`.
    shift : (int, int)
        ``(dy, dx)`` in patches, for ``shift``.
    seed : int
        Seed of the ``shuffle`` permutation.

    Yields
    ------
    list of str
        The position codes controlled (:func:`position_encodings`); empty for a model without any, which then
        runs unchanged.

    Raises
    ------
    PosvitError
        Unknown control, or a model whose token assembly the controls cannot edit.

    Notes
    -----
    The weights are never modified: the control is an instance-level wrapper of ``model._pos_embed``, removed
    when the block exits, normally or by an exception.
    """
    model = getattr(model, "model", model)
    control_sources((2, 2), control, shift=shift, seed=seed)  # validates the name
    encodings = position_encodings(model)
    if control == "none" or not encodings:
        yield encodings
        return
    _check_assembly(model)
    own = model.__dict__.get("_pos_embed")
    had_own = "_pos_embed" in model.__dict__
    original = model._pos_embed
    object.__setattr__(model, "_pos_embed", _controlled_assembly(original, model, control, tuple(shift), seed))
    try:
        yield encodings
    finally:
        if had_own:
            object.__setattr__(model, "_pos_embed", own)
        else:
            del model.__dict__["_pos_embed"]


# --------------------------------------------------------------------------------------------------------------
# Probing under controls


def _load_images(paths: Sequence[str | Path], encoder, size, intensity: str, max_side: int) -> list[tuple[str, object]]:
    """``(name, normalised tensor (C, H, W))`` per image, read like ``extract`` reads an untiled image."""
    from posvit_cli.core.io.images import read_image, to_channels, to_float
    from posvit_cli.core.io.preprocess import parse_size, resize_and_normalise

    mode = parse_size(size) if isinstance(size, str) else size
    out = []
    for p in paths:
        img = to_channels(to_float(read_image(p), intensity), encoder.in_chans)
        tensor, proc = resize_and_normalise(img, mode, encoder.patch_size, encoder.mean, encoder.std)
        if max(proc) > max_side:
            raise PosvitError(f"'{p}' is {proc[0]}×{proc[1]} px after --size {mode}, above --max-side {max_side}: "
                              "resize it (--size short:N)")
        out.append((str(p), tensor))
    return out


def _control_tokens(encoder, images, layer: str, control: str, shift, seed, device, progress) -> list[np.ndarray]:
    import torch

    tokens = []
    progress(f"forward {control}", 0, len(images))
    with position_control(encoder.model, control, shift=shift, seed=seed), torch.inference_mode():
        for i, (_, tensor) in enumerate(images):
            out, _ = encoder.forward_tokens(tensor[None].to(device), [layer])
            tokens.append(out[layer][0].float().cpu().numpy())
            progress(f"forward {control}", i + 1, len(images))
    return tokens


def _stack_summary(block: dict, targets: Sequence[str]) -> dict:
    return {t: {k: block["stack_r2"][t][k] for k in ("mean", "std", "per_image")} for t in targets}


def _drops(reference: dict, probed: dict) -> dict:
    out = {}
    for t, s in probed.items():
        ref, val = reference[t]["mean"], s["mean"]
        out[t] = None if ref is None or val is None else float(ref - val)
    return out


def probe_controls(
    encoder,
    paths: Sequence[str | Path],
    *,
    controls: Sequence[str] = CONTROLS,
    shift: tuple[int, int] = (2, 3),
    layer: str = "final",
    size="native",
    intensity: str = "auto",
    max_side: int = 2048,
    settings=None,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
) -> dict:
    """Probe the same images under each position control; the whole-stack R² per target and its drop.

    Parameters
    ----------
    encoder : Encoder
        From :func:`posvit_cli.core.features.encoders.load_encoder`, on ``device``.
    paths : sequence of path
        Images (read and resized as ``extract`` does; no tiling).
    controls : sequence of str
        Names from :data:`CONTROLS`; ``none`` (the reference) is always probed, first.
    shift : (int, int)
        ``(dy, dx)`` in patches for ``shift``.
    layer : str
        Layer to probe (``final`` or a block index).
    size, intensity, max_side
        As for ``extract`` (``size``: a ``--size`` string or a ``ResizeMode``).
    settings : ProbeSettings, optional
        Probe settings; default :func:`~posvit_cli.core.measure.probe.make_settings` ``("holdout")`` with the
        targets :data:`CONTROL_TARGETS`, no per-channel scores and no extras. Its seed also seeds ``shuffle``.
    device : str
    progress : callable, optional
        ``progress("forward CONTROL", done, total)`` and the probe's ``progress("probe", done, total)``.

    Returns
    -------
    dict
        The result document: ``schema``, ..., ``model``, ``position_encoding`` (codes found), ``layer``,
        ``shift``, ``settings``, ``images``, ``targets`` and ``controls``: one entry per control with
        ``status`` (``"probed"`` or ``"no position embedding"``), ``stack_r2`` ({target: mean, std, per_image})
        and ``drop`` ({target: R²(none) − R²(control)}); unprobed controls carry neither.

    Raises
    ------
    PosvitError
        Unknown control or layer, unreadable or oversized images, grids too small to probe, or a model whose
        token assembly the controls cannot edit.
    """
    from posvit_cli.core.measure.probe import make_settings, probe_dataset

    progress = report(progress)
    controls = parse_controls(controls)
    shift = tuple(int(v) for v in shift)
    if len(shift) != 2:
        raise PosvitError(f"--shift takes two whole-patch offsets DY,DX, got {shift}")
    layers = encoder.layer_names([layer])
    if len(layers) != 1:
        raise PosvitError(f"probe one layer at a time (got '{layer}')")
    layer = layers[0]
    if settings is None:
        settings, _ = make_settings("holdout", targets=CONTROL_TARGETS, per_channel=False, extras=False)
    settings = settings.validated()
    encodings = position_encodings(encoder.model)
    if encodings and len(controls) > 1:
        _check_assembly(encoder.model)
    images = _load_images(paths, encoder, size, intensity, max_side)
    if not images:
        raise PosvitError("no images to probe")
    meta = [{"name": n, "grid": list(encoder.grid(int(t.shape[-2]), int(t.shape[-1])))} for n, t in images]
    entries, reference = {}, None
    for control in controls:
        if control != "none" and not encodings:
            entries[control] = {"status": NO_POSITION_EMBEDDING}
            continue
        tokens = _control_tokens(encoder, images, layer, control, shift, settings.seed, device, progress)
        out = probe_dataset(lambda i, ly: tokens[i], meta, [layer], settings, device=device, progress=progress)
        stack = _stack_summary(out["layers"][layer], settings.targets)
        reference = reference or stack
        entries[control] = {"status": "probed", "stack_r2": stack, "drop": _drops(reference, stack)}
    return {
        **tagged_header(PE_CONTROLS_SCHEMA, PE_CONTROLS_SCHEMA_VERSION),
        "model": encoder.provenance(),
        "position_encoding": encodings or [NO_POSITION_EMBEDDING],
        "layer": layer,
        "shift": list(shift),
        "shuffle_seed": settings.seed,
        "settings": settings.as_dict(),
        "images": meta,
        "targets": list(settings.targets),
        "controls": entries,
    }

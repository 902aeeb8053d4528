"""Crop-shift correspondence of each ``debias-train auto`` candidate: after the head, do tokens follow the content
or the grid when the image moves by whole patches?

The probe is :mod:`posvit_cli.core.measure.shift` (``posvit probe shift``), in its default settings (``crop``
mode, shift :data:`~posvit_cli.core.measure.shift.DEFAULT_SHIFT`): two crops of one image, view B's origin
``(dy, dx)`` patches from view A's, each encoded as an image of its own; every token of A with a counterpart in B
is matched to its cosine nearest neighbour among all tokens of B. ``shift_content`` is the fraction matched to the
token that shows the same pixels, ``shift_absolute`` the fraction matched to the token at the same grid position;
mean over images, exactly as the probe's summary.

Here the views of a few held-out images (:func:`shift_pairs`: at most ``max_images``) are encoded **once** with
the encoder rebuilt from the store's provenance, read and preprocessed as the store records (its ``--size`` and
``--intensity``); each candidate's head is then applied to both views' tokens (:func:`shift_scores`; a
``posmean`` field on each view's own grid, since each view went through the encoder as a whole image) and the
views matched again. Nothing is re-encoded per candidate.

Unavailable (None, with a note saying why) when the encoder cannot be rebuilt, when no held-out image's file can
be found (the path recorded by ``extract``, then relative to the store's folder), when the store's features are
not what the encoder gives for the whole image (extracted in tiles, through a test-time transform, or already
debiased), or when the images are too small for the shift.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from posvit_cli.core.errors import PosvitError

__all__ = ["SHIFT_IMAGES", "ShiftPairs", "recorded_heads", "shift_pairs", "shift_scores", "shift_unavailable"]

#: Held-out images whose views are encoded (each one forward of two views).
SHIFT_IMAGES = 4


@dataclasses.dataclass
class ShiftPairs:
    """The encoded views of the held-out images the crop-shift scores use.

    Attributes
    ----------
    names, paths : list of str
        Each image's store name and the file that was read.
    views : list of ShiftViews
        The geometry of each image's two views.
    tokens : list of (ndarray (h, w, C) float32, ndarray (h, w, C) float32)
        Final tokens of view A and view B (``views[j].view_hw``), raw.
    shift : (int, int)
    mode : str
    """

    names: list
    paths: list
    views: list
    tokens: list
    shift: tuple
    mode: str = "crop"

    def facts(self) -> dict:
        """JSON-ready: the images, the shift and mode, and each image's view grid."""
        return {"images": list(self.names), "paths": [str(p) for p in self.paths], "shift": list(self.shift),
                "mode": self.mode, "view_grids": [list(v.view_hw) for v in self.views]}


def shift_unavailable(store, encoder, why: str | None, *, heads_at_hand: bool = False) -> str | None:
    """Why the crop-shift scores cannot be measured on ``store`` with ``encoder`` (None when they can).

    Parameters
    ----------
    store : FeatureStore
    encoder : Encoder or None
        Rebuilt from the store's provenance; None when it could not be (``why`` says why).
    why : str, optional
    heads_at_hand : bool
        The heads the store's features went through are loaded (:func:`recorded_heads`) and will be applied to
        the views: a debiased store is then measurable.
    """
    if encoder is None:
        return f"the encoder cannot be rebuilt from the store's provenance ({why})"
    if store.tiling:
        return ("the images were extracted in tiles: two crops of a whole image are not what the store holds "
                "(each tile went through the encoder on its own)")
    if store.transform:
        return f"the images went through the test-time transform '{store.transform}' before the encoder"
    if store.debias and not heads_at_hand:
        return (f"the store holds features already debiased ({', '.join(store.debias_methods)}); the encoder "
                "gives raw ones")
    if store.channels and encoder.embed_dim != store.channels:
        return f"the rebuilt encoder has {encoder.embed_dim} channels, the store {store.channels}"
    return None


def recorded_heads(store) -> tuple[list, str | None]:
    """The heads a debiased store's features went through, in order, loaded from the paths its provenance records
    (as given, then beside the store) and checked against the recorded SHA-256; ``([], why)`` when one is
    missing or changed."""
    from pathlib import Path

    from posvit_cli.core.debias.heads import load_head
    from posvit_cli.core.fileio import sha256_file

    heads = []
    for entry in store.debias:
        recorded = entry.get("head")
        if not recorded:
            return [], f"its {entry.get('method')} head file is not recorded"
        found = next((p for p in (Path(recorded), Path(store.source).parent / recorded) if p.is_file()), None)
        if found is None:
            return [], f"its head '{recorded}' was not found"
        if entry.get("head_sha256") and sha256_file(found) != entry["head_sha256"]:
            return [], f"its head '{recorded}' changed since the store was written"
        heads.append(load_head(found, channels=store.channels))
    return heads, None


def _prepare(store, index: int, encoder, shift):
    """``(path, image tensor (C, H, W), views)`` of one store image, or ``(None, reason)`` when it is unusable."""
    from posvit_cli.core.measure.shift import prepare_image, shift_views
    from posvit_cli.core.viz.geometry import find_source_image

    rec = store.record(index)
    path = find_source_image(rec.path, store.source)
    if path is None:
        return None, f"'{rec.path}' not found"
    try:
        image, _ = prepare_image(path, encoder, store.resize_mode, store.intensity)
    except PosvitError as exc:
        return None, str(exc)
    grid = encoder.grid(int(image.shape[-2]), int(image.shape[-1]))
    if tuple(grid) != tuple(rec.grid):
        return None, (f"'{rec.path}' gives {grid[0]}×{grid[1]} tokens, the store holds {rec.grid[0]}×{rec.grid[1]} "
                      "(the image changed since extraction?)")
    try:
        views = shift_views(grid, shift, "crop")
    except PosvitError:
        return None, f"'{rec.path}' ({grid[0]}×{grid[1]} tokens) is too small for the shift {shift[0]},{shift[1]}"
    return (path, image, views), None


def shift_pairs(store, indices, encoder, *, layer: str = "final", max_images: int = SHIFT_IMAGES,
                shift: tuple[int, int] | None = None) -> tuple[ShiftPairs | None, list[str]]:
    """Encode the two crop views of the first ``max_images`` usable images ``indices`` of ``store``, once.

    Parameters
    ----------
    store : FeatureStore
    indices : sequence of int
        Store indices, in the order tried (the held-out images).
    encoder : Encoder
        Rebuilt from the store's provenance (:func:`shift_unavailable` is None), on the CPU.
    layer : str
        Canonical layer name (``final``).
    max_images : int
    shift : (int, int), optional
        In whole patches; default: the probe's :data:`~posvit_cli.core.measure.shift.DEFAULT_SHIFT`.

    Returns
    -------
    pairs : ShiftPairs or None
        None when no image is usable.
    notes : list of str
        Images skipped and why (one note), or why nothing could be measured.
    """
    from posvit_cli.core.measure.shift import DEFAULT_SHIFT, encode_views

    shift = tuple(shift or DEFAULT_SHIFT)
    pairs = ShiftPairs([], [], [], [], shift)
    skipped = []
    for i in indices:
        if len(pairs.names) >= max_images:
            break
        got, reason = _prepare(store, int(i), encoder, shift)
        if got is None:
            skipped.append(reason)
            continue
        path, image, views = got
        t = encode_views(encoder, image, views, layer).cpu().numpy()
        pairs.names.append(store.record(int(i)).name)
        pairs.paths.append(path)
        pairs.views.append(views)
        pairs.tokens.append((t[0], t[1]))
    if not pairs.names:
        return None, [f"content/grid match skipped: no held-out image could be used ({'; '.join(skipped[:3])}"
                      f"{'; ...' if len(skipped) > 3 else ''})"]
    notes = []
    if skipped:
        notes.append(f"content/grid match on {len(pairs.names)} held-out images; skipped {len(skipped)}: "
                     f"{'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''}")
    return pairs, notes


def shift_scores(head, pairs: ShiftPairs | None) -> dict:
    """``shift_content`` and ``shift_absolute`` of the views after ``head`` (None head: the raw tokens).

    Each view is cleaned as a whole image of its own grid (:func:`~posvit_cli.core.debias.auto_scores.apply_window`
    with the view's grid and origin ``(0, 0)``), then matched (:func:`~posvit_cli.core.measure.shift.match_tokens`)
    and summarised as the probe summarises (:func:`~posvit_cli.core.measure.shift.summarise`: mean over images).

    Returns
    -------
    dict
        ``shift_content``, ``shift_absolute``: floats in 0..1, or None when ``pairs`` is None.
    """
    from posvit_cli.core.debias.auto_scores import apply_window
    from posvit_cli.core.measure.shift import match_tokens, summarise

    if pairs is None:
        return {"shift_content": None, "shift_absolute": None}
    images = []
    for views, (a, b) in zip(pairs.views, pairs.tokens):
        ca, cb = (np.ascontiguousarray(apply_window(head, t, views.view_hw, (0, 0))) for t in (a, b))
        images.append({"shifts": [match_tokens(ca, cb, views).summary()]})
    (summary,) = summarise(images, [pairs.shift])
    return {"shift_content": summary["fraction_content"]["mean"],
            "shift_absolute": summary["fraction_absolute"]["mean"]}

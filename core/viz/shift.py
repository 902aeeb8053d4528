"""Crop-shift correspondence maps: view A of each image with every matched token coloured by where its nearest
neighbour in view B lay (content-correct, same grid position, elsewhere), the fractions in the titles."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posvit_cli.core.errors import PosvitError
from posvit_cli.core.measure.shift import ABSOLUTE, CONTENT, OTHER
from posvit_cli.core.progress import ProgressCallback, report
from posvit_cli.core.viz.geometry import fit_size
from posvit_cli.core.viz.index import FigureEntry
from posvit_cli.core.viz.layout import Legend, Panel, PanelGrid
from posvit_cli.core.viz.maps import upsample
from posvit_cli.core.viz.pictures import slug, write_grid

__all__ = ["CATEGORY_COLOURS", "OVERLAY_ALPHA", "category_rgb", "select_result_images", "shift_figure"]

#: Colours of the categories: content green, absolute red, other grey.
CATEGORY_COLOURS = {CONTENT: (40, 170, 70), ABSOLUTE: (220, 40, 40), OTHER: (150, 150, 150)}
#: Opacity of the category colours over the image.
OVERLAY_ALPHA = 0.55


def select_result_images(doc: dict, images: Sequence[str] | None, max_images: int = 4) -> list[int]:
    """Indices into ``doc["images"]`` named by file name, stem or index; the first ``max_images`` by default.

    Raises
    ------
    PosvitError
        For a name or index the result does not hold.
    """
    entries = doc.get("images") or []
    if not entries:
        raise PosvitError("the crop-shift result holds no images")
    if not images:
        return list(range(min(max_images, len(entries))))
    out = []
    for item in images:
        hits = [i for i, e in enumerate(entries) if item in (e["name"], Path(e["name"]).stem)]
        if not hits and item.isdigit() and int(item) < len(entries):
            hits = [int(item)]
        if not hits:
            raise PosvitError(f"image '{item}' is not in the crop-shift result ({len(entries)} images: "
                              f"{', '.join(e['name'] for e in entries[:5])}{', ...' if len(entries) > 5 else ''})")
        out.extend(h for h in hits if h not in out)
    return out


def category_rgb(categories: np.ndarray, base: np.ndarray | None = None, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Colour a category map (pixels, ``(H, W)`` of CONTENT/ABSOLUTE/OTHER/OUTSIDE) over ``base`` (uint8 RGB).

    The base is drawn in grey; tokens outside the overlap (``OUTSIDE``) keep it (white without one).
    """
    if base is None:
        out = np.full(categories.shape + (3,), 255, dtype=np.float32)
    else:  # the image in grey, so that the three colours read at a glance over any texture
        grey = base.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        out = np.repeat(grey[..., None], 3, axis=-1)
    for cat, colour in CATEGORY_COLOURS.items():
        sel = categories == cat
        out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(colour, dtype=np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _processed_pixels(entry: dict, doc: dict, image_dir: str | None) -> np.ndarray | None:
    """The image as the encoder saw it (resized as the probe did; RGB uint8), or None when it is not found."""
    from posvit_cli.core.io.images import read_image, to_channels, to_float
    from posvit_cli.core.io.preprocess import parse_size, resize_and_normalise

    candidates = ([Path(image_dir) / entry["name"]] if image_dir else []) + [Path(entry["path"])]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    settings = doc["settings"]
    img = to_channels(to_float(read_image(path), settings.get("intensity", "auto")), 3)
    t, _ = resize_and_normalise(img, parse_size(settings["size"]), int(doc["model"]["patch_size"]), (0.0,) * 3,
                                (1.0,) * 3)
    return (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _view_a(pixels: np.ndarray | None, block: dict, patch: int) -> np.ndarray | None:
    """View A of a shift block cut from the processed image (the whole image in roll mode, where origin is 0, 0)."""
    if pixels is None:
        return None
    (y, x), (h, w) = block["origin_a"], block["view_grid"]
    return pixels[y * patch: (y + h) * patch, x * patch: (x + w) * patch]


def _title(block: dict) -> str:
    disp = block.get("displacement_error")
    # The column header names the shift; two short lines fit a panel of 160 px.
    return (f"content {block['fraction_content']:.2f} · absolute {block['fraction_absolute']:.2f}\n"
            f"other {block['fraction_other']:.2f} · error " + ("n/a" if disp is None else f"{disp:.2f}") + " tok")


def shift_figure(
    doc: dict,
    outdir: str | os.PathLike,
    *,
    indices: Sequence[int] | None = None,
    panel_size: int = 256,
    image_dir: str | None = None,
    source: str = "",
    command: str = "",
    progress: ProgressCallback | None = None,
) -> list[FigureEntry]:
    """One row per image, one column per shift: view A with its matched tokens coloured by category.

    Parameters
    ----------
    doc : dict
        A crop-shift result (:func:`~posvit_cli.core.measure.shift.read_shift_result`).
    outdir : path
        Folder the PNG is written to.
    indices : sequence of int, optional
        Images of ``doc["images"]`` to draw (default: the first four).
    image_dir : str, optional
        Folder searched first for the images (by file name).

    Returns
    -------
    list of FigureEntry
        One entry; its numbers hold the drawn images' fractions per shift and the summary over all images.
    """
    run = report(progress)
    entries = doc["images"]
    indices = list(indices) if indices is not None else list(range(min(4, len(entries))))
    shifts = doc["settings"]["shifts"]
    rows, labels, missing = [], [], 0
    for j, i in enumerate(indices):
        entry = entries[i]
        pixels = _processed_pixels(entry, doc, image_dir)
        row = []
        for block in entry["shifts"]:
            cats = np.asarray(block["map"], dtype=np.int8)
            base = _view_a(pixels, block, int(doc["model"]["patch_size"]))
            missing += base is None
            hw = fit_size(cats.shape[0], cats.shape[1], panel_size)
            over = upsample(cats.astype(np.float32), hw, "nearest").round().astype(np.int8)
            if base is not None:
                base = upsample(base.astype(np.float32), hw, "bilinear").clip(0, 255).astype(np.uint8)
            row.append(Panel(category_rgb(over, base), title=_title(block)))
        rows.append(row)
        labels.append(f"{entry['name']}\n{entry['grid'][0]}×{entry['grid'][1]} tokens")
        run("drawing crop-shift maps", j + 1, len(indices))
    model = doc["model"]
    name = model.get("model") or "model"
    mods = "+".join(m["name"] for m in model.get("modifications") or [])
    label = " ".join(x for x in (name, "random" if model.get("weights") == "random" else "", mods) if x)
    summary = "; ".join(
        f"shift {s['shift'][0]},{s['shift'][1]}: content {s['fraction_content']['mean']:.2f}, absolute "
        f"{s['fraction_absolute']['mean']:.2f}" for s in doc["summary"])
    title = (f"Crop-shift correspondence ({doc['layer']}, {doc['settings']['mode']}) · {label}\n"
             f"{summary} (mean over {len(entries)} images)")
    legend = Legend([(CATEGORY_COLOURS[CONTENT], "content (same pixels)"),
                     (CATEGORY_COLOURS[ABSOLUTE], "absolute (same grid position)"),
                     (CATEGORY_COLOURS[OTHER], "other")], title="nearest neighbour in view B")
    footer = ("Each panel: view A as the encoder saw it; every token with a counterpart in view B (shifted by whole "
              "patches) is coloured by where its cosine nearest neighbour among all tokens of view B lies. "
              "Uncoloured: no counterpart. A position-free encoder is green throughout; red marks a positional code.")
    if missing:
        footer += f" {missing} panel(s) without the source image (not found): categories only."
    grid = PanelGrid(rows, title=title, row_labels=labels,
                     col_headers=[f"shift {s[0]},{s[1]}" for s in shifts], legend=legend, footer=footer)
    outdir = Path(outdir)
    path = outdir / f"shift_{slug(label)}_{slug(doc['layer'])}_{doc['settings']['mode']}.png"
    size = write_grid(grid, path, title.split("\n")[0])
    drawn = [{"name": entries[i]["name"], "shifts": [{k: v for k, v in b.items() if k != "map"}
                                                     for b in entries[i]["shifts"]]} for i in indices]
    caption = f"{len(indices)} of {len(entries)} images, layer {doc['layer']}, mode {doc['settings']['mode']}. {summary}."
    return [FigureEntry(path.relative_to(outdir).as_posix(), "shift", title.split("\n")[0], caption, [],
                        {"size": list(size), "source": source, "summary": doc["summary"], "images": drawn}, command)]


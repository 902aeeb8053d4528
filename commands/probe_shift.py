"""`posvit probe shift`: crop-shift correspondence of an encoder on images (a label-free positional diagnostic),
and `posvit viz shift`: its per-token maps drawn over the images."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Optional

import typer

from posvit_cli._cli import RichProgress, cli_context, command_line, console, emit_json, parse_csv
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    DebugOpt, DeviceOpt, IntensityOpt, JsonOpt, LayerOpt, ModelOpt, PositionFreeMethodOpt, PrecisionOpt, Precision,
    QuietOpt, RecursiveOpt, SeedOpt, SizeOpt, ThreadsOpt, WeightsOpt,
)


class ShiftMode(str, Enum):
    """The two views of a shift (see posvit_cli.core.measure.shift)."""

    crop = "crop"
    roll = "roll"


ShiftOpt = Annotated[Optional[list[str]], typer.Option("--shift", help="Offset DY,DX of view B from view A in whole patches (rows, columns); repeat for several shifts. Default: 2,3.", show_default=False)]


def shift(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, or .txt lists of paths.", show_default=False)],
    model: ModelOpt = None,
    weights: WeightsOpt = "pretrained",
    shifts: ShiftOpt = None,
    mode: Annotated[ShiftMode, typer.Option("--mode", help="crop: two same-size crops of the image, B offset by the shift (the overlap is scored). roll: the image and its torus roll by the shift (every token scored; a roll-equivariant encoder scores content 1 exactly).")] = ShiftMode.crop,
    size: SizeOpt = "native",
    intensity: IntensityOpt = "auto",
    max_side: Annotated[int, typer.Option("--max-side", min=1, help="Refuse images whose processed longer side exceeds this (px).")] = 2048,
    method: PositionFreeMethodOpt = None,
    layer: LayerOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the result (with per-token maps) as JSON to this file. Default: none.", show_default=False)] = None,
    recursive: RecursiveOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Crop-shift correspondence: do tokens follow the content or the grid when the image moves by whole patches?

    For every image, two views offset by --shift are encoded, and every token of view A with a counterpart in
    view B is matched to its cosine nearest neighbour among all tokens of B. Reports the fraction matched at the
    content-correct offset (a position-free encoder: 1), the fraction drawn to the same absolute grid position (a
    dominant position code: 1), the rest, and the mean distance in tokens from the match to the content-correct
    token; mean ± std over images. Needs no labels and no store: only images and the encoder.
    """
    with cli_context(debug, quiet):
        _shift(images, model, weights, shifts or ["2,3"], mode.value, size, intensity, max_side,
               method.value if method else None, layer, output, recursive, seed, device, precision.value, threads,
               json_out, quiet)


def _encoder(model, weights, method, seed, device):
    from posvit_cli.core.features.encoders import load_encoder, read_checkpoint_meta

    if model is None and not (weights not in ("pretrained", "random") and read_checkpoint_meta(weights)):
        model = "dinov2-s-reg"
    modifications = None
    if method:
        from posvit_cli.core.features.alibi import AlibiConfig

        modifications = [{"name": method, "config": AlibiConfig().to_dict() if method == "alibi" else {}}]
    return load_encoder(model, weights, device=str(device), seed=seed, modifications=modifications)


def _shift(images, model, weights, shift_specs, mode, size, intensity, max_side, method, layer, output, recursive,
           seed, device, precision, threads, json_out, quiet) -> None:
    from posvit_cli.core.device import resolve_device, resolve_precision, torch_threads
    from posvit_cli.core.io.images import list_images, parse_intensity
    from posvit_cli.core.io.preprocess import check_patch_multiple, parse_size
    from posvit_cli.core.measure.shift import parse_shift, shift_correspondence, shift_result_json, write_shift_result

    shifts = list(dict.fromkeys(parse_shift(s) for s in shift_specs))
    layers = parse_csv(layer)
    if len(layers) > 1:
        raise PosvitError("the crop-shift probe matches one layer: name one with --layer")
    mode_size = parse_size(size)
    parse_intensity(intensity)
    if output in ("", "-"):
        raise PosvitError("-o names a JSON file; use --json for standard output")
    if output and os.path.isdir(output):
        raise PosvitError(f"output '{output}' is a folder: -o names the JSON file to write")
    paths = list_images(images, recursive=recursive)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    encoder = _encoder(model, weights, method, seed, dev)
    if mode_size.kind in ("square", "crop"):
        check_patch_multiple(f"--size {mode_size}", mode_size.size, encoder.patch_size, encoder.name)
    (layer_name,) = encoder.layer_names(layers)
    with torch_threads(threads), RichProgress(quiet) as progress:
        result = shift_correspondence(encoder, paths, shifts=shifts, mode=mode, size=mode_size, intensity=intensity,
                                      layer=layer_name, device=dev, precision=prec, max_side=max_side,
                                      progress=progress)
    result["command"] = command_line()
    if output:
        write_shift_result(output, result)
    if not quiet:
        _print_table(result, output)
    if json_out:
        import sys

        sys.stdout.write(shift_result_json(result) + "\n")
        sys.stdout.flush()


def _fmt(block: dict, digits: int = 3) -> str:
    if block["mean"] is None:
        return "n/a"
    return f"{block['mean']:.{digits}f} ± {block['std']:.{digits}f}"


def _print_table(result: dict, output: str | None) -> None:
    from rich.table import Table

    s = result["settings"]
    m = result["model"]
    weights = "random weights" if m.get("weights") == "random" else ""
    mods = ", ".join(x["name"] for x in m.get("modifications") or [])
    what = " · ".join(x for x in (m.get("model"), weights, mods) if x)
    table = Table(title=f"posvit probe shift · {what} · layer {result['layer']} · {len(result['images'])} images · "
                        f"mode {s['mode']} · size {s['size']}", title_justify="left")
    for col in ("shift DY,DX", "tokens", "content", "absolute", "other", "displacement (tokens)", "chance"):
        table.add_column(col, justify="left" if col.startswith("shift") else "right")
    for row in result["summary"]:
        table.add_row(",".join(str(v) for v in row["shift"]), str(row["overlap_tokens"]), _fmt(row["fraction_content"]),
                      _fmt(row["fraction_absolute"]), _fmt(row["fraction_other"]), _fmt(row["displacement_error"], 2),
                      f"{row['chance']['mean']:.4f}")
    console.print(table)
    console.print("content: the nearest neighbour (cosine, among all tokens of view B) shows the same pixels; absolute: "
                  "it sits at the query's own grid position. A position-free encoder scores content near 1, absolute "
                  "near 0.", highlight=False, soft_wrap=True)
    if output:
        console.print(f"results → {output}")

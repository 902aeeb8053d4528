"""`posvit probe controls`: the positional probe of the same images with the position embedding zeroed, shuffled
across positions or shifted by whole patches (see posvit_cli.core.measure.pe_controls)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from posvit_cli._cli import RichProgress, cli_context, command_line, console, emit_json, parse_csv
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    DebugOpt, DeviceOpt, IntensityOpt, JsonOpt, LayerOpt, ModelOpt, PositionFreeMethodOpt, QuietOpt, RecursiveOpt,
    SeedOpt, SizeOpt, ThreadsOpt, WeightsOpt,
)

_COLUMNS = ("lr", "ud", "xy", "radial", "random")


def controls(
    images: Annotated[list[str], typer.Argument(help="Image files, folders, or .txt lists of paths (as for extract).", show_default=False)],
    model: ModelOpt = None,
    weights: WeightsOpt = "pretrained",
    method: PositionFreeMethodOpt = None,
    control_names: Annotated[str, typer.Option("--controls", "-c", help="Comma-separated controls besides the reference none: zero (no position code), shuffle (codes permuted across positions, seeded by --seed), shift (the grid of codes rolled by --shift patches).")] = "zero,shuffle,shift",
    shift: Annotated[str, typer.Option("--shift", help="DY,DX: whole patches the shift control rolls the position codes by (on the torus).")] = "2,3",
    layer: LayerOpt = None,
    size: SizeOpt = "native",
    intensity: IntensityOpt = "auto",
    max_side: Annotated[int, typer.Option("--max-side", min=1, help="Refuse images whose processed longer side exceeds this (px); the controls do not tile.")] = 2048,
    fraction: Annotated[Optional[float], typer.Option("--fraction", min=0.0, max=1.0, help="Fraction of each image's tokens drawn to train the probe. Default: 1/36 = 0.0278.", show_default=False)] = None,
    repeats: Annotated[Optional[int], typer.Option("--repeats", min=1, help="Fresh sampling masks per image. Default: 6.", show_default=False)] = None,
    seed: SeedOpt = 0,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the results as JSON to this file. Default: none.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    recursive: RecursiveOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Probe position with the position embedding zeroed, shuffled and shifted: where does position come from?

    Runs the encoder on the images once per control and fits the positional probe (whole-stack R², holdout
    protocol) to each run's tokens. A large R² drop under zero or shuffle means the position was read from the
    embedding; R² that survives is inferred from content or image borders. Learned pos_embed is controlled at the
    grid the model uses (after resampling); RoPE tables are permuted, rolled or set to the identity rotation.
    Models without position code (ALiBi/NoPE) are probed once and the controls reported as not applicable.
    """
    with cli_context(debug, quiet):
        _controls(images, model, weights, method.value if method else None, control_names, shift, layer, size, intensity, max_side, fraction, repeats,
                  seed, output, device, threads, recursive, json_out, quiet)


def _parse_shift(text: str) -> tuple[int, int]:
    try:
        values = [int(v) for v in parse_csv(text)]
    except ValueError:
        values = []
    if len(values) != 2:
        raise PosvitError(f"--shift takes two whole-patch offsets DY,DX such as 2,3, got '{text}'")
    return values[0], values[1]


def _controls(images, model, weights, method, control_names, shift, layer, size, intensity, max_side, fraction, repeats, seed,
              output, device, threads, recursive, json_out, quiet) -> None:
    import torch

    from posvit_cli.core.device import resolve_device
    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.fileio import json_text, write_text_atomic
    from posvit_cli.core.io.images import list_images, parse_intensity
    from posvit_cli.core.io.preprocess import parse_size
    from posvit_cli.core.measure.pe_controls import CONTROL_TARGETS, parse_controls, probe_controls
    from posvit_cli.core.measure.probe import make_settings

    # Every option is checked before the model is built and before anything is written.
    names = parse_controls(control_names)
    offsets = _parse_shift(shift)
    mode = parse_size(size)
    parse_intensity(intensity)
    settings, _ = make_settings("holdout", targets=CONTROL_TARGETS, fraction=fraction, repeats=repeats, seed=seed,
                                per_channel=False, extras=False)
    paths = list_images(images, recursive=recursive)
    if threads:
        torch.set_num_threads(threads)
    dev = str(resolve_device(device))
    modifications = None
    if method:
        from posvit_cli.core.features.alibi import AlibiConfig

        modifications = [{"name": method, "config": AlibiConfig().to_dict() if method == "alibi" else {}}]
    encoder = load_encoder(model or "dinov2-s-reg", weights, device=dev, seed=seed, modifications=modifications)
    with RichProgress(quiet) as progress:
        result = probe_controls(encoder, paths, controls=names, shift=offsets, layer=layer or "final", size=mode,
                                intensity=intensity, max_side=max_side, settings=settings, device=dev,
                                progress=progress)
    result["command"] = command_line()
    if output:
        write_text_atomic(output, json_text(result, indent=1) + "\n")
    if not quiet:
        _print_table(result, output)
    if json_out:
        emit_json(result)


def _cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.3f}±{stat['std']:.3f}"


def _print_table(result: dict, output: str | None) -> None:
    from rich.table import Table

    codes = ", ".join(result["position_encoding"])
    table = Table(title=f"whole-stack R² · {result['model']['model']} · {result['layer']} · position code: {codes} · "
                        f"{len(result['images'])} images", title_justify="left")
    table.add_column("control")
    for t in _COLUMNS:
        table.add_column(t, justify="right")
    table.add_column("drop xy", justify="right")
    for name, entry in result["controls"].items():
        if entry["status"] != "probed":
            table.add_row(name, *([entry["status"]] + [""] * len(_COLUMNS)))
            continue
        drop = entry["drop"].get("xy")
        table.add_row(name, *(_cell(entry["stack_r2"].get(t)) for t in _COLUMNS),
                      "–" if drop is None else f"{drop:+.3f}")
    console.print(table)
    if output:
        console.print(f"results → {output}")

"""`posvit probe`: how much absolute position is linearly decodable from a store's patch features."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, JsonOpt, QuietOpt, RichProgress, cli_context, command_line, console, parse_csv, store_input,
)
from posvit_cli.core.errors import PosvitError

_TARGETS_DEFAULT = "lr,ud,diag,radial,xy,random,raster"


def probe(
    store: Annotated[Optional[str], typer.Argument(help="Feature store (.h5, .zarr, .zarr.zip), or - / nothing to read a piped store.", show_default=False)] = None,
    targets: Annotated[str, typer.Option("--targets", "-t", help="Comma-separated targets: lr, ud, diag, radial, xy (joint x,y: mean of two R²) and the controls random, raster.")] = _TARGETS_DEFAULT,
    protocol: Annotated[str, typer.Option("--protocol", help="holdout: R² on tokens not used for training, one mask per repeat shared by all targets. dino-saw: the published setting (R² over all tokens, ridge alpha 1 on standardised features, step-6 random masks per target, 6 repeats, seed 100001).")] = "holdout",
    sampling: Annotated[Optional[str], typer.Option("--sampling", help="Training tokens: random (a fraction of the tokens), grid (every --step-th row and column), grid-holdout (grid inside the top-left --cutoff box; holdout tests on the tokens outside it). Default: random.")] = None,
    fraction: Annotated[Optional[float], typer.Option("--fraction", help="Fraction of tokens drawn for training by random sampling. Default: 1/36 (dino-saw: 1/step²).")] = None,
    step: Annotated[Optional[int], typer.Option("--step", help="Grid spacing in tokens for grid sampling. Default: 6.")] = None,
    cutoff: Annotated[Optional[float], typer.Option("--cutoff", help="Side fraction of the sampling box (a centred box for radial). Default: 1, or 0.7 for grid-holdout.")] = None,
    repeats: Annotated[Optional[int], typer.Option("--repeats", "-r", help="Fresh sampling masks per image. Default: 6.")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", "-a", help="Ridge strength on per-channel standardised features. Default: 1.")] = None,
    regressor: Annotated[Optional[str], typer.Option("--regressor", help="ridge (closed form) or ols (minimum-norm least squares). Default: ridge.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the masks and the random target. Default: 0 (dino-saw: 100001).")] = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Layer(s) to probe, comma-separated (final, block3, 3). Default: the store's default layer (final).")] = None,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="Probe every stored layer (a layers × channels fingerprint).")] = False,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Most positional channels kept per ramp (lr, ud, diag, radial); their union is reported.")] = 2,
    per_channel: Annotated[bool, typer.Option("--per-channel/--no-per-channel", help="Score every channel alone too.")] = True,
    extras: Annotated[bool, typer.Option("--extras/--no-extras", help="Also measure the 2-D coordinate RMSE and the token-index classifier accuracy.")] = True,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the results as JSON to this file. Default: none.")] = None,
    csv_path: Annotated[Optional[str], typer.Option("--csv", help="Write the per-channel R² of every layer and target as CSV to this file. Default: none.")] = None,
    device: Annotated[str, typer.Option("--device", help="Torch device for the solves: cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[int, typer.Option("--threads", help="Torch CPU threads for the solves (the per-image problems are small; more threads rarely help).")] = 1,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Probe positional bias: R² of linear probes of position ramps, per target, channel and layer.

    For every image, a linear regressor is fitted on a sample of its tokens (standardised channels) to each
    positional target and scored by R² on the held-out tokens (or, with --protocol dino-saw, on all tokens as
    published). Reports the whole-stack R² per target (mean ± std over images × repeats), the R² of every
    channel alone, the most positional channels, the 2-D coordinate RMSE and a token-index classifier's accuracy.
    """
    with cli_context(debug, quiet):
        # A semantic probe (class masks instead of position ramps, `--masks`) will branch off here.
        _positional(**locals())


def _positional(store, targets, protocol, sampling, fraction, step, cutoff, repeats, alpha, regressor, seed, layer,
                all_layers, top_k, per_channel, extras, output, csv_path, device, threads, json_out, quiet, **_):
    import warnings

    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.probe import (
        check_targets, make_settings, probe_result_json, probe_store, write_channel_csv, write_probe_result,
    )
    from posvit_cli.core.store import FeatureStore

    if layer and all_layers:
        raise PosvitError("give either --layer or --all-layers, not both")
    if threads < 1:
        raise PosvitError("--threads must be at least 1")
    if csv_path and not per_channel:
        raise PosvitError("--csv writes per-channel scores: drop --no-per-channel")
    target_list = check_targets(parse_csv(targets))
    settings, deviations = make_settings(
        protocol, targets=target_list, sampling=sampling, fraction=fraction, step=step, cutoff=cutoff,
        repeats=repeats, alpha=alpha, regressor=regressor, seed=seed, top_k=top_k, per_channel=per_channel,
        extras=extras,
    )
    if deviations:
        warnings.warn(f"--protocol dino-saw with {', '.join(deviations)}: not the published setting", PosvitWarning,
                      stacklevel=1)
    dev = _device(device)
    with FeatureStore(store_input(store)) as fs:
        if len(fs) == 0:
            raise PosvitError(f"'{fs.source}' holds no images: nothing to probe")
        if not fs.layers:
            raise PosvitError(
                f"'{fs.source}' holds no feature layers (a maps-only store: {', '.join(fs.map_names()) or 'no maps'}); "
                "probe a feature store"
            )
        layers = list(fs.layers) if all_layers else (parse_csv(layer) or None)
        with RichProgress(quiet) as progress:
            result = probe_store(fs, settings, layers=layers, device=dev, threads=threads, progress=progress)
    result["command"] = command_line()
    if output:
        write_probe_result(output, result)
    if csv_path:
        write_channel_csv(csv_path, result)
    if not quiet:
        _print_report(result, output, csv_path)
    if json_out:
        sys.stdout.write(probe_result_json(result) + "\n")
        sys.stdout.flush()


def _device(device: str) -> str:
    from posvit_cli.core.device import resolve_device

    return str(resolve_device(device))


def _fmt(mean, std=None, digits=3) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _print_report(result: dict, output: str | None, csv_path: str | None) -> None:
    import numpy as np
    from rich.table import Table

    s = result["settings"]
    st = result["store"]
    primary = result["primary_layer"]
    block = result["results"][primary]
    head = (
        f"posvit probe · {'stdin' if st['source'] == '-' else st['source']} · {st.get('model') or 'unknown model'} · layer {primary} · "
        f"{st['n_images']} images"
    )
    sub = (
        f"protocol {s['protocol']} ({s['evaluated_on']}), sampling {s['sampling']}"
        + (f" {s['fraction']:.4g}" if s["sampling"] == "random" else f" step {s['step']}")
        + (f" cutoff {s['cutoff']:g}" if s["cutoff"] < 1 else "")
        + f", {s['regressor']}" + (f" α={s['alpha']:g}" if s["regressor"] == "ridge" else "")
        + f", {s['repeats']} repeats, seed {s['seed']}"
    )
    if len(result["layers"]) > 1:
        lt = Table(title="stack R² (mean over images × repeats) per layer", title_justify="left")
        lt.add_column("layer")
        for t in s["targets"]:
            lt.add_column(t, justify="right")
        for ly in result["layers"]:
            lt.add_row(ly, *[_fmt(result["results"][ly]["stack_r2"][t]["mean"], digits=2) for t in s["targets"]])
        console.print(lt)
    table = Table(title=head, caption=sub, title_justify="left", caption_justify="left")
    table.add_column("target")
    table.add_column("stack R²", justify="right")
    has_channels = "channel_r2" in block
    if has_channels:
        table.add_column("best channel (R²)", justify="right")
        table.add_column(f"top-{s['top_k']} channels")
    for t in s["targets"]:
        row = [t + (" (control)" if t in ("random", "raster") else ""),
               _fmt(block["stack_r2"][t]["mean"], block["stack_r2"][t]["std"])]
        if has_channels:
            mean = np.array([np.nan if v is None else v for v in block["channel_r2"][t]["mean"]], dtype=float)
            if np.isfinite(mean).any():
                order = np.argsort(-np.where(np.isfinite(mean), mean, -np.inf), kind="stable")
                row += [f"{order[0]} ({mean[order[0]]:.3f})", ", ".join(str(c) for c in order[: s["top_k"]])]
            else:
                row += ["n/a", ""]
        table.add_row(*row)
    console.print(table)
    if has_channels and block.get("positional_channels") is not None:
        console.print(f"most positional channels (top-{s['top_k']} of each ramp, union): {block['positional_channels']}")
    rm = block.get("coordinate_rmse")
    if rm and rm.get("mean") is not None:
        console.print(f"2-D coordinate RMSE: {_fmt(rm['mean'], rm['std'], 2)} patches (constant prediction: {rm['chance_mean']:.2f})")
    acc = block.get("position_accuracy")
    if acc:
        if acc.get("mean") is None:
            console.print(f"token-index classifier: not measured ({acc.get('reason')})")
        else:
            console.print(
                f"token-index classifier accuracy: {_fmt(acc['mean'], acc['std'])} "
                f"(within one token {acc['within_one_mean']:.3f}; chance {acc['chance_mean']:.4f})"
            )
    rnd = block["stack_r2"].get("random", {}).get("mean")
    if rnd is not None and rnd < -0.2:
        console.print(
            f"[yellow]note:[/] the random-target control scores {rnd:.2f}, not 0: with few training tokens against "
            "many channels the ridge null is negative. Compare ramps with this control (or raise --alpha / --fraction).",
            markup=True,
        )
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", markup=True)
    if output:
        console.print(f"results → {output}")
    if csv_path:
        console.print(f"per-channel scores → {csv_path}")

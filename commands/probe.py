"""`posvit probe`: how much absolute position is linearly decodable from a store's patch features
(``posvit probe STORE``, short for ``posvit probe positional STORE``), and how much semantics a linear head still
reads from them (``posvit probe semantic STORE --masks DIR``)."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Annotated, Optional

import click
import typer

from posvit_cli._cli import (
    PosvitCommand, PosvitGroup, RichProgress, cli_context, command_line, console, parse_class_names, parse_csv, store_input,
)
from posvit_cli.commands import probe_controls as probe_controls_cmd
from posvit_cli.commands import probe_shift as probe_shift_cmd
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    ClassNamesOpt, DebugOpt, DeviceOpt, IgnoreIndexOpt, JsonOpt, LayerOpt, MasksOpt, NormKOpt, QuietOpt, SeedOpt,
    StoreArg, ThreadsOpt, deprecated_option, warn_deprecated,
)
from posvit_cli.core.measure.norms import DEFAULT_K

_TARGETS_DEFAULT = "lr,ud,diag,radial,xy,random,raster"
_POSITIONAL = "positional"
_SEMANTIC = "semantic"
# Set on the context by the group when the old one-command spelling routes to the semantic probe; the command
# reports it inside cli_context so that the warning prints like every other.
_OLD_SEMANTIC_SPELLING = "posvit.probe.old_semantic_spelling"


class Protocol(str, Enum):
    holdout = "holdout"
    dino_saw = "dino-saw"


class Sampling(str, Enum):
    random = "random"
    grid = "grid"
    grid_holdout = "grid-holdout"


class Regressor(str, Enum):
    ridge = "ridge"
    ols = "ols"


class Head(str, Enum):
    linear = "linear"
    ridge = "ridge"


class Resolution(str, Enum):
    tokens = "tokens"
    pixels = "pixels"


class _DefaultPositional(PosvitGroup):
    """``probe`` with the positional probe as its default subcommand.

    ``posvit probe STORE ...`` (and ``posvit probe`` reading a piped store, and ``posvit probe --help``) run
    ``probe positional``: the first argument is not a subcommand name. The one-command spelling of the last release,
    ``posvit probe STORE --masks DIR`` (or ``--semantic``), runs ``probe semantic`` and warns.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            if any(a == "--masks" or a.startswith("--masks=") or a == "--semantic" for a in args):
                ctx.meta[_OLD_SEMANTIC_SPELLING] = True
                args = [_SEMANTIC, *(a for a in args if a != "--semantic")]
            else:
                args = [_POSITIONAL, *args]
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        # The two probes of a store first, then the probes that run an encoder on images, in registration order.
        return [_POSITIONAL, _SEMANTIC, *(name for name in self.commands if name not in (_POSITIONAL, _SEMANTIC))]


app = typer.Typer(cls=_DefaultPositional, context_settings={"help_option_names": ["-h", "--help"]},
                  help="Probe positional bias (the default subcommand), semantic retention, crop-shift correspondence or position-embedding controls.")


@app.command(_POSITIONAL, cls=PosvitCommand,
             epilog="posvit probe STORE is short for posvit probe positional STORE. "
             "The semantic probe: posvit probe semantic STORE --masks DIR. Probes that run an encoder on images: "
             "posvit probe shift IMAGES -m MODEL (crop-shift correspondence) and posvit probe controls IMAGES -m "
             "MODEL (position-embedding controls). See each one's --help.")
def positional(
    store: StoreArg = None,
    targets: Annotated[str, typer.Option("--targets", "-t", help="Comma-separated targets: lr, ud, diag, radial, xy (joint x,y: mean of two R²) and the controls random, raster.")] = _TARGETS_DEFAULT,
    protocol: Annotated[Protocol, typer.Option("--protocol", help="holdout: R² on tokens not used for training, one mask per repeat shared by all targets. dino-saw: the published setting (R² over all tokens, ridge alpha 1 on standardised features, step-6 random masks per target, 6 repeats, seed 100001).")] = Protocol.holdout,
    sampling: Annotated[Optional[Sampling], typer.Option("--sampling", help="Training tokens: random (a fraction of the tokens), grid (every --step-th row and column), grid-holdout (grid inside the top-left --cutoff box; holdout tests on the tokens outside it). Default: random.", show_default=False)] = None,
    fraction: Annotated[Optional[float], typer.Option("--fraction", min=0.0, max=1.0, help="Fraction of tokens drawn for training by random sampling. Default: 1/36 = 0.0278 (dino-saw: 1/step²).", show_default=False)] = None,
    step: Annotated[Optional[int], typer.Option("--step", min=1, help="Grid spacing in tokens for grid sampling. Default: 6.", show_default=False)] = None,
    cutoff: Annotated[Optional[float], typer.Option("--cutoff", min=0.0, max=1.0, help="Side fraction of the sampling box (a centred box for radial). Default: 1, or 0.7 for grid-holdout.", show_default=False)] = None,
    repeats: Annotated[Optional[int], typer.Option("--repeats", min=1, help="Fresh sampling masks per image. Default: 6.", show_default=False)] = None,
    repeats_short: Annotated[Optional[int], deprecated_option("-r", min=1)] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", "-a", min=0.0, help="Ridge strength on per-channel standardised features (> 0). Default: 1.", show_default=False)] = None,
    regressor: Annotated[Optional[Regressor], typer.Option("--regressor", help="ridge (closed form) or ols (minimum-norm least squares). Default: ridge.", show_default=False)] = None,
    seed: SeedOpt = None,
    layer: LayerOpt = None,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="Probe every stored layer (a layers × channels fingerprint).")] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Most positional channels kept per ramp (lr, ud, diag, radial); their union is reported.")] = 2,
    top_k_short: Annotated[Optional[int], deprecated_option("-k", min=1)] = None,
    per_channel: Annotated[bool, typer.Option("--per-channel/--no-per-channel", help="Score every channel alone too.")] = True,
    extras: Annotated[bool, typer.Option("--extras/--no-extras", help="Also measure the 2-D coordinate RMSE and the token-index classifier accuracy.")] = True,
    token_norms: Annotated[bool, typer.Option("--token-norms/--no-token-norms", help="Also measure high-norm outlier tokens (the register artefact) on the primary layer: the token_norms section of the JSON.")] = True,
    norm_k: NormKOpt = DEFAULT_K,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the results as JSON to this file. Default: none.", show_default=False)] = None,
    csv_path: Annotated[Optional[str], typer.Option("--csv", help="Write the per-channel R² of every layer and target as CSV to this file. Default: none.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Probe positional bias: R² of linear probes of position ramps, per target, channel and layer.

    For every image, a linear regressor is fitted on a sample of its tokens (standardised channels) to each
    positional target and scored by R² on the held-out tokens (or, with --protocol dino-saw, on all tokens as
    published). Reports the whole-stack R² per target (mean ± std over images × repeats), the R² of every
    channel alone, the most positional channels, the 2-D coordinate RMSE and a token-index classifier's accuracy.
    For stores extracted with --tile, the ramps are also fitted within each tile (tile-frame R², a column of the
    table) and the tile periodicity (share of feature variance set by the position within the tile) is reported.

    --layer takes several layers, comma-separated. --seed defaults to 0 (dino-saw: 100001). --threads defaults
    to 1 here: the per-image solves are small, and intra-op threads on shared cores slow them down.
    """
    with cli_context(debug, quiet):
        if repeats_short is not None:
            warn_deprecated("-r (for --repeats)", "--repeats")
            repeats = repeats if repeats is not None else repeats_short
        if top_k_short is not None:
            warn_deprecated("-k (for --top-k)", "--top-k")
            top_k = top_k_short
        _positional(store, targets, protocol.value, sampling.value if sampling else None, fraction, step, cutoff,
                    repeats, alpha, regressor.value if regressor else None, seed, layer, all_layers, top_k,
                    per_channel, extras, output, csv_path, device, threads, json_out, quiet,
                    norm_k if token_norms else None)


@app.command(_SEMANTIC, cls=PosvitCommand)
def semantic(
    store: StoreArg = None,
    masks: MasksOpt = ...,
    val: Annotated[Optional[str], typer.Option("--val", help="Store of validation images to score (same model, weights and debiasing). Default: none: --test-fraction of the store's images are held out and scored.", show_default=False)] = None,
    val_masks: Annotated[Optional[str], typer.Option("--val-masks", help="Mask folder of the --val images. Default: --masks.", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", min=2, help="Number of classes; a mask label at or above it (other than --ignore-index) is an error. Default: the largest label + 1.", show_default=False)] = None,
    ignore_index: IgnoreIndexOpt = 255,
    class_names: ClassNamesOpt = None,
    resolution: Annotated[Resolution, typer.Option("--resolution", help="tokens: masks nearest-downsampled to the token grid (class at each patch centre), scored per token. pixels: logits bilinearly upsampled to the mask in the frame the encoder saw, scored per pixel (the published setting).")] = Resolution.tokens,
    head: Annotated[Head, typer.Option("--head", help="linear: batch norm + linear layer, AdamW, cross-entropy, early stopping (published). ridge: closed-form least squares on one-hot labels (one pass, no epochs).")] = Head.linear,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Most training epochs of the linear head.")] = 50,
    patience: Annotated[int, typer.Option("--patience", min=0, help="Stop after this many epochs without a lower loss on the early-stopping images (10 % of the training images); 0 trains all --epochs on all images.")] = 5,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")] = 1e-2,
    token_batch: Annotated[int, typer.Option("--token-batch", min=1, help="Tokens per optimiser step (smaller for small training sets: at least 20 steps per epoch).")] = 8192,
    batch_size_old: Annotated[Optional[int], deprecated_option("--batch-size", min=1)] = None,
    dropout: Annotated[float, typer.Option("--dropout", min=0.0, max=0.99, help="Dropout on the normalised channels (the published head drops channel maps with p 0.1; off here: it doubles the step time and a head of C × K weights on many tokens needs no such regulariser).")] = 0.0,
    max_train_tokens: Annotated[int, typer.Option("--max-train-tokens", min=1, help="Most training tokens held in memory (float16, tokens × channels × 2 bytes); beyond it every image gives the same fraction.")] = 1_000_000,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.0, max=1.0, help="Without --val: fraction of the images held out and scored (split by image, seeded).")] = 0.2,
    robustness: Annotated[Optional[list[str]], typer.Option("--robustness", help="Stores of the scored images made with `posvit extract --transform T` (repeat the option, or give a folder of such stores): the same head is scored on each, one mIoU per transform. Default: none.", show_default=False)] = None,
    alpha: Annotated[float, typer.Option("--alpha", "-a", min=0.0, help="Ridge strength of the ridge head (> 0).")] = 1.0,
    seed: SeedOpt = 0,
    layer: LayerOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the results as JSON to this file. Default: none.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    ctx: typer.Context = None,
) -> None:
    """Probe semantic retention: train a linear head on the stored features against class masks, score its mIoU.

    The head (batch norm + linear, or closed-form ridge) is trained on the store's features against the class
    masks and scored on --val (or held-out images) by mIoU from one dataset-wide confusion matrix; --robustness
    scores the same head on features of flipped, rotated or rolled images mapped back to the original frame.

    --threads defaults to 1 here: the head's products are small, and intra-op threads on shared cores slow them.
    """
    with cli_context(debug, quiet):
        if ctx is not None and ctx.meta.get(_OLD_SEMANTIC_SPELLING):
            warn_deprecated("posvit probe STORE --masks DIR", "posvit probe semantic STORE --masks DIR")
        if batch_size_old is not None:
            warn_deprecated("--batch-size (tokens per step of the semantic probe)", "--token-batch")
            token_batch = batch_size_old
        _semantic(store, str(masks), val, val_masks, num_classes, ignore_index, class_names, resolution.value,
                  head.value, epochs, patience, lr, weight_decay, token_batch, dropout, max_train_tokens,
                  test_fraction, robustness, alpha, seed, layer, output, device, threads, json_out, quiet)


def _robustness_stores(items) -> list[str]:
    """Store paths from --robustness values: paths, comma lists, or folders (every store inside, sorted)."""
    from pathlib import Path

    from posvit_cli.core.features.backends import is_store_path

    out: list[str] = []
    for item in items or []:
        for part in parse_csv(item):
            p = Path(part)
            if p.is_dir() and not is_store_path(p):
                found = sorted(str(c) for c in p.iterdir() if is_store_path(c))
                if not found:
                    raise PosvitError(f"--robustness folder '{part}' holds no feature stores (.h5, .zarr, .zarr.zip)")
                out.extend(found)
            else:
                out.append(part)
    return list(dict.fromkeys(out))


def _semantic(store, masks, val, val_masks, num_classes, ignore_index, class_names, resolution, head, epochs,
              patience, lr, weight_decay, token_batch, dropout, max_train_tokens, test_fraction, robustness, alpha,
              seed, layer, output, device, threads, json_out, quiet) -> None:
    import contextlib

    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.measure.probe import probe_result_json, write_probe_result
    from posvit_cli.core.measure.semantic import SemanticSettings, semantic_probe

    if val_masks and not val:
        raise PosvitError("--val-masks needs --val STORE (the validation images' features)")
    layers = parse_csv(layer)
    if len(layers) > 1:
        raise PosvitError("the semantic probe trains on one layer: name one with --layer")
    settings = SemanticSettings(
        head=head, resolution=resolution, epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay,
        batch_size=token_batch, dropout=dropout, alpha=alpha, test_fraction=test_fraction,
        max_train_tokens=max_train_tokens, seed=seed,
    ).validated()
    names = parse_class_names(class_names)
    dev = _device(device)
    paths = _robustness_stores(robustness)
    with contextlib.ExitStack() as stack:
        train = stack.enter_context(FeatureStore(store_input(store)))
        val_store = stack.enter_context(FeatureStore(val)) if val else None
        rob = [stack.enter_context(FeatureStore(p)) for p in paths]
        with RichProgress(quiet) as progress:
            result = semantic_probe(
                train, masks, settings, val_store=val_store, val_masks=val_masks, robustness=rob,
                num_classes=num_classes, ignore_index=None if ignore_index < 0 else ignore_index, class_names=names,
                layer=layers[0] if layers else None, device=dev, threads=threads, progress=progress,
            )
    result["command"] = command_line()
    if output:
        write_probe_result(output, result)
    if not quiet:
        _print_semantic(result, output)
    if json_out:
        sys.stdout.write(probe_result_json(result) + "\n")
        sys.stdout.flush()


def _print_semantic(result: dict, output: str | None) -> None:
    from rich.table import Table

    st = result["store"]["train"]
    res = result["results"]
    s = result["settings"]
    tr = result["training"]
    unit = "tokens" if s["resolution"] == "tokens" else "pixels"
    console.print(
        f"[bold]posvit probe semantic[/] · {'stdin' if st['source'] == '-' else st['source']} · "
        f"{st.get('model') or 'unknown model'} · layer {result['layer']} · {result['masks']['num_classes']} classes",
        markup=True,
    )
    console.print(
        f"{s['head']} head ({s['head_form']}) on {tr['samples']['used']} of {tr['samples']['available']} training "
        f"{tr['sample_kind']} of {len(result['split']['fit_images'])} images"
        + (f", {tr['epochs_run']} epochs (kept {tr['best_epoch']})" if s["head"] == "linear" else "")
        + f", {tr['seconds']:.1f} s; masks {s['masks']}"
    )
    console.print(f"scored on {result['split']['scored_on']}")
    table = Table()
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column(f"{unit} (ground truth)", justify="right")
    for name, v in res["iou_per_class"].items():
        table.add_row(name, "n/a" if v is None else f"{v:.3f}", str(res["pixels_per_class"][name]))
    table.add_row("mIoU", "n/a" if res["miou"] is None else f"{res['miou']:.3f}", str(res["pixels_scored"]))
    console.print(table)
    if res["pixel_accuracy"] is not None:
        console.print(f"accuracy {res['pixel_accuracy']:.3f}; mIoU from one confusion matrix over all "
                      f"{len(result['split']['scored_images'])} scored images (classes never in the ground truth "
                      "nor predicted are left out)")
    if result["robustness"]:
        rt = Table(title="robustness: the same head on features of transformed images, mapped back",
                   title_justify="left")
        rt.add_column("transform")
        rt.add_column("mIoU", justify="right")
        rt.add_column("Δ mIoU", justify="right")
        rt.add_column("accuracy", justify="right")
        rt.add_column("store")
        for row in result["robustness"]:
            d = row["delta_miou"]
            rt.add_row(row["transform"], _fmt(row["miou"]), "" if d is None else f"{d:+.3f}",
                       _fmt(row["pixel_accuracy"]), row["store"])
        console.print(rt)
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", markup=True)
    if output:
        console.print(f"results → {output}")


def _positional(store, targets, protocol, sampling, fraction, step, cutoff, repeats, alpha, regressor, seed, layer,
                all_layers, top_k, per_channel, extras, output, csv_path, device, threads, json_out, quiet,
                norm_k=None) -> None:
    import warnings

    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.measure.probe import (
        check_targets, make_settings, probe_result_json, probe_store, write_channel_csv, write_probe_result,
    )

    if layer and all_layers:
        raise PosvitError("give either --layer or --all-layers, not both")
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
            if norm_k is not None:
                from posvit_cli.core.measure.norms import store_token_norms

                # A separate banded pass over the primary layer: the probe's own numbers are left as they were.
                result["token_norms"] = store_token_norms(fs, layer=result["primary_layer"], k=norm_k,
                                                          progress=progress)
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


def _print_tile_frame(tile: dict | None, store: dict) -> None:
    """The periodicity line of a tiled store (nothing for an untiled one)."""
    tiling = (store.get("provenance") or {}).get("tiling")
    if tile:
        p = tile["periodicity"]
        chance = p.get("eta2_chance_mean")
        console.print(
            f"tile periodicity (share of feature variance set by the position within the tile, chance-corrected): "
            f"{_fmt(p['mean'], p['std'])} (raw η² {_fmt(p.get('eta2_mean'))}, its chance level "
            f"{_fmt(chance)}); tile-frame R²: ramps within each tile"
        )
    elif tiling:
        console.print(f"tile frame: no image was split into more than one tile ({tiling.get('tile')} px tiles)")


def _print_token_norms(tn: dict | None) -> None:
    """One line: how many images hold high-norm outlier tokens, their mean share and where they lie."""
    if not tn:
        return
    border = tn["border"]["ratio"]
    where = "" if border is None else f"; their border distance {border:.2f} × uniform (0 = all on the border)"
    console.print(
        f"token norms ({tn['layer']}): high-norm outliers (log norm > median + {tn['k']:g} robust SD) in "
        f"{tn['images_with_outliers']} of {tn['n_images']} images, mean share {100 * tn['mean_share']:.2f} % "
        f"(max {100 * tn['max_share']:.2f} %){where}",
        highlight=False,
    )


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
        tiled = any("tile_frame" in result["results"][ly] for ly in result["layers"])
        if tiled:
            lt.add_column("tile-frame xy", justify="right")
            lt.add_column("tile periodicity", justify="right")
        for ly in result["layers"]:
            tf = result["results"][ly].get("tile_frame") or {}
            extra = [_fmt((tf.get("stack_r2", {}).get("xy") or {}).get("mean"), digits=2),
                     _fmt((tf.get("periodicity") or {}).get("mean"), digits=2)] if tiled else []
            lt.add_row(ly, *[_fmt(result["results"][ly]["stack_r2"][t]["mean"], digits=2) for t in s["targets"]], *extra)
        console.print(lt)
    table = Table(title=head, caption=sub, title_justify="left", caption_justify="left")
    table.add_column("target")
    table.add_column("stack R²", justify="right")
    tile = block.get("tile_frame")
    if tile:
        table.add_column(f"tile-frame R² ({len(tile['images'])} tiled)", justify="right")
    has_channels = "channel_r2" in block
    if has_channels:
        table.add_column("best channel (R²)", justify="right")
        table.add_column(f"top-{s['top_k']} channels")
    for t in s["targets"]:
        row = [t + (" (control)" if t in ("random", "raster") else ""),
               _fmt(block["stack_r2"][t]["mean"], block["stack_r2"][t]["std"])]
        if tile:
            ts = tile["stack_r2"].get(t)
            row.append("" if ts is None else _fmt(ts["mean"], ts["std"]))
        if has_channels:
            mean = np.array([np.nan if v is None else v for v in block["channel_r2"][t]["mean"]], dtype=float)
            if np.isfinite(mean).any():
                order = np.argsort(-np.where(np.isfinite(mean), mean, -np.inf), kind="stable")
                row += [f"{order[0]} ({mean[order[0]]:.3f})", ", ".join(str(c) for c in order[: s["top_k"]])]
            else:
                row += ["n/a", ""]
        table.add_row(*row)
    console.print(table)
    _print_tile_frame(tile, st)
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
    _print_token_norms(result.get("token_norms"))
    for note in result.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", markup=True)
    if output:
        console.print(f"results → {output}")
    if csv_path:
        console.print(f"per-channel scores → {csv_path}")


# The probes that run an encoder on images (no store): listed after positional and semantic.
app.command("shift", cls=PosvitCommand)(probe_shift_cmd.shift)
app.command("controls", cls=PosvitCommand)(probe_controls_cmd.controls)

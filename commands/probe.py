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
    masks: Annotated[Optional[str], typer.Option("--masks", help="Semantic probe: folder of dense masks of the store's images (class indices 0..C-1, --ignore-index = unlabelled; matched by file stem; palette PNG, greyscale or integer TIFF; see docs/labels.md). Switches from the positional probe to a linear-probe segmentation. Default: none.", rich_help_panel="Semantic probe")] = None,
    semantic: Annotated[bool, typer.Option("--semantic", help="Ask for the semantic probe explicitly (it needs --masks).", rich_help_panel="Semantic probe")] = False,
    val: Annotated[Optional[str], typer.Option("--val", help="Store of validation images to score (same model, weights and debiasing). Default: none: --test-fraction of the store's images are held out and scored.", rich_help_panel="Semantic probe")] = None,
    val_masks: Annotated[Optional[str], typer.Option("--val-masks", help="Mask folder of the --val images. Default: --masks.", rich_help_panel="Semantic probe")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Number of classes; a mask label at or above it (other than --ignore-index) is an error. Default: the largest label + 1.", rich_help_panel="Semantic probe")] = None,
    ignore_index: Annotated[int, typer.Option("--ignore-index", help="Mask value that is never trained on or scored (VOC's 255 borders); -1 for none.", rich_help_panel="Semantic probe")] = 255,
    class_names: Annotated[Optional[str], typer.Option("--class-names", help="Comma-separated class names in label order (sets --num-classes). Default: 0, 1, ...", rich_help_panel="Semantic probe")] = None,
    resolution: Annotated[str, typer.Option("--resolution", help="tokens: masks nearest-downsampled to the token grid (class at each patch centre), scored per token. pixels: logits bilinearly upsampled to the mask in the frame the encoder saw, scored per pixel (the published setting).", rich_help_panel="Semantic probe")] = "tokens",
    head: Annotated[str, typer.Option("--head", help="linear: batch norm + linear layer, AdamW, cross-entropy, early stopping (published). ridge: closed-form least squares on one-hot labels (one pass, no epochs).", rich_help_panel="Semantic probe")] = "linear",
    epochs: Annotated[int, typer.Option("--epochs", help="Most training epochs of the linear head.", rich_help_panel="Semantic probe")] = 50,
    patience: Annotated[int, typer.Option("--patience", help="Stop after this many epochs without a lower loss on the early-stopping images (10 % of the training images); 0 trains all --epochs on all images.", rich_help_panel="Semantic probe")] = 5,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate.", rich_help_panel="Semantic probe")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.", rich_help_panel="Semantic probe")] = 1e-2,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tokens per optimiser step (smaller for small training sets: at least 20 steps per epoch).", rich_help_panel="Semantic probe")] = 8192,
    dropout: Annotated[float, typer.Option("--dropout", help="Dropout on the normalised channels (the published head drops channel maps with p 0.1; off here: it doubles the step time and a head of C × K weights on many tokens needs no such regulariser).", rich_help_panel="Semantic probe")] = 0.0,
    max_train_tokens: Annotated[int, typer.Option("--max-train-tokens", help="Most training tokens held in memory (float16, tokens × channels × 2 bytes); beyond it every image gives the same fraction.", rich_help_panel="Semantic probe")] = 1_000_000,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Without --val: fraction of the images held out and scored (split by image, seeded).", rich_help_panel="Semantic probe")] = 0.2,
    robustness: Annotated[Optional[list[str]], typer.Option("--robustness", help="Stores of the scored images made with `posvit extract --transform T` (repeat the option, or give a folder of such stores): the same head is scored on each, one mIoU per transform. Default: none.", rich_help_panel="Semantic probe")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    ctx: typer.Context = None,
) -> None:
    """Probe positional bias (R² of linear probes of position ramps), or, with --masks, semantic retention.

    For every image, a linear regressor is fitted on a sample of its tokens (standardised channels) to each
    positional target and scored by R² on the held-out tokens (or, with --protocol dino-saw, on all tokens as
    published). Reports the whole-stack R² per target (mean ± std over images × repeats), the R² of every
    channel alone, the most positional channels, the 2-D coordinate RMSE and a token-index classifier's accuracy.

    With --masks: a linear head (batch norm + linear) is trained on the stored features against the class masks
    and scored on --val (or held-out images) by mIoU from one dataset-wide confusion matrix; --robustness scores
    the same head on features of flipped, rotated or rolled images mapped back to the original frame.
    """
    with cli_context(debug, quiet):
        given = _given_options(ctx)
        if masks is not None or semantic:
            _semantic(**locals())
        else:
            semantic_only = sorted(given & _SEMANTIC_ONLY)
            if semantic_only:
                raise PosvitError(f"--{semantic_only[0].replace('_', '-')} belongs to the semantic probe: add --masks DIR")
            _positional(**locals())


_POSITIONAL_ONLY = {"targets", "protocol", "sampling", "fraction", "step", "cutoff", "repeats", "regressor",
                    "all_layers", "top_k", "per_channel", "extras", "csv_path"}
_SEMANTIC_ONLY = {"val", "val_masks", "num_classes", "ignore_index", "class_names", "resolution", "head", "epochs",
                  "patience", "lr", "weight_decay", "batch_size", "dropout", "max_train_tokens", "test_fraction",
                  "robustness"}
_OPTION_NAMES = {"csv_path": "csv", "top_k": "top-k", "all_layers": "all-layers", "per_channel": "per-channel"}


def _given_options(ctx) -> set[str]:
    if ctx is None:
        return set()
    out = set()
    for name in _POSITIONAL_ONLY | _SEMANTIC_ONLY:
        src = ctx.get_parameter_source(name)
        if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP"):
            out.add(name)
    return out


def _robustness_stores(items) -> list[str]:
    """Store paths from --robustness values: paths, comma lists, or folders (every store inside, sorted)."""
    from pathlib import Path

    suffixes = (".h5", ".hdf5", ".hdf", ".zarr", ".zarr.zip")
    out: list[str] = []
    for item in items or []:
        for part in parse_csv(item):
            p = Path(part)
            if p.is_dir() and not p.name.lower().endswith(".zarr"):
                found = sorted(str(c) for c in p.iterdir() if c.name.lower().endswith(suffixes))
                if not found:
                    raise PosvitError(f"--robustness folder '{part}' holds no feature stores (.h5, .zarr, .zarr.zip)")
                out.extend(found)
            else:
                out.append(part)
    return list(dict.fromkeys(out))


def _semantic(store, masks, val, val_masks, num_classes, ignore_index, class_names, resolution, head, epochs,
              patience, lr, weight_decay, batch_size, dropout, max_train_tokens, test_fraction, robustness, alpha,
              seed, layer, output, device, threads, json_out, quiet, given, **_):
    import contextlib

    from posvit_cli.core.measure.probe import probe_result_json, write_probe_result
    from posvit_cli.core.measure.semantic import SemanticSettings, semantic_probe
    from posvit_cli.core.features.store import FeatureStore

    if masks is None:
        raise PosvitError("--semantic needs --masks DIR (the class masks of the store's images)")
    positional_only = sorted(given & _POSITIONAL_ONLY)
    if positional_only:
        name = _OPTION_NAMES.get(positional_only[0], positional_only[0].replace("_", "-"))
        raise PosvitError(f"--{name} belongs to the positional probe: drop it or drop --masks")
    if val_masks and not val:
        raise PosvitError("--val-masks needs --val STORE (the validation images' features)")
    if threads < 1:
        raise PosvitError("--threads must be at least 1")
    layers = parse_csv(layer)
    if len(layers) > 1:
        raise PosvitError("the semantic probe trains on one layer: name one with --layer")
    settings = SemanticSettings(
        head=head, resolution=resolution, epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, dropout=dropout, alpha=1.0 if alpha is None else alpha, test_fraction=test_fraction,
        max_train_tokens=max_train_tokens, seed=0 if seed is None else seed,
    ).validated()
    names = parse_csv(class_names) if class_names else None
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
        f"[bold]posvit probe --masks[/] · {'stdin' if st['source'] == '-' else st['source']} · "
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
                all_layers, top_k, per_channel, extras, output, csv_path, device, threads, json_out, quiet, **_):
    import warnings

    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.measure.probe import (
        check_targets, make_settings, probe_result_json, probe_store, write_channel_csv, write_probe_result,
    )
    from posvit_cli.core.features.store import FeatureStore

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

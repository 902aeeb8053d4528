"""`posvit debias-train`: train a debiasing method; one command, one `--method`, one function per method family.

Methods:
- ``alibi`` / ``nope``: retrofit the encoder (2-D ALiBi attention bias, or no position encoding) and distil it to
  the original model on a folder of images (:func:`_train_retrofit`, core in :mod:`posvit_cli.core.debias.retrofit`).
- ``rasa``, ``blank``, ``svd``, ``tta``: debiasing heads for final patch tokens, trained on a feature store (RASA
  planes, channel blanking, constant-image SVD subspace) or written from settings (test-time transform averaging)
  (:func:`_train_head`, core in :mod:`posvit_cli.core.debias.rasa`, :mod:`posvit_cli.core.debias.baselines`,
  :mod:`posvit_cli.core.debias.heads`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, JsonOpt, QuietOpt, RichProgress, cli_context, command_line, console, emit_json, sigterm_as_interrupt,
)
from posvit_cli.core.errors import PosvitError

RETROFIT = "ALiBi / NoPE retrofit (--method alibi|nope)"
RETROFIT_RUN = "Retrofit: schedule, checkpoints and monitoring"
GENERAL = "General"
RASA = "RASA heads (--method rasa)"
HEADS = "Baselines (--method blank|svd|tta) and head files"


def debias_train(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="alibi/nope: training images (files, folders, .txt lists). rasa/blank/svd: a feature store of final tokens (a path, or piped in); rasa also takes images with --model (extracted once into --cache); tta: optional images for the before/after report.", show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help="alibi (2-D ALiBi retrofit + distillation), nope (no position encoding + distillation), rasa (RASA projection head), blank (zero the most positional channels), svd (remove the constant-image positional subspace), tta (test-time transform averaging).", rich_help_panel=GENERAL)] = "alibi",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Trained result: for alibi/nope a posvit encoder checkpoint (.safetensors) that `posvit extract --weights` loads alone. Required.", rich_help_panel=GENERAL)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Teacher encoder: a posvit name or timm ViT name. Default: dinov2-s-reg, or the model a posvit checkpoint in --weights names.", rich_help_panel=GENERAL)] = None,
    weights: Annotated[str, typer.Option("--weights", "-w", help="Teacher weights: pretrained, random (smoke tests) or a .safetensors/.pth file.", rich_help_panel=GENERAL)] = "pretrained",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data order, validation split, monitor noise and --weights random.", rich_help_panel=GENERAL)] = 0,
    device: Annotated[str, typer.Option("--device", help="Torch device: auto (CUDA if available), cpu, cuda, cuda:N. Under torchrun each rank takes cuda:LOCAL_RANK.", rich_help_panel=GENERAL)] = "auto",
    precision: Annotated[str, typer.Option("--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.", rich_help_panel=GENERAL)] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch CPU threads. Default: torch's choice.", rich_help_panel=GENERAL)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output and start its run folder afresh.", rich_help_panel=GENERAL)] = False,
    # -- retrofit -----------------------------------------------------------------------------------------
    slopes: Annotated[str, typer.Option("--slopes", help="ALiBi slope per head: constant (m for all heads, published), geometric (2^(-8(h+1)/H)) or learned (trainable, starts at m).", rich_help_panel=RETROFIT)] = "constant",
    slope: Annotated[float, typer.Option("--slope", help="The constant slope m (initial value for learned slopes).", rich_help_panel=RETROFIT)] = 1.0,
    distance: Annotated[str, typer.Option("--distance", help="Token distance: euclidean or manhattan.", rich_help_panel=RETROFIT)] = "euclidean",
    wrap: Annotated[bool, typer.Option("--wrap/--no-wrap", help="Distances on a torus (wrap-around), which makes the model roll-equivariant.", rich_help_panel=RETROFIT)] = True,
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize", help="Divide distances by their maximum on the grid (bias in [-m, 0] at any resolution).", rich_help_panel=RETROFIT)] = True,
    blank: Annotated[str, typer.Option("--blank", help="Teacher channels zeroed in the targets: auto (top-2 per ramp on the monitor images), none, a list such as 47,113,117,359, or a `posvit probe` result .json.", rich_help_panel=RETROFIT)] = "auto",
    loss: Annotated[str, typer.Option("--loss", help="Distillation loss on patch tokens: cosine (mean 1 - cos) or mse.", rich_help_panel=RETROFIT)] = "cosine",
    gram_weight: Annotated[float, typer.Option("--gram-weight", help="Weight of the Gram anchor (patch-similarity structure, DINOv3); 0 = off.", rich_help_panel=RETROFIT)] = 0.0,
    student_init: Annotated[Optional[Path], typer.Option("--student-init", help="Start the student from this retrofitted posvit checkpoint (e.g. a 224 px result before a 518 px stage). Default: a copy of the teacher.", rich_help_panel=RETROFIT)] = None,
    teacher_store: Annotated[Optional[list[Path]], typer.Option("--teacher-store", help="Feature store of the teacher (`posvit extract --size crop:N`) used as targets for stages of size N instead of teacher passes. Repeatable.", rich_help_panel=RETROFIT)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Search image folders recursively.", rich_help_panel=RETROFIT)] = False,
    skip_unreadable: Annotated[bool, typer.Option("--skip-unreadable", help="Drop images that cannot be decoded (with a warning) instead of stopping.", rich_help_panel=RETROFIT)] = False,
    intensity: Annotated[str, typer.Option("--intensity", help="Intensity scaling: auto, dtype, minmax, percentile:LO,HI.", rich_help_panel=RETROFIT)] = "auto",
    # -- schedule, checkpoints, monitor ---------------------------------------------------------------------
    stages: Annotated[str, typer.Option("--stages", help="Training stages SIZE:EPOCHS (shortest-side resize + centre crop to SIZE px; fractional epochs allowed).", rich_help_panel=RETROFIT_RUN)] = "224:15,518:1",
    lr: Annotated[Optional[str], typer.Option("--lr", help="Learning rate, one or one per stage. Default: 1e-4 for the first stage, 1e-5 after.", rich_help_panel=RETROFIT_RUN)] = None,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", "-b", help="Global batch (images per optimiser step, all processes), one or one per stage. Default: 256 for the first stage, 32 after.", rich_help_panel=RETROFIT_RUN)] = None,
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Images per forward pass and process; larger batches accumulate gradients.", rich_help_panel=RETROFIT_RUN)] = 32,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.", rich_help_panel=RETROFIT_RUN)] = 0.01,
    warmup: Annotated[float, typer.Option("--warmup", help="Linear warm-up over this fraction of each stage's steps.", rich_help_panel=RETROFIT_RUN)] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="Learning rate after warm-up: constant (published) or cosine.", rich_help_panel=RETROFIT_RUN)] = "constant",
    min_lr_ratio: Annotated[float, typer.Option("--min-lr-ratio", help="Cosine schedule: final learning rate as a fraction of the peak.", rich_help_panel=RETROFIT_RUN)] = 0.0,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm to this value; 0 = off (published).", rich_help_panel=RETROFIT_RUN)] = 0.0,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile student and teacher (worth it on CUDA for long runs).", rich_help_panel=RETROFIT_RUN)] = False,
    workers: Annotated[int, typer.Option("--workers", help="Image decoding processes (0 = in the training process).", rich_help_panel=RETROFIT_RUN)] = 2,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Fraction of the images held out for the validation loss.", rich_help_panel=RETROFIT_RUN)] = 0.05,
    val_max: Annotated[int, typer.Option("--val-max", help="At most this many validation images.", rich_help_panel=RETROFIT_RUN)] = 500,
    monitor_images: Annotated[Optional[str], typer.Option("--monitor-images", help="Homogeneous images (folder, files or .txt list) for the positional stack-R2 monitor and --blank auto. Default: 4 uniform-noise images of 518 px.", rich_help_panel=RETROFIT_RUN)] = None,
    monitor_size: Annotated[str, typer.Option("--monitor-size", help="Resize of monitor images: native (own size, rounded down to patch multiples, as published), stage (the stage's crop), short:N, long:N, square:N or crop:N.", rich_help_panel=RETROFIT_RUN)] = "native",
    monitor_fraction: Annotated[float, typer.Option("--monitor-fraction", help="Fraction of a monitor image's tokens the stack-R2 probe trains on (published: 1/36 = 0.0278).", rich_help_panel=RETROFIT_RUN)] = 1 / 36,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Validation loss and stack R2 every N steps (and at each stage's end); 0 = stage ends only.", rich_help_panel=RETROFIT_RUN)] = 100,
    log_every: Annotated[int, typer.Option("--log-every", help="Training-loss rows in the log every N steps.", rich_help_panel=RETROFIT_RUN)] = 10,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Training state every N steps (and at each stage's end); 0 = stage ends only.", rich_help_panel=RETROFIT_RUN)] = 500,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep every training state, not only the last.", rich_help_panel=RETROFIT_RUN)] = False,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Folder for training states (last.pt) and log.csv. Default: the output path with suffix .train.", rich_help_panel=RETROFIT_RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue an interrupted run from its run folder or a state file (same options and images).", rich_help_panel=RETROFIT_RUN)] = None,
    # -- RASA heads ----------------------------------------------------------------------------------------
    rounds: Annotated[int, typer.Option("--rounds", help="Planes removed, one per round (Franca's code: 9; paper: 8).", rich_help_panel=RASA)] = 9,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per round.", rich_help_panel=RASA)] = 5,
    lr_head: Annotated[float, typer.Option("--lr-head", help="Peak AdamW learning rate of each round, cosine to 0, no weight decay (Franca's code: 2e-4; paper: 2e-3).", rich_help_panel=RASA)] = 2e-4,
    batch_images: Annotated[int, typer.Option("--batch-images", help="Images whose tokens make one optimiser step (steps per epoch = images / this, as the references).", rich_help_panel=RASA)] = 128,
    batching: Annotated[str, typer.Option("--batching", help="What a step trains on: tokens (random tokens of all images), images (all tokens of --batch-images images, shuffled each epoch) or images-in-order (the references' unshuffled batches).", rich_help_panel=RASA)] = "tokens",
    exact: Annotated[bool, typer.Option("--exact", help="Remove all planes with one exact orthogonal projector (QR of every plane vector) instead of one plane after another in training order (the references).", rich_help_panel=RASA)] = False,
    token_fraction: Annotated[float, typer.Option("--token-fraction", help="Fraction of the cached tokens each epoch uses (a fresh random subset per epoch).", rich_help_panel=RASA)] = 1.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens held in memory (float16: 2·D bytes each); larger stores are sampled evenly per image.", rich_help_panel=RASA)] = 4_000_000,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Images input: Franca's augmentations (random resized crop 0.25-1, colour jitter, greyscale, blur, flips, rot90); off: short-side resize + centre crop.", rich_help_panel=RASA)] = True,
    views: Annotated[int, typer.Option("--views", help="Images input: augmented views per image.", rich_help_panel=RASA)] = 1,
    crop: Annotated[int, typer.Option("--crop", help="Images input: side of the views in pixels (rounded down to the patch size).", rich_help_panel=RASA)] = 518,
    extract_batch: Annotated[int, typer.Option("--extract-batch", help="Images input: views per encoder forward pass.", rich_help_panel=RASA)] = 16,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Images input: store the extracted views here (reusable as the input of later runs). Default: OUTPUT with suffix .views.h5.", rich_help_panel=RASA)] = None,
    # -- baselines and head files ---------------------------------------------------------------------------
    head_format: Annotated[str, typer.Option("--head-format", help="posvit (.safetensors with metadata) or franca (pre_pos_layers.{i}.weight / pos_pred.weight; .safetensors, or .pth for Franca's own loader). rasa only for franca.", rich_help_panel=HEADS)] = "posvit",
    top_k: Annotated[int, typer.Option("--top-k", help="blank: channels taken per ramp (lr, ud, diag, radial) from a probe result or --blank auto; the channels come from --blank (auto = probe the input store, a list, or a `posvit probe` .json).", rich_help_panel=HEADS)] = 2,
    rank: Annotated[int, typer.Option("--rank", help="svd: singular vectors of the constant-image tokens removed (INSID3: 16).", rich_help_panel=HEADS)] = 16,
    size: Annotated[str, typer.Option("--size", help="svd: constant-image size N or HxW px (auto = the input store's most common image size, else 518); tta: resize rule of the report images as in `extract --size` (auto = native).", rich_help_panel=HEADS)] = "auto",
    transforms: Annotated[str, typer.Option("--transforms", help="tta: transforms averaged, comma-separated: flip-lr, flip-ud, rot90, rot180, rot270, roll:DY,DX (patches), compositions with +, and sets flips, rot90, d4, rolls:N, reference (identity, flip-lr, flip-ud, rot90).", rich_help_panel=HEADS)] = "reference",
    report_images: Annotated[int, typer.Option("--report-images", help="Images of the input on which the stack R2 is probed before and after the head (0 = no report).", rich_help_panel=HEADS)] = 16,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    ctx: typer.Context = None,
) -> None:
    """Train a debiasing method: ALiBi/NoPE retrofit of the encoder, or a RASA head and cheap baseline heads.

    alibi/nope: removes the encoder's position embedding (and RoPE), adds a 2-D ALiBi attention bias (alibi) or nothing (nope), and distils the result to the original model's patch tokens with the most positional channels zeroed, on a folder of images, in stages (224 px, then 518 px). Runs unchanged under `torchrun --nproc-per-node N`. Writes a posvit encoder checkpoint for `posvit extract --weights`.

    rasa/blank/svd/tta: write a head (.safetensors) for `posvit extract --head`, which cleans tokens as they are extracted or a stored store without re-extraction. rasa fits and removes 2-D planes that predict token position on cached final tokens (a feature store, or images extracted once with augmentations); blank zeroes the most positional channels; svd removes the subspace spanned by the tokens of a constant image; tta averages features over flips, rotations and torus rolls mapped back to the original frame. Reports probe's stack R2 before and after. On the CPU, rasa's round loop runs on one thread unless --threads is given.
    """
    with cli_context(debug, quiet):
        m = method.strip().lower()
        if m not in _METHODS:
            raise PosvitError(f"unknown --method '{method}': use {', '.join(_METHODS)}")
        _METHODS[m](**{**locals(), "method": m})


# --------------------------------------------------------------------------------------------------------------
# alibi / nope: retrofit and distil


def _train_retrofit(inputs, method, output, model, weights, seed, device, precision, threads, overwrite, slopes, slope,
                    distance, wrap, normalize, blank, loss, gram_weight, student_init, teacher_store, recursive,
                    skip_unreadable, intensity, stages, lr, batch_size, micro_batch, weight_decay, warmup, schedule,
                    min_lr_ratio, grad_clip, compile_model, workers, val_fraction, val_max, monitor_images,
                    monitor_size, monitor_fraction, eval_every, log_every, checkpoint_every, keep_checkpoints, run_dir, resume,
                    json_out, quiet, **_):
    import warnings

    import torch

    from posvit_cli.core.features.alibi import AlibiConfig
    from posvit_cli.core.device import resolve_device, resolve_precision
    from posvit_cli.core.debias.retrofit import (
        RetrofitConfig, check_images, parse_blank, parse_stages, setup_distributed, shutdown_distributed,
        train_retrofit,
    )
    from posvit_cli.core.features.encoders import load_encoder, read_checkpoint_meta
    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.io.images import list_images, parse_intensity, read_image

    if not inputs:
        raise PosvitError("name the training images: posvit debias-train --method alibi IMAGES/ -o student.safetensors")
    if not output:
        raise PosvitError("name the output checkpoint with -o student.safetensors")
    out = Path(output)
    if out.suffix != ".safetensors":
        raise PosvitError(f"-o '{output}': the retrofitted encoder is saved as .safetensors")
    run_path = Path(run_dir) if run_dir is not None else out.with_suffix(".train")
    if resume is None and not overwrite:
        if out.exists():
            raise PosvitError(f"'{out}' exists: pass --overwrite to replace it (or -o another file)")
        if (run_path / "last.pt").exists():
            raise PosvitError(
                f"a run already exists in '{run_path}': continue it with --resume {run_path}, or pass --overwrite"
            )
    if threads:
        torch.set_num_threads(threads)
    parse_intensity(intensity)

    config = RetrofitConfig(
        method=method,
        alibi=AlibiConfig(slopes=slopes, slope=slope, distance=distance, wrap=wrap, normalize=normalize),
        stages=parse_stages(stages, lr, batch_size),
        micro_batch=micro_batch, weight_decay=weight_decay, warmup=warmup, schedule=schedule,
        min_lr_ratio=min_lr_ratio, grad_clip=grad_clip, loss=loss, gram_weight=gram_weight, blank=parse_blank(blank),
        val_fraction=val_fraction, val_max=val_max, eval_every=eval_every, log_every=log_every,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, seed=seed, compile=compile_model,
        workers=workers, intensity=intensity, monitor_size=monitor_size, r2_fraction=monitor_fraction,
    )
    config.validate()

    dev = resolve_device(device)
    dist, dev = setup_distributed(dev)
    config.precision = resolve_precision(precision, dev)
    quiet = quiet or not dist.is_main
    try:
        paths = list_images(inputs, recursive=recursive)
        with RichProgress(quiet) as progress:
            bad = check_images(paths, progress=progress)
        if bad:
            if not skip_unreadable:
                raise PosvitError(
                    f"{len(bad)} of {len(paths)} images cannot be read (first: {bad[0][0]}: {bad[0][1]}); "
                    "remove them or pass --skip-unreadable"
                )
            for p, why in bad:
                warnings.warn(f"skipped unreadable image '{p}': {why}", PosvitWarning, stacklevel=1)
            drop = {p for p, _ in bad}
            paths = [p for p in paths if str(p) not in drop]
        monitor = None
        if monitor_images:
            monitor = [read_image(p) for p in list_images([monitor_images], recursive=recursive)]

        if model is None and not (weights not in ("pretrained", "random") and read_checkpoint_meta(weights)):
            model = "dinov2-s-reg"
        teacher = load_encoder(model, weights, device="cpu", seed=seed)
        if config.compile and dev.type != "cuda" and not quiet:
            console.print("[yellow]note:[/] --compile on CPU compiles for minutes before the first step", markup=True)

        def on_log(row: dict) -> None:
            if not quiet:
                _print_log_row(row)

        try:
            with RichProgress(quiet) as progress, sigterm_as_interrupt():
                result = train_retrofit(
                    teacher, paths, config, output=out, run_dir=run_path, resume=resume, student_init=student_init,
                    monitor=monitor, teacher_stores=[str(p) for p in (teacher_store or [])], dist=dist, device=dev,
                    progress=progress, on_log=on_log,
                )
        except KeyboardInterrupt:
            if dist.is_main and (run_path / "last.pt").exists():
                console.print(f"the last training state is in '{run_path}'; continue with --resume {run_path}")
            raise
    finally:
        shutdown_distributed()

    if not dist.is_main:
        return
    if not quiet:
        _print_summary(result, teacher, config)
    if json_out:
        emit_json({**result.as_dict(), "method": method, "command": command_line()})


def _fmt(v, nd=4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _print_log_row(row: dict) -> None:
    event = row.get("event")
    if event == "teacher":
        r2 = " ".join(f"{t} {_fmt(row.get(f'r2_{t}'), 3)}" for t in ("lr", "ud", "diag", "radial", "xy"))
        console.print(f"teacher at {row['size']} px: stack R2 {r2}; blanked channels {row['channels_blanked']}")
    elif event == "eval":
        r2 = " ".join(f"{t} {_fmt(row.get(f'r2_{t}'), 3)}" for t in ("lr", "ud", "diag", "radial", "xy"))
        console.print(
            f"step {row['step']} (stage {row['stage']}, {row['size']} px, epoch {row['epoch']:.2f}): "
            f"train {_fmt(row.get('train_loss'))} · val {_fmt(row.get('val_loss'))} · "
            f"cos {_fmt(row.get('val_cosine'))} · R2 {r2}"
        )


def _print_summary(result, teacher, config) -> None:
    from rich.table import Table

    t = Table(title=f"posvit debias-train --method {config.method} → {result.output}", show_header=False,
              title_justify="left")
    t.add_row("teacher", f"{teacher.name} ({teacher.embed_dim} channels, weights {teacher.weights})")
    if config.method == "alibi":
        a = config.alibi
        t.add_row("ALiBi", f"slopes {a.slopes} (m={a.slope}), {a.distance}, wrap {a.wrap}, normalize {a.normalize}")
    t.add_row("stages", ", ".join(f"{s.size} px × {s.epochs:g} ep (lr {s.lr:g}, batch {s.batch_size})"
                                  for s in config.stages))
    t.add_row("images", f"{result.train_images} train, {result.val_images} validation")
    t.add_row("blanked channels", str(result.channels_blanked))
    t.add_row("steps", str(result.steps))
    f = result.final
    t.add_row("final", f"val loss {_fmt(f.get('val_loss'))}, cos {_fmt(f.get('val_cosine'))}, "
                       f"stack R2 xy {_fmt(f.get('r2_xy'), 3)}")
    for size, r2 in result.teacher_r2.items():
        t.add_row(f"teacher R2 @{size}", f"xy {_fmt(r2.get('xy'), 3)}")
    t.add_row("log", result.log_csv)
    t.add_row("time", f"{result.seconds:.1f} s")
    console.print(t)


#: Training functions by --method. Feature-store methods (rasa, ...) add their own function here.
_METHODS = {
    "alibi": _train_retrofit,
    "nope": _train_retrofit,
}


# --------------------------------------------------------------------------------------------------------------
# rasa / blank / svd / tta: heads for final patch tokens


def _given(ctx, name: str) -> bool:
    """True when the user set option ``name`` on the command line (not its default)."""
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source.name != "DEFAULT"


def _head_inputs(inputs, method: str, blank: str, ctx) -> tuple[str | None, list[str]]:
    """Split the positional inputs into a feature store (path or '-') or a list of images.

    Without inputs, a piped stdin is read as the store only where the method needs one (rasa, blank auto, svd
    without --model); where it is optional, name it as ``-``.
    """
    import sys

    from posvit_cli.core.features.backends import is_store_path

    items = [str(i) for i in (inputs or [])]
    if not items:
        wants_store = (method == "rasa" or (method == "blank" and (blank or "auto").strip().lower() == "auto")
                       or (method == "svd" and not _given(ctx, "model")))
        if wants_store and not sys.stdin.isatty():
            return "-", []
        return None, []
    stores = [i for i in items if i == "-" or is_store_path(i)]
    if stores:
        if len(items) > 1:
            raise PosvitError(f"give one feature store (got {len(items)} inputs: {', '.join(items[:3])} ...)")
        return stores[0], []
    return None, items


def _train_head(inputs, method, output, model, weights, seed, device, precision, threads, overwrite, blank,
                recursive, skip_unreadable, intensity, rounds, epochs, lr_head, batch_images, batching, exact,
                token_fraction,
                max_tokens, augment, views, crop, extract_batch, cache, head_format, top_k, rank, size, transforms,
                report_images, json_out, quiet, ctx=None, **_):
    import time

    import torch

    from posvit_cli import __version__
    from posvit_cli.core.device import resolve_device, resolve_precision
    from posvit_cli.core.debias.heads import save_head

    t0 = time.perf_counter()
    if not output:
        raise PosvitError(f"name the head file with -o {method}.safetensors")
    out = Path(output)
    fmt = head_format.strip().lower()
    if fmt not in ("posvit", "franca"):
        raise PosvitError(f"unknown --head-format '{head_format}': use posvit or franca")
    if fmt == "franca" and method != "rasa":
        raise PosvitError("--head-format franca holds RASA planes only: use it with --method rasa")
    if out.suffix.lower() not in (".safetensors", ".pth", ".pt"):
        raise PosvitError(f"-o '{output}': heads are saved as .safetensors (or .pth with --head-format franca)")
    if out.suffix.lower() != ".safetensors" and fmt != "franca":
        raise PosvitError(f"-o '{output}': a .pth head is Franca's format: add --head-format franca, or use .safetensors")
    if out.exists() and not overwrite:
        raise PosvitError(f"'{out}' exists: pass --overwrite to replace it (or -o another file)")
    if not out.parent.exists():
        raise PosvitError(f"output folder '{out.parent}' does not exist")
    if report_images < 0:
        raise PosvitError(f"--report-images must be 0 or more, got {report_images}")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    store_src, images = _head_inputs(inputs, method, blank, ctx)
    args = dict(store_src=store_src, images=images, out=out, model=model, weights=weights, seed=seed, dev=dev,
                prec=prec, threads=threads, overwrite=overwrite, blank=blank, recursive=recursive, skip_unreadable=skip_unreadable,
                intensity=intensity, rounds=rounds, epochs=epochs, lr_head=lr_head, batch_images=batch_images,
                batching=batching,
                exact=exact, token_fraction=token_fraction, max_tokens=max_tokens, augment=augment, views=views,
                crop=crop, extract_batch=extract_batch, cache=cache, top_k=top_k, rank=rank, size=size,
                transforms=transforms, report_images=report_images, quiet=quiet, ctx=ctx)
    build = {"rasa": _head_rasa, "blank": _head_blank, "svd": _head_svd, "tta": _head_tta}[method]
    head, facts = build(**args)
    head.info.update({"posvit_version": __version__, "command": command_line(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    save_head(head, out, layout=fmt)
    seconds = time.perf_counter() - t0
    summary = {"method": method, "output": str(out), "head_format": fmt, "channels": head.channels,
               **head.summary(), **facts, "seconds": round(seconds, 3), "command": command_line()}
    if not quiet:
        _print_head_summary(summary)
    if json_out:
        emit_json(summary)


def _open_store(src: str):
    from posvit_cli.core.features.store import FeatureStore

    return FeatureStore(src)


def _backbone(prov: dict) -> dict:
    from posvit_cli.core.features.provenance import NETWORK_KEYS

    keys = NETWORK_KEYS + ("timm_name", "weights")  # what identifies the network, and how it was named
    return {k: prov.get(k) for k in keys if prov.get(k) is not None}


def _store_report(store, head, report_images: int, seed: int, quiet: bool) -> dict | None:
    """probe's stack R² before/after the head on up to ``report_images`` images of the store."""
    from posvit_cli.core.debias.baselines import report_indices, stack_r2_report

    if report_images == 0:
        return None
    idx = report_indices(len(store), report_images)
    usable = [i for i in idx if store.record(i).grid[0] * store.record(i).grid[1] >= 2]
    if not usable:
        return None
    images = [{"name": store.record(i).name, "path": store.record(i).path, "grid": list(store.record(i).grid)}
              for i in usable]
    with RichProgress(quiet) as progress:
        return stack_r2_report(lambda j: store.features(usable[j], "final"), images, apply=head.apply_numpy,
                               seed=seed, progress=progress)


def _require_final(store) -> None:
    if not store.layers:
        raise PosvitError(f"'{store.source}' holds no feature layers (a maps-only store)")
    if "final" not in store.layers:
        raise PosvitError(
            f"heads act on final tokens; '{store.source}' stores {', '.join(store.layers)}: extract with --layers final"
        )


def _head_rasa(store_src, images, out, model, weights, seed, dev, prec, threads, overwrite, recursive,
               skip_unreadable, intensity, rounds, epochs, lr_head, batch_images, batching, exact, token_fraction,
               max_tokens, augment, views, crop, extract_batch, cache, report_images, quiet, **_):
    from posvit_cli.core.debias.heads import ProjectionHead
    from posvit_cli.core.debias.rasa import RasaConfig, ViewOptions, load_token_cache, train_rasa

    config = RasaConfig(rounds=rounds, epochs=epochs, lr=lr_head, batch_images=batch_images,
                        batching=batching.strip().lower(), token_fraction=token_fraction, exact=exact,
                        seed=seed).validate()
    if max_tokens < 1:
        raise PosvitError(f"--max-tokens must be at least 1, got {max_tokens}")
    facts: dict = {}
    if store_src is None:
        if not images:
            raise PosvitError(
                "name the training data: a feature store (posvit extract IMAGES -o feats.h5) or images with --model"
            )
        view_opts = ViewOptions(crop=crop, views=views, augment=augment, intensity=intensity,
                                batch_size=extract_batch, precision=prec, seed=seed).validate()
        store_src, facts["views"] = _extract_views(images, out, model, weights, seed, dev, recursive,
                                                   skip_unreadable, intensity, view_opts, cache, overwrite, quiet)
    store = _open_store(store_src)
    try:
        _require_final(store)
        with RichProgress(quiet) as progress:
            token_cache = load_token_cache(store, max_tokens=max_tokens, seed=seed, device=dev, progress=progress)

            def on_round(log) -> None:
                if not quiet:
                    console.print(
                        f"round {log.round}/{config.rounds}: loss {log.loss:.4f} · coordinate MSE "
                        f"{log.probe_mse_before:.4f} → {log.probe_mse_after:.4f} (constant predictor "
                        f"{log.constant_mse:.4f}) · cos(raw, clean) {log.cosine:.4f}"
                    )

            result = train_rasa(token_cache, config, threads=threads or 1, progress=progress, on_round=on_round)
        prov = store.provenance
        info = {
            "backbone": _backbone(prov),
            "input": {"store": store.source, "images": len(store), "grids": token_cache.grids,
                      "size": list(_most_common_size(store)),
                      "preprocessing": store.preprocessing, "augmentation": prov.get("augmentation")},
            "training": {**config.as_dict(), "tokens": result.tokens, "tokens_sampled": token_cache.sampled,
                         "steps_per_round": result.steps_per_round, "device": str(dev),
                         "seconds": round(result.seconds, 3)},
            "rounds": [r.as_dict() for r in result.rounds],
        }
        head = ProjectionHead(result.planes, method="rasa", exact=exact, info=info)
        report = _store_report(store, head, report_images, seed, quiet)
    finally:
        store.close()
    head.info["report"] = report
    facts.update({"store": store_src, "images": info["input"]["images"], "tokens": result.tokens,
                  "rounds": info["rounds"], "report": report})
    return head, facts


def _extract_views(images, out, model, weights, seed, dev, recursive, skip_unreadable, intensity, view_opts,
                   cache, overwrite, quiet):
    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.io.images import list_images, parse_intensity
    from posvit_cli.core.debias.rasa import extract_views, view_provenance
    from posvit_cli.core.features.writer import StoreWriter

    parse_intensity(intensity)
    cache_path = Path(cache) if cache is not None else out.with_suffix(".views.h5")
    if cache_path.exists() and not overwrite:
        raise PosvitError(
            f"the view cache '{cache_path}' exists: train on it (posvit debias-train --method rasa {cache_path} ...) "
            "or pass --overwrite"
        )
    paths = list_images(images, recursive=recursive)
    encoder = load_encoder(model, weights, device=str(dev), seed=seed)
    writer = StoreWriter(cache_path, provenance=view_provenance(encoder, view_opts, command_line()), layers=["final"],
                         dtype="float16", overwrite=overwrite)
    try:
        with RichProgress(quiet) as progress, sigterm_as_interrupt():
            summary = extract_views(paths, encoder, writer, view_opts, device=dev, progress=progress)
    except BaseException:
        writer.abort()
        raise
    if summary["skipped"] and not skip_unreadable:
        writer.abort()
        p, why = summary["skipped"][0]
        raise PosvitError(f"{len(summary['skipped'])} images cannot be read (first: {p}: {why}); remove them or pass "
                          "--skip-unreadable")
    writer.update_provenance(extract_seconds=round(summary["seconds"], 3))
    writer.close(complete=True)
    if not quiet:
        console.print(f"extracted {summary['views']} views of {summary['images']} images with {encoder.name} → "
                      f"{cache_path} ({summary['seconds']:.1f} s)")
    return str(cache_path), {"cache": str(cache_path), "views": summary["views"], "images": summary["images"],
                             "seconds": round(summary["seconds"], 3)}


def _head_blank(store_src, blank, top_k, seed, report_images, quiet, **_):
    from posvit_cli.core.debias.baselines import store_positional_channels
    from posvit_cli.core.debias.heads import BlankHead
    from posvit_cli.core.measure.probe import positional_channels, read_probe_result

    if top_k < 1:
        raise PosvitError(f"--top-k must be at least 1, got {top_k}")
    spec = (blank or "auto").strip()
    store = _open_store(store_src) if store_src else None
    try:
        if store is not None:
            _require_final(store)
        width = store.channels if store is not None else None
        source = spec
        if spec.lower() == "auto":
            if store is None:
                raise PosvitError("--blank auto probes the input store: give a feature store, a channel list "
                                  "(--blank 47,113) or a probe result (--blank probe.json)")
            with RichProgress(quiet) as progress:
                channels, _ = store_positional_channels(store, top_k, seed=seed, progress=progress)
            source = f"auto: top {top_k} per ramp of `posvit probe` on {store.source}"
        elif spec.lower().endswith(".json") or Path(spec).is_file():
            result = read_probe_result(spec)
            channels = positional_channels(result, k=top_k)
            probed = (result.get("store") or {}).get("channels")
            if width is not None and probed and int(probed) != width:
                raise PosvitError(f"probe result '{spec}' is of {probed}-channel features; '{store.source}' has {width}")
            width = width or (int(probed) if probed else None)
            source = f"probe result {spec} (top {top_k} per ramp)"
        elif spec.lower() in ("none", ""):
            raise PosvitError("--blank none leaves nothing to blank: give auto, a channel list or a probe result")
        else:
            try:
                channels = sorted({int(v) for v in spec.split(",") if v.strip()})
            except ValueError:
                raise PosvitError(f"--blank '{spec}': use auto, channel indices (47,113) or a probe result .json") from None
        info = {"backbone": _backbone(store.provenance) if store is not None else {}, "channel_source": source}
        head = BlankHead(channels, width, info=info)
        report = _store_report(store, head, report_images, seed, quiet) if store is not None else None
    finally:
        if store is not None:
            store.close()
    head.info["report"] = report
    return head, {"store": store_src, "channels_zeroed": head.channels_zeroed, "channel_source": source,
                  "report": report}


def _most_common_size(store) -> tuple[int, int]:
    from collections import Counter

    return Counter(tuple(r.proc_size) for r in store.records).most_common(1)[0][0]


def _encoder_for(store, model, weights, seed, dev, ctx):
    """The encoder that made a store (from its provenance) unless --model/--weights are given."""
    from posvit_cli.core.features.encoders import load_encoder

    if _given(ctx, "model") or _given(ctx, "weights") or store is None:
        if store is None and not _given(ctx, "model"):
            raise PosvitError("svd needs the encoder: give the feature store it will clean, or --model (and --weights)")
        return load_encoder(model, weights, device=str(dev), seed=seed)
    if not store.model or store.model == "synthetic":
        raise PosvitError(f"'{store.source}' does not name the encoder that made it: pass --model and --weights")
    w = store.weights or "pretrained"
    if str(w).startswith("bundled:"):
        w = "pretrained"
    mods = store.modifications or None
    enc = load_encoder(store.model, w, device=str(dev), seed=seed, modifications=mods)
    sha = store.weights_sha256
    if sha and enc.weights_sha256 != sha:
        import warnings

        from posvit_cli.core.errors import PosvitWarning

        warnings.warn(
            f"the encoder loaded for svd ({enc.name}, weights {enc.weights}) differs from the one that made "
            f"'{store.source}' (sha256 {sha[:12]}… vs {enc.weights_sha256[:12]}…); pass --model/--weights/--seed",
            PosvitWarning, stacklevel=2,
        )
    return enc


def _head_svd(store_src, model, weights, seed, dev, prec, rank, size, report_images, quiet, ctx, **_):
    from posvit_cli.core.debias.baselines import constant_image_subspace, parse_image_size
    from posvit_cli.core.debias.heads import ProjectionHead

    if rank < 1:
        raise PosvitError(f"--rank must be at least 1, got {rank}")
    store = _open_store(store_src) if store_src else None
    try:
        if store is not None:
            _require_final(store)
        encoder = _encoder_for(store, model, weights, seed, dev, ctx)
        if store is not None and store.channels and store.channels != encoder.embed_dim:
            raise PosvitError(f"the encoder has {encoder.embed_dim} channels, '{store.source}' {store.channels}: "
                              "pass the --model that made the store")
        if size.strip().lower() == "auto":
            hw = _most_common_size(store) if store is not None else (518, 518)
            hw = (hw[0] - hw[0] % encoder.patch_size, hw[1] - hw[1] % encoder.patch_size)
        else:
            hw = parse_image_size(size, encoder.patch_size)
        basis, facts = constant_image_subspace(encoder, hw, rank, device=dev, precision=prec)
        info = {"backbone": _backbone(store.provenance if store is not None and not _given(ctx, "model")
                                      else encoder.provenance()),
                "input": {"size": list(hw)}, "svd": facts}
        head = ProjectionHead(basis[None], method="svd", exact=True, info=info)
        report = _store_report(store, head, report_images, seed, quiet) if store is not None else None
    finally:
        if store is not None:
            store.close()
    head.info["report"] = report
    return head, {"store": store_src, "size": list(hw), "rank": int(basis.shape[0]),
                  "explained": facts["explained"], "report": report}


def _head_tta(store_src, images, model, weights, seed, dev, prec, recursive, intensity, transforms, size,
              report_images, quiet, **_):
    import torch

    from posvit_cli.core.debias.baselines import report_indices, stack_r2_report
    from posvit_cli.core.device import autocast
    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.debias.heads import TTAHead
    from posvit_cli.core.io.images import list_images, read_image, to_channels, to_float
    from posvit_cli.core.io.preprocess import parse_size, resize_and_normalise

    if store_src is not None:
        raise PosvitError("tta runs the encoder on transformed images: give image files for the report (or no input "
                          "to only write the head), then `posvit extract IMAGES --head HEAD`")
    head = TTAHead(transforms, info={})
    report = None
    if images and report_images:
        paths = list_images(images, recursive=recursive)
        paths = [paths[i] for i in report_indices(len(paths), report_images)]
        encoder = load_encoder(model, weights, device=str(dev), seed=seed)
        head.info["backbone"] = _backbone(encoder.provenance())
        wrapped = head.wrap_encoder(encoder)
        mode = parse_size("native" if size.strip().lower() == "auto" else size)
        before, after, names = [], [], []
        with RichProgress(quiet) as progress:
            for k, p in enumerate(paths):
                img = to_channels(to_float(read_image(p), intensity), encoder.in_chans)
                x, _ = resize_and_normalise(img, mode, encoder.patch_size, encoder.mean, encoder.std)
                x = x[None].to(dev)
                with torch.inference_mode(), autocast(dev, prec):
                    before.append(encoder.forward_tokens(x, ["final"])[0]["final"][0].float().cpu().numpy())
                    after.append(wrapped.forward_tokens(x, ["final"])[0]["final"][0].float().cpu().numpy())
                names.append({"name": Path(p).stem, "path": str(p), "grid": list(before[-1].shape[:2])})
                progress("tta features", k + 1, len(paths))
            report = stack_r2_report(lambda i: before[i], names, read_after=lambda i: after[i], seed=seed,
                                     progress=progress)
        head.info["input"] = {"images": len(paths), "size": str(mode)}
    head.info["report"] = report
    return head, {"transforms": head.transforms, "report": report}


def _print_head_summary(s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"posvit debias-train --method {s['method']} → {s['output']}", show_header=False,
              title_justify="left")
    if s.get("store"):
        t.add_row("input", f"{s['store']}" + (f" ({s['images']} images, {s['tokens']} tokens)" if "tokens" in s else ""))
    if s.get("views"):
        v = s["views"]
        t.add_row("views", f"{v['views']} views of {v['images']} images → {v['cache']}")
    if s["method"] == "rasa":
        t.add_row("planes", f"{s['planes']} ({'exact projector' if s['exact'] else 'sequential, training order'}, "
                            f"rank {s['rank']})")
        if s.get("rounds"):
            last = s["rounds"][-1]
            t.add_row("coordinate MSE", f"{s['rounds'][0]['probe_mse_before']:.4f} → {last['probe_mse_after']:.4f} "
                                        f"(constant predictor {last['constant_mse']:.4f})")
            t.add_row("cos(raw, clean)", f"{last['cosine']:.4f}")
    elif s["method"] == "blank":
        t.add_row("channels zeroed", f"{s['channels_zeroed']} ({s['channel_source']})")
    elif s["method"] == "svd":
        t.add_row("subspace", f"rank {s['rank']} from a constant {s['size'][0]}×{s['size'][1]} px image "
                              f"({100 * s['explained']:.1f}% of its positional variance)")
    elif s["method"] == "tta":
        t.add_row("transforms", ", ".join(s["transforms"]))
    rep = s.get("report")
    if rep:
        for tgt in ("lr", "ud", "diag", "radial", "xy"):
            b, a = rep["before"].get(tgt), rep["after"].get(tgt)
            t.add_row(f"stack R2 {tgt}", f"{_fmt(b, 3)} → {_fmt(a, 3)}")
        t.add_row("report images", str(rep["images"]))
    t.add_row("head format", s["head_format"])
    t.add_row("time", f"{s['seconds']:.1f} s")
    console.print(t)


_METHODS.update({m: _train_head for m in ("rasa", "blank", "svd", "tta")})

"""`posvit debias-train`: train a debiasing method; one command, one `--method`, one function per method family.

Methods:
- ``alibi`` / ``nope``: retrofit the encoder (2-D ALiBi attention bias, or no position encoding) and distil it to
  the original model on a folder of images (:func:`_train_retrofit`, core in :mod:`posvit_cli.core.distill`).
- ``rasa``, ``blank``, ``svd``, ``tta``: feature-store based heads and baselines (not built yet).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, DeviceOpt, JsonOpt, QuietOpt, RichProgress, cli_context, command_line, console, emit_json,
)
from posvit_cli.core.errors import PosvitError

RETROFIT = "ALiBi / NoPE retrofit (--method alibi|nope)"
RETROFIT_RUN = "Retrofit: schedule, checkpoints and monitoring"
GENERAL = "General"

#: Methods another part of posvit will add to this command (feature-store based).
_PLANNED_METHODS = {
    "rasa": "RASA projection heads",
    "blank": "channel blanking",
    "svd": "positional-subspace (SVD) removal",
    "tta": "test-time transform averaging",
}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def debias_train(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="alibi/nope: training images (files, folders, .txt lists).", show_default=False)] = None,
    method: Annotated[str, typer.Option("--method", help="alibi (2-D ALiBi retrofit + distillation), nope (no position encoding + distillation); rasa, blank, svd, tta come later.", rich_help_panel=GENERAL)] = "alibi",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Trained result: for alibi/nope a posvit encoder checkpoint (.safetensors) that `posvit extract --weights` loads alone. Required.", rich_help_panel=GENERAL)] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Teacher encoder: a posvit name or timm ViT name.", rich_help_panel=GENERAL)] = "dinov2-s-reg",
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
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a debiasing method: ALiBi/NoPE retrofit of the encoder (now), RASA heads and baselines (later).

    alibi/nope: removes the encoder's position embedding (and RoPE), adds a 2-D ALiBi attention bias (alibi) or nothing (nope), and distils the result to the original model's patch tokens with the most positional channels zeroed, on a folder of images, in stages (224 px, then 518 px). Runs unchanged under `torchrun --nproc-per-node N`. Writes a posvit encoder checkpoint for `posvit extract --weights`.
    """
    with cli_context(debug, quiet):
        m = method.strip().lower()
        if m in _PLANNED_METHODS:
            raise PosvitError(f"--method {m} ({_PLANNED_METHODS[m]}) is not built yet; available: alibi, nope")
        if m not in _METHODS:
            raise PosvitError(f"unknown --method '{method}': use alibi or nope (rasa, blank, svd, tta are planned)")
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

    from posvit_cli.core.alibi import AlibiConfig
    from posvit_cli.core.device import resolve_device, resolve_precision
    from posvit_cli.core.distill import (
        RetrofitConfig, check_images, parse_blank, parse_stages, setup_distributed, shutdown_distributed,
        train_retrofit,
    )
    from posvit_cli.core.encoders import load_encoder
    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.images import list_images, parse_intensity, read_image

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

        teacher = load_encoder(model, weights, device="cpu", seed=seed)
        if config.compile and dev.type != "cuda" and not quiet:
            console.print("[yellow]note:[/] --compile on CPU compiles for minutes before the first step", markup=True)

        def on_log(row: dict) -> None:
            if not quiet:
                _print_log_row(row)

        old = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            with RichProgress(quiet) as progress:
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
            signal.signal(signal.SIGTERM, old)
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

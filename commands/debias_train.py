"""`posvit debias-train METHOD`: train a debiasing method; one subcommand per method, each with its own options.

- ``alibi`` / ``nope`` IMAGES: retrofit the encoder (2-D ALiBi attention bias, or no position encoding) and distil
  it to the original model (core: :mod:`posvit_cli.core.debias.retrofit`).
- ``rasa`` STORE|IMAGES, ``blank`` [STORE], ``svd`` [STORE], ``posmean`` STORE, ``tta`` [IMAGES]: debiasing heads
  for final patch tokens (core: :mod:`~posvit_cli.core.debias.rasa`, :mod:`~posvit_cli.core.debias.blank`,
  :mod:`~posvit_cli.core.debias.posmean`,
  :mod:`~posvit_cli.core.debias.svd`, :mod:`~posvit_cli.core.debias.tta`, :mod:`~posvit_cli.core.debias.heads`).

The old form ``posvit debias-train --method X ...`` still works for one release (:class:`MethodGroup` rewrites it
to ``posvit debias-train X ...`` and warns).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    PosvitCommand, RichProgress, cli_context, command_line, console, emit_json, sigterm_as_interrupt,
)
from posvit_cli.commands.debias_options import (
    IMAGE_METHODS, STORE_METHODS, Batching, CheckpointEveryOpt, CheckpointOutOpt, CompileOpt, Distance,
    DistanceOpt, EvalEveryOpt, Fill, GlobalBatchOpt, GradClipOpt, GramWeightOpt, HeadFormat, HeadOutOpt, HeadSizeOpt,
    ImagesArg, KeepCheckpointsOpt, LogEveryOpt, Loss, LossOpt, LrOpt, MethodGroup, MicroBatchOpt, MinLrRatioOpt,
    MonitorFractionOpt, MonitorImagesOpt, MonitorSizeOpt, NormalizeOpt, Precision, PrecisionOpt, ReportImagesOpt,
    ResumeOpt, RetrofitDeviceOpt, RetrofitOverwriteOpt, RetrofitSeedOpt, Rotation, RunDirOpt, Schedule,
    ScheduleOpt, SkipUnreadableOpt, SlopeOpt, Slopes, SlopesOpt, StagesOpt, StudentInitOpt, TargetBlankOpt,
    TeacherModelOpt, TeacherStoreOpt, TeacherWeightsOpt, ValFractionOpt, ValMaxOpt, WarmupOpt, WeightDecayOpt,
    WorkersOpt, WrapOpt,
)
from posvit_cli.commands.debias_tables import print_head_summary, print_log_row, print_summary
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    DebugOpt, DeviceOpt, IntensityOpt, JsonOpt, ModelOpt, OverwriteOpt, QuietOpt, RecursiveOpt, SeedOpt, StoreArg,
    ThreadsOpt, WeightsOpt, deprecated_option, warn_deprecated,
)

app = typer.Typer(
    name="debias-train",
    cls=MethodGroup,
    help="Train a debiasing method: `alibi`/`nope` retrofit the encoder on images; `rasa`, `blank`, `svd`, `posmean` "
         "and `tta` write a head for `posvit extract --head` (all but tta from a feature store).",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# ------------------------------------------------------------------------------------------------------------
# alibi / nope: retrofit and distil


@app.command("alibi", cls=PosvitCommand)
def alibi(
    images: ImagesArg,
    output: CheckpointOutOpt,
    model: TeacherModelOpt = None,
    weights: TeacherWeightsOpt = "pretrained",
    slopes: SlopesOpt = Slopes.constant,
    slope: SlopeOpt = 1.0,
    distance: DistanceOpt = Distance.euclidean,
    wrap: WrapOpt = True,
    normalize: NormalizeOpt = True,
    blank: TargetBlankOpt = "auto",
    loss: LossOpt = Loss.cosine,
    gram_weight: GramWeightOpt = 0.0,
    student_init: StudentInitOpt = None,
    teacher_store: TeacherStoreOpt = None,
    recursive: RecursiveOpt = False,
    skip_unreadable: SkipUnreadableOpt = False,
    intensity: IntensityOpt = "auto",
    stages: StagesOpt = "224:15,518:1",
    lr: LrOpt = None,
    batch_size: GlobalBatchOpt = None,
    micro_batch: MicroBatchOpt = 32,
    weight_decay: WeightDecayOpt = 0.01,
    warmup: WarmupOpt = 0.0,
    schedule: ScheduleOpt = Schedule.constant,
    min_lr_ratio: MinLrRatioOpt = 0.0,
    grad_clip: GradClipOpt = 0.0,
    compile_model: CompileOpt = False,
    workers: WorkersOpt = 2,
    val_fraction: ValFractionOpt = 0.05,
    val_max: ValMaxOpt = 500,
    monitor_images: MonitorImagesOpt = None,
    monitor_size: MonitorSizeOpt = "native",
    monitor_fraction: MonitorFractionOpt = 1 / 36,
    eval_every: EvalEveryOpt = 100,
    log_every: LogEveryOpt = 10,
    checkpoint_every: CheckpointEveryOpt = 500,
    keep_checkpoints: KeepCheckpointsOpt = False,
    run_dir: RunDirOpt = None,
    resume: ResumeOpt = None,
    seed: RetrofitSeedOpt = 0,
    device: RetrofitDeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    overwrite: RetrofitOverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Retrofit the encoder with a 2-D ALiBi attention bias and distil it to the original on images.

    Removes the encoder's position embedding (and RoPE), adds a 2-D ALiBi attention bias, and distils the result to the original model's patch tokens with the most positional channels zeroed, on a folder of images, in stages (224 px, then 518 px). Runs unchanged under `torchrun --nproc-per-node N`. Writes a posvit encoder checkpoint for `posvit extract --weights`.
    """
    from posvit_cli.core.debias.blank import parse_blank
    from posvit_cli.core.debias.retrofit import RetrofitConfig, parse_stages
    from posvit_cli.core.features.alibi import AlibiConfig

    with cli_context(debug, quiet):
        config = RetrofitConfig(
            method="alibi",
            alibi=AlibiConfig(slopes=slopes.value, slope=slope, distance=distance.value, wrap=wrap,
                              normalize=normalize),
            stages=parse_stages(stages, lr, batch_size), micro_batch=micro_batch, weight_decay=weight_decay,
            warmup=warmup, schedule=schedule.value, min_lr_ratio=min_lr_ratio, grad_clip=grad_clip, loss=loss.value,
            gram_weight=gram_weight, blank=parse_blank(blank), val_fraction=val_fraction, val_max=val_max,
            eval_every=eval_every, log_every=log_every, checkpoint_every=checkpoint_every,
            keep_checkpoints=keep_checkpoints, seed=seed, compile=compile_model, workers=workers,
            intensity=intensity, monitor_size=monitor_size, r2_fraction=monitor_fraction,
        )
        _run_retrofit(config, images=images, output=output, model=model, weights=weights, device=device,
                      precision=precision.value, threads=threads, overwrite=overwrite, student_init=student_init,
                      teacher_store=teacher_store, recursive=recursive, skip_unreadable=skip_unreadable,
                      monitor_images=monitor_images, run_dir=run_dir, resume=resume, json_out=json_out, quiet=quiet)


@app.command("nope", cls=PosvitCommand)
def nope(
    images: ImagesArg,
    output: CheckpointOutOpt,
    model: TeacherModelOpt = None,
    weights: TeacherWeightsOpt = "pretrained",
    blank: TargetBlankOpt = "auto",
    loss: LossOpt = Loss.cosine,
    gram_weight: GramWeightOpt = 0.0,
    student_init: StudentInitOpt = None,
    teacher_store: TeacherStoreOpt = None,
    recursive: RecursiveOpt = False,
    skip_unreadable: SkipUnreadableOpt = False,
    intensity: IntensityOpt = "auto",
    stages: StagesOpt = "224:15,518:1",
    lr: LrOpt = None,
    batch_size: GlobalBatchOpt = None,
    micro_batch: MicroBatchOpt = 32,
    weight_decay: WeightDecayOpt = 0.01,
    warmup: WarmupOpt = 0.0,
    schedule: ScheduleOpt = Schedule.constant,
    min_lr_ratio: MinLrRatioOpt = 0.0,
    grad_clip: GradClipOpt = 0.0,
    compile_model: CompileOpt = False,
    workers: WorkersOpt = 2,
    val_fraction: ValFractionOpt = 0.05,
    val_max: ValMaxOpt = 500,
    monitor_images: MonitorImagesOpt = None,
    monitor_size: MonitorSizeOpt = "native",
    monitor_fraction: MonitorFractionOpt = 1 / 36,
    eval_every: EvalEveryOpt = 100,
    log_every: LogEveryOpt = 10,
    checkpoint_every: CheckpointEveryOpt = 500,
    keep_checkpoints: KeepCheckpointsOpt = False,
    run_dir: RunDirOpt = None,
    resume: ResumeOpt = None,
    seed: RetrofitSeedOpt = 0,
    device: RetrofitDeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    overwrite: RetrofitOverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Retrofit the encoder without any position encoding (NoPE) and distil it to the original on images.

    As `alibi`, without an attention bias: the student's position embedding (and RoPE) is removed and nothing replaces it. Writes a posvit encoder checkpoint for `posvit extract --weights`.
    """
    from posvit_cli.core.debias.blank import parse_blank
    from posvit_cli.core.debias.retrofit import RetrofitConfig, parse_stages

    with cli_context(debug, quiet):
        config = RetrofitConfig(
            method="nope", stages=parse_stages(stages, lr, batch_size), micro_batch=micro_batch,
            weight_decay=weight_decay, warmup=warmup, schedule=schedule.value, min_lr_ratio=min_lr_ratio,
            grad_clip=grad_clip, loss=loss.value, gram_weight=gram_weight, blank=parse_blank(blank),
            val_fraction=val_fraction, val_max=val_max, eval_every=eval_every, log_every=log_every,
            checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, seed=seed, compile=compile_model,
            workers=workers, intensity=intensity, monitor_size=monitor_size, r2_fraction=monitor_fraction,
        )
        _run_retrofit(config, images=images, output=output, model=model, weights=weights, device=device,
                      precision=precision.value, threads=threads, overwrite=overwrite, student_init=student_init,
                      teacher_store=teacher_store, recursive=recursive, skip_unreadable=skip_unreadable,
                      monitor_images=monitor_images, run_dir=run_dir, resume=resume, json_out=json_out, quiet=quiet)


def _run_retrofit(config, *, images: list[str], output: Path, model: str | None, weights: str, device: str,
                  precision: str, threads: int | None, overwrite: bool, student_init: Path | None,
                  teacher_store: list[Path] | None, recursive: bool, skip_unreadable: bool,
                  monitor_images: str | None, run_dir: Path | None, resume: Path | None, json_out: bool,
                  quiet: bool) -> None:
    """Check the outputs and images, load the teacher, run :func:`train_retrofit` and report (rank 0 only)."""
    import warnings

    import torch

    from posvit_cli.core.debias.retrofit import check_images, setup_distributed, shutdown_distributed, train_retrofit
    from posvit_cli.core.device import resolve_device, resolve_precision
    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.features.encoders import load_encoder, read_checkpoint_meta
    from posvit_cli.core.io.images import list_images, parse_intensity, read_image

    from posvit_cli.core.features.backends import is_store_path

    stores = [str(i) for i in images if is_store_path(str(i))]
    if stores:  # else the store would be "checked" as an image and fail on the batch size or its decoding
        raise PosvitError(
            f"'{stores[0]}' is a feature store, but {config.method} retrofits the encoder on images: "
            f"{'|'.join(IMAGE_METHODS)} take images, {'|'.join(STORE_METHODS)} take a feature store "
            f"(e.g. posvit debias-train rasa {stores[0]} ...)"
        )
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
    parse_intensity(config.intensity)
    config.validate()

    dist, dev = setup_distributed(resolve_device(device))
    config.precision = resolve_precision(precision, dev)
    quiet = quiet or not dist.is_main
    try:
        paths = list_images(images, recursive=recursive)
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
        teacher = load_encoder(model, weights, device="cpu", seed=config.seed)
        if config.compile and dev.type != "cuda" and not quiet:
            console.print("[yellow]note:[/] --compile on CPU compiles for minutes before the first step", markup=True)

        def on_log(row: dict) -> None:
            if not quiet:
                print_log_row(row)

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
        print_summary(result, teacher, config)
    if json_out:
        emit_json({**result.as_dict(), "method": config.method, "command": command_line()})




# ------------------------------------------------------------------------------------------------------------
# rasa / blank / svd / tta: heads for final patch tokens

RASA = "RASA"
RasaInputsArg = Annotated[Optional[list[str]], typer.Argument(help="A feature store of final tokens (a path, or piped in), or images with --model (extracted once into --cache).", show_default=False)]


@app.command("rasa", cls=PosvitCommand)
def rasa(
    inputs: RasaInputsArg = None,
    output: HeadOutOpt = ...,
    model: ModelOpt = None,
    weights: WeightsOpt = "pretrained",
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Planes removed, one per round (Franca's code: 9; paper: 8).", rich_help_panel=RASA)] = 9,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Epochs per round.", rich_help_panel=RASA)] = 5,
    lr_head: Annotated[float, typer.Option("--lr-head", help="Peak AdamW learning rate of each round, cosine to 0, no weight decay (Franca's code: 2e-4; paper: 2e-3).", rich_help_panel=RASA)] = 2e-4,
    batch_images: Annotated[int, typer.Option("--batch-images", min=1, help="Images whose tokens make one optimiser step (steps per epoch = images / this, rounded up; rounded down with images-in-order, as the references).", rich_help_panel=RASA)] = 128,
    batching: Annotated[Batching, typer.Option("--batching", case_sensitive=False, help="What a step trains on: tokens (random tokens of all images), images (all tokens of --batch-images images, shuffled each epoch) or images-in-order (the references' unshuffled batches, the last partial batch dropped).", rich_help_panel=RASA)] = Batching.tokens,
    exact: Annotated[bool, typer.Option("--exact", help="Remove all planes with one exact orthogonal projector (QR of every plane vector) instead of one plane after another in training order (the references).", rich_help_panel=RASA)] = False,
    token_fraction: Annotated[float, typer.Option("--token-fraction", min=0.0, max=1.0, help="Fraction of the cached tokens each epoch uses, in (0, 1] (a fresh random subset per epoch).", rich_help_panel=RASA)] = 1.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens held in memory (float16: 2·D bytes each); larger stores are sampled evenly per image. One image gives at most 262,144 tokens (a seeded sample of larger ones).", rich_help_panel=RASA)] = 4_000_000,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Images input: Franca's augmentations (random resized crop 0.25-1, colour jitter, greyscale, blur, flips, rotation); off: short-side resize + centre crop.")] = True,
    rotation: Annotated[Rotation, typer.Option("--rotation", case_sensitive=False, help="Images input, with --augment: rotate half the views by any angle in [-90, 90] degrees (nearest neighbour, corners black: Franca's RandomRotation(90)) or by quarter-turns only (exactly +-90 degrees).")] = Rotation.any,
    views: Annotated[int, typer.Option("--views", min=1, help="Images input: augmented views per image.")] = 1,
    crop: Annotated[int, typer.Option("--crop", min=1, help="Images input: side of the views in pixels (rounded down to the patch size).")] = 518,
    extract_batch: Annotated[int, typer.Option("--extract-batch", min=1, help="Images input: views per encoder forward pass.")] = 16,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Images input: store the extracted views here (reusable as the input of later runs). Default: OUTPUT with suffix .views.h5.", show_default=False)] = None,
    recursive: RecursiveOpt = False,
    skip_unreadable: SkipUnreadableOpt = False,
    intensity: IntensityOpt = "auto",
    head_format: Annotated[HeadFormat, typer.Option("--head-format", case_sensitive=False, help="posvit (.safetensors with metadata) or franca (pre_pos_layers.{i}.weight / pos_pred.weight; .safetensors, or .pth for Franca's own loader).")] = HeadFormat.posvit,
    report_images: ReportImagesOpt = 16,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a RASA head: remove the 2-D planes that predict token position, one per round, from final tokens.

    Trains on cached final tokens: a feature store, or images extracted once with Franca's augmentations (with --model). Writes a head (.safetensors, or Franca's .pth with --head-format franca) for `posvit extract --head`, and reports probe's stack R2 before and after. On the CPU the round loop runs on one thread unless --threads is given.
    """
    from posvit_cli.core.debias.rasa import RasaConfig, ViewOptions

    with cli_context(debug, quiet):
        t0 = time.perf_counter()
        fmt = head_format.value
        out = _head_output(output, "rasa", fmt, overwrite)
        dev, prec = _compute(device, precision.value, threads)
        config = RasaConfig(rounds=rounds, epochs=epochs, lr=lr_head, batch_images=batch_images,
                            batching=batching.value, token_fraction=token_fraction, exact=exact, seed=seed).validate()
        store_src, images = _split_inputs(inputs, store_wanted=True)
        views_facts = None
        if store_src is None:
            if not images:
                raise PosvitError("name the training data: a feature store (posvit extract IMAGES -o feats.h5) or "
                                  "images with --model")
            view_opts = ViewOptions(crop=crop, views=views, augment=augment, rotation=rotation.value,
                                    intensity=intensity, batch_size=extract_batch, precision=prec,
                                    seed=seed).validate()
            cache_path = Path(cache) if cache is not None else out.with_suffix(".views.h5")
            store_src, views_facts = _extract_views(images, cache_path, model=model, weights=weights, seed=seed,
                                                    dev=dev, recursive=recursive, skip_unreadable=skip_unreadable,
                                                    view_opts=view_opts, overwrite=overwrite, quiet=quiet)
        head, facts = _rasa_head(store_src, config, max_tokens=max_tokens, threads=threads, dev=dev,
                                 report_images=report_images, seed=seed, quiet=quiet)
        if views_facts is not None:
            facts["views"] = views_facts
        _finish_head(head, facts, "rasa", out, fmt, t0, json_out=json_out, quiet=quiet)


@app.command("blank", cls=PosvitCommand)
def blank(
    store: StoreArg = None,
    output: HeadOutOpt = ...,
    channels: Annotated[str, typer.Option("--blank", help="Channels to zero: auto (probe the input store), a list such as 47,113,117,359, or a `posvit probe` result .json. `none` is refused: it would blank nothing.")] = "auto",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Channels taken per ramp (lr, ud, diag, radial) from a probe result or --blank auto.")] = 2,
    fill: Annotated[Fill, typer.Option("--fill", help="What the blanked channels become: zero, or mean (each channel's mean over every token of the input store, one pass).")] = Fill.zero,
    report_images: ReportImagesOpt = 16,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a blank head: zero the most positional channels of final tokens.

    The channels come from --blank: auto probes the input store (`posvit probe`'s top-k channels per ramp), or a channel list, or a `posvit probe` result. Writes a head (.safetensors) for `posvit extract --head`.
    """
    from posvit_cli.core.debias.blank import blank_channels
    from posvit_cli.core.debias.heads import BlankHead
    from posvit_cli.core.debias.posmean import store_means
    from posvit_cli.core.debias.report import backbone_info, require_final, store_report

    with cli_context(debug, quiet):
        t0 = time.perf_counter()
        out = _head_output(output, "blank", "posvit", overwrite)
        wants_store = channels.strip().lower() == "auto" or fill is Fill.mean
        store_src, _ = _split_inputs([store] if store else None, store_wanted=wants_store, images_allowed=False)
        fs = _open_store(store_src) if store_src else None
        try:
            if fs is not None:
                require_final(fs)
            with RichProgress(quiet) as progress:
                chans, width, source = blank_channels(channels, top_k=top_k, store=fs, seed=seed, progress=progress)
                values = None
                if fill is Fill.mean:
                    if fs is None:
                        raise PosvitError("--fill mean takes the channel means of the input store: give the store")
                    values = store_means(fs, progress=progress)["channel_mean"][sorted(set(chans))]
                head = BlankHead(chans, width, info={"backbone": backbone_info(fs.provenance) if fs else {},
                                                     "channel_source": source, "fill": fill.value},
                                 fill_values=values)
                report = store_report(fs, head, report_images, seed=seed, progress=progress) if fs else None
        finally:
            if fs is not None:
                fs.close()
        head.info["report"] = report
        _finish_head(head, {"store": store_src, "channels_zeroed": head.channels_zeroed, "channel_source": source,
                            "report": report}, "blank", out, "posvit", t0, json_out=json_out, quiet=quiet)


@app.command("posmean", cls=PosvitCommand)
def posmean(
    store: StoreArg = None,
    output: HeadOutOpt = ...,
    report_images: ReportImagesOpt = 16,
    seed: SeedOpt = 0,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a posmean head: subtract the dataset-mean token at each grid position (less its mean over positions).

    One pass over the store: every image, resampled (bilinear, token centres aligned) to the store's most common grid (at most 128x128 tokens), adds to a mean per position. The head subtracts that field, resampled to each image's grid, keeping the global mean token. Writes a head (.safetensors) for `posvit extract --head`.
    """
    from posvit_cli.core.debias.heads import PosMeanHead
    from posvit_cli.core.debias.posmean import reference_grid, store_means
    from posvit_cli.core.debias.report import backbone_info, require_final, store_report

    with cli_context(debug, quiet):
        t0 = time.perf_counter()
        out = _head_output(output, "posmean", "posvit", overwrite)
        store_src, _ = _split_inputs([store] if store else None, store_wanted=True, images_allowed=False)
        if store_src is None:
            raise PosvitError("posmean needs the feature store it will clean (a path, or piped in)")
        fs = _open_store(store_src)
        try:
            require_final(fs)
            grid = reference_grid(fs)
            with RichProgress(quiet) as progress:
                means = store_means(fs, grid, progress=progress)
                field = means["field"] - means["field"].mean(axis=(0, 1))
                head = PosMeanHead(field, info={
                    "backbone": backbone_info(fs.provenance),
                    "input": {"store": fs.source, "images": means["images"], "tokens": means["tokens"],
                              "grids": [list(g) for g in means["grids"]], "reference_grid": list(grid)},
                    "resampling": "bilinear, token centres aligned, clamped at the outer centres"})
                report = store_report(fs, head, report_images, seed=seed, progress=progress)
        finally:
            fs.close()
        head.info["report"] = report
        _finish_head(head, {"store": store_src, "images": means["images"], "report": report}, "posmean", out,
                     "posvit", t0, json_out=json_out, quiet=quiet)


@app.command("svd", cls=PosvitCommand)
def svd(
    ctx: typer.Context,
    store: StoreArg = None,
    output: HeadOutOpt = ...,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder whose constant-image subspace is removed. Default: the encoder that made the store (its provenance).", show_default=False)] = None,
    weights: WeightsOpt = "pretrained",
    rank: Annotated[int, typer.Option("--rank", min=1, help="Singular vectors of the constant-image tokens removed (INSID3: 16).")] = 16,
    size: Annotated[str, typer.Option("--size", help="Constant-image size N or HxW px (auto = the input store's most common image size, its tile size for images extracted in tiles, else 518).")] = "auto",
    report_images: ReportImagesOpt = 16,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write an svd head: remove the subspace spanned by the tokens of a constant image.

    The encoder is the one that made the input store (from its provenance) unless --model/--weights are given. Writes a head (.safetensors) for `posvit extract --head`.
    """
    from posvit_cli.core.debias.heads import ProjectionHead
    from posvit_cli.core.debias.report import backbone_info, encoder_input_size, require_final, store_report
    from posvit_cli.core.debias.svd import constant_image_subspace, svd_image_size
    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.features.rebuild import encoder_from_provenance

    with cli_context(debug, quiet):
        t0 = time.perf_counter()
        out = _head_output(output, "svd", "posvit", overwrite)
        dev, prec = _compute(device, precision.value, threads)
        chosen = model is not None or _given(ctx, "weights")
        store_src, _ = _split_inputs([store] if store else None, store_wanted=not chosen, images_allowed=False)
        fs = _open_store(store_src) if store_src else None
        try:
            if fs is not None:
                require_final(fs)
            if chosen or fs is None:
                if fs is None and model is None:
                    raise PosvitError("svd needs the encoder: give the feature store it will clean, or --model "
                                      "(and --weights)")
                encoder = load_encoder(model, weights, device=str(dev), seed=seed)
            else:
                encoder = encoder_from_provenance(fs.provenance, fs.source, device=str(dev), seed=seed)
            if fs is not None and fs.channels and fs.channels != encoder.embed_dim:
                raise PosvitError(f"the encoder has {encoder.embed_dim} channels, '{fs.source}' {fs.channels}: "
                                  "pass the --model that made the store")
            hw = svd_image_size(size, encoder.patch_size, encoder_input_size(fs) if fs is not None else None)
            basis, facts = constant_image_subspace(encoder, hw, rank, device=dev, precision=prec)
            prov = fs.provenance if fs is not None and not chosen else encoder.provenance()
            head = ProjectionHead(basis[None], method="svd", exact=True,
                                  info={"backbone": backbone_info(prov), "input": {"size": list(hw)}, "svd": facts})
            with RichProgress(quiet) as progress:
                report = store_report(fs, head, report_images, seed=seed, progress=progress) if fs else None
        finally:
            if fs is not None:
                fs.close()
        head.info["report"] = report
        _finish_head(head, {"store": store_src, "size": list(hw), "rank": int(basis.shape[0]),
                            "explained": facts["explained"], "report": report}, "svd", out, "posvit", t0,
                     json_out=json_out, quiet=quiet)


@app.command("tta", cls=PosvitCommand)
def tta(
    images: Annotated[Optional[list[str]], typer.Argument(help="Images for the before/after report (optional: without them only the head is written).", show_default=False)] = None,
    output: HeadOutOpt = ...,
    model: ModelOpt = None,
    weights: WeightsOpt = "pretrained",
    transforms: Annotated[str, typer.Option("--transform", help="Transforms averaged, comma-separated: flip-lr, flip-ud, rot90, rot180, rot270, roll:DY,DX (patches), compositions with +, and sets flips, rot90, d4, rolls:N, reference (identity, flip-lr, flip-ud, rot90).")] = "reference",
    transforms_old: Annotated[Optional[str], deprecated_option("--transforms")] = None,
    size: HeadSizeOpt = "auto",
    recursive: RecursiveOpt = False,
    intensity: IntensityOpt = "auto",
    report_images: ReportImagesOpt = 16,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a tta head: average features over flips, rotations and torus rolls mapped back to the original frame.

    The head runs the encoder on transformed images, so it applies at extraction (`posvit extract IMAGES --head HEAD`), not to a stored store. Images given here are used for the before/after stack R2 report.
    """
    from posvit_cli.core.debias.heads import TTAHead
    from posvit_cli.core.debias.report import backbone_info
    from posvit_cli.core.debias.tta import tta_report
    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.io.images import list_images

    with cli_context(debug, quiet):
        if transforms_old is not None:
            warn_deprecated("--transforms", "--transform")
            transforms = transforms_old
        t0 = time.perf_counter()
        out = _head_output(output, "tta", "posvit", overwrite)
        dev, prec = _compute(device, precision.value, threads)
        store_src, paths = _split_inputs(images, store_wanted=False)
        if store_src is not None:
            raise PosvitError("tta runs the encoder on transformed images: give image files for the report (or no "
                              "input to only write the head), then `posvit extract IMAGES --head HEAD`")
        head = TTAHead(transforms, info={})
        report = None
        if paths and report_images:
            encoder = load_encoder(model, weights, device=str(dev), seed=seed)
            head.info["backbone"] = backbone_info(encoder.provenance())
            with RichProgress(quiet) as progress:
                report, used = tta_report(head, encoder, list_images(paths, recursive=recursive),
                                          max_images=report_images, size=size, intensity=intensity, device=dev,
                                          precision=prec, seed=seed, progress=progress)
            head.info["input"] = {"images": used, "size": "native" if size.strip().lower() == "auto" else size}
        head.info["report"] = report
        _finish_head(head, {"transforms": head.transforms, "report": report}, "tta", out, "posvit", t0,
                     json_out=json_out, quiet=quiet)


# ------------------------------------------------------------------------------------------------------------
# Helpers of the head subcommands: inputs, outputs, the RASA run


def _given(ctx: typer.Context, name: str) -> bool:
    """True when the user set option ``name`` on the command line (not its default)."""
    source = ctx.get_parameter_source(name) if ctx is not None else None
    return source is not None and source.name != "DEFAULT"


def _compute(device: str, precision: str, threads: int | None):
    """The torch device and precision; ``threads`` set for torch when given."""
    import torch

    from posvit_cli.core.device import resolve_device, resolve_precision

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev)


def _split_inputs(inputs: list[str] | None, *, store_wanted: bool,
                  images_allowed: bool = True) -> tuple[str | None, list[str]]:
    """The positional inputs as a feature store (path or '-') or a list of images.

    Without inputs, a piped stdin is read as the store only where the method needs one (``store_wanted``); where
    it is optional, name it as ``-``.
    """
    items = [str(i) for i in (inputs or [])]
    if not items:
        return ("-" if store_wanted and not sys.stdin.isatty() else None), []
    from posvit_cli.core.features.backends import is_store_path

    stores = [i for i in items if i == "-" or is_store_path(i)]
    if stores:
        if len(items) > 1:
            raise PosvitError(f"give one feature store (got {len(items)} inputs: {', '.join(items[:3])} ...)")
        return stores[0], []
    if not images_allowed:
        raise PosvitError(f"'{items[0]}' is not a feature store (.h5, .zarr, .zarr.zip): this method cleans a store")
    return None, items


def _head_output(output: Path, method: str, fmt: str, overwrite: bool) -> Path:
    """Check the head file name against the format; refuse to replace one without --overwrite."""
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt"):
        raise PosvitError(f"-o '{output}': heads are saved as .safetensors (or .pth with rasa --head-format franca)")
    if suffix != ".safetensors" and fmt != "franca":
        if method == "rasa":
            raise PosvitError(f"-o '{output}': a .pth head is Franca's format: add --head-format franca, or use "
                              ".safetensors")
        raise PosvitError(f"-o '{output}': a .pth head is Franca's format, which holds RASA planes only: use "
                          ".safetensors")
    if out.exists() and not overwrite:
        raise PosvitError(f"'{out}' exists: pass --overwrite to replace it (or -o another file)")
    if not out.parent.exists():
        raise PosvitError(f"output folder '{out.parent}' does not exist")
    return out


def _finish_head(head, facts: dict, method: str, out: Path, fmt: str, t0: float, *, json_out: bool,
                 quiet: bool) -> None:
    """Record how the head was made, save it, and print the summary table and/or JSON."""
    from posvit_cli import __version__
    from posvit_cli.core.debias.heads import save_head

    head.info.update({"posvit_version": __version__, "command": command_line(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    save_head(head, out, layout=fmt)
    summary = {"method": method, "output": str(out), "head_format": fmt, "channels": head.channels,
               **head.summary(), **facts, "seconds": round(time.perf_counter() - t0, 3), "command": command_line()}
    if not quiet:
        print_head_summary(summary)
    if json_out:
        emit_json(summary)


def _open_store(src: str):
    from posvit_cli.core.features.store import FeatureStore

    return FeatureStore(src)


def _rasa_head(store_src: str, config, *, max_tokens: int, threads: int | None, dev, report_images: int, seed: int,
               quiet: bool):
    """Train RASA planes on a store's final tokens; the head and the facts for the summary."""
    from posvit_cli.core.debias.heads import ProjectionHead
    from posvit_cli.core.debias.rasa import MAX_IMAGE_TOKENS, load_token_cache, train_rasa
    from posvit_cli.core.debias.report import backbone_info, most_common_size, require_final, store_report

    store = _open_store(store_src)
    try:
        require_final(store)
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
            "backbone": backbone_info(prov),
            "input": {"store": store.source, "images": len(store), "grids": token_cache.grids,
                      "size": list(most_common_size(store)),
                      "preprocessing": store.preprocessing, "augmentation": prov.get("augmentation")},
            "training": {**config.as_dict(), "tokens": result.tokens, "tokens_sampled": token_cache.sampled,
                         "image_token_cap": MAX_IMAGE_TOKENS,
                         "steps_per_round": result.steps_per_round, "device": str(dev),
                         "seconds": round(result.seconds, 3)},
            "rounds": [r.as_dict() for r in result.rounds],
        }
        head = ProjectionHead(result.planes, method="rasa", exact=config.exact, info=info)
        del token_cache  # the report reads the store again: free the cached tokens first
        with RichProgress(quiet) as progress:
            report = store_report(store, head, report_images, seed=seed, progress=progress)
    finally:
        store.close()
    head.info["report"] = report
    return head, {"store": store_src, "images": info["input"]["images"], "tokens": result.tokens,
                  "rounds": info["rounds"], "report": report}


def _extract_views(images: list[str], cache_path: Path, *, model: str | None, weights: str, seed: int, dev,
                   recursive: bool, skip_unreadable: bool, view_opts, overwrite: bool, quiet: bool):
    """Extract augmented views of ``images`` once into the store ``cache_path``; its path and facts."""
    from posvit_cli.core.debias.rasa import extract_views, view_provenance
    from posvit_cli.core.features.encoders import load_encoder
    from posvit_cli.core.features.writer import StoreWriter
    from posvit_cli.core.io.images import list_images, parse_intensity

    parse_intensity(view_opts.intensity)
    if cache_path.exists() and not overwrite:
        raise PosvitError(
            f"the view cache '{cache_path}' exists: train on it (posvit debias-train rasa {cache_path} ...) "
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
from posvit_cli.commands.debias_auto import auto as auto_command  # noqa: E402  (own module: this one is near its line limit)
app.command("auto", cls=PosvitCommand)(auto_command)

"""The command-line surface of `posvit debias-train` that its subcommands share: the group (method first, the
deprecated ``--method X`` spelling rewritten with a warning, a clear answer when the method is missing), the
choices, and the option types several methods take (options every command takes live in
:mod:`posvit_cli.options`)."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from posvit_cli._cli import PosvitGroup, cli_context
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import warn_deprecated

__all__ = [
    "IMAGE_METHODS",
    "METHODS",
    "MethodGroup",
    "STORE_METHODS",
    "method_first",
    "Batching",
    "Rotation",
    "CheckpointEveryOpt",
    "CheckpointOutOpt",
    "CompileOpt",
    "Distance",
    "Fill",
    "DistanceOpt",
    "EvalEveryOpt",
    "GlobalBatchOpt",
    "GradClipOpt",
    "GramWeightOpt",
    "HeadFormat",
    "HeadOutOpt",
    "HeadSizeOpt",
    "ImagesArg",
    "KeepCheckpointsOpt",
    "LogEveryOpt",
    "Loss",
    "LossOpt",
    "LrOpt",
    "MicroBatchOpt",
    "MinLrRatioOpt",
    "MonitorFractionOpt",
    "MonitorImagesOpt",
    "MonitorSizeOpt",
    "NormalizeOpt",
    "Precision",
    "PrecisionOpt",
    "RETROFIT",
    "RETROFIT_RUN",
    "ReportImagesOpt",
    "ResumeOpt",
    "RetrofitDeviceOpt",
    "RetrofitOverwriteOpt",
    "RetrofitSeedOpt",
    "RunDirOpt",
    "Schedule",
    "ScheduleOpt",
    "SkipUnreadableOpt",
    "SlopeOpt",
    "Slopes",
    "SlopesOpt",
    "StagesOpt",
    "StudentInitOpt",
    "TargetBlankOpt",
    "TeacherModelOpt",
    "TeacherStoreOpt",
    "TeacherWeightsOpt",
    "ValFractionOpt",
    "ValMaxOpt",
    "WarmupOpt",
    "WeightDecayOpt",
    "WorkersOpt",
    "WrapOpt",
]


#: Methods by what they train on.
IMAGE_METHODS = ("alibi", "nope")
STORE_METHODS = ("rasa", "blank", "svd", "posmean")
METHODS = (*IMAGE_METHODS, *STORE_METHODS, "tta")


# ------------------------------------------------------------------------------------------------------------
# The group: method first; the deprecated `--method X` form; a clear answer when the method is missing


def _refuse(message: str) -> None:
    """One `error:` line and exit 2, before any subcommand runs (so nothing is written)."""
    with cli_context():
        raise PosvitError(message)


def _input_kind(arg: str) -> str | None:
    """``store`` or ``images`` for a path that looks like one, else None."""
    from posvit_cli.core.io.images import IMAGE_SUFFIXES, LIST_SUFFIXES

    from posvit_cli.core.features.backends import is_store_path

    low = arg.lower().rstrip("/")
    if arg == "-" or is_store_path(arg):
        return "store"
    if Path(arg).is_dir() or low.endswith(IMAGE_SUFFIXES + LIST_SUFFIXES):
        return "images"
    return None


def _missing_method(args: list[str]) -> str:
    first = args[0]
    kind = _input_kind(first) if not first.startswith("-") else None
    seen = {"store": f"'{first}' is a feature store: ", "images": f"'{first}' is images: "}.get(kind, "")
    example = {"store": f"posvit debias-train rasa {first} ...", "images": f"posvit debias-train alibi {first} ..."}
    return (f"name the method first ({seen}{', '.join(STORE_METHODS)} take a feature store; "
            f"{' and '.join(IMAGE_METHODS)} take images; tta takes images for its report), e.g. "
            f"{example.get(kind, 'posvit debias-train METHOD INPUT ...')}")


def method_first(args: list[str]) -> list[str]:
    """Rewrite the deprecated ``[ARGS] --method X [ARGS]`` (or ``--method=X``) to ``X ARGS`` and warn.

    The last ``--method`` wins, as it did when it was an option. Without one, refuse with a line saying which
    methods take a store and which take images.
    """
    method, rest, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i:])
            break
        if a == "--method":
            if i + 1 >= len(args):
                _refuse(f"--method needs a value: {', '.join(METHODS)}")
            method, i = args[i + 1], i + 2
            continue
        if a.startswith("--method="):
            method, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    if method is None:
        first = args[0]
        if not first.startswith("-") and _input_kind(first) is None and not Path(first).exists():
            return args  # a misspelt method: Click answers "No such command"
        _refuse(_missing_method(args))
    m = method.strip().lower()
    if m not in METHODS:
        _refuse(f"unknown --method '{method}': use posvit debias-train {'|'.join(METHODS)} ...")
    with cli_context():
        warn_deprecated(f"`posvit debias-train --method {m}`", f"`posvit debias-train {m}`")
    return [m, *rest]


class MethodGroup(PosvitGroup):
    """``debias-train``'s subcommands, also reached by the deprecated ``--method X`` spelling."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = method_first(args)
        return super().parse_args(ctx, args)


class Precision(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Slopes(str, enum.Enum):
    constant = "constant"
    geometric = "geometric"
    learned = "learned"


class Distance(str, enum.Enum):
    euclidean = "euclidean"
    manhattan = "manhattan"


class Loss(str, enum.Enum):
    cosine = "cosine"
    mse = "mse"


class Schedule(str, enum.Enum):
    constant = "constant"
    cosine = "cosine"


class Batching(str, enum.Enum):
    tokens = "tokens"
    images = "images"
    images_in_order = "images-in-order"


class Rotation(str, enum.Enum):
    any = "any"
    quarter_turns = "quarter-turns"


class Fill(str, enum.Enum):
    zero = "zero"
    mean = "mean"


class HeadFormat(str, enum.Enum):
    posvit = "posvit"
    franca = "franca"


RETROFIT = "Retrofit"
RETROFIT_RUN = "Schedule, checkpoints and monitoring"

PrecisionOpt = Annotated[Precision, typer.Option("--precision", case_sensitive=False, help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16.")]
HeadOutOpt = Annotated[Path, typer.Option("--output", "-o", help="The head file (.safetensors) for `posvit extract --head`.", show_default=False)]
ReportImagesOpt = Annotated[int, typer.Option("--report-images", min=0, help="Images of the input on which the stack R2 is probed before and after the head (0 = no report).")]
SkipUnreadableOpt = Annotated[bool, typer.Option("--skip-unreadable", help="Drop images that cannot be decoded (with a warning) instead of stopping.")]
HeadSizeOpt = Annotated[str, typer.Option("--size", help="Resize rule of the report images as in `extract --size` (auto = native).")]

# alibi / nope
ImagesArg = Annotated[list[str], typer.Argument(help="Training images: files, folders or .txt lists.", show_default=False)]
CheckpointOutOpt = Annotated[Path, typer.Option("--output", "-o", help="The retrofitted encoder: a posvit checkpoint (.safetensors) that `posvit extract --weights` loads alone.", show_default=False)]
TeacherModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Teacher encoder: a posvit name or timm ViT name. Default: dinov2-s-reg, or the model a posvit checkpoint in --weights names.", show_default=False)]
TeacherWeightsOpt = Annotated[str, typer.Option("--weights", "-w", help="Teacher weights: pretrained, random (smoke tests) or a .safetensors/.pth file.")]
RetrofitSeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the data order, validation split, monitor noise and --weights random.")]
RetrofitDeviceOpt = Annotated[str, typer.Option("--device", help="Torch device: auto (CUDA if available), cpu, cuda, cuda:N. Under torchrun each rank takes cuda:LOCAL_RANK.")]
RetrofitOverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output and start its run folder afresh.")]
SlopesOpt = Annotated[Slopes, typer.Option("--slopes", case_sensitive=False, help="ALiBi slope per head: constant (m for all heads, published), geometric (2^(-8(h+1)/H)) or learned (trainable, starts at m).", rich_help_panel=RETROFIT)]
SlopeOpt = Annotated[float, typer.Option("--slope", help="The constant slope m (initial value for learned slopes).", rich_help_panel=RETROFIT)]
DistanceOpt = Annotated[Distance, typer.Option("--distance", case_sensitive=False, help="Token distance: euclidean or manhattan.", rich_help_panel=RETROFIT)]
WrapOpt = Annotated[bool, typer.Option("--wrap/--no-wrap", help="Distances on a torus (wrap-around), which makes the model roll-equivariant.", rich_help_panel=RETROFIT)]
NormalizeOpt = Annotated[bool, typer.Option("--normalize/--no-normalize", help="Divide distances by their maximum on the grid (bias in [-m, 0] at any resolution).", rich_help_panel=RETROFIT)]
TargetBlankOpt = Annotated[str, typer.Option("--blank", help="Teacher channels zeroed in the targets: auto (top-2 per ramp on the monitor images), none (plain distillation), a list such as 47,113,117,359, or a `posvit probe` result .json (top 2 per ramp).", rich_help_panel=RETROFIT)]
LossOpt = Annotated[Loss, typer.Option("--loss", case_sensitive=False, help="Distillation loss on patch tokens: cosine (mean 1 - cos) or mse.", rich_help_panel=RETROFIT)]
GramWeightOpt = Annotated[float, typer.Option("--gram-weight", min=0.0, help="Weight of the Gram anchor (patch-similarity structure, DINOv3); 0 = off.", rich_help_panel=RETROFIT)]
StudentInitOpt = Annotated[Optional[Path], typer.Option("--student-init", help="Start the student from this retrofitted posvit checkpoint (e.g. a 224 px result before a 518 px stage). Default: a copy of the teacher.", show_default=False, rich_help_panel=RETROFIT)]
TeacherStoreOpt = Annotated[Optional[list[Path]], typer.Option("--teacher-store", help="Feature store of the teacher (`posvit extract --size crop:N`) used as targets for stages of size N instead of teacher passes. Repeatable.", show_default=False, rich_help_panel=RETROFIT)]
StagesOpt = Annotated[str, typer.Option("--stages", help="Training stages SIZE:EPOCHS (shortest-side resize + centre crop to SIZE px; fractional epochs allowed).", rich_help_panel=RETROFIT_RUN)]
LrOpt = Annotated[Optional[str], typer.Option("--lr", help="Learning rate, one or one per stage. Default: 1e-4 for the first stage, 1e-5 after.", show_default=False, rich_help_panel=RETROFIT_RUN)]
GlobalBatchOpt = Annotated[Optional[str], typer.Option("--batch-size", "-b", help="Global batch (images per optimiser step, all processes), one or one per stage. Default: 256 for the first stage, 32 after.", show_default=False, rich_help_panel=RETROFIT_RUN)]
MicroBatchOpt = Annotated[int, typer.Option("--micro-batch", min=1, help="Images per forward pass and process; larger batches accumulate gradients.", rich_help_panel=RETROFIT_RUN)]
WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.", rich_help_panel=RETROFIT_RUN)]
WarmupOpt = Annotated[float, typer.Option("--warmup", min=0.0, max=1.0, help="Linear warm-up over this fraction of each stage's steps, in [0, 1).", rich_help_panel=RETROFIT_RUN)]
ScheduleOpt = Annotated[Schedule, typer.Option("--schedule", case_sensitive=False, help="Learning rate after warm-up: constant (published) or cosine.", rich_help_panel=RETROFIT_RUN)]
MinLrRatioOpt = Annotated[float, typer.Option("--min-lr-ratio", min=0.0, max=1.0, help="Cosine schedule: final learning rate as a fraction of the peak.", rich_help_panel=RETROFIT_RUN)]
GradClipOpt = Annotated[float, typer.Option("--grad-clip", min=0.0, help="Clip the gradient norm to this value; 0 = off (published).", rich_help_panel=RETROFIT_RUN)]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile student and teacher (worth it on CUDA for long runs).", rich_help_panel=RETROFIT_RUN)]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Image decoding processes (0 = in the training process).", rich_help_panel=RETROFIT_RUN)]
ValFractionOpt = Annotated[float, typer.Option("--val-fraction", min=0.0, max=1.0, help="Fraction of the images held out for the validation loss, in [0, 1).", rich_help_panel=RETROFIT_RUN)]
ValMaxOpt = Annotated[int, typer.Option("--val-max", min=0, help="At most this many validation images.", rich_help_panel=RETROFIT_RUN)]
MonitorImagesOpt = Annotated[Optional[str], typer.Option("--monitor-images", help="Homogeneous images (folder, files or .txt list) for the positional stack-R2 monitor and --blank auto. Default: 4 uniform-noise images of 518 px.", show_default=False, rich_help_panel=RETROFIT_RUN)]
MonitorSizeOpt = Annotated[str, typer.Option("--monitor-size", help="Resize of monitor images: native (own size, rounded down to patch multiples, as published), stage (the stage's crop), short:N, long:N, square:N or crop:N.", rich_help_panel=RETROFIT_RUN)]
MonitorFractionOpt = Annotated[float, typer.Option("--monitor-fraction", min=0.0, max=1.0, help="Fraction of a monitor image's tokens the stack-R2 probe trains on, in (0, 1) (published: 1/36).", show_default="0.0278", rich_help_panel=RETROFIT_RUN)]
EvalEveryOpt = Annotated[int, typer.Option("--eval-every", min=0, help="Validation loss and stack R2 every N steps (and at each stage's end); 0 = stage ends only.", rich_help_panel=RETROFIT_RUN)]
LogEveryOpt = Annotated[int, typer.Option("--log-every", min=0, help="Training-loss rows in the log every N steps.", rich_help_panel=RETROFIT_RUN)]
CheckpointEveryOpt = Annotated[int, typer.Option("--checkpoint-every", min=0, help="Training state every N steps (and at each stage's end); 0 = stage ends only.", rich_help_panel=RETROFIT_RUN)]
KeepCheckpointsOpt = Annotated[bool, typer.Option("--keep-checkpoints", help="Keep every training state, not only the last.", rich_help_panel=RETROFIT_RUN)]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="Folder for training states (last.pt) and log.csv. Default: the output path with suffix .train.", show_default=False, rich_help_panel=RETROFIT_RUN)]
ResumeOpt = Annotated[Optional[Path], typer.Option("--resume", help="Continue an interrupted run from its run folder or a state file (same options and images).", show_default=False, rich_help_panel=RETROFIT_RUN)]

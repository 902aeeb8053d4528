"""The options that more than one command takes, defined once.

Every command imports its shared options from here, so an option name means the same thing (same spelling, same
short flag, same help, same type) everywhere. Per-command defaults are given at the parameter (``= ...``); a
command whose default differs from the one documented here says why in its own help.

Short flags have one meaning each across posvit: ``-o`` output, ``-r`` ``--recursive``, ``-l`` ``--layer``,
``-k`` numbers of clusters (``cluster``, ``report``), ``-m`` ``--model``, ``-w`` ``--weights``, ``-b``
``--batch-size`` (images), ``-q`` ``--quiet``.

``-o`` follows one rule per kind of output:

- **store outputs** (``extract``, ``cluster``, ``store merge``): a store path (``.h5``, ``.zarr``, ``.zarr.zip``),
  or ``-`` for stdout. Without ``-o`` the store goes to stdout only when stdout is a pipe or socket (``posvit
  extract imgs/ | posvit probe``); into a terminal or a redirected file (``> run.log``) it is an error asking for
  ``-o``. See :data:`StoreOutOpt`.
- **folder outputs** (``viz``, ``segment apply``): a folder, created when missing. See :data:`FolderOutOpt`.
- **file outputs** (``segment train`` model, ``segment bench`` results JSON): a file path; each command's help
  names the suffix.

Choices are Enums (``class X(str, Enum)``) so ``--help`` lists them and a typo is refused before any work. Flags
are plain ``bool`` options (shown without a value type by :class:`posvit_cli._cli.PosvitCommand`).

Old spellings kept for one release are declared with :func:`deprecated_option` (hidden from ``--help``) and
reported with :func:`warn_deprecated` when used.
"""

from __future__ import annotations

import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from posvit_cli.core.errors import PosvitWarning

__all__ = [
    "BatchSizeOpt",
    "Compression",
    "FolderOutOpt",
    "IntensityOpt",
    "Precision",
    "PrecisionOpt",
    "SizeOpt",
    "StorageDtype",
    "StoreOutOpt",
    "TransformOpt",
    "Upsample",
    "ClassNamesOpt",
    "DebugOpt",
    "DeviceOpt",
    "IgnoreIndexOpt",
    "JsonOpt",
    "LayerOpt",
    "MasksOpt",
    "ModelOpt",
    "NormKOpt",
    "PositionFreeMethod",
    "PositionFreeMethodOpt",
    "OverwriteOpt",
    "PosvitDeprecationWarning",
    "QuietOpt",
    "RecursiveOpt",
    "SeedOpt",
    "SeedsOpt",
    "StoreArg",
    "ThreadsOpt",
    "WeightsOpt",
    "deprecated_option",
    "warn_deprecated",
]


class PosvitDeprecationWarning(PosvitWarning):
    """An old option spelling or command form that still works for one release."""


def warn_deprecated(old: str, new: str) -> None:
    """Say once, on stderr, that ``old`` still works but ``new`` is the spelling to use."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {new}",
                  PosvitDeprecationWarning, stacklevel=2)


def deprecated_option(*flags: str, **kwargs: Any) -> Any:
    """A hidden option for an old spelling; the command calls :func:`warn_deprecated` when it is given."""
    return typer.Option(*flags, hidden=True, show_default=False, **kwargs)


# Output conventions
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON results on stdout.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", help="Show the full traceback on errors (also POSVIT_DEBUG=1).", envvar="POSVIT_DEBUG")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]

# Inputs
StoreArg = Annotated[
    Optional[str],
    typer.Argument(help="Feature store (.h5, .zarr, .zarr.zip), or - / a pipe for standard input.", show_default=False),
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Also read images in sub-folders.")]
LayerOpt = Annotated[
    Optional[str],
    typer.Option("--layer", "-l", help="Stored layer to read: final, or a block index stored with extract --layers. "
                                       "Default: final.", show_default=False),
]
MasksOpt = Annotated[
    Optional[Path],
    typer.Option("--masks", help="Folder of dense ground-truth masks (PNG/TIFF) matched to the images by file stem: "
                                 "class indices 0..C-1, --ignore-index = unlabelled (docs/labels.md).",
                 show_default=False),
]
IgnoreIndexOpt = Annotated[
    int, typer.Option("--ignore-index", help="Mask value meaning 'unlabelled', left out of training and scoring; "
                                             "-1 for none.")
]
ClassNamesOpt = Annotated[
    Optional[str],
    typer.Option("--class-names", help="Class names in class-index order, comma-separated, or a text file with one "
                                       "name per line. Default: 0, 1, 2, ...", show_default=False),
]

# Encoders
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Encoder: a posvit name (posvit doctor lists them) or any timm model name.",
                 show_default=False),
]
WeightsOpt = Annotated[
    str, typer.Option("--weights", "-w", help="pretrained (timm/Hugging Face cache), random, or a checkpoint file "
                                              "(.safetensors, .pth).")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]

# Compute
DeviceOpt = Annotated[
    str, typer.Option("--device", help="Torch device: auto (CUDA if available), cpu, cuda, cuda:N. Default: auto "
                                       "everywhere.")
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option("--threads", min=1, help="Torch CPU threads. Default: torch's choice (all cores).",
                 show_default=False),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (sampling, initialisation, shuffling).")]
SeedsOpt = Annotated[
    Optional[str],
    typer.Option("--seeds", help="Seeds, comma-separated or a range such as 0-4.", show_default=False),
]

# Outputs: one rule per kind of output (see the module docstring)
StoreOutOpt = Annotated[
    Optional[str],
    typer.Option("--output", "-o", help="Store to write: .h5, .zarr or .zarr.zip, or - for stdout. Default: stdout "
                                        "when it is a pipe (into another posvit command), else an error.",
                 show_default=False),
]
FolderOutOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Folder to write into (created if missing).", file_okay=False)
]

# Images
SizeOpt = Annotated[
    str, typer.Option("--size", help="Resize rule: native (round down to a patch multiple), short:N, long:N, "
                                     "square:N (or N), crop:N.")
]
IntensityOpt = Annotated[
    str, typer.Option("--intensity", help="Intensity scaling: auto (8-bit /255, other types min-max per image), "
                                          "dtype, minmax, percentile:LO,HI.")
]
TransformOpt = Annotated[
    Optional[str],
    typer.Option("--transform", help="Image transforms, mapped back to the original frame: flip-ud, flip-lr, "
                                     "rot90[:K], roll:DY,DX (whole patches), compositions with +; a comma list or "
                                     "a set (reference, flips, rot90, d4, rolls:N). Default: none.",
                 show_default=False),
]


class Precision(str, Enum):
    """Autocast precision of the encoder's forward pass."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


PrecisionOpt = Annotated[
    Precision, typer.Option("--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16 autocast.")
]


class StorageDtype(str, Enum):
    """Storage type of features in a store."""

    float16 = "float16"
    float32 = "float32"


class Compression(str, Enum):
    """Chunk compression of a store (gzip, lzf: HDF5 only; zstd, lz4: Zarr only)."""

    none = "none"
    gzip = "gzip"
    lzf = "lzf"
    zstd = "zstd"
    lz4 = "lz4"


class Upsample(str, Enum):
    """How token maps are enlarged to image pixels."""

    nearest = "nearest"
    bilinear = "bilinear"


#: High-norm outlier tokens (``probe --token-norms``, ``viz norms``); the default is
#: :data:`posvit_cli.core.measure.norms.DEFAULT_K` (6).
NormKOpt = Annotated[
    float,
    typer.Option("--norm-k", min=0.0, help="Outlier cut of the token norms: log norm more than this many robust "
                 "standard deviations (1.4826 MAD) above the image's median."),
]


class PositionFreeMethod(str, Enum):
    """How a --weights file encodes position (see posvit_cli.core.features.alibi.METHODS)."""

    alibi = "alibi"
    nope = "nope"


#: ``--method`` of the commands that load an encoder from ``--weights`` (``extract``, ``probe shift``,
#: ``probe controls``).
PositionFreeMethodOpt = Annotated[
    Optional[PositionFreeMethod],
    typer.Option("--method", show_default=False, help="The --weights file is a position-free model: alibi (2-D "
                 "ALiBi, constant slope 1, torus) or nope (no position encoding), e.g. the published ALiBi/NoPE "
                 "DINOv2 checkpoints. Default: none (posvit checkpoints carry this themselves)."),
]

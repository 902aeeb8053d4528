"""`posvit extract`: images → encoder → feature store."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, DeviceOpt, JsonOpt, QuietOpt, RichProgress, cli_context, command_line, console, emit_json, parse_csv,
    sigterm_as_interrupt, store_output,
)
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    BatchSizeOpt, Compression, IntensityOpt, OverwriteOpt, PositionFreeMethodOpt, Precision, PrecisionOpt,
    RecursiveOpt, StorageDtype, StoreOutOpt, ThreadsOpt, deprecated_option, warn_deprecated,
)


class TileBlend(str, Enum):
    """Blend weights of --tile (see posvit_cli.core.features.extract.TILE_BLENDS)."""

    linear = "linear"
    centre = "centre"


class TiffPages(str, Enum):
    """How a multi-page TIFF becomes images (see posvit_cli.core.io.images.list_images)."""

    first = "first"
    all = "all"


def _value(choice):
    """The plain string of an Enum choice (None stays None): core takes strings."""
    return choice.value if isinstance(choice, Enum) else choice


def extract(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders, or .txt lists of paths (with --merge: stores; with --head: one store to clean without re-extraction, or - for stdin).", show_default=False)],
    output: StoreOutOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder: a posvit name (see `posvit doctor --models`) or a timm model name. Default: dinov2-s-reg, or the model a posvit checkpoint in --weights names.", show_default=False)] = None,
    weights: Annotated[str, typer.Option("--weights", "-w", help="pretrained (timm/hub cache; bundled for posvit-tiny), random (seeded, for smoke tests), or a .safetensors/.pth file or posvit checkpoint.")] = "pretrained",
    layers: Annotated[str, typer.Option("--layers", help="Layers to store: final, all, or block indices such as 3,7,final. Intermediate blocks are taken after the final norm.")] = "final",
    prefix_tokens: Annotated[bool, typer.Option("--prefix-tokens/--no-prefix-tokens", help="Also store CLS and register tokens.")] = False,
    size: Annotated[str, typer.Option("--size", help="Resize: native (round down to patch multiple), short:N, long:N, square:N (or N), crop:N; N for square/crop must be a multiple of the patch. A comma list (224,448,672,896) writes one store per size, named OUT.224.h5, OUT.448.h5, ... (a resolution sweep).")] = "native",
    intensity: IntensityOpt = "auto",
    max_side: Annotated[int, typer.Option("--max-side", min=1, help="Skip untiled images whose processed longer side exceeds this (px).")] = 2048,
    tile: Annotated[Optional[int], typer.Option("--tile", min=1, help="Tile images larger than this (px, patch multiple) and blend the tiles' tokens. Default: no tiling.", show_default=False)] = None,
    overlap: Annotated[int, typer.Option("--overlap", min=0, help="Tile overlap in px (patch multiple).")] = 0,
    tile_shifts: Annotated[int, typer.Option("--tile-shifts", min=1, help="With --tile: blend N tile grids offset diagonally by k/N of the tile step, averaging out the per-tile positional pattern (N times the cost).")] = 1,
    tile_blend: Annotated[TileBlend, typer.Option("--tile-blend", help="With --tile: blend weights of the tiles: linear ramps across the overlap, or centre (a Hann window over the whole tile, taking each token mostly from the tiles it is nearest the centre of).")] = TileBlend.linear,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    compile_graph: Annotated[bool, typer.Option("--compile/--no-compile", help="Run the encoder through torch.compile (one static-shape graph per image/tile size, compiled on first use: 1-2 min each for a ViT-S on CPU, less from the inductor cache). Each size's first batch is checked against eager; a size whose tokens fall below cosine 0.99999, or a failed compile, runs eagerly with a warning. Default: off (on a 2-core CPU the compiled forward was only 1.01-1.13x faster, repaid after thousands of images per size)")] = False,
    dtype: Annotated[StorageDtype, typer.Option("--dtype", help="Storage type of the features.")] = StorageDtype.float16,
    compression: Annotated[Optional[Compression], typer.Option("--compression", help="none, gzip or lzf (HDF5); none, zstd or lz4 (Zarr). Default: none for HDF5, zstd for Zarr.", show_default=False)] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image decoding threads.")] = 2,
    recursive: RecursiveOpt = False,
    tiff_pages: Annotated[TiffPages, typer.Option("--tiff-pages", help="A multi-page TIFF is its first page (first, with a warning) or one image per page, stored as FILE.tif#page=N (all).")] = TiffPages.first,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Extract only shard i/n of the images (every n-th from i); join shards with --merge. auto: the Slurm array task, else the torchrun rank. Default: all images (under torchrun: each rank a share, joined into -o by rank 0).", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted store (or add new images to a finished one), skipping images already done.")] = False,
    overwrite: OverwriteOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first unreadable image instead of skipping it.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Join stores (e.g. shards made with --shard) named as inputs into -o.")] = False,
    head: Annotated[Optional[Path], typer.Option("--head", help="Apply a debiasing head (posvit debias-train output, or a Franca RASA head) to the final tokens; with a store as input, clean its tokens without running an encoder. Default: none.", show_default=False)] = None,
    transform: Annotated[Optional[str], typer.Option("--transform", help="Extract features of transformed images mapped back to the original frame: flip-ud, flip-lr, rot90[:K], roll:DY,DX (whole patches), compositions with +. A comma list (or a set: reference, flips, rot90, d4, rolls:N) writes one store per transform, named OUT.flip-ud.h5, OUT.roll-0_3.h5, ... (identity: OUT.h5). Default: none.", show_default=False)] = None,
    transforms_old: Annotated[Optional[str], deprecated_option("--transforms")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for --weights random.")] = 0,
    method: PositionFreeMethodOpt = None,
    threads: ThreadsOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    ctx: typer.Context = None,
) -> None:
    """Extract patch features of images into a feature store (HDF5 or Zarr).

    Writes the final normed patch tokens (or chosen layers) of every image, with the provenance needed to
    reproduce them. Same-sized images are batched; huge images can be tiled; an interrupted run resumes
    with --resume. Without -o the store streams to stdout when it is piped into another posvit command.
    """
    with cli_context(debug, quiet), sigterm_as_interrupt():
        if transforms_old is not None:
            warn_deprecated("--transforms", "--transform")
            if transform is not None:
                raise PosvitError("give --transform once (--transforms is its old spelling)")
            transform = transforms_old
        precision, dtype = _value(precision), _value(dtype)
        compression, method, tiff_pages = _value(compression), _value(method), _value(tiff_pages)
        tile_blend = _value(tile_blend)
        out = store_output(output)
        if json_out and out == "-":
            raise PosvitError("--json prints to stdout, where the store goes: name an output with -o")
        if merge:
            _merge(inputs, out, overwrite, json_out, quiet)
            return
        if head is not None and _is_store_input(inputs):
            dtype_given = ctx is not None and ctx.get_parameter_source("dtype").name != "DEFAULT"
            _apply_head(inputs, out, head, overwrite, dtype if dtype_given else None, compression, transform, resume,
                        json_out, quiet)
            return
        _refuse_store_inputs(inputs, head)
        _extract(**locals())


def _merge(inputs, out, overwrite, json_out, quiet):
    from posvit_cli.commands.store import run_merge

    run_merge(inputs, out, overwrite=overwrite, json_out=json_out, quiet=quiet)


def _is_store_input(inputs) -> bool:
    from posvit_cli.core.features.backends import is_store_path

    return len(inputs) == 1 and (inputs[0] == "-" or is_store_path(inputs[0]))


def _refuse_store_inputs(inputs, head) -> None:
    """A store among the inputs of an image extraction is a mistake: say what was probably meant, before any
    output is created (it would otherwise be skipped as an unreadable image, leaving an empty store)."""
    from posvit_cli.core.features.backends import is_store_path

    stores = [str(x) for x in inputs if x == "-" or is_store_path(x)]
    if not stores:
        return
    if head is not None:
        raise PosvitError(f"--head cleans one store at a time, given alone as the input ('{stores[0]}' among "
                          f"{len(inputs)} inputs): run it once per store")
    raise PosvitError(f"'{stores[0]}' is a feature store, not an image: pass --head HEAD to clean its tokens, or "
                      "--merge to join stores into -o")


def _apply_head(inputs, out, head, overwrite, dtype, compression, transform, resume, json_out, quiet):
    """Store in, store out: a head applied to stored final tokens, no encoder run."""
    from posvit_cli.core.debias.heads import apply_head_to_store, load_head
    from posvit_cli.core.features.store import FeatureStore

    if transform:
        raise PosvitError("--transform needs the images: it cannot be applied to a stored store")
    if resume:
        raise PosvitError("--resume does not apply to cleaning a store with --head (run it again, it is fast)")
    head_obj = load_head(head)
    with FeatureStore(inputs[0]) as source:
        with RichProgress(quiet) as progress:
            summary = apply_head_to_store(head_obj, source, out, overwrite=overwrite, dtype=dtype,
                                          compression=compression, command=command_line(), progress=progress)
    where = summary["output"] or "stdout"
    if not quiet:
        console.print(f"applied {head_obj.method} head '{head}' to {summary['images']} images of '{inputs[0]}' → "
                      f"{where} ({summary['seconds']:.1f} s)")
    if json_out:
        emit_json({**summary, "output": where, "head": str(head), "method": head_obj.method})


def _extract(inputs, out, model, weights, layers, prefix_tokens, size, intensity, max_side, tile, overlap, tile_shifts,
             tile_blend, batch_size, device, precision, dtype, compression, workers, recursive, shard, resume, overwrite, strict,
             head, transform, seed, threads, json_out, quiet, method=None, tiff_pages="first", compile_graph=False, **_):
    import torch

    from posvit_cli.core.device import resolve_device, resolve_precision
    from posvit_cli.core.distributed import DistInfo, auto_shard, dist_env, gather_from_ranks
    from posvit_cli.core.features.encoders import load_encoder, read_checkpoint_meta
    from posvit_cli.core.features.extract import ExtractOptions, extraction_provenance, shard_paths
    from posvit_cli.core.io.images import list_images, parse_intensity
    from posvit_cli.core.io.preprocess import parse_size

    if batch_size < 1:
        raise PosvitError("--batch-size must be at least 1")
    if workers < 0:
        raise PosvitError("--workers must be 0 or more")
    if tile is not None and tile <= overlap:
        raise PosvitError(f"--tile {tile} must be larger than --overlap {overlap}")
    if tile_shifts > 1 and tile is None:
        raise PosvitError(f"--tile-shifts {tile_shifts} shifts tile grids: give --tile too")
    if tile_blend != "linear" and tile is None:
        raise PosvitError(f"--tile-blend {tile_blend} blends tiles: give --tile too")
    if threads:
        torch.set_num_threads(threads)
    size_specs = _size_list(size)
    modes = [parse_size(s) for s in size_specs]
    if len({str(m) for m in modes}) != len(modes):
        raise PosvitError(f"--size {size} names the same size twice")
    parse_intensity(intensity)
    if shard == "auto":
        shard = auto_shard()
    # Under torchrun without --shard, each rank extracts its share into a part and rank 0 joins the parts.
    dist = dist_env() if shard is None else DistInfo()
    if dist.enabled:
        shard = f"{dist.rank}/{dist.world_size}"
        quiet, json_out = quiet or not dist.is_main, json_out and dist.is_main
    all_paths = list_images(inputs, recursive=recursive, tiff_pages=tiff_pages)
    paths = shard_paths(all_paths, shard)
    dev = resolve_device(device)
    if dist.enabled and dev.type == "cuda" and dev.index is None:  # one GPU per rank; more ranks share them
        dev = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    prec = resolve_precision(precision, dev)
    if model is None and not (weights not in ("pretrained", "random") and read_checkpoint_meta(weights)):
        model = "dinov2-s-reg"
    modifications = None
    if method:
        from posvit_cli.core.features.alibi import METHODS, AlibiConfig

        if method not in METHODS:
            raise PosvitError(f"unknown --method '{method}': use {', '.join(METHODS)}")
        modifications = [{"name": method, "config": AlibiConfig().to_dict() if method == "alibi" else {}}]
        if weights in ("pretrained", "random"):
            import warnings

            from posvit_cli.core.errors import PosvitWarning

            warnings.warn(f"--method {method} with --weights {weights}: the retrofit is not distilled (train one "
                          "with `posvit debias-train`)", PosvitWarning, stacklevel=1)
    if transform and tile is not None:
        raise PosvitError("--transform acts on whole images: it cannot be combined with --tile (each tile would be "
                          "transformed on its own)")
    encoder = load_encoder(model, weights, device=str(dev), seed=seed, modifications=modifications)
    layer_names = encoder.layer_names(parse_csv(layers))
    if tile is not None and tile < encoder.patch_size:
        raise PosvitError(f"--tile {tile} is smaller than one {encoder.patch_size}-px patch")
    for m in modes:
        check_size_multiple(m, encoder.patch_size, encoder.name)

    postprocess, debias = None, []
    if head is not None:
        from posvit_cli.core.debias.heads import load_head

        head_obj = load_head(head, channels=encoder.embed_dim, backbone=encoder.provenance())
        if layer_names != ["final"] and "final" not in layer_names:
            raise PosvitError("--head applies to the final tokens: include 'final' in --layers")
        if head_obj.needs_encoder:  # test-time averaging runs the encoder on transformed images
            encoder = head_obj.wrap_encoder(encoder)
        else:
            postprocess = head_obj.token_postprocess(dev)
        debias = [head_obj.provenance()]
    transforms: list = [None]
    if transform:
        transforms = transform_list(transform, encoder.patch_size)
    jobs = variant_jobs(out, modes, transforms)
    if len(jobs) > 1 and out == "-":
        raise PosvitError(f"{len(jobs)} sizes/transforms write {len(jobs)} stores: name them with -o (e.g. -o feats.h5 "
                          "gives feats.224.h5, ...), they cannot all go to stdout")
    if dist.enabled:
        _check_joined_outputs([job[0] for job in jobs], overwrite)
    results = []
    try:
        for job_out, mode, image_transform in jobs:
            spec = image_transform.spec if image_transform is not None else None
            options = ExtractOptions(
                layers=layer_names, size=mode, intensity=intensity, keep_prefix=prefix_tokens, batch_size=batch_size,
                precision=prec, tile=tile, overlap=overlap, tile_shifts=tile_shifts, tile_blend=tile_blend,
                max_side=max_side, workers=workers, strict=strict, compile=compile_graph,
                postprocess=postprocess,
                image_transform=image_transform if spec not in (None, "identity") else None,
            )
            prov = extraction_provenance(encoder, options, device=dev, command=command_line(), shard=shard,
                                         debias=debias, transform=spec if spec != "identity" else None)
            if len(jobs) > 1 and not quiet:
                what = ", ".join(x for x in (f"size {mode}" if len(modes) > 1 else "",
                                             f"transform {spec}" if len(transforms) > 1 else "") if x)
                console.print(f"[bold]{what}[/] → {job_out}", markup=True)
            target = rank_part_path(job_out, dist.rank, dist.world_size) if dist.enabled else job_out
            summary, where = _extract_one(paths, encoder, options, prov, target, layer_names, dtype, overwrite,
                                          resume, compression, dev, quiet, part=dist.enabled)
            results.append({"summary": summary, "output": job_out if dist.enabled else where, "model": encoder.name,
                            "layers": layer_names, "size": str(mode), "transform": spec})
    except Exception as exc:
        if dist.enabled:  # the other ranks learn of it instead of waiting for this rank's part
            with contextlib.suppress(Exception):  # this rank's own error is the one to report
                gather_from_ranks(f"{type(exc).__name__}: {exc}", dist)
        raise
    if dist.enabled:
        if not _join_rank_parts(results, dist, all_paths, overwrite, quiet, encoder):
            return
    if json_out:
        docs = [{**r.pop("summary").as_dict(), **r} for r in results]
        emit_json(docs[0] if len(docs) == 1 else {"stores": docs})


def _size_list(size: str) -> list[str]:
    parts = [p.strip() for p in str(size).split(",")]
    if not all(parts):
        raise PosvitError(f"--size '{size}': an empty item in the list")
    return parts


def transform_list(spec: str, patch: int) -> list:
    """Transforms of ``--transform``: a comma list of transforms (``rot90`` is one quarter turn, not the set)
    and named sets (``reference``, ``flips``, ``d4``, ``rolls:N``); duplicates dropped, order kept."""
    from posvit_cli.core.io.transforms import parse_transform, parse_transform_set, split_transform_list

    out: dict = {}
    for item in split_transform_list(spec):
        try:
            found = [parse_transform(item, patch)]
        except PosvitError:
            found = parse_transform_set(item, patch)  # a named set, or the original error again
        for t in found:
            out.setdefault(t.spec, t)
    if not out:
        raise PosvitError(f"--transform '{spec}' names no transform")
    return list(out.values())


def check_size_multiple(mode, patch: int, model: str = "the model") -> None:
    """Refuse square/crop sizes that are not a multiple of the patch (they would be rounded down silently)."""
    from posvit_cli.core.io.preprocess import check_patch_multiple

    if mode.kind in ("square", "crop"):
        check_patch_multiple(f"--size {mode}", mode.size, patch, model)


def variant_jobs(out: str, modes, transforms) -> list[tuple[str, object, object]]:
    """One (output, size, transform) per combination; outputs are named by size and transform when several
    (the identity transform adds no name, so its store is the plain extraction's)."""
    from posvit_cli.core.features.extract import variant_path

    jobs = []
    for m in modes:
        for t in transforms:
            labels = []
            if len(modes) > 1:
                labels.append(size_label(m))
            if len(transforms) > 1 and t.spec != "identity":  # the untransformed store keeps the plain name
                labels.append(transform_label(t.spec))
            jobs.append((variant_path(out, labels) if labels and out != "-" else out, m, t))
    return jobs


def size_label(mode) -> str:
    """``square:224`` → ``224``, ``short:448`` → ``short448``, ``native`` → ``native``."""
    if mode.size is None:
        return mode.kind
    return str(mode.size) if mode.kind == "square" else f"{mode.kind}{mode.size}"


def transform_label(spec: str) -> str:
    """A file-name-safe form of a transform: ``roll:0,3`` → ``roll-0_3``, ``rot90:3`` → ``rot90-3``."""
    return spec.replace(":", "-").replace(",", "_")


def _extract_one(paths, encoder, options, prov, out, layer_names, dtype, overwrite, resume, compression, dev, quiet,
                 part=False):
    """Extract ``paths`` into the store ``out``; ``part``: one rank's part of a torchrun run (kept even when empty
    or all unreadable, since the other ranks may have images; no table: rank 0 prints the joined one)."""
    from posvit_cli.core.features.extract import extract_images
    from posvit_cli.core.features.writer import StoreWriter

    writer = StoreWriter(out, provenance=prov, layers=layer_names, dtype=dtype, overwrite=overwrite,
                         resume=resume, compression=compression)
    try:
        with RichProgress(quiet) as progress:
            summary = extract_images(paths, encoder, writer, options, device=dev, progress=progress)
        if len(writer) == 0 and summary.skipped and not part:
            raise _nothing_readable(summary)
        writer.update_provenance(extract_seconds=round(summary.seconds, 3))
    except BaseException as exc:
        if isinstance(exc, _NothingReadable):
            writer.discard()  # a new store with no image: nothing under the final name, no stray .partial
            raise
        writer.abort()
        if writer.work_path is not None and len(writer) and not writer.failed:
            console.print(
                f"{len(writer)} images are saved in '{writer.work_path}'; run the same command with --resume to finish"
            )
        raise
    final = writer.close(complete=True)
    where = str(final) if final else "stdout"
    if not quiet and not part:
        _print_summary(summary, where, encoder)
    return summary, where


def rank_part_path(out: str, rank: int, world_size: int) -> str:
    """The part store a torchrun rank writes beside ``out``: ``feats.h5`` → ``feats.rank0-of-2.h5``."""
    from posvit_cli.core.features.extract import variant_path

    return variant_path(out, [f"rank{rank}-of-{world_size}"])


def _check_joined_outputs(outs: list[str], overwrite: bool) -> None:
    """Before any rank extracts: the joined stores need a file name, and must not exist unless --overwrite."""
    if "-" in outs:
        raise PosvitError("under torchrun the ranks' parts are joined into a file: name it with -o")
    for out in outs:
        if Path(out).exists() and not overwrite:
            raise PosvitError(f"'{out}' already exists: pass --overwrite to replace it (under torchrun --resume "
                              "continues the ranks' unfinished parts, not a finished store)")


def _join_rank_parts(results: list[dict], dist, order, overwrite: bool, quiet: bool, encoder) -> bool:
    """After every rank has written its parts: rank 0 joins each store's parts into it, in the order of the image
    list, and removes them. Returns True on rank 0 (``results`` then hold the joined summaries), False elsewhere.

    A failed rank raises its own error; rank 0 then says which rank failed and keeps the parts for --resume."""
    from posvit_cli.core.distributed import gather_from_ranks
    from posvit_cli.core.features.backends import remove_path
    from posvit_cli.core.features.merge import merge_stores

    per_rank = gather_from_ranks([r["summary"] for r in results], dist)
    if not dist.is_main:
        return False
    failed = [(rank, got) for rank, got in enumerate(per_rank) if isinstance(got, str)]
    if failed:
        rank, why = failed[0]
        raise PosvitError(f"rank {rank} of {dist.world_size} failed ({why}); the finished parts are kept: run the "
                          "same command with --resume")
    for k, result in enumerate(results):
        summary = _joined_summary([got[k] for got in per_rank])
        parts = [rank_part_path(result["output"], r, dist.world_size) for r in range(dist.world_size)]
        if summary.written + summary.already_done == 0 and summary.skipped:
            for p in parts:
                remove_path(Path(p))
            raise _nothing_readable(summary)
        with RichProgress(quiet) as progress:
            merge_stores(parts, result["output"], overwrite=overwrite, order=[str(p) for p in order],
                         progress=progress)
        for p in parts:
            remove_path(Path(p))
        result["summary"] = summary
        if not quiet:
            _print_summary(summary, result["output"], encoder)
    return True


def _joined_summary(summaries: list):
    """One summary of the ranks' summaries: counts added, skipped images listed, the slowest rank's time."""
    from posvit_cli.core.features.extract import ExtractSummary

    return ExtractSummary(requested=sum(s.requested for s in summaries), written=sum(s.written for s in summaries),
                          already_done=sum(s.already_done for s in summaries), tiled=sum(s.tiled for s in summaries),
                          skipped=[x for s in summaries for x in s.skipped],
                          seconds=max(s.seconds for s in summaries))


class _NothingReadable(PosvitError):
    """No image of the run could be read: the run fails and the store it started is discarded."""


def _nothing_readable(summary) -> PosvitError:
    path, reason = summary.skipped[0]
    more = f" (and {len(summary.skipped) - 1} more)" if len(summary.skipped) > 1 else ""
    return _NothingReadable(f"none of the {len(summary.skipped)} images could be read, so no store was written: "
                            f"'{path}': {reason}{more}")


def _print_summary(summary, where, encoder) -> None:
    from rich.table import Table

    t = Table(title=f"posvit extract → {where}", show_header=False, title_justify="left")
    t.add_row("model", f"{encoder.name} (patch {encoder.patch_size}, {encoder.embed_dim} channels, weights {encoder.weights})")
    t.add_row("images written", str(summary.written) + (f" ({summary.tiled} tiled)" if summary.tiled else ""))
    if summary.already_done:
        t.add_row("already in store", str(summary.already_done))
    t.add_row("skipped", str(len(summary.skipped)))
    t.add_row("time", f"{summary.seconds:.1f} s ({summary.images_per_second:.2f} img/s)")
    console.print(t)
    for path, reason in summary.skipped:
        console.print(f"  skipped {path}: {reason}")

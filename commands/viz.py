"""`posvit viz`: pictures of positional bias and its removal, each with its number, and an index page."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, JsonOpt, PosvitCommand, PosvitGroup, QuietOpt, RichProgress, cli_context, command_line, console,
    emit_json, parse_class_names, parse_csv, store_input,
)
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    IgnoreIndexOpt, IntensityOpt, LayerOpt, NormKOpt, RecursiveOpt, StoreArg, Upsample, deprecated_option,
    warn_deprecated,
)
from posvit_cli.core.measure.norms import DEFAULT_K


class Standardise(str, Enum):
    """Per-channel z-scoring before a PCA: both (two columns), on or off."""

    both = "both"
    on = "on"
    off = "off"


class Units(str, Enum):
    """Units of a query point."""

    px = "px"
    token = "token"
    frac = "frac"


def _renamed(new, old, old_flag: str, new_flag: str):
    """The value of ``new_flag``, or of its old spelling ``old_flag`` (with the deprecation warning)."""
    if old is None:
        return new
    warn_deprecated(old_flag, new_flag)
    if new is not None:
        raise PosvitError(f"give {new_flag} once ({old_flag} is its old spelling)")
    return old

app = typer.Typer(
    cls=PosvitGroup,
    name="viz",
    help="Pictures of positional bias and its removal: PCA, similarity maps, positional channels, token norms, crop-shift maps, position-embedding controls, probe plots, "
    "label maps, model comparisons and reports, each with its score, laid out in OUTDIR/index.html.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

OutOpt = Annotated[str, typer.Option("--output", "-o", help="Folder for the figures and index.html (created; figures of earlier runs are kept and indexed).")]
ImagesOpt = Annotated[Optional[str], typer.Option("--images", help="Images to draw, comma-separated file stems, file names or store indices. Default: the first --max-images.", show_default=False)]
MaxImagesOpt = Annotated[int, typer.Option("--max-images", "-n", min=1, help="Images drawn when --images is not given (one row each).")]
PanelOpt = Annotated[int, typer.Option("--panel-size", min=16, max=4096, help="Longer side of each image panel in pixels.")]
RawOpt = Annotated[bool, typer.Option("--raw", help="Also write every per-image map pixel for pixel, without titles, under OUTDIR/raw/.")]
ImageDirOpt = Annotated[Optional[str], typer.Option("--image-dir", help="Folder to look for the source images in first (when they moved since extraction). Default: the stored paths, then the store's folder.", show_default=False)]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Model name in titles and file names. Default: from the store's provenance (model, random weights, debiasing).", show_default=False)]
LabelOld = Annotated[Optional[str], deprecated_option("--label")]
NamesOld = Annotated[Optional[list[str]], deprecated_option("--label")]
ProbeOpt = Annotated[Optional[str], typer.Option("--probe", "-p", help="Probe result JSON of this store (posvit probe -o) for the scores in the titles. Default: probe the drawn images here (holdout, xy and the random control).", show_default=False)]
ScoreOpt = Annotated[bool, typer.Option("--score/--no-score", help="Put the positional probe score (xy stack R²) in titles and row labels.")]
AtOpt = Annotated[Optional[list[str]], typer.Option("--at", help="Query point X,Y (column, row); repeat for several points. Default: the centre of each image.", show_default=False)]
UnitsOpt = Annotated[Units, typer.Option("--units", help="Units of --at: px (pixels of the original image), token (token column,row from 0) or frac (fractions of width,height).")]
VminOpt = Annotated[float, typer.Option("--vmin", help="Similarity at the bottom of the fixed colour scale (the papers' 0.5).")]
VmaxOpt = Annotated[float, typer.Option("--vmax", help="Similarity at the top of the colour scale.")]
AlphaSimOpt = Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Opacity of the similarity colours over the image (the papers' 0.7).")]
CmapSimOpt = Annotated[str, typer.Option("--cmap", help="Matplotlib colormap of the similarity maps.")]


# --------------------------------------------------------------------------------------------------------------
# Shared plumbing


def _outdir(output: str) -> Path:
    if output in ("", "-"):
        raise PosvitError("viz writes image files: name a folder with -o (e.g. -o figures/)")
    p = Path(output)
    if p.exists() and not p.is_dir():
        raise PosvitError(f"output '{output}' is a file: -o names a folder for the figures")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _options(panel_size: int, upsample: str, raw: bool, image_dir: Optional[str], label: Optional[str]):
    from posvit_cli.core.viz.maps import UPSAMPLE_METHODS
    from posvit_cli.core.viz.pictures import FigureOptions

    upsample = getattr(upsample, "value", upsample)
    if panel_size < 16 or panel_size > 4096:
        raise PosvitError(f"--panel-size must be between 16 and 4096 px, got {panel_size}")
    if upsample not in UPSAMPLE_METHODS:
        raise PosvitError(f"unknown --upsample '{upsample}': use {' or '.join(UPSAMPLE_METHODS)}")
    if image_dir is not None and not Path(image_dir).is_dir():
        raise PosvitError(f"--image-dir '{image_dir}' is not a folder")
    return FigureOptions(panel_size=panel_size, upsample=upsample, raw=raw, image_dir=image_dir, label=label,
                         command=command_line())


def _score(store, indices, layer, probe_path, enabled, progress):
    """The score for titles: from --probe (checked against the store), probed here, or None."""
    import warnings

    from posvit_cli.core.errors import PosvitWarning
    from posvit_cli.core.measure.probe import read_probe_result
    from posvit_cli.core.viz.scores import score_from_result, score_store

    if not enabled:
        if probe_path:
            raise PosvitError("--probe gives the scores that --no-score leaves out: use one of them")
        return None
    if probe_path:
        result = read_probe_result(probe_path)
        return score_from_result(result, store, layer=layer, result_name=f"probe result '{probe_path}'")
    try:
        return score_store(store, indices, layer, progress=progress)
    except PosvitError as exc:
        warnings.warn(f"no positional score ({exc})", PosvitWarning, stacklevel=2)
        return None


def _points(at, units):
    from posvit_cli.core.viz.geometry import UNITS, parse_point

    units = getattr(units, "value", units)
    if units not in UNITS:
        raise PosvitError(f"unknown --units '{units}': use {', '.join(UNITS)}")
    if not at:
        return [(0.5, 0.5)], "frac"
    return [parse_point(a) for a in at], units


def _finish(outdir: Path, entries, json_out: bool, quiet: bool) -> None:
    from posvit_cli.core.fileio import json_clean
    from posvit_cli.core.viz.index import update_index

    page = update_index(outdir, entries)
    if not quiet:
        for e in entries:
            more = f" (+ {len(e.extra)} more file{'s' if len(e.extra) != 1 else ''})" if e.extra else ""
            console.print(f"[bold]{e.title}[/]\n  {e.caption}\n  → {outdir / e.file}{more}",
                          markup=True, highlight=False, soft_wrap=True)
        console.print(f"index: {page}")
    if json_out:
        emit_json(json_clean({"output": str(outdir), "index": str(page),
                              "figures": [dataclasses.asdict(e) for e in entries]}))


# --------------------------------------------------------------------------------------------------------------
# Commands


@app.command("pca", cls=PosvitCommand)
def pca(
    store: StoreArg = None,
    output: OutOpt = "viz",
    standardise: Annotated[Standardise, typer.Option("--standardise", help="Per-channel z-scoring before the PCA: both (two columns), on, or off. It can hide or reveal a positional ramp, so both is the default.")] = Standardise.both,
    shared: Annotated[bool, typer.Option("--shared", help="One PCA over the tokens of all drawn images (the same colours mean the same features in every image) instead of one per image.")] = False,
    foreground: Annotated[bool, typer.Option("--foreground", help="Mask the background: cut the first principal component at --fg-threshold (the side holding most border tokens is background) and fit the PCA on the foreground only.")] = False,
    fg_threshold: Annotated[float, typer.Option("--fg-threshold", min=0.0, max=1.0, help="Cut of the min-max scaled first component for --foreground.")] = 0.5,
    clip_percentile: Annotated[float, typer.Option("--clip-percentile", min=0.0, max=50.0, help="Colour range from the P-th to (100-P)-th percentile of each component instead of min-max (outlier tokens otherwise wash colours out).")] = 0.0,
    upsample: Annotated[Upsample, typer.Option("--upsample", help="Enlarging token maps to the image: nearest (the patch grid stays visible) or bilinear.")] = Upsample.nearest,
    layer: LayerOpt = None,
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = 8,
    panel_size: PanelOpt = 256,
    probe: ProbeOpt = None,
    score: ScoreOpt = True,
    raw: RawOpt = False,
    image_dir: ImageDirOpt = None,
    label: NameOpt = None,
    label_old: LabelOld = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """PCA of patch features as RGB beside each image (per image or shared; raw and standardised).

    The published recipe: flatten the token grid, optionally z-score every channel, fit a 3-component PCA,
    min-max each component to [0, 1] and show PC1-3 as red, green, blue. A positional model paints the same
    left-right or top-bottom gradient on every image.
    """
    with cli_context(debug, quiet):
        label = _renamed(label, label_old, "--label", "--name")
        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.viz.pca_figure import pca_figure
        from posvit_cli.core.viz.pictures import require_features, select_images

        variants = {"both": ("raw", "std"), "on": ("std",), "off": ("raw",)}.get(standardise.value)
        if variants is None:
            raise PosvitError(f"unknown --standardise '{standardise}': use both, on or off")
        opts = _options(panel_size, upsample, raw, image_dir, label)
        outdir = _outdir(output)
        with FeatureStore(store_input(store)) as fs:
            ly = require_features(fs, layer)
            idx = select_images(fs, parse_csv(images), max_images)
            with RichProgress(quiet) as progress:
                sc = _score(fs, idx, ly, probe, score, progress)
                entries = pca_figure(fs, outdir, layer=ly, indices=idx, variants=variants, shared=shared,
                                     foreground=foreground, fg_threshold=fg_threshold, clip_percentile=clip_percentile,
                                     score=sc, options=opts, progress=progress)
        _finish(outdir, entries, json_out, quiet)


@app.command("similarity", cls=PosvitCommand)
def similarity(
    store: StoreArg = None,
    output: OutOpt = "viz",
    at: AtOpt = None,
    units: UnitsOpt = Units.px,
    vmin: VminOpt = 0.5,
    vmax: VmaxOpt = 1.0,
    alpha: AlphaSimOpt = 0.7,
    cmap: CmapSimOpt = "coolwarm",
    upsample: Annotated[Upsample, typer.Option("--upsample", help="Enlarging the similarity map to the image: bilinear (as the papers) or nearest.")] = Upsample.bilinear,
    layer: LayerOpt = None,
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = 8,
    panel_size: PanelOpt = 256,
    probe: ProbeOpt = None,
    score: ScoreOpt = True,
    raw: RawOpt = False,
    image_dir: ImageDirOpt = None,
    label: NameOpt = None,
    label_old: LabelOld = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Cosine similarity of query patches to all patches, overlaid on each image (fixed scale 0.5..1).

    The query patch has similarity 1. Each map is titled with r(sim, -dist), the correlation of similarity with
    closeness to the query: near 1 when similarity just falls off with distance, as in positional features.
    """
    with cli_context(debug, quiet):
        label = _renamed(label, label_old, "--label", "--name")
        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.viz.pictures import require_features, select_images
        from posvit_cli.core.viz.similarity import query_tokens, similarity_figure

        opts = _options(panel_size, upsample, raw, image_dir, label)
        points, units = _points(at, units)
        outdir = _outdir(output)
        with FeatureStore(store_input(store)) as fs:
            ly = require_features(fs, layer)
            idx = select_images(fs, parse_csv(images), max_images)
            with RichProgress(quiet) as progress:
                # Every point is checked on every image before anything is probed or drawn.
                query_tokens(fs, idx, points, units, fs.preprocessing)
                sc = _score(fs, idx, ly, probe, score, progress)
                entries = similarity_figure(fs, outdir, points, units=units, layer=ly, indices=idx, vmin=vmin,
                                            vmax=vmax, alpha=alpha, cmap=cmap, score=sc, options=opts,
                                            progress=progress)
        _finish(outdir, entries, json_out, quiet)


@app.command("channels", cls=PosvitCommand)
def channels(
    store: StoreArg = None,
    output: OutOpt = "viz",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Most positional channels per ramp (lr, ud, diag, radial); their union is drawn.")] = 2,
    top_k_old: Annotated[Optional[int], deprecated_option("-k")] = None,
    channel_list: Annotated[Optional[str], typer.Option("--channels", help="Draw these channels (comma-separated indices) instead of the most positional ones. Default: none.", show_default=False)] = None,
    cmap: Annotated[str, typer.Option("--cmap", help="Matplotlib colormap of the channel values.")] = "viridis",
    upsample: Annotated[Upsample, typer.Option("--upsample", help="Enlarging token maps: nearest or bilinear.")] = Upsample.nearest,
    layer: LayerOpt = None,
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = 6,
    panel_size: PanelOpt = 160,
    probe: Annotated[Optional[str], typer.Option("--probe", "-p", help="Probe result JSON of this store with per-channel scores; ranks channels over the whole probed dataset. Default: probe the drawn images here.", show_default=False)] = None,
    image_dir: ImageDirOpt = None,
    label: NameOpt = None,
    label_old: LabelOld = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """The most positional channels as images across several inputs: ramps that repeat whatever the content.

    Rows are channels (ranked by their per-channel probe R²), columns images; each row has one colour scale.
    """
    with cli_context(debug, quiet):
        if top_k_old is not None:  # -k is the number of clusters elsewhere; here it was --top-k
            warn_deprecated("-k (for --top-k)", "--top-k")
            top_k = top_k_old
        label = _renamed(label, label_old, "--label", "--name")
        from posvit_cli.core.measure.probe import read_probe_result
        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.viz.channels import channels_figure
        from posvit_cli.core.viz.pictures import require_features, select_images
        from posvit_cli.core.viz.scores import channel_scores

        if top_k < 1:
            raise PosvitError(f"--top-k must be at least 1, got {top_k}")
        chans = parse_csv(channel_list, int)
        opts = _options(panel_size, upsample, False, image_dir, label)
        outdir = _outdir(output)
        result = read_probe_result(probe) if probe else None
        with FeatureStore(store_input(store)) as fs:
            ly = require_features(fs, layer)
            idx = select_images(fs, parse_csv(images), max_images)
            with RichProgress(quiet) as progress:
                cs = channel_scores(fs, idx, ly, k=top_k, result=result, result_name=f"probe result '{probe}'",
                                    progress=progress)
                entries = channels_figure(fs, outdir, cs, channels=chans or None, layer=ly, indices=idx, cmap=cmap,
                                          options=opts, progress=progress)
        _finish(outdir, entries, json_out, quiet)


@app.command("norms", cls=PosvitCommand)
def norms(
    store: StoreArg = None,
    output: OutOpt = "viz",
    k: NormKOpt = DEFAULT_K,
    cmap: Annotated[str, typer.Option("--cmap", help="Matplotlib colormap of the norms.")] = "viridis",
    upsample: Annotated[Upsample, typer.Option("--upsample", help="Enlarging token maps: nearest (one token stays one block) or bilinear.")] = Upsample.nearest,
    layer: LayerOpt = None,
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = 8,
    panel_size: PanelOpt = 256,
    image_dir: ImageDirOpt = None,
    label: NameOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Token L2-norm maps beside each image, high-norm outlier tokens circled, their share in the titles.

    ViTs trained without registers (DINOv2 without _reg, DeiT-III, OpenCLIP) store global information in a few
    background tokens of very high norm: bright isolated dots here. posvit probe reports the same share per
    image (the token_norms section of its JSON).
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.viz.norms import norms_figure
        from posvit_cli.core.viz.pictures import require_features, select_images

        if not k > 0:
            raise PosvitError(f"--norm-k must be positive, got {k}")
        opts = _options(panel_size, upsample, False, image_dir, label)
        outdir = _outdir(output)
        with FeatureStore(store_input(store)) as fs:
            ly = require_features(fs, layer)
            idx = select_images(fs, parse_csv(images), max_images)
            with RichProgress(quiet) as progress:
                entries = norms_figure(fs, outdir, layer=ly, indices=idx, k=k, cmap=cmap, options=opts,
                                       progress=progress)
        _finish(outdir, entries, json_out, quiet)


@app.command("shift", cls=PosvitCommand)
def shift(
    result: Annotated[str, typer.Argument(help="Crop-shift result JSON (posvit probe shift -o).", show_default=False)],
    output: OutOpt = "viz",
    images: Annotated[Optional[str], typer.Option("--images", help="Images to draw, comma-separated file names or stems, or indices into the result. Default: the first --max-images.", show_default=False)] = None,
    max_images: MaxImagesOpt = 4,
    panel_size: PanelOpt = 256,
    image_dir: Annotated[Optional[str], typer.Option("--image-dir", help="Folder to look for the images in first (when they moved since the probe). Default: the recorded paths.", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Crop-shift maps: view A of each image, every matched token coloured content / absolute / other.

    Green tokens matched the token that shows the same pixels, red ones the token at their own grid position (a
    positional code), grey ones something else; tokens without a counterpart in view B are left uncoloured. The
    fractions are in the titles.
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.measure.shift import read_shift_result
        from posvit_cli.core.viz.shift import select_result_images, shift_figure

        doc = read_shift_result(result)
        if image_dir is not None and not Path(image_dir).is_dir():
            raise PosvitError(f"--image-dir '{image_dir}' is not a folder")
        idx = select_result_images(doc, parse_csv(images), max_images)
        outdir = _outdir(output)
        with RichProgress(quiet) as progress:
            entries = shift_figure(doc, outdir, indices=idx, panel_size=panel_size, image_dir=image_dir,
                                   source=result, command=command_line(), progress=progress)
        _finish(outdir, entries, json_out, quiet)


@app.command("controls", cls=PosvitCommand)
def controls(
    result: Annotated[str, typer.Argument(help="Position-embedding controls result JSON (posvit probe controls -o).", show_default=False)],
    output: OutOpt = "viz",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Stack R² per target with the position embedding as is, zeroed, shuffled and shifted (probe controls).

    One bar per probed control for every target, ± std over images, the random target (the probe's null) beside
    them: bars that fall to the null under zero and shuffle mean the position was read from the embedding.
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.viz.controls import controls_figure, read_controls_result

        doc = read_controls_result(result)
        outdir = _outdir(output)
        _finish(outdir, controls_figure(doc, outdir, command=command_line()), json_out, quiet)


@app.command("probe", cls=PosvitCommand)
def probe_plots(
    results: Annotated[list[str], typer.Argument(help="Probe result JSON files (posvit probe -o), e.g. before and after debiasing.", show_default=False)],
    output: OutOpt = "viz",
    labels: Annotated[Optional[list[str]], typer.Option("--name", help="Name of each result in the plots, once per result in order. Default: model, random weights and debiasing from the result.", show_default=False)] = None,
    labels_old: NamesOld = None,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Layer of the bars and the side-by-side plot. Default: each result's primary layer.", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", min=1, help="Channels highlighted per ramp. Default: the result's --top-k.", show_default=False)] = None,
    top_k_old: Annotated[Optional[int], deprecated_option("-k")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plots of probe results: per-channel R² bars per ramp, the layers × channels fingerprint, stack R² side by side.

    Each result gets its channel bars (and a fingerprint when several layers were probed); all results together
    get one side-by-side plot of stack R² per target, with ± std. PNG and SVG.
    """
    with cli_context(debug, quiet):
        if top_k_old is not None:  # -k is the number of clusters elsewhere; here it was --top-k
            warn_deprecated("-k (for --top-k)", "--top-k")
            top_k = top_k_old
        labels = _renamed(labels or None, labels_old or None, "--label", "--name")
        from posvit_cli.core.measure.probe import read_probe_result
        from posvit_cli.core.viz.plots import channel_bars_plot, fingerprint_plot, result_label, stack_comparison_plot

        if labels and len(labels) != len(results):
            raise PosvitError(f"{len(labels)} --label values for {len(results)} results: give one per result")
        if top_k is not None and top_k < 1:
            raise PosvitError(f"--top-k must be at least 1, got {top_k}")
        docs = [read_probe_result(r) for r in results]
        outdir = _outdir(output)
        names = [f"probe result '{r}'" for r in results]
        if labels:
            labs = list(labels)
        else:
            labs = [result_label(d, Path(r).stem) for d, r in zip(docs, results)]
            if len(set(labs)) < len(labs):  # the same model twice: tell them apart by file
                labs = [f"{lb} [{Path(r).stem}]" for lb, r in zip(labs, results)]
        cmd = command_line()
        entries = []
        for d, lb, nm in zip(docs, labs, names):
            entries += channel_bars_plot(d, outdir, label=lb, layer=layer, top_k=top_k, name=nm, command=cmd)
            if len(d.get("layers") or []) > 1:
                entries += fingerprint_plot(d, outdir, label=lb, name=nm, command=cmd)
        entries += stack_comparison_plot(docs, labs, outdir, layers=[layer] * len(docs), names=names, command=cmd)
        _finish(outdir, entries, json_out, quiet)


@app.command("report", cls=PosvitCommand)
def report_plots(
    report: Annotated[str, typer.Argument(help="Report JSON (posvit report -o report.json).", show_default=False)],
    output: OutOpt = "viz",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Plot a comparison report: positional R² against its null, semantic mIoU with robustness, overclustering.

    One colour per row of the report (encoder, debiasing or input size). PNG and SVG.
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.measure.report import read_report
        from posvit_cli.core.viz.plots import report_plot

        doc = read_report(report)
        outdir = _outdir(output)
        entries = report_plot(doc, outdir, name=f"report '{report}'", command=command_line())
        _finish(outdir, entries, json_out, quiet)


@app.command("clusters", cls=PosvitCommand)
def clusters(
    store: Annotated[Optional[str], typer.Argument(help="Store with label maps (posvit cluster output, maps only or with features), or - / nothing to read a piped store.", show_default=False)] = None,
    output: OutOpt = "viz",
    maps: Annotated[Optional[list[str]], typer.Option("--map", help="Label map to draw (e.g. kmeans_k5); repeat for several. Default: every map in the store.")] = None,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Opacity of the label colours over the image.")] = 0.5,
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = 8,
    panel_size: PanelOpt = 256,
    image_dir: ImageDirOpt = None,
    label: NameOpt = None,
    label_old: LabelOld = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Cluster label maps overlaid on the images, with a legend and each map's positional share η².

    η²(x), η²(y): the share of a token's column (row) variance explained by its cluster. Near 1 the clusters
    are stripes that follow position; near 0 they spread over the image like its content.
    """
    with cli_context(debug, quiet):
        label = _renamed(label, label_old, "--label", "--name")
        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.viz.label_maps import clusters_figure
        from posvit_cli.core.viz.pictures import select_images

        opts = _options(panel_size, "nearest", False, image_dir, label)
        outdir = _outdir(output)
        with FeatureStore(store_input(store)) as fs:
            idx = select_images(fs, parse_csv(images), max_images)
            with RichProgress(quiet) as progress:
                entries = clusters_figure(fs, outdir, map_names=maps, indices=idx, alpha=alpha, options=opts,
                                          progress=progress)
        _finish(outdir, entries, json_out, quiet)


@app.command("segmentation", cls=PosvitCommand)
def segmentation(
    images: Annotated[str, typer.Argument(help="Images: a folder, a file, or a .txt list of paths.", show_default=False)],
    pred: Annotated[str, typer.Argument(help="Folder of predicted label images as posvit segment apply writes them (class k = value k+1, 0 = unlabelled), matched to images by file stem.", show_default=False)],
    output: OutOpt = "viz",
    masks: Annotated[Optional[str], typer.Option("--masks", help="Folder of dense ground-truth masks (classes 0..C-1, --ignore-index = unlabelled; docs/labels.md) matched by stem, for per-image and overall mIoU. Default: none.", show_default=False)] = None,
    truth_old: Annotated[Optional[str], deprecated_option("--truth")] = None,
    suffixes: Annotated[str, typer.Option("--suffixes", help="Label file name endings tried after the image stem (comma-separated; empty = same stem).")] = ",_pred,_prediction,_labels,_label,_mask,_seg,_gt",
    class_names: Annotated[Optional[str], typer.Option("--class-names", help="Legend names of classes 0, 1, ... (prediction values 1, 2, ...; comma-separated). Default: class numbers.", show_default=False)] = None,
    ignore_index: IgnoreIndexOpt = 255,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Opacity of the class colours over the image.")] = 0.5,
    intensity: IntensityOpt = "auto",
    max_images: MaxImagesOpt = 8,
    panel_size: PanelOpt = 256,
    recursive: RecursiveOpt = False,
    label: Annotated[Optional[str], typer.Option("--name", help="Name of the segmentation in the title and file name. Default: the prediction folder's name.", show_default=False)] = None,
    label_old: LabelOld = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Segmentation predictions (label images) overlaid on their images, with mIoU when ground truth is given."""
    with cli_context(debug, quiet):
        import warnings

        from posvit_cli.core.errors import PosvitWarning
        from posvit_cli.core.io.images import list_images, parse_intensity
        from posvit_cli.core.io.labels import find_label_files, stem
        from posvit_cli.core.viz.label_maps import segmentation_figure

        label = _renamed(label, label_old, "--label", "--name")
        truth = _renamed(masks, truth_old, "--truth", "--masks")
        parse_intensity(intensity)
        if max_images < 1:
            raise PosvitError(f"--max-images must be at least 1, got {max_images}")
        sfx = [s.strip() for s in suffixes.split(",")]
        paths = list_images([images], recursive=recursive)
        stems = [stem(p) for p in paths]
        found, missing = find_label_files(stems, pred, sfx)
        if not found:
            raise PosvitError(f"no prediction in '{pred}' matches an image of '{images}' by file stem "
                              f"(e.g. {stems[0]}.png or {stems[0]}_pred.png)")
        if missing:
            warnings.warn(f"{len(missing)} image(s) have no prediction and are left out (e.g. {missing[0]})",
                          PosvitWarning, stacklevel=1)
        gt = None
        if truth:
            gt, gt_missing = find_label_files(list(found), truth, sfx)
            if not gt:
                raise PosvitError(f"no ground truth in '{truth}' matches the predicted images by file stem")
            if gt_missing:
                warnings.warn(f"{len(gt_missing)} image(s) have no ground truth: not scored (e.g. {gt_missing[0]})",
                              PosvitWarning, stacklevel=1)
        drawn = [p for p in paths if stem(p) in found][:max_images]
        opts = _options(panel_size, "nearest", False, None, None)
        outdir = _outdir(output)
        with RichProgress(quiet) as progress:
            entries = segmentation_figure(drawn, found, outdir, truth=gt, class_names=parse_class_names(class_names),
                                          ignore_index=None if ignore_index < 0 else ignore_index, alpha=alpha, intensity=intensity,
                                          label=label or Path(pred).resolve().name, options=opts, progress=progress)
        _finish(outdir, entries, json_out, quiet)


@app.command("compare", cls=PosvitCommand)
def compare(
    stores: Annotated[list[str], typer.Argument(help="Feature stores of the same images from different models (or before/after debiasing); one may be - for a piped store.", show_default=False)],
    output: OutOpt = "viz",
    labels: Annotated[Optional[list[str]], typer.Option("--name", help="Name of each model, once per store in order. Default: from each store's provenance.", show_default=False)] = None,
    labels_old: NamesOld = None,
    probes: Annotated[Optional[list[str]], typer.Option("--probe", "-p", help="Probe result JSON of each store, once per store in order (each checked against its store). Default: probe the drawn images of every store here.")] = None,
    at: AtOpt = None,
    units: UnitsOpt = Units.px,
    standardise: Annotated[bool, typer.Option("--standardise", help="Z-score channels per image before the PCA (the same for every model).")] = False,
    vmin: VminOpt = 0.5,
    vmax: VmaxOpt = 1.0,
    alpha: AlphaSimOpt = 0.7,
    cmap: CmapSimOpt = "coolwarm",
    layer: LayerOpt = None,
    images: ImagesOpt = None,
    max_images: MaxImagesOpt = 4,
    panel_size: PanelOpt = 224,
    score: ScoreOpt = True,
    image_dir: ImageDirOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """One grid for a report: images as rows, models as columns (PCA and similarity), each model's score on top.

    Images are matched across stores by file name. Each model's column group is headed by its xy stack R²
    (from --probe or probed here on the same drawn images, so the numbers compare).
    """
    with cli_context(debug, quiet):
        labels = _renamed(labels or None, labels_old or None, "--label", "--name")
        import contextlib

        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.viz.compare import compare_figure

        if sum(1 for s in stores if s == "-") > 1:
            raise PosvitError("only one store can come from stdin (-)")
        if probes and len(probes) != len(stores):
            raise PosvitError(f"{len(probes)} --probe files for {len(stores)} stores: give one per store, in order")
        if labels and len(labels) != len(stores):
            raise PosvitError(f"{len(labels)} --label values for {len(stores)} stores: give one per store, in order")
        points, units = _points(at, units)
        opts = _options(panel_size, "nearest", False, image_dir, None)
        outdir = _outdir(output)
        with contextlib.ExitStack() as stack:
            fss = [stack.enter_context(FeatureStore(store_input(s))) for s in stores]
            with RichProgress(quiet) as progress:
                scores = None
                if score or probes:
                    scores = _compare_scores(fss, layer, images, max_images, probes, score, progress)
                entries = compare_figure(fss, outdir, labels=labels, scores=scores, layers=[layer] * len(fss),
                                         images=parse_csv(images), max_images=max_images, points=points, units=units,
                                         standardise=standardise, vmin=vmin, vmax=vmax, alpha=alpha, cmap=cmap,
                                         options=opts, progress=progress)
        _finish(outdir, entries, json_out, quiet)


def _compare_scores(fss, layer, images, max_images, probes, enabled, progress):
    """Scores of every store on the images the comparison draws (the same images for every model)."""
    from posvit_cli.core.viz.compare import shared_images
    from posvit_cli.core.viz.pictures import require_features

    chosen = shared_images(fss, parse_csv(images), max_images)
    out = []
    for k, fs in enumerate(fss):
        ly = require_features(fs, layer)
        first = {Path(r.path).name: r.index for r in reversed(fs.records)}
        idx = [first[n] for n in chosen]
        out.append(_score(fs, idx, ly, probes[k] if probes else None, enabled, progress) if idx else None)
    return out

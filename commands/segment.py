"""`posvit segment`: trainable (scribble) segmentation with classical + ViT features.

Sub-commands: ``train`` (scribbles → ``.posvit-seg`` model), ``apply`` (model → label images), ``eval``
(mIoU and the positional diagnostic) and ``bench`` (held-out mIoU over rounds of simulated corrections).
"""

from __future__ import annotations

import contextlib
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, DeviceOpt, JsonOpt, PosvitCommand, PosvitGroup, QuietOpt, RichProgress, cli_context, console,
    emit_json, parse_csv,
)
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import write_json_atomic
from posvit_cli.options import (
    FolderOutOpt, IgnoreIndexOpt, IntensityOpt, OverwriteOpt, RecursiveOpt, SeedOpt, SizeOpt, ThreadsOpt, deprecated_option,
    warn_deprecated,
)
from posvit_cli.options import LayerOpt as _SharedLayerOpt


class PcaMode(str, Enum):
    """Where the PCA of the ViT tokens is fitted."""

    per_image = "per-image"
    shared = "shared"


class ClassifierKind(str, Enum):
    """Pixel classifier."""

    xgboost = "xgboost"
    random_forest = "random-forest"
    logistic = "logistic"


class LabelFormat(str, Enum):
    """File format of the label images."""

    auto = "auto"
    png = "png"
    tif = "tif"

app = typer.Typer(
    cls=PosvitGroup,
    name="segment",
    help="Trainable (scribble) segmentation with classical + ViT features: train, apply, eval, bench.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# -- options shared by several sub-commands --------------------------------------------------------------------
FeaturesOpt = Annotated[Optional[str], typer.Option("--features", "-f", help="Feature store (posvit extract output) holding the images' ViT tokens, matched by path, then file name. Default: none.", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Extract ViT features on the fly with this encoder (any name posvit extract takes). Default: none (classical features only, unless --features).", show_default=False)]
WeightsOpt = Annotated[str, typer.Option("--weights", "-w", help="Encoder weights for --model: pretrained, random (smoke tests) or a .safetensors/.pth file or posvit checkpoint.")]
LayerOpt = _SharedLayerOpt
DimsOpt = Annotated[int, typer.Option("--vit-dims", min=1, help="PCA components of the ViT features kept per pixel.")]
PcaOpt = Annotated[PcaMode, typer.Option("--pca", help="PCA of the ViT tokens: per-image (z-score, PCA and min-max fitted on each image, as the reference) or shared (fitted once on the training images and stored in the model).")]
ClassicalOpt = Annotated[bool, typer.Option("--classical/--no-classical", help="Use the classical (Weka-style) filter bank.")]
SigmasOpt = Annotated[str, typer.Option("--sigmas", help="Gaussian scales of the classical features, in pixels (true σ).")]
WekaOpt = Annotated[bool, typer.Option("--weka-compat", help="Reproduce the reference featuriser's classical channels exactly: int(0.4·σ) blurs with its truncation and nearest border, its DoG sign and membrane order.")]
GroupsOpt = Annotated[str, typer.Option("--feature-groups", help="Classical feature groups: intensity, gradient, hessian, dog, membrane.")]
ClassifierOpt = Annotated[ClassifierKind, typer.Option("--classifier", help="xgboost (boosted trees), random-forest (XGBoost forest) or logistic.")]
TreesOpt = Annotated[int, typer.Option("--trees", min=1, help="Boosting rounds (xgboost) or trees (random-forest).")]
DepthOpt = Annotated[int, typer.Option("--depth", min=1, help="Maximum tree depth.")]
LrOpt = Annotated[float, typer.Option("--learning-rate", min=0.0, help="Boosting learning rate (xgboost).")]
BalanceOpt = Annotated[bool, typer.Option("--balance/--no-balance", help="Weight classes by inverse labelled-pixel counts (sample weights).")]
TileOpt = Annotated[int, typer.Option("--tile", min=16, help="Process images in tiles of this many pixels per side (with a halo of context), bounding memory.")]
# Deprecated: ground truth was 1-based (0 = unlabelled) with --gt-offset added; it is now 0-based with --ignore-index.
GtOffsetOpt = Annotated[Optional[int], deprecated_option("--gt-offset")]
GtOld = Annotated[Optional[Path], deprecated_option("--gt")]


def _masks_or_old(masks: Optional[Path], gt_old: Optional[Path]) -> Optional[Path]:
    """--masks, or its old spelling --gt (with the deprecation warning)."""
    if gt_old is None:
        return masks
    warn_deprecated("--gt", "--masks")
    if masks is not None:
        raise PosvitError("give --masks once (--gt is its old spelling)")
    return gt_old


def _device(spec: str) -> str:
    import os
    import sys

    # Without an NVIDIA device node, "auto" is the CPU: skip importing torch (seconds) for classical features.
    if (spec or "auto").strip().lower() == "auto" and sys.platform.startswith("linux") and not os.path.exists("/dev/nvidia0"):
        return "cpu"
    from posvit_cli.core.device import resolve_device

    return str(resolve_device(spec))


def _classical_config(enabled: bool, sigmas: str, weka: bool, groups: str):
    from posvit_cli.core.segment.filters import ClassicalConfig

    if not enabled:
        return None
    return ClassicalConfig(sigmas=tuple(parse_csv(sigmas, float)), groups=tuple(parse_csv(groups)), weka_compat=weka)


def _threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# ======================================================================================================== train
@app.command("train", cls=PosvitCommand)
def train(
    images: Annotated[list[str], typer.Argument(metavar="IMAGES...", help="Image files, folders or .txt lists; images without a label file are left out.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model file to write (.posvit-seg).", show_default=False)],
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Folder of scribble label images named like the images (NAME.png, NAME_labels.tif, ...): 0 = unlabelled, 1..K = classes; RGB label images are mapped by colour (black = unlabelled). Required.", show_default=False)] = None,
    features: FeaturesOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = "pretrained",
    layer: LayerOpt = None,
    size: SizeOpt = "native",
    vit_dims: DimsOpt = 9,
    pca: PcaOpt = "per-image",
    classical: ClassicalOpt = True,
    sigmas: SigmasOpt = "1,2,4,8,16",
    weka_compat: WekaOpt = False,
    feature_groups: GroupsOpt = "intensity,gradient,hessian,dog,membrane",
    intensity: IntensityOpt = "auto",
    class_names: Annotated[Optional[str], typer.Option("--class-names", help="Class names for label values 1, 2, ..., comma-separated. Default: the label values found (class1, class2, ...; colours for RGB labels).", show_default=False)] = None,
    classifier: ClassifierOpt = "xgboost",
    trees: TreesOpt = 100,
    depth: DepthOpt = 8,
    learning_rate: LrOpt = 0.3,
    balance: BalanceOpt = True,
    max_samples: Annotated[int, typer.Option("--max-samples", min=0, help="Train on at most this many labelled pixels (uniform subsample; 0 = all).")] = 500_000,
    tile: TileOpt = 1024,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    labels_old: Annotated[Optional[Path], deprecated_option("-l")] = None,
    classes_old: Annotated[Optional[str], deprecated_option("--classes")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train a pixel classifier from scribbles and save it as one model file.

    Per-pixel features are the classical filter bank (58 channels by default) plus, with --features or
    --model, the images' ViT tokens reduced by PCA and upsampled to pixels. The classifier (XGBoost by default,
    classes balanced by sample weights) is fitted on the labelled pixels.
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.segment.classifiers import ClassifierConfig
        from posvit_cli.core.io.images import list_images, parse_intensity
        from posvit_cli.core.segment.training_labels import load_training_labels
        from posvit_cli.core.segment.segmenter import FeatureSpec, train_segmenter, warn

        t0 = time.perf_counter()
        if labels_old is not None:
            warn_deprecated("-l (for --labels)", "--labels (-l means --layer in every command)")
            if labels is not None:
                raise PosvitError("give --labels once (-l is its old short form)")
            labels = labels_old
        if labels is None:
            raise PosvitError("name the scribble label folder with --labels")
        if classes_old is not None:
            warn_deprecated("--classes", "--class-names")
            if class_names is not None:
                raise PosvitError("give --class-names once (--classes is its old spelling)")
            class_names = classes_old
        pca, classifier = pca.value, classifier.value
        if features and model:
            raise PosvitError("give either --features (a store) or --model (extract on the fly), not both")
        if output.suffix != ".posvit-seg":
            raise PosvitError(f"name the model file with the .posvit-seg suffix, e.g. '{output.with_suffix('.posvit-seg')}'")
        if output.exists() and not overwrite:
            raise PosvitError(f"'{output}' already exists: pass --overwrite to replace it")
        parse_intensity(intensity)
        _threads(threads)
        dev = _device(device)
        classical_cfg = _classical_config(classical, sigmas, weka_compat, feature_groups)
        clf_cfg = ClassifierConfig(kind=classifier, trees=trees, depth=depth, learning_rate=learning_rate,
                                   balance=balance, device="cuda" if dev.startswith("cuda") else "cpu",
                                   threads=threads, seed=seed)
        paths = [str(p) for p in list_images(images, recursive=recursive)]
        found = load_training_labels(paths, labels, _class_name_list(class_names))
        for p in found.missing:
            warn(f"no label file for '{p}' in '{labels}': image left out")
        for p in found.unlabelled_images:
            warn(f"the labels of '{p}' have no labelled pixel: image left out")
        if not found.images:
            raise PosvitError("none of the label images has a labelled pixel (0 = unlabelled, 1..K = classes)")
        if found.colour_table and not quiet:
            _print_colour_table(found.colour_table, found.classes)
        train_paths = [im.path for im in found.images]
        with contextlib.ExitStack() as stack, RichProgress(quiet) as progress:
            vit_cfg, reduced_for, shared = _vit_for_training(
                stack, train_paths, features, model, weights, layer, size, vit_dims, pca, intensity, dev, seed,
                progress,
            )
            spec = FeatureSpec(classical=classical_cfg, vit=vit_cfg, intensity=intensity)
            seg = train_segmenter(
                found.images, found.classes, spec, clf_cfg, reduced_for=reduced_for, shared_pca=shared,
                max_samples=max_samples or None, seed=seed, tile=tile, device=dev, threads=threads,
                progress=progress,
            )
        seg.training["seconds"] = round(time.perf_counter() - t0, 3)
        seg.training["labels"] = str(labels)
        seg.save(output, overwrite=overwrite)
        if not quiet:
            _print_training(seg, output)
        if json_out:
            emit_json({"model": str(output), "classes": seg.classes.to_dict(), "features": len(seg.feature_names),
                       "training": seg.training,
                       "colour_table": [{"colour": list(c), "value": v} for c, v in (found.colour_table or [])]})


def _class_name_list(text: Optional[str]) -> Optional[list[str]]:
    """--class-names: a comma list, or a text file with one name per line (None when not given)."""
    if text is None:
        return None
    path = Path(text)
    names = ([ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.is_file()
             else parse_csv(text))
    if not names:
        raise PosvitError("--class-names is empty")
    return names


def _vit_for_training(stack, paths, features, model, weights, layer, size, dims, pca, intensity, dev, seed, progress):
    """The ViT configuration, a ``reduced_for`` callable and the shared PCA (all None without ViT features)."""
    if not features and not model:
        return None, None, None
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.segment.vit_pixels import ExtractedStore, TokenSource, VitConfig, fit_shared_pca

    if features:
        store = stack.enter_context(FeatureStore(features))
    else:
        ext = stack.enter_context(ExtractedStore(paths, model=model, weights=weights, layer=layer or "final",
                                                 size=size, intensity=intensity, device=dev, seed=seed,
                                                 progress=progress))
        store = ext.store
        layer = None
    src = TokenSource(store, layer)
    for p in paths:
        src.check_finite(p)  # fail before any training on an image missing from the store or with NaN features
    cfg = VitConfig(dims=dims, pca=pca, layer=src.layer, encoder=src.identity())
    shared = fit_shared_pca([src.token_rows(p) for p in paths], dims) if pca == "shared" else None
    return cfg, (lambda path, hw: src.reduced(path, hw, dims, shared)), shared


def _print_colour_table(table, classes) -> None:
    from rich.table import Table

    t = Table(title="label colours → classes", title_justify="left")
    t.add_column("colour")
    t.add_column("value", justify="right")
    t.add_column("class")
    t.add_row("(0, 0, 0)", "0", "unlabelled")
    for colour, value in table:
        name = classes.names[classes.values.index(value)] if value in classes.values else "-"
        t.add_row(str(tuple(colour)), str(value), name)
    console.print(t)


def _print_training(seg, output) -> None:
    from rich.table import Table

    tr = seg.training
    t = Table(title=f"posvit segment train → {output}", show_header=False, title_justify="left")
    t.add_row("images", str(len(tr["images"])))
    t.add_row("classes", ", ".join(f"{n} (value {v}): {tr['pixels_per_class'][n]} px"
                                     for v, n in zip(seg.classes.values, seg.classes.names)))
    vit = seg.spec.vit
    feats = []
    if seg.spec.classical:
        feats.append(f"{len(seg.feature_names) - (vit.dims if vit else 0)} classical")
    if vit:
        feats.append(f"{vit.dims} ViT ({vit.encoder.get('model', '?')}, {vit.layer}, PCA {vit.pca})")
    t.add_row("features", " + ".join(feats))
    t.add_row("classifier", f"{tr['classifier']['kind']} on {tr['samples']} pixels")
    t.add_row("time", f"{tr['seconds']:.1f} s (features {tr['feature_seconds']:.1f} s, fit {tr['fit_seconds']:.1f} s)")
    console.print(t)


# ======================================================================================================== apply
@app.command("apply", cls=PosvitCommand)
def apply(
    model_file: Annotated[Path, typer.Argument(metavar="MODEL", help="A .posvit-seg model file (posvit segment train).", show_default=False)],
    images: Annotated[list[str], typer.Argument(metavar="IMAGES...", help="Image files, folders or .txt lists of paths.", show_default=False)],
    output: FolderOutOpt,
    features: FeaturesOpt = None,
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="Weights file for on-the-fly extraction when the one recorded in the model has moved (its hash must match). Default: the recorded weights.", show_default=False)] = None,
    probabilities: Annotated[bool, typer.Option("--probabilities/--no-probabilities", help="Also write NAME_probs.tif: float32 (K, H, W) class probabilities.")] = False,
    fmt: Annotated[LabelFormat, typer.Option("--format", help="Label image format: auto (PNG for values ≤ 255, else TIFF), png or tif.")] = LabelFormat.auto,
    crf: Annotated[bool, typer.Option("--crf/--no-crf", help="Refine with the built-in mean-field CRF (Gaussian + edge-aware kernels).")] = False,
    crf_iterations: Annotated[int, typer.Option("--crf-iterations", min=1, help="Mean-field iterations.")] = 5,
    crf_spatial_weight: Annotated[float, typer.Option("--crf-spatial-weight", min=0.0, help="Weight of the Gaussian (σ 3 px) smoothness kernel.")] = 3.0,
    crf_edge_weight: Annotated[float, typer.Option("--crf-edge-weight", min=0.0, help="Weight of the edge-aware (guided-filter, radius 8 px) kernel.")] = 5.0,
    tile: TileOpt = 1024,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first unreadable image instead of skipping it.")] = False,
    recursive: RecursiveOpt = False,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Segment images with a trained model and write one label image per image.

    Labels carry the class values of the training labels (palette PNG, or TIFF beyond 255); images of any size
    are processed in tiles with a halo of context, in bounded memory. Existing outputs are replaced only with
    --overwrite (checked before anything is written).
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.io.images import list_images
        from posvit_cli.core.segment.apply import apply_segmenter, check_outputs, label_suffix, readable_images
        from posvit_cli.core.segment.crf import CrfConfig
        from posvit_cli.core.segment.segmenter import load_segmenter

        seg = load_segmenter(model_file)
        _threads(threads)
        dev = _device(device)
        seg.classifier.set_runtime("cuda" if dev.startswith("cuda") else "cpu", threads)
        crf_cfg = CrfConfig(iterations=crf_iterations, spatial_weight=crf_spatial_weight,
                            bilateral_weight=crf_edge_weight) if crf else None
        suffix = label_suffix(fmt.value, seg.classes.values)
        paths = [str(p) for p in list_images(images, recursive=recursive)]
        good, skipped = readable_images(paths, strict=strict)
        if not good:
            raise PosvitError("none of the images could be read")
        check_outputs(good, output, suffix=suffix, probabilities=probabilities, overwrite=overwrite)
        output.mkdir(parents=True, exist_ok=True)
        t_all = time.perf_counter()
        with contextlib.ExitStack() as stack, RichProgress(quiet) as progress:
            src = _vit_for_apply(stack, seg, good, features, weights, dev, progress)
            for p in good if src is not None else []:
                src.check_finite(p)  # NaN features are refused before the first label image is written
            results = apply_segmenter(seg, good, output, token_source=src, suffix=suffix,
                                      probabilities=probabilities, crf=crf_cfg, tile=tile, device=dev,
                                      threads=threads, progress=progress)
        if not quiet:
            console.print(f"segmented {len(results)} image(s) → {output} in {time.perf_counter() - t_all:.1f} s"
                          + (f"; skipped {len(skipped)}" if skipped else ""))
        if json_out:
            emit_json({"model": str(model_file), "outputs": results, "skipped": skipped,
                       "crf": crf_cfg.to_dict() if crf_cfg else None})


def _vit_for_apply(stack, seg, paths, features, weights, dev, progress):
    """A TokenSource for the model's ViT features (None when the model uses none), checked against the model."""
    vit = seg.spec.vit
    if vit is None:
        if features:
            raise PosvitError("this model uses no ViT features: drop --features")
        return None
    from posvit_cli.core.features.store import FeatureStore
    from posvit_cli.core.segment.vit_pixels import ExtractedStore, TokenSource, identity_mismatch

    ident = vit.encoder
    if features:
        src = TokenSource(stack.enter_context(FeatureStore(features)), vit.layer)
        what = f"the features in '{features}'"
    else:
        if ident.get("debias") or ident.get("transform"):
            raise PosvitError("this model was trained on debiased or transformed features: pass --features with a "
                              "store extracted the same way")
        if not ident.get("model"):
            raise PosvitError("this model's features came from a store without a model name: pass --features")
        pre = ident.get("preprocessing") or {}
        from posvit_cli.core.features.rebuild import weights_from_provenance

        w = weights_from_provenance(ident, override=weights)
        try:
            ext = stack.enter_context(ExtractedStore(
                paths, model=ident["model"], weights=w, layer=vit.layer, size=str(pre.get("size", "native")),
                intensity=str(pre.get("intensity", "auto")), device=dev, seed=int(ident.get("seed", 0)),
                progress=progress))
        except PosvitError as exc:
            raise PosvitError(f"cannot re-extract the model's ViT features ({exc}); pass --features STORE") from exc
        src = TokenSource(ext.store, vit.layer)
        what = f"the features extracted with {ident['model']} (weights {w})"
    bad = identity_mismatch(ident, src.identity())
    if bad:
        raise PosvitError(f"{what} differ from those the model was trained on ({', '.join(bad)} differ)")
    return src


# ========================================================================================================= eval
@app.command("eval", cls=PosvitCommand)
def eval_(
    pred_or_model: Annotated[str, typer.Argument(metavar="PRED_OR_MODEL", help="Predicted label images (files or a folder), or a .posvit-seg model to apply to --images.", show_default=False)],
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Folder of dense ground-truth masks named like the predictions / images: classes 0..K-1, --ignore-index = unlabelled (class k is prediction value k+1; docs/labels.md). Default: none (positional diagnostic only).", show_default=False)] = None,
    images: Annotated[Optional[list[str]], typer.Option("--images", "-i", help="Images to segment when evaluating a model (repeatable; files, folders or lists). Default: none.", show_default=False)] = None,
    features: FeaturesOpt = None,
    ignore_index: IgnoreIndexOpt = 255,
    gt_offset: GtOffsetOpt = None,
    grid: Annotated[int, typer.Option("--grid", min=4, help="Longer side of the coarse grid on which the prediction maps are probed for positional ramps.")] = 64,
    threshold: Annotated[float, typer.Option("--bias-threshold", min=0.0, help="Flag an image when the probe's best R² of its prediction exceeds that of its ground truth (or 0 without one) by more than this.")] = 0.3,
    tile: TileOpt = 1024,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    gt_old: GtOld = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Score segmentations: mIoU per image and over the dataset, per-class IoU, and a positional diagnostic.

    The diagnostic probes the predicted class maps (probabilities when a model is given) for positional ramps
    with the linear probe of posvit probe; a classifier that learned position shows ramps in its output.
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.io.images import list_images
        from posvit_cli.core.io.labels import LabelCheck, read_label_image, stem
        from posvit_cli.core.segment.apply import read_ground_truth, read_probabilities
        from posvit_cli.core.segment.evaluate import SegmentationScores
        from posvit_cli.core.segment.segmenter import load_grey, load_segmenter, segment_image, warn
        from posvit_cli.core.segment.training_labels import pair_label_files

        gt = _masks_or_old(masks, gt_old)
        is_model = Path(pred_or_model).is_file() and Path(pred_or_model).suffix == ".posvit-seg"
        seg = None
        prob_files: dict[str, str] = {}
        if is_model:
            if not images:
                raise PosvitError("evaluating a model needs the images to segment: pass --images")
            seg = load_segmenter(pred_or_model)
            paths = [str(p) for p in list_images(images)]
        else:
            if images:
                raise PosvitError("--images is for evaluating a model; predictions are read as they are")
            paths = [str(p) for p in list_images([pred_or_model])]
            # NAME_probs.tif next to NAME.png (posvit segment apply --probabilities) feeds the diagnostic.
            stems = {stem(p) for p in paths}
            prob_files = {stem(p)[: -len("_probs")]: p for p in paths
                          if stem(p).endswith("_probs") and stem(p)[: -len("_probs")] in stems}
            paths = [p for p in paths if p not in prob_files.values()]
        names = [stem(p) for p in paths]
        gts: dict[str, Path] = {}
        if gt is not None:
            by_path = pair_label_files(paths, gt)
            gts = {stem(p): f for p, f in by_path.items()}
            missing = [stem(p) for p in paths if p not in by_path]
            if not gts:
                raise PosvitError(f"no ground-truth file in '{gt}' matches the {'images' if is_model else 'predictions'} by name")
            for n in missing:
                warn(f"no ground truth for '{n}' in '{gt}': scored for the positional diagnostic only")
        class_names = dict(zip(seg.classes.values, seg.classes.names)) if seg else None
        scores = SegmentationScores(ignore_value=0, grid=grid, threshold=threshold, class_names=class_names)
        gt_check = _gt_check(gt_offset, len(seg.classes) if seg else None)
        pred_check = LabelCheck("prediction", len(seg.classes) if seg else None,
                                fix="add 1 (posvit predictions are 1..K, 0 = unlabelled; see docs/labels.md)")
        with contextlib.ExitStack() as stack, RichProgress(quiet) as progress:
            src = None
            if seg is not None:
                _threads(threads)
                dev = _device(device)
                seg.classifier.set_runtime("cuda" if dev.startswith("cuda") else "cpu", threads)
                src = _vit_for_apply(stack, seg, paths, features, None, dev, progress)
            progress("eval", 0, len(paths))
            for i, (p, n) in enumerate(zip(paths, names)):
                probs = None
                if seg is not None:
                    grey = load_grey(p, seg.spec.intensity)
                    reduced = src.reduced(p, grey.shape, seg.spec.vit.dims, seg.shared_pca) if src else None
                    pred, probs = segment_image(seg, grey, reduced, tile=tile, probabilities=True, device=dev,
                                                threads=threads)
                else:
                    pred = read_label_image(p, "prediction").values
                    pred_check.add(pred, p)
                    if n in prob_files:
                        probs = read_probabilities(prob_files[n], pred.shape)
                g = None
                if n in gts:
                    g = read_ground_truth(gts[n], seg.classes if seg else None, ignore_index=ignore_index,
                                          offset=gt_offset, check=gt_check)
                scores.add(n, pred, g, probs, class_values=seg.classes.values if seg else None)
                progress("eval", i + 1, len(paths))
        gt_check.finish()
        pred_check.finish()
        summary = scores.summary()
        if not quiet:
            _print_eval(scores.images, summary)
        if json_out:
            emit_json({"source": pred_or_model, "images": scores.images, "summary": summary})


def _gt_check(gt_offset, num_classes):
    """The off-by-one check of the ground truth; warns that --gt-offset is deprecated when it is given."""
    from posvit_cli.core.io.labels import LabelCheck

    if gt_offset is not None:
        warn_deprecated("--gt-offset", "0-based ground truth (classes 0..K-1, unlabelled = --ignore-index; "
                                       "docs/labels.md)")
    return LabelCheck("mask", num_classes, fix="subtract 1 from the ground truth (class k is k-1, unlabelled "
                                               "= --ignore-index); see docs/labels.md")


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _print_eval(images, summary) -> None:
    from rich.table import Table

    t = Table(title="posvit segment eval", title_justify="left")
    t.add_column("image")
    t.add_column("mIoU (classes in GT)", justify="right")
    t.add_column("positional R² pred", justify="right")
    t.add_column("R² GT", justify="right")
    t.add_column("biased?")
    for e in images:
        t.add_row(e["name"], _fmt(e["class_avg_miou"]), _fmt(e["positional_r2"]["max"]),
                  _fmt(e["positional_r2_gt"]["max"] if e["positional_r2_gt"] else None),
                  "[bold red]yes[/]" if e["positionally_biased"] else "no")
    console.print(t)
    if summary["class_avg_miou_mean"] is not None:
        console.print(f"per-image class-average mIoU: {summary['class_avg_miou_mean']:.4f} ± "
                      f"{summary['class_avg_miou_std']:.4f}   dataset mIoU: {_fmt(summary['dataset_miou'], 4)}")
        console.print("per-class IoU: " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary["per_class_iou"].items()))
    flagged = summary["positionally_biased_images"]
    if flagged:
        console.print(f"[bold red]positional bias:[/] {len(flagged)} of {summary['images']} prediction(s) follow "
                      f"position (excess R² > {summary['bias_threshold']}): {', '.join(flagged)}")
    else:
        console.print(f"positional diagnostic: no prediction follows position (threshold {summary['bias_threshold']})")


# ======================================================================================================== bench
@app.command("bench", cls=PosvitCommand)
def bench(
    images: Annotated[list[str], typer.Argument(metavar="IMAGES...", help="Images (files, folders or lists), in order: the first --train are training images, the rest are held out.", show_default=False)],
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Folder of dense ground-truth masks named like the images: classes 0..K-1, --ignore-index = unlabelled (docs/labels.md). Required.", show_default=False)] = None,
    n_train: Annotated[int, typer.Option("--train", min=1, help="Number of training images (the first ones).")] = 5,
    rounds: Annotated[int, typer.Option("--rounds", min=0, help="Correction rounds after the initial scribbles.")] = 3,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Encoder to compare (repeatable); its features are extracted on the fly. Default: none.", show_default=False)] = None,
    weights: Annotated[Optional[list[str]], typer.Option("--weights", "-w", help="Weights for each --model, in order (one value applies to all). Default: pretrained.", show_default=False)] = None,
    features: Annotated[Optional[list[str]], typer.Option("--features", "-f", help="Precomputed feature store to compare (repeatable). Default: none.", show_default=False)] = None,
    layer: LayerOpt = None,
    size: SizeOpt = "native",
    vit_dims: DimsOpt = 9,
    pca: PcaOpt = "per-image",
    classical: ClassicalOpt = True,
    sigmas: SigmasOpt = "1,2,4,8,16",
    weka_compat: WekaOpt = False,
    feature_groups: GroupsOpt = "intensity,gradient,hessian,dog,membrane",
    intensity: IntensityOpt = "auto",
    scribbles: Annotated[int, typer.Option("--scribbles", min=1, help="Initial scribbles per class per training image.")] = 3,
    corrections: Annotated[int, typer.Option("--corrections", min=0, help="Wrong regions per training image that get a scribble each round.")] = 3,
    length: Annotated[Optional[int], typer.Option("--scribble-length", min=1, help="Steps per scribble. Default: a quarter of the image's shorter side.", show_default=False)] = None,
    width: Annotated[int, typer.Option("--scribble-width", min=1, help="Scribble width in pixels.")] = 1,
    margin: Annotated[float, typer.Option("--margin", min=0.0, help="Minimum distance of scribbles from class boundaries, in pixels.")] = 3.0,
    ignore_index: IgnoreIndexOpt = 255,
    gt_offset: GtOffsetOpt = None,
    classifier: ClassifierOpt = "xgboost",
    trees: TreesOpt = 100,
    depth: DepthOpt = 8,
    learning_rate: LrOpt = 0.3,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    seed: SeedOpt = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the JSON results to this file. Default: none.", dir_okay=False, show_default=False)] = None,
    gt_old: GtOld = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Benchmark scribble segmentation: held-out mIoU per round, with and without ViT features, per encoder.

    Scribbles are drawn from the ground truth of the training images (thin random walks away from class
    boundaries); each round retrains, scores the held-out images, and adds scribbles in the largest wrongly
    predicted regions of the training images.
    """
    with cli_context(debug, quiet):
        from posvit_cli.core.segment.classifiers import ClassifierConfig
        from posvit_cli.core.io.images import list_images
        from posvit_cli.core.segment.apply import read_ground_truth
        from posvit_cli.core.segment.bench import BenchConfig, run_benchmark
        from posvit_cli.core.segment.training_labels import pair_label_files
        from posvit_cli.core.features.store import FeatureStore
        from posvit_cli.core.segment.vit_pixels import ExtractedStore, TokenSource

        gt = _masks_or_old(masks, gt_old)
        if gt is None:
            raise PosvitError("name the ground-truth folder with --masks")
        pca, classifier = pca.value, classifier.value
        models = list(model or [])
        wts = list(weights or [])
        if wts and len(wts) not in (1, len(models)):
            raise PosvitError(f"{len(wts)} --weights for {len(models)} --model: give one for each, or one for all")
        if len(wts) == 1:
            wts = wts * len(models)
        wts = wts or ["pretrained"] * len(models)
        if rounds < 0 or scribbles < 1:
            raise PosvitError("--rounds must be ≥ 0 and --scribbles ≥ 1")
        _threads(threads)
        dev = _device(device)
        paths = [str(p) for p in list_images(images)]
        found = pair_label_files(paths, gt)
        missing = [p for p in paths if p not in found]
        if missing:
            raise PosvitError(f"no ground truth for '{missing[0]}' in '{gt}' (every benchmark image needs one)")
        gt_check = _gt_check(gt_offset, None)
        ground = {p: read_ground_truth(found[p], None, ignore_index=ignore_index, offset=gt_offset, check=gt_check)
                  for p in paths}
        gt_check.finish()
        classical_cfg = _classical_config(classical, sigmas, weka_compat, feature_groups)
        clf_cfg = ClassifierConfig(kind=classifier, trees=trees, depth=depth, learning_rate=learning_rate,
                                   device="cuda" if dev.startswith("cuda") else "cpu", threads=threads, seed=seed)
        cfg = BenchConfig(n_train=n_train, rounds=rounds, per_class=scribbles, corrections=corrections,
                          length=length, width=width, margin=margin, seed=seed)
        with contextlib.ExitStack() as stack, RichProgress(quiet) as progress:
            encoders = []
            for f in features or []:
                st = stack.enter_context(FeatureStore(f))
                label = st.model or Path(f).stem
                encoders.append((_unique(label, encoders), TokenSource(st, layer)))
            for m, w in zip(models, wts):
                ext = stack.enter_context(ExtractedStore(paths, model=m, weights=w, layer=layer or "final",
                                                         size=size, intensity=intensity, device=dev, seed=seed,
                                                         progress=progress))
                encoders.append((_unique(m, encoders), TokenSource(ext.store)))
            result = run_benchmark(paths, ground, encoders, classical=classical_cfg, vit_dims=vit_dims, pca=pca,
                                   classifier=clf_cfg, bench=cfg, intensity=intensity, threads=threads,
                                   progress=progress)
        result["models"] = [{"name": n, "identity": s.identity()} for n, s in encoders]
        if output is not None:
            write_json_atomic(output, result)
        if not quiet:
            _print_bench(result)
        if json_out:
            emit_json(result)


def _unique(name: str, existing) -> str:
    taken = {n for n, _ in existing}
    if name not in taken:
        return name
    i = 2
    while f"{name}#{i}" in taken:
        i += 1
    return f"{name}#{i}"


def _print_bench(result) -> None:
    from rich.table import Table

    n_rounds = len(result["configs"][0]["rounds"]) if result["configs"] else 0
    t = Table(title=f"posvit segment bench: class-average mIoU on {len(result['test_images'])} held-out images "
                    f"(trained on {len(result['train_images'])})", title_justify="left")
    t.add_column("features")
    for r in range(n_rounds):
        frac = result["configs"][0]["rounds"][r]["labelled_fraction"]
        t.add_column(f"round {r}\n({100 * frac:.2f}% px)", justify="right")
    for c in result["configs"]:
        t.add_row(c["name"], *[f"{x['class_avg_miou_mean']:.3f} ± {x['class_avg_miou_std']:.3f}" for x in c["rounds"]])
    console.print(t)

"""`posvit cluster`: overclustering mIoU against masks, and k-means label maps of a feature store."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, DeviceOpt, JsonOpt, QuietOpt, RichProgress, cli_context, command_line, console, emit_json, parse_csv,
    parse_seeds, sigterm_as_interrupt, stdout_is_pipe, store_input,
)
from posvit_cli.core.errors import PosvitError
from posvit_cli.core.fileio import write_json_atomic
from posvit_cli.options import (
    ClassNamesOpt, IgnoreIndexOpt, LayerOpt, MasksOpt, OverwriteOpt, StoreArg, ThreadsOpt,
)


class Protocol(str, Enum):
    """Overclustering evaluation protocol."""

    standard = "standard"
    in_training = "in-training"


class Fit(str, Enum):
    """How k-means is fitted on more tokens than the in-memory cap."""

    stream = "stream"
    sample = "sample"


class Matching(str, Enum):
    """When clusters are matched to classes one-to-one (Hungarian) rather than greedily many-to-one."""

    reference = "reference"
    hungarian = "hungarian"


def cluster(
    store: StoreArg = None,
    k: Annotated[str, typer.Option("-k", "--k", help="Numbers of clusters, comma-separated (e.g. 21,100,300,500).")] = "21,100,300,500",
    masks: MasksOpt = None,
    ignore_index: IgnoreIndexOpt = 255,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Number of classes, background included. Default: the number of --class-names, else the largest mask label + 1.", show_default=False)] = None,
    class_names: ClassNamesOpt = None,
    seeds: Annotated[Optional[str], typer.Option("--seeds", help="k-means seeds, comma-separated or a range such as 0-4. Default: 0-4 (standard), 1 (in-training), 0 (no masks).", show_default=False)] = None,
    pca_dim: Annotated[int, typer.Option("--pca-dim", min=0, help="PCA dimensions after the z-score; 0 keeps all channels.")] = 50,
    protocol: Annotated[Protocol, typer.Option("--protocol", help="standard (Leopart/NeCo: patch-level tokens, 5 seeds, 100 iterations, precision matching) or in-training (the RASA/Leopart training-time variant: features upsampled to the masks, seed 1, 50 iterations, IoU and precision matching).")] = Protocol.standard,
    matching: Annotated[Matching, typer.Option("--matching", help="reference (Leopart's PredsmIoU: Hungarian only when k equals the number of classes, greedy many-to-one for every other k, smaller ones included) or hungarian (Hungarian for every k up to the number of classes, posvit's earlier rule).")] = Matching.reference,
    per_image: Annotated[bool, typer.Option("--per-image", help="Cluster each image on its own (channel-wise standardised, 15 restarts) instead of the whole store.")] = False,
    n_init: Annotated[Optional[int], typer.Option("--n-init", min=1, help="k-means restarts (best inertia kept). Default: 5, or 15 with --per-image.", show_default=False)] = None,
    max_iter: Annotated[Optional[int], typer.Option("--max-iter", min=1, help="k-means iterations. Default: 100 (standard), 50 (in-training), 300 (--per-image).", show_default=False)] = None,
    eval_size: Annotated[str, typer.Option("--eval-size", help="Evaluation grid, N or HxW: masks are resized to it and cluster maps upsampled to it (nearest).")] = "100",
    max_points_per_cluster: Annotated[Optional[int], typer.Option("--max-points-per-cluster", min=1, help="Fit k-means on a random k·N subset of tokens, then label all (faiss's default is 256). Default: fit on all tokens.", show_default=False)] = None,
    fit: Annotated[Fit, typer.Option("--fit", help="Tokens beyond the in-memory cap (2**25 values, e.g. 671,088 tokens after PCA 50): stream runs exact Lloyd passes over every token, read from the store chunk by chunk each pass (the in-memory result for the same seed, one store read per iteration); sample fits on a capped random sample, then labels every token (faster, approximate). Below the cap both fit on all tokens in memory.")] = Fit.stream,
    position_bins: Annotated[int, typer.Option("--position-bins", min=2, max=16, help="Blocks per side of the token grid for the position dependence of the clusters (2: quadrants).")] = 2,
    null_draws: Annotated[int, typer.Option("--null-draws", min=39, max=9999, help="Rolled copies of the label maps in the position dependence's null (the smallest p-value is 1/(1 + draws)).")] = 99,
    layer: LayerOpt = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write label maps (kmeans_k{k}, and the matched classes with --masks) to this store (.h5, .zarr, .zarr.zip, - for stdout), for `posvit viz`. Default: stdout when it is a pipe and --json is off, else none.", show_default=False)] = None,
    results_json: Annotated[Optional[Path], typer.Option("--results-json", help="Write the results JSON here. Default: next to -o (labels.h5 → labels.cluster.json), else none.", dir_okay=False, show_default=False)] = None,
    overwrite: OverwriteOpt = False,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Overclustering mIoU against masks, and k-means label maps of a feature store.

    With --masks: the overclustering evaluation of Ziegler & Asano (2022) as Leopart/NeCo run it (z-score → PCA 50 →
    k-means for seeds 0-4 → Hungarian matching when k equals the number of classes, precision-based many-to-one
    for any other k → dataset-wide mIoU, mean ± std over seeds). Without masks: dataset-wide k-means label maps, or
    per-image decompositions with --per-image. Every clustering reports its position dependence: how much more the
    cluster labels tell about the token's grid quadrant than for the same label maps rolled to random offsets
    (1 = as much as the cluster sizes allow, about 0 = no more than by chance), with its p-value.
    """
    # SIGTERM (a scheduler's time limit, `kill`) stops it like Ctrl-C: exit 130, no output under its final name.
    with cli_context(debug, quiet), sigterm_as_interrupt():
        _run(**locals())


def _parse_eval_size(text: str) -> tuple[int, int]:
    s = text.lower().replace("×", "x")
    try:
        parts = [int(v) for v in s.split("x")] if "x" in s else [int(s)] * 2
    except ValueError:
        raise PosvitError(f"cannot read --eval-size '{text}': use N or HxW (e.g. 100 or 100x150)") from None
    if len(parts) != 2 or min(parts) < 1:
        raise PosvitError(f"--eval-size '{text}' must be N or HxW with positive sides")
    return parts[0], parts[1]


def _parse_class_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    p = Path(text)
    if p.is_file():
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    else:
        names = parse_csv(text)
    if not names:
        raise PosvitError("--class-names is empty")
    return names


def _results_path(results_json, output) -> Path | None:
    if results_json is not None:
        return Path(results_json)
    if output and output != "-":
        from posvit_cli.core.features.backends import split_store_suffix

        return Path(split_store_suffix(output)[0] + ".cluster.json")
    return None


def _run(store, k, masks, ignore_index, num_classes, class_names, seeds, pca_dim, protocol, matching, per_image,
         n_init, max_iter, eval_size, max_points_per_cluster, fit, position_bins, null_draws, layer, output, results_json,
         overwrite, threads, device, json_out, quiet, **_):
    protocol = protocol.value
    ks = parse_csv(k, int)
    if not ks:
        raise PosvitError("-k needs at least one number of clusters")
    if len(set(ks)) != len(ks):
        raise PosvitError(f"-k lists a value twice: {k}")
    if any(v < 1 for v in ks):
        raise PosvitError(f"-k values must be at least 1 (got {k})")
    if protocol not in ("standard", "in-training"):
        raise PosvitError(f"unknown --protocol '{protocol}': use standard or in-training")
    if per_image and masks is not None:
        raise PosvitError("--per-image makes label maps only; drop --masks (or --per-image to evaluate)")
    if pca_dim < 0:
        raise PosvitError("--pca-dim must be 0 (no PCA) or positive")
    if n_init is not None and n_init < 1:
        raise PosvitError("--n-init must be at least 1")
    if max_iter is not None and max_iter < 1:
        raise PosvitError("--max-iter must be at least 1")
    if max_points_per_cluster is not None and max_points_per_cluster < 1:
        raise PosvitError("--max-points-per-cluster must be at least 1")
    if num_classes is not None and num_classes < 1:
        raise PosvitError("--num-classes must be at least 1")
    if not 2 <= position_bins <= 16 or not 39 <= null_draws <= 9999:
        raise PosvitError("--position-bins must be 2-16 and --null-draws 39-9999")
    posdep = dict(position_bins=position_bins, null_draws=null_draws, fit=fit.value)
    seed_list = parse_seeds(seeds) if seeds is not None else None
    names = _parse_class_names(class_names)
    eval_hw = _parse_eval_size(eval_size)
    if output is None and not json_out and stdout_is_pipe():
        output = "-"
    if output == "-" and json_out:
        raise PosvitError("--json prints to stdout, where the label store would go: name a file with -o")
    res_path = _results_path(results_json, output)
    for p in [res_path] if res_path else []:
        if p.exists() and not overwrite:
            raise PosvitError(f"'{p}' already exists: pass --overwrite to replace it")
        if not p.parent.exists():
            raise PosvitError(f"output folder '{p.parent}' does not exist")
    if output and output != "-" and Path(output).exists() and not overwrite:
        raise PosvitError(f"'{output}' already exists: pass --overwrite to replace it")

    import torch

    from posvit_cli.core.cluster import overclustering as C
    from posvit_cli.core.cluster.masks import load_masks
    from posvit_cli.core.device import resolve_device
    from posvit_cli.core.features.store import FeatureStore

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    source = store_input(store)
    with FeatureStore(source) as fs, RichProgress(quiet) as progress:
        if len(fs) == 0:
            raise PosvitError(f"'{fs.source}' holds no images")
        if per_image:
            out = C.per_image_kmeans(fs, ks, n_init=n_init or 15, max_iter=max_iter or 300,
                                     seed=(seed_list or [0])[0], layer=layer, device=dev, progress=progress,
                                     **posdep)
        elif masks is not None:
            mask_set = load_masks(fs, masks, eval_size=eval_hw, ignore_index=None if ignore_index < 0 else ignore_index,
                                  num_classes=num_classes, class_names=names, progress=progress)
            out = C.overcluster_eval(fs, mask_set, ks, protocol=protocol, seeds=seed_list, pca_dim=pca_dim,
                                     n_init=n_init, max_iter=max_iter, layer=layer, device=dev,
                                     max_points_per_cluster=max_points_per_cluster, keep_maps=bool(output),
                                     matching=matching.value, progress=progress, **posdep)
            out["masks"] = str(masks)
            if mask_set.resized:
                out["masks_resized"] = mask_set.resized
        else:
            out = C.cluster_dataset(fs, ks, seeds=seed_list or [0], pca_dim=pca_dim, n_init=n_init or 5,
                                    max_iter=max_iter or 100, layer=layer, device=dev,
                                    max_points_per_cluster=max_points_per_cluster, progress=progress, **posdep)
        maps = out.pop("maps", None)
        out = {"command": command_line(), "store": fs.source, "device": str(dev), **out}
        where = None
        if output and maps:
            prov = {"kind": "cluster-labels", "command": command_line(), "settings": out.get("settings", {})}
            where = C.write_label_store(output, fs, maps, prov, overwrite=overwrite) or "stdout"
            out["label_store"] = where
            out["maps"] = sorted(maps)
    if res_path is not None:
        write_json_atomic(res_path, out)
    if not quiet:
        _print_table(out, where, res_path)
    if json_out:
        emit_json(out)


def _print_table(out: dict, where, res_path) -> None:
    from rich.table import Table

    from posvit_cli.core.cluster.position_dependence import DEPENDENCE_THRESHOLD, P_THRESHOLD, dependence_cell

    settings = out.get("settings", {})
    mode = settings.get("mode") or f"overclustering, {settings.get('protocol')} protocol"
    title = f"posvit cluster: {mode} ({out.get('n_images')} images)"
    t = Table(title=title, title_justify="left")
    t.add_column("k", justify="right")
    evaluated = any("miou_mean" in r for r in out["results"])
    if evaluated:
        t.add_column("matching")
        t.add_column("mIoU (%)", justify="right")
    t.add_column("position dep.", justify="right")
    for r in out["results"]:
        row = [str(r["k"])]
        if evaluated:
            n = len(r["miou_per_seed"])
            m = f"{100 * r['miou_mean']:.2f}" + (f" ± {100 * r['miou_std']:.2f}" if n > 1 else "")
            row += [r["matching"], m]
        row.append(dependence_cell(r.get("position_dependence")))
        t.add_row(*row)
    console.print(t)
    pd = out["results"][0]["position_dependence"] if out["results"] else None
    if pd:
        console.print(f"position dep.: mutual information of cluster and {pd['bins']}×{pd['bins']} grid block above "
                      f"its mean over {pd['draws']} rolled copies, as a share of the most the clusters allow; "
                      f"* = position-driven (p < {P_THRESHOLD:g}, dependence ≥ {DEPENDENCE_THRESHOLD:g})")
    if evaluated:
        console.print(f"seeds {settings.get('seeds')}, PCA {out['pca']['dims']} dims "
                      f"({100 * out['pca']['explained_variance_ratio']:.1f} % of the variance), "
                      f"{out.get('n_eval_pixels')} evaluated pixels")
        if out.get("classes_absent_from_masks"):
            console.print(f"classes absent from every mask (IoU 0 in the mean): "
                          f"{', '.join(out['classes_absent_from_masks'])}")
    if where:
        console.print(f"label maps → {where}")
    if res_path:
        console.print(f"results → {res_path}")

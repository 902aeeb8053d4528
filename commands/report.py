"""`posvit report`: one table across stores (encoders, debiasing, input sizes): positional R², semantic mIoU,
robustness and overclustering."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    RichProgress, cli_context, command_line, console, parse_class_names, parse_csv, parse_seeds,
)
from posvit_cli.commands.probe import Head, Resolution
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    ClassNamesOpt, DebugOpt, DeviceOpt, IgnoreIndexOpt, JsonOpt, LayerOpt, MasksOpt, QuietOpt, SeedOpt, SeedsOpt,
    ThreadsOpt, deprecated_option, warn_deprecated,
)


def report(
    stores: Annotated[list[str], typer.Argument(help="Feature stores: one row per untransformed store (an encoder, a debiasing, an input size); stores made with `extract --transform` join the row of their untransformed store as robustness scores.", show_default=False)],
    masks: MasksOpt = None,
    output: Annotated[Optional[list[str]], typer.Option("--output", "-o", help="Write the report: .md (Markdown table) or .json (the full document); repeat for both. Default: none.", show_default=False)] = None,
    names: Annotated[Optional[str], typer.Option("--names", help="Row names, comma-separated, one per untransformed store. Default: file names without suffix.", show_default=False)] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", min=2, help="Number of classes. Default: the largest mask label + 1 (of the first store's masks).", show_default=False)] = None,
    ignore_index: IgnoreIndexOpt = 255,
    class_names: ClassNamesOpt = None,
    k: Annotated[Optional[str], typer.Option("-k", "--k", help="k values of the clustering columns, comma-separated: the overclustering mIoU and the clusters' position dependence with --masks (default 100), and without masks the position dependence only when -k is given (a k-means of every store: on a 10,000² px micrograph's store k = 100 takes minutes and 2 GB). k above a store's token count is skipped.", show_default=False)] = None,
    seeds: SeedsOpt = None,
    cluster_seeds: Annotated[Optional[str], deprecated_option("--cluster-seeds")] = None,
    shift: Annotated[bool, typer.Option("--shift/--no-shift", help="Crop-shift correspondence of each store's encoder (content and grid match, as `posvit probe shift` in its default settings) on up to 4 of its images, where the encoder can be rebuilt from the store and the image files are found; else a note says why not.")] = True,
    no_cluster: Annotated[bool, typer.Option("--no-cluster", help="Skip the clustering columns (overclustering mIoU, position dependence): the slowest ones.")] = False,
    head: Annotated[Head, typer.Option("--head", help="Semantic probe head: linear (batch norm + linear, AdamW, early stopping) or ridge (closed form).")] = Head.linear,
    resolution: Annotated[Resolution, typer.Option("--resolution", help="Semantic probe: tokens (masks at the token grid) or pixels (logits bilinearly upsampled to the masks).")] = Resolution.tokens,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.0, max=1.0, help="Fraction of the images held out and scored by the semantic probe (split by image name, the same for every store).")] = 0.2,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Most epochs of the linear head.")] = 50,
    fraction: Annotated[float, typer.Option("--fraction", min=0.0, max=1.0, show_default="0.0278", help="Positional probe: fraction of each image's tokens used for training, 1/36 as published (raise it for tiny grids).")] = 1 / 36,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Positional probe: sampling masks per image.")] = 6,
    seed: SeedOpt = 0,
    layer: LayerOpt = None,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 1,
    cluster_threads: Annotated[Optional[int], typer.Option("--cluster-threads", min=1, help="Torch CPU threads of k-means. Default: torch's choice (all cores).", show_default=False)] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare stores in one table: positional R², semantic mIoU, robustness and overclustering per store.

    Rows are encoders (raw, RASA, ALiBi, NoPE, baselines) or input sizes of one encoder (a resolution sweep made
    with `posvit extract --size 224,448,672,896`): does the debiasing keep the semantics, and does it survive high
    resolution? Every row is measured on the same images with the same settings.

    --seeds are the overclustering's k-means seeds (default 0-4). --threads defaults to 1 here: the probes'
    products are small, and intra-op threads on shared cores slow them down.
    """
    with cli_context(debug, quiet):
        if cluster_seeds is not None:
            warn_deprecated("--cluster-seeds", "--seeds")
            if seeds is not None:
                raise PosvitError("give --seeds only (--cluster-seeds is its old spelling)")
            seeds = cluster_seeds
        _run(stores, None if masks is None else str(masks), output, names, num_classes, ignore_index, class_names,
             k, parse_seeds("0-4" if seeds is None else seeds), no_cluster, shift, head.value, resolution.value,
             test_fraction, epochs, fraction, repeats, seed, layer, device, threads, cluster_threads, json_out, quiet)


def _run(stores, masks, output, names, num_classes, ignore_index, class_names, k, seed_list, no_cluster, shift, head,
         resolution, test_fraction, epochs, fraction, repeats, seed, layer, device, threads, cluster_threads,
         json_out, quiet) -> None:
    import contextlib

    from posvit_cli.core.device import resolve_device
    from posvit_cli.core.measure.probe import make_settings
    from posvit_cli.core.measure.report import compare_stores, write_report
    from posvit_cli.core.measure.semantic import SemanticSettings
    from posvit_cli.core.features.store import FeatureStore

    outputs = list(output or [])
    for o in outputs:
        if not o.lower().endswith((".md", ".json")):
            raise PosvitError(f"report output '{o}': name a .md (Markdown) or .json file")
    if len(set(stores)) != len(stores):
        raise PosvitError("a store is named twice")
    ks = parse_csv(k if k is not None else ("100" if masks else ""), int)
    if not no_cluster and k is not None and not ks:
        raise PosvitError("-k needs at least one number of clusters (or pass --no-cluster)")
    positional, _ = make_settings("holdout", targets=("xy", "lr", "ud", "radial", "random"), fraction=fraction,
                                  repeats=repeats, seed=seed, per_channel=False, extras=False)
    semantic = SemanticSettings(head=head, resolution=resolution, test_fraction=test_fraction, epochs=epochs,
                                seed=seed).validated()
    row_names = parse_csv(names) if names else None
    dev = str(resolve_device(device))
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(FeatureStore(s)) for s in stores]
        with RichProgress(quiet) as progress:
            doc = compare_stores(
                opened, names=row_names, masks=masks, num_classes=num_classes,
                ignore_index=None if ignore_index < 0 else ignore_index,
                class_names=parse_class_names(class_names), positional=positional,
                semantic=semantic, ks=ks, cluster_seeds=seed_list, cluster=not no_cluster, shift=shift,
                layer=layer, device=dev, threads=threads, cluster_threads=cluster_threads, progress=progress,
            )
    doc["command"] = command_line()
    for o in outputs:
        write_report(o, doc)
    if not quiet:
        _print(doc, outputs)
    if json_out:
        from posvit_cli.core.measure.report import report_json

        sys.stdout.write(report_json(doc) + "\n")
        sys.stdout.flush()


def _print(doc: dict, outputs: list[str]) -> None:
    """The report on stderr, transposed (one column per store) so that several stores fit a terminal."""
    from rich.table import Table

    from posvit_cli.core.measure.report import report_table

    header, body = report_table(doc)
    table = Table(title=f"posvit report · {len(doc['rows'])} stores · {doc['seconds']:.1f} s", title_justify="left")
    table.add_column("")
    for row in body:
        table.add_column(row[0], justify="right")
    for i, h in enumerate(header[1:], start=1):
        table.add_row(h, *[row[i] for row in body])
    console.print(table)
    for note in doc.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", markup=True)
    for o in outputs:
        console.print(f"report → {o}")

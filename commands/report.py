"""`posvit report`: one table across stores (encoders, debiasing, input sizes): positional R², semantic mIoU,
robustness and overclustering."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from posvit_cli._cli import (
    DebugOpt, JsonOpt, QuietOpt, RichProgress, cli_context, command_line, console, parse_csv,
)
from posvit_cli.core.errors import PosvitError


def report(
    stores: Annotated[list[str], typer.Argument(help="Feature stores: one row per untransformed store (an encoder, a debiasing, an input size); stores made with `extract --transform` join the row of their untransformed store as robustness scores.", show_default=False)],
    masks: Annotated[Optional[str], typer.Option("--masks", help="Folder of dense masks (class indices 0..C-1, --ignore-index = unlabelled; docs/labels.md) matched by file stem: adds the semantic probe, robustness and overclustering. Default: none (positional R² only).")] = None,
    output: Annotated[Optional[list[str]], typer.Option("--output", "-o", help="Write the report: .md (Markdown table) or .json (the full document); repeat for both. Default: none.")] = None,
    names: Annotated[Optional[str], typer.Option("--names", help="Row names, comma-separated, one per untransformed store. Default: file names without suffix.")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Number of classes. Default: the largest mask label + 1 (of the first store's masks).")] = None,
    ignore_index: Annotated[int, typer.Option("--ignore-index", help="Mask value never trained on or scored; -1 for none.")] = 255,
    class_names: Annotated[Optional[str], typer.Option("--class-names", help="Class names, comma-separated, in label order. Default: 0, 1, ...")] = None,
    k: Annotated[str, typer.Option("-k", "--k", help="Overclustering k values, comma-separated (k above a store's token count is skipped).")] = "100",
    cluster_seeds: Annotated[str, typer.Option("--cluster-seeds", help="k-means seeds of the overclustering, comma-separated or a range.")] = "0-4",
    no_cluster: Annotated[bool, typer.Option("--no-cluster", help="Skip the overclustering (the slowest column).")] = False,
    head: Annotated[str, typer.Option("--head", help="Semantic probe head: linear (batch norm + linear, AdamW, early stopping) or ridge (closed form).")] = "linear",
    resolution: Annotated[str, typer.Option("--resolution", help="Semantic probe: tokens (masks at the token grid) or pixels (logits bilinearly upsampled to the masks).")] = "tokens",
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Fraction of the images held out and scored by the semantic probe (split by image name, the same for every store).")] = 0.2,
    epochs: Annotated[int, typer.Option("--epochs", help="Most epochs of the linear head.")] = 50,
    fraction: Annotated[float, typer.Option("--fraction", help="Positional probe: fraction of each image's tokens used for training (raise it for tiny grids).")] = 1 / 36,
    repeats: Annotated[int, typer.Option("--repeats", help="Positional probe: sampling masks per image.")] = 6,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the positional masks, the image split and the head.")] = 0,
    layer: Annotated[Optional[str], typer.Option("--layer", "-l", help="Stored layer to measure. Default: each store's default (final).")] = None,
    device: Annotated[str, typer.Option("--device", help="Torch device: cpu, cuda, cuda:N or auto.")] = "cpu",
    threads: Annotated[int, typer.Option("--threads", help="Torch CPU threads of the probes (their products are small).")] = 1,
    cluster_threads: Annotated[Optional[int], typer.Option("--cluster-threads", help="Torch CPU threads of k-means. Default: torch's choice (all cores).")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare stores in one table: positional R², semantic mIoU, robustness and overclustering per store.

    Rows are encoders (raw, RASA, ALiBi, NoPE, baselines) or input sizes of one encoder (a resolution sweep made
    with `posvit extract --size 224,448,672,896`): does the debiasing keep the semantics, and does it survive high
    resolution? Every row is measured on the same images with the same settings.
    """
    with cli_context(debug, quiet):
        _run(**locals())


def _seeds(text: str) -> list[int]:
    """``0-4`` or ``0,3,7`` → a list of seeds."""
    out: list[int] = []
    for part in parse_csv(text):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep and lo else [int(part)])
        except ValueError:
            raise PosvitError(f"cannot read --cluster-seeds '{text}': use 0,1,2 or a range such as 0-4") from None
    if not out:
        raise PosvitError("--cluster-seeds is empty")
    return out


def _run(stores, masks, output, names, num_classes, ignore_index, class_names, k, cluster_seeds, no_cluster, head,
         resolution, test_fraction, epochs, fraction, repeats, seed, layer, device, threads, cluster_threads,
         json_out, quiet, **_):
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
    if threads < 1 or (cluster_threads is not None and cluster_threads < 1):
        raise PosvitError("--threads and --cluster-threads must be at least 1")
    if len(set(stores)) != len(stores):
        raise PosvitError("a store is named twice")
    ks = parse_csv(k, int)
    if masks and not no_cluster and not ks:
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
                class_names=parse_csv(class_names) if class_names else None, positional=positional,
                semantic=semantic, ks=ks, cluster_seeds=_seeds(cluster_seeds), cluster=not no_cluster,
                layer=layer, device=dev, threads=threads, cluster_threads=cluster_threads, progress=progress,
            )
    doc["command"] = command_line()
    for o in outputs:
        write_report(o, doc)
    if not quiet:
        _print(doc, outputs)
    if json_out:
        from posvit_cli.core.measure.report import _json_text

        sys.stdout.write(_json_text(doc) + "\n")
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

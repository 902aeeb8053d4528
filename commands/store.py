"""`posvit store`: inspect, merge and subset feature stores."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from posvit_cli._cli import PosvitCommand, PosvitGroup, RichProgress, cli_context, console, emit_json, store_input, \
    store_output
from posvit_cli.options import DebugOpt, JsonOpt, OverwriteOpt, QuietOpt, StoreArg, StoreOutOpt

app = typer.Typer(cls=PosvitGroup, help="Inspect, merge and subset feature stores.", no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})


@app.command("info", cls=PosvitCommand)
def info(
    store: StoreArg = None,
    checksums: Annotated[bool, typer.Option("--checksums", help="Add a SHA-256 of each image's stored feature bytes (to compare stores).")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show a store's images, grids, layers and provenance (an unfinished <store>.partial too)."""
    with cli_context(debug, quiet):
        from posvit_cli.core.features.store import FeatureStore

        source = _unfinished_or_given(store_input(store))
        with FeatureStore(source, allow_partial=True) as fs:
            summary = fs.info()
            debias, tiling, preprocessing, dtype = fs.debias, fs.tiling, fs.preprocessing, fs.dtype
            model = f"{fs.model} (weights {fs.weights}, sha256 {str(fs.weights_sha256)[:12]})"
            summary["images"] = [
                {"path": r.path, "grid": list(r.grid), "orig_size": list(r.orig_size), "proc_size": list(r.proc_size)}
                | ({"sha256": fs.checksum(r.index)} if checksums else {})
                for r in fs.records
            ]
        if not summary["complete"]:
            summary["unfinished"] = _unfinished_note(source, summary["n_images"])
        if json_out:
            emit_json(summary)
        if not quiet:
            from rich.table import Table

            t = Table(title=f"feature store {summary['source']}", show_header=False, title_justify="left")
            if not summary["complete"]:
                t.add_row("UNFINISHED", summary["unfinished"])
            t.add_row("format", f"{summary['format']} (schema {summary['schema_version']})")
            t.add_row("images", str(summary["n_images"]) + ("" if summary["complete"] else " committed"))
            t.add_row("grids", ", ".join(f"{g} ×{n}" for g, n in summary["groups"].items()) or "-")
            t.add_row("layers", ", ".join(summary["layers"]))
            t.add_row("channels", str(summary["channels"]))
            t.add_row("model", model)
            t.add_row("preprocessing", str(preprocessing))
            t.add_row("dtype", dtype)
            if tiling:
                t.add_row("tiling", f"{tiling.get('tile')} px tiles, {tiling.get('overlap')} px overlap")
            if debias:
                t.add_row("debias", str(debias))
            if summary["maps"]:
                t.add_row("maps", ", ".join(summary["maps"]))
            console.print(t)


def _unfinished_or_given(source: str) -> str:
    """``source``, or its ``.partial`` when only an interrupted write of it exists (what the user asks about)."""
    from pathlib import Path

    from posvit_cli.core.features.backends import PARTIAL_SUFFIX

    partial = Path(source + PARTIAL_SUFFIX)
    return str(partial) if source != "-" and not Path(source).exists() and partial.exists() else source


def _unfinished_note(source: str, n_images: int) -> str:
    from posvit_cli.core.features.backends import PARTIAL_SUFFIX

    final = source[: -len(PARTIAL_SUFFIX)] if source.endswith(PARTIAL_SUFFIX) else source
    return (f"an interrupted write, {n_images} images committed: `posvit extract ... -o {final} --resume` "
            "continues it, `--overwrite` starts again")


@app.command("merge", cls=PosvitCommand)
def merge(
    stores: Annotated[list[str], typer.Argument(help="Stores to join, in order.", show_default=False)],
    output: StoreOutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Join stores made with the same settings (e.g. shards from `extract --shard i/n`)."""
    with cli_context(debug, quiet):
        from posvit_cli.core.errors import PosvitError

        output = store_output(output)
        if output == "-" and json_out:
            raise PosvitError("--json prints to stdout, where the merged store would go: name a file with -o")
        run_merge(stores, output, overwrite=overwrite, json_out=json_out, quiet=quiet)


def run_merge(stores: list[str], output: str, *, overwrite: bool, json_out: bool, quiet: bool) -> None:
    """The merge both spellings run (`posvit store merge` and `posvit extract --merge`): one core call, one
    report. ``output`` is a path or ``-`` (stdout, already checked to be a pipe). Call inside :func:`cli_context`."""
    from posvit_cli.core.features.merge import merge_stores

    with RichProgress(quiet) as progress:
        n = merge_stores(stores, output, overwrite=overwrite, progress=progress)
    if not quiet:
        console.print(f"merged {len(stores)} stores: {n} images → {'stdout' if output == '-' else output}")
    if json_out:
        emit_json({"merged": [str(s) for s in stores], "images": n, "output": str(output)})


@app.command("subset", cls=PosvitCommand)
def subset(
    store: StoreArg = None,
    keep: Annotated[Optional[list[str]], typer.Option("--keep", help="Keep only these images (repeatable): a name (file stem), a recorded path or file name, a glob pattern such as 'tile_*', or @FILE with one per line. Default: all.", show_default=False)] = None,
    drop: Annotated[Optional[list[str]], typer.Option("--drop", help="Drop these images (repeatable; same forms as --keep), after --keep. Default: none.", show_default=False)] = None,
    output: StoreOutOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write a new store with only some of a store's images (a store is never edited in place)."""
    with cli_context(debug, quiet):
        from posvit_cli.core.errors import PosvitError
        from posvit_cli.core.features.subset import read_selection, subset_store

        keep_sel, drop_sel = read_selection(keep or []), read_selection(drop or [])
        if not keep_sel and not drop_sel:
            raise PosvitError("say which images to keep or drop: --keep NAME|PATTERN|@FILE or --drop ...")
        output = store_output(output)
        if output == "-" and json_out:
            raise PosvitError("--json prints to stdout, where the new store would go: name a file with -o")
        source = store_input(store)
        with RichProgress(quiet) as progress:
            kept, dropped = subset_store(source, output, keep=keep_sel, drop=drop_sel, overwrite=overwrite,
                                         progress=progress)
        if not quiet:
            console.print(f"kept {kept} images, dropped {dropped} → {'stdout' if output == '-' else output}")
        if json_out:
            emit_json({"source": source, "kept": kept, "dropped": dropped, "output": str(output)})

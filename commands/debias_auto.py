"""`posvit debias-train auto STORE -o HEAD`: fit every cheap head, score each on held-out images, write the chosen
one (core: :mod:`posvit_cli.core.debias.auto`). Registered on `debias-train`'s group in
:mod:`posvit_cli.commands.debias_train`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from posvit_cli._cli import RichProgress, cli_context, command_line, console, emit_json
from posvit_cli.commands.debias_options import HeadOutOpt
from posvit_cli.core.errors import PosvitError
from posvit_cli.options import (
    DebugOpt, IgnoreIndexOpt, JsonOpt, LayerOpt, MasksOpt, OverwriteOpt, QuietOpt, SeedOpt, StoreArg, ThreadsOpt,
)

__all__ = ["auto"]

AUTO = "Choice"
MaxLossOpt = Annotated[float, typer.Option("--max-loss", min=0.0, help="Eligible candidates keep at least the kept score of `none` minus this (absolute: mIoU with --masks, else kNN agreement); the least positional of them is chosen.", rich_help_panel=AUTO)]
MaxR2Opt = Annotated[Optional[float], typer.Option("--max-r2", help="Instead: among candidates whose ranked xy R2 (across held-out images; within, for one held-out image) is at most this, choose the one that keeps most (refused when none reaches it).", show_default=False, rich_help_panel=AUTO)]
CandidatesOpt = Annotated[str, typer.Option("--candidates", help="Candidate families, comma-separated: blank, posmean, svd, rasa, svd+rasa (none is always scored).", rich_help_panel=AUTO)]
ShiftScoresOpt = Annotated[bool, typer.Option("--shift/--no-shift", help="Also score each candidate's crop-shift correspondence (content match / grid match) on a few held-out images, where the store's encoder can be rebuilt and its images read (reported, not used by the rule).", rich_help_panel=AUTO)]
TableOpt = Annotated[Optional[Path], typer.Option("--table", help="Write the table of all candidates as JSON here.", show_default=False)]


def _fmt(v, nd: int = 3) -> str:
    return "-" if v is None or v != v else f"{v:.{nd}f}"


def _params(p: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in p.items() if k != "channels") or "-"


def print_auto_table(table: dict, output: str | None) -> None:
    """The candidates' table on stderr: one row each, the chosen one marked ✓."""
    from rich.table import Table

    t = Table(title=f"posvit debias-train auto → {output or '(no head written)'}", title_justify="left")
    masks = table["kept_metric"] == "miou"
    shift = table["settings"].get("shift", False)
    for col in ("candidate", "params", "xy R2 across", "xy R2 within", "null", "kNN agree", "k-means ARI"):
        t.add_column(col, justify="left" if col in ("candidate", "params") else "right")
    if masks:
        t.add_column("mIoU", justify="right")
    if shift:
        t.add_column("content match", justify="right")
        t.add_column("grid match", justify="right")
    t.add_column("chosen", justify="center")
    for r in table["rows"]:
        cells = [r["name"], _params(r["params"]), _fmt(r.get("xy_across")), _fmt(r["xy"]), _fmt(r["null"]),
                 _fmt(r["knn_agreement"]), _fmt(r["cluster_stability"])]
        if masks:
            cells.append(_fmt(r.get("miou")))
        if shift:
            cells += [_fmt(r.get("shift_content")), _fmt(r.get("shift_absolute"))]
        cells.append("✓" if r["chosen"] else "")
        t.add_row(*cells)
    console.print(t)
    split = table["split"]
    console.print(f"fitted on {len(split['fit'])} images, scored on {len(split['held_out'])} held-out images "
                  f"(central ≤{split['window']}×{split['window']} tokens); rule: {table['rule']}")
    facts = table["fit"].get("shift")
    if facts:
        console.print(f"content / grid match: crop-shift correspondence (shift {facts['shift'][0]},{facts['shift'][1]} "
                      f"patches) on {len(facts['images'])} held-out images, reported only", highlight=False)
    for note in table["notes"]:
        console.print(f"[yellow]note:[/] {note}", markup=True)


def _check_output(path: Path | None, overwrite: bool, what: str) -> None:
    if path is None:
        return
    if path.exists() and not overwrite:
        raise PosvitError(f"'{path}' exists: pass --overwrite to replace it (or give another {what})")
    if not path.parent.exists():
        raise PosvitError(f"output folder '{path.parent}' does not exist")


def _chosen_head(head, table: dict, channels: int):
    """The head to write: the chosen one, or for ``none`` a blank head of no channels (the identity), so that
    pipelines reading ``-o`` keep working."""
    from posvit_cli.core.debias.heads import BlankHead

    if head is None:
        head = BlankHead([], channels, info={"fill": "zero", "channel_source": "debias-train auto chose none"})
    family = next(r["family"] for r in table["rows"] if r["chosen"])
    head.info["auto"] = {"chosen": table["chosen"], "rule": table["rule"], "kept_metric": table["kept_metric"],
                         "split": table["split"],
                         "fit": {k: v for k, v in table["fit"].items() if k in family.split("+")},
                         "rows": [{k: r[k] for k in ("name", "xy_across", "xy", "null", "kept")} for r in table["rows"]]}
    return head


def auto(
    store: StoreArg = None,
    output: HeadOutOpt = ...,
    masks: MasksOpt = None,
    ignore_index: IgnoreIndexOpt = 255,
    max_loss: MaxLossOpt = 0.05,
    max_r2: MaxR2Opt = None,
    candidates: CandidatesOpt = "blank,posmean,svd,rasa,svd+rasa",
    table_out: TableOpt = None,
    shift: ShiftScoresOpt = True,
    layer: LayerOpt = None,
    seed: SeedOpt = 0,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Pick the debiasing for these images: fit every cheap head, score each on held-out images, write the chosen one.

    Candidates: none, svd-k (encoder rebuilt from the store's provenance), posmean, blank-k (mean fill), rasa-r and svd-k+rasa-r, fitted on part of the store's images (split by name, --seed). Each is scored on the other images: the xy R2 of a ridge fitted on the other held-out images (a shared position code transfers, content does not; the within-image probe and its null are reported beside it), and what is kept (ridge-probe mIoU with --masks, else the agreement of each token's 10 nearest neighbours with the raw features, less a smooth surface of position). Where the store's encoder can be rebuilt and its images read, each candidate's crop-shift correspondence is reported too (content match: tokens of a shifted view matched to the same pixels; grid match: to the same grid position). Rule: the least positional candidate within --max-loss of none's kept score, ties to the simplest. Writes the head (.safetensors) for `posvit extract --head` and prints the table.
    """
    import torch

    from posvit_cli import __version__
    from posvit_cli.core.debias.auto import AUTO_SCHEMA, AUTO_SCHEMA_VERSION, AutoSettings, run_auto
    from posvit_cli.core.debias.heads import save_head
    from posvit_cli.core.debias.report import backbone_info
    from posvit_cli.core.fileio import atomic_path, json_text, tagged_header
    from posvit_cli.core.features.store import FeatureStore

    with cli_context(debug, quiet):
        t0 = time.perf_counter()
        out = Path(output)
        if out.suffix.lower() != ".safetensors":
            raise PosvitError(f"-o '{output}': heads are saved as .safetensors")
        _check_output(out, overwrite, "-o")
        _check_output(table_out, overwrite, "--table")
        if masks is not None and not Path(masks).is_dir():
            raise PosvitError(f"--masks '{masks}' is not a folder of masks")
        fams = tuple(["none"] + [f.strip().lower() for f in candidates.split(",") if f.strip()])
        if (layer or "final") not in ("final",):
            raise PosvitError(f"--layer {layer}: heads act on final tokens (what `extract --head` cleans)")
        settings = AutoSettings(families=fams, max_loss=max_loss, max_r2=max_r2, seed=seed,
                                ignore_index=None if ignore_index < 0 else ignore_index, shift=shift).validate()
        if threads:
            torch.set_num_threads(threads)
        src = store if store else "-"
        fs = FeatureStore(src)
        try:
            with RichProgress(quiet) as progress:
                head, table = run_auto(fs, settings, masks=masks, progress=progress)
            head = _chosen_head(head, table, fs.channels)
            head.info["backbone"] = backbone_info(fs.provenance)
            channels = fs.channels
        finally:
            fs.close()
        head.info.update({"posvit_version": __version__, "command": command_line(),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        doc = {**tagged_header(AUTO_SCHEMA, AUTO_SCHEMA_VERSION), "output": str(out), "channels": channels,
               **table, "command": command_line(), "total_seconds": round(time.perf_counter() - t0, 3)}
        save_head(head, out)
        if table_out is not None:
            with atomic_path(table_out, make_parents=False) as tmp:
                Path(tmp).write_text(json_text(doc) + "\n", encoding="utf-8")
        if not quiet:
            print_auto_table(table, str(out))
        if json_out:
            emit_json(doc)

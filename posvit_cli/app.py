"""The `posvit` command-line application: one Typer app, one thin module per subcommand."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from posvit_cli import __version__
from posvit_cli._cli import PosvitCommand, PosvitGroup
from posvit_cli.commands import cluster as cluster_cmd
from posvit_cli.commands import debias_train as debias_train_cmd
from posvit_cli.commands import doctor as doctor_cmd
from posvit_cli.commands import extract as extract_cmd
from posvit_cli.commands import probe as probe_cmd
from posvit_cli.commands import report as report_cmd
from posvit_cli.commands import segment as segment_cmd
from posvit_cli.commands import store as store_cmd
from posvit_cli.commands import viz as viz_cmd

app = typer.Typer(
    name="posvit",
    cls=PosvitGroup,
    help="Measure and remove positional bias in self-supervised Vision Transformer features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"posvit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True),
    ] = None,
) -> None:
    """posvit: measure and remove positional bias in ViT features.

    Commands compose through feature stores: `posvit extract imgs/ | posvit probe`.
    """


# Pipeline order: images -> extract -> store -> probe | debias-train | cluster | report | segment | viz.
app.command("extract", cls=PosvitCommand)(extract_cmd.extract)
app.add_typer(probe_cmd.app, name="probe")
app.add_typer(debias_train_cmd.app, name="debias-train")
app.command("cluster", cls=PosvitCommand)(cluster_cmd.cluster)
app.command("report", cls=PosvitCommand)(report_cmd.report)
app.add_typer(segment_cmd.app, name="segment")
app.add_typer(viz_cmd.app, name="viz")
app.add_typer(store_cmd.app, name="store")
app.command("doctor", cls=PosvitCommand)(doctor_cmd.doctor)


def main() -> None:
    """Entry point of the `posvit` console script."""
    app()

"""The `jaccli` command line: the Typer application, its commands, and the entry point.

Exit codes are documented in `jaccli.cli.errors`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .. import __version__
from . import compute, products, reports, spectrum

app = typer.Typer(
    name="jaccli", no_args_is_help=True, add_completion=False,
    help="Per-layer, per-sample Jacobians of trained neural networks, their norms and spectra.",
    context_settings={"help_option_names": ["-h", "--help"]})


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jaccli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False
          ) -> None:
    """Per-layer, per-sample Jacobians of trained neural networks."""


for command in (compute.compute, compute.inspect, spectrum.spectrum, reports.show,
                reports.check, reports.diff, products.jvp, products.vjp, products.hessian):
    app.command(name=command.__name__)(command)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    return app(args=argv, prog_name="jaccli")

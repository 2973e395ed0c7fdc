"""The `jaccli` command line: the Typer application, its commands, and the entry point.

Exit codes are documented in `jaccli.cli.errors`.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Annotated, Any

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from .. import __version__
from . import compute, merge, ntk, products, reports, spectrum


class _OneLineErrors(TyperGroup):
    """Usage errors as one stderr line, `jaccli: error: ...`, exit 2 (like every other error),
    instead of Click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except ClickException as exc:
            command = exc.ctx.command_path if getattr(exc, "ctx", None) else "jaccli"
            typer.echo(f"jaccli: error: {exc.format_message()} (see '{command} --help')",
                       err=True)
            code = exc.exit_code
        except typer.Abort:
            typer.echo("jaccli: error: aborted", err=True)
            code = 1
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="jaccli", cls=_OneLineErrors, no_args_is_help=True, add_completion=False,
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
                reports.check, reports.diff, products.jvp, products.vjp, products.hessian,
                ntk.ntk, merge.merge):
    app.command(name=command.__name__)(command)


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point. Called with `argv` (a program running jaccli's commands
    in-process) it returns or raises SystemExit like any Typer app; called without, as the
    `jaccli` command and `python -m jaccli`, it ends the process itself (`_end_process`)."""
    _passive_openmp()
    if argv is not None:
        return app(args=argv, prog_name="jaccli")
    _quiet_library_warnings()
    try:
        app(prog_name="jaccli")
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    _end_process(code)


def _quiet_library_warnings() -> None:
    """The command's stderr carries jaccli's own lines (errors, notes), not the libraries'
    Python warnings (torch's "performance drop ... batching rule for aten::mkldnn_rnn_layer",
    export's "tensor attributes ... were assigned during export"): jaccli issues none itself,
    and what matters of theirs reaches the plan's notes. JACCLI_DEBUG=1 or -W/PYTHONWARNINGS
    keep them. torch's C++ warnings bypass Python's and print at their own level, which
    torch reads once, at import: TORCH_CPP_LOG_LEVEL=ERROR unless the user set one."""
    if os.environ.get("JACCLI_DEBUG") == "1":
        return
    if "torch" not in sys.modules:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if not sys.warnoptions:
        import warnings

        warnings.simplefilter("ignore")


def _end_process(code: Any) -> None:
    """Exit with `code` once every file is closed, without the interpreter's teardown.

    The command has finished by now: its files are closed (results are renamed into place
    inside the pipeline), and no thread of ours runs. What is left is freeing thousands of
    torch and jaccli objects and modules one by one, which takes 0.6-1.0 s on a 2-core CPU:
    as long as the whole computation on a small model. The exit handlers still run (logging,
    temporary folders, `weakref.finalize`), and the standard streams are flushed."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: leave through the normal teardown
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the reader has gone
            code = code or 1
    os._exit(code)


def _passive_openmp() -> None:
    """OpenMP threads that sleep while they wait (`OMP_WAIT_POLICY=PASSIVE`), unless the
    environment says otherwise; only before torch is loaded, when it still takes effect.

    Spinning workers starve each other on a CPU whose cores are shared with other processes:
    on a loaded 2-core machine a 128-channel 3x3 convolution of 16 images took 84 ms with
    spinning threads and 1.2 ms with passive ones; on an idle machine the difference is a
    few microseconds of wake-up per parallel region."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

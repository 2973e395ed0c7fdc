"""The `jaccli` command line: options in, a config to the library, exit codes out.

Exit codes: 0 success, 1 a problem with the input or the run (one line on stderr),
2 a usage error, 3 an internal error (a bug: please report it), 130 interrupted (SIGINT),
143 and 129 terminated by SIGTERM and SIGHUP while writing an output file.
`check` and `diff` use 1 for "a bound is violated" / "the runs differ", so their input and
run errors exit with 4 instead.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.exceptions import TyperException

from . import __version__

app = typer.Typer(
    name="jaccli", no_args_is_help=True, add_completion=False,
    help="Per-layer, per-sample Jacobians of trained neural networks, their norms and spectra.",
    context_settings={"help_option_names": ["-h", "--help"]})

EXIT_INTERNAL = 3
EXIT_GATE_ERROR = 4  # check/diff: an error, as opposed to a violation (1)
EXIT_INTERRUPTED = 130
T = TypeVar("T")


class Granularity(str, Enum):
    module = "module"
    block = "block"




class Dtype(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Mode(str, Enum):
    auto = "auto"
    fwd = "fwd"
    rev = "rev"


class Wrt(str, Enum):
    inputs = "inputs"
    params = "params"


class Loss(str, Enum):
    cross_entropy = "cross-entropy"
    nll = "nll"
    mse = "mse"
    bce_logits = "bce-logits"


class Store(str, Enum):
    compact = "compact"
    dense = "dense"


class Compression(str, Enum):
    none = "none"
    gzip = "gzip"
    lzf = "lzf"


# Options shared by every command that loads a model.
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", help="Architecture for a bare state_dict: a JSON spec file or "
                   "package.module:factory.", rich_help_panel="Model")]
ArchPathOpt = Annotated[Path | None, typer.Option(
    "--arch-path", help="Directory to put on sys.path for --arch package.module:factory.",
    rich_help_panel="Model")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading what runs code from the file: a pickled whole "
                           "module (torch.save(model)), pickled or custom-object payloads in "
                           "torch.export/TorchScript archives. Only for files you trust.",
    rich_help_panel="Model")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", help="Array to use in .npz/.safetensors/.h5/.pt files holding several.",
    rich_help_panel="Data")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="First sample to use.",
                                        rich_help_panel="Data")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use at most N samples.",
                                              rich_help_panel="Data")]
GranularityOpt = Annotated[Granularity, typer.Option(
    "--granularity", help="module: every leaf module is a layer; block: an affine/conv module "
                          "and the activations right after it form one layer.",
    rich_help_panel="Layers")]
LayersOpt = Annotated[list[str] | None, typer.Option(
    "--layers", help="Glob on qualified layer names (repeatable), e.g. 'features.*'.",
    rich_help_panel="Layers")]
NoLayersOpt = Annotated[bool, typer.Option(
    "--no-layers", help="Skip per-layer Jacobians (end-to-end only).", rich_help_panel="Layers")]
EndToEndOpt = Annotated[bool, typer.Option(
    "--end-to-end/--no-end-to-end", help="Also compute the model's input→output Jacobian.",
    rich_help_panel="Layers")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Compute precision.",
                                         rich_help_panel="Compute")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX.",
                                        rich_help_panel="Compute")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout "
                                                      "instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jaccli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False
          ) -> None:
    """Per-layer, per-sample Jacobians of trained neural networks."""


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"jaccli: error: {message}", err=True)
    return typer.Exit(code)


def _guarded(action: Callable[[], T], *, input_error_code: int = 1) -> T:
    """Run `action`, mapping exceptions to one stderr line and an exit code.

    input_error_code: the code for input/run errors (1, or 4 for the gate commands).
    JACCLI_DEBUG=1 lets every exception through with its traceback.
    """
    from .errors import JaccliError
    from .termination import Terminated

    if os.environ.get("JACCLI_DEBUG") == "1":
        return action()
    try:
        return action()
    except (typer.Exit, typer.Abort, TyperException):
        raise  # deliberate exits, and the command-line parser's own usage errors
    except JaccliError as exc:
        code = exc.exit_code if exc.exit_code != 1 else input_error_code
        raise _fail(str(exc), code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", EXIT_INTERRUPTED) from None
    except Terminated as exc:  # SIGTERM/SIGHUP while writing: the partial file is gone
        raise _fail(str(exc), 128 + exc.signum) from None
    except RuntimeError as exc:
        from .layers import is_out_of_memory

        if is_out_of_memory(exc):
            raise _fail("out of memory; lower --batch-size or --max-memory, or select fewer "
                        "layers with --layers", input_error_code) from None
        raise _fail(f"internal error: {type(exc).__name__}: {_first_line(exc)} (rerun with "
                    "JACCLI_DEBUG=1 for the traceback, and please report it)",
                    EXIT_INTERNAL) from None
    except Exception as exc:  # anything else is a bug in jaccli
        raise _fail(f"internal error: {type(exc).__name__}: {_first_line(exc)} (rerun with "
                    "JACCLI_DEBUG=1 for the traceback, and please report it)",
                    EXIT_INTERNAL) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _stdout(quiet: bool = False):
    from rich.console import Console

    # Rich assumes 80 columns when stdout is not a terminal; tables need more.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    return Console(file=sys.stdout, quiet=quiet, width=width)


ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", help="Progress bar on stderr (default: only on a terminal).")]


@contextmanager
def _progress(total: int, enabled: bool | None):
    """A Rich progress bar over samples on stderr, shown when `enabled` (None: when stderr
    is a terminal); yields the per-batch callback, or None."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("computing"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("compute", total=total)
        yield lambda n: progress.advance(task, n)


def _emit_json(document: Any, quiet: bool = False) -> None:
    """One JSON document on stdout, unwrapped (NaN and infinities written as null)."""
    if quiet:
        return
    import json

    from .summary import finite_or_none

    sys.stdout.write(json.dumps(finite_or_none(document), indent=2) + "\n")
    sys.stdout.flush()


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    from .memory import parse_size

    return parse_size(text)


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise typer.BadParameter(f"{text!r} is not a shape; use e.g. 1,28,28",
                                 param_hint="--input-shape")
    return shape


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["jaccli", *sys.argv[1:]])


@app.command()
def compute(
    model: Annotated[Path, typer.Argument(help="Model file (TorchScript, .pt2, safetensors, "
                                               "state_dict with --arch).")],
    data: Annotated[Path, typer.Argument(help="Samples along the first axis: .npy, .npz, "
                                              ".safetensors, .h5/.hdf5, .pt or .csv.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="HDF5 file to write (docs/FORMAT.md). Without it, only the "
                               "summary is printed.")] = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    granularity: GranularityOpt = Granularity.module, layers: LayersOpt = None,
    no_layers: NoLayersOpt = False, end_to_end: EndToEndOpt = True,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Samples per batch (default: sized to the memory budget).",
        rich_help_panel="Compute")] = None,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory budget, e.g. 2GiB (default: 25% of free RAM, 50% of free "
                             "GPU memory).", rich_help_panel="Compute")] = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32,
    mode: Annotated[Mode, typer.Option(
        "--mode", help="Differentiation mode: auto picks forward when D_in < D_out.",
        rich_help_panel="Compute")] = Mode.auto,
    store: Annotated[Store, typer.Option(
        "--store", help="compact: each Jacobian in its exact compact form (shared matrix, "
                        "diagonal, ...; see docs/FORMAT.md); dense: (N, D_out, D_in) arrays.",
        rich_help_panel="Output")] = Store.compact,
    strict_rules: Annotated[bool, typer.Option(
        "--strict-rules", help="Fail instead of using the generic torch.func path for a module "
                               "with no structured rule.", rich_help_panel="Compute")] = False,
    tf32: Annotated[bool, typer.Option(
        "--tf32", help="Allow TF32 matmuls/convolutions on CUDA (faster, ~1e-3 relative "
                       "error). Off by default.", rich_help_panel="Compute")] = False,
    compression: Annotated[Compression, typer.Option(
        "--compression", help="HDF5 compression of the Jacobian datasets.",
        rich_help_panel="Output")] = Compression.none,
    compression_level: Annotated[int | None, typer.Option(
        "--compression-level", min=0, max=9, help="gzip level 0-9.",
        rich_help_panel="Output")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (layers, modes, sizes, batch size) and stop.")] = False,
    wrt: Annotated[list[Wrt] | None, typer.Option(
        "--wrt", help="Differentiate w.r.t. inputs (default) and/or params (repeatable).",
        rich_help_panel="Parameters")] = None,
    params: Annotated[list[str] | None, typer.Option(
        "--params", help="Glob on parameter names (repeatable), e.g. 'features.*.weight'.",
        rich_help_panel="Parameters")] = None,
    output_index: Annotated[int | None, typer.Option(
        "--output-index", min=0, help="Differentiate this (flattened) output entry only.",
        rich_help_panel="Parameters")] = None,
    targets: Annotated[Path | None, typer.Option(
        "--targets", help="Targets for --loss (same samples as DATA).",
        rich_help_panel="Parameters")] = None,
    targets_key: Annotated[str | None, typer.Option(
        "--targets-key", help="Array to use in a multi-array targets file.",
        rich_help_panel="Parameters")] = None,
    loss: Annotated[Loss | None, typer.Option(
        "--loss", help="Differentiate the per-sample loss against --targets.",
        rich_help_panel="Parameters")] = None,
    flatten: Annotated[bool, typer.Option(
        "--flatten", help="Also store one (N, C, D) dataset over all selected parameters.",
        rich_help_panel="Parameters")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, progress: ProgressOpt = None,
) -> None:
    """Compute every layer's per-sample Jacobian (and the end-to-end one) for DATA; with
    --wrt params, per-sample Jacobians w.r.t. the parameters.

    DATA may be - to read a .npy stream from standard input."""
    from .config import ComputeConfig

    config = ComputeConfig(
        model=model, data=data, output=output, arch=arch, arch_path=arch_path,
        trust_pickle=trust_pickle, key=key, offset=offset, limit=limit,
        granularity=granularity.value, layers=layers or None, include_layers=not no_layers,
        end_to_end=end_to_end, batch_size=batch_size,
        device=device, dtype=dtype.value, mode=mode.value, store=store.value,
        strict_rules=strict_rules, tf32=tf32, compression=compression.value,
        wrt=tuple(w.value for w in wrt) if wrt else ("inputs",), params=params or None,
        output_index=output_index, targets=targets, targets_key=targets_key,
        loss=loss.value if loss else None, flatten=flatten,
        compression_level=compression_level, command_line=_command_line())
    out = _stdout(quiet)

    def run() -> None:
        from .compute import prepare, run_compute
        from .summary import render_plan, render_table

        config.max_memory = _parse_size(max_memory)
        prepared = prepare(config)
        if dry_run:
            plan = prepared.plan.to_dict()
            if json_output:
                _emit_json(plan, quiet)
            else:
                render_plan(plan, out, title=f"jaccli compute --dry-run: {model} on {data}")
            return
        with _progress(len(prepared.data), False if quiet else progress) as on_batch:
            summary = run_compute(config, on_batch=on_batch, prepared=prepared)
        if json_output:
            _emit_json(summary.to_dict(), quiet)
        else:
            render_table(summary, out)

    _guarded(run)


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    input_shape: Annotated[str | None, typer.Option(
        "--input-shape", help="Per-sample input shape, e.g. 1,8,8 (default: from --data or "
                              "the model file).")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Data file: its sample shape and count are used.")] = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    granularity: GranularityOpt = Granularity.module, layers: LayersOpt = None,
    no_layers: NoLayersOpt = False, end_to_end: EndToEndOpt = True,
    dtype: DtypeOpt = Dtype.float32, device: DeviceOpt = "cpu",
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory budget for the one traced sample, e.g. 2GiB.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """List the model's layers, their shapes and each Jacobian's size, computing nothing."""
    from .config import ComputeConfig

    shape = _parse_shape(input_shape)
    config = ComputeConfig(
        model=model, data=data, arch=arch, arch_path=arch_path, trust_pickle=trust_pickle,
        key=key, offset=offset, limit=limit, granularity=granularity.value,
        layers=layers or None, include_layers=not no_layers, end_to_end=end_to_end,
        device=device, dtype=dtype.value)
    out = _stdout()

    def run() -> None:
        from .compute import inspect_model
        from .summary import render_plan

        config.max_memory = _parse_size(max_memory)
        plan = inspect_model(config, shape).to_dict()
        if json_output:
            _emit_json(plan)
        else:
            render_plan(plan, out, title=f"jaccli inspect: {model}", show_batches=False)

    _guarded(run)


@app.command()
def spectrum(
    source: Annotated[Path, typer.Argument(help="Model file, or a results file written by "
                                                "`jaccli compute` (then DATA is not given).")],
    data: Annotated[Path | None, typer.Argument(help="Samples (as for compute).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="HDF5 file for the spectra (docs/FORMAT.md).")] = None,
    top_k: Annotated[int | None, typer.Option(
        "--top-k", min=1, help="Report the K largest singular values; layers whose full "
                               "spectrum is costly use matrix-free Lanczos.",
        rich_help_panel="Spectrum")] = None,
    exact: Annotated[bool, typer.Option(
        "--exact", help="svdvals of the dense matrices instead of Gram matrices (slower, "
                        "accurate for small singular values).", rich_help_panel="Spectrum")
    ] = False,
    tol: Annotated[float, typer.Option(
        "--tol", help="Lanczos: stop when every top-k relative residual is below this.",
        rich_help_panel="Spectrum")] = 1e-8,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", min=1, help="Lanczos: Krylov steps cap (default max(4k+40, 80)).",
        rich_help_panel="Spectrum")] = None,
    probes: Annotated[int, typer.Option(
        "--probes", min=2, help="Hutchinson probes for matrix-free Frobenius norms.",
        rich_help_panel="Spectrum")] = 32,
    profile: Annotated[bool, typer.Option(
        "--profile/--no-profile", help="Dynamical-isometry profile through depth (chain "
                                       "models).", rich_help_panel="Spectrum")] = True,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write PNG histograms per layer and the depth profile to this folder "
                       "(needs matplotlib: pip install 'jaccli[plot]').",
        rich_help_panel="Output")] = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    granularity: GranularityOpt = Granularity.module, layers: LayersOpt = None,
    no_layers: NoLayersOpt = False, end_to_end: EndToEndOpt = True,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", min=1, help="Samples per batch.", rich_help_panel="Compute")] = None,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory budget, e.g. 2GiB.", rich_help_panel="Compute")] = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32,
    tf32: Annotated[bool, typer.Option("--tf32", help="Allow TF32 on CUDA.",
                                       rich_help_panel="Compute")] = False,
    compression: Annotated[Compression, typer.Option(
        "--compression", help="HDF5 compression.", rich_help_panel="Output")
    ] = Compression.none,
    json_output: JsonOpt = False, quiet: QuietOpt = False, progress: ProgressOpt = None,
) -> None:
    """Singular values, norms, condition numbers and ranks of every Jacobian, per sample.

    DATA may be - to read a .npy stream from standard input."""
    from .spectrum import SpectrumConfig

    config = SpectrumConfig(
        model=source, data=data, output=output, arch=arch, arch_path=arch_path,
        trust_pickle=trust_pickle, key=key, offset=offset, limit=limit,
        granularity=granularity.value, layers=layers or None, include_layers=not no_layers,
        end_to_end=end_to_end, batch_size=batch_size, device=device, dtype=dtype.value,
        tf32=tf32, compression=compression.value, command_line=_command_line(), top_k=top_k,
        exact=exact, tol=tol, max_steps=max_steps, probes=probes, profile=profile)
    out = _stdout(quiet)

    def run() -> None:
        from .errors import UsageError
        from .spectra.report import render_spectrum, write_plots
        from .spectrum import run_spectrum, spectrum_from_results

        config.max_memory = _parse_size(max_memory)
        _require_file(source)
        if _is_hdf5(source):
            if data is not None:
                raise UsageError(f"{source} is a results file and already holds its samples; "
                                 "drop DATA")
            summary = spectrum_from_results(config, source).summary
        else:
            if data is None:
                raise UsageError("missing DATA: give the samples after the model file (or "
                                 "pass a results file written by `jaccli compute`)")
            from .spectrum import prepare_spectrum

            prepared = prepare_spectrum(config)
            with _progress(len(prepared.inputs.data), False if quiet else progress) as on_batch:
                summary = run_spectrum(config, on_batch=on_batch, run=prepared).summary
        if plot is not None:
            summary["plots"] = [str(p) for p in write_plots(summary, plot)]
        if json_output:
            _emit_json(summary, quiet)
        else:
            render_spectrum(summary, out)

    _guarded(run)


@app.command()
def show(
    results: Annotated[Path, typer.Argument(help="A file written by compute or spectrum.")],
    layer: Annotated[str | None, typer.Option(
        "--layer", help="Print one layer's Jacobian or spectrum ('end_to_end' for the "
                        "end-to-end one); needs --sample.")] = None,
    sample: Annotated[int | None, typer.Option(
        "--sample", min=0, help="Row of the sample in the data file.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Summarize a results file without recomputing (or print one sample's result)."""
    out = _stdout()

    def run() -> None:
        from .errors import UsageError

        if (layer is None) != (sample is None):
            raise UsageError("--layer and --sample go together")
        if layer is not None:
            from .show import sample_detail

            detail = sample_detail(results, layer, sample)
            if json_output:
                _emit_json(detail)
            else:
                _render_detail(detail, out)
            return
        from .show import summarize_file

        kind, summary = summarize_file(results)
        if kind == "jacobians":
            if json_output:
                _emit_json(summary.to_dict())
            else:
                from .summary import render_table

                render_table(summary, out)
        elif json_output:
            _emit_json(summary)
        else:
            from .spectra.report import render_spectrum

            render_spectrum(summary, out)

    _guarded(run)


def _render_detail(detail: dict, out) -> None:
    import numpy as np

    head = f"{detail['file']}: {detail['layer']} ({detail['type']}), sample {detail['sample']}"
    if detail["input_shape"]:
        head += (f", input {tuple(detail['input_shape'])} → output "
                 f"{tuple(detail['output_shape'])}")
    out.print(head, highlight=False)
    if "jacobian" in detail:
        matrix = np.asarray(detail["jacobian"])
        out.print(f"Jacobian {matrix.shape[0]} × {matrix.shape[1]} (stored as "
                  f"{detail['encoding']}), ‖J‖_F = {detail['frobenius']:.6g}", highlight=False)
        with np.printoptions(precision=4, suppress=True, linewidth=160, threshold=400):
            out.print(str(matrix), markup=False, highlight=False)
    else:
        values = np.asarray(detail["singular_values"])
        label = "all" if detail["complete"] else f"top {values.size}"
        out.print(f"singular values ({label}, {detail['method']}):", highlight=False)
        with np.printoptions(precision=6, linewidth=160, threshold=400):
            out.print(str(values), markup=False, highlight=False)
        for name, value in detail["quantities"].items():
            out.print(f"{name}: {value:.6g}", highlight=False)


@app.command()
def check(
    source: Annotated[Path, typer.Argument(help="Model file, or a results file from compute "
                                                "or spectrum (then no DATA).")],
    data: Annotated[Path | None, typer.Argument(help="Samples (- for a .npy stream on "
                                                     "stdin).")] = None,
    max_spectral_norm: Annotated[float | None, typer.Option(
        "--max-spectral-norm", help="Upper bound on ‖J‖₂ of each Jacobian.",
        rich_help_panel="Bounds")] = None,
    max_cond: Annotated[float | None, typer.Option(
        "--max-cond", help="Upper bound on the condition number.", rich_help_panel="Bounds")
    ] = None,
    max_frobenius: Annotated[float | None, typer.Option(
        "--max-frobenius", help="Upper bound on ‖J‖_F.", rich_help_panel="Bounds")] = None,
    max_lipschitz_bound: Annotated[float | None, typer.Option(
        "--max-lipschitz-bound", help="Upper bound on the product of the layers' spectral "
                                      "norms (chain models).", rich_help_panel="Bounds")
    ] = None,
    min_sigma: Annotated[float | None, typer.Option(
        "--min-sigma", help="Lower bound on the smallest singular value.",
        rich_help_panel="Bounds")] = None,
    stat: Annotated[str | None, typer.Option(
        "--stat", help="Statistic over samples compared with each bound: max, mean, p95, p99 "
                       "(lower bounds use the other tail). Default max.",
        rich_help_panel="Bounds")] = None,
    check_layers: Annotated[list[str] | None, typer.Option(
        "--layers", help="Glob on the names to check (repeatable); '(end-to-end)' is the "
                         "end-to-end Jacobian. Default: all.", rich_help_panel="Bounds")] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="TOML file with the bounds: jaccli.toml ([check] table) or "
                         "pyproject.toml ([tool.jaccli.check]); ./jaccli.toml is read when "
                         "present. Command-line bounds win.", rich_help_panel="Bounds")
    ] = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    granularity: GranularityOpt = Granularity.module,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory budget, e.g. 2GiB.", rich_help_panel="Compute")] = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32,
    json_output: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Fail (exit 1) when a Jacobian's spectrum breaks a bound: a regression gate for CI.

    Exit codes: 0 every bound holds, 1 a bound is violated (each violation listed),
    2 usage error, 4 input or run error."""
    out = _stdout(quiet)

    def run() -> None:
        from .check import evaluate, load_bounds
        from .errors import UsageError
        from .spectrum import SpectrumConfig, run_spectrum

        bounds = load_bounds(config_file, {
            "max_spectral_norm": max_spectral_norm, "max_cond": max_cond,
            "max_frobenius": max_frobenius, "max_lipschitz_bound": max_lipschitz_bound,
            "min_sigma": min_sigma, "stat": stat, "layers": check_layers or []})
        config = SpectrumConfig(
            model=source, data=data, arch=arch, arch_path=arch_path, trust_pickle=trust_pickle,
            key=key, offset=offset, limit=limit, granularity=granularity.value,
            device=device, dtype=dtype.value, max_memory=_parse_size(max_memory),
            profile=False, command_line=_command_line())
        _require_file(source)
        if _is_hdf5(source):
            if data is not None:
                raise UsageError(f"{source} is a results file and already holds its samples; "
                                 "drop DATA")
            outcome = _spectra_of_file(config, source)
        else:
            if data is None:
                raise UsageError("missing DATA: give the samples after the model file")
            outcome = run_spectrum(config)
        result = evaluate(bounds, outcome.records, outcome.sample_index, outcome.bounds,
                          model=outcome.summary["model"], data=outcome.summary["data"])
        if json_output:
            _emit_json(result, quiet)
        else:
            _render_check(result, out)
        if not result["passed"]:
            raise typer.Exit(1)

    _guarded(run, input_error_code=EXIT_GATE_ERROR)


def _spectra_of_file(config, path: Path):
    """Spectra from a results file: read back from a spectra file, or computed from the
    Jacobians a compute file stores."""
    from .results import Results
    from .show import read_spectra
    from .spectrum import spectrum_from_results

    with Results(path) as results:
        kind = results.attrs.get("kind")
    return read_spectra(path) if kind == "spectra" else spectrum_from_results(config, path)


def _render_check(result: dict, out) -> None:
    from rich.table import Table

    table = Table()
    for column in ("layer", "quantity", "stat", "value", "bound", "", "worst samples"):
        table.add_column(column, justify="right" if column in ("value", "bound") else "left")
    for c in result["checks"]:
        op = "≤" if c["kind"] == "max" else "≥"
        mark = "[green]ok[/green]" if c["passed"] else "[bold red]VIOLATED[/bold red]"
        table.add_row(c["layer"], c["quantity"], c["stat"], f"{c['value']:.6g}",
                      f"{op} {c['bound']:.6g}", mark,
                      ", ".join(map(str, c["worst_samples"])))
    out.print(table)
    n_bad = len(result["violations"])
    if n_bad:
        out.print(f"[bold red]FAILED[/bold red]: {n_bad} of {len(result['checks'])} checks "
                  f"violated on {result['n_samples']} samples of {result['data']}")
    else:
        out.print(f"[green]passed[/green]: {len(result['checks'])} checks on "
                  f"{result['n_samples']} samples of {result['data']}")


@app.command()
def diff(
    a: Annotated[Path, typer.Argument(help="Results file of the reference run.")],
    b: Annotated[Path, typer.Argument(help="Results file of the run to compare.")],
    rtol: Annotated[float, typer.Option(
        "--rtol", min=0.0, help="Largest relative change allowed per metric.")] = 0.05,
    allow_different_data: Annotated[bool, typer.Option(
        "--allow-different-data", help="Compare runs even when their data differ.")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Compare two runs (two checkpoints on the same data) layer by layer.

    Exit codes: 0 within --rtol, 1 a change beyond --rtol (or layers added/removed),
    2 usage error, 4 input error (including different data)."""
    out = _stdout(quiet)

    def run() -> None:
        from .diff import diff_files

        result = diff_files(a, b, rtol=rtol, allow_different_data=allow_different_data)
        if json_output:
            _emit_json(result, quiet)
        else:
            _render_diff(result, out)
        if not result["same"]:
            raise typer.Exit(1)

    _guarded(run, input_error_code=EXIT_GATE_ERROR)


def _render_diff(result: dict, out) -> None:
    from rich.table import Table

    table = Table()
    for column in ("layer", "metric", "A", "B", "change", ""):
        table.add_column(column, justify="left" if column in ("layer", "metric", "") else
                         "right")
    for layer in result["layers"]:
        for name, m in layer["metrics"].items():
            rel = m["rel_change"]
            beyond = rel is None or abs(rel) > result["rtol"]
            table.add_row(layer["name"], name, f"{m['a']:.6g}", f"{m['b']:.6g}",
                          "undefined" if rel is None else f"{rel:+.2%}",
                          "[bold red]beyond rtol[/bold red]" if beyond else "")
    out.print(table)
    for name in result["only_in_a"]:
        out.print(f"only in A: {name}", highlight=False)
    for name in result["only_in_b"]:
        out.print(f"only in B: {name}", highlight=False)
    verdict = ("[green]same[/green] within" if result["same"]
               else "[bold red]DIFFERENT[/bold red] beyond")
    out.print(f"{verdict} rtol {result['rtol']:g}: {result['a']} vs {result['b']}")


def _products(direction: str, model: Path, data: Path, vectors: Path, vectors_key, layer, wrt,
              params, output, arch, arch_path, trust_pickle, key, offset, limit, device, dtype,
              json_output, quiet) -> None:
    from .products import ProductConfig, run_products

    config = ProductConfig(
        model=model, data=data, output=output, arch=arch, arch_path=arch_path,
        trust_pickle=trust_pickle, key=key, offset=offset, limit=limit, device=device,
        dtype=dtype.value, wrt=(wrt.value,), params=params or None, direction=direction,
        vectors=vectors, vectors_key=vectors_key, layer=layer, command_line=_command_line())
    out = _stdout(quiet)

    def run() -> None:
        summary = run_products(config)
        if json_output:
            _emit_json(summary, quiet)
            return
        norm = summary["norm"]
        out.print(f"jaccli {direction}: {summary['layer']} w.r.t. {summary['wrt']}, "
                  f"{summary['n_samples']} samples → products {tuple(summary['shape'])}; "
                  f"‖product‖ mean {norm['mean']:.6g}, max {norm['max']:.6g}"
                  + (f"; written to {summary['output']}" if summary["output"] else ""),
                  highlight=False)

    _guarded(run)


VectorsOpt = Annotated[Path, typer.Option(
    "--vectors", help="Vectors (.npy, ...): one per sample, or one for all samples. jvp: input "
                      "tangents (or parameter tangents, flattened); vjp: output cotangents.")]
LayerOpt = Annotated[str | None, typer.Option(
    "--layer", help="A layer's Jacobian instead of the end-to-end one (--wrt inputs).")]
WrtOneOpt = Annotated[Wrt, typer.Option("--wrt", help="inputs or params.")]
ParamsOpt = Annotated[list[str] | None, typer.Option(
    "--params", help="Glob on parameter names (repeatable) for --wrt params.")]


def _product_command(direction: str, doc: str) -> None:
    """Register `jaccli jvp` or `jaccli vjp`: the same options, one direction each."""

    def command(
        model: Annotated[Path, typer.Argument(help="Model file.")],
        data: Annotated[Path, typer.Argument(help="Samples (- for a .npy stream on stdin).")],
        vectors: VectorsOpt, layer: LayerOpt = None, wrt: WrtOneOpt = Wrt.inputs,
        params: ParamsOpt = None,
        vectors_key: Annotated[str | None, typer.Option("--vectors-key")] = None,
        output: Annotated[Path | None, typer.Option("--output", "-o",
                                                    help="HDF5 output.")] = None,
        arch: ArchOpt = None, arch_path: ArchPathOpt = None,
        trust_pickle: TrustPickleOpt = False, key: KeyOpt = None, offset: OffsetOpt = 0,
        limit: LimitOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32,
        json_output: JsonOpt = False, quiet: QuietOpt = False,
    ) -> None:
        _products(direction, model, data, vectors, vectors_key, layer, wrt, params, output,
                  arch, arch_path, trust_pickle, key, offset, limit, device, dtype,
                  json_output, quiet)

    command.__doc__ = doc
    app.command(name=direction)(command)


_product_command("jvp", "J v for every sample (forward mode), without forming J.")
_product_command("vjp", "uᵀ J for every sample (reverse mode), without forming J; with --wrt "
                        "params, the per-sample gradients of u · output.")


@app.command()
def hessian(
    model: Annotated[Path, typer.Argument(help="Model file.")],
    data: Annotated[Path, typer.Argument(help="Samples.")],
    targets: Annotated[Path, typer.Option("--targets", help="Targets for --loss.")],
    loss: Annotated[Loss, typer.Option("--loss", help="Per-sample loss.")],
    wrt: Annotated[Wrt, typer.Option(
        "--wrt", help="params: Hessian of the mean loss over DATA w.r.t. the parameters; "
                      "inputs: each sample's Hessian w.r.t. its input.")] = Wrt.params,
    params: ParamsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Eigenvalues to report.")] = 5,
    which: Annotated[str, typer.Option(
        "--which", help="largest (algebraic) or magnitude.")] = "largest",
    probes: Annotated[int, typer.Option("--probes", min=2, help="Hutchinson probes for the "
                                                                "trace.")] = 32,
    density: Annotated[bool, typer.Option(
        "--density", help="Spectral density by stochastic Lanczos quadrature (--wrt params).")
    ] = False,
    targets_key: Annotated[str | None, typer.Option("--targets-key")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HDF5 output.")] = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32,
    json_output: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Top eigenvalues, trace and spectral density of a loss Hessian, by Hessian-vector
    products (never formed)."""
    from .products import ProductConfig, run_hessian

    config = ProductConfig(
        model=model, data=data, output=output, arch=arch, arch_path=arch_path,
        trust_pickle=trust_pickle, key=key, offset=offset, limit=limit, device=device,
        dtype=dtype.value, wrt=(wrt.value,), params=params or None, targets=targets,
        targets_key=targets_key, loss=loss.value, top_k=top_k, probes=probes,
        density=density, which=which, batch_size=batch_size, command_line=_command_line())
    out = _stdout(quiet)

    def run() -> None:
        from .errors import UsageError

        if which not in ("largest", "magnitude"):
            raise UsageError("--which must be largest or magnitude")
        summary = run_hessian(config)
        if json_output:
            _emit_json(summary, quiet)
            return
        head = (f"jaccli hessian: {summary['loss']} loss w.r.t. {summary['wrt']} "
                f"(dimension {summary['dim']}, {summary['n_samples']} samples)")
        out.print(head, highlight=False)
        if summary["wrt"] == "params":
            values = ", ".join(f"{v:.6g}" for v in summary["eigenvalues"])
            out.print(f"top {len(summary['eigenvalues'])} eigenvalues ({summary['which']}): "
                      f"{values}", highlight=False)
            out.print(f"trace {summary['trace']:.6g} ± {summary['trace_se']:.2g} "
                      "(Hutchinson, standard error)", highlight=False)
        else:
            top, trace = summary["top_eigenvalue"], summary["trace"]
            out.print(f"per-sample top eigenvalue: mean {top['mean']:.6g}, max "
                      f"{top['max']:.6g}; per-sample trace mean {trace['mean']:.6g}",
                      highlight=False)
        if summary.get("density"):
            from .spectra.report import sparkline

            counts = summary["density"]["density"]
            scale = max(counts) or 1
            out.print("spectral density: " + sparkline([round(100 * c / scale)
                                                        for c in counts[::8]]),
                      highlight=False)
        if summary["output"]:
            out.print(f"written to {summary['output']}", highlight=False)

    _guarded(run)


def _require_file(path: Path) -> None:
    from .errors import JaccliError

    if not path.exists():
        raise JaccliError(f"file not found: {path}")


def _is_hdf5(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point."""
    return app(args=argv, prog_name="jaccli")


if __name__ == "__main__":
    main()

"""`jaccli show`, `jaccli check` and `jaccli diff`: read, gate and compare results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import Dtype, Granularity, Stat
from .errors import EXIT_GATE_ERROR, guarded
from .options import (
    ArchOpt,
    ArchPathOpt,
    ConstOpt,
    DeviceOpt,
    DtypeOpt,
    GranularityOpt,
    InputOpt,
    JsonOpt,
    KeyOpt,
    LimitOpt,
    MaxMemoryOpt,
    OffsetOpt,
    QuietOpt,
    TrustPickleOpt,
    WrtInputOpt,
    for_results_file,
    settings_from,
)

BOUNDS = ("max_spectral_norm", "max_cond", "max_frobenius", "max_lipschitz_bound", "min_sigma",
          "stat", "check_layers", "config_file")


def show(
    results: Annotated[Path, typer.Argument(
        help="A file written by compute, spectrum, ntk, jvp, vjp or hessian.")],
    layer: Annotated[str | None, typer.Option(
        "--layer", help="Print one layer's Jacobian or spectrum ('end_to_end' for the "
                        "end-to-end one); needs --sample.")] = None,
    sample: Annotated[int | None, typer.Option(
        "--sample", min=0, help="Row of the sample in the data file.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """Summarize a results file without recomputing (or print one sample's result)."""
    from .render import stdout_console

    out = stdout_console()

    def run() -> None:
        from ..errors import UsageError
        from .render import emit_json, render_detail, render_table
        from .render_spectrum import render_spectrum

        if (layer is None) != (sample is None):
            raise UsageError("--layer and --sample go together")
        if layer is not None:
            from ..reports.show import sample_detail

            detail = sample_detail(results, layer, sample)
            if json_output:
                emit_json(detail)
            else:
                render_detail(detail, out)
            return
        from ..reports.show import summarize_file

        kind, summary = summarize_file(results)
        if json_output:
            emit_json(summary.to_dict() if kind == "jacobians" else summary)
        elif kind == "jacobians":
            render_table(summary, out)
        elif kind == "ntk":
            from .render_ntk import render_ntk

            render_ntk(summary, out)
        elif kind in ("products", "hessian"):
            from .render import render_hessian, render_products

            (render_products if kind == "products" else render_hessian)(summary, out)
        else:
            render_spectrum(summary, out)

    guarded(run)


def check(
    ctx: typer.Context,
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
    stat: Annotated[Stat | None, typer.Option(
        "--stat", help="Statistic over samples compared with each bound (lower bounds use "
                       "the other tail). Default max.", rich_help_panel="Bounds")] = None,
    check_layers: Annotated[list[str] | None, typer.Option(
        "--layers", help="Glob on the names to check (repeatable); '(end-to-end)' is the "
                         "end-to-end Jacobian. Default: all.", rich_help_panel="Bounds")] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="TOML file with the bounds: jaccli.toml ([check] table) or "
                         "pyproject.toml ([tool.jaccli.check]); ./jaccli.toml is read when "
                         "present. Command-line bounds win.", rich_help_panel="Bounds")
    ] = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    input: InputOpt = None, const: ConstOpt = None, wrt: WrtInputOpt = None,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    granularity: GranularityOpt = Granularity.module, max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32,
    json_output: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Fail (exit 1) when a Jacobian's spectrum breaks a bound: a regression gate for CI.

    Exit codes: 0 every bound holds, 1 a bound is violated (each violation listed),
    2 usage error, 4 input or run error, 5 a value could not be verified (an iterative
    method missed its residual tolerance)."""
    from ..pipelines.distributed import torchrun_rank
    from .render import stdout_console

    quiet = quiet or (torchrun_rank() or 0) != 0  # under torchrun only rank 0 prints
    out = stdout_console(quiet)

    def run() -> None:
        from ..errors import UsageError
        from ..pipelines.distributed import detect
        from ..reports.check import evaluate, load_bounds
        from ..settings import SpectrumSettings
        from .render import emit_json, render_check

        bounds = load_bounds(config_file, {
            "max_spectral_norm": max_spectral_norm, "max_cond": max_cond,
            "max_frobenius": max_frobenius, "max_lipschitz_bound": max_lipschitz_bound,
            "min_sigma": min_sigma, "stat": stat.value if stat else None,
            "layers": check_layers or []})
        from ..pipelines.spectrum_file import is_results_file, spectra_of_file

        from_file = is_results_file(source)
        settings = settings_from(SpectrumSettings, ctx, exclude=("source", *BOUNDS),
                                 model=source, profile=False,
                                 **(for_results_file(ctx, source) if from_file else {}))
        if from_file and data is not None:
            raise UsageError(f"{source} is a results file and already holds its samples; "
                             "drop DATA")
        if not from_file and data is None:
            raise UsageError("missing DATA: give the samples after the model file")

        def judged(outcome):
            return evaluate(bounds, outcome.records, outcome.sample_index, outcome.bounds,
                            model=outcome.summary["model"], data=outcome.summary["data"])

        launch = detect()
        if launch is not None:  # the gate over every rank's samples, judged on rank 0
            from ..pipelines.distributed import started
            from ..pipelines.ranked import on_main
            from ..pipelines.spectrum_ranks import run_ranked_spectrum

            with started(launch, settings.run.device) as ranked:
                outcome = run_ranked_spectrum(settings, ranked, read_back=True,
                                              source=source if from_file else None)
                result = on_main(ranked, lambda: judged(outcome))
        elif from_file:
            result = judged(spectra_of_file(settings, source))
        else:
            from ..pipelines.spectrum import run_spectrum

            result = judged(run_spectrum(settings))
        if json_output:
            emit_json(result, quiet)
        else:
            render_check(result, out)
        if result["exit_code"]:
            raise typer.Exit(result["exit_code"])

    guarded(run, input_error_code=EXIT_GATE_ERROR,
            oom_hint="lower --max-memory, or check fewer samples with --limit")


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
    from .render import stdout_console

    out = stdout_console(quiet)

    def run() -> None:
        from ..reports.diff import diff_files
        from .render import emit_json, render_diff

        result = diff_files(a, b, rtol=rtol, allow_different_data=allow_different_data)
        if json_output:
            emit_json(result, quiet)
        else:
            render_diff(result, out)
        if not result["same"]:
            raise typer.Exit(1)

    guarded(run, input_error_code=EXIT_GATE_ERROR)

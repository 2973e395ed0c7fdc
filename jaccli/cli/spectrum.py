"""`jaccli spectrum`: singular values, norms and condition numbers of every Jacobian."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..settings import Compression, Dtype, Granularity
from .errors import guarded
from .options import (
    ArchOpt,
    ArchPathOpt,
    BatchSizeOpt,
    CompressionOpt,
    ConstOpt,
    DeviceOpt,
    DtypeOpt,
    EndToEndOpt,
    GranularityOpt,
    InputOpt,
    JsonOpt,
    KeyOpt,
    LayersOpt,
    LimitOpt,
    MaxMemoryOpt,
    ModelOutputOpt,
    NoLayersOpt,
    OffsetOpt,
    ProgressOpt,
    QuietOpt,
    ShardOpt,
    Tf32Opt,
    TrustPickleOpt,
    WrtInputOpt,
    for_results_file,
    settings_from,
)

SourceArg = Annotated[Path, typer.Argument(
    help="Model file, or a results file written by `jaccli compute` (then DATA is not given).")]


def spectrum(
    ctx: typer.Context,
    source: SourceArg,
    data: Annotated[Path | None, typer.Argument(help="Samples (as for compute).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="HDF5 file for the spectra (docs/FORMAT.md).",
        rich_help_panel="Output")] = None,
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
        "--max-steps", min=1,
        help="Lanczos: cap on Krylov vectors (default min(D, max(20k + 100, 300)) per "
             "sample; min(D, max(60k + 400, 1000)) for a shared map, decomposed once).",
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
    input: InputOpt = None, const: ConstOpt = None, wrt: WrtInputOpt = None,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    shard: ShardOpt = None,
    granularity: GranularityOpt = Granularity.module, layers: LayersOpt = None,
    no_layers: NoLayersOpt = False, end_to_end: EndToEndOpt = True,
    model_output: ModelOutputOpt = None,
    batch_size: BatchSizeOpt = None, max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32, tf32: Tf32Opt = False,
    compression: CompressionOpt = Compression.none,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Under torchrun: reuse the shard files in OUTPUT.parts/ that hold "
                         "exactly a rank's samples with this run's provenance; compute the "
                         "rest.", rich_help_panel="Output")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, progress: ProgressOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print, per layer, the method, its predicted time on this machine "
                          "and its memory, then stop.")] = False,
) -> None:
    """Singular values, norms, condition numbers and ranks of every Jacobian, per sample.

    DATA may be - to read a .npy stream from standard input. Under torchrun each rank
    decomposes a contiguous shard and rank 0 writes OUTPUT over the shard files."""
    from ..pipelines.distributed import torchrun_rank
    from .render import stdout_console

    quiet = quiet or (torchrun_rank() or 0) != 0  # under torchrun only rank 0 prints
    out = stdout_console(quiet)

    def run() -> None:
        from ..errors import UsageError
        from ..pipelines.distributed import detect
        from ..pipelines.spectrum_file import is_results_file, spectrum_from_results
        from ..settings import SpectrumSettings
        from .render import emit_json, progress_bar
        from .render_spectrum import render_spectrum, write_plots

        from_file = is_results_file(source)
        settings = settings_from(SpectrumSettings, ctx, exclude=("source",), model=source,
                                 **(for_results_file(ctx, source) if from_file else {}))
        if from_file and data is not None:
            raise UsageError(f"{source} is a results file and already holds its samples; "
                             "drop DATA")
        if not from_file and data is None:
            raise UsageError("missing DATA: give the samples after the model file (or "
                             "pass a results file written by `jaccli compute`)")
        launch = detect()
        if resume and launch is None:
            raise UsageError("--resume continues a run launched with torchrun (it reuses "
                             "the shard files in OUTPUT.parts/); without torchrun, rerun the "
                             "missing --shard jobs and join them with `jaccli merge`")
        if launch is not None and not dry_run:
            from ..pipelines.distributed import started
            from ..pipelines.spectrum_ranks import run_ranked_spectrum

            with started(launch, settings.run.device) as ranked:
                outcome = run_ranked_spectrum(settings, ranked,
                                              source=source if from_file else None)
            if outcome is None:
                return
            summary = outcome.summary
        elif from_file:
            if launch is not None and not launch.is_main:
                return
            summary = spectrum_from_results(settings, source).summary
        else:
            if launch is not None and not launch.is_main:
                return  # --dry-run under torchrun: rank 0 prints the plan
            from ..pipelines.spectrum import prepare_spectrum, run_spectrum

            prepared = prepare_spectrum(settings)
            if dry_run:
                from ..pipelines.spectrum_cost import spectrum_dry_run
                from .render_spectrum import render_spectrum_plan

                plan = spectrum_dry_run(prepared)
                emit_json(plan, quiet) if json_output else render_spectrum_plan(plan, out)
                return
            shown = False if quiet else progress
            label = "computing"
            if shown or (shown is None and sys.stderr.isatty()):  # an ETA from the start
                from ..pipelines.spectrum_cost import spectrum_dry_run

                label = f"predicted {spectrum_dry_run(prepared)['seconds']:.3g} s"
            with progress_bar(len(prepared.inputs.data), shown, label) as on_batch:
                summary = run_spectrum(settings, on_batch=on_batch, run=prepared).summary
        if plot is not None:
            summary["plots"] = [str(p) for p in write_plots(summary, plot)]
        if json_output:
            emit_json(summary, quiet)
        else:
            render_spectrum(summary, out)

    guarded(run, oom_hint="lower --batch-size or --max-memory, select fewer layers with "
                          "--layers, or ask for --top-k")


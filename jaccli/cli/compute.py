"""`jaccli compute` and `jaccli inspect`: Jacobians of every layer, and the plan without them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import Compression, Dtype, Granularity, Loss, Mode, Store
from .errors import guarded
from .options import (
    ArchOpt,
    ArchPathOpt,
    BatchSizeOpt,
    CompressionLevelOpt,
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
    ModeOpt,
    NoLayersOpt,
    OffsetOpt,
    OutputOpt,
    ParamsOpt,
    ProgressOpt,
    QuietOpt,
    ShardOpt,
    StoreOpt,
    StrictRulesOpt,
    Tf32Opt,
    TrustPickleOpt,
    WrtInputOpt,
    parse_shape,
    settings_from,
)


def compute(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Model file (TorchScript, .pt2, safetensors, "
                                               "state_dict with --arch).")],
    data: Annotated[Path, typer.Argument(help="Samples along the first axis: .npy, .npz, "
                                              ".safetensors, .h5/.hdf5, .pt or .csv.")],
    output: OutputOpt = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    input: InputOpt = None, const: ConstOpt = None,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    shard: ShardOpt = None,
    granularity: GranularityOpt = Granularity.module, layers: LayersOpt = None,
    no_layers: NoLayersOpt = False, end_to_end: EndToEndOpt = True,
    model_output: ModelOutputOpt = None,
    batch_size: BatchSizeOpt = None, max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32, mode: ModeOpt = Mode.auto,
    store: StoreOpt = Store.compact, strict_rules: StrictRulesOpt = False, tf32: Tf32Opt = False,
    compression: CompressionOpt = Compression.none,
    compression_level: CompressionLevelOpt = None,
    max_output: Annotated[str | None, typer.Option(
        "--max-output", help="Refuse before computing when the output file would be larger "
                             "than this, e.g. 20GB (default: the free space on its file "
                             "system, less a margin).", rich_help_panel="Output")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the plan (layers, modes, sizes, batch size) and stop.")] = False,
    wrt: Annotated[list[str] | None, typer.Option(
        "--wrt", help="Differentiate w.r.t. inputs (default) and/or params (repeatable); "
                      "or NAME: w.r.t. that input of the model's forward (see --input), "
                      "the others held fixed.", rich_help_panel="Parameters")] = None,
    params: ParamsOpt = None,
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
    resume: Annotated[bool, typer.Option(
        "--resume", help="Under torchrun: reuse the shard files in OUTPUT.parts/ that hold "
                         "exactly a rank's samples with this run's provenance; compute the "
                         "rest.", rich_help_panel="Output")] = False,
    json_output: JsonOpt = False, quiet: QuietOpt = False, progress: ProgressOpt = None,
) -> None:
    """Compute every layer's per-sample Jacobian (and the end-to-end one) for DATA; with
    --wrt params, per-sample Jacobians w.r.t. the parameters.

    DATA may be - to read a .npy stream from standard input. Under torchrun each rank
    computes a contiguous shard and rank 0 writes OUTPUT over the shard files."""
    from ..pipelines.distributed import torchrun_rank
    from .render import stdout_console

    quiet = quiet or (torchrun_rank() or 0) != 0  # under torchrun only rank 0 prints
    out = stdout_console(quiet)

    def run() -> None:
        from ..errors import UsageError
        from ..pipelines.compute import prepare, run_compute
        from ..pipelines.distributed import detect
        from ..settings import ComputeSettings
        from .render import emit_json, progress_bar, render_plan, render_table

        settings = settings_from(ComputeSettings, ctx)
        launch = detect()
        if launch is not None and not dry_run:
            from ..pipelines.compute_ranks import run_ranked_compute
            from ..pipelines.distributed import started

            with started(launch, settings.run.device) as ranked:
                summary = run_ranked_compute(settings, ranked)
            if summary is not None and json_output:
                emit_json(summary.to_dict(), quiet)
            elif summary is not None:
                render_table(summary, out)
            return
        if resume and launch is None:
            raise UsageError("--resume continues a run launched with torchrun (it reuses "
                             "the shard files in OUTPUT.parts/); without torchrun, rerun the "
                             "missing --shard jobs and join them with `jaccli merge`")
        if launch is not None and not launch.is_main:
            return  # --dry-run under torchrun: rank 0 prints the plan
        prepared = prepare(settings)
        if dry_run:
            plan = prepared.plan.to_dict()
            if json_output:
                emit_json(plan, quiet)
            else:
                render_plan(plan, out, title=f"jaccli compute --dry-run: {model} on {data}")
            return
        with progress_bar(len(prepared.inputs.data), False if quiet else progress) as on_batch:
            summary = run_compute(settings, on_batch=on_batch, prepared=prepared)
        if json_output:
            emit_json(summary.to_dict(), quiet)
        else:
            render_table(summary, out)

    guarded(run)


def inspect(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Model file.")],
    input_shape: Annotated[str | None, typer.Option(
        "--input-shape", help="Per-sample input shape, e.g. 1,8,8 (default: from --data or "
                              "the model file).")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Data file: its sample shape and count are used.")] = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    input: InputOpt = None, const: ConstOpt = None, wrt: WrtInputOpt = None,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    granularity: GranularityOpt = Granularity.module, layers: LayersOpt = None,
    no_layers: NoLayersOpt = False, end_to_end: EndToEndOpt = True,
    model_output: ModelOutputOpt = None,
    dtype: DtypeOpt = Dtype.float32, device: DeviceOpt = "cpu",
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory budget for the one traced sample, e.g. 2GiB.")] = None,
    json_output: JsonOpt = False,
) -> None:
    """List the model's layers, their shapes and each Jacobian's size, computing nothing."""
    from .render import stdout_console

    out = stdout_console()
    shape = parse_shape(input_shape)

    def run() -> None:
        from ..pipelines.compute import inspect_model
        from ..settings import ComputeSettings
        from .render import emit_json, render_plan

        settings = settings_from(ComputeSettings, ctx, exclude=("input_shape",))
        plan = inspect_model(settings, shape).to_dict()
        if json_output:
            emit_json(plan)
        else:
            render_plan(plan, out, title=f"jaccli inspect: {model}", show_batches=False)

    guarded(run)

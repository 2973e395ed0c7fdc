"""`jaccli ntk`: the empirical neural tangent kernel of all parameters, written block by block."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import Compression, Dtype
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
    InputOpt,
    JsonOpt,
    KeyOpt,
    LimitOpt,
    MaxMemoryOpt,
    ModelOutputOpt,
    OffsetOpt,
    ProgressOpt,
    QuietOpt,
    Tf32Opt,
    TrustPickleOpt,
    settings_from,
)

KERNEL = "Kernel"


def ntk(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Model file (any format jaccli loads).")],
    data: Annotated[Path, typer.Argument(help="Samples X (- for a .npy stream on stdin).")],
    data2: Annotated[Path | None, typer.Argument(
        help="Samples X2 for the cross kernel Θ(X, X2) (default: Θ(X, X)).")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="HDF5 file for the kernel (docs/FORMAT.md), written block "
                               "by block. Without it, only the summary is printed.",
        rich_help_panel="Output")] = None,
    trace: Annotated[bool, typer.Option(
        "--trace", help="Σ_c Θ_cc per pair of samples: an N×M kernel.",
        rich_help_panel=KERNEL)] = False,
    diagonal: Annotated[bool, typer.Option(
        "--diagonal", help="Only the C×C blocks Θ(xᵢ, xᵢ): N×C×C.", rich_help_panel=KERNEL)
    ] = False,
    per_layer: Annotated[bool, typer.Option(
        "--per-layer", help="Also store each layer's contribution Θ_l (Σ_l Θ_l = Θ).",
        rich_help_panel=KERNEL)] = False,
    spectrum: Annotated[bool, typer.Option(
        "--spectrum", help="Eigenvalues of the (N·C)×(N·C) kernel Θ(X, X): top ones, λ_min, "
                           "condition number, effective rank (it must fit in memory).",
        rich_help_panel=KERNEL)] = False,
    top_k: Annotated[int, typer.Option(
        "--top-k", min=1, help="--spectrum: how many of the largest eigenvalues to show.",
        rich_help_panel=KERNEL)] = 10,
    model_output: ModelOutputOpt = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    input: InputOpt = None, const: ConstOpt = None,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    batch_size: BatchSizeOpt = None, max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32, tf32: Tf32Opt = False,
    compression: CompressionOpt = Compression.none,
    compression_level: CompressionLevelOpt = None,
    json_output: JsonOpt = False, quiet: QuietOpt = False, progress: ProgressOpt = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print each parameter's route and the cost model's multiply-adds "
                          "and bytes, the block size and the kernel's size, then stop.")
    ] = False,
) -> None:
    """The empirical NTK Θ(x, x') = J_θ(x) J_θ(x')ᵀ over all parameters, per pair of samples
    a C×C block, from each layer's structure (never the N×C×P Jacobians of linear layers).

    --offset, --limit and --key select the samples of DATA and DATA2 alike; --batch-size is
    the block size (samples per block of pairs). A forward of several arguments: --input
    NAME=FILE[:KEY] per-sample inputs (rows going with DATA's) and --const NAME=VALUE, both
    held fixed (the kernel is over the parameters). Under torchrun the blocks are split over
    the ranks and rank 0 writes OUTPUT."""
    from ..pipelines.distributed import torchrun_rank
    from .render import stdout_console

    quiet = quiet or (torchrun_rank() or 0) != 0  # under torchrun only rank 0 prints
    out = stdout_console(quiet)

    def run() -> None:
        from ..pipelines.distributed import detect
        from ..pipelines.ntk import ntk_plan, prepare_ntk
        from ..pipelines.ntk_run import run_ntk
        from ..pipelines.ntk_settings import NtkSettings
        from .render import emit_json, progress_bar
        from .render_ntk import render_ntk, render_ntk_plan

        settings = settings_from(NtkSettings, ctx)
        launch = detect()
        if launch is not None and not dry_run:
            from ..pipelines.distributed import started
            from ..pipelines.ntk_ranks import run_ranked_ntk

            with started(launch, settings.run.device) as ranked:
                summary = run_ranked_ntk(settings, ranked)
            if summary is not None:
                emit_json(summary, quiet) if json_output else render_ntk(summary, out)
            return
        if launch is not None and not launch.is_main:
            return  # --dry-run under torchrun: rank 0 prints the plan
        prepared = prepare_ntk(settings)
        if launch is not None:  # --dry-run: the blocks the ranks would split
            from ..pipelines.ntk_ranks import blocks_for_ranks

            prepared = blocks_for_ranks(prepared, launch.world_size)
        if dry_run:
            plan = ntk_plan(prepared) | {"ranks": launch.world_size if launch else 1}
            emit_json(plan, quiet) if json_output else render_ntk_plan(plan, out)
            return
        shown = False if quiet else progress
        with progress_bar(prepared.blocks.computed_blocks, shown, "blocks") as tick:
            summary = run_ntk(settings, run=prepared,
                              on_block=None if tick is None else lambda: tick(1))
        if json_output:
            emit_json(summary, quiet)
        else:
            render_ntk(summary, out)

    guarded(run, oom_hint="lower --batch-size or --max-memory (smaller blocks), or use "
                          "fewer samples with --limit")

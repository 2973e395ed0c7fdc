"""`jaccli jvp`, `jaccli vjp` and `jaccli hessian`: products with Jacobians and Hessians for
every sample, never forming the matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import Dtype, Loss, Which, Wrt
from .errors import guarded
from .options import (
    ArchOpt,
    ArchPathOpt,
    BatchSizeOpt,
    ConstOpt,
    DeviceOpt,
    DtypeOpt,
    InputOpt,
    JsonOpt,
    KeyOpt,
    LimitOpt,
    OffsetOpt,
    ParamsOpt,
    QuietOpt,
    ShardOpt,
    TrustPickleOpt,
    WrtOneOpt,
    settings_from,
)

VectorsOpt = Annotated[Path, typer.Option(
    "--vectors", help="Vectors (.npy, ...): one per sample, or one for all samples. jvp: input "
                      "tangents (or parameter tangents, flattened); vjp: output cotangents.")]
LayerOpt = Annotated[str | None, typer.Option(
    "--layer", help="A layer's Jacobian instead of the end-to-end one (--wrt inputs).")]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="HDF5 output.")]


def product_command(direction: str, doc: str):
    """The `jaccli jvp` or `jaccli vjp` command: the same options, one direction each."""

    def command(
        ctx: typer.Context,
        model: Annotated[Path, typer.Argument(help="Model file.")],
        data: Annotated[Path, typer.Argument(help="Samples (- for a .npy stream on stdin).")],
        vectors: VectorsOpt, layer: LayerOpt = None, wrt: WrtOneOpt = "inputs",
        params: ParamsOpt = None,
        vectors_key: Annotated[str | None, typer.Option("--vectors-key")] = None,
        output: OutputOpt = None,
        arch: ArchOpt = None, arch_path: ArchPathOpt = None,
        trust_pickle: TrustPickleOpt = False, input: InputOpt = None, const: ConstOpt = None,
        key: KeyOpt = None, offset: OffsetOpt = 0,
        limit: LimitOpt = None, shard: ShardOpt = None, device: DeviceOpt = "auto",
        dtype: DtypeOpt = Dtype.float32,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Under torchrun: reuse the shard files in OUTPUT.parts/ that "
                             "hold exactly a rank's samples with this run's provenance.")
        ] = False,
        json_output: JsonOpt = False, quiet: QuietOpt = False,
    ) -> None:
        from ..pipelines.distributed import torchrun_rank
        from .render import stdout_console

        quiet = quiet or (torchrun_rank() or 0) != 0  # under torchrun only rank 0 prints
        out = stdout_console(quiet)

        def run() -> None:
            from ..errors import UsageError
            from ..pipelines.distributed import detect, started
            from ..pipelines.products import run_products
            from ..settings import ProductSettings
            from .render import emit_json, render_products

            settings = settings_from(ProductSettings, ctx, direction=direction)
            launch = detect()
            if launch is None:
                if resume:
                    raise UsageError("--resume continues a run launched with torchrun (it "
                                     "reuses the shard files in OUTPUT.parts/)")
                summary = run_products(settings)
            else:
                from ..pipelines.products_ranks import run_ranked_products

                with started(launch, settings.run.device) as ranked:
                    summary = run_ranked_products(settings, ranked)
                if summary is None:
                    return
            if json_output:
                emit_json(summary, quiet)
            else:
                render_products(summary, out)

        guarded(run, oom_hint="use fewer samples at once with --limit and --offset")

    command.__doc__ = doc
    command.__name__ = direction
    return command


jvp = product_command("jvp", "J v for every sample (forward mode), without forming J.")
vjp = product_command("vjp", "uᵀ J for every sample (reverse mode), without forming J; with "
                             "--wrt params, the per-sample gradients of u · output.")


def hessian(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="Model file.")],
    data: Annotated[Path, typer.Argument(help="Samples.")],
    targets: Annotated[Path, typer.Option("--targets", help="Targets for --loss.")],
    loss: Annotated[Loss, typer.Option("--loss", help="Per-sample loss.")],
    wrt: Annotated[str, typer.Option(
        "--wrt", help="params: Hessian of the mean loss over DATA w.r.t. the parameters; "
                      "inputs: each sample's Hessian w.r.t. its input; NAME: w.r.t. that "
                      "input of the model's forward (see --input), the others held fixed."
    )] = Wrt.params.value,
    params: ParamsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Eigenvalues to report.")] = 5,
    which: Annotated[Which, typer.Option(
        "--which", help="largest (algebraic) or magnitude.")] = Which.largest,
    probes: Annotated[int, typer.Option("--probes", min=2, help="Hutchinson probes for the "
                                                                "trace.")] = 32,
    density: Annotated[bool, typer.Option(
        "--density", help="Spectral density by stochastic Lanczos quadrature (--wrt params).")
    ] = False,
    targets_key: Annotated[str | None, typer.Option("--targets-key")] = None,
    output: OutputOpt = None,
    arch: ArchOpt = None, arch_path: ArchPathOpt = None, trust_pickle: TrustPickleOpt = False,
    input: InputOpt = None, const: ConstOpt = None,
    key: KeyOpt = None, offset: OffsetOpt = 0, limit: LimitOpt = None,
    batch_size: BatchSizeOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = Dtype.float32,
    json_output: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Top eigenvalues, trace and spectral density of a loss Hessian, by Hessian-vector
    products (never formed). Under torchrun each rank takes a contiguous shard of the
    samples and the products are summed over the ranks: the Hessian of the loss over all."""
    from ..pipelines.distributed import torchrun_rank
    from .render import stdout_console

    quiet = quiet or (torchrun_rank() or 0) != 0  # under torchrun only rank 0 prints
    out = stdout_console(quiet)

    def run() -> None:
        from ..pipelines.distributed import detect, started
        from ..pipelines.hessian import run_hessian
        from ..settings import HessianSettings
        from .render import emit_json, render_hessian

        settings = settings_from(HessianSettings, ctx)
        launch = detect()
        if launch is None:
            summary = run_hessian(settings)
        else:
            with started(launch, settings.run.device) as ranked:
                summary = run_hessian(settings, launch=ranked)
            if summary is None or not ranked.is_main:
                return
        if json_output:
            emit_json(summary, quiet)
        else:
            render_hessian(summary, out)

    guarded(run, oom_hint="lower --batch-size, or use fewer samples with --limit")

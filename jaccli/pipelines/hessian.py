"""The `hessian` pipeline: top eigenvalues, trace and spectral density of a loss Hessian by
Hessian-vector products (never formed)."""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import torch

from ..errors import UsageError
from ..graph.call_layout import call as call_model
from ..io.models import ModelFormat
from ..io.results.writer import ResultsWriter
from ..params.hessian import (
    HessianSpectrum,
    hessian_spectrum,
    inputs_hvp,
    params_hvp,
    smoothed_density,
)
from ..params.jacobians import select_params
from ..params.objectives import check_targets, per_sample_loss
from ..reports.stats import aggregate
from ..settings import HessianSettings
from ..tracing.recorder import first_tensor
from .common import (
    check_independence,
    guard_output,
    load_inputs,
    load_targets,
    product_batch_size,
    provenance,
)
from .distributed import Launch
from .ranked import RankFailed, every_rank, on_main


def run_hessian(settings: HessianSettings, *, launch: Launch | None = None) -> dict | None:
    """Top eigenvalues, trace and (optionally) spectral density of the loss Hessian.

    Under torchrun (`launch`) each rank takes its contiguous shard of the samples: for
    `--wrt params` every Hessian-vector product is summed over the ranks (one all-reduce),
    so the top-k, trace and density are those of the mean loss over all samples; per-input
    Hessians are gathered on rank 0. The summary on rank 0, None on the other ranks."""
    if settings.loss is None or settings.targets is None:
        raise UsageError("hessian needs --targets FILE and --loss NAME")
    if launch is not None:
        whole = settings
        settings = replace(settings, data=launch.selection(settings.data),
                           run=replace(settings.run, device=launch.device))
        loaded = every_rank(launch, lambda: _load(settings, guard=launch.is_main))
        n_total = sum(launch.exchange(len(loaded[0].data)))
    else:
        loaded = _load(settings, guard=True)
        n_total = len(loaded[0].data)
    inputs, loss, t_all, d_in, batch = loaded
    n = len(inputs.data)
    layout = inputs.layout  # a forward of several arguments: the others held fixed

    def arguments(x, held):  # how a batch calls the model
        return (x,) if layout is None else tuple(layout.arguments(x, held))

    started = time.perf_counter()
    if settings.wrt == "params":
        params = select_params(inputs.model, settings.params)
        dim = sum(math.prod(p.shape) for p in params)

        def batches():  # (x, targets, held)
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                x, held = inputs.batch(start, stop)
                yield x, t_all[start:stop], held

        operator = params_hvp(inputs.model, loss, batches, params, n_total,
                              arguments=arguments)
        if launch is not None:
            operator = _summed(operator, launch)
        spectrum = hessian_spectrum(operator, batch=1, dim=dim, k=settings.top_k,
                                    probes=settings.probes, dtype=inputs.dtype,
                                    device=inputs.device, which=settings.which,
                                    density_probes=8 if settings.density else 0)
        indices = inputs.data.indices if launch is None \
            else np.concatenate(launch.exchange(inputs.data.indices))
    else:  # one Hessian per sample: batch by batch, to bound memory
        dim = d_in

        def per_input():
            x_all, held_all = inputs.batch(0, n)  # the samples themselves are small
            parts = []
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                held = tuple(h[start:stop] for h in held_all)
                parts.append(hessian_spectrum(
                    inputs_hvp(inputs.model, loss, x_all[start:stop], t_all[start:stop],
                               held=held, arguments=arguments),
                    batch=stop - start, dim=dim, k=settings.top_k, probes=settings.probes,
                    dtype=inputs.dtype, device=inputs.device, which=settings.which,
                    indices=inputs.data.indices[start:stop]))
            return HessianSpectrum.concatenate(parts)

        if launch is None:
            spectrum, indices = per_input(), inputs.data.indices
        else:  # every rank's samples, in order, on rank 0
            mine = every_rank(launch, lambda: _on_cpu(per_input()))
            parts = launch.gather((mine, inputs.data.indices))
            spectrum = HessianSpectrum.concatenate([p for p, _ in parts]) \
                if launch.is_main else None
            indices = np.concatenate([i for _, i in parts]) if launch.is_main else None
    if launch is None:
        return _summarize(settings, inputs, spectrum, indices, dim, batch, started)
    return on_main(launch, lambda: _summarize(whole, inputs, spectrum, indices, dim, batch,
                                              started))


def _load(settings: HessianSettings, *, guard: bool):
    """(inputs, per-sample loss, targets `(N, ...)`, D_in, batch size), checked."""
    if guard:
        guard_output(settings.output, settings.model, settings.data, settings.targets)
    inputs = load_inputs(settings.model, settings.data, settings.run)
    n = len(inputs.data)
    targets_source = load_targets(settings.targets, settings.targets_key, settings.data, n)
    with torch.no_grad():
        output_shape = tuple(first_tensor(call_model(
            inputs.model, inputs.layout, inputs.example[:1],
            tuple(h[:1] for h in inputs.held_example))).shape[1:])
    check_targets(settings.loss, targets_source.read(0, n), output_shape)
    if settings.wrt == "params" and inputs.loaded.format is ModelFormat.TORCHSCRIPT:
        raise UsageError("hessian --wrt params needs a model torch.func can call with other "
                         "parameters, which TorchScript cannot do; give the weights as a "
                         "state_dict with --arch, or a torch.export (.pt2) archive")
    loss = per_sample_loss(settings.loss)
    d_in = math.prod(inputs.data.sample_shape)
    batch = product_batch_size(settings.run, inputs, d_in, math.prod(output_shape))
    check_independence(inputs, batch)
    t_all = torch.from_numpy(np.array(targets_source.read(0, n))).to(inputs.device)
    return inputs, loss, t_all, d_in, batch


def _summed(operator, launch: Launch):
    """`operator` (this rank's share of H V) summed over the ranks; a rank failing in its
    share stops every rank at the same product."""
    def apply(block: torch.Tensor) -> torch.Tensor:
        failure, out = None, None
        try:
            out = operator(block)
        except Exception as exc:  # the others still wait in the all-reduce
            failure = exc
        total, failed = launch.sum_tensor(torch.zeros_like(block) if out is None else out,
                                          failure is not None)
        if failure is not None:
            raise failure
        if failed:
            raise RankFailed("stopped because another rank failed in a Hessian-vector "
                             "product (that rank printed why)")
        return total

    return apply


def _on_cpu(spectrum: HessianSpectrum) -> HessianSpectrum:
    """`spectrum` with its tensors on the CPU (to send to rank 0)."""
    moved = {name: getattr(spectrum, name).cpu() for name in
             ("eigenvalues", "residuals", "trace", "trace_se", "converged")
             if getattr(spectrum, name) is not None}
    return replace(spectrum, **moved)


def _summarize(settings: HessianSettings, inputs, spectrum: HessianSpectrum, indices,
               dim: int, batch: int, started: float) -> dict:
    """The summary of `spectrum` over the samples `indices`; the file written when asked."""
    n = len(indices)
    eigen = spectrum.eigenvalues.detach().double().cpu().numpy()
    residuals = spectrum.residuals.detach().double().cpu().numpy()
    trace = spectrum.trace.detach().double().cpu().numpy()
    trace_se = spectrum.trace_se.detach().double().cpu().numpy()
    converged = spectrum.converged.detach().cpu().numpy()
    summary = {"schema": "jaccli/hessian-summary", "schema_version": 1, "command": "hessian",
               "wrt": settings.wrt, "loss": settings.loss, "model": str(settings.model.path),
               "data": str(settings.data.path), "n_samples": n, "dim": dim, "which": settings.which,
               "krylov_vectors": spectrum.steps, "tolerance": spectrum.tolerance,
               "unconverged": int((~converged).sum()), "output": None,
               "seconds": time.perf_counter() - started}
    if settings.wrt == "params":
        summary |= {"eigenvalues": eigen[0].tolist(), "residuals": residuals[0].tolist(),
                    "converged": converged[0].tolist(),
                    "trace": float(trace[0]), "trace_se": float(trace_se[0])}
    else:
        summary |= {"top_eigenvalue": aggregate(eigen[:, 0]), "trace": aggregate(trace),
                    "max_residual": float(residuals.max())}
    density = None
    if spectrum.density is not None:
        grid, values = smoothed_density(*spectrum.density)
        density = (grid.double().cpu().numpy(), values.double().cpu().numpy())
        summary["density"] = {"grid": density[0].tolist(), "density": density[1].tolist()}
    if settings.output.path is not None:
        _write(settings, inputs, spectrum, density, eigen, residuals, trace, trace_se, dim,
               batch, indices, summary["seconds"])
        summary["output"] = str(settings.output.path)
    return summary


def _write(settings: HessianSettings, inputs, spectrum: HessianSpectrum, density, eigen,
           residuals, trace, trace_se, dim: int, batch: int, indices, seconds: float) -> None:
    attrs = provenance(settings.command_line, inputs) | {"n_samples": len(indices)}
    with ResultsWriter(settings.output.path, kind="hessian", sample_index=indices,
                       attrs=attrs) as writer:
        group = writer.create_group("hessian", parent="hessian_results", attrs={
            "wrt": settings.wrt, "loss": settings.loss, "dim": dim, "which": settings.which,
            "krylov_vectors": spectrum.steps})
        group.create_dataset("eigenvalues", data=eigen)
        group.create_dataset("residual", data=residuals)
        group.create_dataset("converged", data=spectrum.converged.detach().cpu().numpy())
        group.attrs["tolerance"] = spectrum.tolerance
        group.create_dataset("trace", data=trace)
        group.create_dataset("trace_se", data=trace_se)
        if density is not None:
            nodes, weights = spectrum.density
            group.create_dataset("slq_nodes", data=nodes.double().cpu().numpy())
            group.create_dataset("slq_weights", data=weights.double().cpu().numpy())
            group.create_dataset("density_grid", data=density[0])
            group.create_dataset("density", data=density[1])
        writer.finish({"batch_size": batch, "seconds": seconds})

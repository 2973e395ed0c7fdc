"""The `hessian` pipeline: top eigenvalues, trace and spectral density of a loss Hessian by
Hessian-vector products (never formed)."""

from __future__ import annotations

import math
import time

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


def run_hessian(settings: HessianSettings) -> dict:
    """Top eigenvalues, trace and (optionally) spectral density of the loss Hessian."""
    if settings.loss is None or settings.targets is None:
        raise UsageError("hessian needs --targets FILE and --loss NAME")
    guard_output(settings.output, settings.model, settings.data, settings.targets)
    inputs = load_inputs(settings.model, settings.data, settings.run)
    n = len(inputs.data)
    targets_source = load_targets(settings.targets, settings.targets_key, settings.data, n)
    layout = inputs.layout  # a forward of several arguments: the others held fixed
    with torch.no_grad():
        output_shape = tuple(first_tensor(call_model(
            inputs.model, layout, inputs.example[:1],
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
    x_all, held_all = inputs.batch(0, n) if settings.wrt == "inputs" else (None, ())
    t_all = torch.from_numpy(np.array(targets_source.read(0, n))).to(inputs.device)

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

        operator = params_hvp(inputs.model, loss, batches, params, n, arguments=arguments)
        spectrum = hessian_spectrum(operator, batch=1, dim=dim, k=settings.top_k,
                                    probes=settings.probes, dtype=inputs.dtype,
                                    device=inputs.device, which=settings.which,
                                    density_probes=8 if settings.density else 0)
    else:  # one Hessian per sample: batch by batch, to bound memory
        dim = d_in
        parts = []
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            held = tuple(h[start:stop] for h in held_all)
            parts.append(hessian_spectrum(
                inputs_hvp(inputs.model, loss, x_all[start:stop], t_all[start:stop],
                           held=held, arguments=arguments),
                batch=stop - start, dim=dim, k=settings.top_k, probes=settings.probes,
                dtype=inputs.dtype, device=inputs.device, which=settings.which))
        spectrum = HessianSpectrum.concatenate(parts)
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
        _write(settings, inputs, spectrum, density, eigen, residuals, trace, trace_se, dim, batch,
               summary["seconds"])
        summary["output"] = str(settings.output.path)
    return summary


def _write(settings: HessianSettings, inputs, spectrum: HessianSpectrum, density, eigen,
           residuals, trace, trace_se, dim: int, batch: int, seconds: float) -> None:
    with ResultsWriter(settings.output.path, kind="hessian", sample_index=inputs.data.indices,
                       attrs=provenance(settings.command_line, inputs)) as writer:
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

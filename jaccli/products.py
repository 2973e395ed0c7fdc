"""`jaccli jvp`, `jaccli vjp` and `jaccli hessian`: products with Jacobians and Hessians for
every sample, never forming the matrices."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .compute import Inputs, load_inputs, provenance, to_tensor
from .config import ComputeConfig
from .data import load_data
from .engine.engine import JacobianEngine
from .errors import ShapeMismatchError, UsageError
from .layers import ForwardRecorder, run_model
from .memory import memory_budget
from .objectives import objective, per_sample_loss
from .params import param_jvp, param_vjp, select_params
from .planner import make_plan
from .stats import aggregate
from .writer import ResultsWriter


@dataclass
class ProductConfig(ComputeConfig):
    """`jvp`/`vjp` (direction) and `hessian` options on top of `compute`'s."""

    direction: str = "jvp"  # jvp | vjp
    vectors: Path | None = None
    vectors_key: str | None = None
    layer: str | None = None
    top_k: int = 5
    probes: int = 32
    density: bool = False
    which: str = "largest"


def run_products(config: ProductConfig) -> dict:
    """J v (jvp) or uᵀ J (vjp) for every sample; written when `config.output` is set."""
    if config.layer is not None and "params" in config.wrt:
        raise UsageError("--layer goes with --wrt inputs")
    inputs = load_inputs(config)
    n = len(inputs.data)
    wrt = config.wrt[0]
    started = time.perf_counter()
    engine = layer = None
    if wrt == "inputs":
        engine, layer = _operator_engine(config, inputs)
    params = select_params(inputs.model, config.params) if wrt == "params" else None
    vectors = _vectors(config, n)
    products, batch = [], _batch_size(config, inputs)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x = to_tensor(inputs.data.read(start, stop), inputs.device, inputs.dtype)
        v = vectors[start:stop] if vectors.shape[0] == n else vectors
        products.append(_product(config, inputs, engine, layer, params, x, v).detach().cpu())
    result = torch.cat(products).to(torch.float64).numpy()
    norms = np.linalg.norm(result.reshape(n, -1), axis=1)
    summary = {"schema": "jaccli/products-summary", "schema_version": 1,
               "command": config.direction, "wrt": wrt, "layer": config.layer or (
                   "(end-to-end)" if wrt == "inputs" else "parameters"),
               "model": str(config.model), "data": str(config.data), "n_samples": n,
               "shape": list(result.shape), "norm": aggregate(norms), "output": None,
               "seconds": time.perf_counter() - started}
    if config.output is not None:
        plan = make_plan(engine or _empty_engine(inputs), n_samples=n, dtype=inputs.dtype,
                         device=inputs.device, budget=2**62, budget_source="-")
        with ResultsWriter(config.output, kind="products", sample_index=inputs.data.indices,
                           attrs=provenance(config, inputs.loaded, inputs.data, plan,
                                            inputs.device)) as writer:
            group = writer.create_group("product", parent="products", attrs={
                "direction": config.direction, "wrt": wrt, "layer": summary["layer"]})
            group.create_dataset("product", data=result.astype(
                np.float64 if inputs.dtype == torch.float64 else np.float32))
            group.create_dataset("norm", data=norms)
            writer.finish()
        summary["output"] = str(config.output)
    return summary


def _empty_engine(inputs: Inputs) -> JacobianEngine:
    return JacobianEngine(inputs.model, inputs.trace, layers=[], end_to_end=False,
                          n_samples=len(inputs.data))


def _batch_size(config: ProductConfig, inputs: Inputs) -> int:
    if config.batch_size:
        return config.batch_size
    budget, _ = memory_budget(inputs.device, config.max_memory)
    per_sample = 64 * max(math.prod(inputs.trace.input_shape),
                          math.prod(inputs.trace.output_shape)) * 8
    return max(1, min(4096, budget // per_sample))


def _operator_engine(config: ProductConfig, inputs: Inputs):
    trace = inputs.trace
    layer = None
    if config.layer is not None:
        matches = [c for c in trace.all_layers if c.name == config.layer]
        if not matches:
            raise UsageError(f"--layer {config.layer} is not a layer; layers: "
                             f"{', '.join(c.name for c in trace.all_layers)}")
        layer = matches[0]
    engine = JacobianEngine(inputs.model, trace, layers=[layer] if layer else [],
                            end_to_end=layer is None, n_samples=len(inputs.data),
                            mode=config.mode)
    return engine, layer


def _vectors(config: ProductConfig, n: int) -> torch.Tensor:
    if config.vectors is None:
        raise UsageError("--vectors FILE is required")
    source = load_data(config.vectors, key=config.vectors_key, key_option="--vectors-key")
    array = np.array(source.read(0, len(source)))
    if array.ndim == 1:  # one vector for every sample
        return torch.from_numpy(array)[None]
    if array.shape[0] not in (1, n):
        raise ShapeMismatchError(f"--vectors holds {array.shape[0]} vectors for {n} samples; "
                                 "give one per sample, or one for all")
    return torch.from_numpy(array.reshape(array.shape[0], -1))


def _product(config, inputs, engine, layer, params, x, v) -> torch.Tensor:
    b = x.shape[0]
    v = v.to(device=x.device, dtype=x.dtype)
    if params is not None:
        fn = objective()
        if config.direction == "jvp":
            sizes = [math.prod(p.shape) for p in params]
            flat = v.reshape(-1)
            if flat.numel() != sum(sizes):
                raise ShapeMismatchError(f"--vectors has {flat.numel()} entries; the selected "
                                         f"parameters have {sum(sizes)}")
            tangents = {p.name: part.reshape(p.shape)
                        for p, part in zip(params, torch.split(flat, sizes), strict=True)}
            return param_jvp(inputs.model, x, fn, tangents)
        u = v.expand(b, -1) if v.shape[0] == 1 else v
        grads = param_vjp(inputs.model, x, fn, u, params=params)
        return torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1)
    _, calls = run_model(ForwardRecorder(inputs.model, inputs.loaded.hookable), x)
    records = {r.site: r for r in calls}
    apply_j, apply_jt = (engine.layer_operator(layer, records) if layer is not None
                         else engine.end_to_end_operator(x, records))
    d_in = layer.d_in if layer else math.prod(inputs.trace.input_shape)
    d_out = layer.d_out if layer else math.prod(inputs.trace.output_shape)
    expected = d_in if config.direction == "jvp" else d_out
    if v.shape[-1] != expected:
        raise ShapeMismatchError(f"--vectors have {v.shape[-1]} entries per sample; "
                                 f"{config.direction} needs {expected}")
    block = (v.expand(b, -1) if v.shape[0] == 1 else v)[:, :, None]
    return (apply_j if config.direction == "jvp" else apply_jt)(block)[:, :, 0]


def run_hessian(config: ProductConfig) -> dict:
    """Top eigenvalues, trace and (optionally) spectral density of the loss Hessian."""
    from .hessian import HessianSpectrum, hessian_spectrum, inputs_hvp, params_hvp, smoothed_density

    if config.loss is None or config.targets is None:
        raise UsageError("hessian needs --targets FILE and --loss NAME")
    inputs = load_inputs(config)
    n = len(inputs.data)
    targets_source = load_data(config.targets, key=config.targets_key, offset=config.offset,
                               limit=config.limit, key_option="--targets-key")
    if len(targets_source) != n:
        raise ShapeMismatchError(f"{config.targets} has {len(targets_source)} targets for {n} "
                                 "samples; they must match")
    loss = per_sample_loss(config.loss)
    batch = _batch_size(config, inputs)
    x_all = to_tensor(inputs.data.read(0, n), inputs.device, inputs.dtype) \
        if config.wrt[0] == "inputs" else None  # the samples themselves are small
    t_all = torch.from_numpy(np.array(targets_source.read(0, n))).to(inputs.device)
    started = time.perf_counter()
    if config.wrt[0] == "params":
        params = select_params(inputs.model, config.params)
        dim = sum(math.prod(p.shape) for p in params)

        def batches():
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                yield (to_tensor(inputs.data.read(start, stop), inputs.device, inputs.dtype),
                       t_all[start:stop])

        operator = params_hvp(inputs.model, loss, batches, params, n)
        spectrum = hessian_spectrum(operator, batch=1, dim=dim, k=config.top_k,
                                    probes=config.probes, dtype=inputs.dtype,
                                    device=inputs.device, which=config.which,
                                    density_probes=8 if config.density else 0)
    else:  # one Hessian per sample: batch by batch, to bound memory
        dim = math.prod(inputs.trace.input_shape)
        parts = []
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            parts.append(hessian_spectrum(
                inputs_hvp(inputs.model, loss, x_all[start:stop], t_all[start:stop]),
                batch=stop - start, dim=dim, k=config.top_k, probes=config.probes,
                dtype=inputs.dtype, device=inputs.device, which=config.which))
        spectrum = HessianSpectrum(
            torch.cat([p.eigenvalues for p in parts]), torch.cat([p.residuals for p in parts]),
            max(p.steps for p in parts), torch.cat([p.trace for p in parts]),
            torch.cat([p.trace_se for p in parts]), dim)
    eigen = spectrum.eigenvalues.detach().double().cpu().numpy()
    residuals = spectrum.residuals.detach().double().cpu().numpy()
    trace = spectrum.trace.detach().double().cpu().numpy()
    trace_se = spectrum.trace_se.detach().double().cpu().numpy()
    summary = {"schema": "jaccli/hessian-summary", "schema_version": 1, "command": "hessian",
               "wrt": config.wrt[0], "loss": config.loss, "model": str(config.model),
               "data": str(config.data), "n_samples": n, "dim": dim, "which": config.which,
               "krylov_vectors": spectrum.steps, "output": None,
               "seconds": time.perf_counter() - started}
    if config.wrt[0] == "params":
        summary |= {"eigenvalues": eigen[0].tolist(), "residuals": residuals[0].tolist(),
                    "trace": float(trace[0]), "trace_se": float(trace_se[0])}
    else:
        summary |= {"top_eigenvalue": aggregate(eigen[:, 0]), "trace": aggregate(trace),
                    "max_residual": float(residuals.max())}
    density = None
    if spectrum.density is not None:
        grid, values = smoothed_density(*spectrum.density)
        density = (grid.double().cpu().numpy(), values.double().cpu().numpy())
        summary["density"] = {"grid": density[0].tolist(), "density": density[1].tolist()}
    if config.output is not None:
        plan = make_plan(_empty_engine(inputs), n_samples=n, dtype=inputs.dtype,
                         device=inputs.device, budget=2**62, budget_source="-")
        with ResultsWriter(config.output, kind="hessian", sample_index=inputs.data.indices,
                           attrs=provenance(config, inputs.loaded, inputs.data, plan,
                                            inputs.device)) as writer:
            group = writer.create_group("hessian", parent="hessian_results", attrs={
                "wrt": config.wrt[0], "loss": config.loss, "dim": dim, "which": config.which})
            group.create_dataset("eigenvalues", data=eigen)
            group.create_dataset("residual", data=residuals)
            group.create_dataset("trace", data=trace)
            group.create_dataset("trace_se", data=trace_se)
            if density is not None:
                nodes, weights = spectrum.density
                group.create_dataset("slq_nodes", data=nodes.double().cpu().numpy())
                group.create_dataset("slq_weights", data=weights.double().cpu().numpy())
                group.create_dataset("density_grid", data=density[0])
                group.create_dataset("density", data=density[1])
            writer.finish()
        summary["output"] = str(config.output)
    return summary

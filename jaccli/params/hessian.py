"""Hessians of a loss through Hessian-vector products, never formed: top eigenvalues (block
Lanczos, each with its residual and a converged flag), the trace (Hutch++ or Hutchinson, with
its standard error) and the spectral density (stochastic Lanczos quadrature).

w.r.t. the parameters: the Hessian of the mean per-sample loss over the whole dataset (one
`D x D` operator; every product is one pass over the data). w.r.t. the inputs: one
`D_in x D_in` Hessian per sample (all samples at once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..spectra.lanczos import ritz_nodes, top_eigenvalues
from ..spectra.trace import hutchinson_trace
from .jacobians import ParamInfo

# (x, targets) or (x, targets, held): held, the batch's values of the inputs held fixed
Batches = Callable[[], Iterable[tuple]]
# How a batch calls the model: (x, held) -> the forward's positional arguments
Arguments = Callable[[torch.Tensor, tuple], tuple]


def _only_x(x: torch.Tensor, held: tuple) -> tuple:
    return (x,)


@dataclass
class HessianSpectrum:
    """eigenvalues / residuals: `(B, k)` (B = 1 for parameters, N for inputs), residuals
    `‖H y − θ y‖ / ‖H‖` (see `jaccli.spectra.lanczos`); trace, trace_se: `(B,)`; density: SLQ
    nodes and weights (parameters only), or None; converged: `(B, k)` bool, False where a value
    may be wrong (residual above `tolerance`, the effective tolerance, or an unresolved
    multiplicity); None only when built by hand without it."""

    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    steps: int
    trace: torch.Tensor
    trace_se: torch.Tensor
    dim: int
    density: tuple[torch.Tensor, torch.Tensor] | None = None
    converged: torch.Tensor | None = None
    tolerance: float | None = None

    @classmethod
    def concatenate(cls, parts: list[HessianSpectrum]) -> HessianSpectrum:
        """One spectrum for the samples of several batches (per-input Hessians), in order."""
        def cat(name):
            return torch.cat([getattr(p, name) for p in parts])

        converged = cat("converged") if all(p.converged is not None for p in parts) else None
        tolerances = [p.tolerance for p in parts if p.tolerance is not None]
        return cls(cat("eigenvalues"), cat("residuals"), max(p.steps for p in parts),
                   cat("trace"), cat("trace_se"), parts[0].dim, None, converged,
                   max(tolerances) if tolerances else None)


def params_hvp(model: nn.Module, loss: Callable, batches: Batches, params: list[ParamInfo],
               n_samples: int, arguments: Arguments = _only_x
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`V (1, D, b) -> H V` for the mean loss over all batches; D = the selected parameters,
    flattened and concatenated in order. arguments: how a batch calls a forward taking
    several arguments (default: `model(x)`)."""
    names = [p.name for p in params]
    all_params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    theta = {k: all_params[k].detach() for k in names}
    fixed = {k: v.detach() for k, v in all_params.items() if k not in theta}
    def apply(block: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(block)
        for x, t, *held in batches():
            args = arguments(x, held[0] if held else ())
            out[0] += _batch_hvp(lambda p, args=args, t=t: loss(functional_call(
                model, ({**fixed, **p}, buffers), args), t).sum() / n_samples, theta, block[0])
        return out

    return apply


def _batch_hvp(batch_loss: Callable[[dict], torch.Tensor], theta: dict[str, torch.Tensor],
               block: torch.Tensor) -> torch.Tensor:
    """`H V` `(D, b)` for the Hessian H of `batch_loss` at `theta` and V = `block` `(D, b)`.

    Reverse over reverse: one forward pass and one differentiable gradient per call, then one
    backward pass per column through it. (Forward over reverse, `jvp(grad(f))`, runs ATen
    decompositions in Python and costs ~50× more per product on small models.)"""
    leaves = [v.detach().requires_grad_(True) for v in theta.values()]
    with torch.enable_grad():
        value = batch_loss(dict(zip(theta, leaves, strict=True)))
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    bounds = torch.tensor([0] + [leaf.numel() for leaf in leaves]).cumsum(0).tolist()
    kept = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = torch.zeros_like(block)
    if not kept:  # the loss is at most linear in every selected parameter: H = 0
        return out
    for col in range(block.shape[1]):
        cotangents = [block[bounds[i]:bounds[i + 1], col].reshape(leaves[i].shape) for i in kept]
        hv = torch.autograd.grad([grads[i] for i in kept], leaves, grad_outputs=cotangents,
                                 retain_graph=col < block.shape[1] - 1, allow_unused=True)
        for i, h in enumerate(hv):
            if h is not None:
                out[bounds[i]:bounds[i + 1], col] = h.reshape(-1)
    return out


def inputs_hvp(model: nn.Module, loss: Callable, x: torch.Tensor, targets: torch.Tensor, *,
               held: tuple = (), arguments: Arguments = _only_x
               ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`V (N, D_in, b) -> H_i v_i` per sample, H_i the Hessian of sample i's loss w.r.t. x_i;
    held: the inputs `(N, ...)` held fixed, passed as `arguments(x, held)` says."""
    n = x.shape[0]

    def sample_loss(xi, ti, *hi):
        rows = tuple(h.unsqueeze(0) for h in hi)
        return loss(model(*arguments(xi.unsqueeze(0), rows)), ti.unsqueeze(0))[0]

    def hvp_one(xi, ti, v, *hi):
        return jvp(lambda z: grad(sample_loss)(z, ti, *hi), (xi,), (v.reshape(xi.shape),))[1]

    per_sample = vmap(hvp_one, in_dims=(0, 0, 0, *(0 for _ in held)))

    def apply(block: torch.Tensor) -> torch.Tensor:
        columns = [per_sample(x, targets, block[:, :, c], *held).reshape(n, -1)
                   for c in range(block.shape[2])]
        return torch.stack(columns, dim=2)

    return apply


def hessian_spectrum(operator: Callable[[torch.Tensor], torch.Tensor], *, batch: int, dim: int,
                     k: int, probes: int, dtype: torch.dtype, device: torch.device,
                     tol: float = 1e-8, which: str = "largest", density_probes: int = 0,
                     density_steps: int = 60, seed: int = 0,
                     trace_method: str = "hutch++",
                     indices: Sequence[int] | None = None) -> HessianSpectrum:
    """Top-k eigenvalues, trace (`trace_method`: "hutch++" or "hutchinson", `probes`
    products) and (optionally) SLQ density of `operator` `(B, dim, b) -> (B, dim, b)`;
    `indices`: the samples' indices in the data, which draw their random vectors (a per-sample
    Hessian's estimates then do not depend on the batch it is in)."""
    top = top_eigenvalues(operator, n=batch, dim=dim, k=k, dtype=dtype, device=device,
                          which=which, tol=tol, seed=seed, indices=indices)
    trace, trace_se = hutchinson_trace(operator, n=batch, dim=dim, dtype=dtype, device=device,
                                       probes=probes, seed=seed + 1, method=trace_method,
                                       indices=indices)
    density = None
    if density_probes and batch == 1:
        nodes, weights = [], []
        for probe in range(density_probes):
            theta, w = ritz_nodes(operator, dim=dim, steps=density_steps, dtype=dtype,
                                  device=device, seed=seed + 100 + probe)
            nodes.append(theta)
            weights.append(w / density_probes)
        density = (torch.cat(nodes), torch.cat(weights))
    return HessianSpectrum(top.values, top.residuals, top.steps, trace, trace_se, dim, density,
                           top.converged, top.tolerance)


def smoothed_density(nodes: torch.Tensor, weights: torch.Tensor, points: int = 200,
                     width: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SLQ density on a grid: Gaussians of `width` (default 1% of the range) at the nodes."""
    low, high = float(nodes.min()), float(nodes.max())
    span = max(high - low, 1e-12)
    width = width or 0.01 * span
    grid = torch.linspace(low - 0.05 * span, high + 0.05 * span, points, dtype=nodes.dtype)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes[None]) / width) ** 2)
    density = (kernel * weights[None]).sum(1) / (width * (2 * torch.pi) ** 0.5)
    return grid, density

"""Per-sample Jacobians with respect to the parameters, and their products with vectors.

For a per-sample quantity `s_i` (a scalar, or C outputs), the Jacobian of sample i w.r.t. a
parameter tensor `P` of shape S is `(C, *S)`. Parameters whose layer rule has a closed form
(Linear and Conv2d weights and biases: `Rule.param_jacobian` in `jaccli.engine.rules`) use
one backward pass (BackPACK's BatchGrad idea, for any network): the gradient w.r.t. a layer's
output per sample, `G_i`, combined with the layer's input `x_i`. Every other parameter goes
through `vmap(jacrev(functional_call))`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ..engine.rules import rule_for
from ..errors import UsageError


@dataclass
class ParamInfo:
    """A selected parameter: its qualified name, shape, owning module, and how it is done."""

    name: str
    shape: tuple[int, ...]
    module_name: str
    module: nn.Module
    attribute: str  # "weight" / "bias" / ...
    structured: bool


def select_params(model: nn.Module, patterns: Sequence[str] | None = None) -> list[ParamInfo]:
    """The parameters matching any glob in `patterns` (all when None), in model order."""
    owners = {}
    for module_name, module in model.named_modules():
        for attribute, param in module.named_parameters(recurse=False):
            qualified = f"{module_name}.{attribute}" if module_name else attribute
            owners[qualified] = (module_name, module, attribute, param)
    chosen = []
    for name, (module_name, module, attribute, param) in owners.items():
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        rule = rule_for(module)
        structured = rule is not None and rule.has_param_jacobian(module, attribute)
        chosen.append(ParamInfo(name, tuple(param.shape), module_name, module, attribute,
                                structured))
    if not chosen:
        raise UsageError(f"--params {' '.join(patterns or [])} matches no parameter; the model "
                         f"has: {', '.join(owners) or '(none)'}")
    return chosen


def param_jacobians(model: nn.Module, x: torch.Tensor, objective: Callable,
                    targets: torch.Tensor | None = None,
                    params: list[ParamInfo] | None = None, *,
                    chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians of `objective(model(x), targets)` w.r.t. the selected parameters.

    x: `(N, *in_shape)`. objective returns `(N, C)` or `(N,)`.
    Returns `{name: (N, C, *shape)}` (or `(N, *shape)` for a per-sample scalar).
    """
    params = params if params is not None else select_params(model)
    structured, generic = _split(model, params, x)
    result: dict[str, torch.Tensor] = {}
    if structured:
        result |= _structured(model, x, objective, targets, structured)
    if generic:
        result |= _generic(model, x, objective, targets, generic, chunk_size)
    return {p.name: result[p.name] for p in params}


def _split(model: nn.Module, params: list[ParamInfo], x: torch.Tensor
           ) -> tuple[list[ParamInfo], list[ParamInfo]]:
    """(structured, generic): the per-layer formula needs a module called exactly once."""
    modules = {id(p.module): p.module for p in params if p.structured}
    calls = dict.fromkeys(modules, 0)

    def count(module, args, output):
        calls[id(module)] += 1

    handles = [m.register_forward_hook(count) for m in modules.values()]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    structured = [p for p in params if p.structured and calls[id(p.module)] == 1]
    return structured, [p for p in params if p not in structured]


def _structured(model, x, objective, targets, params: list[ParamInfo],
                cotangents: torch.Tensor | None = None) -> dict:
    """Per-sample parameter Jacobians (or, given `cotangents (N, C)`, the per-sample
    vector-Jacobian products `uᵢᵀ Jᵢ`) of the Linear/Conv2d parameters, from one backward."""
    modules = {id(p.module): p.module for p in params}
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, output):
        captured[id(module)] = (args[0].detach(), output)

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    # An input that requires grad puts every layer output in the graph, even when no
    # parameter requires grad; the gradient w.r.t. a layer output is its per-sample cotangent.
    source = x.detach().requires_grad_() if torch.is_floating_point(x) else x
    try:
        with torch.enable_grad():
            out = objective(model(source), targets)
    finally:
        for handle in handles:
            handle.remove()
    scalar = out.ndim == 1 or cotangents is not None
    out2 = out[:, None] if out.ndim == 1 else out  # (N, C)
    n, c = out2.shape
    outputs = [captured[key][1] for key in modules]
    if cotangents is not None:  # one backward with the given per-sample cotangents
        basis = cotangents.to(out2.dtype).reshape(1, n, c)
    else:  # one batched backward: cotangent e_c for every sample, for each of the C outputs
        basis = torch.eye(c, dtype=out2.dtype, device=out2.device)[:, None, :].expand(c, n, c)
    grads = torch.autograd.grad(out2, outputs, grad_outputs=basis, is_grads_batched=True,
                                allow_unused=True)
    c = basis.shape[0]
    by_module = dict(zip(modules, grads, strict=True))
    result = {}
    for p in params:
        inputs = captured[id(p.module)][0]
        g = by_module[id(p.module)]  # (C, N, *out_shape)
        if g is None:
            g = torch.zeros((c, *captured[id(p.module)][1].shape), dtype=out2.dtype,
                            device=out2.device)
        jac = rule_for(p.module).param_jacobian(p.module, p.attribute, inputs, g)
        result[p.name] = jac[:, 0] if scalar else jac
    return result


def _generic(model, x, objective, targets, params: list[ParamInfo], chunk_size) -> dict:
    names = [p.name for p in params]
    all_params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    selected = {k: all_params[k].detach() for k in names}
    fixed = {k: v.detach() for k, v in all_params.items() if k not in selected}

    def single(chosen: dict, xi: torch.Tensor, ti) -> torch.Tensor:
        out = functional_call(model, ({**fixed, **chosen}, buffers), (xi.unsqueeze(0),))
        value = objective(out, None if ti is None else ti.unsqueeze(0))
        return value[0]

    in_dims = (None, 0, 0 if targets is not None else None)
    jac = vmap(jacrev(single, chunk_size=chunk_size), in_dims=in_dims)(selected, x, targets)
    return jac


def param_vjp(model: nn.Module, x: torch.Tensor, objective: Callable, cotangents: torch.Tensor,
              targets: torch.Tensor | None = None,
              params: list[ParamInfo] | None = None) -> dict[str, torch.Tensor]:
    """Per-sample `uᵢᵀ ∂objective_i/∂P` for cotangents `u (N, C)` (or `(N,)` for a scalar
    objective), without forming the Jacobian: `{name: (N, *shape)}`."""
    params = params if params is not None else select_params(model)
    cotangents = cotangents.reshape(x.shape[0], -1)
    structured, generic = _split(model, params, x)
    result: dict[str, torch.Tensor] = {}
    if structured:
        result |= _structured(model, x, objective, targets, structured, cotangents)
    if generic:
        names = [p.name for p in generic]
        all_params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        selected = {k: all_params[k].detach() for k in names}
        fixed = {k: v.detach() for k, v in all_params.items() if k not in selected}

        def single(xi, ti, ui):
            def f(chosen):
                out = functional_call(model, ({**fixed, **chosen}, buffers), (xi.unsqueeze(0),))
                return objective(out, None if ti is None else ti.unsqueeze(0))[0].reshape(-1)
            _, pullback = torch.func.vjp(f, selected)
            return pullback(ui.to(x.dtype))[0]

        result |= vmap(single, in_dims=(0, 0 if targets is not None else None, 0))(
            x, targets, cotangents)
    return {p.name: result[p.name] for p in params}


def param_jvp(model: nn.Module, x: torch.Tensor, objective: Callable,
              tangents: dict[str, torch.Tensor], targets: torch.Tensor | None = None
              ) -> torch.Tensor:
    """`∂objective/∂θ · t` for every sample, one forward-mode pass: tangents `{name: shape}`
    for some parameters (the rest fixed). Returns `(N, C)` or `(N,)`."""
    all_params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    selected = {k: all_params[k].detach() for k in tangents}
    fixed = {k: v.detach() for k, v in all_params.items() if k not in selected}

    def f(chosen):
        out = functional_call(model, ({**fixed, **chosen}, buffers), (x,))
        return objective(out, targets)

    return torch.func.jvp(f, (selected,), ({k: t.to(x.dtype) for k, t in tangents.items()},))[1]

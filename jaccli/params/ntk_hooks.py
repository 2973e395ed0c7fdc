"""The NTK's per-parameter factors from forward hooks on an eager module: the route for models
whose operator graph cannot be captured (`jaccli.graph.ntk` is the graph route).

Shapes: N samples, C model outputs (flattened), P parameters. A *layer* is a module owning
parameters directly (`recurse=False`); parameters of child modules whose forward never runs
(e.g. `nn.MultiheadAttention.out_proj`) belong to the nearest ancestor layer that ran.

One forward pass: a hook records each layer call's inputs and adds a zero probe to its
output; C backward passes (one per output) give the layer-output cotangents G
`(N, C, *out)`. Then, per parameter (factors as `jaccli.params.ntk.contract` takes them):
- `nn.Linear` weight: `gram` factors a `(N, T, d_in)` and G `(N, C, T, d_out)` over the T
  positions of inputs with extra leading axes (every call of the module concatenated), never
  the `(C, d_out, d_in)` Jacobian; its bias: J = Σ_t G_t `(N, C, d_out)`.
- every other layer's parameters: the per-sample Jacobian `(N, C, P)` by torch.func — `vjp`
  through `functional_call` of that module alone, vmapped over samples, one pull-back per
  output, summed over its calls.
Samples must be on axis 0 of each layer's inputs and outputs, and independent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..errors import UsageError
from ..tracing.recorder import first_tensor
from .ntk import Factor, layer_of, layer_parts


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    probes: list = field(default_factory=list)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _probe(value, probes: list):
    """`value` with a zero probe added to each floating tensor in it (top level or tuple)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            return value
        probe = torch.zeros_like(value, requires_grad=True)
        probes.append(probe)
        return value + probe
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_probe(v, probes) for v in value)
    return value


def _floats(value, out: list) -> None:
    """The floating tensors of a layer's output, in the order `_probe` visits them."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            out.append(value)
    elif isinstance(value, tuple) and not hasattr(value, "_fields"):
        for v in value:
            _floats(v, out)


def _detached(value, keep_graph: bool = False):
    """A copy of a layer's arguments (later in-place ops cannot change it); with
    `keep_graph`, still in the autograd graph (`create_graph`)."""
    if isinstance(value, torch.Tensor):
        return value.clone() if keep_graph else value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v, keep_graph) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v, keep_graph) for k, v in value.items()}
    return value


def _record(model: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module],
            keep_graph: bool = False):
    """Run the model once with hooks: its flattened output (N, C) and each layer's calls."""
    calls: dict[str, list[_Call]] = {name: [] for name in layers}

    def hook(name):
        def fn(module, args, kwargs, output):
            call = _Call(_detached(args, keep_graph), _detached(kwargs, keep_graph))
            calls[name].append(call)
            return _probe(output, call.probes)
        return fn

    handles = [m.register_forward_hook(hook(name), with_kwargs=True)
               for name, m in layers.items()]
    try:
        with torch.enable_grad():
            out = first_tensor(model(x))
    finally:
        for handle in handles:
            handle.remove()
    if out is None:
        raise UsageError("the model returned no tensor; ntk needs a tensor output")
    return out.reshape(x.shape[0], -1), calls


def _cotangents(out: torch.Tensor, probes: list[torch.Tensor], create_graph: bool = False
                ) -> list[torch.Tensor]:
    """For each probe `(N, *shape)`: the gradients of all C outputs, `(N, C, *shape)`
    (differentiable themselves with `create_graph`)."""
    c = out.shape[1]
    # One backward per output: batching the C cotangents (`is_grads_batched`) goes wrong
    # through PReLU's backward in torch 2.x (batch and basis axes mixed up).
    per = [torch.autograd.grad(out[:, k].sum(), probes, retain_graph=create_graph or k < c - 1,
                               create_graph=create_graph, allow_unused=True)
           for k in range(c)]
    grads = [out.new_zeros(c, *probe.shape) if per[0][i] is None
             else torch.stack([p[i] for p in per]) for i, probe in enumerate(probes)]
    return [g.movedim(0, 1) if create_graph else g.movedim(0, 1).detach() for g in grads]


def _owned(layers: dict[str, nn.Module], fired: list[str]) -> dict[str, dict]:
    """The parameters each fired layer differentiates, by name relative to it: its own, plus
    those of descendant layers that never ran (the rest do not move the output)."""
    owned = {name: dict(layers[name].named_parameters(recurse=False)) for name in fired}
    for name in layers:
        ancestors = [a for a in fired if a == "" or name.startswith(a + ".")]
        if name not in fired and ancestors:
            owner = max(ancestors, key=len)
            prefix = name[len(owner) + 1:] if owner else name
            for key, p in layers[name].named_parameters(recurse=False):
                owned[owner][f"{prefix}.{key}"] = p
    return owned


def hook_factors(model: nn.Module, x: torch.Tensor, linear: frozenset[str] = frozenset(),
                 *, create_graph: bool = False) -> dict[str, Factor]:
    """Every parameter's factors for samples `x (N, *in_shape)`: `{qualified name: factor}`
    (parameters the outputs do not depend on are left out: they contribute zero).
    linear: names of modules known to be `nn.Linear` although their class does not say so
    (a .pt2 archive's unflattened modules; `LoadedModel.type_name` knows).
    create_graph: the factors stay in the autograd graph of `x` and of the parameters
    (those that require grad), so a kernel contracted from them is differentiable."""
    layers = _layers(model)
    if not layers:
        raise UsageError("the model has no parameters: its NTK is zero")
    out, calls = _record(model, x, layers, create_graph)
    n = x.shape[0]
    fired = [name for name in layers if calls[name]]
    owned = _owned(layers, fired)
    grads = iter(_cotangents(out, [p for name in fired for c in calls[name] for p in c.probes],
                             create_graph))
    found: dict[str, Factor] = {}
    for name in fired:
        module, prefix = layers[name], f"{name}." if name else ""
        cots = [[next(grads) for _ in call.probes] for call in calls[name]]
        for call, gs in zip(calls[name], cots, strict=True):
            _check_batch(name, call, gs, n)
        if _is_linear(module) or name in linear and _linear_params(module):
            pair = _linear(name, module, calls[name], cots)
            found |= {prefix + k: f for k, f in pair.items()}
            continue
        for call, gs in zip(calls[name], cots, strict=True):
            for key, jac in _generic(module, owned[name], call, gs, n,
                                     create_graph).items():
                old = found.get(prefix + key)
                found[prefix + key] = Factor("jacobian", jac if old is None
                                             else old.jacobian + jac,
                                             layer=layer_of(prefix + key))
    return found


def _check_batch(name: str, call: _Call, gs: list[torch.Tensor], n: int) -> None:
    first = next((a for a in call.args if isinstance(a, torch.Tensor)), None)
    if not gs or first is None or first.shape[:1] != (n,) or any(
            g.dim() < 3 or g.shape[0] != n for g in gs):
        raise UsageError(f"layer {name!r}: ntk needs the samples on axis 0 of each layer's "
                         f"input and output (e.g. batch_first=True for attention)")


def _linear_params(module: nn.Module) -> bool:
    """Exactly a 2-D `weight` and optionally a 1-D `bias`, as a Linear layer has."""
    params = dict(module.named_parameters())
    weight, bias = params.get("weight"), params.get("bias")
    return weight is not None and weight.dim() == 2 and set(params) <= {"weight", "bias"} and (
        bias is None or bias.shape == weight.shape[:1])


def _linear(name: str, module: nn.Module, calls: list[_Call], cots) -> dict[str, Factor]:
    n = calls[0].args[0].shape[0]
    d_out, d_in = module.weight.shape
    a = torch.cat([c.args[0].reshape(n, -1, d_in) for c in calls], 1)
    g = torch.cat([gs[0].reshape(n, gs[0].shape[1], -1, d_out) for gs in cots], 2)
    found = {"weight": Factor("gram", inputs=a, cotangents=g, layer=name)}
    if getattr(module, "bias", None) is not None:
        found["bias"] = Factor("jacobian", g.sum(2), layer=name)
    return found


def _generic(module: nn.Module, params: dict, call: _Call, gs: list[torch.Tensor], n: int,
             create_graph: bool = False) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians `{name: (N, C, P)}` of the outputs w.r.t. `params`, one call."""
    batched = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n
               for a in call.args]
    names = list(params)

    def one(rows_b, g_b):
        def f(*values):
            rows = iter(rows_b)
            full = tuple(next(rows).unsqueeze(0) if b else a
                         for a, b in zip(call.args, batched, strict=True))
            out: list = []
            given = dict(zip(names, values, strict=True))
            _floats(functional_call(module, given, full, call.kwargs), out)
            return tuple(out)

        _, pull = vjp(f, *(params[k] if create_graph else params[k].detach()
                           for k in names))
        per = [pull(tuple(g[k].unsqueeze(0) for g in g_b)) for k in range(g_b[0].shape[0])]
        return tuple(torch.stack(parts) for parts in zip(*per, strict=True))

    rows = tuple(a for a, b in zip(call.args, batched, strict=True) if b)
    with torch.enable_grad():
        if create_graph:  # a loop over samples: autograd through vmap(vjp) of layer_norm
            # gives wrong input gradients in torch 2.x (tests/test_ntk.py checks them)
            per = [one(tuple(r[i] for r in rows), tuple(g[i] for g in gs)) for i in range(n)]
            grads = tuple(torch.stack(parts) for parts in zip(*per, strict=True))
        else:
            grads = vmap(one)(rows, tuple(gs))
    return {k: g.reshape(n, g.shape[1], -1) for k, g in zip(names, grads, strict=True)}


def hook_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
             mode: str = "full", linear: frozenset[str] = frozenset(),
             create_graph: bool = False) -> dict[str, torch.Tensor]:
    """Θ_l per layer by the hook route: `{layer: (N, M, C, C)}` (`mode="trace"`: `(N, M)`,
    `"diagonal"`: `(N, C, C)` of Θ(xᵢ, xᵢ)); Σ over layers is Θ. Layer: the module owning
    the parameter (`(model)` at the top). A linear weight takes the cheaper of the Gram and
    Jacobian routes (`jaccli.params.ntk.gram_costs`). linear, create_graph: as for
    `hook_factors`."""
    first = hook_factors(model, x1, linear, create_graph=create_graph)
    second = None if x2 is None or mode == "diagonal" else hook_factors(
        model, x2, linear, create_graph=create_graph)
    return layer_parts(first, second, mode)

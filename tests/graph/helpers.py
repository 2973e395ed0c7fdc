"""Independent references for the graph engine tests, and the three model formats.

References use plain autograd on the eager module, one sample at a time, in float64:
`torch.autograd.functional.jacobian` for Jacobians, `functional_call` for parameters, forward
hooks to find a module call's input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.export import Dim
from torch.func import functional_call

FORMATS = ("eager", "pt2", "torchscript")


def flat_outputs(out) -> torch.Tensor:
    """A model's outputs (tensor, tuple or dict) flattened per sample and concatenated."""
    if isinstance(out, dict):
        out = tuple(out.values())
    if not isinstance(out, tuple):
        out = (out,)
    return torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1)


def reference_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """`(B, D_out, D_in)`: fn maps `(1, *in)` to a tensor or tuple, one sample at a time."""
    rows = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: flat_outputs(fn(v[None]))[0], xi)
        rows.append(jac.reshape(-1, xi.numel()))
    return torch.stack(rows)


def reference_param_jacobians(model: nn.Module, x: torch.Tensor, names=None
                              ) -> dict[str, torch.Tensor]:
    """`{name: (B, C, *shape)}` of the flattened outputs w.r.t. each parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}
    for name in names or params:
        rows = []
        for i in range(x.shape[0]):
            def f(p, i=i, name=name):
                return flat_outputs(functional_call(model, {**params, name: p}, (x[i:i + 1],)))[0]
            rows.append(torch.autograd.functional.jacobian(f, params[name]))
        out[name] = torch.stack(rows)
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def call_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Every module call's (module, args, kwargs), keyed `name` (called once) or `name#k`
    (the calls of a module called several times), like jaccli's."""
    calls: dict[str, tuple] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, kwargs, name=name):
            count = counts.get(name, 0)
            counts[name] = count + 1
            key = name if count == 0 else f"{name}@{count}"
            calls[key] = (mod, tuple(a.clone() if isinstance(a, torch.Tensor) else a
                                     for a in args), dict(kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    renamed = {}
    for key, value in calls.items():
        name = key.split("@")[0]
        if counts.get(name, 1) > 1:
            key = f"{name}#{key.split('@')[1] if '@' in key else 0}"
        renamed[key] = value
    return renamed


def reference_layer(model: nn.Module, x: torch.Tensor, members: list[str],
                    output_value: torch.Tensor, output_axis: int = 0) -> torch.Tensor:
    """∂(last member's output)/∂(first member's input) for the calls `members` applied in
    turn, one sample at a time; every argument equal to a call's first argument is the
    variable (attention takes `(x, x, x)`); a tuple output is matched to the engine's
    recorded `output_value`, whose batch is on `output_axis`."""
    calls = call_inputs(model, x)
    rows = []
    for i in range(x.shape[0]):
        def f(v, i=i):
            h = v.clone()  # modules may work in place (ReLU(inplace=True))
            for member in members:
                module, args, kwargs = calls[member]
                first = args[0]
                new_args = [h if isinstance(a, torch.Tensor) and a.shape == first.shape
                            and torch.equal(a, first) else
                            (a[i:i + 1] if isinstance(a, torch.Tensor) else a) for a in args]
                value = output_value.narrow(output_axis, i, 1)
                h = _match(module(*new_args, **kwargs), value).clone()
            return h.select(output_axis, 0)

        first = calls[members[0]][1][0][i:i + 1].clone()
        rows.append(torch.autograd.functional.jacobian(f, first).reshape(-1, first.numel()))
    return torch.stack(rows)


def _match(out, value: torch.Tensor) -> torch.Tensor:
    """The tensor of a (nested) module output with the recorded value's shape and values."""
    if isinstance(out, torch.Tensor):
        return out
    flat = [t for t in _tensors(out) if t.shape == value.shape]
    for t in flat:
        if torch.allclose(t.detach(), value, rtol=1e-9, atol=1e-12):
            return t
    return flat[0]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)


def in_format(model: nn.Module, example: torch.Tensor, fmt: str, tmp: Path):
    """The model as the user would hand it over: eager, a loaded `.pt2`, loaded TorchScript."""
    if fmt == "eager":
        return model
    two = example.expand(2, *example.shape[1:]).clone()
    if fmt == "pt2":
        program = torch.export.export(model, (two,), dynamic_shapes=({0: Dim("batch")},))
        torch.export.save(program, tmp / "model.pt2")
        return torch.export.load(tmp / "model.pt2")
    torch.jit.save(torch.jit.script(model), tmp / "model.pt")
    return torch.jit.load(tmp / "model.pt")

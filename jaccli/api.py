"""The Python API: per-sample Jacobians and products of an in-memory model, no files involved.

Everything is batched over the first axis of `x` (N samples). With `create_graph=True` the
results stay in the autograd graph of the model's parameters, so they can be used in a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from .engine.engine import END_TO_END, JacobianEngine
from .engine.generic import per_sample_jacobian
from .engine.structures import Structured
from .io.models import LoadedModel
from .tracing.layers import Layer, trace_layers
from .tracing.recorder import ForwardRecorder, first_tensor, run_model


def _unwrap(model: nn.Module | LoadedModel) -> tuple[nn.Module, bool, object]:
    if isinstance(model, LoadedModel):
        return model.module, model.hookable, model.type_name
    return model, True, None


def list_layers(model: nn.Module | LoadedModel, x: torch.Tensor, *, granularity: str = "module",
                layers: Sequence[str] | None = None) -> list[Layer]:
    """The layers jaccli finds in `model` when run on `x` (shape (N, *in_shape))."""
    module, hookable, type_name = _unwrap(model)
    return trace_layers(module, x, type_name=type_name, hookable=hookable,
                        granularity=granularity, patterns=layers).layers


def layer_jacobians(model: nn.Module | LoadedModel, x: torch.Tensor, *,
                    granularity: str = "module", layers: Sequence[str] | None = None,
                    end_to_end: bool = False, structured: bool = False, mode: str = "auto",
                    create_graph: bool = False) -> dict[str, torch.Tensor | Structured]:
    """Per-sample Jacobian of every layer's output w.r.t. its input, from one forward pass.

    x: `(N, *in_shape)`. Returns `{layer name: (N, D_out, D_in)}` in execution order, plus
    `"(end-to-end)"`: `(N, D_out_model, D_in_model)` when `end_to_end` is true (formed from the
    layer Jacobians when the layers are a chain). With `structured=True` the values are the
    exact compact forms (`jaccli.engine.structures`) instead of dense tensors.
    The model should be in eval mode (`load_model` does that).
    """
    module, hookable, type_name = _unwrap(model)
    trace = trace_layers(module, x, type_name=type_name, hookable=hookable,
                         granularity=granularity, patterns=layers)
    engine = JacobianEngine(module, trace, layers=trace.layers, end_to_end=end_to_end,
                            n_samples=x.shape[0], mode=mode)
    with nullcontext() if create_graph else torch.no_grad():
        _, calls = run_model(ForwardRecorder(module, hookable, trace.positions), x)
        if create_graph:  # the recorder copies inputs without their graph: re-attach them
            calls = _with_graph(module, x, calls)
        result = engine.compute(x, {r.site: r for r in calls})
        if structured:
            return result
        return {name: jac.dense(x.shape[0]) for name, jac in result.items()}


def _with_graph(module: nn.Module, x: torch.Tensor, calls):
    """Call records whose inputs are the live (differentiable) tensors of a fresh forward."""
    live = {}
    handles = [m.register_forward_pre_hook(
        lambda m, a, name=name: live.setdefault(name, []).append(a[0]))
        for name, m in module.named_modules() if not any(True for _ in m.children())]
    try:
        module(x)
    finally:
        for handle in handles:
            handle.remove()
    seen: dict[str, int] = {}
    for record in calls:
        index = seen.get(record.module_name, 0)
        seen[record.module_name] = index + 1
        record.input = live[record.module_name][index]
    return calls


def end_to_end_jacobian(model: nn.Module | LoadedModel, x: torch.Tensor, *,
                        mode: str = "auto", create_graph: bool = False) -> torch.Tensor:
    """Per-sample Jacobian of the model output w.r.t. its input: `(N, D_out, D_in)`.

    Computed directly by torch.func (`layer_jacobians(..., end_to_end=True)` reuses the
    layer Jacobians instead).
    """
    module, _, _ = _unwrap(model)
    with nullcontext() if create_graph else torch.no_grad():
        return per_sample_jacobian(lambda xb: first_tensor(module(xb)), x, mode=mode,
                                   name=type(module).__name__)


def jacobian(model: nn.Module | LoadedModel, x: torch.Tensor, *,
             create_graph: bool = False) -> torch.Tensor:
    """The end-to-end per-sample Jacobian `(N, D_out, D_in)`; with `create_graph=True` it is
    differentiable w.r.t. the model's parameters, e.g. for a penalty such as
    `torch.logdet(J.transpose(1, 2) @ J)` or `J.square().sum()` added to a training loss."""
    return end_to_end_jacobian(model, x, create_graph=create_graph)


def param_jacobians(model: nn.Module | LoadedModel, x: torch.Tensor, *,
                    output_index: int | None = None, targets: torch.Tensor | None = None,
                    loss: str | None = None, params: Sequence[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians w.r.t. parameters: `{name: (N, C, *shape)}` of the outputs, or
    `(N, *shape)` of one output entry (`output_index`) or a per-sample loss (`loss` with
    `targets`; see `jaccli.params.objectives.LOSSES`)."""
    from .params.jacobians import param_jacobians as compute
    from .params.jacobians import select_params
    from .params.objectives import check_targets, objective

    module, _, _ = _unwrap(model)
    if loss is not None and targets is not None:
        check_targets(loss, targets, _output_shape(module, x))
    return compute(module, x, objective(output_index=output_index, loss=loss), targets,
                   select_params(module, params))


def _operators(module: nn.Module, x: torch.Tensor, layer: str | None):
    trace = trace_layers(module, x[:2])  # shapes and structure only: two samples suffice
    chosen = [c for c in trace.all_layers if c.name == layer] if layer else []
    if layer and not chosen:
        raise KeyError(f"no layer {layer!r}; layers: "
                       f"{', '.join(c.name for c in trace.all_layers)}")
    engine = JacobianEngine(module, trace, layers=chosen, end_to_end=layer is None,
                            n_samples=x.shape[0])
    _, calls = run_model(ForwardRecorder(module, positions=trace.positions), x)
    records = {r.site: r for r in calls}
    if layer:
        return engine.layer_operator(chosen[0], records)
    return engine.end_to_end_operator(x, records)


def jvp(model: nn.Module | LoadedModel, x: torch.Tensor, v, *, layer: str | None = None,
        wrt: str = "inputs") -> torch.Tensor:
    """`J v` per sample without forming J.

    wrt="inputs": v `(N, D_in)` (or `(N, *in_shape)`); J is the end-to-end Jacobian, or the
    named layer's (then v lives in that layer's input space). Returns `(N, D_out)`.
    wrt="params": v maps parameter names to tangents; returns `(N, C)` of the outputs.
    """
    module, _, _ = _unwrap(model)
    if wrt == "params":
        from .params.jacobians import param_jvp
        from .params.objectives import objective

        return param_jvp(module, x, objective(), v)
    apply_j, _ = _operators(module, x, layer)
    return apply_j(v.reshape(x.shape[0], -1, 1).to(x.dtype))[:, :, 0]


def vjp(model: nn.Module | LoadedModel, x: torch.Tensor, u: torch.Tensor, *,
        layer: str | None = None, wrt: str = "inputs"):
    """`uᵀ J` per sample without forming J: u `(N, D_out)`.

    wrt="inputs": returns `(N, D_in)` (end-to-end, or the named layer's).
    wrt="params": returns `{name: (N, *shape)}`, the per-sample gradients of `uᵢ · outputᵢ`.
    """
    module, _, _ = _unwrap(model)
    if wrt == "params":
        from .params.jacobians import param_vjp
        from .params.objectives import objective

        return param_vjp(module, x, objective(), u)
    _, apply_jt = _operators(module, x, layer)
    return apply_jt(u.reshape(x.shape[0], -1, 1).to(x.dtype))[:, :, 0]


def hvp(model: nn.Module | LoadedModel, x: torch.Tensor, v: torch.Tensor, *,
        targets: torch.Tensor, loss: str, wrt: str = "params") -> torch.Tensor:
    """Hessian-vector product of a loss, without forming the Hessian.

    wrt="params": H of the mean per-sample loss over `x` w.r.t. all parameters (flattened and
    concatenated in `named_parameters` order); v and the result are `(D,)`.
    wrt="inputs": each sample's H_i w.r.t. its input; v and the result are `(N, D_in)`.
    """
    from .params.hessian import inputs_hvp, params_hvp
    from .params.jacobians import select_params
    from .params.objectives import check_targets, per_sample_loss

    module, _, _ = _unwrap(model)
    check_targets(loss, targets, _output_shape(module, x))
    fn = per_sample_loss(loss)
    if wrt == "params":
        operator = params_hvp(module, fn, lambda: [(x, targets)], select_params(module),
                              x.shape[0])
        return operator(v.reshape(1, -1, 1).to(x.dtype))[0, :, 0]
    return inputs_hvp(module, fn, x, targets)(v.reshape(x.shape[0], -1, 1).to(x.dtype))[:, :, 0]


def _output_shape(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(first_tensor(module(x[:1])).shape[1:])


__all__ = ["END_TO_END", "end_to_end_jacobian", "hvp", "jacobian", "jvp", "layer_jacobians",
           "list_layers", "param_jacobians", "vjp"]

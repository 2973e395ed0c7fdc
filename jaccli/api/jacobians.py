"""The Python API, input side: per-sample Jacobians, products and Hessian-vector products of
an in-memory model, no files involved.

Everything is batched over the first axis of `x` (N samples). With `create_graph=True` the
results stay in the autograd graph of the model's parameters, so they can be used in a loss.
A forward taking several arguments: `inputs={name: (N, ...) tensor}` (held fixed),
`consts={name: value}` and `wrt=name` (the argument differentiated; default: the one `x`
gives, the first that `inputs` and `consts` do not name), as `--input/--const/--wrt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from ..engine.engine import END_TO_END, JacobianEngine
from ..engine.generic import per_sample_jacobian
from ..engine.structures import Structured
from ..errors import UnsupportedModuleError, UsageError
from ..graph.call_layout import call as call_model
from ..io.models import LoadedModel
from ..pipelines.model_inputs import TensorCall, tensor_call
from ..tracing.layers import trace_layers
from ..tracing.recorder import ForwardRecorder, first_tensor, run_model


def _unwrap(model: nn.Module | LoadedModel) -> tuple[nn.Module, bool, object]:
    if isinstance(model, LoadedModel):
        return model.module, model.hookable, model.type_name
    return model, True, None


def _engine(model: nn.Module | LoadedModel, x: torch.Tensor, *, granularity: str = "module",
            layers: Sequence[str] | None = None, end_to_end: bool = True,
            include_layers: bool = True, mode: str = "auto", call: TensorCall | None = None):
    """The engine the CLI would use for `model` at `x`: the operator graph, else hooks (not
    for a `call` with inputs held fixed or constants: they need the graph)."""
    from ..pipelines.engines import GraphRun, capture_graph
    from ..pipelines.hook_engine import HookRun

    module, hookable, type_name = _unwrap(model)
    loaded = model if isinstance(model, LoadedModel) else None
    target = loaded.program if loaded is not None and loaded.program is not None else module
    graph, note = capture_graph(target, x, x.device, x.dtype,
                                layout=call.layout if call else None,
                                held=call.held if call else ())
    if graph is None and call is not None:
        raise UnsupportedModuleError(f"inputs=, consts= and wrt= need the operator graph, "
                                     f"and {note}")
    if graph is not None:
        scripted = isinstance(module, torch.jit.ScriptModule)
        return GraphRun(graph, granularity=granularity, patterns=list(layers or []) or None,
                        include_layers=include_layers, end_to_end=end_to_end,
                        module=None if scripted else module, samples=x.shape[0])
    trace = trace_layers(module, x, type_name=type_name, hookable=hookable,
                         granularity=granularity, patterns=layers)
    return HookRun(module, trace, hookable=hookable,
                   layers=trace.layers if include_layers else [], end_to_end=end_to_end,
                   n_samples=x.shape[0], strict=False, mode=mode, note=note)


def list_layers(model: nn.Module | LoadedModel, x: torch.Tensor, *, granularity: str = "module",
                layers: Sequence[str] | None = None, inputs: dict | None = None,
                consts: dict | None = None, wrt: str | None = None) -> list:
    """The layers jaccli finds in `model` when run on `x` (shape (N, *in_shape)), as planned
    entries: `.name`, `.type_name`, `.input_shape`, `.output_shape`, `.rule`, `.structure`
    (with `inputs`/`consts`/`wrt`: the layers on the path from the `wrt` argument)."""
    call = tensor_call(model, x, inputs, consts, wrt)
    engine = _engine(model, call.x if call else x, granularity=granularity, layers=layers,
                     end_to_end=False, call=call)
    return [e for e in engine.entries if e.kind == "layer"]


def layer_jacobians(model: nn.Module | LoadedModel, x: torch.Tensor, *,
                    granularity: str = "module", layers: Sequence[str] | None = None,
                    end_to_end: bool = False, structured: bool = False, mode: str = "auto",
                    create_graph: bool = False, inputs: dict | None = None,
                    consts: dict | None = None, wrt: str | None = None
                    ) -> dict[str, torch.Tensor | Structured]:
    """Per-sample Jacobian of every layer's output w.r.t. its input, from one forward pass.

    x: `(N, *in_shape)`. Returns `{layer name: (N, D_out, D_in)}` in execution order, plus
    `"(end-to-end)"`: `(N, D_out_model, D_in_model)` when `end_to_end` is true (accumulated
    through the model's graph from the layer Jacobians). With `structured=True` the values are
    the exact compact forms (`jaccli.engine.structures`, `jaccli.graph.structures`) instead of
    dense tensors. With `create_graph=True` they are differentiable w.r.t. the parameters
    (computed on module hooks, whose rules keep the autograd graph).
    The model should be in eval mode (`load_model` does that). With `inputs`/`consts`/`wrt`
    (see the module's doc), D_in is the `wrt` argument's; the layers are those on its path.
    """
    call = tensor_call(model, x, inputs, consts, wrt)
    if call is not None and create_graph:
        raise UsageError("create_graph=True takes models of one input (it runs on module "
                         "hooks); inputs=, consts= and wrt= need the operator graph")
    if not create_graph:
        x, held = (call.x, call.held) if call else (x, ())
        engine = _engine(model, x, granularity=granularity, layers=layers,
                         end_to_end=end_to_end, mode=mode, call=call)
        with torch.no_grad():
            result = engine.compute(x, held=held)
        if structured:
            return result
        return {name: jac.dense(x.shape[0]) for name, jac in result.items()}
    module, hookable, type_name = _unwrap(model)
    trace = trace_layers(module, x, type_name=type_name, hookable=hookable,
                         granularity=granularity, patterns=layers)
    engine = JacobianEngine(module, trace, layers=trace.layers, end_to_end=end_to_end,
                            n_samples=x.shape[0], mode=mode)
    _, calls = run_model(ForwardRecorder(module, hookable, trace.positions), x)
    calls = _with_graph(module, x, calls)  # the recorder's copies carry no graph
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
                        mode: str = "auto", create_graph: bool = False,
                        inputs: dict | None = None, consts: dict | None = None,
                        wrt: str | None = None) -> torch.Tensor:
    """Per-sample Jacobian of the model output w.r.t. its input: `(N, D_out, D_in)` (with
    `inputs`/`consts`/`wrt`: w.r.t. the `wrt` argument, the others held fixed).

    Computed directly by torch.func (`layer_jacobians(..., end_to_end=True)` reuses the
    layer Jacobians instead).
    """
    module, _, _ = _unwrap(model)
    call = tensor_call(model, x, inputs, consts, wrt)
    layout, x, held = (call.layout, call.x, call.held) if call else (None, x, ())

    def forward(xb, *hb):
        return first_tensor(call_model(module, layout, xb, tuple(hb)))

    with nullcontext() if create_graph else torch.no_grad():
        return per_sample_jacobian(forward, x, held, mode=mode, name=type(module).__name__)


def jacobian(model: nn.Module | LoadedModel, x: torch.Tensor, *,
             create_graph: bool = False, inputs: dict | None = None,
             consts: dict | None = None, wrt: str | None = None) -> torch.Tensor:
    """The end-to-end per-sample Jacobian `(N, D_out, D_in)`; with `create_graph=True` it is
    differentiable w.r.t. the model's parameters, e.g. for a penalty such as
    `torch.logdet(J.transpose(1, 2) @ J)` or `J.square().sum()` added to a training loss.
    A forward of several arguments: `jacobian(model, x, inputs={"y": y}, wrt="y")` is
    `(N, D_out, D_y)` with x held fixed."""
    return end_to_end_jacobian(model, x, create_graph=create_graph, inputs=inputs,
                               consts=consts, wrt=wrt)


def _operators(model, x: torch.Tensor, layer: str | None, call: TensorCall | None = None):
    x, held = (call.x, call.held) if call else (x, ())
    engine = _engine(model, x, end_to_end=layer is None, include_layers=layer is not None,
                     call=call)
    names = [e.name for e in engine.entries if e.kind == "layer"]
    if layer and layer not in names:
        raise KeyError(f"no layer {layer!r}; layers: {', '.join(names)}")
    return engine.operator(layer or END_TO_END, x, held)


def _product_call(model, x, wrt: str, inputs, consts) -> TensorCall | None:
    """`wrt` of jvp/vjp/hvp: "inputs", "params", or the name of the argument differentiated
    (with "params", every input is held fixed)."""
    return tensor_call(model, x, inputs, consts, None if wrt in ("inputs", "params") else wrt)


def jvp(model: nn.Module | LoadedModel, x: torch.Tensor, v, *, layer: str | None = None,
        wrt: str = "inputs", inputs: dict | None = None, consts: dict | None = None
        ) -> torch.Tensor:
    """`J v` per sample without forming J.

    wrt="inputs": v `(N, D_in)` (or `(N, *in_shape)`); J is the end-to-end Jacobian, or the
    named layer's (then v lives in that layer's input space). Returns `(N, D_out)`.
    wrt=NAME: the same w.r.t. that forward argument (`inputs`/`consts`: the module's doc).
    wrt="params": v maps parameter names to tangents; returns `(N, C)` of the outputs
    (`inputs`/`consts` held fixed: contracted from the per-sample parameter Jacobians of the
    operator graph).
    """
    module, _, _ = _unwrap(model)
    call = _product_call(model, x, wrt, inputs, consts)
    if wrt == "params":
        from ..params.jacobians import param_jvp
        from ..params.objectives import objective
        from .params import _graph_param_jacobians

        if call is None:
            return param_jvp(module, x, objective(), v)
        jac = _graph_param_jacobians(model, call, objective(), None, None, list(v))
        return sum(j.reshape(*j.shape[:2], -1) @ v[q].reshape(-1, 1).to(j.dtype)
                   for q, j in jac.items())[:, :, 0]
    apply_j, _ = _operators(model, x, layer, call)
    return apply_j(v.reshape(x.shape[0], -1, 1).to(x.dtype))[:, :, 0]


def vjp(model: nn.Module | LoadedModel, x: torch.Tensor, u: torch.Tensor, *,
        layer: str | None = None, wrt: str = "inputs", inputs: dict | None = None,
        consts: dict | None = None):
    """`uᵀ J` per sample without forming J: u `(N, D_out)`.

    wrt="inputs" (or NAME, as for `jvp`): returns `(N, D_in)` (end-to-end, or the named
    layer's). wrt="params": returns `{name: (N, *shape)}`, the per-sample gradients of
    `uᵢ · outputᵢ` (`inputs`/`consts` held fixed, as for `jvp`).
    """
    module, _, _ = _unwrap(model)
    call = _product_call(model, x, wrt, inputs, consts)
    if wrt == "params":
        from ..params.jacobians import param_vjp
        from ..params.objectives import objective
        from .params import _graph_param_jacobians

        if call is None:
            return param_vjp(module, x, objective(), u)
        jac = _graph_param_jacobians(model, call, objective(), None, None, None)
        u = u.reshape(x.shape[0], -1).to(call.x.dtype)
        return {q: torch.einsum("nc,nc...->n...", u, j) for q, j in jac.items()}
    _, apply_jt = _operators(model, x, layer, call)
    return apply_jt(u.reshape(x.shape[0], -1, 1).to(x.dtype))[:, :, 0]


def hvp(model: nn.Module | LoadedModel, x: torch.Tensor, v: torch.Tensor, *,
        targets: torch.Tensor, loss: str, wrt: str = "params", inputs: dict | None = None,
        consts: dict | None = None) -> torch.Tensor:
    """Hessian-vector product of a loss, without forming the Hessian.

    wrt="params": H of the mean per-sample loss over `x` w.r.t. all parameters (flattened and
    concatenated in `named_parameters` order); v and the result are `(D,)`.
    wrt="inputs": each sample's H_i w.r.t. its input; v and the result are `(N, D_in)`.
    `inputs`/`consts` (the module's doc) are held fixed; wrt=NAME: H_i w.r.t. that argument.
    """
    from ..params.hessian import inputs_hvp, params_hvp
    from ..params.jacobians import select_params
    from ..params.objectives import check_targets, per_sample_loss

    module, _, _ = _unwrap(model)
    call = tensor_call(model, x, inputs, consts, None if wrt in ("params", "inputs") else wrt)
    layout, x, held = (call.layout, call.x, call.held) if call else (None, x, ())

    def arguments(xb, hb):
        return (xb,) if layout is None else tuple(layout.arguments(xb, hb))

    check_targets(loss, targets, _output_shape(module, x, layout, held))
    fn = per_sample_loss(loss)
    if wrt == "params":
        operator = params_hvp(module, fn, lambda: [(x, targets, held)], select_params(module),
                              x.shape[0], arguments=arguments)
        return operator(v.reshape(1, -1, 1).to(x.dtype))[0, :, 0]
    operator = inputs_hvp(module, fn, x, targets, held=held, arguments=arguments)
    return operator(v.reshape(x.shape[0], -1, 1).to(x.dtype))[:, :, 0]


def _output_shape(module: nn.Module, x: torch.Tensor, layout=None, held: tuple = ()
                  ) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(first_tensor(call_model(module, layout, x[:1],
                                             tuple(h[:1] for h in held))).shape[1:])


__all__ = ["END_TO_END", "end_to_end_jacobian", "hvp", "jacobian", "jvp", "layer_jacobians",
           "list_layers", "vjp"]

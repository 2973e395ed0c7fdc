"""The Python API, parameter side: per-sample parameter Jacobians and the empirical neural
tangent kernel of an in-memory model. Inputs beyond `x` (`inputs=`, `consts=`; see
`jaccli.api.jacobians`) are held fixed: the parameters are what is differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UsageError
from ..io.models import LoadedModel
from ..pipelines.model_inputs import TensorCall, tensor_call
from .jacobians import _engine, _output_shape, _unwrap


def param_jacobians(model: nn.Module | LoadedModel, x: torch.Tensor, *,
                    output_index: int | None = None, targets: torch.Tensor | None = None,
                    loss: str | None = None, params: Sequence[str] | None = None,
                    inputs: dict | None = None, consts: dict | None = None,
                    wrt: str | None = None) -> dict[str, torch.Tensor]:
    """Per-sample Jacobians w.r.t. parameters: `{name: (N, C, *shape)}` of the outputs, or
    `(N, *shape)` of one output entry (`output_index`) or a per-sample loss (`loss` with
    `targets`; see `jaccli.params.objectives.LOSSES`).

    A forward of several arguments: `inputs={name: (N, ...) tensor}` and `consts={name:
    value}` (as for `jaccli.jacobian`) are held fixed, on the operator graph (`--input`/`--const`
    of `compute --wrt params`); there is no `wrt=` input here, the parameters are
    differentiated."""
    from ..params.jacobians import param_jacobians as compute
    from ..params.jacobians import select_params
    from ..params.objectives import check_targets, objective

    module, _, _ = _unwrap(model)
    call = _held_call(model, x, inputs, consts, wrt, "param_jacobians")
    if call is not None:
        return _graph_param_jacobians(model, call, objective(output_index=output_index,
                                                             loss=loss), targets, loss, params)
    if loss is not None and targets is not None:
        check_targets(loss, targets, _output_shape(module, x))
    return compute(module, x, objective(output_index=output_index, loss=loss), targets,
                   select_params(module, params))


def _held_call(model, x: torch.Tensor, inputs, consts, wrt, what: str) -> TensorCall | None:
    """The call of a parameter-side function (`param_jacobians`, `ntk`): every input other
    than the parameters is held fixed, so `wrt` naming one is refused."""
    if wrt is not None and wrt != "params":
        raise UsageError(f"{what} differentiates w.r.t. the parameters; wrt={wrt!r} names a "
                         "forward input, which has no meaning here (inputs= and consts= are "
                         "held fixed): drop wrt=")
    return tensor_call(model, x, inputs, consts)


def _graph_param_jacobians(model, call: TensorCall, fn, targets, loss, patterns
                           ) -> dict[str, torch.Tensor]:
    """`param_jacobians` of a call with held inputs or constants: on the operator graph,
    `{name: (N, C, *shape)}` in `named_parameters` order."""
    from ..graph.params import select_parameters
    from ..params.objectives import check_targets

    module, _, _ = _unwrap(model)
    if loss is not None and targets is not None:
        check_targets(loss, targets, _output_shape(module, call.x, call.layout, call.held))
    engine = _engine(model, call.x, end_to_end=False, include_layers=False, call=call)
    order = {name: i for i, (name, _) in enumerate(module.named_parameters())}
    names = sorted(select_parameters(engine.graph, patterns), key=lambda q: order.get(q, 1e9))
    if targets is not None:
        targets = targets.to(call.x.device)
    result = engine.engine.param_jacobians(call.x, fn, names, targets, call.held)
    return {q: result[q].detach() for q in names}


def ntk(model: nn.Module | LoadedModel, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
        trace: bool = False, per_layer: bool = False, diagonal: bool = False,
        create_graph: bool = False, inputs: dict | None = None,
        inputs2: dict | None = None, consts: dict | None = None, wrt: str | None = None):
    """The empirical neural tangent kernel Θ(x1, x2) = J_θ(x1) J_θ(x2)ᵀ over all parameters,
    from per-parameter structured contractions on the operator graph (`jaccli.graph.ntk`,
    `jaccli.params.ntk`), never forming J_θ `(N, C, P)` for linear weights.

    x1: `(N, *in_shape)`, x2: `(M, *in_shape)` (default x1). Returns `(N, M, C, C)`, or
    `(N, M)` with `trace=True` (Σ_c Θ_cc), or `(N, C, C)` with `diagonal=True` (Θ(xᵢ, xᵢ));
    with `per_layer=True`, `(Θ, {layer: Θ_l})` with Σ_l Θ_l = Θ (layer: the module owning
    the parameters). A model whose graph cannot be captured takes the hook route
    (`jaccli.params.ntk_hooks`). Without `create_graph` the result carries no autograd graph;
    with it, Θ is differentiable w.r.t. x1, x2 (when they require grad) and the parameters
    (computed on module hooks, whose factors keep the graph: e.g. a penalty on trace Θ).

    A forward of several arguments: `inputs={name: (N, ...) tensor}` go with x1's rows,
    `inputs2` (the same names, `(M, ...)`) with x2's, `consts={name: value}` with both; all
    are held fixed (the kernel is over the parameters; no `wrt=`), on the operator graph.
    """
    from ..pipelines.engines import GraphRun

    mode = "diagonal" if diagonal else "trace" if trace else "full"
    module, hookable, _ = _unwrap(model)
    call = _held_call(model, x1, inputs, consts, wrt, "ntk")
    if call is not None:
        if create_graph:
            raise UsageError("create_graph=True takes models of one input (it runs on module "
                             "hooks); inputs= and consts= need the operator graph")
        second = None if x2 is None else _second_call(model, x2, inputs, inputs2, consts)
        engine = _engine(model, call.x, end_to_end=False, include_layers=False, call=call)
        total, parts = ntk_kernel(engine.engine, call.x, None if second is None else second.x,
                                  mode, call.held, () if second is None else second.held)
        return (total, parts) if per_layer else total
    if inputs2:
        raise UsageError("inputs2= goes with inputs=: the per-sample inputs of x2's rows")
    if not create_graph:
        engine = _engine(model, x1, end_to_end=False, include_layers=False)
        if isinstance(engine, GraphRun):
            total, parts = ntk_kernel(engine.engine, x1, x2, mode)
            return (total, parts) if per_layer else total
        note = engine.note
    else:
        note = "create_graph=True needs module hooks"
    if not hookable or isinstance(module, torch.jit.ScriptModule):
        raise UsageError(f"ntk needs the operator graph or module hooks, and {note} "
                         "(a TorchScript model has none)")
    from ..params.ntk_hooks import hook_ntk

    linear = frozenset(name for name, m in module.named_modules()
                       if isinstance(model, LoadedModel) and model.type_name(name, m) == "Linear")
    parts = hook_ntk(module, x1, x2, mode=mode, linear=linear, create_graph=create_graph)
    total = sum(parts.values())
    return (total, parts) if per_layer else total


def _second_call(model, x2: torch.Tensor, inputs, inputs2, consts) -> TensorCall:
    """x2's call of `ntk`: the same arguments as x1's, its own rows of the held inputs."""
    inputs, inputs2 = dict(inputs or {}), dict(inputs2 or {})
    if sorted(map(str, inputs)) != sorted(map(str, inputs2)):
        raise UsageError(f"inputs2= must give x2's rows of the same inputs as inputs= "
                         f"({', '.join(map(str, inputs)) or 'none'}); it gives "
                         f"{', '.join(map(str, inputs2)) or 'none'}")
    return tensor_call(model, x2, inputs2, consts)


def ntk_kernel(engine, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
               held1: tuple = (), held2: tuple = ()
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Θ and its per-layer parts for a captured `GraphEngine` (mode: `full`, `trace`,
    `diagonal`); the route of each linear weight by the cost model of `jaccli.params.ntk`.
    held1, held2: the rows of the inputs held fixed that go with x1's and x2's."""
    from ..graph.ntk import ntk_factors, param_routes
    from ..params.ntk import layer_parts

    routes = param_routes(engine)
    with torch.no_grad():
        first = ntk_factors(engine, x1, routes, held1)
        second = None if x2 is None or mode == "diagonal" else ntk_factors(engine, x2, routes,
                                                                           held2)
        parts = layer_parts(first, second, mode)
    return sum(parts.values()), parts


__all__ = ["ntk", "ntk_kernel", "param_jacobians"]

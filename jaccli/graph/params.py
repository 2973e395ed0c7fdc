"""Per-sample parameter Jacobians through the op graph.

For a per-sample objective `s_i = objective(output_i)` (C values, or a scalar), the Jacobian
of sample i w.r.t. a parameter P is `(C, *P.shape)`. One reverse pass pushes the cotangent
blocks `∂s/∂(activation)` `(B, C, *shape)` through the units; every op reading P then turns
its output cotangents into `∂s/∂P`: Linear and convolution weights and biases from the
layer input and the cotangents (outer products; convolution VJPs per sample), PReLU by its
closed form, anything else (norm weights, class tokens through `expand`, parameters inside a
region) by the generic per-op route: the op (and the ops deriving its argument from P)
replayed on one sample, `vjp` w.r.t. P.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch.func import jacrev, vjp

from ..engine.objective_marks import kind_of
from ..errors import UsageError
from .differentiate import Differentiator
from .opgraph import BATCH_SHAPED, DERIVED, MULTI, OpGraph, Ref
from .replay import Replay
from .rules import rule_for
from .units import Unit


def select_parameters(graph: OpGraph, patterns: Sequence[str] | None) -> dict[str, str]:
    """Qualified names matching any glob (all when None) -> placeholder node."""
    available = graph.parameters()
    chosen = {q: n for q, n in available.items()
              if not patterns or any(fnmatch.fnmatchcase(q, p) for p in patterns)}
    if not chosen:
        raise UsageError(f"no parameter matches {' '.join(patterns or [])}; the model has: "
                         f"{', '.join(available) or '(none)'}")
    return chosen


def objective_cotangents(objective: Callable | None, out: torch.Tensor, targets) -> tuple[
        torch.Tensor, bool]:
    """∂ objective_i / ∂ out_i per sample: `(B, C, *out)`, and whether it is a scalar.

    None or an objective marked "outputs" (`engine.objective_marks`; the flattened outputs): the
    identity, C = the outputs' size. Marked "rows" (sample i's values from sample i alone):
    reverse autograd over the whole batch, one pass per objective value. Anything else: a
    `torch.func` Jacobian per sample, which holds for any objective (but its first call in
    a process imports torch._dynamo, seconds of CPU)."""
    kind = kind_of(objective)
    if kind == "outputs":
        b, size = out.shape[0], out[0].numel()
        eye = torch.eye(size, dtype=out.dtype, device=out.device)
        return eye.expand(b, size, size).reshape(b, size, *out.shape[1:]), False
    if kind == "rows":
        return _rowwise_cotangents(objective, out, targets)

    def single(o, t):
        return objective(o[None], None if t is None else t[None])[0]

    in_dims = (0, 0 if targets is not None else None)
    try:
        jac = torch.vmap(jacrev(single), in_dims=in_dims)(out, targets)
    except Exception:  # an objective without batching rules: one sample at a time
        jac = torch.stack([jacrev(single)(out[i], None if targets is None else targets[i])
                           for i in range(out.shape[0])])
    scalar = jac.ndim == out.ndim
    if scalar:
        jac = jac[:, None]
    return jac.reshape(out.shape[0], -1, *out.shape[1:]), scalar


def _rowwise_cotangents(objective: Callable, out: torch.Tensor, targets) -> tuple[
        torch.Tensor, bool]:
    """`objective_cotangents` of an objective computing each sample's values from that
    sample alone: the gradient of the batch sum of value c is every sample's ∂s_ic/∂out_i."""
    with torch.enable_grad():
        leaf = out.detach().requires_grad_(True)
        values = objective(leaf, targets)
        scalar = values.ndim == 1
        flat = values.reshape(values.shape[0], -1)
        rows = []
        for c in range(flat.shape[1]):
            grad = torch.autograd.grad(flat[:, c].sum(), leaf, retain_graph=True,
                                       allow_unused=True)[0]
            rows.append(torch.zeros_like(leaf) if grad is None else grad)
    return torch.stack(rows, dim=1).detach(), scalar


def _derivation(graph: OpGraph, nodes: list[str], parameter: str) -> list[str]:
    """The unbatched nodes computing, from `parameter`, the arguments `nodes` read."""
    found: set[str] = set()
    stack = [r for n in nodes for r in graph[n].refs()]
    while stack:
        name = stack.pop()
        node = graph[name]
        if name in found or node.kind not in (DERIVED, BATCH_SHAPED, MULTI):
            continue
        if name == parameter or parameter not in _ancestors(graph, name):
            continue
        found.add(name)
        stack.extend(node.refs())
        if node.source:
            stack.append(node.source)
    return [n for n in graph.nodes if n in found]


def _reads(graph: OpGraph, nodes: list[str], parameter: str) -> bool:
    return (any(parameter in graph[n].refs() for n in nodes)
            or bool(_derivation(graph, nodes, parameter)))


def _ancestors(graph: OpGraph, name: str) -> set[str]:
    seen, stack = set(), [name]
    while stack:
        node = graph[stack.pop()]
        for ref in node.refs() + ([node.source] if node.source else []):
            if ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return seen


def generic_param_vjp(diff: Differentiator, unit: Unit, parameter: str, u: torch.Tensor
                      ) -> torch.Tensor:
    """`uᵀ ∂unit/∂P` per sample `(B, k, *P.shape)`, replaying the unit (and the ops deriving
    its arguments from P) on one sample at a time."""
    graph, trace = diff.graph, diff.trace
    nodes = _derivation(graph, unit.nodes, parameter) + unit.nodes
    replay = Replay(graph, nodes, [], [unit.name])
    fn, args, in_dims = replay.per_sample(trace, fixed=[parameter])
    value = trace.values[parameter]

    def one(*sample_and_u):
        *sample, ui = sample_and_u
        _, pullback = vjp(lambda p: fn(p, *sample)[0], value)
        return torch.vmap(lambda c: pullback(c)[0])(ui)

    try:
        return torch.vmap(one, in_dims=(*in_dims, 0))(*args, u)
    except Exception:  # no batching rule somewhere: one sample, one cotangent at a time
        rows = []
        for i in range(u.shape[0]):
            sample = [a.select(d, i) for a, d in zip(args, in_dims, strict=True)]
            _, pullback = vjp(lambda p, sample=sample: fn(p, *sample)[0], value)
            rows.append(torch.stack([pullback(c)[0] for c in u[i]]))
        return torch.stack(rows)


def upstream_of(graph: OpGraph, units: dict[str, Unit], parameters: dict[str, str]
                ) -> set[str]:
    """The units reading one of `parameters`, or computed from such a unit's output: the
    only ones a reverse pass for parameter derivatives has to reach."""
    found: set[str] = set()
    for name, unit in units.items():  # topological order
        if any(s in found for s in unit.inputs) or any(
                _reads(graph, unit.nodes, p) for p in parameters.values()):
            found.add(name)
    return found


def walk_back(diff: Differentiator, units: dict[str, Unit], outputs: list[str],
              cotangents: list[torch.Tensor], wanted: set[str] | None = None):
    """Yield `(unit, u)` in reverse topological order: the cotangent block `(B, k, *output)`
    of every unit the outputs depend on (of those in `wanted`, when given), once all of its
    consumers have been pulled back; each block is dropped once yielded and pulled back."""
    cot: dict[str, torch.Tensor] = {}
    for name, c in zip(outputs, cotangents, strict=True):
        cot[name] = c if name not in cot else cot[name] + c
    for name in reversed(list(units)):
        if name not in cot:
            continue
        unit, u = units[name], cot.pop(name)
        yield unit, u
        for source in unit.inputs:
            if source in units and (wanted is None or source in wanted):
                part = diff.vjp(unit, source, u)
                cot[source] = part if source not in cot else cot[source] + part


def param_vjp(diff: Differentiator, unit: Unit, parameter: str, u: torch.Tensor
              ) -> torch.Tensor:
    """`uᵀ ∂unit/∂P` per sample `(B, k, *P.shape)`: the rule's closed form, else generic."""
    part = _structured(diff, unit, parameter, u)
    return generic_param_vjp(diff, unit, parameter, u) if part is None else part


def param_vjps(diff: Differentiator, units: dict[str, Unit], outputs: list[str],
               cotangents: list[torch.Tensor], parameters: dict[str, str]
               ) -> dict[str, torch.Tensor]:
    """Per-sample `uᵀ ∂s/∂P` for cotangent blocks `(B, k, *output)` on each output node:
    `{qualified name: (B, k, *P.shape)}`."""
    graph = diff.graph
    result: dict[str, torch.Tensor] = {}
    wanted = upstream_of(graph, units, parameters)
    for unit, u in walk_back(diff, units, outputs, cotangents, wanted):
        for qualified, parameter in parameters.items():
            if not _reads(graph, unit.nodes, parameter):
                continue
            part = param_vjp(diff, unit, parameter, u)
            result[qualified] = part if qualified not in result else result[qualified] + part
    k = cotangents[0].shape[1]
    for qualified, parameter in parameters.items():
        if qualified not in result:  # unused by the selected outputs
            value = graph.state[parameter][1]
            result[qualified] = cotangents[0].new_zeros(cotangents[0].shape[0], k,
                                                        *value.shape)
    return result


def _structured(diff: Differentiator, unit: Unit, parameter: str, u: torch.Tensor):
    """The rule's own parameter VJP when the op reads P directly (and only there)."""
    if unit.region is not None:
        return None
    node = diff.graph[unit.name]
    leaves = node.leaves()[0]
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Ref)
                 and leaf.name == parameter]
    if len(positions) != 1 or _derivation(diff.graph, [unit.name], parameter):
        return None
    differentiated = [i for i in range(len(leaves)) if i not in positions and isinstance(
        leaves[i], Ref) and diff.graph[leaves[i].name].kind in ("input", "activation")]
    rule = rule_for(node, diff.graph, differentiated[0]) if differentiated else None
    if rule is None:
        return None
    return rule.param_vjp(diff.call(unit.name), positions[0], u)

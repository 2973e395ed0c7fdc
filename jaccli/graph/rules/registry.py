"""The rule registry: one small rule per ATen operator, keyed by the op overload's name.

A rule differentiates one op node's output with respect to one of its arguments (a
`position` in the flat argument list) that is a differentiated tensor. Tensors are handled
per sample with the batch first: blocks of k tangents are `(B, k, *per-sample shape)`.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp

from ...engine.structures import Structured
from ..opgraph import BATCHED, OpGraph, OpNode, Ref
from ..replay import OpCall


def batched_leaves(node: OpNode, graph: OpGraph) -> list[int]:
    """Positions of the arguments that carry the batch (activations, batch values...)."""
    return [i for i, leaf in enumerate(node.leaves()[0])
            if isinstance(leaf, Ref) and graph[leaf.name].kind in BATCHED]


def leaf_node(node: OpNode, graph: OpGraph, position: int) -> OpNode | None:
    """The node argument `position` reads (None for a literal or a missing argument)."""
    leaves = node.leaves()[0]
    leaf = leaves[position] if position < len(leaves) else None
    return graph[leaf.name] if isinstance(leaf, Ref) else None


class OpRule:
    """How to differentiate one family of ops.

    name: shown in plans. family: `affine`, `pointwise`, `movement`, `norm`, `pooling`,
    `linear-map`, `softmax`, `attention`. any_batch_axis: the rule handles tensors whose
    batch axis is not 0 (others need every batched tensor of the node batch-first).
    """

    name = "rule"
    family = "generic"
    any_batch_axis = False

    def applies(self, node: OpNode, graph: OpGraph, position: int) -> bool:
        """Whether this rule is exact for this node and argument (shapes, options)."""
        return True

    def structure(self, node: OpNode, graph: OpGraph, position: int) -> str:
        """The tag of the Jacobian `jacobian` returns, known from shapes alone."""
        raise NotImplementedError

    def jacobian(self, call: OpCall, position: int) -> Structured:
        """Per-sample ∂ output / ∂ argument `position`, structured."""
        raise NotImplementedError

    def jvp(self, call: OpCall, position: int, v: torch.Tensor) -> torch.Tensor:
        """`J v` for tangents v `(B, k, *in)` -> `(B, k, *out)`, through the op itself (or,
        for ops without forward-mode AD such as `copy`, through the structured J)."""
        primal = call.values[position]

        def one(tangent: torch.Tensor) -> torch.Tensor:
            return jvp(lambda a: call.run({position: a}), (primal,), (tangent,))[1]

        try:
            return _over_columns(one, v, call.ref(position).batch_axis, call.node.batch_axis)
        except NotImplementedError:
            return apply_structured(self.jacobian(call, position), v, call.out_shape)

    def vjp(self, call: OpCall, position: int, u: torch.Tensor) -> torch.Tensor:
        """`Jᵀ u` for cotangents u `(B, k, *out)` -> `(B, k, *in)`, through the op itself."""
        _, pullback = vjp(lambda a: call.run({position: a}), call.values[position])
        return _over_columns(lambda c: pullback(c)[0], u, call.node.batch_axis,
                             call.ref(position).batch_axis)

    def param_vjp(self, call: OpCall, position: int, u: torch.Tensor) -> torch.Tensor | None:
        """Per-sample `uᵀ ∂out/∂P` for a parameter argument P `(B, k, *P.shape)`; None: the
        caller uses the generic per-op route."""
        return None


def _over_columns(fn, blocks: torch.Tensor, in_axis: int, out_axis: int) -> torch.Tensor:
    """Apply a batched linear map to each of the k columns of `(B, k, *shape)` blocks."""
    def column(c: torch.Tensor) -> torch.Tensor:
        return fn(c.movedim(0, in_axis)).movedim(out_axis, 0)

    try:
        return torch.vmap(column, in_dims=1, out_dims=1)(blocks)
    except Exception:  # an op without a batching rule: one column at a time
        return torch.stack([column(blocks[:, j]) for j in range(blocks.shape[1])], dim=1)


def apply_structured(jac: Structured, v: torch.Tensor, out_shape) -> torch.Tensor:
    """`J v` for blocks `(B, k, *in)` through a structured J -> `(B, k, *out)`."""
    b, k = v.shape[:2]
    out = jac.right_apply(v.reshape(b, k, -1).transpose(1, 2)).transpose(1, 2)
    return out.expand(b, k, out.shape[2]).reshape(b, k, *out_shape)


_RULES: dict[str, OpRule] = {}


def register(*ops) -> callable:
    """Class decorator: register one instance for each op overload (refuses duplicates)."""

    def decorate(rule_class: type[OpRule]) -> type[OpRule]:
        rule = rule_class()
        for op in ops:
            key = str(op)
            if key in _RULES:
                raise ValueError(f"a rule for {key} is already registered "
                                 f"({type(_RULES[key]).__name__})")
            _RULES[key] = rule
        return rule_class

    return decorate


def registered(op) -> OpRule | None:
    """The rule registered for exactly this op overload."""
    return _RULES.get(str(op))


def registered_ops() -> list[str]:
    return sorted(_RULES)

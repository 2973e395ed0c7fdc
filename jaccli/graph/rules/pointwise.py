"""Elementwise ops (unary and binary, with broadcasting): each output reads one input entry.

With respect to an operand of per-sample shape S broadcast to the output's shape, output o
reads entry `index_o` of the operand (the broadcast of `arange(S)`), with weight
`∂out_o/∂in_{index_o}`. One JVP with a tangent of ones gives all weights at once (BackPACK's
observation: an elementwise rule only needs σ'). Without broadcasting the Jacobian is
diagonal; `x + y` is the identity; a constant scale (`h * 2`, eval BatchNorm) or a shared
broadcast is the same for every sample.
"""

from __future__ import annotations

import torch

from ...engine.structures import Diagonal
from ..forward_ad import jvp
from ..opgraph import BATCHED, OpGraph, OpNode, Ref
from ..replay import OpCall
from ..structures import Gather, Identity
from .registry import OpRule, batched_leaves, leaf_node, register

aten = torch.ops.aten

# Elementwise ops that torch does not tag `pointwise`; every op tagged so is handled too.
UNTAGGED = (aten.prelu.default, aten.hardswish.default, aten.hardsigmoid.default,
            aten._prelu_kernel.default, aten.logit.default, aten.alias.default,
            aten.lift_fresh_copy.default, aten.log_sigmoid.default, aten.where.ScalarSelf,
            aten.where.ScalarOther, aten.where.Scalar)

# op -> argument positions in which the op is linear (its derivative there does not depend
# on that argument); position -> the op needs `alpha`/values of no other batched argument.
LINEAR_IN = {
    "aten.add.Tensor": (0, 1), "aten.add.Scalar": (0,), "aten.sub.Tensor": (0, 1),
    "aten.sub.Scalar": (0,), "aten.rsub.Tensor": (0, 1), "aten.rsub.Scalar": (0,),
    "aten.mul.Tensor": (0, 1), "aten.mul.Scalar": (0,), "aten.div.Tensor": (0,),
    "aten.div.Scalar": (0,), "aten.neg.default": (0,), "aten.clone.default": (0,),
    "aten.alias.default": (0,), "aten.lift_fresh_copy.default": (0,),
    "aten.where.self": (1, 2), "aten.masked_fill.Scalar": (0,),
}
IDENTITY_IN = {"aten.add.Tensor": (0, 1), "aten.sub.Tensor": (0,), "aten.clone.default": (0,),
               "aten.alias.default": (0,), "aten.lift_fresh_copy.default": (0,),
               "aten.add.Scalar": (0,), "aten.sub.Scalar": (0,)}


def _alpha_is_one(node: OpNode) -> bool:
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    return not isinstance(alpha, Ref) and alpha == 1


class PointwiseRule(OpRule):
    """Any batch axis, as long as every batched operand has it where the output has it."""

    name = "pointwise"
    family = "pointwise"
    any_batch_axis = True

    def applies(self, node, graph, position):
        operand = leaf_node(node, graph, position)
        if node.op_key == "aten.rrelu.default" and node.kwargs.get(
                "training", node.args[3] if len(node.args) > 3 else False):
            return False  # random slopes: not a function of the input
        if node.dtype is None or not node.dtype.is_floating_point or operand.dtype != node.dtype:
            return False
        if node.batch_axis is None or any(graph[r].batch_axis != node.batch_axis
                                          for r in node.refs() if graph[r].kind in BATCHED):
            return False
        shape, out = operand.shape, node.shape
        if len(shape) != len(out):
            return False
        return all(s == o or s == 1 for s, o in zip(shape, out, strict=True))

    def _broadcast(self, node: OpNode, graph: OpGraph, position: int) -> bool:
        return leaf_node(node, graph, position).shape != node.shape

    def _shared(self, node: OpNode, graph: OpGraph, position: int) -> bool:
        others = [i for i in batched_leaves(node, graph) if i != position]
        linear = position in LINEAR_IN.get(node.op_key, ())
        return linear and not others

    def _identity(self, node: OpNode, graph: OpGraph, position: int) -> bool:
        if position not in IDENTITY_IN.get(node.op_key, ()):
            return False
        if node.op_key in ("aten.add.Tensor", "aten.sub.Tensor") and position == 1 \
                and not _alpha_is_one(node):
            return False
        return not self._broadcast(node, graph, position)

    def structure(self, node, graph, position):
        if self._identity(node, graph, position):
            return "identity"
        shared = self._shared(node, graph, position)
        if self._broadcast(node, graph, position):
            return "shared-gather" if shared else "gather"
        return "shared-diagonal" if shared else "diagonal"

    def weights(self, call: OpCall, position: int) -> torch.Tensor:
        """∂out_o/∂in_{index_o} for every output entry: `(B, *out)`."""
        primal = call.values[position]
        tangent = jvp(lambda a: call.run({position: a}), (primal,), (torch.ones_like(primal),))
        return tangent[1].movedim(call.node.batch_axis, 0)

    def jacobian(self, call, position):
        node, graph = call.node, call.graph
        operand = call.ref(position)
        if self._identity(node, graph, position):
            return Identity(node.numel, call.output.dtype, call.output.device)
        shared = self._shared(node, graph, position)
        weight = self.weights(call, position).reshape(call.batch, -1)
        if shared:
            weight = weight[:1]
        if not self._broadcast(node, graph, position):
            return Diagonal(weight, shared=shared)
        index = torch.arange(operand.numel, device=weight.device).reshape(operand.shape)
        index = index.expand(node.shape).reshape(1, -1)
        return Gather(index, weight, operand.numel)

    def jvp(self, call, position, v):
        if self._identity(call.node, call.graph, position):
            return v
        weight = self.weights(call, position)[:, None]  # (B, 1, *out)
        return weight * v.expand(*v.shape[:2], *call.out_shape)

    def vjp(self, call, position, u):
        if self._identity(call.node, call.graph, position):
            return u
        product = self.weights(call, position)[:, None] * u  # (B, k, *out)
        shape = call.in_shape(position)
        dims = [i + 2 for i, (s, o) in enumerate(zip(shape, call.out_shape, strict=True))
                if s != o]
        return product.sum(dim=dims, keepdim=True) if dims else product

    def param_vjp(self, call, position, u):
        """PReLU's slope: ∂out/∂w_c = x where x <= 0, summed over channel c's entries."""
        if call.node.op_name != "prelu" or position != 1 or call.node.batch_axis != 0:
            return None
        x = call.values[0].to(u.dtype)
        slope_part = (u * torch.where(x > 0, torch.zeros_like(x), x)[:, None])
        weight = call.values[1]
        if weight.numel() == 1 or len(call.out_shape) == 0:
            return slope_part.flatten(2).sum(dim=2).reshape(*u.shape[:2], *weight.shape)
        channel_sums = slope_part.flatten(3).sum(dim=3) if slope_part.ndim > 3 else slope_part
        return channel_sums.reshape(*u.shape[:2], *weight.shape)


register(*UNTAGGED)(PointwiseRule)
POINTWISE = PointwiseRule()

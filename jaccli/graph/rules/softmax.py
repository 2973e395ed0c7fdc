"""Softmax and log-softmax over the last per-sample axis: one block per position.

For p = softmax(x) over a row of N entries, ∂p/∂x = diag(p) - p pᵀ; for log-softmax,
∂/∂x = I - 1 pᵀ. A sample with G rows is a per-sample `Kronecker` with G blocks.
"""

from __future__ import annotations

import torch

from ..replay import OpCall
from ..structures import Kronecker
from .registry import OpRule, register

aten = torch.ops.aten
LOG = ("aten.log_softmax.int", "aten._log_softmax.default")


def _dim(node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs["dim"]


@register(aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
          aten._log_softmax.default)
class SoftmaxRule(OpRule):
    name = "softmax"
    family = "softmax"

    def applies(self, node, graph, position):
        if position != 0 or node.batch_axis != 0 or not node.shape:
            return False
        dim = _dim(node)
        rank = len(node.shape) + 1
        return (dim % rank) == rank - 1 and (rank > 1)

    def structure(self, node, graph, position):
        return "kronecker"

    def _probabilities(self, call: OpCall) -> torch.Tensor:
        """`(B, G, N)`."""
        p = call.output.to(call.output.dtype)
        if call.node.op_key in LOG:
            p = p.exp()
        size = call.out_shape[-1]
        return p.reshape(call.batch, -1, size)

    def jacobian(self, call, position):
        p = self._probabilities(call)
        eye = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device)
        if call.node.op_key in LOG:
            block = eye - p[..., None, :]
        else:
            block = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
        return Kronecker(None, block, p.shape[1])

    def jvp(self, call, position, v):
        p = self._probabilities(call)[:, None]  # (B, 1, G, N)
        w = v.reshape(*v.shape[:2], *p.shape[2:])
        if call.node.op_key in LOG:
            out = w - (p * w).sum(dim=-1, keepdim=True)
        else:
            out = p * (w - (p * w).sum(dim=-1, keepdim=True))
        return out.reshape(v.shape)

    def vjp(self, call, position, u):
        p = self._probabilities(call)[:, None]
        w = u.reshape(*u.shape[:2], *p.shape[2:])
        if call.node.op_key in LOG:
            out = w - p * w.sum(dim=-1, keepdim=True)
        else:
            out = p * (w - (p * w).sum(dim=-1, keepdim=True))
        return out.reshape(u.shape)

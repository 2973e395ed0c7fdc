"""Matrix products: `linear`/`addmm`/`mm`/`matmul` against a weight, and `bmm`/`matmul` of two
activations (attention scores, attention-weighted values).

Against a weight W, a per-sample input `(T, i)` (any leading token axes, flattened) maps to
`(T, o)` by `I_T ⊗ W`: a shared `Kronecker` (a shared `Matrix` when T = 1), never formed per
sample. For `a @ b` with both per sample, `(G, m, n) @ (G, n, p)`: ∂/∂a = blockdiag(I_m ⊗ bᵀ),
∂/∂b = blockdiag(a ⊗ I_p), per-sample `Kronecker`s with G groups.
"""

from __future__ import annotations

import math

import torch

from ...engine.structures import Matrix
from ..opgraph import BATCHED
from ..structures import Kronecker
from .registry import OpRule, leaf_node, register

aten = torch.ops.aten


def _is_batched(node, graph, position) -> bool:
    leaf = leaf_node(node, graph, position)
    return leaf is not None and leaf.kind in BATCHED


def _shared_map(matrix: torch.Tensor, tokens: int):
    """`I_tokens ⊗ matrix` for a `(o, i)` matrix."""
    if tokens == 1:
        return Matrix(matrix[None], shared=True)
    return Kronecker(None, matrix[None, None], 1, left_size=tokens)


@register(aten.linear.default)
class LinearRule(OpRule):
    """`linear(x, W, b)`: ∂/∂x = I ⊗ W."""

    name = "linear"
    family = "affine"
    any_batch_axis = True  # any axis but the last: each sample's rows still map by W

    def applies(self, node, graph, position):
        if position != 0 or _is_batched(node, graph, 1) or _is_batched(node, graph, 2):
            return False
        x = leaf_node(node, graph, 0)
        return x.batch_axis == node.batch_axis and x.batch_axis != len(x.shape)

    def structure(self, node, graph, position):
        return "shared" if len(leaf_node(node, graph, 0).shape) == 1 else "shared-kronecker"

    def jacobian(self, call, position):
        tokens = math.prod(call.in_shape(0)[:-1])
        return _shared_map(call.values[1].to(call.output.dtype), tokens)

    def jvp(self, call, position, v):
        return v @ call.values[1].to(v.dtype).T

    def vjp(self, call, position, u):
        return u @ call.values[1].to(u.dtype)

    def param_vjp(self, call, position, u):
        """weight: Σ_t u_t ⊗ x_t `(B, k, o, i)`; bias: Σ_t u_t `(B, k, o)`."""
        b, k = u.shape[:2]
        u3 = u.reshape(b, k, -1, u.shape[-1])  # (B, k, T, o)
        if position == 2:
            return u3.sum(dim=2)
        if position != 1:
            return None
        x = call.values[0].to(u.dtype).movedim(call.ref(0).batch_axis, 0)
        x3 = x.reshape(b, -1, x.shape[-1])  # (B, T, i)
        return torch.einsum("bkto,bti->bkoi", u3, x3)


@register(aten.addmm.default, aten.mm.default)
class AddmmRule(OpRule):
    """`addmm(bias, x, Wt, beta, alpha)` / `mm(x, Wt)` with x `(B, i)`: ∂/∂x = alpha Wtᵀ."""

    name = "linear"
    family = "affine"

    def _operand(self, node) -> int:
        return 1 if node.op_key == "aten.addmm.default" else 0

    def _alpha(self, node) -> float:
        if node.op_key != "aten.addmm.default":
            return 1.0
        return float(node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1))

    def applies(self, node, graph, position):
        first = self._operand(node)
        return (position == first and not _is_batched(node, graph, first + 1)
                and node.batch_axis == 0 and len(leaf_node(node, graph, first).shape) == 1)

    def structure(self, node, graph, position):
        return "shared"

    def _matrix(self, call):
        weight = call.values[self._operand(call.node) + 1]
        return (self._alpha(call.node) * weight.T).to(call.output.dtype)  # (o, i)

    def jacobian(self, call, position):
        return Matrix(self._matrix(call)[None], shared=True)

    def jvp(self, call, position, v):
        return v @ self._matrix(call).T

    def vjp(self, call, position, u):
        return u @ self._matrix(call)


@register(aten.matmul.default, aten.bmm.default)
class MatmulRule(OpRule):
    """`a @ b` with a per-sample operand `(G..., m, n) @ (G..., n, p)`; the other operand is a
    2-D weight (shared Kronecker) or per sample with the same leading axes."""

    name = "matmul"
    family = "affine"

    def applies(self, node, graph, position):
        if position not in (0, 1) or node.batch_axis != 0:
            return False
        mine = leaf_node(node, graph, position).shape
        other_node = leaf_node(node, graph, 1 - position)
        if other_node is None or other_node.shape is None:
            return False
        other = other_node.shape
        if other_node.kind in BATCHED:
            return len(mine) >= 2 and mine[:-2] == other[:-2] and len(other) == len(mine)
        if len(other) != 2:
            return False
        return len(mine) >= 1 if position == 0 else len(mine) >= 2

    def structure(self, node, graph, position):
        if leaf_node(node, graph, 1 - position).kind in BATCHED:
            return "kronecker"
        if position == 0 and len(leaf_node(node, graph, 0).shape) == 1:
            return "shared"
        return "shared-kronecker"

    def jacobian(self, call, position):
        a, b = call.values[0], call.values[1]
        dtype = call.output.dtype
        mine = call.in_shape(position)
        if call.ref(1 - position).kind not in BATCHED:
            if position == 0:
                return _shared_map(b.T.to(dtype), math.prod(mine[:-1]))
            groups = math.prod(mine[:-2])
            return Kronecker(a.to(dtype)[None, None], None, groups, right_size=mine[-1])
        groups = math.prod(mine[:-2])
        n = call.batch
        if position == 0:  # blockdiag(I_m ⊗ b_gᵀ)
            right = b.reshape(n, groups, *b.shape[-2:]).transpose(-1, -2).to(dtype)
            return Kronecker(None, right, groups, left_size=mine[-2])
        left = a.reshape(n, groups, *a.shape[-2:]).to(dtype)  # blockdiag(a_g ⊗ I_p)
        return Kronecker(left, None, groups, right_size=mine[-1])

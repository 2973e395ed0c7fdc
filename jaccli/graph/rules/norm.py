"""Normalization layers: eval BatchNorm (a shared diagonal), LayerNorm, GroupNorm, InstanceNorm.

LayerNorm/GroupNorm/InstanceNorm standardize contiguous groups of M entries of each sample:
`y = γ ⊙ (x - μ)/σ + β`, whose Jacobian per group is `diag(γ)/σ (I - 11ᵀ/M - x̂x̂ᵀ/M)`:
block diagonal, a per-sample `Kronecker` with one M×M block per group. JVPs and VJPs use the
closed form without forming the blocks.
"""

from __future__ import annotations

import math

import torch

from ...engine.structures import Diagonal
from ..replay import OpCall
from ..structures import Kronecker
from .registry import OpRule, register

aten = torch.ops.aten


@register(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default,
          aten.native_batch_norm.default)
class EvalBatchNormRule(OpRule):
    """Eval-mode BatchNorm: `(x - mean) / sqrt(var + eps) * w + b`, a shared diagonal."""

    name = "batch-norm"
    family = "norm"

    def applies(self, node, graph, position):
        if position != 0 or node.output_index not in (None, 0) or node.batch_axis != 0:
            return False
        training = {"aten.batch_norm.default": 5, "aten.native_batch_norm.default": 5}
        index = training.get(node.op_key)
        return index is None or node.args[index] is False

    def structure(self, node, graph, position):
        return "shared-diagonal"

    def scale(self, call: OpCall) -> torch.Tensor:
        """The per-entry multiplier, `(1, *out)`."""
        args, _ = call.arguments()
        weight, var = args[1], args[4]
        legit = call.node.op_key == "aten._native_batch_norm_legit_no_training.default"
        eps = args[6] if legit else args[7]
        scale = torch.rsqrt(var + eps)
        if weight is not None:
            scale = scale * weight
        shape = [1] * (len(call.out_shape) + 1)
        shape[1] = -1
        return scale.reshape(shape).expand(1, *call.out_shape).to(call.output.dtype)

    def jacobian(self, call, position):
        return Diagonal(self.scale(call).reshape(1, -1), shared=True)

    def jvp(self, call, position, v):
        return self.scale(call)[:, None] * v

    vjp = jvp


class GroupStandardizeRule(OpRule):
    """Shared machinery: subclasses say how a sample splits into groups and what γ is."""

    family = "norm"

    def layout(self, call: OpCall) -> tuple[int, int, torch.Tensor | None, float]:
        """(groups G, entries per group M, γ as `(G|1, M)` or None, eps)."""
        raise NotImplementedError

    def applies(self, node, graph, position):
        return position == 0 and node.output_index in (None, 0) and node.batch_axis == 0

    def structure(self, node, graph, position):
        return "kronecker"

    def _standardized(self, call: OpCall):
        groups, size, gamma, eps = self.layout(call)
        x = call.values[0].reshape(call.batch, groups, size).to(call.output.dtype)
        mean = x.mean(dim=2, keepdim=True)
        inv_std = torch.rsqrt(x.var(dim=2, unbiased=False, keepdim=True) + eps)
        gamma = None if gamma is None else gamma.to(x.dtype)
        return (x - mean) * inv_std, inv_std, gamma, groups, size

    def jacobian(self, call, position):
        xhat, inv_std, gamma, groups, size = self._standardized(call)
        eye = torch.eye(size, dtype=xhat.dtype, device=xhat.device)
        block = (eye - 1.0 / size - xhat[..., :, None] * xhat[..., None, :] / size)
        block = block * inv_std[..., None]
        if gamma is not None:
            block = gamma[None, :, :, None] * block
        return Kronecker(None, block, groups)

    def jvp(self, call, position, v):
        xhat, inv_std, gamma, groups, size = self._standardized(call)
        b, k = v.shape[:2]
        w = v.reshape(b, k, groups, size)
        xh, s = xhat[:, None], inv_std[:, None]
        out = s * (w - w.mean(dim=3, keepdim=True) - xh * (xh * w).mean(dim=3, keepdim=True))
        if gamma is not None:
            out = gamma * out
        return out.reshape(v.shape[:2] + tuple(call.out_shape))

    def vjp(self, call, position, u):
        xhat, inv_std, gamma, groups, size = self._standardized(call)
        b, k = u.shape[:2]
        w = u.reshape(b, k, groups, size)
        if gamma is not None:
            w = gamma * w
        xh, s = xhat[:, None], inv_std[:, None]
        out = s * (w - w.mean(dim=3, keepdim=True) - xh * (xh * w).mean(dim=3, keepdim=True))
        return out.reshape(u.shape[:2] + tuple(call.in_shape(0)))


@register(aten.layer_norm.default, aten.native_layer_norm.default)
class LayerNormRule(GroupStandardizeRule):
    name = "layer-norm"

    def layout(self, call):
        size = math.prod(call.arg(1, "normalized_shape"))
        groups = math.prod(call.in_shape(0)) // size
        weight = call.arg(2, "weight")
        eps = call.arg(4, "eps", 1e-5)
        return groups, size, None if weight is None else weight.reshape(1, size), eps


@register(aten.group_norm.default, aten.native_group_norm.default)
class GroupNormRule(GroupStandardizeRule):
    name = "group-norm"

    def layout(self, call):
        if call.node.op_key == "aten.group_norm.default":
            groups, weight = call.arg(1, "num_groups"), call.arg(2, "weight")
            eps = call.arg(4, "eps", 1e-5)
        else:
            groups, weight, eps = call.arg(6, "group"), call.arg(1, "weight"), call.arg(7, "eps")
        channels = call.in_shape(0)[0]
        spatial = math.prod(call.in_shape(0)[1:])
        size = channels // groups * spatial
        gamma = None if weight is None else weight.repeat_interleave(spatial).reshape(groups,
                                                                                      size)
        return groups, size, gamma, eps


@register(aten.instance_norm.default)
class InstanceNormRule(GroupStandardizeRule):
    """With input statistics: one group per channel (running statistics: use eval BN)."""

    name = "instance-norm"

    def applies(self, node, graph, position):
        return super().applies(node, graph, position) and node.args[5] is True

    def layout(self, call):
        channels = call.in_shape(0)[0]
        spatial = math.prod(call.in_shape(0)[1:])
        weight = call.arg(1, "weight")
        gamma = None if weight is None else weight.reshape(channels, 1).expand(channels,
                                                                              spatial)
        return channels, spatial, gamma, call.arg(7, "eps")

"""Per-sample dense Jacobians with closed forms: LayerNorm, Softmax, LogSoftmax; GroupNorm."""

from __future__ import annotations

import torch
from torch import nn

from ..generic import per_sample_jacobian
from ..structures import Matrix
from .base import Rule, register


@register(nn.LayerNorm)
class LayerNormRule(Rule):
    """Normalizing over the whole sample: J = diag(γ)/σ · (I − 11ᵀ/D − x̂x̂ᵀ/D)."""

    structure = "dense"

    def jacobian(self, module, x):
        n, d = x.shape[0], x[0].numel()
        if tuple(module.normalized_shape) != tuple(x.shape[1:]):
            return Matrix(per_sample_jacobian(module, x))  # normalizes sub-blocks only
        flat = x.reshape(n, d)
        sigma = torch.sqrt(flat.var(dim=1, unbiased=False, keepdim=True) + module.eps)
        xhat = (flat - flat.mean(dim=1, keepdim=True)) / sigma  # (N, D)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        jac = (eye - 1.0 / d - xhat[:, :, None] * xhat[:, None, :] / d) / sigma[:, :, None]
        if module.weight is not None:
            jac = module.weight.to(x.dtype).reshape(1, d, 1) * jac
        return Matrix(jac)


def _covers_sample(module, x) -> bool:
    dim = module.dim if module.dim is not None else (0 if x.ndim in (0, 1, 3) else 1)
    return x.ndim == 2 and dim in (1, -1)


@register(nn.Softmax)
class SoftmaxRule(Rule):
    """Over the feature axis: J = diag(p) − p pᵀ."""

    structure = "dense"

    def jacobian(self, module, x):
        if not _covers_sample(module, x):
            return Matrix(per_sample_jacobian(module, x))
        p = torch.softmax(x, dim=1)
        return Matrix(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])


@register(nn.LogSoftmax)
class LogSoftmaxRule(Rule):
    """Over the feature axis: J = I − 1 pᵀ."""

    structure = "dense"

    def jacobian(self, module, x):
        if not _covers_sample(module, x):
            return Matrix(per_sample_jacobian(module, x))
        p = torch.softmax(x, dim=1)
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        return Matrix(eye - p[:, None, :])


@register(nn.GroupNorm)
class GroupNormRule(Rule):
    """Dense per sample (block-diagonal over groups); computed by the generic path."""

    structure = "dense"

    def jacobian(self, module, x):
        return Matrix(per_sample_jacobian(module, x))

"""Layers that only move or copy values: the Jacobian is the identity, shared by all samples."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..structures import Diagonal
from .base import Rule, register


@register(nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
          nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
class IdentityRule(Rule):
    """Reshapes, and dropout in eval mode: J = I."""

    structure = "shared-diagonal"
    shared = True

    def applies(self, module):
        return not (module.training and isinstance(module, nn.modules.dropout._DropoutNd))

    def jacobian(self, module, x):
        d = math.prod(x.shape[1:])
        return Diagonal(torch.ones(1, d, dtype=x.dtype, device=x.device), shared=True)

    def jvp(self, module, x, v):
        return module(v)

    def vjp(self, module, x, u):
        return u.reshape(x.shape)


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormRule(Rule):
    """Eval-mode batch norm with running statistics: a per-channel scale, shared by samples."""

    structure = "shared-diagonal"
    shared = True

    def applies(self, module):
        return not module.training and module.running_var is not None

    def _scale(self, module, x):
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        return scale.to(x.dtype).reshape(1, -1, *([1] * (x.ndim - 2)))

    def jacobian(self, module, x):
        return Diagonal(self._scale(module, x).expand(1, *x.shape[1:]).reshape(1, -1), shared=True)

    def jvp(self, module, x, v):
        return self._scale(module, x) * v

    def vjp(self, module, x, u):
        return self._scale(module, x) * u

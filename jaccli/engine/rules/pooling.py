"""Max pooling: each output copies one input entry (a selection, stored as indices)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..structures import Selection
from .base import Rule, register

_POOL = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}
_ADAPTIVE = {nn.AdaptiveMaxPool1d: F.adaptive_max_pool1d,
             nn.AdaptiveMaxPool2d: F.adaptive_max_pool2d,
             nn.AdaptiveMaxPool3d: F.adaptive_max_pool3d}


def _indices(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Flat per-sample input index of each output: `(N, D_out)`."""
    if type(module) in _POOL:
        _, idx = _POOL[type(module)](x, module.kernel_size, module.stride, module.padding,
                                     module.dilation, ceil_mode=module.ceil_mode,
                                     return_indices=True)
    else:
        _, idx = _ADAPTIVE[type(module)](x, module.output_size, return_indices=True)
    spatial = x.shape[2:].numel()
    channel_offset = torch.arange(idx.shape[1], device=x.device).reshape(
        1, -1, *([1] * (idx.ndim - 2))) * spatial
    return (idx + channel_offset).reshape(x.shape[0], -1)


@register(*_POOL, *_ADAPTIVE)
class MaxPoolRule(Rule):
    structure = "selection"

    def applies(self, module):
        return not module.return_indices

    def jacobian(self, module, x):
        return Selection(_indices(module, x), x[0].numel(), x.dtype)

    def jvp(self, module, x, v):
        idx = _indices(module, x)
        out = module(x)
        return torch.gather(v.reshape(x.shape[0], -1), 1, idx).reshape(out.shape)

    def vjp(self, module, x, u):
        idx = _indices(module, x)
        grad = torch.zeros(x.shape[0], x[0].numel(), dtype=u.dtype, device=u.device)
        return grad.scatter_add_(1, idx, u.reshape(x.shape[0], -1)).reshape(x.shape)

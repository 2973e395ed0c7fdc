"""Elementwise activations: the Jacobian is diag(σ'(x)); a rule only supplies σ'."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jvp

from ..structures import Diagonal
from .base import Rule, register

ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.LogSigmoid,
    nn.Threshold,
)


def _closed_form(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if type(module) is nn.Tanh:
        return 1 - torch.tanh(x).square()
    if type(module) is nn.Sigmoid:
        s = torch.sigmoid(x)
        return s * (1 - s)
    if type(module) is nn.ReLU:
        return (x > 0).to(x.dtype)
    if type(module) is nn.LeakyReLU:
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, module.negative_slope))
    return None


def derivative(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """σ'(x), same shape as x. For an elementwise map, J·1 is exactly the diagonal of J."""
    known = _closed_form(module, x)
    if known is not None:
        return known
    return jvp(module, (x.clone(),), (torch.ones_like(x),))[1]


@register(*ACTIVATIONS)
class ElementwiseRule(Rule):
    structure = "diagonal"

    def applies(self, module):
        return not (isinstance(module, nn.RReLU) and module.training)

    def jacobian(self, module, x):
        return Diagonal(derivative(module, x).reshape(x.shape[0], -1))

    def jvp(self, module, x, v):
        return derivative(module, x) * v

    def vjp(self, module, x, u):
        return derivative(module, x) * u

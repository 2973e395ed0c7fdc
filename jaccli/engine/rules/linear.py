"""Linear maps (Linear, convolutions, average pooling, padding): one matrix shared by all
samples; Linear and Conv2d also have closed-form per-sample parameter Jacobians."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp, vjp, vmap

from ..structures import Matrix
from .base import Rule, register

_BASIS_CHUNK = 256


@register(nn.Linear)
class LinearRule(Rule):
    """y = x Wᵀ + b: J = W (or I ⊗ W when the layer is applied along leading feature axes)."""

    structure = "shared"
    shared = True

    def jacobian(self, module, x):
        weight = module.weight.to(x.dtype)
        repeats = math.prod(x.shape[1:-1])
        if repeats > 1:
            weight = torch.kron(torch.eye(repeats, dtype=x.dtype, device=x.device), weight)
        return Matrix(weight[None], shared=True)

    def jvp(self, module, x, v):
        return v @ module.weight.to(v.dtype).T

    def vjp(self, module, x, u):
        return u @ module.weight.to(u.dtype)

    def has_param_jacobian(self, module, attribute):
        return attribute in ("weight", "bias")

    def param_jacobian(self, module, attribute, x, g):
        """∂/∂W = Σ_t G_{c,n,t} ⊗ x_{n,t}; ∂/∂b = Σ_t G_{c,n,t}, over positions t of x
        `(N, ..., D_in)`."""
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).to(g.dtype)  # (N, T, D_in)
        g4 = g.reshape(g.shape[0], n, -1, g.shape[-1])  # (C, N, T, D_out)
        if attribute == "bias":
            return g4.sum(dim=2).transpose(0, 1)
        if x3.shape[1] == 1:  # one position: a plain outer product, written once
            return g4[:, :, 0, :].transpose(0, 1)[:, :, :, None] * x3[:, None, None, 0, :]
        return torch.einsum("cnto,nti->ncoi", g4, x3)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
          nn.PixelShuffle, nn.PixelUnshuffle)
class LinearMapRule(Rule):
    """Any layer whose output is an affine function of its input (convolutions, average
    pooling, padding): the matrix is built once by pushing basis vectors through the map."""

    structure = "shared"
    shared = True
    matrix_free = True

    def jacobian(self, module, x):
        return Matrix(linear_map_matrix(module, x[:1])[None], shared=True)

    def jvp(self, module, x, v):
        return jvp(module, (x,), (v,))[1]  # exact: the tangent never sees the bias

    def has_param_jacobian(self, module, attribute):
        return (attribute in ("weight", "bias") and type(module) is nn.Conv2d
                and module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))

    def param_jacobian(self, module, attribute, x, g):
        """Conv2d: ∂/∂W from unfolded input patches; ∂/∂b sums G over positions."""
        c, n = g.shape[:2]
        g3 = g.reshape(c, n, g.shape[2], -1)  # (C, N, C_out, L)
        if attribute == "bias":
            return g3.sum(dim=3).transpose(0, 1)
        patches = F.unfold(x.to(g.dtype), module.kernel_size, dilation=module.dilation,
                           padding=module.padding, stride=module.stride)  # (N, C_in*kh*kw, L)
        jac = torch.einsum("cnol,nkl->ncok", g3, patches)
        return jac.reshape(n, c, *module.weight.shape)


def linear_map_matrix(fn, x0: torch.Tensor) -> torch.Tensor:
    """The `(D_out, D_in)` matrix of the affine map `fn` at one sample `x0: (1, *in_shape)`.

    Uses forward products with input basis vectors or reverse products with output basis
    vectors, whichever are fewer, in chunks to bound memory.
    """
    in_shape = x0.shape[1:]
    d_in = math.prod(in_shape)
    y0 = fn(x0)
    d_out = y0[0].numel()
    eye_opts = {"dtype": x0.dtype, "device": x0.device}
    if d_in <= d_out:
        basis = torch.eye(d_in, **eye_opts).reshape(d_in, 1, *in_shape)
        columns = vmap(lambda v: jvp(fn, (x0,), (v,))[1], chunk_size=_BASIS_CHUNK)(basis)
        return columns.reshape(d_in, d_out).T.contiguous()
    _, pullback = vjp(fn, x0)
    basis = torch.eye(d_out, **eye_opts).reshape(d_out, *y0.shape)
    rows = vmap(lambda u: pullback(u)[0], chunk_size=_BASIS_CHUNK)(basis)
    return rows.reshape(d_out, d_in)

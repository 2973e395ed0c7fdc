"""Jacobians as operators on blocks of vectors, `V (B, D, b) -> (B, D', b)`, never formed:
chains of steps, torch.func products of a function, and affine modules applied through their
own JVP/VJP."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from ..tracing.recorder import CallRecord

Apply = Callable[[torch.Tensor], torch.Tensor]  # (B, D, b) -> (B, D', b): blocks of vectors


def chain_operator(steps: list[tuple[Apply, Apply]]) -> tuple[Apply, Apply]:
    def apply_j(v: torch.Tensor) -> torch.Tensor:
        for forward, _ in steps:
            v = forward(v)
        return v

    def apply_jt(u: torch.Tensor) -> torch.Tensor:
        for _, backward in reversed(steps):
            u = backward(u)
        return u

    return apply_j, apply_jt


def function_operator(fn, x: torch.Tensor, extras) -> tuple[Apply, Apply]:
    """J V and Jᵀ U on blocks of vectors for a batch function at `x`, by torch.func."""
    n = x.shape[0]

    def f(xx: torch.Tensor) -> torch.Tensor:
        return fn(xx, *extras)

    out, pullback = vjp(f, x)
    forward = vmap(lambda v: jvp(f, (x,), (v.reshape(x.shape),))[1].reshape(n, -1),
                   in_dims=2, out_dims=2)
    backward = vmap(lambda u: pullback(u.reshape(out.shape))[0].reshape(n, -1),
                    in_dims=2, out_dims=2)
    return forward, backward


def pull_through(module: nn.Module, record: CallRecord, block: torch.Tensor) -> torch.Tensor:
    """`block @ J` for an affine module without forming J: block `(B, k, D_out)`."""
    b, k, _ = block.shape
    in_shape = record.input.shape[1:]
    out_shape = record.output_ref.shape[1:]
    zeros = torch.zeros((b * k, *in_shape), dtype=block.dtype, device=block.device)
    _, pullback = vjp(module, zeros)  # affine: the pullback does not depend on the point
    return pullback(block.reshape(b * k, *out_shape))[0].reshape(b, k, -1)


def push_through(module: nn.Module, record: CallRecord, block: torch.Tensor) -> torch.Tensor:
    """`J @ block` for an affine module without forming J: block `(B, D_in, k)`."""
    b, _, k = block.shape
    in_shape = record.input.shape[1:]
    tangents = block.transpose(1, 2).reshape(b * k, *in_shape)
    zeros = torch.zeros_like(tangents)
    out = jvp(module, (zeros,), (tangents,))[1]
    return out.reshape(b, k, -1).transpose(1, 2)

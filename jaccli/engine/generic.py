"""The generic Jacobian path: `torch.func` transforms, correct for any differentiable module."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import jacrev, jvp, vmap

MODES = ("auto", "fwd", "rev")


def choose_mode(d_in: int, d_out: int, mode: str = "auto") -> str:
    """Forward mode costs one pass per input, reverse one per output: pick the fewer."""
    if mode != "auto":
        return mode
    return "fwd" if d_in < d_out else "rev"


def per_sample_jacobian(fn: Callable[..., torch.Tensor], x: torch.Tensor,
                        extras: Sequence[torch.Tensor] = (), *, mode: str = "auto",
                        chunk_size: int | None = None) -> torch.Tensor:
    """Jacobian of `fn` for each sample, flattened.

    fn: maps a batch `(B, *in_shape)` (plus batched extra inputs `(B, ...)`, held fixed) to
        `(B, *out_shape)`, treating rows independently.
    x: `(N, *in_shape)`. Returns `(N, D_out, D_in)` with `D = prod(shape)`.
    chunk_size: how many basis vectors the inner vmap processes at once (None: all).
    """
    n = x.shape[0]
    d_in = x[0].numel()

    def single(xi: torch.Tensor, *ei: torch.Tensor) -> torch.Tensor:
        out = fn(xi.unsqueeze(0).clone(), *(e.unsqueeze(0) for e in ei))
        return out[0].reshape(-1)

    if mode == "auto":
        with torch.no_grad():
            d_out = fn(x[:1].clone(), *(e[:1] for e in extras))[0].numel()
        mode = choose_mode(d_in, d_out)
    if mode == "rev":
        jac = vmap(jacrev(single, chunk_size=chunk_size))(x, *extras)
    else:
        basis = torch.eye(d_in, dtype=x.dtype, device=x.device).reshape(d_in, *x.shape[1:])

        def forward_columns(xi: torch.Tensor, *ei: torch.Tensor) -> torch.Tensor:
            def column(v: torch.Tensor) -> torch.Tensor:
                return jvp(lambda xx: single(xx, *ei), (xi,), (v,))[1]
            return vmap(column, chunk_size=chunk_size)(basis).T  # (D_out, D_in)

        jac = vmap(forward_columns)(x, *extras)
    return jac.reshape(n, -1, d_in)


def per_sample_frobenius(jac: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each sample's Jacobian: `(N, D_out, D_in)` -> `(N,)`."""
    return torch.linalg.matrix_norm(jac, ord="fro")

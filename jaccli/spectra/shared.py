"""The top singular values of one shared linear operator — a Jacobian that is the same matrix
for every sample (a convolution, a Linear layer) — matrix-free and once for all samples.

The operator is applied through the op itself (a convolution and its transpose), never
formed: a 67712 x 6912 convolution Jacobian costs a few MiB of Krylov vectors instead of
1.7 GiB of matrix. A convolution's top singular values are clustered (neighbouring
frequencies of its transfer function), so the Krylov basis is larger than for one sample's
Jacobian, and its blocks wider (fewer passes over the basis): it is paid for once.
"""

from __future__ import annotations

import torch

from .lanczos import Apply, LanczosResult, top_singular_values
from .trace import hutchinson_frobenius

# Vectors per Krylov block for a shared operator.
SHARED_BLOCK = 16
SHARED_MAX_STEPS_HELP = "min(D, max(60k + 400, 1000))"


def shared_max_steps(k: int, dim: int) -> int:
    """The default cap on the Krylov basis (vectors) for the top k of a shared operator whose
    smaller side is `dim`: `min(dim, max(60k + 400, 1000))`."""
    return min(dim, max(60 * k + 400, 1000))


def shared_top_singular_values(apply_j: Apply, apply_jt: Apply, *, d_in: int, d_out: int,
                               k: int, dtype: torch.dtype, device: torch.device,
                               tol: float = 1e-8, max_steps: int | None = None,
                               probes: int = 32, frobenius: torch.Tensor | None = None
                               ) -> tuple[LanczosResult, torch.Tensor, torch.Tensor | None]:
    """(top-k by block Lanczos, ‖J‖_F, its standard error) of the one operator J.

    apply_j: `(1, D_in, b) -> (1, D_out, b)`; apply_jt: `(1, D_out, b) -> (1, D_in, b)`.
    The result has one row (`values (1, k)`, residuals and converged flags as in
    `top_singular_values`); the Frobenius norm `(1,)` is `frobenius` when the caller knows
    it exactly (standard error None), else a Hutch++ estimate from `probes` products.
    max_steps: default `shared_max_steps(k, min(D_out, D_in))`.
    """
    dim = min(d_in, d_out)
    result = top_singular_values(apply_j, apply_jt, n=1, d_in=d_in, d_out=d_out, k=k,
                                 dtype=dtype, device=device, tol=tol,
                                 max_steps=max_steps or shared_max_steps(k, dim),
                                 block=SHARED_BLOCK)
    if frobenius is not None:
        return result, frobenius, None
    frob, frob_se = hutchinson_frobenius(apply_j, n=1, d_in=d_in, dtype=dtype, device=device,
                                         probes=probes, apply_jt=apply_jt)
    return result, frob, frob_se

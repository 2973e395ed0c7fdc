"""Matrix-free spectra: batched Lanczos for the top singular values, Hutchinson for ‖J‖_F.

Both only apply J and Jᵀ to blocks of vectors (one per sample), through the rules' JVPs and
VJPs, so a Jacobian too large to form (a 65536 x 65536 conv layer) still has a spectrum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Apply = Callable[[torch.Tensor], torch.Tensor]  # (N, D) -> (N, D'), one vector per sample


@dataclass
class LanczosResult:
    """values: top-k singular values `(N, k)`; residuals: `‖JᵀJ y − θ y‖ / θ` per value;
    steps: Krylov steps taken."""

    values: torch.Tensor
    residuals: torch.Tensor
    steps: int


def top_singular_values(apply_j: Apply, apply_jt: Apply, *, n: int, d_in: int, d_out: int,
                        k: int, dtype: torch.dtype, device: torch.device, tol: float = 1e-8,
                        max_steps: int | None = None, seed: int = 0) -> LanczosResult:
    """The k largest singular values of each sample's J by Lanczos on the smaller Gram side.

    apply_j: `(N, D_in) -> (N, D_out)`; apply_jt: `(N, D_out) -> (N, D_in)`.
    tol: stop when every top-k Ritz pair has relative residual below it.
    max_steps: Krylov dimension cap (default `min(dim, max(4k + 40, 80))`).
    """
    if d_out <= d_in:
        dim, operator = d_out, (lambda u: apply_j(apply_jt(u)))  # J Jᵀ
    else:
        dim, operator = d_in, (lambda v: apply_jt(apply_j(v)))  # Jᵀ J
    k = min(k, dim)
    steps_cap = min(dim, max_steps or max(4 * k + 40, 80))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, dim, generator=generator, dtype=dtype).to(device)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    basis = torch.zeros(n, steps_cap, dim, dtype=dtype, device=device)
    alpha = torch.zeros(n, steps_cap, dtype=dtype, device=device)
    beta = torch.zeros(n, steps_cap, dtype=dtype, device=device)
    values = residuals = None
    for j in range(steps_cap):
        basis[:, j] = q
        w = operator(q)
        alpha[:, j] = (w * q).sum(dim=1)
        for _ in range(2):  # full re-orthogonalization, twice: keeps the basis orthonormal
            coefficients = torch.einsum("njd,nd->nj", basis[:, :j + 1], w)
            w = w - torch.einsum("nj,njd->nd", coefficients, basis[:, :j + 1])
        b = torch.linalg.vector_norm(w, dim=1)
        beta[:, j] = b
        q = w / b.clamp_min(torch.finfo(dtype).tiny)[:, None]
        if j + 1 >= k and ((j + 1) % 5 == 0 or j + 1 == steps_cap):
            values, residuals = _ritz(alpha[:, :j + 1], beta[:, :j + 1], k)
            if bool((residuals <= tol).all()):
                return LanczosResult(values, residuals, j + 1)
    return LanczosResult(values, residuals, steps_cap)


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular values from the tridiagonal T, and the relative Ritz residuals."""
    m = alpha.shape[1]
    t = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :m - 1], 1) + \
        torch.diag_embed(beta[:, :m - 1], -1)
    theta, vectors = torch.linalg.eigh(t)  # ascending
    theta, vectors = theta.flip(1)[:, :k], vectors.flip(2)[:, :, :k]
    residual = (beta[:, m - 1:m] * vectors[:, m - 1, :]).abs()
    scale = theta.abs().clamp_min(torch.finfo(theta.dtype).tiny)
    return theta.clamp_min(0).sqrt(), residual / scale


def hutchinson_frobenius(apply_j: Apply, *, n: int, d_in: int, dtype: torch.dtype,
                         device: torch.device, probes: int = 32,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """‖J‖_F per sample estimated from `probes` Rademacher vectors, with its standard error.

    E‖J v‖² = ‖J‖_F² for v with independent ±1 entries. Returns `(estimate, standard error)`,
    each `(N,)`, for ‖J‖_F (the error propagated from ‖J‖_F² by the delta method).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    squares = []
    for _ in range(probes):
        v = torch.randint(0, 2, (n, d_in), generator=generator).to(device=device, dtype=dtype)
        squares.append(torch.linalg.vector_norm(apply_j(2 * v - 1), dim=1).square())
    samples = torch.stack(squares, dim=1)  # (N, probes)
    mean = samples.mean(dim=1)
    se_square = samples.std(dim=1) / probes**0.5
    estimate = mean.sqrt()
    return estimate, se_square / (2 * estimate.clamp_min(torch.finfo(dtype).tiny))

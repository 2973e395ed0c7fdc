"""Spectral quantities of per-sample Jacobians, from their singular values (pure functions).

All functions take `sigma`: `(N, r)` singular values per sample, sorted descending, where
`r = min(D_out, D_in)` (all of them) unless stated otherwise. Returns `(N,)` tensors.

Conventions for rank-deficient Jacobians (σ_min = 0): the condition number is +inf and the
log-volume is -inf; effective and stable rank stay finite. A singular value counts as zero
when it is at most `relative_rank_tolerance(method, ...) · σ_max`: the error of the method that
produced it — `eps` for values read off a structure (a diagonal, a selection), the usual
`max(D) · eps` for an SVD, `sqrt(max(D) · eps64)` for the float64 Gram-matrix route.
"""

from __future__ import annotations

import torch

EXACT_METHODS = ("diagonal", "selection")  # values read off the structure, no decomposition


def relative_rank_tolerance(method: str, d_out: int, d_in: int, dtype: torch.dtype) -> float:
    """Singular values up to this times σ_max count as zero, for values from `method`."""
    eps = torch.finfo(dtype).eps
    if method in EXACT_METHODS:
        return eps
    if method == "gram":
        return (max(d_out, d_in) * torch.finfo(torch.float64).eps) ** 0.5
    return max(d_out, d_in) * eps


def rank_tolerance(sigma: torch.Tensor, d_out: int, d_in: int,
                   method: str = "svdvals") -> torch.Tensor:
    """`(N, 1)`: values at or below this are numerically zero."""
    return sigma[:, :1] * relative_rank_tolerance(method, d_out, d_in, sigma.dtype)


def spectral_norm(sigma: torch.Tensor) -> torch.Tensor:
    return sigma[:, 0]


def frobenius(sigma: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(sigma, dim=1)


def nuclear(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.sum(dim=1)


def condition_number(sigma: torch.Tensor, d_out: int, d_in: int,
                     method: str = "svdvals") -> torch.Tensor:
    """σ_max / σ_min over all `min(D_out, D_in)` values; +inf when σ_min is numerically zero."""
    smallest = sigma[:, -1]
    zero = smallest <= rank_tolerance(sigma, d_out, d_in, method)[:, 0]
    ratio = sigma[:, 0] / torch.where(zero, torch.ones_like(smallest), smallest)
    return torch.where(zero, torch.full_like(ratio, float("inf")), ratio)


def log_volume(sigma: torch.Tensor) -> torch.Tensor:
    """Σ log σ_i = ½ log det(JᵀJ) (for D_out ≥ D_in); -inf when some σ_i is 0."""
    return torch.log(sigma).sum(dim=1)


def stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    """‖J‖_F² / ‖J‖₂² (0 for a zero Jacobian)."""
    top = sigma[:, 0].square()
    return torch.where(top > 0, sigma.square().sum(dim=1) / torch.where(top > 0, top, 1), 0)


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """exp(entropy of σ_i / Σσ) (Roy & Vetterli, 2007); 0 for a zero Jacobian."""
    total = sigma.sum(dim=1, keepdim=True)
    p = sigma / torch.where(total > 0, total, 1)
    entropy = -(torch.where(p > 0, p * torch.log(p), 0)).sum(dim=1)
    return torch.where(total[:, 0] > 0, torch.exp(entropy), 0)


def all_quantities(sigma: torch.Tensor, d_out: int, d_in: int,
                   method: str = "svdvals") -> dict[str, torch.Tensor]:
    """Every quantity that needs all singular values (from `method`): name -> `(N,)`."""
    return {
        "spectral_norm": spectral_norm(sigma), "frobenius": frobenius(sigma),
        "nuclear": nuclear(sigma),
        "condition_number": condition_number(sigma, d_out, d_in, method),
        "log_volume": log_volume(sigma), "stable_rank": stable_rank(sigma),
        "effective_rank": effective_rank(sigma),
    }

"""Matrix-free spectra: batched Lanczos for the top singular values, Hutchinson for ‖J‖_F.

Both only apply J and Jᵀ to vectors (one per sample), through the rules' JVPs and VJPs, so a
Jacobian too large to form (a 65536 x 65536 conv layer) still has a spectrum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_CHECK_EVERY = 3
Apply = Callable[[torch.Tensor], torch.Tensor]  # (N, D, b) -> (N, D', b): b vectors per sample


@dataclass
class LanczosResult:
    """values: top-k singular values `(N, k)`; residuals: `‖A y − θ y‖ / θ` per value, for
    A = JᵀJ or JJᵀ and θ = σ²; steps: size of the Krylov basis built."""

    values: torch.Tensor
    residuals: torch.Tensor
    steps: int


def top_singular_values(apply_j: Apply, apply_jt: Apply, *, n: int, d_in: int, d_out: int,
                        k: int, dtype: torch.dtype, device: torch.device, tol: float = 1e-8,
                        max_steps: int | None = None, block: int | None = None,
                        seed: int = 0) -> LanczosResult:
    """The k largest singular values of each sample's J, by block Lanczos on the smaller
    Gram side (J Jᵀ or Jᵀ J).

    apply_j: `(N, D_in, b) -> (N, D_out, b)`; apply_jt: `(N, D_out, b) -> (N, D_in, b)`.
    Other arguments as for `top_eigenvalues`.
    """
    if d_out <= d_in:
        dim, operator = d_out, (lambda u: apply_j(apply_jt(u)))  # J Jᵀ
    else:
        dim, operator = d_in, (lambda v: apply_jt(apply_j(v)))  # Jᵀ J
    result = top_eigenvalues(operator, n=n, dim=dim, k=k, dtype=dtype, device=device, tol=tol,
                             max_steps=max_steps, block=block, seed=seed)
    return LanczosResult(result.values.clamp_min(0).sqrt(), result.residuals, result.steps)


def top_eigenvalues(operator: Apply, *, n: int, dim: int, k: int, dtype: torch.dtype,
                    device: torch.device, which: str = "largest", tol: float = 1e-8,
                    max_steps: int | None = None, block: int | None = None,
                    seed: int = 0) -> LanczosResult:
    """The k extreme eigenvalues of each sample's symmetric operator A, by block Lanczos with
    full re-orthogonalization and Rayleigh–Ritz.

    operator: `(N, dim, b) -> (N, dim, b)`, symmetric per sample.
    which: "largest" (algebraically) or "magnitude" (largest |λ|, for indefinite A).
    tol: stop when every Ritz pair has relative residual `‖A y − θ y‖ / |θ|` below it.
    max_steps: cap on the Krylov basis size (default `min(dim, max(20k + 100, 300))`).
    block: vectors per Krylov step (default `min(max(k, 2), 8)`); a block of b resolves
        eigenvalues of multiplicity up to b, which a single vector cannot.
    Returns the eigenvalues (sorted by `which`, descending) in `values`.
    """
    k = min(k, dim)
    cap = min(dim, max_steps or max(20 * k + 100, 300))
    b = min(block or min(max(k, 2), 8), cap)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(n, dim, b, generator=generator, dtype=dtype).to(device)
    q = torch.linalg.qr(q).Q
    basis = torch.zeros(n, dim, cap, dtype=dtype, device=device)
    images = torch.zeros_like(basis)  # A applied to each basis vector
    m = block_steps = 0
    while True:
        width = min(b, cap - m)
        q = q[:, :, :width]
        basis[:, :, m:m + width] = q
        images[:, :, m:m + width] = operator(q)
        m += width
        block_steps += 1
        # Rayleigh–Ritz costs O(m²·dim): check convergence every few block steps only.
        if m >= cap or (m >= k and block_steps % _CHECK_EVERY == 0):
            values, residuals = _rayleigh_ritz(basis[:, :, :m], images[:, :, :m], k, which)
            if m >= cap or bool((residuals <= tol).all()):
                return LanczosResult(values, residuals, m)
        # Next block: the new directions A q, orthogonalized against the basis (twice).
        w = images[:, :, m - width:m]
        for _ in range(2):
            w = w - basis[:, :, :m] @ (basis[:, :, :m].transpose(1, 2) @ w)
        q, r = torch.linalg.qr(w)
        scale = torch.linalg.matrix_norm(images[:, :, :m], ord="fro")
        if bool((r.diagonal(dim1=1, dim2=2).abs() <= 1e-13 * scale[:, None]).all()):
            # An invariant subspace: the Ritz values are exact.
            values, residuals = _rayleigh_ritz(basis[:, :, :m], images[:, :, :m], k, which)
            return LanczosResult(values, residuals, m)


def ritz_nodes(operator: Apply, *, dim: int, steps: int, dtype: torch.dtype,
               device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature nodes and weights for one random unit start vector:
    the Ritz values of A on the Krylov space, and the squared first components of their
    eigenvectors (weights sum to 1). The spectral density is ≈ Σ_j w_j δ(λ − θ_j)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, dim, 1, generator=generator, dtype=dtype).to(device)
    q = q / torch.linalg.vector_norm(q)
    basis, images = [], []
    for _ in range(min(steps, dim)):
        basis.append(q)
        images.append(operator(q))
        w = images[-1]
        stacked = torch.cat(basis, dim=2)
        for _ in range(2):
            w = w - stacked @ (stacked.transpose(1, 2) @ w)
        norm = torch.linalg.vector_norm(w)
        if norm <= 1e-12 * torch.linalg.vector_norm(images[-1]).clamp_min(1e-300):
            break
        q = w / norm
    v, av = torch.cat(basis, dim=2), torch.cat(images, dim=2)
    t = v.transpose(1, 2) @ av
    theta, s = torch.linalg.eigh((t + t.transpose(1, 2)) / 2)
    return theta[0], s[0, 0, :].square()


def _rayleigh_ritz(basis: torch.Tensor, images: torch.Tensor, k: int, which: str = "largest"):
    """The k extreme eigenpairs of A restricted to span(basis), with relative residuals."""
    t = basis.transpose(1, 2) @ images
    theta, s = torch.linalg.eigh((t + t.transpose(1, 2)) / 2)
    key = theta.abs() if which == "magnitude" else theta
    order = torch.argsort(key, dim=1, descending=True)[:, :k]
    theta = torch.gather(theta, 1, order)
    s = torch.gather(s, 2, order[:, None, :].expand(-1, s.shape[1], -1))
    r = images @ s - (basis @ s) * theta[:, None, :]
    scale = theta.abs().clamp_min(torch.finfo(theta.dtype).tiny)
    return theta, torch.linalg.vector_norm(r, dim=1) / scale


def hutchinson_frobenius(apply_j: Apply, *, n: int, d_in: int, dtype: torch.dtype,
                         device: torch.device, probes: int = 32,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """‖J‖_F per sample estimated from `probes` Rademacher vectors, with its standard error.

    E‖J v‖² = ‖J‖_F² for v with independent ±1 entries. Returns `(estimate, standard error)`,
    each `(N,)`, for ‖J‖_F (the error propagated from ‖J‖_F² by the delta method).
    apply_j: `(N, D_in, b) -> (N, D_out, b)`.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(0, 2, (n, d_in, probes), generator=generator)
    probe_block = (2 * signs - 1).to(device=device, dtype=dtype)
    samples = torch.linalg.vector_norm(apply_j(probe_block), dim=1).square()  # (N, probes)
    mean = samples.mean(dim=1)
    se_square = samples.std(dim=1) / probes**0.5
    estimate = mean.sqrt()
    return estimate, se_square / (2 * estimate.clamp_min(torch.finfo(dtype).tiny))

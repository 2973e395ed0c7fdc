"""Matrix-free extreme eigenvalues by batched block Lanczos: the top-k eigen- or singular
values of one operator per sample, each with its residual and a `converged` flag, and Lanczos
quadrature nodes for spectral densities.

Only products of the operator with blocks of vectors are needed (JVPs/VJPs, Hessian-vector
products), so an operator too large to form (a 65536 x 65536 conv layer) still has a spectrum.

Residual convention: `‖A y − θ y‖ / ‖A‖` for a unit Ritz vector y, with ‖A‖ estimated by the
largest |Ritz value| of the sample. By Bauer–Fike, A has an eigenvalue within
`residual · ‖A‖` of θ, so a converged value is right to `tolerance` relative to the largest
one; a zero eigenvalue has a finite (zero) residual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .draws import SampleDraws
from .threads import decomposition_threads
from .trace import hutchinson_frobenius, hutchinson_trace

__all__ = ["DEFAULT_MAX_STEPS_HELP", "TOLERANCE_EPS_FACTOR", "LanczosResult", "default_max_steps",
           "effective_tolerance", "hutchinson_frobenius", "hutchinson_trace", "ritz_nodes",
           "top_eigenvalues", "top_singular_values"]

Apply = Callable[[torch.Tensor], torch.Tensor]  # (N, D, b) -> (N, D', b): b vectors per sample

# c in the effective tolerance max(tol, c·eps): a residual computed in floating point cannot
# fall below the rounding of the operator product itself and of the m-term sums `A V s`, `V s`
# (≈ eps·‖A‖·(γ + √m), γ the operator's rounding growth). Measured in float32 at the floor:
# ≈ 7·eps for D = 10³, 14·eps for D = 10⁴, 140·eps for D = 65536 (a product summing over D).
# 256·eps (float32: 3.1e-5, float64: 5.7e-14) keeps such runs from stalling below what they can
# reach, while still telling a float32 value right to about 1e-5 of ‖A‖.
TOLERANCE_EPS_FACTOR = 256
DEFAULT_MAX_STEPS_HELP = "min(D, max(20k + 100, 300)) Krylov vectors"
_WHICH = ("largest", "magnitude")


def default_max_steps(k: int, dim: int) -> int:
    """The default cap on the Krylov basis size (vectors, not blocks) for k values of a
    `dim x dim` operator: `min(dim, max(20k + 100, 300))`."""
    return min(dim, max(20 * k + 100, 300))


def effective_tolerance(tol: float, dtype: torch.dtype) -> float:
    """The residual a run can actually reach: `max(tol, TOLERANCE_EPS_FACTOR · eps(dtype))`."""
    return max(tol, TOLERANCE_EPS_FACTOR * torch.finfo(dtype).eps)


@dataclass
class LanczosResult:
    """values: `(N, k)`, descending (by |λ| for which="magnitude"); residuals: `(N, k)`,
    `‖A y − θ y‖ / ‖A‖` per value (module docstring; for singular values, of the Gram
    operator A = JᵀJ or JJᵀ with θ = σ²); converged: `(N, k)` bool, residual ≤ tolerance and
    not ranked below a value repeated `block` times (whose multiplicity a block that size
    cannot resolve); tolerance: the effective tolerance used; steps: the largest Krylov
    basis built (vectors)."""

    values: torch.Tensor
    residuals: torch.Tensor
    steps: int
    converged: torch.Tensor
    tolerance: float


def top_singular_values(apply_j: Apply, apply_jt: Apply, *, n: int, d_in: int, d_out: int,
                        k: int, dtype: torch.dtype, device: torch.device, tol: float = 1e-8,
                        max_steps: int | None = None, block: int | None = None,
                        seed: int = 0, indices: Sequence[int] | None = None) -> LanczosResult:
    """The k largest singular values of each sample's J, by block Lanczos on the smaller
    Gram side (J Jᵀ or Jᵀ J).

    apply_j: `(N, D_in, b) -> (N, D_out, b)`; apply_jt: `(N, D_out, b) -> (N, D_in, b)`.
    Other arguments as for `top_eigenvalues`. A converged σ satisfies
    `|σ² − σ_true²| ≤ tolerance · σ_1²`.
    """
    if d_out <= d_in:
        dim, operator = d_out, (lambda u: apply_j(apply_jt(u)))  # J Jᵀ
    else:
        dim, operator = d_in, (lambda v: apply_jt(apply_j(v)))  # Jᵀ J
    result = top_eigenvalues(operator, n=n, dim=dim, k=k, dtype=dtype, device=device, tol=tol,
                             max_steps=max_steps, block=block, seed=seed, indices=indices)
    result.values = result.values.clamp_min(0).sqrt()
    return result


def top_eigenvalues(operator: Apply, *, n: int, dim: int, k: int, dtype: torch.dtype,
                    device: torch.device, which: str = "largest", tol: float = 1e-8,
                    max_steps: int | None = None, block: int | None = None,
                    seed: int = 0, indices: Sequence[int] | None = None) -> LanczosResult:
    """The k extreme eigenvalues of each sample's symmetric operator A, by block Lanczos with
    full re-orthogonalization, per-sample deflation and Rayleigh–Ritz.

    operator: `(N, dim, b) -> (N, dim, b)`, symmetric per sample.
    which: "largest" (algebraically) or "magnitude" (largest |λ|, for indefinite A).
    tol: a sample is finished when all its k residuals are ≤ `effective_tolerance(tol)`;
        the others go on until they are too or the basis reaches `max_steps`.
    max_steps: cap on the Krylov basis size (default `default_max_steps(k, dim)`).
    block: vectors per Krylov step (default `min(max(k, 2), 8)`); a block of b resolves
        eigenvalues of multiplicity up to b, which a single vector cannot.
    seed, indices: each sample's start block comes from `seed` and its index in the data
        (`indices`, default 0..N-1), not from its place in the batch (`SampleDraws`).
    """
    if which not in _WHICH:
        raise UsageError(f"which must be one of {', '.join(_WHICH)}, not {which!r}")
    k = min(k, dim)
    cap = min(dim, max(max_steps or default_max_steps(k, dim), k))
    b = min(block or min(max(k, 2), 8), cap)
    tolerance = effective_tolerance(tol, dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Stored vector-major, (N, cap, dim), and used through a transposed view (N, dim, cap):
    # the first m vectors are then one contiguous block, which BLAS takes without a copy.
    basis = torch.zeros(n, cap, dim, dtype=dtype, device=device).transpose(1, 2)
    images = torch.zeros(n, cap, dim, dtype=dtype, device=device).transpose(1, 2)
    projected = torch.zeros(n, cap, cap, dtype=dtype, device=device)  # basisᵀ A basis
    norm_bound = torch.zeros(n, dtype=dtype, device=device)  # max ‖A q‖ so far, ≤ ‖A‖
    found = _Found(n, k, dtype, device)
    q = torch.linalg.qr(SampleDraws(n, seed, indices).normal(dim, b, dtype, device)).Q
    m = checked = 0
    while True:
        width = q.shape[2]
        image = operator(q).detach()  # the values are numbers, not part of a graph
        basis[:, :, m:m + width], images[:, :, m:m + width] = q, image
        # The projected matrix grows by the new block's columns only: O(m·b·dim).
        columns = basis[:, :, :m + width].transpose(1, 2) @ image
        corner = columns[:, m:]
        columns[:, m:] = (corner + corner.transpose(1, 2)) / 2
        projected[:, :m + width, m:m + width] = columns
        projected[:, m:m + width, :m] = columns[:, :m].transpose(1, 2)
        norm_bound = torch.maximum(norm_bound, torch.linalg.vector_norm(image, dim=1).amax(1))
        m += width
        if m >= cap or (m >= k and m - checked >= max(b, m // 10)):
            checked = m
            found.update(basis, images, projected, m, which, tolerance, b, final=m >= cap)
            if bool(found.done.all()):
                return LanczosResult(found.values, found.residuals, m, found.converged,
                                     tolerance)
        q = _next_block(image[:, :, :min(b, cap - m)], basis, m, tolerance * norm_bound,
                        generator)


class _Found:
    """Per-sample results, frozen when a sample finishes (all k residuals ≤ tolerance, or a
    non-finite product: NaN values with infinite residuals)."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device):
        self.k = k
        self.values = torch.zeros(n, k, dtype=dtype, device=device)
        self.residuals = torch.full((n, k), torch.inf, dtype=dtype, device=device)
        self.converged = torch.zeros(n, k, dtype=torch.bool, device=device)
        self.done = torch.zeros(n, dtype=torch.bool, device=device)

    def update(self, basis, images, projected, m, which, tolerance, block, final):
        broken = ~self.done & ~torch.isfinite(projected[:, :m, :m]).all(dim=(1, 2))
        self.values[broken], self.done[broken] = torch.nan, True
        active = (~self.done).nonzero()[:, 0]
        if len(active) == 0:
            return
        everyone = len(active) == len(self.done)
        pick = (lambda t: t) if everyone else (lambda t: t[active])
        values, residuals, suspect = _rayleigh_ritz(
            pick(basis[:, :, :m]), pick(images[:, :, :m]), pick(projected[:, :m, :m]),
            self.k, which, tolerance, block)
        small = residuals <= tolerance
        finished = small.all(1) | final
        rows = active[finished]
        self.values[rows] = values[finished]
        self.residuals[rows] = residuals[finished]
        self.converged[rows] = (small & ~suspect)[finished]
        self.done[rows] = True


def _rayleigh_ritz(basis, images, projected, k, which, tolerance, block):
    """The k extreme Ritz values `(N, k)`, their residuals `‖A y − θ y‖ / ‖A‖` `(N, k)` and
    which of them rank below a Ritz value repeated `block` times or more `(N, k)` bool."""
    with decomposition_threads(projected):  # in float64: the Ritz values are only numbers
        theta, s = torch.linalg.eigh(projected.double())  # (N, m) ascending, (N, m, m)
    theta, s = theta.to(projected.dtype), s.to(projected.dtype)
    key = theta.abs() if which == "magnitude" else theta
    order = torch.argsort(key, dim=1, descending=True)[:, :k]
    top = torch.gather(theta, 1, order)
    s = torch.gather(s, 2, order[:, None, :].expand(-1, s.shape[1], -1))
    scale = theta.abs().amax(1).clamp_min(torch.finfo(theta.dtype).tiny)  # ≈ ‖A‖
    r = images @ s - (basis @ s) * top[:, None, :]
    residuals = torch.linalg.vector_norm(r, dim=1) / scale[:, None]
    # A value met `block` times may occur more often than a block that size can reveal: the
    # values ranked below it may belong to it, so they cannot be trusted.
    close = 2 * tolerance * scale[:, None, None]
    copies = ((top[:, :, None] - theta[:, None, :]).abs() <= close).sum(2)  # (N, k)
    top_key = torch.gather(key, 1, order)
    saturated = torch.where(copies >= block, top_key, -torch.inf).amax(1, keepdim=True)
    suspect = top_key < saturated - close[:, :, 0]
    return top, residuals, suspect


def _next_block(image: torch.Tensor, basis: torch.Tensor, m: int, threshold: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """The next orthonormal block `(N, dim, w)` from `image` `(N, dim, w)`: orthogonalized
    against the basis so far, `basis[:, :, :m]`, and within itself (classical Gram–Schmidt,
    twice), written to `basis[:, :, m:m + w]`. A column whose norm falls to `threshold` `(N,)`
    or below is dropped for that sample only and replaced by a random unit vector orthogonal
    to everything so far."""
    old = basis[:, :, :m]
    w = image
    for _ in range(2):
        w = w - old @ (old.transpose(1, 2) @ w)
    cancelled = False
    for j in range(w.shape[2]):
        v, before = w[:, :, j], torch.linalg.vector_norm(w[:, :, j], dim=1)
        for _ in range(2 if j else 0):
            new = basis[:, :, m:m + j]
            v = v - (new @ (new.transpose(1, 2) @ v[:, :, None]))[:, :, 0]
        norm = torch.linalg.vector_norm(v, dim=1)
        deflated = norm <= threshold
        cancelled |= bool((~deflated & (norm < before / 16)).any())
        v = v / norm.clamp_min(torch.finfo(v.dtype).tiny)[:, None]
        if bool(deflated.any()):
            fresh = _random(v.shape[0], v.shape[1], 1, generator, v.dtype, v.device)[:, :, 0]
            fresh = _orthogonalize(fresh, basis[:, :, :m + j])
            fresh = fresh / torch.linalg.vector_norm(fresh, dim=1, keepdim=True)
            v = torch.where(deflated[:, None], fresh, v)
        basis[:, :, m + j] = v
    block = basis[:, :, m:m + w.shape[2]]
    if cancelled:
        # A column that shrank f-fold within the block keeps f·eps along the old basis; past
        # f = 16 (float32: 2e-6, under the tolerance floor), one more pass and re-normalize.
        block = block - old @ (old.transpose(1, 2) @ block)
        for j in range(block.shape[2]):
            v = block[:, :, j] - (block[:, :, :j] @ (block[:, :, :j].transpose(1, 2)
                                                      @ block[:, :, j, None]))[:, :, 0]
            block[:, :, j] = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        basis[:, :, m:m + w.shape[2]] = block
    return block.clone()


def _orthogonalize(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """`v` `(N, dim)` minus its projection on `basis` `(N, dim, p)`, twice."""
    for _ in range(2):
        v = v - (basis @ (basis.transpose(1, 2) @ v[:, :, None]))[:, :, 0]
    return v


def _random(n, dim, b, generator, dtype, device) -> torch.Tensor:
    return torch.randn(n, dim, b, generator=generator, dtype=dtype).to(device)


def ritz_nodes(operator: Apply, *, dim: int, steps: int, dtype: torch.dtype,
               device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature nodes and weights for one random unit start vector:
    the Ritz values of A on the Krylov space, and the squared first components of their
    eigenvectors (weights sum to 1). The spectral density is ≈ Σ_j w_j δ(λ − θ_j).

    operator: `(1, dim, 1) -> (1, dim, 1)`. Stops early, exactly, on an invariant subspace.
    A non-finite product gives one NaN node of weight 1.
    """
    steps = min(steps, dim)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = _random(1, dim, 1, generator, dtype, device)[:, :, 0]
    q = q / torch.linalg.vector_norm(q)
    basis = torch.zeros(1, dim, steps, dtype=dtype, device=device)
    projected = torch.zeros(1, steps, steps, dtype=dtype, device=device)
    floor = TOLERANCE_EPS_FACTOR * torch.finfo(dtype).eps
    norm_bound = 0.0
    m = 0
    while m < steps:
        basis[:, :, m] = q
        image = operator(q[:, :, None])[:, :, 0].detach()
        column = (basis[:, :, :m + 1].transpose(1, 2) @ image[:, :, None])[:, :, 0]
        projected[:, :m + 1, m], projected[:, m, :m] = column, column[:, :m]
        m += 1
        norm_bound = max(norm_bound, float(torch.linalg.vector_norm(image)))
        w = _orthogonalize(image, basis[:, :, :m])
        norm = float(torch.linalg.vector_norm(w))
        if not norm > floor * norm_bound:  # also stops on NaN
            break
        q = w / norm
    if not bool(torch.isfinite(projected[:, :m, :m]).all()):
        return (torch.full((1,), torch.nan, dtype=dtype, device=device),
                torch.ones(1, dtype=dtype, device=device))
    theta, s = torch.linalg.eigh(projected[:, :m, :m])
    return theta[0], s[0, 0, :].square()

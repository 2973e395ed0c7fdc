"""Stochastic trace estimates with standard errors: Hutchinson and Hutch++ (Meyer, Musco,
Musco & Woodruff 2021), for ‖J‖_F² = tr(JᵀJ) and for the trace of a symmetric operator.

Hutch++ spends a third of the products on a sketch Q of the dominant range, takes the trace
on span(Q) exactly and runs Hutchinson only on the deflated rest `(I − QQᵀ) A (I − QQᵀ)`.
It is unbiased for any Q, and much more accurate when the spectrum decays; its standard error
is that of the Hutchinson part (the exact part has none, given Q).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import UsageError
from .draws import SampleDraws

Apply = Callable[[torch.Tensor], torch.Tensor]  # (N, D, b) -> (N, D', b): b vectors per sample


def hutchinson_frobenius(apply_j: Apply, *, n: int, d_in: int, dtype: torch.dtype,
                         device: torch.device, probes: int = 32, seed: int = 0,
                         apply_jt: Apply | None = None, indices: Sequence[int] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """‖J‖_F per sample and its standard error, each `(N,)`, from `probes` products with J.

    apply_j: `(N, D_in, b) -> (N, D_out, b)`. Without apply_jt: plain Hutchinson,
    E‖J v‖² = ‖J‖_F² for v with independent ±1 entries. With apply_jt
    (`(N, D_out, b) -> (N, D_in, b)`, used `probes // 3` times): Hutch++ on JᵀJ. The error
    of ‖J‖_F is propagated from that of ‖J‖_F² by the delta method. Each sample's probes
    come from `seed` and its index in the data (`indices`, default 0..N-1): `SampleDraws`.
    """
    sketch = _sketch_size(probes) if apply_jt is not None else 0
    draws = SampleDraws(n, seed, indices)
    exact = torch.zeros(n, dtype=dtype, device=device)
    basis = None
    if sketch:
        gram_image = apply_jt(apply_j(draws.signs(d_in, sketch, dtype, device)))
        basis = torch.linalg.qr(gram_image).Q  # (N, D_in, s), orthonormal
        exact = torch.linalg.vector_norm(apply_j(basis), dim=(1, 2)).square()
    probe_block = _deflated(draws.signs(d_in, probes - 2 * sketch, dtype, device),
                            basis)
    samples = torch.linalg.vector_norm(apply_j(probe_block), dim=1).square()  # (N, probes)
    square, square_se = exact + samples.mean(dim=1), samples.std(dim=1) / samples.shape[1]**0.5
    estimate = square.sqrt()
    return estimate, square_se / (2 * estimate.clamp_min(torch.finfo(dtype).tiny))


def hutchinson_trace(operator: Apply, *, n: int, dim: int, dtype: torch.dtype,
                     device: torch.device, probes: int = 32, seed: int = 0,
                     method: str = "hutch++", indices: Sequence[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """tr(A) per sample and its standard error, each `(N,)`, from `probes` products with A.

    operator: `(N, dim, b) -> (N, dim, b)`, symmetric per sample. method: "hutchinson"
    (E vᵀ A v = tr A for v with independent ±1 entries) or "hutch++" (falls back to
    Hutchinson below 4 probes, where it leaves fewer than 2 for the error estimate).
    indices: each sample's index in the data, which with `seed` draws its probes
    (`SampleDraws`; default 0..N-1).
    """
    if method not in ("hutch++", "hutchinson"):
        raise UsageError(f"trace method must be hutch++ or hutchinson, not {method!r}")
    sketch = _sketch_size(probes) if method == "hutch++" else 0
    draws = SampleDraws(n, seed, indices)
    exact = torch.zeros(n, dtype=dtype, device=device)
    basis = None
    if sketch:
        basis = torch.linalg.qr(operator(draws.signs(dim, sketch, dtype, device))).Q
        exact = (basis * operator(basis)).sum(dim=(1, 2))
    v = _deflated(draws.signs(dim, probes - 2 * sketch, dtype, device), basis)
    samples = (v * operator(v)).sum(dim=1)  # (N, probes): vᵀ A v
    return exact + samples.mean(dim=1), samples.std(dim=1) / samples.shape[1]**0.5


def _sketch_size(probes: int) -> int:
    """Hutch++'s sketch width s: 2s products build the exact part, at least 2 are left."""
    return max(min(probes // 3, (probes - 2) // 2), 0)


def _deflated(block: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """`(I − Q Qᵀ) block` for the orthonormal `basis` Q `(N, dim, s)`, or `block` itself."""
    if basis is None:
        return block
    return block - basis @ (basis.transpose(1, 2) @ block)

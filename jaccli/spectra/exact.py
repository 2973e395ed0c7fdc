"""All singular values of structured per-sample Jacobians, exploiting their structure.

    shared            svdvals of the one matrix, once for all samples
    (shared-)diagonal |d| sorted — no decomposition
    selection         √(how many outputs copy each input) — no decomposition
    row-scaled        eigvalsh of the smaller-side Gram matrix (W Wᵀ precomputed once), in
                      float64: squaring the condition number costs accuracy only for
                      σ_i < σ_max·1e-7 or so (relative error ~ 1e-16·(σ_max/σ_i)²)
    dense             batched svdvals on the device
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.structures import Diagonal, RowScaled, Selection, Structured
from .threads import decomposition_threads

GRAM_NOTE = ("Gram matrix (float64): σ_i below σ_max·1e-7 lose relative accuracy "
             "(~1e-16·(σ_max/σ_i)²); pass --exact for svdvals of the dense matrices")


@dataclass
class Spectrum:
    """Singular values per sample, sorted descending: `values (N, r)`.

    complete: all `min(D_out, D_in)` values (else the top `r` only).
    residuals: `(N, r)` relative eigen-residuals of iterative methods, else None;
    converged: `(N, r)` bool, whether each of those met `tolerance` (else None).
    """

    values: torch.Tensor
    complete: bool
    method: str
    note: str = ""
    residuals: torch.Tensor | None = None
    converged: torch.Tensor | None = None
    tolerance: float | None = None


def _desc(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, dim=1, descending=True).values


def _pad(values: torch.Tensor, r: int) -> torch.Tensor:
    """Keep the top `r` values, padding with zeros (structural zero singular values)."""
    if values.shape[1] >= r:
        return values[:, :r]
    return torch.cat([values, values.new_zeros(values.shape[0], r - values.shape[1])], dim=1)


def exact_spectrum(jac: Structured, n: int, *, exact: bool = False,
                   cache: dict | None = None, key: str = "") -> Spectrum:
    """All singular values of each sample's Jacobian (n samples).

    exact: use svdvals on dense matrices instead of Gram matrices for row-scaled Jacobians.
    cache: where shared decompositions are kept across batches, under `key`.
    A sample whose Jacobian holds NaN or Inf (NaN weights, overflow) gets NaN singular values
    and a note; the other samples are decomposed as usual.
    """
    r = min(jac.d_out, jac.d_in)
    cache = {} if cache is None else cache
    if isinstance(jac, Diagonal):
        values = _desc(jac.diag.abs())
        return _flag(Spectrum(values.expand(n, -1) if jac.shared else values, True,
                              "diagonal"))
    if isinstance(jac, Selection):
        counts = torch.zeros(jac.batch, jac.n_in, dtype=jac.dtype, device=jac.index.device)
        counts.scatter_add_(1, jac.index, torch.ones_like(jac.index, dtype=jac.dtype))
        return Spectrum(_pad(_desc(counts.sqrt()), r), True, "selection")
    if hasattr(jac, "singular_values"):  # identity, gather, Kronecker: from the structure
        if not jac.shared:
            return _flag(Spectrum(_pad(jac.singular_values(), r), True, jac.tag))
        if key not in cache:
            cache[key] = _pad(jac.singular_values(), r)
        return _flag(Spectrum(cache[key].expand(n, -1), True, jac.tag))
    if getattr(jac, "shared", False):  # one matrix (or a map known by how it acts)
        if key not in cache:
            matrix = jac.dense()
            with decomposition_threads(matrix):
                cache[key] = _finite_only(torch.linalg.svdvals, matrix, r)
        return _flag(Spectrum(cache[key].expand(n, -1), True, "svd-shared"))
    if isinstance(jac, RowScaled) and not exact:
        return _flag(_row_scaled_gram(jac, r, cache, key))
    return _flag(Spectrum(_finite_only(torch.linalg.svdvals, jac.dense(n), r), True,
                          "svdvals"))


def _finite_only(decompose, matrices: torch.Tensor, r: int) -> torch.Tensor:
    """`decompose(matrices)` `(N, r)` for the samples whose matrix is finite; NaN rows for
    the others (a LAPACK routine would fail on them, or return garbage)."""
    finite = torch.isfinite(matrices.reshape(matrices.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return decompose(matrices)
    out = torch.full((matrices.shape[0], r), float("nan"), dtype=matrices.dtype,
                     device=matrices.device)
    if bool(finite.any()):
        out[finite] = decompose(matrices[finite])[:, :r]
    return out


def _flag(spectrum: Spectrum) -> Spectrum:
    bad = int((~torch.isfinite(spectrum.values).all(dim=1)).sum())
    if bad:
        spectrum.note = "; ".join(filter(None, [spectrum.note, (
            f"{bad} sample(s) have a non-finite Jacobian (NaN or Inf weights, inputs or "
            "overflow): their singular values are NaN")]))
    return spectrum


def _row_scaled_gram(jac: RowScaled, r: int, cache: dict, key: str) -> Spectrum:
    w = jac.matrix[0].double()
    s = jac.scale.double()
    if jac.d_out <= jac.d_in:
        gram_key = key + "/gram"
        if gram_key not in cache:
            cache[gram_key] = w @ w.T  # (D_out, D_out), once
        gram = s[:, :, None] * cache[gram_key][None] * s[:, None, :]
    else:
        scaled = s[:, :, None] * w[None]  # (N, D_out, D_in)
        gram = scaled.transpose(1, 2) @ scaled
    eig = _finite_only(torch.linalg.eigvalsh, gram, gram.shape[1])
    values = _desc(eig.clamp_min(0).sqrt()).to(jac.scale.dtype)
    return Spectrum(_pad(values, r), True, "gram", GRAM_NOTE)

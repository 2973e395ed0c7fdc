"""Choose, per Jacobian, how its spectrum is computed — before anything runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .conv_fft import fft_applicable

DEFAULT_TOP_K = 10
# Above this many multiply-adds (`min(D_out, D_in)² · max(D_out, D_in)`, ~1260³), one shared
# SVD is left to the matrix-free path, run once for all samples: a full SVD of a 4096 x 6400
# convolution takes minutes on a 2-core CPU, its top-10 by Lanczos a few seconds.
MAX_SHARED_SVD_COST = 2e9
# With --top-k, a shared map costing more than this for a full SVD gets its top-k by Lanczos.
MIN_SHARED_TOP_K_COST = 1e8
# Structures whose singular values come from the structure itself (no decomposition, or
# small factors' decompositions).
READ_OFF = ("diagonal", "shared-diagonal", "selection", "identity", "gather", "shared-gather")
FACTORED = ("kronecker", "shared-kronecker")
SHARED_MAPS = ("shared", "shared-operator")


@dataclass
class SpectrumEntry:
    """How one Jacobian's spectrum is obtained.

    method: "fft" (exact, circular convolutions), "structured" (exact, from the Jacobian's
        structure), or "lanczos" (matrix-free top-k with a Hutchinson Frobenius estimate).
    k: how many singular values are reported (`min(D_out, D_in)` when complete).
    reason: why this method was chosen. module: the one module the Jacobian belongs to, when
    it is a single module; input_shape: its per-sample input shape.
    """

    name: str
    kind: str
    type_name: str
    d_in: int
    d_out: int
    structure: str
    method: str
    k: int
    reason: str
    module: nn.Module | None = None
    input_shape: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        return self.method != "lanczos" and self.k == min(self.d_in, self.d_out)

    @property
    def shared(self) -> bool:
        """The Jacobian is the same matrix for every sample: its spectrum is computed once."""
        return self.structure in SHARED_MAPS


def plan_spectra(entries: Sequence[Any], *, itemsize: int, budget: int, top_k: int | None,
                 exact: bool) -> list[SpectrumEntry]:
    """One SpectrumEntry per planned Jacobian (anything with name, kind, type_name, d_in,
    d_out, structure, module, input_shape): the method that computes its spectrum for one
    sample within `budget` bytes. The batch size is chosen afterwards so that a batch of the
    chosen methods fits."""
    out = []
    for e in entries:
        r = min(e.d_in, e.d_out)
        method, reason = _choose(e, itemsize, budget, top_k, exact)
        k = r if method != "lanczos" else min(top_k or DEFAULT_TOP_K, r)
        if top_k is not None and method != "lanczos":
            k = min(top_k, r)
        out.append(SpectrumEntry(e.name, e.kind, e.type_name, e.d_in, e.d_out, e.structure,
                                 method, k, reason, e.module, tuple(e.input_shape)))
    return out


def _choose(entry, itemsize: int, budget: int, top_k: int | None, exact: bool):
    d_in, d_out, structure = entry.d_in, entry.d_out, entry.structure
    r, big = min(d_in, d_out), max(d_in, d_out)
    if entry.module is not None and fft_applicable(entry.module, tuple(entry.input_shape)):
        return "fft", "circular convolution: all singular values by FFT (Sedghi et al.)"
    if structure in READ_OFF:
        return "structured", f"{structure}: singular values without a decomposition"
    if structure in FACTORED:
        return "structured", f"{structure}: singular values of the small factors"
    if structure in SHARED_MAPS:
        cost = r * r * big
        fits = 3 * d_in * d_out * itemsize <= budget and cost <= MAX_SHARED_SVD_COST
        few = top_k is not None and top_k < r / 4 and not exact and cost > MIN_SHARED_TOP_K_COST
        if fits and few:
            return "lanczos", (f"--top-k {top_k} of a shared map: matrix-free Lanczos, once for "
                               "all samples (cheaper than its full SVD)")
        if fits:
            return "structured", "one shared matrix: one SVD for all samples"
        why = ("too large to decompose within the memory budget"
               if 3 * d_in * d_out * itemsize > budget else "too large for one full SVD")
        return "lanczos", (f"shared {'operator' if structure == 'shared-operator' else 'matrix'}"
                           f" {why}: matrix-free Lanczos, once for all samples")
    wants_top_k = top_k is not None and top_k < r / 4 and not exact
    if wants_top_k:
        return "lanczos", f"--top-k {top_k}: matrix-free Lanczos"
    per_sample = (r * r if structure == "row-scaled" and not exact else d_in * d_out)
    if 3 * per_sample * itemsize <= budget:
        return "structured", ("row-scaled: Gram matrix of the smaller side"
                              if structure == "row-scaled" and not exact
                              else "batched svdvals")
    return "lanczos", "per-sample matrices too large for the memory budget: matrix-free"

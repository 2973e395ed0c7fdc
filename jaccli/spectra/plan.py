"""Choose, per Jacobian, how its spectrum is computed — before anything runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..engine.engine import JacobianEngine
from ..tracing.layers import Layer
from .conv_fft import fft_applicable

DEFAULT_TOP_K = 10
# Above this many multiply-adds, one shared SVD is left to the matrix-free path.
MAX_SHARED_SVD_COST = 2e11


@dataclass
class SpectrumEntry:
    """How one Jacobian's spectrum is obtained.

    method: "fft" (exact, circular convolutions), "structured" (exact, from the Jacobian's
        structure), or "lanczos" (matrix-free top-k with a Hutchinson Frobenius estimate).
    k: how many singular values are reported (`min(D_out, D_in)` when complete).
    reason: why this method was chosen.
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
    layer: Layer | None = None

    @property
    def complete(self) -> bool:
        return self.method != "lanczos" and self.k == min(self.d_in, self.d_out)


def plan_spectra(engine: JacobianEngine, *, itemsize: int, budget: int, top_k: int | None,
                 exact: bool) -> list[SpectrumEntry]:
    """One SpectrumEntry per layer of `engine` (and the end-to-end Jacobian): the method
    that computes its spectrum for one sample within `budget` bytes. The batch size is chosen
    afterwards so that a batch of the chosen methods fits."""
    entries = []
    targets: list[tuple[Layer | None, str]] = [(layer, engine.structure(layer))
                                               for layer in engine.layers]
    if engine.end_to_end:
        targets.append((None, engine.end_to_end_structure))
    for layer, structure in targets:
        if layer is None:
            d_in = math.prod(engine.trace.input_shape)
            d_out = math.prod(engine.trace.output_shape)
            name, kind, type_name = "(end-to-end)", "end_to_end", "model"
        else:
            d_in, d_out, name, kind, type_name = (layer.d_in, layer.d_out, layer.name, "layer",
                                                  layer.type_name)
        r = min(d_in, d_out)
        method, reason = _choose(layer, structure, d_in, d_out, itemsize, budget, top_k, exact)
        k = r if method != "lanczos" else min(top_k or DEFAULT_TOP_K, r)
        if top_k is not None and method != "lanczos":
            k = min(top_k, r)
        entries.append(SpectrumEntry(name, kind, type_name, d_in, d_out, structure, method, k,
                                     reason, layer))
    return entries


def _choose(layer, structure, d_in, d_out, itemsize, budget, top_k, exact):
    r, big = min(d_in, d_out), max(d_in, d_out)
    if layer is not None and len(layer.modules) == 1 and fft_applicable(layer.modules[0],
                                                                        layer.input_shape):
        return "fft", "circular convolution: all singular values by FFT (Sedghi et al.)"
    if structure in ("diagonal", "shared-diagonal", "selection"):
        return "structured", f"{structure}: singular values without a decomposition"
    if structure == "shared":
        fits = 3 * d_in * d_out * itemsize <= budget and r * r * big <= MAX_SHARED_SVD_COST
        if fits:
            return "structured", "shared: one SVD for all samples"
        return "lanczos", "shared matrix too large to decompose within the memory budget"
    wants_top_k = top_k is not None and top_k < r / 4 and not exact
    if wants_top_k:
        return "lanczos", f"--top-k {top_k}: matrix-free Lanczos"
    per_sample = (r * r if structure == "row-scaled" and not exact else d_in * d_out)
    if 3 * per_sample * itemsize <= budget:
        return "structured", ("row-scaled: Gram matrix of the smaller side"
                              if structure == "row-scaled" and not exact
                              else "batched svdvals")
    return "lanczos", "per-sample matrices too large for the memory budget: matrix-free"

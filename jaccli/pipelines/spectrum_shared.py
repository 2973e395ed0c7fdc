"""The spectrum of a Jacobian that is one shared operator for every sample (a convolution
too large to SVD): its top-k by matrix-free block Lanczos, once for the run, and its
Frobenius norm — exact where the operator knows it, else a Hutch++ estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..spectra.exact import Spectrum
from ..spectra.plan import SpectrumEntry
from ..spectra.shared import shared_top_singular_values
from .engines import GraphRun

if TYPE_CHECKING:
    from .spectrum import SpectrumRun


def shared_lanczos(entry: SpectrumEntry, run: SpectrumRun, x, held, cache
                   ) -> tuple[Spectrum, dict[str, torch.Tensor]]:
    """The top-k of a Jacobian that is the same for every sample: matrix-free Lanczos on the
    operator at the batch's first sample, once for the run (kept in `cache`), every sample
    given the same values. ‖J‖_F is exact where the operator knows it (`_exact_frobenius`),
    else a Hutch++ estimate with its standard error."""
    n, settings = x.shape[0], run.settings
    if entry.name not in cache:
        first = tuple(h[:1] for h in held)
        apply_j, apply_jt = run.engine.operator(entry.name, x[:1], first)
        cache[entry.name] = shared_top_singular_values(
            apply_j, apply_jt, d_in=entry.d_in, d_out=entry.d_out, k=entry.k, dtype=x.dtype,
            device=x.device, tol=settings.tol, max_steps=settings.max_steps,
            probes=settings.probes, frobenius=_exact_frobenius(run, entry, x[:1], first))
    result, frob, frob_se = cache[entry.name]
    top = result.values.expand(n, -1)
    how = ("exact (from the weights, J not formed)" if frob_se is None else
           f"estimated by Hutch++ from {settings.probes} probes (frobenius_se)")
    spectrum = Spectrum(top, False, "lanczos",
                        f"top-{entry.k} of the shared operator (the same for every sample) by "
                        f"matrix-free block Lanczos, once ({result.steps} Krylov vectors, "
                        f"residual tolerance {result.tolerance:.1e}); Frobenius norm {how}",
                        result.residuals.expand(n, -1), result.converged.expand(n, -1),
                        result.tolerance)
    quantities = {"spectral_norm": top[:, 0], "frobenius": frob.expand(n),
                  "stable_rank": (frob.square() / result.values[:, 0].square()
                                  .clamp_min(1e-300)).expand(n)}
    if frob_se is not None:
        quantities["frobenius_se"] = frob_se.expand(n)
    return spectrum, quantities


def _exact_frobenius(run: SpectrumRun, entry: SpectrumEntry, x, held) -> torch.Tensor | None:
    """‖J‖_F `(1,)` where the shared operator knows it without being formed
    (`Operator.exact_frobenius`: one convolution from its weight, or a convolution scaled
    per output by an eval BatchNorm); None for any other shared map (pooling, chains of
    convolutions, sums of branches, the hook engine's matrices): those keep the estimate."""
    engine = run.engine
    if not isinstance(engine, GraphRun):
        return None
    exact = getattr(engine.compute(x, names={entry.name}, held=held).get(entry.name),
                    "exact_frobenius", None)
    return None if exact is None else exact().to(x.dtype).reshape(1)

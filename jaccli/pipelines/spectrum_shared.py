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
    # Asked only of a layer whose plan is one convolution (identities and shared diagonals
    # around it): computing any other shared map would form it, which is what Lanczos avoids.
    if not isinstance(engine, GraphRun) or not _one_convolution(engine.engine, entry.name):
        return None
    exact = getattr(engine.compute(x, names={entry.name}, held=held).get(entry.name),
                    "exact_frobenius", None)
    return None if exact is None else exact().to(x.dtype).reshape(1)


def _one_convolution(graph_engine, name: str) -> bool:
    """Whether layer `name` is one convolution op with nothing but identities (views,
    reshapes) and shared diagonals (eval BatchNorm) around it: its Jacobian is that op's
    operator, unformed, its rows scaled."""
    layer = next((layer for layer in graph_engine.layers if layer.name == name), None)
    if layer is None:
        return False
    plans = [p for u in layer.paths.units for p in graph_engine.units[u].plans.values()]
    convolutions = [p for p in plans if p.mode == "rule" and "convolution" in p.rules]
    return len(convolutions) == 1 and all(
        p is convolutions[0] or p.tag in ("identity", "shared-diagonal") for p in plans)

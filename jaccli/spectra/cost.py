"""What a spectrum costs before it runs: this machine's rates, measured by a micro-benchmark
(a GEMM, an SVD and an eigendecomposition, ~50 ms), and a time model per method."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from .lanczos import default_max_steps
from .plan import FACTORED, READ_OFF, SHARED_MAPS, SpectrumEntry
from .shared import SHARED_BLOCK, shared_max_steps
from .threads import decomposition_threads

_GEMM_SIZE = 384
_DECOMPOSITION_SIZE = 160


@dataclass(frozen=True)
class Rates:
    """Work per second on one device and dtype: multiply-adds in a GEMM, `m·n·min(m, n)` in
    an SVD (singular values only), `n³` in a symmetric eigendecomposition."""

    gemm: float
    svd: float
    eigh: float


def _best_seconds(run, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - begin)
    return max(best, 1e-9)


@lru_cache(maxsize=8)
def measure_rates(device: torch.device, dtype: torch.dtype) -> Rates:
    """The micro-benchmark, once per process, device and dtype."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(_GEMM_SIZE, _GEMM_SIZE, generator=generator, dtype=dtype).to(device)
    m = torch.randn(_DECOMPOSITION_SIZE, _DECOMPOSITION_SIZE, generator=generator,
                    dtype=dtype).to(device)
    s = m @ m.T

    def sync(value):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return value

    gemm = _best_seconds(lambda: sync(a @ a))
    with decomposition_threads(m):  # as the runs decompose matrices of this size
        torch.linalg.svdvals(m)  # warm-up (LAPACK workspace, CUDA handles)
        svd = _best_seconds(lambda: sync(torch.linalg.svdvals(m)))
        eigh = _best_seconds(lambda: sync(torch.linalg.eigvalsh(s)))
    return Rates(_GEMM_SIZE**3 / gemm, _DECOMPOSITION_SIZE**3 / svd,
                 _DECOMPOSITION_SIZE**3 / eigh)


def apply_cost(entry: SpectrumEntry) -> float:
    """Multiply-adds to apply one layer's Jacobian (or its transpose) to one vector: from the
    weights of a Linear or convolution, the size for elementwise maps, else dense."""
    if entry.structure in READ_OFF:
        return float(entry.d_out)
    weight = getattr(entry.module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
        positions = entry.d_out // max(1, weight.shape[0])
        return float(weight.numel() * max(1, positions))
    return float(entry.d_in) * entry.d_out


def _lanczos_seconds(entry: SpectrumEntry, steps: int, rates: Rates, block: int) -> float:
    """One Lanczos run of `steps` vectors in blocks of `block`: the products with J and Jᵀ,
    the re-orthogonalization (each vector against the basis, twice: `2·steps²·r` multiply-
    adds) and the Rayleigh–Ritz eigendecompositions (about four of the final size,
    checks growing the basis by a tenth)."""
    r = min(entry.d_out, entry.d_in)
    products = steps * 2 * apply_cost(entry) / rates.gemm
    orthogonalize = 2 * steps * steps * r / rates.gemm
    ritz = 4 * steps**3 / rates.eigh + 2 * steps * steps * r / rates.gemm
    return products + orthogonalize + ritz


def predict_seconds(entry: SpectrumEntry, n_samples: int, rates: Rates, *,
                    max_steps: int | None = None) -> float:
    """Predicted time of one entry's spectra over `n_samples` samples (the decompositions;
    Lanczos at its step cap, so an upper bound)."""
    m, n, r = entry.d_out, entry.d_in, min(entry.d_out, entry.d_in)
    structure = entry.structure
    if entry.method == "fft":
        height_width = entry.d_in // max(1, entry.module.weight.shape[1])
        c_out, c_in = entry.module.weight.shape[:2]
        return height_width * c_out * c_in * min(c_out, c_in) / rates.svd
    if entry.method == "lanczos" and entry.shared:  # one run for all samples
        steps = min(max_steps or shared_max_steps(entry.k, r), r)
        return _lanczos_seconds(entry, steps, rates, SHARED_BLOCK)
    if entry.method == "lanczos":
        steps = min(max_steps or default_max_steps(entry.k, r), r)
        block = min(max(entry.k, 2), 8)
        return n_samples * _lanczos_seconds(entry, steps, rates, block)
    if structure in READ_OFF or structure in FACTORED:
        return n_samples * m * max(1.0, math.log2(max(m, 2))) / rates.gemm
    if structure in SHARED_MAPS:
        return m * n * r / rates.svd
    if structure == "row-scaled":
        small = min(m, n)
        gram = m * m * n / rates.gemm if m <= n else n_samples * n * n * m / rates.gemm
        return gram + n_samples * small**3 / rates.eigh
    return n_samples * m * n * r / rates.svd

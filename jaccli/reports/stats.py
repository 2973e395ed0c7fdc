"""Statistics over samples (NumPy only, so reading results never imports torch)."""

from __future__ import annotations

import numpy as np

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def aggregate(values: np.ndarray) -> dict[str, float]:
    """mean, std, min, max and percentiles of a `(N,)` quantity over samples.

    NaN values are left out; infinite ones (a rank-deficient Jacobian's condition number)
    count: a median of inf is reported as inf, not hidden. `n_nonfinite` counts both.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    known = values[~np.isnan(values)]
    stats: dict[str, float] = {"n_nonfinite": int((~np.isfinite(values)).sum())}
    if known.size == 0:
        nan = float("nan")
        return stats | {k: nan for k in ("mean", "std", "min", "max")} | {
            f"p{q}": nan for q in PERCENTILES}
    finite = known[np.isfinite(known)]
    with np.errstate(invalid="ignore"):
        mean = float(known.mean())
    std = float(finite.std()) if finite.size == known.size else float("inf")
    stats |= {"mean": mean, "std": std, "min": float(known.min()), "max": float(known.max())}
    quantiles = np.percentile(known, PERCENTILES, method="inverted_cdf") \
        if finite.size < known.size else np.percentile(known, PERCENTILES)
    stats |= {f"p{q}": float(v) for q, v in zip(PERCENTILES, quantiles, strict=True)}
    return stats


def worst_samples(values: np.ndarray, sample_index: np.ndarray, *, largest: bool,
                  count: int = 3) -> list[int]:
    """Data-file rows of the `count` samples with the largest (or smallest) values."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values if largest else values, kind="stable")[:count]
    return [int(sample_index[i]) for i in order]

"""Statistics over samples (NumPy only, so reading results never imports torch)."""

from __future__ import annotations

import numpy as np

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def aggregate(values: np.ndarray) -> dict[str, float]:
    """mean, std, min, max and percentiles of a `(N,)` quantity over samples.

    Non-finite values are left out and counted in `n_nonfinite`.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    stats: dict[str, float] = {"n_nonfinite": int(values.size - finite.size)}
    if finite.size == 0:
        nan = float("nan")
        return stats | {k: nan for k in ("mean", "std", "min", "max")} | {
            f"p{q}": nan for q in PERCENTILES}
    stats |= {"mean": float(finite.mean()), "std": float(finite.std()),
              "min": float(finite.min()), "max": float(finite.max())}
    quantiles = np.percentile(finite, PERCENTILES)
    stats |= {f"p{q}": float(v) for q, v in zip(PERCENTILES, quantiles, strict=True)}
    return stats


def worst_samples(values: np.ndarray, sample_index: np.ndarray, *, largest: bool,
                  count: int = 3) -> list[int]:
    """Data-file rows of the `count` samples with the largest (or smallest) values."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(-values if largest else values, kind="stable")[:count]
    return [int(sample_index[i]) for i in order]

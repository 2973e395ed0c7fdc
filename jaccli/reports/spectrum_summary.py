"""The spectrum summary, built from plain arrays (no torch): by `spectrum` after computing,
and by `show` from a file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .stats import aggregate

HISTOGRAM_BINS = 16
SCHEMA = "jaccli/spectrum-summary"
SCHEMA_VERSION = 1


@dataclass
class SpectrumRecord:
    """One Jacobian's spectra over all samples.

    values: `(N, r)` all singular values (complete) or `(N, k)` the top k, descending.
    quantities: name -> `(N,)` (spectral_norm, frobenius, condition_number, ...).
    residuals: `(N, k)` for Lanczos entries, else None; converged: `(N, k)` bool, whether
    each of those values met `tolerance` (a value that did not is flagged, never trusted).
    """

    name: str
    kind: str
    type: str
    d_in: int
    d_out: int
    structure: str
    method: str
    reason: str
    note: str
    complete: bool
    k: int
    seconds: float
    values: np.ndarray
    quantities: dict[str, np.ndarray] = field(default_factory=dict)
    residuals: np.ndarray | None = None
    converged: np.ndarray | None = None
    tolerance: float | None = None
    rank_tolerance: float | None = None  # σ ≤ this · σ_max counts as zero

    @property
    def unconverged(self) -> int:
        """How many of the reported values missed their tolerance."""
        return 0 if self.converged is None else int((~self.converged.astype(bool)).sum())


@dataclass
class SpectrumOutcome:
    """What a spectrum run (or a spectra file) holds: the summary document, the per-sample
    records, the samples' rows in the data file, and the chain bounds per sample (or None)."""

    summary: dict
    records: list[SpectrumRecord]
    sample_index: np.ndarray
    bounds: dict[str, np.ndarray] | None


def build_summary(records: list[SpectrumRecord], *, model: str, data: str, model_format: str,
                  n_samples: int, device: str, dtype: str, chain: bool,
                  profile: list[dict], profile_note: str,
                  bounds: dict[str, np.ndarray] | None) -> dict:
    """The summary document (`--json` prints it; docs/schemas/spectrum-summary.schema.json)."""
    entries = []
    for r in records:
        values = r.values
        complete = r.complete and values.size > 0
        sigma2 = values.reshape(-1) ** 2 if complete else None
        entries.append({
            "name": r.name, "kind": r.kind, "type": r.type, "d_in": r.d_in, "d_out": r.d_out,
            "structure": r.structure, "method": r.method, "reason": r.reason, "note": r.note,
            "complete": r.complete, "k": r.k, "seconds": r.seconds,
            "quantities": {name: aggregate(v) for name, v in r.quantities.items()},
            "sigma_min": aggregate(values[:, -1]) if complete else None,
            "isometry": ({"mean_sigma2": float(sigma2.mean()), "std_sigma2": float(sigma2.std())}
                         if sigma2 is not None else None),
            "max_residual": float(r.residuals.max()) if r.residuals is not None
            and r.residuals.size else None,
            "tolerance": r.tolerance, "unconverged": r.unconverged,
            "rank_tolerance": r.rank_tolerance,
            "histogram": histogram(values),
        })
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": "spectrum",
            "model": model, "data": data, "model_format": model_format,
            "n_samples": n_samples, "device": device, "dtype": dtype, "chain": chain,
            "entries": entries, "profile": profile, "profile_note": profile_note,
            "bounds": ({name: aggregate(v) for name, v in bounds.items()} if bounds else None),
            "output": None}


def chain_bounds(records: list[SpectrumRecord], applicable: bool
                 ) -> dict[str, np.ndarray] | None:
    """Per sample: the product of the layers' spectral norms (an upper bound on the
    end-to-end spectral norm along the chain), the measured end-to-end spectral norm (a lower
    bound on the local Lipschitz constant), and their ratio."""
    layers = [r for r in records if r.kind == "layer"]
    e2e = [r for r in records if r.kind == "end_to_end"]
    if not applicable or not layers or not e2e:
        return None
    product = np.prod([r.quantities["spectral_norm"] for r in layers], axis=0)
    measured = e2e[0].quantities["spectral_norm"]
    ratio = product / np.where(measured > 0, measured, np.nan)
    return {"layer_product": product, "end_to_end": measured, "ratio": ratio}


def histogram(values: np.ndarray) -> dict:
    """Counts of all singular values (every sample) in `HISTOGRAM_BINS` equal bins."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return {"edges": [], "counts": []}
    low, high = float(flat.min()), float(flat.max())
    # One value (an all-ones spectrum), or values a few ulps apart (a pooling's equal σ from
    # Lanczos), for which 16 bins would not be finite-sized: one wide bin holds them; min and
    # max stay exact.
    top = high if high - low > 1e-9 * max(abs(low), abs(high)) else low + max(1.0, 1e-6 * abs(low))
    counts, edges = np.histogram(flat, bins=HISTOGRAM_BINS, range=(low, top))
    return {"edges": edges.tolist(), "counts": counts.tolist(), "min": low, "max": high}

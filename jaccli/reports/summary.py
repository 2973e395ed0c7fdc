"""The facts a compute run reports, built once and rendered (by the CLI) as Rich or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA = "jaccli/compute-summary"
SCHEMA_VERSION = 1


@dataclass
class EntrySummary:
    """One Jacobian's statistics over samples (Frobenius norms of the (D_out, D_in) matrices)."""

    name: str
    kind: str
    type: str
    d_in: int
    d_out: int
    jacobian_shape: list[int]
    frobenius_mean: float
    frobenius_max: float
    seconds: float
    nonfinite_samples: int = 0
    structure: str = "dense"
    rule: str = ""
    note: str = ""

    @classmethod
    def from_norms(cls, *, name: str, kind: str, type_name: str, d_in: int, d_out: int,
                   frobenius: np.ndarray, seconds: float, structure: str = "dense",
                   rule: str = "", note: str = "") -> EntrySummary:
        """Statistics of per-sample Frobenius norms `frobenius`, shape (N,)."""
        finite = frobenius[np.isfinite(frobenius)]
        return cls(name, kind, type_name, d_in, d_out, [len(frobenius), d_out, d_in],
                   float(finite.mean()) if finite.size else float("nan"),
                   float(finite.max()) if finite.size else float("nan"),
                   float(seconds), int(len(frobenius) - finite.size), structure, rule, note)


@dataclass
class Summary:
    """What `jaccli compute` did: inputs, settings, one row per Jacobian, totals."""

    model: str
    model_format: str
    data: str
    n_samples: int
    device: str
    dtype: str
    granularity: str
    batch_size: int
    chain: bool
    entries: list[EntrySummary]
    skipped: list[dict[str, str]] = field(default_factory=list)
    output: str | None = None
    output_bytes: int = 0
    seconds: float = 0.0
    command: str = "compute"
    engine: str = ""  # which engine computed it (graph capture path, or hooks)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, **asdict(self)}


INFINITIES = {float("inf"): "inf", float("-inf"): "-inf"}


def json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity: NaN (no value) is written as null, an infinity (e.g. the
    condition number of a rank-deficient Jacobian) as the string "inf" or "-inf"."""
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None if np.isnan(value) else INFINITIES[float(value)]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

"""`jaccli diff`: compare two runs on the same data (e.g. two checkpoints), layer by layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import JaccliError
from ..io.results import ResultGroup, Results

SCHEMA = "jaccli/diff-result"
_BATCH = 256


def diff_files(path_a: Path, path_b: Path, *, rtol: float,
               allow_different_data: bool = False) -> dict:
    """Per-layer relative changes from A to B; `same` is false when any exceeds `rtol`.

    Spectra files: spectral norm (mean), condition number (median), Frobenius norm (mean) and
    the singular-value distribution (Wasserstein-1 distance over all samples, relative to A's
    mean singular value). Jacobians files: Frobenius norm (mean) and the Jacobians themselves
    (max over samples of ‖J_B − J_A‖_F / ‖J_A‖_F).
    """
    with Results(path_a) as a, Results(path_b) as b:
        kind = a.attrs.get("kind")
        if b.attrs.get("kind") != kind:
            raise JaccliError(f"cannot compare {kind} ({path_a}) with {b.attrs.get('kind')} "
                              f"({path_b}); diff two files of the same command")
        _check_same_data(a, b, allow_different_data)
        names_a = [g.name for g in a.groups()]
        names_b = [g.name for g in b.groups()]
        layers = []
        for name in [n for n in names_a if n in names_b]:
            ga, gb = a.layer(name), b.layer(name)
            metrics = (_spectra_metrics(ga, gb) if kind == "spectra"
                       else _jacobian_metrics(ga, gb))
            changed = any(m["rel_change"] is None or abs(m["rel_change"]) > rtol
                          for m in metrics.values())
            layers.append({"name": name, "changed": changed, "metrics": metrics})
        only_a = [n for n in names_a if n not in names_b]
        only_b = [n for n in names_b if n not in names_a]
        same = not only_a and not only_b and not any(layer["changed"] for layer in layers)
        return {"schema": SCHEMA, "schema_version": 1, "kind": kind, "a": str(path_a),
                "b": str(path_b), "rtol": rtol, "same": same, "layers": layers,
                "only_in_a": only_a, "only_in_b": only_b,
                "same_data": a.attrs.get("data_sha256") == b.attrs.get("data_sha256")}


def _check_same_data(a: Results, b: Results, allowed: bool) -> None:
    same_hash = a.attrs.get("data_sha256") == b.attrs.get("data_sha256")
    same_rows = np.array_equal(a.sample_index, b.sample_index)
    if allowed or (same_hash and same_rows):
        return
    why = "data hashes differ" if not same_hash else "they use different samples"
    raise JaccliError(f"{a.path} and {b.path} were computed on different data ({why}); "
                      "compare runs on the same samples, or pass --allow-different-data")


def _change(a: float, b: float) -> dict:
    if np.isnan(a) or np.isnan(b):
        rel = None  # NaN on either side is a change, never "the same"
    elif a == b:
        rel = 0.0
    elif a == 0 or not np.isfinite(a) or not np.isfinite(b):
        rel = None  # undefined: always reported as a change
    else:
        rel = float((b - a) / abs(a))
    return {"a": float(a), "b": float(b), "rel_change": rel}


def _values(group: ResultGroup) -> np.ndarray:
    name = "singular_values" if "singular_values" in group else "top_singular_values"
    return np.asarray(group[name], dtype=np.float64)


def _spectra_metrics(a: ResultGroup, b: ResultGroup) -> dict:
    sa, sb = _values(a), _values(b)
    metrics = {
        "spectral_norm_mean": _change(np.mean(a["spectral_norm"]),
                                      np.mean(b["spectral_norm"])),
        "frobenius_mean": _change(np.mean(a["frobenius"]), np.mean(b["frobenius"])),
    }
    if "condition_number" in a and "condition_number" in b:
        metrics["condition_number_median"] = _change(np.median(a["condition_number"]),
                                                     np.median(b["condition_number"]))
    scale = float(np.mean(sa)) if sa.size else 0.0
    distance = _wasserstein(sa.reshape(-1), sb.reshape(-1))
    relative = distance / scale if scale > 0 else float("inf")
    metrics["singular_value_distribution"] = {
        "a": 0.0, "b": relative, "rel_change": relative if np.isfinite(relative) else None}
    return metrics


def _wasserstein(x: np.ndarray, y: np.ndarray) -> float:
    """Wasserstein-1 distance between two empirical distributions (by quantiles)."""
    if x.size == 0 or y.size == 0:
        return float("inf")
    q = np.linspace(0, 1, 513)
    return float(np.mean(np.abs(np.quantile(x, q) - np.quantile(y, q))))


def _jacobian_metrics(a: ResultGroup, b: ResultGroup) -> dict:
    if a.jacobian.shape != b.jacobian.shape:
        return {"shape": {"a": float(np.prod(a.jacobian.shape)),
                          "b": float(np.prod(b.jacobian.shape)), "rel_change": None}}
    worst = 0.0
    n = a.jacobian.shape[0]
    for start in range(0, n, _BATCH):
        ja, jb = a.jacobian[start:start + _BATCH], b.jacobian[start:start + _BATCH]
        num = np.linalg.norm((jb - ja).reshape(len(ja), -1), axis=1)
        den = np.linalg.norm(ja.reshape(len(ja), -1), axis=1)
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(num > 0, np.inf, 0))
        # NaN (in either run) makes the difference undefined: never "the same".
        worst = float("nan") if np.isnan(ratio).any() or np.isnan(worst) else \
            max(worst, float(ratio.max()))
    return {
        "frobenius_mean": _change(np.mean(a["frobenius"]), np.mean(b["frobenius"])),
        "jacobian_max_rel_difference": {"a": 0.0, "b": worst,
                                        "rel_change": worst if np.isfinite(worst) else None},
    }

"""`jaccli check`: regression gates on Jacobian spectra, for CI.

Bounds come from the command line, a `jaccli.toml` file, or the `[tool.jaccli.check]` table of
a `pyproject.toml`; command-line values win. Each bound is checked on every selected
Jacobian (all layers and the end-to-end one, or those `--layers` names; the end-to-end one is
called `(end-to-end)`): the chosen statistic over samples must stay within the bound.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import JaccliError, UsageError
from .spectrum_summary import SpectrumRecord
from .stats import aggregate, worst_samples

SCHEMA = "jaccli/check-result"
EXIT_VIOLATED = 1
EXIT_UNVERIFIED = 5
STATS = ("max", "mean", "p95", "p99")
# For lower bounds the worst case is the other tail.
_LOWER_TAIL = {"max": "min", "mean": "mean", "p95": "p5", "p99": "p1"}


@dataclass
class Bounds:
    """The limits to enforce; None means "not checked"."""

    max_spectral_norm: float | None = None
    max_cond: float | None = None
    max_frobenius: float | None = None
    max_lipschitz_bound: float | None = None
    min_sigma: float | None = None
    stat: str = "max"
    layers: list[str] = field(default_factory=list)

    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self)
                   if f.name.startswith(("max_", "min_")))


def load_bounds(config_file: Path | None, overrides: dict) -> Bounds:
    """Bounds from `config_file` (jaccli.toml, or pyproject.toml's [tool.jaccli.check]),
    then the command-line `overrides` (None values are ignored)."""
    values: dict = {}
    if config_file is None and Path("jaccli.toml").is_file():
        config_file = Path("jaccli.toml")
    if config_file is not None:
        values = _read_toml_bounds(config_file)
    values |= {k: v for k, v in overrides.items() if v is not None and v != []}
    bounds = Bounds(**values)
    if bounds.stat not in STATS:
        raise UsageError(f"--stat must be one of {', '.join(STATS)}, not {bounds.stat!r}")
    if not bounds.any():
        raise UsageError("no bound to check: give --max-spectral-norm, --max-cond, "
                         "--max-frobenius, --max-lipschitz-bound or --min-sigma (or a "
                         "--config file)")
    return bounds


def _read_toml_bounds(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise JaccliError("reading --config needs Python 3.11+ or `pip install tomli`"
                              ) from exc
    try:
        document = tomllib.loads(path.read_text())
    except OSError as exc:
        raise JaccliError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise JaccliError(f"{path} is not valid TOML: {exc}") from exc
    table = document.get("tool", {}).get("jaccli", {}).get("check") \
        if path.name == "pyproject.toml" else document.get("check", document)
    if not isinstance(table, dict):
        where = "[tool.jaccli.check]" if path.name == "pyproject.toml" else "[check]"
        raise JaccliError(f"{path} has no {where} table")
    known = {f.name for f in fields(Bounds)}
    values = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise JaccliError(f"{path}: unknown check setting(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(k.replace('_', '-') for k in known))}")
    return values


def evaluate(bounds: Bounds, records: list[SpectrumRecord], sample_index: np.ndarray,
             chain_bounds: dict[str, np.ndarray] | None, *, model: str, data: str) -> dict:
    """Check every bound on every selected Jacobian: the result document."""
    selected = [r for r in records if not bounds.layers
                or any(fnmatch.fnmatchcase(r.name, p) for p in bounds.layers)]
    if not selected:
        names = ", ".join(r.name for r in records)
        raise UsageError(f"--layers {' '.join(bounds.layers)} matches nothing to check; "
                         f"names are: {names}")
    checks = []
    for record in selected:
        for quantity, bound, upper in (("spectral_norm", bounds.max_spectral_norm, True),
                                       ("condition_number", bounds.max_cond, True),
                                       ("frobenius", bounds.max_frobenius, True),
                                       ("sigma_min", bounds.min_sigma, False)):
            if bound is None:
                continue
            values = _per_sample(record, quantity)
            checks.append(_check(record.name, quantity, values, bound, upper, bounds.stat,
                                 sample_index))
    if bounds.max_lipschitz_bound is not None:
        if chain_bounds is None:
            raise JaccliError("--max-lipschitz-bound needs a chain model analysed whole (all "
                              "layers and the end-to-end Jacobian); drop --layers, or use "
                              "--max-spectral-norm on the end-to-end Jacobian")
        checks.append(_check("(chain)", "lipschitz_bound", chain_bounds["layer_product"],
                             bounds.max_lipschitz_bound, True, bounds.stat, sample_index))
    violations = [c for c in checks if not c["passed"]]
    unverified = [{"layer": r.name, "unconverged": r.unconverged, "tolerance": r.tolerance,
                   "max_residual": float(np.max(r.residuals))}
                  for r in selected if r.unconverged]
    return {"schema": SCHEMA, "schema_version": 1, "passed": not violations and not unverified,
            "model": model, "data": data, "n_samples": int(len(sample_index)),
            "stat": bounds.stat, "checks": checks, "violations": violations,
            "unverified": unverified, "exit_code": exit_code(violations, unverified)}


def exit_code(violations: list[dict], unverified: list[dict]) -> int:
    """0 every bound holds; 1 a bound is violated by values that are exact or converged;
    5 some values could not be verified (an iterative method missed its tolerance), so the
    gate cannot pass."""
    doubtful = {u["layer"] for u in unverified}
    if any(v["layer"] not in doubtful for v in violations):
        return EXIT_VIOLATED
    return EXIT_UNVERIFIED if unverified else (EXIT_VIOLATED if violations else 0)


def _per_sample(record: SpectrumRecord, quantity: str) -> np.ndarray:
    if quantity == "sigma_min":
        if not record.complete:
            raise JaccliError(f"--min-sigma needs all singular values of {record.name}, but "
                              f"only the top {record.k} were computed ({record.reason}); "
                              "raise --max-memory or restrict --layers")
        return record.values[:, -1]
    if quantity not in record.quantities:
        raise JaccliError(f"{quantity.replace('_', ' ')} of {record.name} is not available "
                          f"({record.method}: {record.reason}); raise --max-memory or "
                          "restrict --layers")
    return record.quantities[quantity]


def _check(name: str, quantity: str, values: np.ndarray, bound: float, upper: bool,
           stat: str, sample_index: np.ndarray) -> dict:
    used = stat if upper else _LOWER_TAIL[stat]
    stats = aggregate(values)
    # An infinite (rank-deficient) or NaN value never satisfies a bound, not even an
    # infinite one: `--max-cond inf` still fails a rank-deficient Jacobian.
    if stats["n_nonfinite"]:
        value = float("inf") if upper else float("nan")
        passed = False
    else:
        value = stats[used]
        passed = bool(value <= bound) if upper else bool(value >= bound)
    return {"layer": name, "quantity": quantity, "stat": used, "value": value,
            "bound": bound, "kind": "max" if upper else "min", "passed": passed,
            "worst_samples": worst_samples(values, sample_index, largest=upper)}

"""`jaccli show`: the summary of a results file, or one sample's Jacobian or spectrum, without
recomputing (and without importing torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import JaccliError, ResultsFormatError
from ..io.results import Results
from .spectrum_summary import SpectrumOutcome, SpectrumRecord, build_summary
from .summary import EntrySummary, Summary

SAMPLE_SCHEMA = "jaccli/show-sample"
_SPECTRUM_VALUES = ("singular_values", "top_singular_values")


def summarize_file(path: Path) -> tuple[str, object]:
    """`("jacobians", Summary)`, or `("spectra" | "ntk" | "products" | "hessian", summary
    dict)` for a results file."""
    with Results(path) as results:
        kind = results.attrs.get("kind")
        if kind == "jacobians":
            return kind, _jacobians_summary(results)
        if kind == "spectra":
            return kind, _read_spectra(results).summary
        if kind == "ntk":
            from .ntk_file import ntk_summary

            return kind, ntk_summary(results)
        if kind in ("products", "hessian"):
            from .product_files import hessian_summary, products_summary

            return kind, (products_summary if kind == "products" else hessian_summary)(results)
        raise ResultsFormatError(f"{path} holds {kind!r} results, a kind this jaccli does not "
                                 "know (jacobians, spectra, ntk, products, hessian): it was "
                                 "written by another version")


def _jacobians_summary(results: Results) -> Summary:
    a = results.attrs
    entries = [EntrySummary.from_norms(
        name=g.name, kind=g.kind, type_name=g.type_name, d_in=int(g.attrs["d_in"]),
        d_out=int(g.attrs["d_out"]), frobenius=np.asarray(g["frobenius"]),
        seconds=float(g.attrs.get("seconds", 0.0)), structure=g.encoding,
        rule=str(g.attrs.get("rule", "")), note=str(g.attrs.get("note", "")))
        for g in results.groups()]
    return Summary(model=str(a.get("model_path", "")), model_format=str(a.get("model_format", "")),
                   data=str(a.get("data_path", "")), n_samples=results.n_samples,
                   device=str(a.get("device", "")), dtype=str(a.get("dtype", "")),
                   granularity=str(a.get("granularity", "")),
                   batch_size=int(a.get("batch_size", 0)), chain=bool(a.get("chain", False)),
                   entries=entries, output=str(results.path),
                   engine=str(a.get("engine", "")),
                   output_bytes=results.path.stat().st_size,
                   seconds=float(a.get("seconds", 0.0)))


def _record(group) -> SpectrumRecord:
    a = group.attrs
    values_name = next((n for n in _SPECTRUM_VALUES if n in group), None)
    values = np.asarray(group[values_name]) if values_name else np.zeros((0, 0))
    skip = set(_SPECTRUM_VALUES) | {"residual", "converged"}
    quantities = {name: np.asarray(group.group[name]) for name in group.group
                  if name not in skip}
    return SpectrumRecord(
        group.name, group.kind, group.type_name, int(a["d_in"]), int(a["d_out"]),
        str(a.get("structure", "")), str(a.get("method", "")), str(a.get("reason", "")),
        str(a.get("note", "")), bool(a.get("complete", False)), int(a.get("k", 0)),
        float(a.get("seconds", 0.0)), values, quantities,
        np.asarray(group["residual"]) if "residual" in group else None,
        np.asarray(group["converged"]) if "converged" in group else None,
        a.get("tolerance"), a.get("rank_tolerance") or None)


def read_spectra(path: Path) -> SpectrumOutcome:
    """A spectra file's summary, per-sample records and chain bounds, read in one pass."""
    with Results(path) as results:
        if results.attrs.get("kind") != "spectra":
            raise ResultsFormatError(f"{path} holds {results.attrs.get('kind')}, not spectra")
        return _read_spectra(results)


def _read_spectra(results: Results) -> SpectrumOutcome:
    a, f = results.attrs, results.file
    profile = []
    if "profile" in f:
        layers = [x.decode() if isinstance(x, bytes) else str(x)
                  for x in f["profile"].attrs["layers"]]
        profile = [{"layer": name, "mean_sigma2": float(m), "var_sigma2": float(v)}
                   for name, m, v in zip(layers, f["profile/mean_sigma2"][:],
                                         f["profile/var_sigma2"][:], strict=True)]
    bounds = ({name: np.asarray(f["bounds"][name]) for name in f["bounds"]}
              if "bounds" in f else None)
    records = [_record(g) for g in results.groups()]
    summary = build_summary(
        records, model=str(a.get("model_path", "")),
        data=str(a.get("data_path", "")), model_format=str(a.get("model_format", "")),
        n_samples=results.n_samples, device=str(a.get("device", "")),
        dtype=str(a.get("dtype", "")), chain=bool(a.get("chain", False)), profile=profile,
        profile_note=str(a.get("profile_note", "")), bounds=bounds)
    summary["output"] = str(results.path)
    return SpectrumOutcome(summary, records, np.asarray(results.sample_index), bounds)


def sample_detail(path: Path, layer: str, sample: int) -> dict:
    """One sample's Jacobian (dense) or spectrum from a results file.

    sample: the row in the data file (as stored in /samples/index).
    """
    with Results(path) as results:
        if results.attrs.get("kind") not in ("jacobians", "spectra"):
            raise JaccliError(f"--layer and --sample print one sample of a compute or spectrum "
                              f"file, and {path} holds {results.attrs.get('kind')} results; "
                              "run `jaccli show` without them (docs/FORMAT.md has the layout)")
        try:
            group = results.layer(layer)
        except KeyError as exc:
            raise JaccliError(str(exc.args[0])) from exc
        positions = np.flatnonzero(results.sample_index == sample)
        if positions.size == 0:
            first, last = results.sample_index[0], results.sample_index[-1]
            raise JaccliError(f"sample {sample} is not in {path} (it holds rows {first}.."
                              f"{last} of {results.attrs.get('data_path', 'the data')})")
        i = int(positions[0])
        detail = {"schema": SAMPLE_SCHEMA, "schema_version": 1, "file": str(path),
                  "kind": results.attrs.get("kind"), "layer": group.name, "sample": sample,
                  "type": group.type_name, "input_shape": list(group.input_shape),
                  "output_shape": list(group.output_shape)}
        if results.attrs.get("kind") == "jacobians":
            detail |= {"encoding": group.encoding, "frobenius": float(group["frobenius"][i]),
                       "jacobian": group.jacobian[i].tolist()}
        else:
            name = next(n for n in _SPECTRUM_VALUES if n in group)
            detail |= {"method": group.attrs.get("method"),
                       "complete": bool(group.attrs.get("complete")),
                       "singular_values": np.asarray(group[name][i]).tolist(),
                       "quantities": {q: float(group.group[q][i]) for q in group.group
                                      if q not in (*_SPECTRUM_VALUES, "residual",
                                                   "converged")}}
        return detail

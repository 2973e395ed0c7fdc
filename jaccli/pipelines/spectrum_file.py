"""The `spectrum` pipeline from a results file written by `compute`: each stored Jacobian is
read in its compact form (through the results codec) and decomposed by its structure.

The selection options apply to the file: `--layers` / `--no-layers` / `--no-end-to-end` pick
its groups, `--offset` / `--limit` its samples (positions in the file), `--dtype` / `--device`
where the decompositions run (default: the file's precision).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import JaccliError, UsageError
from ..graph.storage import from_compact
from ..io.results import ResultGroup, Results
from ..io.results.format import is_hdf5
from ..reports.show import read_spectra
from ..reports.spectrum_summary import SpectrumOutcome
from ..settings import LayerSelection, SpectrumSettings, shard_range
from ..spectra.exact import Spectrum, exact_spectrum
from ..spectra.plan import DEFAULT_TOP_K, MAX_SHARED_SVD_COST, SpectrumEntry
from ..spectra.quantities import all_quantities
from ..spectra.shared import shared_top_singular_values
from .common import guard_output
from .compute import options_fingerprint
from .resources import resolve_device, resolve_dtype
from .spectrum_output import EntryResult, summarize, write_spectra

BATCH = 256


def spectrum_from_results(settings: SpectrumSettings, path: Path, *,
                          on_batch=None) -> SpectrumOutcome:
    """Spectra of the Jacobians stored in a `compute` results file (no model needed)."""
    started = time.perf_counter()
    guard_output(settings.output, None, None, path)
    with Results(path) as source:
        if source.attrs.get("kind") != "jacobians":
            raise UsageError(f"{path} holds {source.attrs.get('kind')}, not Jacobians; "
                             "`jaccli spectrum` reads files written by `jaccli compute`")
        rows = sample_rows(settings, source.n_samples, path)
        dtype = resolve_dtype(settings.run.dtype or str(source.attrs.get("dtype", "float32")))
        device = resolve_device(settings.run.device)
        groups = selected_groups(source, settings.layers, path)
        everything = len(groups) == len(source.groups())
        entries, results, cache = [], {}, {}
        for group in groups:
            entry, result = _decompose(group, rows, settings, dtype, device, cache)
            entries.append(entry)
            results[entry.name] = result
        attrs = dict(source.attrs)
        indices = source.sample_index[rows]
    chain = bool(attrs.get("chain"))
    summary, records, bounds = summarize(
        entries, results, profile_rows=[],
        profile_note="" if chain else "not a chain model: no cumulative Jacobians", chain=chain,
        all_layers=everything,
        model=str(attrs.get("model_path", "")), data=str(attrs.get("data_path", "")),
        model_format=str(attrs.get("model_format", "")), n_samples=len(indices),
        device=str(device), dtype=str(dtype).removeprefix("torch."))
    summary["source"] = str(path)
    if settings.output.path is not None:
        provenance = {k: v for k, v in attrs.items()
                      if k not in ("format", "format_version", "kind", "complete")}
        provenance |= {"command": settings.command_line, "source_results": str(path),
                       "n_samples": len(indices), "dtype": summary["dtype"],
                       "data_offset": int(indices[0]) if len(indices) else 0,
                       "spectrum_options_sha256": options_fingerprint(settings)}
        write_spectra(settings, summary, results, [], bounds, indices, provenance)
        summary["output"] = str(settings.output.path)
    summary["seconds"] = time.perf_counter() - started
    if on_batch is not None:
        on_batch(len(indices))
    return SpectrumOutcome(summary, records, indices, bounds)


def _decompose(group: ResultGroup, rows: slice, settings: SpectrumSettings, dtype, device,
               cache: dict) -> tuple[SpectrumEntry, EntryResult]:
    """All singular values of one stored Jacobian for samples `rows`, batch by batch."""
    d_in, d_out = int(group.attrs["d_in"]), int(group.attrs["d_out"])
    r = min(d_in, d_out)
    if group.encoding == "convolution" and r * r * max(d_in, d_out) > MAX_SHARED_SVD_COST:
        return _convolution_lanczos(group, rows, settings, dtype, device)
    k = min(settings.top_k, r) if settings.top_k else r
    entry = SpectrumEntry(group.name, group.kind, group.type_name, d_in, d_out,
                          group.encoding, "structured", k, "from the stored Jacobian")
    result = EntryResult(entry)
    begin = time.perf_counter()
    batch = settings.run.batch_size or BATCH
    for start in range(rows.start, rows.stop, batch):
        stop = min(start + batch, rows.stop)
        arrays = {name: torch.from_numpy(value).to(
                      device=device, dtype=dtype if value.dtype.kind == "f" else torch.int64)
                  for name, value in group.compact(slice(start, stop)).items()}
        jac = from_compact(group.encoding, arrays, d_in, dtype)
        spectrum = exact_spectrum(jac, stop - start, exact=settings.exact, cache=cache,
                                  key=entry.name)
        quantities = all_quantities(spectrum.values, d_out, d_in, spectrum.method)
        if k < r:
            spectrum = Spectrum(spectrum.values[:, :k], False, spectrum.method, spectrum.note)
        result.add(spectrum, quantities)
    result.seconds = time.perf_counter() - begin
    return entry, result


def _convolution_lanczos(group: ResultGroup, rows: slice, settings: SpectrumSettings, dtype,
                         device) -> tuple[SpectrumEntry, EntryResult]:
    """The top-k of a stored convolution too large for one full SVD (`min(D)²·max(D)` above
    `MAX_SHARED_SVD_COST`): block Lanczos on the convolution rebuilt from its kernel (never
    formed), once for all samples; ‖J‖_F exact from the kernel."""
    d_in, d_out = int(group.attrs["d_in"]), int(group.attrs["d_out"])
    k = min(settings.top_k or DEFAULT_TOP_K, d_in, d_out)
    entry = SpectrumEntry(group.name, group.kind, group.type_name, d_in, d_out,
                          group.encoding, "lanczos", k, "stored convolution too large for one "
                          "full SVD: matrix-free Lanczos on its kernel, once for all samples")
    result, begin = EntryResult(entry), time.perf_counter()
    arrays = {name: torch.from_numpy(np.asarray(value)).to(
                  device=device, dtype=dtype if value.dtype.kind == "f" else torch.int64)
              for name, value in group.compact(slice(rows.start, rows.start)).items()}
    jac = from_compact("convolution", arrays, d_in, dtype)
    top, frob, _ = shared_top_singular_values(
        jac.right_apply, lambda u: jac.left_apply(u.transpose(1, 2)).transpose(1, 2),
        d_in=d_in, d_out=d_out, k=k, dtype=dtype,
        device=device, tol=settings.tol, max_steps=settings.max_steps,
        probes=settings.probes, frobenius=jac.frobenius(1))
    n = rows.stop - rows.start
    values = top.values.expand(n, -1)
    spectrum = Spectrum(values, False, "lanczos",
                        f"top-{k} of the stored convolution (the same for every sample) by "
                        f"matrix-free block Lanczos, once ({top.steps} Krylov vectors, residual "
                        f"tolerance {top.tolerance:.1e}); Frobenius norm exact (from the "
                        "kernel)", top.residuals.expand(n, -1), top.converged.expand(n, -1),
                        top.tolerance)
    frob = frob.to(dtype).reshape(1)
    result.add(spectrum, {"spectral_norm": values[:, 0], "frobenius": frob.expand(n),
                          "stable_rank": (frob.square() / top.values[:, 0].square()
                                          .clamp_min(1e-300)).expand(n)})
    result.seconds = time.perf_counter() - begin
    return entry, result


def selected_groups(source: Results, layers: LayerSelection, path: Path) -> list[ResultGroup]:
    """The groups `--layers` / `--no-layers` / `--no-end-to-end` select (parameters stay)."""
    chosen = []
    for group in source.groups():
        if group.kind == "layer" and not layers.include_layers:
            continue
        if group.kind == "end_to_end" and not layers.end_to_end:
            continue
        if (layers.patterns and group.kind == "layer"
                and not any(fnmatch.fnmatchcase(group.name, p) for p in layers.patterns)):
            continue
        chosen.append(group)
    if not chosen:
        names = ", ".join(g.name for g in source.groups()) or "(none)"
        raise UsageError(f"the layer selection matches nothing in {path}; it holds: {names}")
    return chosen


def sample_rows(settings: SpectrumSettings, n: int, path: Path) -> slice:
    """Positions `--offset` / `--limit` (and `--shard`) select among the file's n samples."""
    offset, limit = settings.data.offset, settings.data.limit
    if offset >= n:
        raise UsageError(f"--offset {offset} is past the end of {path} ({n} samples)")
    rows = slice(offset, n if limit is None else min(n, offset + limit))
    if settings.data.shard is None:
        return rows
    index, count = settings.data.shard
    start, stop = shard_range(rows.stop - rows.start, index, count)
    if stop == start:
        raise UsageError(f"--shard {index}/{count}: only {rows.stop - rows.start} samples "
                         f"are selected, too few for {count} shards; use fewer shards")
    return slice(rows.start + start, rows.start + stop)


def is_results_file(path: Path) -> bool:
    """Whether `path` is an HDF5 file (a results file) rather than a model; a missing file is
    an input error."""
    if not path.exists():
        raise JaccliError(f"file not found: {path}")
    return is_hdf5(path)


def spectra_of_file(settings: SpectrumSettings, path: Path) -> SpectrumOutcome:
    """Spectra from a results file: read back from a spectra file (its samples selected by
    `--offset` / `--limit`), or computed from the Jacobians a compute file stores."""
    with Results(path) as results:
        kind = results.attrs.get("kind")
    if kind != "spectra":
        return spectrum_from_results(settings, path)
    outcome = read_spectra(path)
    rows = sample_rows(settings, len(outcome.sample_index), path)
    records = [replace(r, values=r.values[rows], residuals=None if r.residuals is None
                       else r.residuals[rows], converged=None if r.converged is None
                       else r.converged[rows],
                       quantities={q: v[rows] for q, v in r.quantities.items()})
               for r in outcome.records]
    bounds = None if outcome.bounds is None else {k: np.asarray(v)[rows]
                                                  for k, v in outcome.bounds.items()}
    return SpectrumOutcome(outcome.summary, records, outcome.sample_index[rows], bounds)

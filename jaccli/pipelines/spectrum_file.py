"""The `spectrum` pipeline from a results file written by `compute`: each stored Jacobian is
read in its compact form (through the results codec) and decomposed by its structure."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..engine.structures import from_compact
from ..errors import JaccliError, UsageError
from ..io.results import Results
from ..io.results.format import is_hdf5
from ..reports.show import read_spectra
from ..reports.spectrum_summary import SpectrumOutcome
from ..settings import SpectrumSettings
from ..spectra.exact import Spectrum, exact_spectrum
from ..spectra.plan import SpectrumEntry
from ..spectra.quantities import all_quantities
from .spectrum_output import EntryResult, summarize, write_spectra

BATCH = 256


def spectrum_from_results(settings: SpectrumSettings, path: Path, *,
                          on_batch=None) -> SpectrumOutcome:
    """Spectra of the Jacobians stored in a `compute` results file (no model needed)."""
    started = time.perf_counter()
    with Results(path) as source:
        if source.attrs.get("kind") != "jacobians":
            raise UsageError(f"{path} holds {source.attrs.get('kind')}, not Jacobians; "
                             "`jaccli spectrum` reads files written by `jaccli compute`")
        dtype = torch.float64 if source.attrs.get("dtype") == "float64" else torch.float32
        n = source.n_samples
        batch = settings.run.batch_size or BATCH
        entries, results, cache = [], {}, {}
        for group in source.groups():
            d_in, d_out = int(group.attrs["d_in"]), int(group.attrs["d_out"])
            r = min(d_in, d_out)
            k = min(settings.top_k, r) if settings.top_k else r
            entry = SpectrumEntry(group.name, group.kind, group.type_name, d_in, d_out,
                                  group.encoding, "structured", k, "from the stored Jacobian")
            entries.append(entry)
            results[entry.name] = EntryResult(entry)
            begin = time.perf_counter()
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                arrays = {name: torch.from_numpy(value).to(dtype if value.dtype.kind == "f"
                                                           else torch.int64)
                          for name, value in group.compact(slice(start, stop)).items()}
                jac = from_compact(group.encoding, arrays, d_in, dtype)
                spectrum = exact_spectrum(jac, stop - start, exact=settings.exact,
                                          cache=cache, key=entry.name)
                quantities = all_quantities(spectrum.values, d_out, d_in)
                if k < r:
                    spectrum = Spectrum(spectrum.values[:, :k], False, spectrum.method,
                                        spectrum.note)
                results[entry.name].add(spectrum, quantities)
            results[entry.name].seconds = time.perf_counter() - begin
        attrs = dict(source.attrs)
        indices = source.sample_index
    chain = bool(attrs.get("chain"))
    summary, records, bounds = summarize(
        entries, results, profile_rows=[],
        profile_note="" if chain else "not a chain model: no cumulative Jacobians", chain=chain,
        all_layers=True, model=str(attrs.get("model_path", "")),
        data=str(attrs.get("data_path", "")), model_format=str(attrs.get("model_format", "")),
        n_samples=n, device=str(attrs.get("device", "")), dtype=str(attrs.get("dtype", "")))
    summary["source"] = str(path)
    if settings.output.path is not None:
        provenance = {k: v for k, v in attrs.items()
                      if k not in ("format", "format_version", "kind", "complete")}
        provenance |= {"command": settings.command_line, "source_results": str(path)}
        write_spectra(settings, summary, results, [], bounds, indices, provenance)
        summary["output"] = str(settings.output.path)
    summary["seconds"] = time.perf_counter() - started
    if on_batch is not None:
        on_batch(n)
    return SpectrumOutcome(summary, records, indices, bounds)


def is_results_file(path: Path) -> bool:
    """Whether `path` is an HDF5 file (a results file) rather than a model; a missing file is
    an input error."""
    if not path.exists():
        raise JaccliError(f"file not found: {path}")
    return is_hdf5(path)


def spectra_of_file(settings: SpectrumSettings, path: Path) -> SpectrumOutcome:
    """Spectra from a results file: read back from a spectra file, or computed from the
    Jacobians a compute file stores."""
    with Results(path) as results:
        kind = results.attrs.get("kind")
    return read_spectra(path) if kind == "spectra" else spectrum_from_results(settings, path)

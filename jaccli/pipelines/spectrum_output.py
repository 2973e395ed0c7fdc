"""What both spectrum paths (from a model, from a results file) produce: per-Jacobian results
gathered over batches, the summary document, and the spectra file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..io.results.writer import ResultsWriter
from ..reports.spectrum_summary import SpectrumRecord, build_summary, chain_bounds
from ..settings import SpectrumSettings
from ..spectra.exact import Spectrum
from ..spectra.plan import SpectrumEntry
from ..spectra.quantities import relative_rank_tolerance


@dataclass
class EntryResult:
    """Accumulated per-sample quantities of one Jacobian across batches."""

    entry: SpectrumEntry
    quantities: dict[str, list[np.ndarray]] = field(default_factory=dict)
    values: list[np.ndarray] = field(default_factory=list)
    residuals: list[np.ndarray] = field(default_factory=list)
    converged: list[np.ndarray] = field(default_factory=list)
    tolerance: float | None = None
    rank_tolerance: float | None = None
    method: str = ""
    note: str = ""
    seconds: float = 0.0

    def add(self, spectrum: Spectrum, quantities: dict[str, torch.Tensor]) -> None:
        self.values.append(spectrum.values.detach().double().cpu().numpy())
        if spectrum.residuals is not None:
            self.residuals.append(spectrum.residuals.detach().double().cpu().numpy())
        if spectrum.converged is not None:
            self.converged.append(spectrum.converged.detach().cpu().numpy())
            self.tolerance = spectrum.tolerance
        for name, value in quantities.items():
            self.quantities.setdefault(name, []).append(value.detach().double().cpu().numpy())
        self.method, self.note = spectrum.method, spectrum.note
        if spectrum.complete:
            self.rank_tolerance = relative_rank_tolerance(
                spectrum.method, self.entry.d_out, self.entry.d_in, spectrum.values.dtype)

    def array(self, name: str) -> np.ndarray:
        return np.concatenate(self.quantities[name])


def to_records(entries: list[SpectrumEntry], results: dict[str, EntryResult]
               ) -> list[SpectrumRecord]:
    records = []
    for entry in entries:
        result = results[entry.name]
        records.append(SpectrumRecord(
            entry.name, entry.kind, entry.type_name, entry.d_in, entry.d_out, entry.structure,
            result.method or entry.method, entry.reason, result.note, entry.complete, entry.k,
            result.seconds,
            np.concatenate(result.values) if result.values else np.zeros((0, 0)),
            {name: result.array(name) for name in result.quantities},
            np.concatenate(result.residuals) if result.residuals else None,
            np.concatenate(result.converged) if result.converged else None,
            result.tolerance, result.rank_tolerance))
    return records


def summarize(entries, results, *, profile_rows: list[dict], profile_note: str, chain: bool,
              all_layers: bool, **context):
    """(summary document, per-sample records, chain bounds) of a spectrum run.

    context: model, data, model_format, n_samples, device, dtype (as the summary shows them).
    """
    records = to_records(entries, results)
    bounds = chain_bounds(records, chain and all_layers)
    summary = build_summary(records, chain=chain, profile=profile_rows,
                            profile_note=profile_note, bounds=bounds, **context)
    return summary, records, bounds


def write_spectra(settings: SpectrumSettings, summary: dict, results: dict[str, EntryResult],
                  profile_rows: list[dict], bounds, indices, provenance: dict, *,
                  profile_count: np.ndarray | None = None) -> None:
    """The spectra file (docs/FORMAT.md, `kind = "spectra"`); profile_count: `(L,)` how
    many σ² values each profile row averages (what `jaccli merge` weights shards by)."""
    output = settings.output
    with ResultsWriter(output.path, kind="spectra", sample_index=indices, attrs=provenance,
                       compression=output.compression,
                       compression_level=output.compression_level) as writer:
        for row in summary["entries"]:
            result = results[row["name"]]
            group = writer.create_group(row["name"], parent="end_to_end" if row["kind"] ==
                                        "end_to_end" else "layers",
                                        attrs={"type": row["type"], "d_in": row["d_in"],
                                               "d_out": row["d_out"], "method": row["method"],
                                               "note": row["note"], "reason": row["reason"],
                                               "complete": row["complete"], "k": row["k"],
                                               "structure": row["structure"],
                                               "seconds": row["seconds"],
                                               "rank_tolerance": row["rank_tolerance"]})
            values = np.concatenate(result.values)
            name = "singular_values" if row["complete"] else "top_singular_values"
            group.create_dataset(name, data=values)
            if result.residuals:
                group.create_dataset("residual", data=np.concatenate(result.residuals))
            if result.converged:
                group.create_dataset("converged", data=np.concatenate(result.converged))
                group.attrs["tolerance"] = result.tolerance
            for quantity in result.quantities:
                group.create_dataset(quantity, data=result.array(quantity))
        writer.file.attrs["profile_note"] = summary["profile_note"]
        if profile_rows:
            g = writer.file.create_group("profile")
            g.attrs["layers"] = [r["layer"] for r in profile_rows]
            g.create_dataset("mean_sigma2", data=[r["mean_sigma2"] for r in profile_rows])
            g.create_dataset("var_sigma2", data=[r["var_sigma2"] for r in profile_rows])
            if profile_count is not None:
                g.create_dataset("count", data=np.asarray(profile_count, dtype=np.int64))
        if bounds is not None:
            g = writer.file.create_group("bounds")
            for key, values in bounds.items():
                g.create_dataset(key, data=values)
        writer.finish()

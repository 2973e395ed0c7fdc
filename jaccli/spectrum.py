"""The `spectrum` pipeline: singular values, norms and condition numbers of every Jacobian.

From a model and data: load -> plan (method per Jacobian) -> engine -> spectra -> writer /
summary. From a file written by `compute`: read each stored Jacobian in its compact form and
decompose it the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .compute import Inputs, load_inputs, make_engine, provenance, tf32_mode, to_tensor
from .config import ComputeConfig
from .engine.engine import JacobianEngine
from .engine.structures import Diagonal, Matrix, RowScaled, Selection, Structured
from .errors import UsageError
from .layers import ForwardRecorder, run_model
from .memory import memory_budget
from .output_guard import check_output
from .planner import Plan, make_plan
from .results import Results
from .spectra.conv_fft import conv2d_circular_singular_values
from .spectra.exact import Spectrum, exact_spectrum
from .spectra.lanczos import hutchinson_frobenius, top_singular_values
from .spectra.plan import SpectrumEntry, plan_spectra
from .spectra.quantities import all_quantities
from .spectra.summary import SpectrumOutcome, SpectrumRecord, build_summary, chain_bounds
from .writer import ResultsWriter


@dataclass
class SpectrumConfig(ComputeConfig):
    """`jaccli spectrum` options on top of `compute`'s (see `jaccli spectrum --help`)."""

    top_k: int | None = None
    exact: bool = False
    tol: float = 1e-8
    max_steps: int | None = None
    probes: int = 32
    profile: bool = True


@dataclass
class EntryResult:
    """Accumulated per-sample quantities of one Jacobian across batches."""

    entry: SpectrumEntry
    quantities: dict[str, list[np.ndarray]] = field(default_factory=dict)
    values: list[np.ndarray] = field(default_factory=list)
    residuals: list[np.ndarray] = field(default_factory=list)
    method: str = ""
    note: str = ""
    seconds: float = 0.0

    def add(self, spectrum: Spectrum, quantities: dict[str, torch.Tensor]) -> None:
        self.values.append(spectrum.values.detach().double().cpu().numpy())
        if spectrum.residuals is not None:
            self.residuals.append(spectrum.residuals.detach().double().cpu().numpy())
        for name, value in quantities.items():
            self.quantities.setdefault(name, []).append(value.detach().double().cpu().numpy())
        self.method, self.note = spectrum.method, spectrum.note

    def array(self, name: str) -> np.ndarray:
        return np.concatenate(self.quantities[name])


# ---------------------------------------------------------------------------- from a model


@dataclass
class SpectrumRun:
    """A planned spectrum run: inputs, the method per Jacobian, the engine, the batch size."""

    config: SpectrumConfig
    inputs: Inputs
    entries: list[SpectrumEntry]
    engine: JacobianEngine  # computes the Jacobians whose spectra come from their structure
    operators: JacobianEngine  # knows every layer: operators for the matrix-free ones
    plan: Plan
    batch_size: int


def prepare_spectrum(config: SpectrumConfig) -> SpectrumRun:
    """Load, trace and plan a spectrum run: which method for which Jacobian, batch size."""
    if config.top_k is not None and config.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    inputs = load_inputs(config)
    n = len(inputs.data)
    budget, source = memory_budget(inputs.device, config.max_memory)
    itemsize = torch.empty((), dtype=inputs.dtype).element_size()
    operators = make_engine(config, inputs.model, inputs.trace, n)
    entries = plan_spectra(operators, batch_size=1, itemsize=itemsize, budget=budget,
                           top_k=config.top_k, exact=config.exact)
    structured = {e.name for e in entries if e.method == "structured"}
    engine = JacobianEngine(
        inputs.model, inputs.trace,
        layers=[layer for layer in inputs.trace.layers if layer.name in structured],
        end_to_end=any(e.kind == "end_to_end" and e.method == "structured" for e in entries),
        n_samples=n, strict=config.strict_rules, mode=config.mode)
    plan = make_plan(engine, n_samples=n, dtype=inputs.dtype, device=inputs.device,
                     budget=budget, budget_source=source, store="compact",
                     batch_size=config.batch_size)
    # A Lanczos basis holds up to ~100 vectors per sample and Jacobian.
    krylov = sum(3 * min(e.d_in, e.d_out) * 100 * itemsize
                 for e in entries if e.method == "lanczos")
    batch = plan.batch_size if not krylov else max(1, min(plan.batch_size, budget // krylov))
    batch = config.batch_size or batch
    entries = plan_spectra(operators, batch_size=batch, itemsize=itemsize, budget=budget,
                           top_k=config.top_k, exact=config.exact)
    return SpectrumRun(config, inputs, entries, engine, operators, plan, batch)


def run_spectrum(config: SpectrumConfig, *, on_batch=None, run: SpectrumRun | None = None
                 ) -> SpectrumOutcome:
    """Compute the spectra; write them if `config.output` is set."""
    started = time.perf_counter()
    run = run or prepare_spectrum(config)
    inputs = run.inputs
    data, trace = inputs.data, inputs.trace
    results = {e.name: EntryResult(e) for e in run.entries}
    recorder = ForwardRecorder(inputs.model, inputs.loaded.hookable)
    cache: dict = {}
    profile = (_Profile(run.operators) if config.profile and trace.chain and trace.all_layers
               else None)
    with tf32_mode(config.tf32):
        for start in range(0, len(data), run.batch_size):
            stop = min(start + run.batch_size, len(data))
            x = to_tensor(data.read(start, stop), inputs.device, inputs.dtype)
            _, calls = run_model(recorder, x)
            records = {r.site: r for r in calls}
            structured = run.engine.compute(x, records)
            for entry in run.entries:
                begin = time.perf_counter()
                spectrum, quantities = _entry_spectrum(entry, run, structured, x, records,
                                                       cache)
                results[entry.name].add(spectrum, quantities)
                results[entry.name].seconds += time.perf_counter() - begin
            if profile is not None:
                profile.add(x, records, budget=run.plan.budget)
            if on_batch is not None:
                on_batch(stop - start)
    summary, records, bounds = _summary(
        config, run.entries, results, profile, inputs.loaded.source, len(data),
        run.plan.device, run.plan.dtype, trace.chain,
        all_layers=len(trace.layers) == len(trace.all_layers))
    if config.output is not None:
        _write(config, summary, results, profile, bounds, data.indices,
               provenance(config, inputs.loaded, data, run.plan, inputs.device))
        summary["output"] = str(config.output)
    summary["seconds"] = time.perf_counter() - started
    return SpectrumOutcome(summary, records, data.indices, bounds)


def _entry_spectrum(entry: SpectrumEntry, run: SpectrumRun, structured: dict, x, records,
                    cache) -> tuple[Spectrum, dict[str, torch.Tensor]]:
    n = x.shape[0]
    config = run.config
    if entry.method == "fft":
        module = entry.layer.modules[0]
        if entry.name not in cache:
            _, height, width = entry.layer.input_shape
            cache[entry.name] = conv2d_circular_singular_values(module.weight.to(x.dtype),
                                                                height, width)[None]
        spectrum = Spectrum(cache[entry.name].expand(n, -1), True, "fft")
        return _complete(spectrum, entry)
    if entry.method == "structured":
        jac = structured[entry.name]
        spectrum = exact_spectrum(jac, n, exact=config.exact, cache=cache, key=entry.name)
        if entry.k < spectrum.values.shape[1]:
            values = spectrum.values
            quantities = all_quantities(values, entry.d_out, entry.d_in)
            return Spectrum(values[:, :entry.k], False, spectrum.method, spectrum.note), \
                quantities
        return _complete(spectrum, entry)
    if entry.layer is not None:
        apply_j, apply_jt = run.operators.layer_operator(entry.layer, records)
    else:
        apply_j, apply_jt = run.operators.end_to_end_operator(x, records)
    result = top_singular_values(apply_j, apply_jt, n=n, d_in=entry.d_in, d_out=entry.d_out,
                                 k=entry.k, dtype=x.dtype, device=x.device, tol=config.tol,
                                 max_steps=config.max_steps)
    frob, frob_se = hutchinson_frobenius(apply_j, n=n, d_in=entry.d_in, dtype=x.dtype,
                                         device=x.device, probes=config.probes)
    spectrum = Spectrum(result.values, False, "lanczos",
                        f"top-{entry.k} by matrix-free Lanczos ({result.steps} steps); Frobenius "
                        f"norm estimated from {config.probes} Hutchinson probes (frobenius_se)",
                        result.residuals)
    quantities = {"spectral_norm": result.values[:, 0], "frobenius": frob,
                  "frobenius_se": frob_se,
                  "stable_rank": frob.square() / result.values[:, 0].square().clamp_min(1e-300)}
    return spectrum, quantities


def _complete(spectrum: Spectrum, entry: SpectrumEntry):
    return spectrum, all_quantities(spectrum.values, entry.d_out, entry.d_in)


class _Profile:
    """Dynamical-isometry profile: moments of σ² of the cumulative Jacobians J_{1:l}."""

    def __init__(self, engine: JacobianEngine):
        self.engine = engine
        self.names = [layer.name for layer in engine.trace.all_layers]
        self.sum_s2 = np.zeros(len(self.names))
        self.sum_s4 = np.zeros(len(self.names))
        self.count = np.zeros(len(self.names))
        self.skipped = ""

    def add(self, x, records, budget: int) -> None:
        if self.skipped:
            return
        d0 = self.engine.trace.all_layers[0].d_in
        widest = max(layer.d_out for layer in self.engine.trace.all_layers)
        need = 3 * x.shape[0] * widest * d0 * x.element_size()
        if need > budget:
            self.skipped = (f"cumulative Jacobians need {need / 2**30:.1f} GiB per batch, over "
                            "the memory budget")
            return
        for i, (_, block) in enumerate(self.engine.cumulative(x, records)):
            j = block.expand(x.shape[0], -1, -1)
            gram = j @ j.transpose(1, 2) if j.shape[1] <= j.shape[2] else \
                j.transpose(1, 2) @ j
            self.sum_s2[i] += gram.diagonal(dim1=1, dim2=2).sum().item()
            self.sum_s4[i] += gram.square().sum().item()
            self.count[i] += x.shape[0] * min(j.shape[1], j.shape[2])

    def rows(self) -> list[dict]:
        if self.skipped:
            return []
        mean = self.sum_s2 / np.maximum(self.count, 1)
        var = self.sum_s4 / np.maximum(self.count, 1) - mean**2
        return [{"layer": name, "mean_sigma2": float(m), "var_sigma2": float(v)}
                for name, m, v in zip(self.names, mean, var, strict=True)]


# ----------------------------------------------------------------------- from a results file


def structured_from_group(group, start: int, stop: int, dtype: torch.dtype) -> Structured:
    """Samples `start:stop` of a stored Jacobian, in its compact structured form."""
    g = group.group

    def t(name, rows=True):
        data = g[name][start:stop] if rows else g[name][()]
        return torch.from_numpy(np.asarray(data)).to(dtype)

    encoding = group.encoding
    if encoding == "dense":
        return Matrix(t("jacobian"))
    if encoding == "shared":
        return Matrix(t("matrix", False)[None], shared=True)
    if encoding == "shared-diagonal":
        return Diagonal(t("diagonal", False)[None], shared=True)
    if encoding == "diagonal":
        return Diagonal(t("diagonal"))
    if encoding == "row-scaled":
        return RowScaled(t("row_scale"), t("matrix", False)[None])
    if encoding == "selection":
        index = torch.from_numpy(np.asarray(g["selection"][start:stop])).long()
        return Selection(index, int(group.attrs["d_in"]), dtype)
    raise UsageError(f"{group.name}: unknown Jacobian encoding {encoding!r}")


def spectrum_from_results(config: SpectrumConfig, path: Path, *,
                          on_batch=None) -> SpectrumOutcome:
    """Spectra of the Jacobians stored in a `compute` results file (no model needed)."""
    started = time.perf_counter()
    if config.output is not None:
        check_output(config.output, [path])
    with Results(path) as source:
        if source.attrs.get("kind") != "jacobians":
            raise UsageError(f"{path} holds {source.attrs.get('kind')}, not Jacobians; "
                             "`jaccli spectrum` reads files written by `jaccli compute`")
        dtype = torch.float64 if source.attrs.get("dtype") == "float64" else torch.float32
        n = source.n_samples
        batch = config.batch_size or 256
        entries, results, cache = [], {}, {}
        for group in source.groups():
            d_in, d_out = int(group.attrs["d_in"]), int(group.attrs["d_out"])
            r = min(d_in, d_out)
            k = min(config.top_k, r) if config.top_k else r
            entry = SpectrumEntry(group.name, group.kind, group.type_name, d_in, d_out,
                                  group.encoding, "structured", k, "from the stored Jacobian")
            entries.append(entry)
            results[entry.name] = EntryResult(entry)
            begin = time.perf_counter()
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                jac = structured_from_group(group, start, stop, dtype)
                spectrum = exact_spectrum(jac, stop - start, exact=config.exact, cache=cache,
                                          key=entry.name)
                quantities = all_quantities(spectrum.values, d_out, d_in)
                if k < r:
                    spectrum = Spectrum(spectrum.values[:, :k], False, spectrum.method,
                                        spectrum.note)
                results[entry.name].add(spectrum, quantities)
            results[entry.name].seconds = time.perf_counter() - begin
        attrs = dict(source.attrs)
        indices = source.sample_index
    summary, records, bounds = _summary(config, entries, results, None,
                                        str(attrs.get("model_format", "")), n,
                       str(attrs.get("device", "")), str(attrs.get("dtype", "")),
                       bool(attrs.get("chain")), all_layers=True, model=str(attrs.get(
                           "model_path", "")), data=str(attrs.get("data_path", "")))
    summary["source"] = str(path)
    if config.output is not None:
        provenance = {k: v for k, v in attrs.items()
                      if k not in ("format", "format_version", "kind", "complete")}
        provenance |= {"command": config.command_line, "source_results": str(path)}
        _write(config, summary, results, None, bounds, indices, provenance)
        summary["output"] = str(config.output)
    summary["seconds"] = time.perf_counter() - started
    if on_batch is not None:
        on_batch(n)
    return SpectrumOutcome(summary, records, indices, bounds)


# ------------------------------------------------------------------------ summary and file


def _records(entries: list[SpectrumEntry], results: dict[str, EntryResult]
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
            np.concatenate(result.residuals) if result.residuals else None))
    return records


def _summary(config, entries, results, profile, model_format, n, device, dtype, chain, *,
             all_layers: bool, model: str | None = None, data: str | None = None):
    records = _records(entries, results)
    bounds = chain_bounds(records, chain and all_layers)
    summary = build_summary(
        records, model=model or str(config.model), data=data or str(config.data),
        model_format=model_format, n_samples=n, device=device, dtype=dtype, chain=chain,
        profile=profile.rows() if profile is not None else [],
        profile_note=(profile.skipped if profile is not None
                      else "" if chain else "not a chain model: no cumulative Jacobians"),
        bounds=bounds)
    return summary, records, bounds


def _write(config, summary, results, profile, bounds, indices, provenance: dict) -> None:
    with ResultsWriter(config.output, kind="spectra", sample_index=indices, attrs=provenance,
                       compression=config.compression,
                       compression_level=config.compression_level) as writer:
        for row in summary["entries"]:
            result = results[row["name"]]
            group = writer.create_group(row["name"], parent="end_to_end" if row["kind"] ==
                                        "end_to_end" else "layers",
                                        attrs={"type": row["type"], "d_in": row["d_in"],
                                               "d_out": row["d_out"], "method": row["method"],
                                               "note": row["note"], "reason": row["reason"],
                                               "complete": row["complete"], "k": row["k"],
                                               "structure": row["structure"],
                                               "seconds": row["seconds"]})
            values = np.concatenate(result.values)
            name = "singular_values" if row["complete"] else "top_singular_values"
            group.create_dataset(name, data=values)
            if result.residuals:
                group.create_dataset("residual", data=np.concatenate(result.residuals))
            for quantity in result.quantities:
                group.create_dataset(quantity, data=result.array(quantity))
        writer.file.attrs["profile_note"] = summary["profile_note"]
        if profile is not None and profile.rows():
            rows = profile.rows()
            g = writer.file.create_group("profile")
            g.attrs["layers"] = [r["layer"] for r in rows]
            g.create_dataset("mean_sigma2", data=[r["mean_sigma2"] for r in rows])
            g.create_dataset("var_sigma2", data=[r["var_sigma2"] for r in rows])
        if bounds is not None:
            g = writer.file.create_group("bounds")
            for key, values in bounds.items():
                g.create_dataset(key, data=values)
        writer.finish()


__all__ = ["SpectrumConfig", "prepare_spectrum", "run_spectrum", "spectrum_from_results"]

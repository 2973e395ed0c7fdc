"""The `spectrum` pipeline from a model: load -> plan (a method per Jacobian, then the batch
size) -> engine -> spectra -> writer / summary."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import UsageError
from ..reports.spectrum_summary import SpectrumOutcome
from ..settings import SpectrumSettings
from ..spectra.conv_fft import conv2d_circular_singular_values
from ..spectra.exact import Spectrum, exact_spectrum
from ..spectra.lanczos import hutchinson_frobenius, top_singular_values
from ..spectra.plan import SpectrumEntry, plan_spectra
from ..spectra.quantities import all_quantities
from ..spectra.shared import SHARED_BLOCK, shared_max_steps
from .common import (
    Inputs,
    check_independence,
    guard_output,
    load_inputs,
    provenance,
)
from .engines import Engine, make_engine
from .memory import Term
from .planner import Plan, in_effect, make_plan
from .resources import baseline_memory, memory_budget, tf32_mode
from .spectrum_output import EntryResult, summarize, write_spectra
from .spectrum_shared import shared_lanczos

# A Lanczos basis holds up to ~100 vectors per sample and Jacobian, three times over.
KRYLOV_VECTORS = 100


@dataclass
class SpectrumRun:
    """A planned spectrum run: inputs, the method per Jacobian, the engine, the batch size.

    plan: the memory plan of the Jacobians whose spectra come from their structure.
    """

    settings: SpectrumSettings
    inputs: Inputs
    entries: list[SpectrumEntry]
    engine: Engine
    plan: Plan
    batch_size: int


def prepare_spectrum(settings: SpectrumSettings) -> SpectrumRun:
    """Load, trace and plan a spectrum run, once: first the method for each Jacobian (what
    one sample needs), then the batch size that fits a batch of those methods."""
    if settings.top_k is not None and settings.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    guard_output(settings.output, settings.model, settings.data)
    inputs = load_inputs(settings.model, settings.data, settings.run)
    n = len(inputs.data)
    budget, source = memory_budget(inputs.device, settings.run.max_memory)
    itemsize = torch.empty((), dtype=inputs.dtype).element_size()
    engine = make_engine(inputs, settings.layers, settings.run)
    entries = plan_spectra(engine.entries, itemsize=itemsize, budget=budget,
                           top_k=settings.top_k, exact=settings.exact)
    structured = {e.name for e in entries if e.method == "structured"}
    plan = make_plan(engine, n_samples=n, dtype=inputs.dtype, device=inputs.device,
                     budget=budget, budget_source=source, store="compact",
                     batch_size=settings.run.batch_size, names=structured,
                     in_effect=in_effect(settings, inputs, writing=False),
                     extra_terms=decomposition_terms(entries, itemsize, settings),
                     baseline=baseline_memory(inputs.device))
    check_independence(inputs, plan.batch_size)
    return SpectrumRun(settings, inputs, entries, engine, plan, plan.batch_size)


def decomposition_terms(entries: list[SpectrumEntry], itemsize: int,
                        settings: SpectrumSettings) -> list[Term]:
    """What decomposing one batch holds: the largest SVD / Gram workspace of the structured
    entries (one entry at a time), and the largest Lanczos basis (`KRYLOV_VECTORS` vectors
    per sample, three times over)."""
    shared = per_sample = 0
    for e in entries:
        if e.method != "structured":
            continue
        r = min(e.d_in, e.d_out)
        if e.structure in ("shared", "shared-operator"):  # one svdvals for all samples
            shared = max(shared, 4 * e.d_in * e.d_out * itemsize)
        elif e.structure == "row-scaled" and not settings.exact:  # float64 Gram matrices
            shared = max(shared, 8 * (e.d_in * e.d_out + e.d_out ** 2))
            per_sample = max(per_sample, 8 * (2 * r * r + (e.d_in * e.d_out
                                                          if e.d_out > e.d_in else 0)))
        elif e.structure in ("dense", "row-scaled"):  # batched svdvals of dense matrices
            per_sample = max(per_sample, 3 * e.d_in * e.d_out * itemsize)
    krylov = max((3 * min(e.d_in, e.d_out) * KRYLOV_VECTORS * itemsize for e in entries
                  if e.method == "lanczos" and not e.shared), default=0)
    shared_krylov = max((shared_krylov_bytes(e, itemsize, settings.max_steps) for e in entries
                         if e.method == "lanczos" and e.shared), default=0)
    fixes = (["--top-k K"] if settings.top_k is None else []) + (
        ["--layers"] if settings.layers.include_layers else [])
    terms = [Term("the decompositions", shared, per_sample,
                  "(SVD and Gram workspaces of the largest Jacobian)", fixes)]
    if krylov or shared_krylov:
        terms.append(Term("the Lanczos bases", shared_krylov, krylov,
                          f"({KRYLOV_VECTORS} Krylov vectors a sample, three times over; a "
                          "shared operator's basis and images once)",
                          ["--layers"] if settings.layers.include_layers else []))
    return terms


def shared_krylov_bytes(entry: SpectrumEntry, itemsize: int, max_steps: int | None) -> int:
    """What the one Lanczos run of a shared operator holds: its basis and their images
    (`2 · steps · min(D_out, D_in)` values) and the operator's output for one block."""
    dim = min(entry.d_in, entry.d_out)
    steps = min(max_steps or shared_max_steps(entry.k, dim), dim)
    return (2 * steps * dim + 2 * SHARED_BLOCK * max(entry.d_in, entry.d_out)) * itemsize


@dataclass
class SpectrumParts:
    """What a spectrum run over some samples holds before its summary: each Jacobian's
    per-sample results (`EntryResult`), the depth profile's sums (or None), and its note."""

    results: dict[str, EntryResult]
    profile: ProfileSums | None
    profile_note: str


def run_spectrum(settings: SpectrumSettings, *, on_batch=None, run: SpectrumRun | None = None
                 ) -> SpectrumOutcome:
    """Compute the spectra; write them if an output is set. `on_batch(samples, note=...)` is
    called after each Jacobian of each batch with that Jacobian's share of the batch."""
    started = time.perf_counter()
    run = run or prepare_spectrum(settings)
    parts = spectrum_parts(run, on_batch=on_batch)
    outcome = spectrum_outcome(run, parts, n_samples=len(run.inputs.data),
                               device=run.plan.device)
    if settings.output.path is not None:
        write_spectrum_file(run, parts, outcome, settings.output.path)
    outcome.summary["seconds"] = time.perf_counter() - started
    return outcome


def spectrum_parts(run: SpectrumRun, *, on_batch=None) -> SpectrumParts:
    """The spectra of every planned Jacobian for every sample of `run`."""
    settings, inputs = run.settings, run.inputs
    data, engine = inputs.data, run.engine
    results = {e.name: EntryResult(e) for e in run.entries}
    structured = {e.name for e in run.entries if e.method == "structured"}
    cache: dict = {}
    layers = [e.name for e in engine.entries if e.kind == "layer"]
    profile = (_Profile(engine, layers) if settings.profile and engine.chain and layers
               and _all_layers(run) else None)
    with tf32_mode(settings.run.tf32):
        for start in range(0, len(data), run.batch_size):
            stop = min(start + run.batch_size, len(data))
            x, held = inputs.batch(start, stop)
            jacobians = engine.compute(x, names=structured, chunk_size=run.plan.chunk_size,
                                       held=held) if structured else {}
            for i, entry in enumerate(run.entries):
                begin = time.perf_counter()
                spectrum, quantities = _entry_spectrum(entry, run, jacobians, x, held, cache,
                                                       data.indices[start:stop])
                results[entry.name].add(spectrum, quantities)
                results[entry.name].seconds += time.perf_counter() - begin
                if on_batch is not None:  # a share of the batch per layer decomposed
                    on_batch((stop - start) / len(run.entries),
                             note=f"layer {i + 1}/{len(run.entries)} {entry.name}")
            if profile is not None:
                profile.add(x, held, budget=run.plan.budget)
    for e in engine.entries:  # what the engine says about an entry (outputs, inputs used)
        if e.note and e.name in results:
            results[e.name].note = "; ".join(filter(None, [results[e.name].note, e.note]))
    note = (profile.sums.skipped if profile is not None
            else "" if engine.chain else "not a chain model: no cumulative Jacobians")
    return SpectrumParts(results, profile.sums if profile is not None else None, note)


def spectrum_outcome(run: SpectrumRun, parts: SpectrumParts, *, n_samples: int,
                     device: str, indices: np.ndarray | None = None) -> SpectrumOutcome:
    """The summary and per-sample records of `parts` (over `n_samples` samples, rows
    `indices` of the data file, by default the run's)."""
    settings, inputs = run.settings, run.inputs
    summary, records, bounds = summarize(
        run.entries, parts.results, profile_rows=parts.profile.rows() if parts.profile
        is not None else [], profile_note=parts.profile_note, chain=run.engine.chain,
        all_layers=_all_layers(run), model=str(settings.model.path),
        data=str(settings.data.path), model_format=inputs.loaded.source, n_samples=n_samples,
        device=device, dtype=run.plan.dtype)
    return SpectrumOutcome(summary, records,
                           inputs.data.indices if indices is None else indices, bounds)


def spectrum_attrs(run: SpectrumRun) -> dict:
    """The root attributes (provenance) of this run's spectra file."""
    from .compute import options_fingerprint

    engine = run.engine
    return provenance(run.settings.command_line, run.inputs, chain=engine.chain,
                      batch_size=run.batch_size, engine=engine.path, engine_note=engine.note,
                      spectrum_options_sha256=options_fingerprint(run.settings))


def write_spectrum_file(run: SpectrumRun, parts: SpectrumParts, outcome: SpectrumOutcome,
                        path, attrs: dict | None = None) -> None:
    """The spectra file of `outcome` at `path` (root attributes `attrs`, by default
    `spectrum_attrs(run)`)."""
    profile = parts.profile
    write_spectra(replace(run.settings, output=replace(run.settings.output, path=path)),
                  outcome.summary, parts.results,
                  profile.rows() if profile is not None else [], outcome.bounds,
                  outcome.sample_index, spectrum_attrs(run) if attrs is None else attrs,
                  profile_count=profile.count if profile is not None else None)
    outcome.summary["output"] = str(path)


def _all_layers(run: SpectrumRun) -> bool:
    """Whether every layer of the model is analysed (the chain bound needs them all)."""
    return not run.settings.layers.patterns and run.settings.layers.include_layers


def _entry_spectrum(entry: SpectrumEntry, run: SpectrumRun, structured: dict, x, held,
                    cache, indices) -> tuple[Spectrum, dict[str, torch.Tensor]]:
    n = x.shape[0]
    settings = run.settings
    if entry.method == "fft":
        module = entry.module
        if entry.name not in cache:
            _, height, width = entry.input_shape
            cache[entry.name] = conv2d_circular_singular_values(module.weight.to(x.dtype),
                                                                height, width)[None]
        spectrum = Spectrum(cache[entry.name].expand(n, -1), True, "fft")
        return _complete(spectrum, entry)
    if entry.method == "structured":
        jac = structured[entry.name]
        spectrum = exact_spectrum(jac, n, exact=settings.exact, cache=cache, key=entry.name)
        if entry.k < spectrum.values.shape[1]:
            values = spectrum.values
            quantities = all_quantities(values, entry.d_out, entry.d_in, spectrum.method)
            return Spectrum(values[:, :entry.k], False, spectrum.method, spectrum.note), \
                quantities
        return _complete(spectrum, entry)
    if entry.shared:
        return shared_lanczos(entry, run, x, held, cache)
    apply_j, apply_jt = run.engine.operator(entry.name, x, held)
    result = top_singular_values(apply_j, apply_jt, n=n, d_in=entry.d_in, d_out=entry.d_out,
                                 k=entry.k, dtype=x.dtype, device=x.device, tol=settings.tol,
                                 max_steps=settings.max_steps, indices=indices)
    frob, frob_se = hutchinson_frobenius(apply_j, n=n, d_in=entry.d_in, dtype=x.dtype,
                                         device=x.device, probes=settings.probes,
                                         apply_jt=apply_jt, indices=indices)
    spectrum = Spectrum(result.values, False, "lanczos",
                        f"top-{entry.k} by matrix-free Lanczos ({result.steps} Krylov vectors, "
                        f"residual tolerance {result.tolerance:.1e}); Frobenius norm estimated "
                        f"by Hutch++ from {settings.probes} probes (frobenius_se)",
                        result.residuals, result.converged, result.tolerance)
    quantities = {"spectral_norm": result.values[:, 0], "frobenius": frob,
                  "frobenius_se": frob_se,
                  "stable_rank": frob.square() / result.values[:, 0].square().clamp_min(1e-300)}
    return spectrum, quantities


def _complete(spectrum: Spectrum, entry: SpectrumEntry):
    return spectrum, all_quantities(spectrum.values, entry.d_out, entry.d_in, spectrum.method)


@dataclass
class ProfileSums:
    """Sums over samples of σ² and σ⁴ of each cumulative Jacobian J_{1:l}, and how many σ²
    values they hold (`(L,)` each); skipped: why there is no profile."""

    names: list[str]
    sum_s2: np.ndarray
    sum_s4: np.ndarray
    count: np.ndarray
    skipped: str = ""

    @classmethod
    def combine(cls, parts: list[ProfileSums]) -> ProfileSums:
        """The sums over all of `parts` (one shard of the samples each)."""
        skipped = next((p.skipped for p in parts if p.skipped), "")
        return cls(parts[0].names, sum(p.sum_s2 for p in parts),
                   sum(p.sum_s4 for p in parts), sum(p.count for p in parts), skipped)

    def rows(self) -> list[dict]:
        if self.skipped:
            return []
        mean = self.sum_s2 / np.maximum(self.count, 1)
        var = self.sum_s4 / np.maximum(self.count, 1) - mean**2
        return [{"layer": name, "mean_sigma2": float(m), "var_sigma2": float(v)}
                for name, m, v in zip(self.names, mean, var, strict=True)]


class _Profile:
    """Dynamical-isometry profile: moments of σ² of the cumulative Jacobians J_{1:l}."""

    def __init__(self, engine: Engine, names: list[str]):
        self.engine = engine
        self.sums = ProfileSums(names, np.zeros(len(names)), np.zeros(len(names)),
                                np.zeros(len(names)))

    def add(self, x, held, budget: int) -> None:
        sums = self.sums
        if sums.skipped:
            return
        widest = max(e.d_out for e in self.engine.entries if e.kind == "layer")
        need = 3 * x.shape[0] * widest * math.prod(self.engine.input_shape) * x.element_size()
        if need > budget:
            sums.skipped = (f"cumulative Jacobians need {need / 2**30:.1f} GiB per batch, over "
                            "the memory budget")
            return
        for i, (_, block) in enumerate(self.engine.cumulative(x, held)):
            j = block.expand(x.shape[0], -1, -1)
            gram = j @ j.transpose(1, 2) if j.shape[1] <= j.shape[2] else \
                j.transpose(1, 2) @ j
            sums.sum_s2[i] += gram.diagonal(dim1=1, dim2=2).sum().item()
            sums.sum_s4[i] += gram.square().sum().item()
            sums.count[i] += x.shape[0] * min(j.shape[1], j.shape[2])

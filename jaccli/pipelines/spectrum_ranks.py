"""`spectrum` (and `check`) under torchrun, both forms (the split, exchanges and --resume
are `ranked`): each rank decomposes its shard of the samples, from the model or from the
rows of a results file, into its shard spectra file; rank 0 writes TARGET over the shard
files (the `jaccli merge` code). The summary is that of one process over all samples: rank 0
gathers every rank's per-sample records (so percentiles, histograms and worst samples are
exact) and the depth profile's sums."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..io.results.merge import merge_results
from ..reports.show import read_spectra
from ..reports.spectrum_summary import SpectrumOutcome, SpectrumRecord, build_summary
from ..settings import SpectrumSettings
from .common import guard_output
from .compute import options_fingerprint
from .distributed import Launch
from .ranked import run_ranked
from .spectrum import (
    ProfileSums,
    SpectrumRun,
    prepare_spectrum,
    spectrum_attrs,
    spectrum_outcome,
    spectrum_parts,
    write_spectrum_file,
)


@dataclass
class RankOutcome:
    """What one rank sends to rank 0: its samples' outcome and its profile sums."""

    outcome: SpectrumOutcome
    profile: ProfileSums | None


def run_ranked_spectrum(settings: SpectrumSettings, launch: Launch, *,
                        source: Path | None = None, read_back: bool = False
                        ) -> SpectrumOutcome | None:
    """Spectra of `settings` (of the results file `source` when given: its Jacobians
    decomposed, or with `read_back` a spectra file's rows read) as rank `launch.rank`; the
    outcome over all ranks on rank 0, None on the others. Raises on every rank when any
    rank failed."""
    job = _FileJob(settings, launch, source, read_back) if source is not None \
        else _ModelJob(settings, launch)
    return run_ranked(job, launch, settings.output.path, resume=settings.resume)


class _Job:
    """What both forms share: this rank's settings, reading reused files, the finish."""

    kind = "spectra"

    def __init__(self, settings: SpectrumSettings, launch: Launch):
        self.settings, self.launch = settings, launch
        self.started = time.perf_counter()

    def mine(self, shard_file: Path | None) -> SpectrumSettings:
        s = self.settings
        return replace(s, data=self.launch.selection(s.data),
                       run=replace(s.run, device=self.launch.device),
                       output=replace(s.output, path=shard_file))

    def read(self, files: list[Path]) -> RankOutcome:
        parts = [read_spectra(path) for path in files]
        first = parts[0].summary
        return RankOutcome(combine(parts, profile_rows=first["profile"],
                                   profile_note=first["profile_note"], device=""),
                           _profile_of(files))

    def finish(self, outcomes: list[RankOutcome], files: list[Path], devices: list[str]
               ) -> SpectrumOutcome:
        profile = None
        if all(o.profile is not None for o in outcomes) and outcomes:
            profile = ProfileSums.combine([o.profile for o in outcomes])
        first = outcomes[0].outcome.summary
        note = profile.skipped if profile is not None and profile.skipped \
            else first["profile_note"]
        outcome = combine([o.outcome for o in outcomes],
                          profile_rows=profile.rows() if profile is not None else [],
                          profile_note=note, device=", ".join(devices))
        if getattr(self, "source", None) is not None:
            outcome.summary["source"] = str(self.source)
        target = self.settings.output.path
        if target is not None:
            merge_results(files, target, command=self.settings.command_line)
            outcome.summary["output"] = str(target)
        outcome.summary["seconds"] = time.perf_counter() - self.started
        return outcome


class _ModelJob(_Job):
    run: SpectrumRun

    def guard(self) -> None:
        guard_output(self.settings.output, self.settings.model, self.settings.data)

    def plan(self, shard_file: Path | None) -> tuple[int, int, dict | None]:
        self.run = prepare_spectrum(self.mine(shard_file))
        data = self.run.inputs.data
        attrs = spectrum_attrs(self.run) if shard_file is not None else None
        return data.offset, data.offset + len(data), attrs

    def compute(self, shard_file: Path | None, attrs: dict | None) -> RankOutcome:
        run = self.run
        parts = spectrum_parts(run)
        outcome = spectrum_outcome(run, parts, n_samples=len(run.inputs.data),
                                   device=run.plan.device)
        if shard_file is not None:
            write_spectrum_file(run, parts, outcome, shard_file, attrs)
        return RankOutcome(outcome, parts.profile)


class _FileJob(_Job):
    """The rows of a results file: Jacobians decomposed (spectrum, check), or a spectra
    file's rows read back (check)."""

    def __init__(self, settings: SpectrumSettings, launch: Launch, source: Path,
                 read_back: bool):
        super().__init__(settings, launch)
        self.source, self.read_back = source, read_back

    def guard(self) -> None:
        guard_output(self.settings.output, None, None, self.source)

    def plan(self, shard_file: Path | None) -> tuple[int, int, dict | None]:
        from ..io.results import Results
        from .spectrum_file import sample_rows

        self.settings_mine = self.mine(shard_file)
        with Results(self.source) as results:
            rows = sample_rows(self.settings_mine, results.n_samples, self.source)
            index = np.asarray(results.sample_index[rows])
            attrs = {key: results.attrs.get(key, "") for key in ("model_sha256",
                                                                 "data_sha256")}
        start = int(index[0]) if len(index) else 0
        # what a reusable shard file must hold: this source's rows, these options
        attrs |= {"source_results": str(self.source),
                  "spectrum_options_sha256": options_fingerprint(self.settings_mine)}
        return start, start + len(index), attrs if shard_file is not None else None

    def compute(self, shard_file: Path | None, attrs: dict | None) -> RankOutcome:
        from .spectrum_file import spectra_of_file, spectrum_from_results

        run = spectra_of_file if self.read_back else spectrum_from_results
        return RankOutcome(run(self.settings_mine, self.source), None)


def combine(outcomes: list[SpectrumOutcome], *, profile_rows: list[dict],
            profile_note: str, device: str) -> SpectrumOutcome:
    """One outcome over the samples of `outcomes` (consecutive shards, in order): records
    and chain bounds joined sample by sample, the summary rebuilt from them."""
    first = outcomes[0]
    records = [_joined([o.records[i] for o in outcomes]) for i in range(len(first.records))]
    bounds = None if first.bounds is None else {
        key: np.concatenate([o.bounds[key] for o in outcomes]) for key in first.bounds}
    indices = np.concatenate([o.sample_index for o in outcomes])
    s = first.summary
    summary = build_summary(records, model=s["model"], data=s["data"],
                            model_format=s["model_format"], n_samples=len(indices),
                            device=device or s["device"], dtype=s["dtype"], chain=s["chain"],
                            profile=profile_rows, profile_note=profile_note, bounds=bounds)
    if "source" in s:
        summary["source"] = s["source"]
    return SpectrumOutcome(summary, records, indices, bounds)


def _joined(parts: list[SpectrumRecord]) -> SpectrumRecord:
    def cat(name):
        arrays = [getattr(p, name) for p in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    last = parts[-1]
    return replace(last, seconds=sum(p.seconds for p in parts), values=cat("values"),
                   quantities={q: np.concatenate([p.quantities[q] for p in parts])
                               for q in last.quantities},
                   residuals=cat("residuals"), converged=cat("converged"))


def _profile_of(files: list[Path]) -> ProfileSums | None:
    """The profile sums stored in spectra files (moments times counts), or None."""
    import h5py

    sums = []
    for path in files:
        with h5py.File(path, "r") as f:
            if "profile" not in f or "count" not in f["profile"]:
                return None
            g = f["profile"]
            count = g["count"][:].astype(np.float64)
            mean, var = g["mean_sigma2"][:], g["var_sigma2"][:]
            names = [x.decode() if isinstance(x, bytes) else str(x) for x in g.attrs["layers"]]
            sums.append(ProfileSums(names, mean * count, (var + mean ** 2) * count, count))
    return ProfileSums.combine(sums)

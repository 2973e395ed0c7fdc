"""`compute` under torchrun (the split, exchanges and --resume are `ranked`): each rank
computes its shard of the samples into its shard file, rank 0 writes TARGET, virtual datasets
over the shard files (the `jaccli merge` code). The summary is that of one process over all
samples: rank 0 gathers every rank's per-sample norms."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import ResultsFormatError
from ..io.results.merge import merge_results
from ..io.results.reader import open_results
from ..reports.summary import Summary
from ..settings import ComputeSettings
from .common import guard_output
from .compute import Outcome, Prepared, compute_outcome, prepare, results_attrs, summarize
from .distributed import Launch
from .ranked import RankFailed, run_ranked

__all__ = ["RankFailed", "run_ranked_compute"]


def run_ranked_compute(settings: ComputeSettings, launch: Launch, *, on_batch=None
                       ) -> Summary | None:
    """Run `settings` as rank `launch.rank` of a torchrun launch; the summary over all ranks
    on rank 0, None on the others. Raises on every rank when any rank failed."""
    job = _ComputeJob(settings, launch, on_batch)
    return run_ranked(job, launch, settings.output.path, resume=settings.resume)


class _ComputeJob:
    kind = "jacobians"

    def __init__(self, settings: ComputeSettings, launch: Launch, on_batch):
        self.settings, self.launch, self.on_batch = settings, launch, on_batch
        self.started = time.perf_counter()
        self.prepared: Prepared | None = None
        self.samples = (0, 0)

    def guard(self) -> None:
        s = self.settings
        guard_output(s.output, s.model, s.data, s.params.targets)

    def plan(self, shard_file: Path | None) -> tuple[int, int, dict | None]:
        s, launch = self.settings, self.launch
        mine = replace(s, data=launch.selection(s.data),
                       run=replace(s.run, device=launch.device))
        if shard_file is not None:
            mine = replace(mine, output=replace(s.output, path=shard_file))
        self.prepared = prepare(mine)
        data = self.prepared.inputs.data
        attrs = results_attrs(self.prepared) if shard_file is not None else None
        return data.offset, data.offset + len(data), attrs

    def compute(self, shard_file: Path | None, attrs: dict | None) -> Outcome:
        p = self.prepared
        if shard_file is None:
            return compute_outcome(p, on_batch=self.on_batch)
        p.settings = replace(p.settings, output=replace(p.settings.output, path=shard_file))
        return compute_outcome(p, on_batch=self.on_batch, attrs=attrs)

    def read(self, files: list[Path]) -> Outcome:
        """The norms and seconds stored in reused shard files (in sample order)."""
        names = [e.name for e in self.prepared.plan.entries]
        norms: dict[str, list] = {name: [] for name in names}
        seconds = dict.fromkeys(names, 0.0)
        batch_size = 0
        for path in files:
            with open_results(path) as results:
                groups = {g.name: g for g in results.groups()}
                if set(groups) != set(names):
                    raise ResultsFormatError(f"{path} holds other results than this run "
                                             "plans; rerun without --resume")
                for name in names:
                    norms[name].append(np.asarray(groups[name]["frobenius"],
                                                  dtype=np.float64))
                    seconds[name] += float(groups[name].attrs.get("seconds", 0.0))
                batch_size = max(batch_size, int(results.attrs.get("batch_size", 0)))
        return Outcome({n: np.concatenate(v) for n, v in norms.items()}, seconds, batch_size)

    def finish(self, outcomes: list[Outcome], files: list[Path], devices: list[str]
               ) -> Summary:
        prepared, target = self.prepared, self.settings.output.path
        output_bytes = 0
        if target is not None:
            merge_results(files, target, command=prepared.settings.command_line)
            output_bytes = target.stat().st_size + sum(f.stat().st_size for f in files)
        names = [e.name for e in prepared.plan.entries]
        outcome = Outcome({n: np.concatenate([o.norms[n] for o in outcomes]) for n in names},
                          {n: sum(o.seconds[n] for o in outcomes) for n in names},
                          max(o.batch_size for o in outcomes))
        settings = replace(prepared.settings, output=self.settings.output,
                           data=replace(prepared.settings.data, shard=None))
        whole = replace(prepared, settings=settings)
        return summarize(whole, outcome, n_samples=len(outcome.norms[names[0]]) if names
                         else 0, device=", ".join(devices), output_bytes=output_bytes,
                         seconds=time.perf_counter() - self.started)

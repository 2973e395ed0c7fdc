"""`compute` under torchrun: each rank computes its contiguous shard of the samples into
`TARGET.parts/rank-RRRRR.h5` (a `--shard` file), or with `--resume` reuses the shard files
that hold exactly its samples with this run's provenance; rank 0 then writes TARGET, virtual
datasets over the shard files (the `jaccli merge` code). The summary is that of one process
over all samples: rank 0 gathers every rank's per-sample norms.

Three exchanges, each reached by every rank whatever failed before it: after loading and
planning, after computing, after writing TARGET. A failure anywhere stops every rank with a
non-zero exit; shard files already finished stay, TARGET is not written.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import JaccliError, OutputError, ResultsFormatError, UsageError
from ..io.results.format import decode_attr, encode_attr
from ..io.results.merge import differing_key, merge_results, read_shard
from ..io.results.reader import open_results
from ..reports.summary import Summary
from ..settings import ComputeSettings
from .common import guard_output
from .compute import Outcome, Prepared, compute_outcome, prepare, results_attrs, summarize
from .distributed import Launch


class RankFailed(JaccliError):
    """Another rank failed: this one stops too (that rank printed the reason)."""


@dataclass
class Status:
    """What a rank reports at an exchange: whether its step worked (and why not), and after
    planning, its samples [start, stop) and the shard files it reuses (names in the parts
    folder; empty: it computes its shard)."""

    error: str = ""
    start: int = 0
    stop: int = 0
    reuse: tuple[str, ...] = ()


def parts_folder(target: Path) -> Path:
    """Where the ranks' shard files of `target` go: `TARGET.parts/` beside it."""
    return target.with_name(target.name + ".parts")


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.h5"


def run_ranked(settings: ComputeSettings, launch: Launch, *, on_batch=None
               ) -> Summary | None:
    """Run `settings` as rank `launch.rank` of a torchrun launch; the summary over all ranks
    on rank 0, None on the others. Raises on every rank when any rank failed."""
    started = time.perf_counter()
    target = settings.output.path
    folder = parts_folder(target) if target is not None else None
    # 1. load, check and plan this rank's shard; find the shard files it may reuse
    prepared, attrs, status = None, None, Status()
    try:
        prepared, attrs, status = _plan(settings, launch, folder)
    except Exception as exc:  # every rank must reach the exchange below
        failure = exc
    else:
        failure = None
    planned = statuses = launch.exchange(replace(status, error=_why(failure)))
    _stop_if_failed(statuses, launch, failure, target)
    # 2. compute the shard (or read the norms of the files it reuses)
    files, outcome, failure = list(status.reuse), None, None
    try:
        if status.reuse:
            files = [folder / name for name in status.reuse]
            outcome = _read_outcome(files, prepared)
        else:
            files, outcome = _compute(prepared, attrs, launch, folder, statuses, on_batch)
    except Exception as exc:
        failure = exc
    statuses = launch.exchange(Status(error=_why(failure)))
    _stop_if_failed(statuses, launch, failure, target)
    # 3. rank 0 joins the shards into TARGET and the norms into one summary
    parts = launch.gather((outcome, [str(f) for f in files], launch.device))
    summary, failure = None, None
    if launch.is_main:
        try:
            summary = _finish(prepared, parts, planned, target, started)
        except Exception as exc:
            failure = exc
    statuses = launch.exchange(Status(error=_why(failure)))
    _stop_if_failed(statuses, launch, failure, target)
    return summary


def _plan(settings: ComputeSettings, launch: Launch, folder: Path | None):
    if settings.resume and folder is None:
        raise UsageError("--resume needs -o FILE: it reuses the shard files in FILE.parts/")
    mine = replace(settings, data=launch.selection(settings.data),
                   run=replace(settings.run, device=launch.device))
    if folder is not None:
        if launch.is_main:  # TARGET itself: not an input, and writable, before any work
            guard_output(settings.output, settings.model, settings.data,
                         settings.params.targets)
        elif not folder.parent.is_dir():  # rank 0's guard says the same; no race on mkdir
            raise OutputError(f"cannot write -o {settings.output.path}: the folder "
                              f"{folder.parent} does not exist")
        folder.mkdir(exist_ok=True)
        mine = replace(mine, output=replace(settings.output, path=rank_file(folder,
                                                                            launch.rank)))
    prepared = prepare(mine)
    data = prepared.inputs.data
    start, stop = data.offset, data.offset + len(data)
    attrs = results_attrs(prepared) if folder is not None else None
    reuse = _reusable(folder, start, stop, attrs) if settings.resume else []
    return prepared, attrs, Status("", start, stop, tuple(p.name for p in reuse))


def _compute(prepared: Prepared, attrs, launch: Launch, folder: Path | None,
             statuses: list[Status], on_batch) -> tuple[list[Path], Outcome]:
    if folder is None:
        return [], compute_outcome(prepared, on_batch=on_batch)
    path = rank_file(folder, launch.rank)
    if path.name in {name for s in statuses for name in s.reuse}:  # another rank reuses it
        mine = statuses[launch.rank]
        path = folder / f"rank-{launch.rank:05d}-{mine.start}-{mine.stop}.h5"
    settings = prepared.settings
    prepared.settings = replace(settings, output=replace(settings.output, path=path))
    return [path], compute_outcome(prepared, on_batch=on_batch, attrs=attrs)


def _reusable(folder: Path, start: int, stop: int, attrs: dict) -> list[Path]:
    """Complete shard files in `folder` with this run's provenance (model and data hashes,
    options) that tile samples [start, stop) exactly; [] when there are none."""
    expected = {key: decode_attr(encode_attr(value)) for key, value in attrs.items()}
    by_start: dict[int, list] = {}
    for path in sorted(folder.glob("*.h5")):
        if path.name.startswith("."):
            continue
        try:
            shard = read_shard(path)
        except (JaccliError, OSError):
            continue
        if (shard.attrs.get("complete") is not True and shard.attrs.get("complete") != 1) \
                or differing_key(shard.attrs, expected, sorted(expected)) is not None:
            continue
        if start <= shard.start and shard.stop <= stop:
            by_start.setdefault(shard.start, []).append(shard)
    return [s.path for s in _tiling(by_start, start, stop) or []]


def _tiling(by_start: dict[int, list], start: int, stop: int) -> list | None:
    """Shards covering [start, stop) once, end to end (longest first), or None."""
    if start == stop:
        return []
    for shard in sorted(by_start.get(start, []), key=lambda s: -s.stop):
        rest = _tiling(by_start, shard.stop, stop)
        if rest is not None:
            return [shard, *rest]
    return None


def _read_outcome(files: list[Path], prepared: Prepared) -> Outcome:
    """The norms and seconds stored in reused shard files (in sample order)."""
    names = [e.name for e in prepared.plan.entries]
    norms: dict[str, list] = {name: [] for name in names}
    seconds = dict.fromkeys(names, 0.0)
    batch_size = 0
    for path in files:
        with open_results(path) as results:
            groups = {g.name: g for g in results.groups()}
            if set(groups) != set(names):
                raise ResultsFormatError(f"{path} holds other results than this run plans; "
                                         "rerun without --resume")
            for name in names:
                norms[name].append(np.asarray(groups[name]["frobenius"], dtype=np.float64))
                seconds[name] += float(groups[name].attrs.get("seconds", 0.0))
            batch_size = max(batch_size, int(results.attrs.get("batch_size", 0)))
    return Outcome({n: np.concatenate(v) for n, v in norms.items()}, seconds, batch_size)


def _finish(prepared: Prepared, parts: list, planned: list[Status], target: Path | None,
            started: float) -> Summary:
    files = [Path(f) for _, names, _ in parts for f in names]
    output_bytes = 0
    if target is not None:
        merge_results(files, target, command=prepared.settings.command_line)
        output_bytes = target.stat().st_size + sum(f.stat().st_size for f in files)
    outcomes = [outcome for outcome, _, _ in parts]
    names = [e.name for e in prepared.plan.entries]
    outcome = Outcome({n: np.concatenate([o.norms[n] for o in outcomes]) for n in names},
                      {n: sum(o.seconds[n] for o in outcomes) for n in names},
                      max(o.batch_size for o in outcomes))
    devices = list(dict.fromkeys(device for _, _, device in parts))
    settings = prepared.settings
    if target is not None:
        settings = replace(settings, output=replace(settings.output, path=target))
    whole = replace(prepared, settings=replace(settings, data=replace(
        settings.data, shard=None)))
    return summarize(whole, outcome, n_samples=planned[-1].stop - planned[0].start,
                     device=", ".join(devices), output_bytes=output_bytes,
                     seconds=time.perf_counter() - started)


def _why(failure: BaseException | None) -> str:
    if failure is None:
        return ""
    return str(failure).strip().splitlines()[0] if str(failure).strip() \
        else type(failure).__name__


def _stop_if_failed(statuses: list[Status], launch: Launch, failure: BaseException | None,
                    target: Path | None) -> None:
    """Raise this rank's own failure, or RankFailed when another rank failed; a parts folder
    left empty (the run stopped before any shard file was written) is removed."""
    failed = [rank for rank, status in enumerate(statuses) if status.error]
    if not failed:
        return
    folder = parts_folder(target) if target is not None else None
    if folder is not None:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty; every rank may try
    if failure is not None:
        raise failure
    kept = f"; finished shard files stay in {folder} (rerun with --resume to reuse them)" \
        if folder is not None and any(folder.glob("*.h5")) else ""
    raise RankFailed(f"stopped because rank {failed[0]} failed"
                     f"{f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''}: "
                     f"{statuses[failed[0]].error}{kept}")

"""One pipeline run split over torchrun ranks: each rank runs its contiguous shard of the
samples into `TARGET.parts/rank-RRRRR.h5` (a `--shard` file), or with `--resume` reuses the
shard files that hold exactly its samples with this run's provenance; rank 0 then writes
TARGET over the shard files and the summary over every rank's per-sample values (gathered,
so percentiles and worst samples are those of one process over all samples).

The pipeline supplies a `RankedJob` (compute_ranks, spectrum_ranks, ntk_ranks). Three
exchanges, each reached by every rank whatever failed before it: after loading and planning, after
computing, after rank 0 finished. A failure anywhere stops every rank with a non-zero exit;
shard files already finished stay, TARGET is not written.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import JaccliError, OutputError, UsageError
from ..io.results.format import decode_attr, encode_attr
from ..io.results.merge import differing_key, read_shard
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


class RankedJob(Protocol):
    """What a pipeline supplies to run over ranks; `launch` and `target` (TARGET or None)
    are its own. An outcome is whatever the job gathers to rank 0 (picklable)."""

    kind: str  # the results kind of its shard files ("jacobians", "spectra")
    # False: its shard files are scratch (`--resume` cannot reuse them), removed when a
    # rank fails; a job without the attribute is resumable.
    resumable: bool
    # When this rank began its share (`time.perf_counter()`), set once every rank planned:
    # the summary's `seconds` count from there, as one process's count from its plan's end.
    started: float

    def guard(self) -> None:
        """On rank 0, before any work: refuse a TARGET that is an input or not writable."""

    def plan(self, shard_file: Path | None) -> tuple[int, int, dict | None]:
        """Load, check and plan this rank's shard, to be written to `shard_file`; its
        samples [start, stop) and the root attributes (provenance) of its shard file. No
        collective: a rank whose step failed before (rank 0's guard) does not call it."""

    def compute(self, shard_file: Path | None, attrs: dict | None) -> Any:
        """Run the shard, writing `shard_file` (when set) with root attributes `attrs`.
        Without --resume every rank calls it (they all planned), so it may begin with a
        collective."""

    def read(self, files: list[Path]) -> Any:
        """The outcome stored in reused shard files (in sample order)."""

    def finish(self, outcomes: list, files: list[Path], devices: list[str]) -> Any:
        """On rank 0: write TARGET over `files` (when set) and return the summary over the
        ranks' `outcomes` (in rank order)."""


def parts_folder(target: Path) -> Path:
    """Where the ranks' shard files of `target` go: `TARGET.parts/` beside it."""
    return target.with_name(target.name + ".parts")


def rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.h5"


def run_ranked(job: RankedJob, launch: Launch, target: Path | None, *, resume: bool = False
               ) -> Any:
    """Run `job` as rank `launch.rank`; the summary on rank 0, None on the others. Raises on
    every rank when any rank failed."""
    folder = parts_folder(target) if target is not None else None
    scratch = rank_file(folder, launch.rank) if folder is not None and \
        not getattr(job, "resumable", True) else None

    def stop_if_failed(statuses: list[Status], failure: BaseException | None) -> None:
        _stop_if_failed(statuses, launch, failure, folder, scratch)

    try:
        return _run(job, launch, folder, resume, stop_if_failed)
    except BaseException:  # also a lost peer (a collective's error) or SIGTERM
        _remove_scratch(scratch, folder)
        raise


def _run(job: RankedJob, launch: Launch, folder: Path | None, resume: bool, stop_if_failed
         ) -> Any:
    # 1. load, check and plan this rank's shard; find the shard files it may reuse
    attrs, status, failure = None, Status(), None
    try:
        attrs, status = _plan(job, launch, folder, resume)
    except Exception as exc:  # every rank must reach the exchange below
        failure = exc
    statuses = launch.exchange(replace(status, error=_why(failure)))
    stop_if_failed(statuses, failure)
    job.started = time.perf_counter()
    # 2. compute the shard (or read what the files it reuses hold)
    files, outcome, failure = [], None, None
    try:
        if status.reuse:
            files = [folder / name for name in status.reuse]
            outcome = job.read(files)
        else:
            path = _shard_path(folder, launch, statuses)
            files = [path] if path is not None else []
            outcome = job.compute(path, attrs)
    except Exception as exc:
        failure = exc
    statuses = launch.exchange(Status(error=_why(failure)))
    stop_if_failed(statuses, failure)
    # 3. rank 0 joins the shards into TARGET and the outcomes into one summary
    parts = launch.gather((outcome, [str(f) for f in files], launch.device))
    summary, failure = None, None
    if launch.is_main:
        try:
            summary = job.finish([o for o, _, _ in parts],
                                 [Path(f) for _, names, _ in parts for f in names],
                                 list(dict.fromkeys(device for _, _, device in parts)))
        except Exception as exc:
            failure = exc
    statuses = launch.exchange(Status(error=_why(failure)))
    stop_if_failed(statuses, failure)
    return summary


def _plan(job: RankedJob, launch: Launch, folder: Path | None, resume: bool
          ) -> tuple[dict | None, Status]:
    if resume and folder is None:
        raise UsageError("--resume needs -o FILE: it reuses the shard files in FILE.parts/")
    if folder is not None:
        if launch.is_main:  # TARGET itself: not an input, and writable, before any work
            job.guard()
        elif not folder.parent.is_dir():  # rank 0's guard says the same; no race on mkdir
            raise OutputError(f"cannot write -o {folder.with_suffix('')}: the folder "
                              f"{folder.parent} does not exist")
        _make_folder(folder)
    start, stop, attrs = job.plan(rank_file(folder, launch.rank) if folder else None)
    reuse = reusable(folder, start, stop, attrs, job.kind) if resume else []
    return attrs, Status("", start, stop, tuple(p.name for p in reuse))


def _make_folder(folder: Path) -> None:
    """The parts folder, or an OutputError saying why it cannot be made (a file named so)."""
    try:
        folder.mkdir(exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{folder} exists and is not a folder (the ranks write their parts "
                          "there): remove it or choose another output file") from None
    except OSError as exc:
        raise OutputError(f"cannot create {folder} for the ranks' parts: {exc.strerror}"
                          ) from None


def _remove_scratch(scratch: Path | None, folder: Path | None) -> None:
    """This rank's scratch part file, and the parts folder when that leaves it empty."""
    if scratch is not None:
        with contextlib.suppress(OSError):
            scratch.unlink(missing_ok=True)
    if folder is not None:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty; every rank may try


def _shard_path(folder: Path | None, launch: Launch, statuses: list[Status]) -> Path | None:
    """This rank's shard file: rank-RRRRR.h5, or beside it when another rank reuses that."""
    if folder is None:
        return None
    path = rank_file(folder, launch.rank)
    if path.name in {name for s in statuses for name in s.reuse}:
        mine = statuses[launch.rank]
        path = folder / f"rank-{launch.rank:05d}-{mine.start}-{mine.stop}.h5"
    return path


def reusable(folder: Path, start: int, stop: int, attrs: dict, kind: str) -> list[Path]:
    """Complete shard files of `kind` in `folder` with this run's provenance (model and data
    hashes, options) that tile samples [start, stop) exactly; [] when there are none."""
    expected = {key: decode_attr(encode_attr(value)) for key, value in attrs.items()}
    by_start: dict[int, list] = {}
    for path in sorted(folder.glob("*.h5")):
        if path.name.startswith("."):
            continue
        try:
            shard = read_shard(path, kinds=(kind,))
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


def _why(failure: BaseException | None) -> str:
    if failure is None:
        return ""
    return str(failure).strip().splitlines()[0] if str(failure).strip() \
        else type(failure).__name__


def _stop_if_failed(statuses: list[Status], launch: Launch, failure: BaseException | None,
                    folder: Path | None, scratch: Path | None = None) -> None:
    """Raise this rank's own failure, or RankFailed when another rank failed; this rank's
    `scratch` shard file is removed, and a parts folder left empty (the run stopped before
    any shard file was written, or they were scratch) too. Each rank removes its own file
    before trying the folder, so the last one to do so removes it."""
    failed = [rank for rank, status in enumerate(statuses) if status.error]
    if not failed:
        return
    _remove_scratch(scratch, folder)
    if failure is not None:
        raise failure
    kept = f"; finished shard files stay in {folder} (rerun with --resume to reuse them)" \
        if folder is not None and scratch is None and any(folder.glob("*.h5")) else ""
    raise RankFailed(f"stopped because rank {failed[0]} failed"
                     f"{f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''}: "
                     f"{statuses[failed[0]].error}{kept}")


def every_rank(launch: Launch, action) -> Any:
    """`action()` run on every rank, its value; when it fails on any rank, every rank
    stops (that rank with its error, the others with RankFailed)."""
    value, failure = None, None
    try:
        value = action()
    except Exception as exc:
        failure = exc
    _stop_if_failed(launch.exchange(Status(error=_why(failure))), launch, failure, None)
    return value


def on_main(launch: Launch, action) -> Any:
    """`action()` run on rank 0, its (picklable) value on every rank; when it fails, every
    rank stops (rank 0 with its error, the others with RankFailed)."""
    value, failure = None, None
    if launch.is_main:
        try:
            value = action()
        except Exception as exc:
            failure = exc
    _stop_if_failed(launch.exchange(Status(error=_why(failure))), launch, failure, None)
    return launch.exchange(value)[0]

"""`ntk` under torchrun (the exchanges are `ranked`'s, and one more at the start of the
compute step, which every rank reaches: the ranks check that they were started on the same
kernel — model, samples, options — and take the smallest block size any rank's memory
allows; without --batch-size at least `BLOCKS_PER_RANK` blocks a rank): every rank loads the
model and all the samples, the kernel's blocks (`ntk_run.block_pairs`, row by row) are split
into contiguous runs balanced by their pairs of samples (`rank_run`), and each rank computes
its run — with `-o` into its part file `TARGET.parts/rank-RRRRR.h5`, without it keeping only
what the summary needs. Rank 0 then writes TARGET exactly as one process would
(`ntk_run.write_kernel`: the same datasets, mirrors and per-layer parts, copied from the part
files) and removes the part files; the per-row traces are summed in row order, so trace and
shares equal one process's.

Part file (temporary, not a results file): a group per block, `blocks/K`, with attributes
`rows` [r0, r1), `cols` [c0, c1) (absent for `--diagonal`), `mirror` and `layers` (the
names of its datasets `0`, `1`, ... in order: the per-layer parts, or `[""]`, the total).
A kernel block is `(B, B', C, C)`, `(B, B')` with `--trace`, `(B, C, C)` with `--diagonal`.
"""

from __future__ import annotations

import contextlib
import json
import time
from bisect import bisect_left, bisect_right
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import ResultsFormatError, UsageError
from ..io.hashing import sha256_file
from .common import guard_output, provenance
from .distributed import Launch
from .ntk import NtkRun, prepare_ntk, with_block_size
from .ntk_run import block_pairs, compute_blocks, write_kernel
from .ntk_settings import NtkSettings
from .ranked import run_ranked
from .resources import tf32_mode


def run_ranked_ntk(settings: NtkSettings, launch: Launch) -> dict | None:
    """The kernel of `settings` computed by rank `launch.rank` with the others; the summary
    on rank 0, None on the others. Raises on every rank when any rank failed."""
    return run_ranked(_NtkJob(settings, launch), launch, settings.output.path)


# Without --batch-size, blocks are made smaller until each rank has this many: a rank's
# contiguous run then ends within a block of an equal share, and a kernel that fits one block
# is still split.
BLOCKS_PER_RANK = 4


def blocks_for_ranks(run: NtkRun, world_size: int, block_size: int | None = None) -> NtkRun:
    """`run` planned with blocks of `block_size` samples (default: its own), or smaller
    blocks where --batch-size was not given and there would be fewer than
    `BLOCKS_PER_RANK` blocks per rank (down to blocks of one sample)."""
    b = block_size or run.blocks.block_size
    if run.settings.run.batch_size is None:
        n = len(run.inputs.data)
        m = len(run.second) if run.second is not None else n
        b = split_block_size(n, m, run.settings.mode, run.symmetric, b,
                             BLOCKS_PER_RANK * world_size)
    return run if b == run.blocks.block_size else with_block_size(run, b)


def split_block_size(n: int, m: int, mode: str, symmetric: bool, block_size: int,
                     blocks: int) -> int:
    """A block size ≤ `block_size` giving at least `blocks` blocks of the kernel of N = `n`
    by M = `m` samples (1 where even one-sample blocks give fewer): the rows of blocks of the
    largest such size, in blocks as equal as they can be (N = 2000 in 4 rows: 500, not 666
    with a last block of 2)."""

    def count(b: int) -> int:
        rows = -(-n // b)
        if mode == "diagonal":
            return rows
        return rows * (rows + 1) // 2 if symmetric else rows * -(-m // b)

    low, high = 1, max(1, min(block_size, n))  # count(b) does not grow with b
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if count(middle) >= blocks else (low, middle - 1)
    return -(-n // -(-n // low))


def rank_run(costs: list[int], rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous run `[start, stop)` of blocks that cost `costs` (pairs of
    samples): a block goes to the rank whose equal share of the total cost holds the block's
    middle, so that no rank's run costs more than its share and one block."""
    total = sum(costs)
    if total == 0:
        return rank * len(costs) // world_size, (rank + 1) * len(costs) // world_size
    owners, done = [], 0
    for cost in costs:
        owners.append(min((2 * done + cost) * world_size // (2 * total), world_size - 1))
        done += cost
    return bisect_left(owners, rank), bisect_right(owners, rank)


def pair_costs(run: NtkRun, pairs: list[tuple[int, int | None]]) -> list[int]:
    """The pairs of samples in each block of `pairs` (of `block_pairs`)."""
    b, n = run.blocks.block_size, len(run.inputs.data)
    m = len(run.second) if run.second is not None else n

    def size(index: int, count: int) -> int:
        return min(b, count - index * b)

    return [size(i, n) * (1 if j is None else size(j, m)) for i, j in pairs]


class _NtkJob:
    kind = "ntk-blocks"
    resumable = False  # part files are removed once TARGET is written, or on a failure

    def __init__(self, settings: NtkSettings, launch: Launch):
        self.settings, self.launch = settings, launch
        self.started = time.perf_counter()
        self.run: NtkRun | None = None
        self.pairs: list = []
        self.facts: dict = {}

    def guard(self) -> None:
        s = self.settings
        guard_output(s.output, s.model, s.data, s.data2)

    def plan(self, shard_file: Path | None) -> tuple[int, int, dict | None]:
        """Prepare on this rank (no collective here: a rank whose guard failed does not get
        this far, and the others must not wait for it)."""
        s, launch = self.settings, self.launch
        launch.every_rank_reads(s.data.path)
        launch.every_rank_reads(s.data2, "DATA2")
        mine = replace(s, run=replace(s.run, device=launch.device))
        if not launch.is_main:  # only rank 0 writes TARGET (and clears stale partial files)
            mine = replace(mine, output=replace(s.output, path=None))
        self.run = prepare_ntk(mine)
        self.facts = kernel_facts(self.run)
        return 0, 0, None

    def agree(self) -> None:
        """Once every rank planned: check that they all compute the same kernel, agree on
        the block size (the smallest any rank's memory allows, smaller still for enough
        blocks a rank), which fixes the blocks and this rank's run of them. Every rank
        decides alike from the same exchange."""
        launch = self.launch
        every = launch.exchange((self.run.blocks.block_size, self.facts))
        first = every[0][1]
        for rank, (_, facts) in enumerate(every):
            key = next((k for k in sorted(first.keys() | facts.keys())
                        if first.get(k) != facts.get(k)), None)
            if key is not None:
                raise UsageError(f"rank {rank} was started on another kernel than rank 0 "
                                 f"(its {key} differs): start every rank with the same "
                                 "command on the same files")
        self.run = blocks_for_ranks(self.run, launch.world_size, min(b for b, _ in every))
        pairs = block_pairs(self.run)
        start, stop = rank_run(pair_costs(self.run, pairs), launch.rank, launch.world_size)
        self.pairs = pairs[start:stop]

    def compute(self, shard_file: Path | None, attrs: dict | None) -> dict:
        self.agree()  # every rank gets here (a failed plan stopped them all)
        run = self.run
        keep = shard_file is None and run.settings.spectrum
        sink = _RankSink(shard_file, keep)
        try:
            with tf32_mode(run.settings.run.tf32):
                compute_blocks(run, self.pairs, sink, None)
            sink.close(complete=True)
        finally:
            sink.close(complete=False)
        return {"traces": sink.traces, "blocks": sink.kept}

    def read(self, files: list[Path]) -> dict:
        raise AssertionError("ntk part files are not reused")  # resumable = False

    def finish(self, outcomes: list[dict], files: list[Path], devices: list[str]) -> dict:
        traces = sorted((row, t) for o in outcomes for row, t in o["traces"])

        def fill(sink) -> None:
            for row, values in traces:
                sink.add_traces(values, row=row)
            for outcome in outcomes:  # each block let go once placed (before eigvalsh)
                kept = outcome.pop("blocks", None) or []
                while kept:
                    rows, cols, mirror, parts = kept.pop()
                    sink.write({k: torch.from_numpy(v) for k, v in parts.items()}, rows,
                               cols, mirror=mirror)
            for path in files:
                _copy_blocks(path, sink)

        summary = write_kernel(self.run, fill, self.started, device=", ".join(devices),
                               ranks=self.launch.world_size)
        for path in files:
            path.unlink(missing_ok=True)
        if files:
            with contextlib.suppress(OSError):
                files[0].parent.rmdir()
        return summary


def kernel_facts(run: NtkRun) -> dict:
    """What every rank must share for its blocks to be blocks of one kernel: the model's and
    the samples' content (SHA-256), the selection, and the options that shape the blocks
    (not paths, devices or memory: those may differ between machines)."""
    s, inputs = run.settings, run.inputs
    facts = {key: value for key, value in provenance("", inputs).items() if key in (
        "model_sha256", "data_sha256", "data_key", "data_offset", "n_samples", "dtype",
        "wrt_input", "model_inputs")}
    facts |= {"mode": s.mode, "per_layer": s.per_layer, "spectrum": s.spectrum,
              "tf32": s.run.tf32, "n_outputs": run.n_outputs, "layers": list(run.layers),
              "params": [p.name for p in run.params], "model_output": run.model_output}
    if run.second is not None:
        facts |= {"data2_sha256": sha256_file(run.second.path),
                  "m_samples": len(run.second)}
    return facts


class _RankSink:
    """Where a rank's blocks go (`compute_blocks`'s sink): its part file, or memory for
    `--spectrum` without `-o` (rank 0 needs their totals), or nowhere (the summary needs
    only the traces). Traces are kept per row block: `[(row, {layer: trace})]`."""

    def __init__(self, path: Path | None, keep: bool):
        self.traces: list[tuple[int, dict[str, float]]] = []
        self.kept: list | None = [] if keep else None
        self.file = h5py.File(path, "w") if path is not None else None
        self.count = 0

    def add_traces(self, traces: dict[str, float], row: int | None = None) -> None:
        self.traces.append((row, dict(traces)))

    def write(self, parts: dict[str, torch.Tensor], rows, cols, *, mirror: bool) -> None:
        if self.kept is not None:
            total = sum(parts.values()).detach().cpu().numpy()
            self.kept.append((rows, cols, mirror, {"": total}))
        if self.file is None:
            return
        group = self.file.create_group(f"blocks/{self.count}")
        self.count += 1
        group.attrs.update({"rows": list(rows), "mirror": mirror,
                            "layers": json.dumps(list(parts))})
        if cols is not None:
            group.attrs["cols"] = list(cols)
        for k, block in enumerate(parts.values()):
            group.create_dataset(str(k), data=block.detach().cpu().numpy())

    def close(self, complete: bool) -> None:
        if self.file is None:
            return
        if complete:
            self.file.attrs["complete"] = True
        self.file.close()
        self.file = None


def _copy_blocks(path: Path, sink) -> None:
    """Every block of a rank's part file into `sink`, in the order the rank computed them."""
    with h5py.File(path, "r") as part:
        if part.attrs.get("complete") is not True and part.attrs.get("complete") != 1:
            raise ResultsFormatError(f"{path} was not finished by its rank; run again")
        blocks = part.get("blocks", {})
        for key in sorted(blocks, key=int):
            group = blocks[key]
            names = json.loads(group.attrs["layers"])
            parts = {name: torch.from_numpy(np.asarray(group[str(k)]))
                     for k, name in enumerate(names)}
            cols = tuple(int(c) for c in group.attrs["cols"]) if "cols" in group.attrs \
                else None
            sink.write(parts, tuple(int(r) for r in group.attrs["rows"]), cols,
                       mirror=bool(group.attrs["mirror"]))

"""Runs launched by `torchrun`: detect the launch, start `torch.distributed`, place the rank
on its device, give it its contiguous shard of the samples, and the few collectives the
pipelines use (status, gather). Outside torchrun `detect()` is None and nothing changes.

Each collective here is reached by every rank whatever happened before it (a rank that
failed still joins the status exchange), so no rank waits forever on another's error.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from ..errors import JaccliError, UsageError, is_out_of_memory
from ..settings import DataSelection

# How long a rank waits in a collective for the others (a rank whose shard was reused waits
# for the whole run of the others): JACCLI_DIST_TIMEOUT seconds, default 7 days.
DEFAULT_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    device: str = "cpu"  # the device this rank computes on (`--device` resolved per rank)
    backend: str = ""  # "gloo" or "nccl" once started

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def selection(self, data: DataSelection) -> DataSelection:
        """`data` restricted to this rank's contiguous, balanced shard of the samples
        --offset/--limit chose (the split of `--shard RANK/WORLD_SIZE`)."""
        if data.shard is not None:
            raise UsageError("--shard splits the samples without torchrun; under torchrun "
                             "each rank takes its shard already: drop --shard")
        self.every_rank_reads(data.path)
        return replace(data, shard=(self.rank, self.world_size))

    @staticmethod
    def every_rank_reads(path, what: str = "the data file") -> None:
        """Refuse standard input as `path` (DATA, DATA2, ...): every rank reads the file."""
        if path is not None and str(path) == "-":
            raise UsageError(f"under torchrun every rank reads {what}: give a file, "
                             "not - (standard input)")

    def exchange(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        _collective(lambda: dist.all_gather_object(values, value))
        return values

    def sum_tensor(self, tensor, failed: bool = False):
        """`(sum over ranks of tensor, whether any rank failed)`: one all-reduce, the
        failure flag riding along as one more element so no rank waits on a failed one."""
        import torch
        import torch.distributed as dist

        flat = torch.cat([tensor.reshape(-1), tensor.new_tensor([1.0 if failed else 0.0])])
        _collective(lambda: dist.all_reduce(flat))
        return flat[:-1].reshape(tensor.shape), bool(flat[-1] > 0)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` in rank order on rank 0; None on the other ranks."""
        import torch.distributed as dist

        values: list[Any] | None = [None] * self.world_size if self.is_main else None
        _collective(lambda: dist.gather_object(value, values, dst=0))
        return values


def _collective(run) -> None:
    """Run a collective; a rank that went away without reporting (killed, crashed) or a
    wait past JACCLI_DIST_TIMEOUT is one clear error, not an internal one."""
    try:
        run()
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        text = str(exc).strip()
        why = text.splitlines()[0] if text else type(exc).__name__
        raise JaccliError(f"lost contact with the other ranks ({why}): one of them stopped "
                          "without reporting (killed? out of memory?) or did not answer "
                          "within JACCLI_DIST_TIMEOUT seconds") from exc


def torchrun_rank() -> int | None:
    """This process's rank when torchrun (or a launcher speaking its protocol) started it."""
    if all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        try:
            return int(os.environ["RANK"])
        except ValueError:
            return None
    return None


def detect() -> Launch | None:
    """The launch from RANK/WORLD_SIZE/LOCAL_RANK, or None outside torchrun."""
    if torchrun_rank() is None:
        return None
    try:
        launch = Launch(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                        int(os.environ["LOCAL_RANK"]))
    except ValueError as exc:
        raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({exc}); start "
                         "jaccli with torchrun") from None
    if not 0 <= launch.rank < launch.world_size:
        raise UsageError(f"RANK={launch.rank} is outside WORLD_SIZE={launch.world_size}")
    return launch


def rank_device(option: str, local_rank: int) -> str:
    """The device of a rank: `--device auto` and `--device cuda` mean cuda:LOCAL_RANK when
    CUDA is available (auto: else the CPU); cpu and cuda:INDEX are taken as given."""
    import torch

    if option == "auto":
        return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if option == "cuda":
        return f"cuda:{local_rank}"
    return option


@contextmanager
def started(launch: Launch, device_option: str) -> Iterator[Launch]:
    """Start `torch.distributed` for `launch` (NCCL for a CUDA device, gloo on the CPU),
    yield it with its device set, and shut it down afterwards. Called in a program that has
    started `torch.distributed` already (jaccli's CLI run in-process, several commands in
    turn), it joins that process group and leaves it running."""
    import torch
    import torch.distributed as dist

    from .resources import resolve_device

    device = resolve_device(rank_device(device_option, launch.local_rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        yield replace(launch, device=str(device), backend=str(dist.get_backend()))
        return
    timeout = float(os.environ.get("JACCLI_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        yield replace(launch, device=str(device), backend=backend)
    finally:
        # Leave together: a rank tearing gloo down while a peer still talks to it can abort
        # the peer ("terminate called without an active exception").
        with contextlib.suppress(RuntimeError):
            dist.barrier()
        dist.destroy_process_group()


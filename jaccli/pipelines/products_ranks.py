"""`jvp` / `vjp` under torchrun (the split, exchanges and --resume are `ranked`): each rank
multiplies its shard of the samples into its shard products file, rank 0 writes TARGET over
the shard files (the `jaccli merge` code); the summary is that of one process over all
samples (rank 0 gathers every sample's product norm)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from ..io.results.merge import merge_results
from ..settings import ProductSettings
from .common import guard_output
from .distributed import Launch
from .products import (
    PreparedProducts,
    prepare_products,
    product_values,
    products_attrs,
    products_summary,
    write_products,
)
from .ranked import run_ranked


def run_ranked_products(settings: ProductSettings, launch: Launch) -> dict | None:
    """Run `settings` as rank `launch.rank`; the summary over all ranks on rank 0, None on
    the others. Raises on every rank when any rank failed."""
    return run_ranked(_ProductsJob(settings, launch), launch, settings.output.path,
                      resume=settings.resume)


class _ProductsJob:
    kind = "products"

    def __init__(self, settings: ProductSettings, launch: Launch):
        self.settings, self.launch = settings, launch
        self.started = time.perf_counter()
        self.prepared: PreparedProducts | None = None

    def guard(self) -> None:
        s = self.settings
        guard_output(s.output, s.model, s.data, s.vectors)

    def plan(self, shard_file: Path | None) -> tuple[int, int, dict | None]:
        s, launch = self.settings, self.launch
        self.prepared = prepare_products(replace(
            s, data=launch.selection(s.data), run=replace(s.run, device=launch.device),
            output=replace(s.output, path=shard_file)))
        data = self.prepared.inputs.data
        attrs = products_attrs(self.prepared) if shard_file is not None else None
        return data.offset, data.offset + len(data), attrs

    def compute(self, shard_file: Path | None, attrs: dict | None):
        """`(norms (n,), per-sample shape)` of this rank's products."""
        result = product_values(self.prepared)
        norms = np.linalg.norm(result.reshape(len(result), -1), axis=1)
        if shard_file is not None:
            write_products(self.prepared, shard_file, result, norms, attrs,
                           seconds=time.perf_counter() - self.started)
        return norms, result.shape[1:]

    def read(self, files: list[Path]):
        norms, shape = [], ()
        for path in files:
            with h5py.File(path, "r") as f:
                norms.append(f["products/product/norm"][:])
                shape = f["products/product/product"].shape[1:]
        return np.concatenate(norms), shape

    def finish(self, outcomes: list, files: list[Path], devices: list[str]) -> dict:
        target = self.settings.output.path
        if target is not None:
            merge_results(files, target, command=self.settings.command_line)
        norms = np.concatenate([n for n, _ in outcomes])
        return products_summary(replace(self.prepared, settings=self.settings), norms,
                                outcomes[0][1], seconds=time.perf_counter() - self.started)

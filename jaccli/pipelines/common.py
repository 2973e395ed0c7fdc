"""What every pipeline does first — load and check the model and data on the chosen device —
and what every results file records about its run (provenance)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from .. import __version__
from ..errors import ShapeMismatchError, UsageError
from ..graph.call_layout import call as call_model
from ..io.data import DataSource, load_data
from ..io.hashing import sha256_file
from ..io.models import LoadedModel, load_model
from ..io.models.retarget import retarget_dtype
from ..io.results.output_guard import check_output
from ..settings import DataSelection, ModelSource, OutputOptions, RunOptions, shard_range
from ..tracing.independence import check_sample_independence, distinct_rows
from .input_shapes import check_call_shapes
from .integer_inputs import refuse_integer_input
from .model_inputs import ModelCall, named_files, on_device, provenance_of, resolve_call
from .resources import memory_budget, resolve_device, resolve_dtype

TRACE_SAMPLES = 4  # the example batch layers are traced on


@dataclass
class Inputs:
    """A loaded model and data source, checked against each other.

    model: the module on `device` in `dtype`, parameters frozen (no gradients).
    """

    source: ModelSource
    loaded: LoadedModel
    data: DataSource
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    example: torch.Tensor  # the first few samples: what graphs and layers are traced on
    graph: Any = None  # the captured operator graph (`engines.make_engine` fills it in)
    capture_note: str = ""  # how it was captured, or why it could not be
    call: ModelCall | None = None  # a forward taking several arguments: how it is called
    held_example: tuple = ()  # the example's rows of the inputs held fixed

    @property
    def layout(self):
        return None if self.call is None else self.call.layout

    def held(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Rows `start:stop` of the inputs held fixed (none for a one-argument model)."""
        if self.call is None:
            return ()
        return self.call.held_rows(start, stop, self.device, self.dtype)

    def batch(self, start: int, stop: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Samples `start:stop`: the differentiated input `(B, *in_shape)` and the inputs
        held fixed."""
        return to_tensor(self.data.read(start, stop), self.device, self.dtype), \
            self.held(start, stop)


def load_inputs(source: ModelSource, selection: DataSelection, run: RunOptions) -> Inputs:
    """Load model and data and check them against each other. Pipelines then build their
    engine (`engines.make_engine`) and call `check_independence` once they know their batch
    size."""
    device, dtype = resolve_device(run.device), resolve_dtype(run.dtype)
    loaded = load(source)
    data = load_data(selection.path, key=selection.key, offset=selection.offset,
                     limit=selection.limit)
    if selection.shard is not None:
        data = shard_of(data, selection)
    call = resolve_call(loaded, source, data)
    if call is None or call.wrt is data:  # the declared shape is the first argument's
        data.match_input_shape(loaded.input_shape)
    data.check_finite()
    if call is not None:
        data, call = call.wrt, on_device(call, device, dtype)
    model = frozen(loaded.module.to(device=device, dtype=dtype))
    retarget_dtype(model, dtype)  # dtypes baked into an exported graph follow --dtype
    count = min(len(data), TRACE_SAMPLES)
    rows = data.read(0, count)
    if call is None:
        refuse_integer_input(model, rows, selection.path, device, dtype)
    example = to_tensor(rows, device, dtype)
    held = call.held_rows(0, count, device, dtype) if call is not None else ()
    if call is not None:
        check_call_shapes(loaded, model, call, example, held)
    return Inputs(source, loaded, data, model, device, dtype, example, call=call,
                  held_example=held)


def shard_of(data, selection: DataSelection):
    """The contiguous shard `selection.shard` = (i, n) of the samples --offset/--limit chose."""
    index, count = selection.shard
    start, stop = shard_range(len(data), index, count)
    if stop == start:
        raise UsageError(f"--shard {index}/{count}: only {len(data)} samples are selected, "
                         f"too few for {count} shards; use fewer shards")
    return load_data(selection.path, key=selection.key, offset=selection.offset + start,
                     limit=stop - start)


def check_independence(inputs: Inputs, batch_size: int) -> None:
    """Run the model on a batch of the size the run uses, of distinct rows: it must be
    deterministic, and each sample's output must not depend on the others. (A program
    exported for one batch size runs only at that size: nothing to mix.)"""
    if inputs.loaded.static_batch is not None:
        return
    n = min(batch_size, len(inputs.data))
    rows = to_tensor(distinct_rows(np.asarray(inputs.data.read(0, n))), inputs.device,
                     inputs.dtype)
    if inputs.call is None:
        check_sample_independence(inputs.model, rows)
        return
    held = inputs.held(0, n)

    def by_index(index: torch.Tensor):  # the model on rows `index` of every input
        i = index.long()
        return call_model(inputs.model, inputs.layout, rows[i], tuple(h[i] for h in held))

    # a batch of row numbers: slicing it slices every input alike
    try:
        check_sample_independence(by_index, torch.arange(n, device=inputs.device,
                                                         dtype=inputs.dtype))
    except RuntimeError as exc:  # e.g. an integer file where the forward wants floats
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ShapeMismatchError(
            f"the model fails when called with DATA and the --input/--const values ({why}); "
            "check each file's dtype and per-sample shape against the forward's "
            "arguments") from exc


def load(source: ModelSource) -> LoadedModel:
    return load_model(source.path, arch=source.arch, arch_path=source.arch_path,
                      trust_pickle=source.trust_pickle)


def load_targets(path, key: str | None, selection: DataSelection, n_samples: int, *,
                 what: str = "targets") -> DataSource:
    """Targets (or vectors) for the same samples as the data: one per data-file row, sliced
    by the same --offset/--limit (and --shard), as many as there are samples."""
    targets = load_data(path, key=key, offset=selection.offset, limit=selection.limit,
                        key_option=f"--{what}-key")
    if selection.shard is not None:
        start, stop = shard_range(len(targets), *selection.shard)
        targets = load_data(path, key=key, offset=selection.offset + start,
                            limit=stop - start, key_option=f"--{what}-key")
    if len(targets) != n_samples:
        raise ShapeMismatchError(f"{path} has {len(targets)} {what} for {n_samples} samples; "
                                 f"they must match (one per row of the data file)")
    return targets


def guard_output(output: OutputOptions, source: ModelSource | None,
                 selection: DataSelection | None, *more: Path | None) -> None:
    """Before any heavy work: refuse an output that is one of the run's inputs (model, data,
    architecture spec, `more`) or that cannot be written, and clear stale partial files."""
    if output.path is None:
        return
    inputs = [*more]
    if source is not None:
        arch = Path(source.arch) if source.arch and Path(source.arch).is_file() else None
        inputs += [source.path, arch, *named_files(source)]
    if selection is not None:
        inputs.append(selection.path)
    check_output(output.path, inputs)


def provenance(command_line: str, inputs: Inputs, **facts) -> dict:
    """Root attributes of a results file: versions, command, inputs and their hashes, plus
    the pipeline's own `facts` (store, granularity, chain, ...)."""
    data = inputs.data
    return {
        "jaccli_version": __version__, "torch_version": torch.__version__,
        "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line, "device": str(inputs.device),
        "dtype": str(inputs.dtype).removeprefix("torch."),
        "model_path": str(inputs.source.path), "model_format": inputs.loaded.source,
        "model_sha256": sha256_file(inputs.source.path),
        "data_path": str(data.path), "data_key": data.key or "", "data_offset": data.offset,
        "data_sha256": data.sha256 or sha256_file(data.path), "n_samples": len(data),
        **provenance_of(inputs.call), **facts,
    }


def frozen(model: nn.Module) -> nn.Module:
    """No parameter gradients: the pipelines differentiate w.r.t. inputs unless asked."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def to_tensor(rows: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch read from disk (possibly a read-only memory map) as a tensor of `dtype`."""
    host = np.array(rows, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return torch.from_numpy(host).to(device=device)


def product_batch_size(run: RunOptions, inputs: Inputs, d_in: int, d_out: int) -> int:
    """Samples per batch for product pipelines: as asked, else what the budget allows for
    ~64 vectors of the larger side per sample."""
    if run.batch_size:
        return run.batch_size
    budget, _ = memory_budget(inputs.device, run.max_memory)
    per_sample = 64 * max(d_in, d_out) * 8
    return max(1, min(4096, budget // per_sample))

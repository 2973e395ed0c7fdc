"""`jaccli inspect` of a forward taking several arguments (`--input`/`--const`/`--wrt`):
the plan of the layers on the differentiated input's path, traced on every input's first
samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..io.data import DataSource, load_data
from ..settings import ComputeSettings
from .common import TRACE_SAMPLES, Inputs, frozen, to_tensor
from .engines import make_engine
from .input_shapes import check_call_shapes
from .model_inputs import on_device, resolve_call
from .planner import Plan, make_plan


def inspect_call(settings: ComputeSettings, loaded, input_shape, device, dtype) -> Plan:
    """`inspect` of a forward taking several arguments (`--input`/`--const`/`--wrt`): the
    model is traced on the first samples of every input (DATA from --data; --input-shape
    is for DATA alone when only constants are given)."""
    selection = settings.data
    if selection.path is None:
        if settings.model.inputs or input_shape is None:
            raise UsageError("inspect with --input needs --data FILE: the held inputs go "
                             "with DATA's samples (with only --const, --input-shape will do)")
        data = zeros_source(input_shape)
    else:
        data = load_data(selection.path, key=selection.key, offset=selection.offset,
                         limit=selection.limit)
    call = resolve_call(loaded, settings.model, data)
    if input_shape is not None and selection.path is not None \
            and tuple(input_shape) != call.wrt.sample_shape:
        raise UsageError(f"--input-shape {tuple(input_shape)} differs from the samples of "
                         f"{call.layout.wrt} {call.wrt.sample_shape}; drop --input-shape")
    call = on_device(call, device, dtype)
    model = frozen(loaded.module.to(device=device, dtype=dtype))
    count = min(len(call.wrt), TRACE_SAMPLES)
    example = to_tensor(call.wrt.read(0, count), device, dtype)
    held = call.held_rows(0, count, device, dtype)
    check_call_shapes(loaded, model, call, example, held)
    inputs = Inputs(settings.model, loaded, call.wrt, model, device, dtype, example,
                    call=call, held_example=held)
    engine = make_engine(inputs, settings.layers, settings.run, n_samples=len(call.wrt))
    return make_plan(engine, n_samples=len(call.wrt), dtype=dtype, device=device,
                     budget=2**62, budget_source="not applied by inspect",
                     store=settings.store, batch_size=settings.run.batch_size or 1)


def zeros_source(sample_shape: tuple[int, ...]) -> DataSource:
    """One zero sample of `sample_shape` standing for DATA (`--input-shape`)."""
    shape = tuple(sample_shape)
    return DataSource(Path("(zeros of --input-shape)"), "zeros", None,
                      np.zeros((1, *shape)), 0, 1, shape)

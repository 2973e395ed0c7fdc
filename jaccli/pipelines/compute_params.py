"""`compute --wrt params`: which parameters, the objective and targets, their plan entries,
and the per-sample parameter Jacobians of one batch as `(B, C, D)` matrices."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..engine.structures import Matrix, Structured
from ..errors import UsageError
from ..graph.call_layout import call as call_model
from ..graph.params import select_parameters
from ..io.data import DataSource
from ..params.jacobians import ParamInfo, param_jacobians, select_params
from ..params.objectives import check_targets, objective
from ..settings import ComputeSettings
from .common import Inputs, load_targets
from .engines import Engine, GraphRun
from .planner import PlanEntry

if TYPE_CHECKING:
    from .compute import Prepared

FLATTENED = "(flattened)"


@dataclass
class ParamTarget:
    """One selected parameter: qualified name, shape, owner's type, and how it is done."""

    name: str
    shape: tuple[int, ...]
    owner: str
    rule: str


@dataclass
class ParamSetup:
    """What `--wrt params` differentiates: the parameters, the objective, the targets.
    modules: the module-level selection when the run has no operator graph."""

    params: list[ParamTarget]
    objective: Callable
    targets: DataSource | None
    outputs: int  # C: per-sample outputs of the objective (1 for a scalar)
    modules: list[ParamInfo] | None = None


def param_setup(settings: ComputeSettings, inputs: Inputs, engine: Engine) -> ParamSetup:
    options = settings.params
    if options.loss is not None and options.targets is None:
        raise UsageError("--loss needs --targets FILE")
    targets = None
    if options.targets is not None:
        if options.loss is None:
            raise UsageError("--targets needs --loss (cross-entropy, nll, mse, bce-logits)")
        targets = load_targets(options.targets, options.targets_key, settings.data,
                               len(inputs.data))
    fn = objective(output_index=options.output_index, loss=options.loss)
    example, held = inputs.batch(0, 1)
    with torch.no_grad():
        output = call_model(inputs.model, inputs.layout, example, held)
    example_targets = None
    if targets is not None:
        check_targets(options.loss, targets.read(0, len(targets)), tuple(output.shape[1:]))
        example_targets = torch.from_numpy(np.array(targets.read(0, 1))).to(inputs.device)
    with torch.no_grad():
        value = fn(output, example_targets)
    outputs = 1 if value.ndim == 1 else value.shape[1]
    if isinstance(engine, GraphRun):
        graph = engine.graph
        chosen = select_parameters(graph, options.patterns)
        order = {name: i for i, (name, _) in enumerate(inputs.model.named_parameters())}
        params = [ParamTarget(q, tuple(graph.state[node][1].shape), _owner(inputs, q),
                              "per-op rules")
                  for q, node in sorted(chosen.items(), key=lambda c: order.get(c[0], 1e9))]
        return ParamSetup(params, fn, targets, outputs)
    modules = select_params(inputs.model, options.patterns)
    params = [ParamTarget(p.name, p.shape, type(p.module).__name__,
                          "outer product" if p.structured else "generic") for p in modules]
    return ParamSetup(params, fn, targets, outputs, modules)


def _owner(inputs: Inputs, qualified: str) -> str:
    """The class of the module holding parameter `qualified`, when the module tree says."""
    owner = qualified.rpartition(".")[0]
    try:
        module = inputs.model.get_submodule(owner) if owner else inputs.model
    except AttributeError:
        return "?"
    return getattr(module, "original_name", None) or type(module).__name__


def param_entries(settings: ComputeSettings, setup: ParamSetup | None,
                   dtype: torch.dtype) -> list[PlanEntry]:
    if setup is None:
        return []
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = [PlanEntry(p.name, f"param of {p.owner}", p.shape, (setup.outputs,), p.rule,
                         "dense", "rev" if p.rule == "generic" else "-",
                         setup.outputs * math.prod(p.shape) * itemsize, param_shape=p.shape)
               for p in setup.params]
    if settings.params.flatten:
        total = sum(math.prod(p.shape) for p in setup.params)
        entries.append(PlanEntry(FLATTENED, "all selected parameters", (total,),
                                 (setup.outputs,), "concatenated", "dense", "-",
                                 setup.outputs * total * itemsize, param_shape=(total,)))
    return entries


def param_batch(p: Prepared, start: int, x: torch.Tensor, held: tuple
                ) -> dict[str, Structured]:
    """Per-sample parameter Jacobians of one batch `x` (B, *in_shape), with the inputs held
    fixed `held` (B, ...), as `(B, C, D)` matrices."""
    setup = p.param_setup
    targets = None
    if setup.targets is not None:
        targets = torch.from_numpy(np.array(setup.targets.read(start, start + x.shape[0])))
        targets = targets.to(x.device)
    if setup.modules is None:
        jacobians = p.engine.engine.param_jacobians(x, setup.objective,
                                                    [q.name for q in setup.params], targets,
                                                    held)
    else:
        jacobians = param_jacobians(p.inputs.model, x, setup.objective, targets,
                                    setup.modules)
    result = {p.name: Matrix(jacobians[p.name].reshape(x.shape[0], setup.outputs, -1))
              for p in setup.params}
    if p.settings.params.flatten:  # one (B, C, D) matrix over all selected parameters
        result[FLATTENED] = Matrix(torch.cat([m.matrix for m in result.values()], dim=2))
    return result

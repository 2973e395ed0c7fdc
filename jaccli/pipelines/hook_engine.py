"""The module-hook engine behind the common engine interface: the fallback for models whose
operator graph cannot be captured (layers from forward hooks, rules by module class)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..engine.engine import JacobianEngine
from ..errors import UnsupportedModuleError
from ..graph.engine import END_TO_END
from ..io.models import LoadedModel
from ..settings import LayerSelection
from ..tracing.layers import Layer, Trace, trace_end_to_end, trace_layers
from ..tracing.recorder import ForwardRecorder, run_model
from .engines import Engine, EntryPlan


class HookRun(Engine):
    """The module-hook engine (`jaccli.engine`): the fallback for models the graph cannot
    capture. It refuses end-to-end products when a module's output was changed in place
    before the next module read it (the trace then is not a chain)."""

    def __init__(self, model: nn.Module, trace: Trace, *, hookable: bool, layers: list[Layer],
                 end_to_end: bool, n_samples: int, strict: bool, mode: str, note: str):
        self.model, self.trace, self.hookable = model, trace, hookable
        self.engine = JacobianEngine(model, trace, layers=layers, end_to_end=end_to_end,
                                     n_samples=n_samples, strict=strict, mode=mode)
        self.path, self.note = "hooks", note
        self.chain, self.skipped = trace.chain, list(trace.skipped)
        self.input_shape, self.output_shape = trace.input_shape, trace.output_shape
        self.entries = self._entries()
        plan = self.engine.chain_plan
        self.chain_costs = None if plan is None else {
            "chosen": plan.cost, "forward": plan.forward_cost, "reverse": plan.reverse_cost}
        self.last_seconds = {}

    def _entries(self) -> list[EntryPlan]:
        engine, out = self.engine, []
        for layer in engine.layers:
            plans = engine.site_plans[layer.name]
            modes = {p.mode for p in plans if p.mode}
            out.append(EntryPlan(
                layer.name, "layer", layer.type_name, layer.input_shape, layer.output_shape,
                "+".join(p.rule_name for p in plans), engine.structure(layer),
                "/".join(sorted(modes)) or "-", layer.module_names,
                module=layer.modules[0] if len(layer.modules) == 1 else None))
        if engine.end_to_end:
            if engine.chain_plan is not None:
                rule, mode = "chain product", "-"
            elif engine.e2e_from_chain:
                rule = engine.end_to_end_method
                mode = "rev" if rule.startswith("reverse") else "fwd"
            else:
                d_in, d_out = math.prod(self.input_shape), math.prod(self.output_shape)
                rule = "generic"
                mode = engine.mode if engine.mode != "auto" else ("fwd" if d_in < d_out
                                                                  else "rev")
            out.append(EntryPlan(END_TO_END, "end_to_end", "model", self.input_shape,
                                 self.output_shape, rule, engine.end_to_end_structure, mode))
        return out

    def _records(self, x):
        if not self.engine.needs_records:
            return {}
        _, calls = run_model(ForwardRecorder(self.model, self.hookable, self.trace.positions),
                             x)
        return {r.site: r for r in calls}

    def compute(self, x, *, names=None, chunk_size=None, held=()):
        # held is always empty: make_engine gives models with extra inputs the graph only
        result = self.engine.compute(x, self._records(x), names=names, chunk_size=chunk_size)
        self.last_seconds = dict(self.engine.last_seconds)
        return result

    def operator(self, name, x, held=()):
        records = self._records(x) if name == END_TO_END else self._all_records(x)
        if name == END_TO_END:
            return self.engine.end_to_end_operator(x, records)
        layer = next(layer for layer in self.trace.all_layers if layer.name == name)
        return self.engine.layer_operator(layer, records)

    def _all_records(self, x):
        _, calls = run_model(ForwardRecorder(self.model, self.hookable, self.trace.positions),
                             x)
        return {r.site: r for r in calls}

    def cumulative(self, x, held=()):
        yield from self.engine.cumulative(x, self._all_records(x))

    def route_of(self, name):
        return self.engine.route_of(name)

    def clear_cache(self):
        self.engine.clear_cache()


def trace_model(layers: LayerSelection, loaded: LoadedModel, model: nn.Module,
                example: torch.Tensor) -> Trace:
    """The model's layers (as `layers` selects them), from one forward pass on `example`."""
    if layers.include_layers:
        return trace_layers(model, example, type_name=loaded.type_name,
                            hookable=loaded.hookable, granularity=layers.granularity,
                            patterns=layers.patterns)
    try:  # layers are still traced, to form the end-to-end Jacobian by chain products
        trace = trace_layers(model, example, type_name=loaded.type_name,
                             hookable=loaded.hookable, granularity=layers.granularity)
    except UnsupportedModuleError:
        return trace_end_to_end(model, example)
    trace.layers = []
    return trace

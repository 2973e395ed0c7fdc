"""The structured engine: per-site rules, block and end-to-end Jacobians by chain products."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vmap

from ..errors import ModelRunError, UnsupportedModuleError
from ..tracing.layers import Layer, Trace
from ..tracing.recorder import CallRecord, batched_extras, first_tensor, site_function
from .chain import ChainPlan, cheapest_order, compose_tag
from .generic import choose_mode, per_sample_jacobian_verified
from .operators import Apply, chain_operator, function_operator, pull_through, push_through
from .rules import Rule, rule_for
from .structures import Matrix, Structured, chain_product

END_TO_END = "(end-to-end)"


@dataclass
class SitePlan:
    """How one call site is differentiated: by its rule, or by the generic torch.func path."""

    site: str
    module_name: str
    rule: Rule | None
    structure: str
    mode: str | None  # fwd/rev for the generic path

    @property
    def rule_name(self) -> str:
        return type(self.rule).__name__.removesuffix("Rule") if self.rule else "generic"


def plan_sites(layer: Layer) -> list[SitePlan]:
    """The rule (or generic mode) for each site of `layer`, in execution order."""
    plans = []
    for i, (site, name, module) in enumerate(zip(layer.sites, layer.module_names,
                                                 layer.modules, strict=True)):
        rule = None if (i == 0 and layer.has_extra_inputs) else rule_for(module)
        if rule is not None:
            plans.append(SitePlan(site, name, rule, rule.structure, None))
        else:
            # A block's inner sites pick their mode from their shapes when they run.
            mode = choose_mode(layer.d_in, layer.d_out) if len(layer.sites) == 1 else "auto"
            plans.append(SitePlan(site, name, None, "dense", mode))
    return plans


def layer_structure(plans: list[SitePlan]) -> str:
    tag = plans[0].structure
    for plan in plans[1:]:
        tag = compose_tag(plan.structure, tag)
    return tag


class JacobianEngine:
    """Computes the planned Jacobians of one batch from its recorded forward pass.

    Shared Jacobians (Linear, conv, BatchNorm, ...) are computed once per engine (one run).
    layers: the layers to report; end_to_end: also the model's input→output Jacobian, formed
    as the chain product of all layers' Jacobians when the trace is a chain, else directly.
    """

    def __init__(self, model: nn.Module, trace: Trace, *, layers: list[Layer],
                 end_to_end: bool, n_samples: int, strict: bool = False, mode: str = "auto"):
        self.model = model
        self.trace = trace
        self.layers = layers
        self.end_to_end = end_to_end
        self.mode = mode
        self.e2e_from_chain = end_to_end and trace.chain
        needed = trace.all_layers if self.e2e_from_chain else layers
        self.site_plans = {layer.name: plan_sites(layer)
                           for layer in [*trace.all_layers, *layers]}
        if mode != "auto":
            for plans in self.site_plans.values():
                for p in plans:
                    if p.rule is None:
                        p.mode = mode
        if strict:
            missing = [f"{p.module_name} ({type(m).__name__})"
                       for layer in needed
                       for p, m in zip(self.site_plans[layer.name], layer.modules, strict=True)
                       if p.rule is None]
            if missing or (end_to_end and not trace.chain):
                what = ", ".join(missing) or "the end-to-end Jacobian of a non-chain model"
                raise UnsupportedModuleError(f"--strict-rules: no structured rule for {what}")
        self.chain_plan: ChainPlan | None = None
        self.end_to_end_method = "generic"
        if self.e2e_from_chain:
            all_plans = [p for layer in trace.all_layers for p in self.site_plans[layer.name]]
            if any(p.rule is not None and p.rule.matrix_free for p in all_plans):
                # Convolutions: push identity blocks through their jvp/vjp rather than
                # multiplying their (large, sparse) matrices densely.
                d_in, d_out = trace.all_layers[0].d_in, trace.all_layers[-1].d_out
                self.end_to_end_method = ("forward accumulation" if d_in < d_out
                                          else "reverse accumulation")
            else:
                tags = [layer_structure(self.site_plans[layer.name])
                        for layer in trace.all_layers]
                dims = [trace.all_layers[0].d_in] + [layer.d_out for layer in trace.all_layers]
                self.chain_plan = cheapest_order(tags, dims, n_samples)
                self.end_to_end_method = "chain product"
        self._shared: dict[str, Structured] = {}
        self.routes: dict[str, set[str]] = {}  # site or END_TO_END -> generic routes used
        self.last_seconds: dict[str, float] = {}

    def _generic(self, key: str, fn, x: torch.Tensor, extras, mode: str,
                 chunk_size: int | None, name: str) -> torch.Tensor:
        """A verified generic Jacobian; the route that produced it is kept in `routes[key]`
        (a site, or `END_TO_END`)."""
        jac, report = per_sample_jacobian_verified(fn, x, extras, mode=mode,
                                                   chunk_size=chunk_size, name=name)
        self.routes.setdefault(key, set()).add(report.route)
        return jac

    def route_of(self, name: str) -> str:
        """The generic routes behind an entry (a layer's sites, or `END_TO_END`), '' if none."""
        if name == END_TO_END:  # built from every site when the layers are a chain
            keys = list(self.routes) if self.e2e_from_chain else [END_TO_END]
        else:
            keys = next((layer.sites for layer in self.layers if layer.name == name), ())
        return "+".join(sorted(set().union(*(self.routes.get(k, set()) for k in keys))))

    def clear_cache(self) -> None:
        """Forget the shared Jacobians, so the next batch computes them again."""
        self._shared.clear()

    @property
    def needs_records(self) -> bool:
        """Whether `compute` needs the batch's recorded layer inputs."""
        return bool(self.layers) or self.e2e_from_chain

    def structure(self, layer: Layer) -> str:
        return layer_structure(self.site_plans[layer.name])

    @property
    def end_to_end_structure(self) -> str:
        return self.chain_plan.tag if self.chain_plan else "dense"

    def _sites(self):
        for layer in self.trace.all_layers:
            yield from zip(self.site_plans[layer.name], layer.modules, strict=True)

    def compute(self, x: torch.Tensor, records: dict[str, CallRecord], *,
                names: set[str] | None = None, chunk_size: int | None = None
                ) -> dict[str, Structured]:
        """`{entry name: structured Jacobian}` for the batch `x` `(B, *in_shape)`.

        names: compute only these entries (layer names, `END_TO_END`); None: all.
        chunk_size: basis vectors the generic torch.func path handles at once (None: all).
        """
        clock = _Clock(x.device)
        layers = [layer for layer in self.layers if names is None or layer.name in names]
        end_to_end = self.end_to_end and (names is None or END_TO_END in names)
        needed = self.trace.all_layers if self.chain_plan and end_to_end else layers
        per_layer = {}
        for layer in needed:
            per_layer[layer.name] = self._layer(layer, records, chunk_size)
            clock.lap(layer.name)
        result = {layer.name: per_layer[layer.name] for layer in layers}
        if end_to_end:
            if self.chain_plan is not None:
                chain = [per_layer[layer.name] for layer in self.trace.all_layers]
                result[END_TO_END] = chain_product(chain, self.chain_plan.order)
            elif self.e2e_from_chain:
                result[END_TO_END] = self._accumulate(x, records)
            else:
                result[END_TO_END] = Matrix(self._generic(
                    END_TO_END, lambda xb: first_tensor(self.model(xb)), x, (), self.mode,
                    chunk_size, "the end-to-end Jacobian"))
            clock.lap(END_TO_END)
        self.last_seconds = {name: clock.laps.get(name, 0.0) for name in result}
        return result

    def _accumulate(self, x: torch.Tensor, records: dict[str, CallRecord]) -> Matrix:
        """The end-to-end Jacobian by pushing an identity block through every site:
        from the output side with vjps (reverse) or from the input side with jvps (forward).
        Convolution-like sites are applied matrix-free; the others by their structures."""
        if self.end_to_end_method == "forward accumulation":
            *_, (_, block) = self.cumulative(x, records)
        else:
            block = torch.eye(self.trace.all_layers[-1].d_out, dtype=x.dtype,
                              device=x.device)[None]
            for plan, module in reversed(list(self._sites())):
                record = self._record(plan, records)
                if plan.rule is not None and plan.rule.matrix_free:
                    block = pull_through(module, record, block)
                else:
                    block = self._site(plan, module, record).left_apply(block)
        return Matrix(block.expand(x.shape[0], -1, -1) if block.shape[0] == 1 else block)

    def cumulative(self, x: torch.Tensor, records: dict[str, CallRecord]):
        """Yield `(layer name, J_{1:l})` for each layer l of a chain model: the Jacobian of
        layer l's output w.r.t. the model input, `(B | 1, D_l, D_in)`, by forward accumulation."""
        block = torch.eye(self.trace.all_layers[0].d_in, dtype=x.dtype, device=x.device)[None]
        for layer in self.trace.all_layers:
            for plan, module in zip(self.site_plans[layer.name], layer.modules, strict=True):
                record = self._record(plan, records)
                if plan.rule is not None and plan.rule.matrix_free:
                    block = push_through(module, record, block)
                else:
                    block = self._site(plan, module, record).right_apply(block)
            yield layer.name, block

    def layer_operator(self, layer: Layer, records: dict[str, CallRecord]
                       ) -> tuple[Apply, Apply]:
        """`(V ↦ J V, U ↦ Jᵀ U)` per sample without forming J, on blocks of vectors:
        V `(B, D_in, b)`, U `(B, D_out, b)`."""
        steps = [self._site_operator(plan, module, self._record(plan, records))
                 for plan, module in zip(self.site_plans[layer.name], layer.modules,
                                         strict=True)]
        return chain_operator(steps)

    def end_to_end_operator(self, x: torch.Tensor, records: dict[str, CallRecord]
                            ) -> tuple[Apply, Apply]:
        """The end-to-end Jacobian as a block operator: through the layers for a chain model,
        else through the whole model with torch.func."""
        if self.e2e_from_chain:
            return chain_operator([self._site_operator(plan, module,
                                                        self._record(plan, records))
                                    for plan, module in self._sites()])
        return function_operator(lambda xb: first_tensor(self.model(xb)), x, ())

    def _site_operator(self, plan: SitePlan, module: nn.Module, record: CallRecord
                       ) -> tuple[Apply, Apply]:
        if plan.rule is None:
            return function_operator(site_function(record), record.input,
                                      batched_extras(record))
        rule = plan.rule
        if rule.matrix_free:
            return (lambda v: push_through(module, record, v),
                    lambda u: pull_through(module, record, u.transpose(1, 2)).transpose(1, 2))
        if rule.structure == "dense":
            x = record.input
            n = x.shape[0]
            out_shape = (n, *record.output_ref.shape[1:])
            forward = vmap(lambda v: rule.jvp(module, x, v.reshape(x.shape)).reshape(n, -1),
                           in_dims=2, out_dims=2)
            backward = vmap(lambda u: rule.vjp(module, x, u.reshape(out_shape)).reshape(n, -1),
                            in_dims=2, out_dims=2)
            return forward, backward
        jac = self._site(plan, module, record)  # cheap to apply: W, diagonals, selections
        return jac.right_apply, lambda u: jac.left_apply(u.transpose(1, 2)).transpose(1, 2)

    def _record(self, plan: SitePlan, records: dict[str, CallRecord]) -> CallRecord:
        record = records.get(plan.site)
        if record is None or record.input is None:
            raise ModelRunError(
                f"{plan.site} was not called in this batch's forward pass; the model's "
                "control flow depends on its input, so its layers differ between batches")
        return record

    def _layer(self, layer: Layer, records: dict[str, CallRecord],
               chunk_size: int | None = None) -> Structured:
        return chain_product([self._site(plan, module, self._record(plan, records), chunk_size)
                              for plan, module in zip(self.site_plans[layer.name],
                                                      layer.modules, strict=True)])

    def _site(self, plan: SitePlan, module: nn.Module, record: CallRecord,
              chunk_size: int | None = None) -> Structured:
        if plan.rule is None:
            return Matrix(self._generic(plan.site, site_function(record), record.input,
                                        batched_extras(record), plan.mode or "auto",
                                        chunk_size, plan.site))
        if plan.rule.shared:
            if plan.site not in self._shared:
                self._shared[plan.site] = plan.rule.jacobian(module, record.input[:1])
            return self._shared[plan.site]
        return plan.rule.jacobian(module, record.input)


class _Clock:
    """Seconds between laps (synchronizing CUDA so each lap is charged to its own work)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now

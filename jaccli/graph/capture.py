"""Capture a model as an `OpGraph`: eager module, `ExportedProgram` or TorchScript module.

Paths (recorded as `graph.capture_path`, with the reason in `graph.capture_note`):
    export-dynamic       eager module exported with a dynamic batch dimension
    export-static        eager module whose batch could not be made dynamic: static export,
                         run B0 samples at a time
    program-dynamic      an ExportedProgram whose batch is already dynamic, used as is
    program-reexported   a static-batch program re-exported with a dynamic batch (possible
                         when none of its shapes depend on the batch)
    program-static       a static-batch program that cannot be re-exported (its shapes, e.g.
                         `view(1, 48)`, hard-code B0): run B0 samples at a time
    torchscript-dynamic  a ScriptModule converted (TorchScript graph -> FX) and exported with a
                         dynamic batch; module names come from TorchScript's hierarchy
    torchscript-static   the same, exported for the example's batch size only
In-place ops are functionalized (`run_decompositions({})`) in every path.
"""

from __future__ import annotations

import io
import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from ..errors import ModelLoadError, UnsupportedModuleError, UsageError
from .build import build_graph
from .call_layout import CallLayout
from .hierarchy import FRAMES_META, frames_from_torchscript, raw_frames
from .opgraph import OpGraph
from .trace import evaluate


def capture(model, example: torch.Tensor, *, layout: CallLayout | None = None,
            held: tuple[torch.Tensor, ...] = ()) -> OpGraph:
    """The op graph of `model` for inputs shaped like `example (B, *in_shape)`, any B >= 1.

    layout / held: for a model taking more than one argument, how it is called and example
    values `(B, ...)` of the per-sample tensors held fixed (`layout.held`): they become
    program inputs with the same dynamic batch axis, the constants are baked in, and the
    graph's input is `layout.wrt`."""
    if not isinstance(example, torch.Tensor) or example.ndim < 1 or example.shape[0] < 1:
        raise UsageError("the example input must be a tensor with a batch axis first")
    call = _Call(layout, tuple(held))
    if isinstance(model, torch.jit.ScriptModule):
        return _from_torchscript(model, example, call)
    if isinstance(model, ExportedProgram):
        return _from_program(model, example, call)
    if isinstance(model, nn.Module):
        return _from_module(model, example, call)
    raise UsageError(f"cannot capture a {type(model).__name__}: give an nn.Module, an "
                     "ExportedProgram or a TorchScript module")


@dataclass(frozen=True)
class _Call:
    """How the captured program is called: `layout` (None: one tensor argument) and the
    example held tensors."""

    layout: CallLayout | None = None
    held: tuple[torch.Tensor, ...] = ()

    def arguments(self, x: torch.Tensor, rows: slice | None = None) -> tuple:
        """Example arguments with `x`, the held tensors cut to `rows` (or grown like x)."""
        if self.layout is None:
            return (x,)
        held = tuple(h[rows] if rows is not None else _like(h, x.shape[0]) for h in self.held)
        return tuple(self.layout.arguments(x, held))

    def dynamic_shapes(self, batch: Dim) -> tuple:
        if self.layout is None:
            return ({0: batch},)
        return tuple({0: batch} if name in self.layout.batched() else None
                     for name in self.layout.passed())

    def roles(self) -> tuple | None:
        """Per program user input: `input`, `held`, or `("constant", value)`."""
        if self.layout is None:
            return None
        layout, out = self.layout, []
        for name in layout.passed():
            value = layout.constants.get(name, layout.defaults.get(name))
            if name == layout.wrt:
                out.append("input")
            elif name in layout.held:
                out.append("held")
            elif value is not None:  # None is no program input
                out.append(("constant", value))
        return tuple(out)


def _like(held: torch.Tensor, batch: int) -> torch.Tensor:
    """The first `batch` rows of `held`, its last row repeated when it has fewer."""
    if held.shape[0] >= batch:
        return held[:batch]
    return torch.cat([held, held[-1:].expand(batch - held.shape[0], *held.shape[1:])])


def _two_or_more(example: torch.Tensor) -> torch.Tensor:
    """Export specializes a batch of 1 to a constant: trace with at least 2 samples."""
    return example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).clone()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _functional(program: ExportedProgram) -> ExportedProgram:
    """Functionalize in-place ops and views; keep every op that has a core ATen form as is."""
    return program.run_decompositions({})


def _export_dynamic(module: nn.Module, example: torch.Tensor,
                    call: _Call = _Call()) -> ExportedProgram:
    return torch.export.export(module, call.arguments(_two_or_more(example)),
                               dynamic_shapes=call.dynamic_shapes(Dim("batch")), strict=False)


@contextmanager
def _quiet_fake_tensor_logs():
    """A failing op under torch.export's fake tensors logs its whole traceback at ERROR level
    on stderr; the refusal's one line says enough."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _from_module(model: nn.Module, example: torch.Tensor, call: _Call = _Call(), *,
                 parameters=None, paths=("export-dynamic", "export-static"),
                 origin="the model") -> OpGraph:
    with _quiet_fake_tensor_logs():
        return _capture_module(model, example, call, parameters, paths, origin)


def _capture_module(model: nn.Module, example: torch.Tensor, call: _Call, parameters, paths,
                    origin: str) -> OpGraph:
    try:
        program = _export_dynamic(model, example, call)
        path, note, static = paths[0], f"{origin} exported with a dynamic batch axis", None
    except Exception as dynamic_error:  # any export failure has a fallback
        try:  # one sample at a time: every batch-axis guess is then exact
            program = torch.export.export(model, call.arguments(example[:1], slice(0, 1)),
                                          strict=False)
        except Exception as error:
            raise UnsupportedModuleError(
                f"torch.export cannot capture {origin}: {_first_line(error)}") from error
        static = 1
        path = paths[1]
        note = (f"{origin} could not be exported with a dynamic batch "
                f"({_first_line(dynamic_error)}); exported for one sample and run one sample "
                "at a time")
    return build_graph(_functional(program), static_batch=static, capture_path=path,
                       capture_note=note, parameters=parameters, roles=call.roles())


def _user_input(program: ExportedProgram):
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            return node.meta.get("val")
    raise UnsupportedModuleError("the program has no tensor input")


def _from_program(program: ExportedProgram, example: torch.Tensor, call: _Call) -> OpGraph:
    if call.layout is not None:  # re-exported with the held inputs' batch axes dynamic too
        # A program exported for a fixed batch guards its inputs' sizes: without the guards
        # its module traces again at any batch, unless its shapes depend on that size.
        return _from_module(_with_frames(program.module(check_guards=False)), example, call,
                            paths=("program-reexported", "program-static"),
                            origin="the program")
    val = _user_input(program)
    if isinstance(val.shape[0], torch.SymInt):
        return build_graph(_functional(program), static_batch=None,
                           capture_path="program-dynamic",
                           capture_note="the program's batch axis is dynamic; used as is")
    static = int(val.shape[0])
    if tuple(val.shape[1:]) != tuple(example.shape[1:]):
        raise UsageError(f"the example's per-sample shape {tuple(example.shape[1:])} differs "
                         f"from the program's {tuple(val.shape[1:])}")
    module = _with_frames(program.module(check_guards=False))
    try:
        reexported = _export_dynamic(module, example)
    except Exception as error:  # a static program still runs, B0 at a time
        graph = build_graph(
            _functional(program), static_batch=static, capture_path="program-static",
            capture_note=(f"the program has a static batch of {static} and cannot be "
                          f"re-exported with a dynamic one ({_first_line(error)}); it runs "
                          f"{static} samples at a time, batch axes inferred from leading "
                          "sizes and checked by perturbing one sample"))
        return _checked_static(graph, example)
    return build_graph(
        _functional(reexported), static_batch=None, capture_path="program-reexported",
        capture_note=(f"the program has a static batch of {static}; its shapes do not depend "
                      "on it, so it was re-exported with a dynamic batch axis"))


def _with_frames(module):
    """The program's module, each node keeping its module names through a re-export."""
    for node in module.graph.nodes:
        node.meta.setdefault("custom", {})[FRAMES_META] = raw_frames(node.meta)
    return module


def _checked_static(graph: OpGraph, example: torch.Tensor) -> OpGraph:
    """A static program's batch axes are guessed (axis 0 where the leading size is B0).
    With B0 > 1 another axis may have that size: perturb sample 0 and keep axis 0 only for
    tensors whose other rows do not change; the rest count as merged (handled in regions)."""
    size = graph.static_batch
    if size == 1:
        return graph  # any size-1 axis holds the one sample: every guess is exact
    gen = torch.Generator().manual_seed(0)
    rows = example[:1].expand(size, *example.shape[1:])
    base = rows + 0.1 * torch.randn(rows.shape, generator=gen, dtype=rows.dtype)
    moved = base.clone()
    moved[0] += torch.randn(moved[0].shape, generator=gen, dtype=rows.dtype)
    with torch.no_grad():
        first, second = evaluate(graph, base), evaluate(graph, moved)
    for node in graph.nodes.values():
        value = first.get(node.name)
        if (node.batch_axis == 0 and node.target is not None
                and isinstance(value, torch.Tensor)
                and not torch.equal(value[1:], second[node.name][1:])):
            node.batch_axis, node.shape = None, None
    return graph


def _from_torchscript(script: torch.jit.ScriptModule, example: torch.Tensor,
                      call: _Call) -> OpGraph:
    """TorchScript graph -> FX (torch's TS2EP converter, recording each node's module
    hierarchy), then exported like an eager module."""
    from torch._export import converter as ts2ep
    from torch._export.passes.replace_quantized_ops_with_standard_ops_pass import (
        replace_quantized_ops_with_standard_ops,
    )

    class FrameRecorder(ts2ep.TS2FXGraphConverter):
        def convert_node(self, node):
            before = set(self.fx_graph.nodes)
            super().convert_node(node)
            frames = frames_from_torchscript(node.getModuleHierarchy())
            for fx_node in self.fx_graph.nodes:
                if fx_node not in before:
                    fx_node.meta.setdefault("custom", {})[FRAMES_META] = frames

    # The converter rewrites method graphs in place, and TorchScript shares them between
    # modules of the same type: convert a private copy, or later scripts lose their calls.
    buffer = io.BytesIO()
    torch.jit.save(script, buffer)
    buffer.seek(0)
    script = torch.jit.load(buffer)
    try:
        conv = ts2ep.TS2EPConverter(script, call.arguments(_two_or_more(example)))
        lifted, attribute_names = ts2ep.get_block_to_lifted_attrs(conv.ts_graph)
        if conv.name_to_constant:
            raise UnsupportedModuleError("the TorchScript module holds script objects "
                                         f"({', '.join(conv.name_to_constant)})")
        module = FrameRecorder(conv.ts_graph, conv.name_to_param, conv.name_to_buffer, lifted,
                               conv.name_to_non_tensor_attributes, conv.name_to_constant,
                               attribute_names).convert()
        replace_quantized_ops_with_standard_ops(module)
    except UnsupportedModuleError:
        raise
    except Exception as error:
        raise ModelLoadError(f"cannot convert the TorchScript module to an op graph: "
                             f"{_first_line(error)} (torch's TS2EP converter)") from error
    parameters = {name: p.detach() for name, p in script.named_parameters()}
    return _from_module(module, example, call, parameters=parameters,
                        paths=("torchscript-dynamic", "torchscript-static"),
                        origin="the converted TorchScript module")

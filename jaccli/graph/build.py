"""Turn a functional `ExportedProgram` into an `OpGraph`: classify nodes, find batch axes.

A dynamic program has one batch symbol (the input's axis 0); a tensor's batch axis is the
one dimension equal to that symbol. A static program (`static_batch=B0`) has no symbol: a
batched tensor's batch axis is 0 when its leading size is B0, and unknown (merged) otherwise.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from ..errors import ModelRunError, UnsupportedModuleError
from . import hierarchy
from .opgraph import (
    ACTIVATION,
    BATCH_SHAPED,
    BATCH_VALUE,
    BATCHED,
    BUFFER,
    CONSTANT,
    DERIVED,
    INPUT,
    MULTI,
    PARAMETER,
    SCALAR,
    SYMBOLIC,
    ModuleFrame,
    OpGraph,
    OpNode,
    Ref,
)

_SYMBOLIC_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _symbols(value) -> set[str]:
    if isinstance(value, _SYMBOLIC_TYPES):
        return {str(s) for s in value.node.expr.free_symbols}
    return set()


def _batch_layout(shape, symbol: str | None, static_batch: int | None
                  ) -> tuple[int | None, tuple[int, ...] | None]:
    """(batch axis, per-sample shape), or (None, None) when the batch is merged or absent."""
    if static_batch is not None:
        if len(shape) and shape[0] == static_batch:
            return 0, tuple(int(s) for s in shape[1:])
        return None, None
    axes = [i for i, s in enumerate(shape) if isinstance(s, torch.SymInt)
            and str(s.node.expr) == symbol]
    mentions = [i for i, s in enumerate(shape) if symbol in _symbols(s)]
    if len(axes) != 1 or mentions != axes:
        return None, None
    rest = [s for i, s in enumerate(shape) if i != axes[0]]
    if not all(isinstance(s, int) for s in rest):
        return None, None
    return axes[0], tuple(rest)


def _state(program: ExportedProgram, parameters: dict[str, torch.Tensor] | None
           ) -> tuple[dict[str, tuple[str, str, torch.Tensor]], list[str]]:
    """placeholder -> (kind, qualified name, value); and the user inputs' placeholders.

    parameters: the original module's parameters when the program holds them as buffers or
    constants (TorchScript conversion lifts RNN weights to `lifted_tensor_k` constants): a
    tensor named like one, or sharing its storage, is that parameter.
    """
    state, user_inputs = {}, []
    storage = {(v.data_ptr(), tuple(v.shape), v.stride()): k
               for k, v in (parameters or {}).items()}
    for spec in program.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
            continue
        if spec.kind == InputKind.PARAMETER:
            state[name] = (PARAMETER, spec.target, program.state_dict[spec.target])
            continue
        if spec.kind not in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise UnsupportedModuleError(
                f"the program has an input of kind {spec.kind.name} ({name}); jaccli handles "
                "parameters, buffers, tensor constants and one tensor input")
        value = (program.state_dict[spec.target] if spec.target in program.state_dict
                 else program.constants[spec.target])
        kind = BUFFER if spec.kind == InputKind.BUFFER else CONSTANT
        qualified = spec.target
        if parameters is not None:
            key = (value.data_ptr(), tuple(value.shape), value.stride())
            if spec.target in parameters:
                kind = PARAMETER
            elif key in storage:
                kind, qualified = PARAMETER, storage[key]
        state[name] = (kind, qualified, value)
    return state, user_inputs


def _output_names(program: ExportedProgram, count: int) -> list[str]:
    spec = program.call_spec.out_spec
    if spec is None or spec.num_leaves != count:
        return ["output"] if count == 1 else [str(i) for i in range(count)]
    tree = pytree.tree_unflatten(list(range(count)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "idx", getattr(k, "key", getattr(k, "name", k)))) for k in path]
        names.append(".".join(parts) or "output")
    return names


def build_graph(program: ExportedProgram, *, static_batch: int | None, capture_path: str,
                capture_note: str, parameters: dict[str, torch.Tensor] | None = None,
                roles: tuple | None = None) -> OpGraph:
    """The op graph of a functional (decomposed) program with one differentiated tensor input.

    parameters: see `_state` (for programs converted from TorchScript). roles: for a program
    with several user inputs, what each one is: `"input"` (the one differentiated),
    `"held"` (a per-sample tensor held fixed: a batch-shaped node, batch axis 0) or
    `("constant", value)` (a value without batch axis: a constant node)."""
    state, user_inputs = _state(program, parameters)
    roles = roles or ("input",)
    if len(user_inputs) != len(roles):
        raise UnsupportedModuleError(
            f"the model takes {len(user_inputs)} inputs; give the ones after the first with "
            "--input NAME=FILE or --const NAME=VALUE" if len(roles) == 1 else
            f"the program has {len(user_inputs)} inputs for {len(roles)} arguments")
    role_of = dict(zip(user_inputs, roles, strict=True))
    primary = next(n for n, r in role_of.items() if r == "input")
    nodes: dict[str, OpNode] = {}
    depends: dict[str, tuple[bool, bool]] = {}  # name -> (reads input values, reads the batch)
    symbol = None
    for fx_node in program.graph.nodes:
        name = fx_node.name
        val = fx_node.meta.get("val")
        if fx_node.op == "placeholder":
            if name in state:
                kind, _, value = state[name]
                nodes[name] = OpNode(name, kind, shape=tuple(value.shape), dtype=value.dtype)
                depends[name] = (False, False)
                continue
            if role_of[name] != "input":
                nodes[name] = _extra_input(name, role_of[name], val, symbol, static_batch)
                depends[name] = (False, nodes[name].kind == BATCH_SHAPED)
                continue
            if not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
                raise UnsupportedModuleError(
                    "the model input must be a floating-point tensor to be differentiated")
            if static_batch is None:
                if not isinstance(val.shape[0], torch.SymInt):
                    raise UnsupportedModuleError("the program's batch axis is not dynamic")
                symbol = str(val.shape[0].node.expr)
            axis, shape = _batch_layout(val.shape, symbol, static_batch)
            if axis != 0:
                raise UnsupportedModuleError(
                    f"the model input's per-sample shape must be static, got {tuple(val.shape)}")
            nodes[name] = OpNode(name, INPUT, shape=shape, batch_axis=0, dtype=val.dtype)
            depends[name] = (True, True)
        elif fx_node.op == "get_attr":
            value = getattr(program.graph_module, fx_node.target)
            nodes[name] = OpNode(name, CONSTANT, target=None, args=(value,))
            depends[name] = (False, False)
        elif fx_node.op == "call_function":
            node = _op_node(fx_node, nodes, depends, symbol, static_batch)
            if node is not None:
                nodes[name] = node
        elif fx_node.op == "output":
            outputs = _outputs(program, fx_node, nodes)
    graph = OpGraph(nodes, primary, outputs,
                    {n: (q, v) for n, (_, q, v) in state.items()},
                    nodes[primary].shape, symbol, static_batch, capture_path,
                    capture_note, program,
                    held=tuple(n for n, r in role_of.items() if r == "held"))
    hierarchy.repair_regenerated(graph)
    hierarchy.assign_calls(graph)
    return graph


def _extra_input(name: str, role, val, symbol: str | None, static_batch: int | None) -> OpNode:
    """A user input that is not differentiated: a held per-sample tensor (batch-shaped, its
    batch axis 0) or a constant (its value kept in `args`)."""
    if role != "held":
        value = role[1]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        return OpNode(name, CONSTANT, args=(value,), shape=shape,
                      dtype=getattr(value, "dtype", None))
    if symbol is None and static_batch is None:
        shape = tuple(val.shape)  # the differentiated input comes later: its symbol is axis 0's
        symbol = str(shape[0].node.expr) if isinstance(shape[0], torch.SymInt) else None
    axis, shape = _batch_layout(val.shape, symbol, static_batch)
    if axis != 0:
        raise UnsupportedModuleError(
            f"the input {name} held fixed must have the batch first and a static per-sample "
            f"shape, got {tuple(val.shape)}")
    return OpNode(name, BATCH_SHAPED, shape=shape, batch_axis=0, dtype=val.dtype)


def _op_node(fx_node, nodes, depends, symbol, static_batch) -> OpNode | None:
    name, val = fx_node.name, fx_node.meta.get("val")
    args = map_arg(fx_node.args, lambda n: Ref(n.name))
    kwargs = map_arg(fx_node.kwargs, lambda n: Ref(n.name))
    target, output_index, source = fx_node.target, None, None
    parent = nodes[args[0].name] if args and isinstance(args[0], Ref) else None
    if target is operator.getitem and parent is not None and parent.kind == MULTI:
        target, output_index, source = parent.target, int(args[1]), parent.name
        args, kwargs = parent.args, parent.kwargs
    if val is None and not fx_node.users:
        return None  # a runtime assertion: no value, nothing reads it
    refs = [leaf.name for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, Ref)]
    reads_values = any(depends[r][0] for r in refs)
    reads_batch = any(depends[r][1] for r in refs)
    frames = tuple(ModuleFrame(*f) for f in hierarchy.raw_frames(fx_node.meta))
    common = dict(target=target, args=args, kwargs=kwargs, output_index=output_index,
                  source=source, stack=frames,
                  regenerated=bool(fx_node.meta.get("is_functional_regenerated")))
    if isinstance(val, (tuple, list)):
        kind = MULTI
        node = OpNode(name, kind, **common)
    elif isinstance(val, torch.Tensor):
        shape_symbols = set().union(*(_symbols(s) for s in val.shape)) if val.ndim else set()
        if reads_values:
            kind = ACTIVATION if val.dtype.is_floating_point else BATCH_VALUE
            if static_batch is None and symbol not in shape_symbols and fx_node.users:
                raise ModelRunError(
                    f"the model mixes the samples of a batch: {name} ({fx_node.target}) has "
                    f"shape {tuple(val.shape)} without the batch axis; per-sample Jacobians "
                    "need samples processed independently")
        elif reads_batch or (symbol is not None and symbol in shape_symbols):
            kind = BATCH_SHAPED
        else:
            kind = DERIVED
        axis, shape = (None, tuple(val.shape)) if kind == DERIVED else _batch_layout(
            val.shape, symbol, static_batch)
        node = OpNode(name, kind, shape=shape, batch_axis=axis, dtype=val.dtype, **common)
    elif isinstance(val, _SYMBOLIC_TYPES) and _symbols(val):
        node = OpNode(name, SYMBOLIC, sym_expr=val.node.expr, **common)
        reads_values, reads_batch = False, True  # a size, not a value: no derivative flows
    else:
        node = OpNode(name, SCALAR, **common)
    if node.kind in BATCHED:
        reads_batch = True
    depends[name] = (reads_values, reads_batch)
    return node


def _outputs(program: ExportedProgram, fx_node, nodes: dict[str, OpNode]) -> dict[str, str]:
    flat = list(pytree.tree_leaves(fx_node.args[0]))
    user = []
    for spec, value in zip(program.graph_signature.output_specs, flat, strict=False):
        if spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION):
            raise ModelRunError(
                f"the model writes to {spec.target} while running (BatchNorm in training mode?); "
                "put the model in eval mode")
        if spec.kind == OutputKind.USER_OUTPUT:
            user.append(value)
    names = _output_names(program, len(user))
    return {n: v.name for n, v in zip(names, user, strict=True) if hasattr(v, "name")}

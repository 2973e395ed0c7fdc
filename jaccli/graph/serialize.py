"""An `OpGraph` as JSON plus named tensors, and back, without pickle or code from the file.

What is written (`to_record`): every node (kind, ATen target by name, arguments, shapes,
dtypes, module frames), outputs, state and flags. Tensors are either *bound* — a state entry
that is the caller's module tensor of that qualified name, not stored, looked up again at
load — or stored under a key of the returned tensor dict (constants).

What is read back (`from_record`) can only name:
    targets   `torch.ops.<namespace>.<op>.<overload>` operator overloads (file operators
              refused) or torch's symbolic-size arithmetic (`operator.mul`, `torch.sym_max`...)
    values    None, bool, int, float (inf/nan included), str, lists/tuples of them, node
              references, torch dtypes, devices, layouts, memory formats, stored tensors
Anything else raises `GraphRecordError`. Graphs holding something this format cannot say
(a symbolic size other than the batch symbol itself, a non-contiguous constant, another
Python object) raise `GraphRecordError` on writing: they are captured every time.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch

from .opgraph import SYMBOLIC, ModuleFrame, OpGraph, OpNode, Ref

FORMAT_VERSION = 1
# Operators that read or write files (as in the .pt2 trust check).
_FILE_OPERATORS = {"aten::from_file", "aten::save", "debugprims::load_tensor"}
_SYMBOLIC = {f"operator.{f.__name__}": f for f in (
    operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt,
    operator.neg, operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv,
    operator.mod, operator.pow, operator.truediv, operator.and_, operator.or_,
    operator.lshift, operator.rshift, operator.getitem, operator.not_, operator.abs)}
_SYMBOLIC.update({f"math.{f.__name__}": f for f in (math.trunc, math.ceil, math.floor)})
_SYMBOLIC.update({f"torch.{f.__name__}": f for f in (
    torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min,
    torch.sym_sqrt)})
_SYMBOLIC_NAMES = {f: name for name, f in _SYMBOLIC.items()}
_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_FORMATS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.memory_format)}


class GraphRecordError(ValueError):
    """A graph this format cannot hold, or a record that is not a valid one."""


def to_record(graph: OpGraph, bound: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(JSON-able record, tensors to store) for `graph`. bound: qualified name -> the module
    tensor a state entry may be instead of being stored (same object)."""
    tensors: dict[str, torch.Tensor] = {}

    def stored(value: torch.Tensor) -> dict:
        if not value.is_contiguous() or value.is_sparse or value.device.type != "cpu":
            raise GraphRecordError("a tensor constant that is not dense, contiguous, on CPU")
        key = f"t{len(tensors)}"
        tensors[key] = value.detach()
        return {"tensor": key}

    def encode(value: Any) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, Ref):
            return {"ref": value.name}
        if isinstance(value, (list, tuple)):
            return {"list" if isinstance(value, list) else "tuple": [encode(v) for v in value]}
        if isinstance(value, torch.dtype):
            return {"dtype": str(value)}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, torch.layout):
            return {"layout": str(value)}
        if isinstance(value, torch.memory_format):
            return {"memory_format": str(value)}
        if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, torch.nn.Parameter):
            return stored(value)
        raise GraphRecordError(f"an argument of type {type(value).__name__}")

    state = {}
    for name, (qualified, value) in graph.state.items():
        mine = bound.get(qualified)
        state[name] = {"qualified": qualified,
                       **({"bound": True} if mine is value else stored(value))}
    return {
        "version": FORMAT_VERSION,
        "nodes": [_encode_node(n, encode, graph.batch_symbol) for n in graph.nodes.values()],
        "input": graph.input, "outputs": graph.outputs, "state": state,
        "input_shape": list(graph.input_shape), "batch_symbol": graph.batch_symbol,
        "static_batch": graph.static_batch, "capture_path": graph.capture_path,
        "capture_note": graph.capture_note, "held": list(graph.held),
    }, tensors


def _encode_node(node: OpNode, encode, symbol: str | None) -> dict:
    if node.kind == SYMBOLIC and (symbol is None or str(node.sym_expr) != symbol):
        raise GraphRecordError(f"the symbolic size {node.sym_expr} is not the batch symbol")
    return {"name": node.name, "kind": node.kind, "target": _target_name(node.target),
            "args": encode(tuple(node.args)), "kwargs": {k: encode(v) for k, v in
                                                         node.kwargs.items()},
            "output_index": node.output_index, "source": node.source,
            "shape": None if node.shape is None else list(node.shape),
            "batch_axis": node.batch_axis,
            "dtype": None if node.dtype is None else str(node.dtype),
            "stack": [[f.name, f.type, f.call] for f in node.stack],
            "sym_expr": None if node.sym_expr is None else str(node.sym_expr),
            "regenerated": node.regenerated}


def _target_name(target) -> str | None:
    if target is None:
        return None
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    try:
        return _SYMBOLIC_NAMES[target]
    except (KeyError, TypeError):
        raise GraphRecordError(f"the target {target!r} is not an operator") from None


def from_record(record: dict, tensors: dict[str, torch.Tensor],
                bound: dict[str, torch.Tensor]) -> OpGraph:
    """The graph `to_record` wrote; tensors: the stored ones; bound: qualified name -> the
    module tensor of that name. Raises GraphRecordError on anything that does not fit."""
    try:
        return _from_record(record, tensors, bound)
    except GraphRecordError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise GraphRecordError(f"not a valid graph record ({type(exc).__name__}: {exc})"
                               ) from exc


def _from_record(record: dict, tensors: dict, bound: dict) -> OpGraph:
    if record.get("version") != FORMAT_VERSION:
        raise GraphRecordError(f"graph record version {record.get('version')!r}")

    def tensor(key: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in tensors:
            raise GraphRecordError(f"no stored tensor {key!r}")
        return tensors[key]

    def decode(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise GraphRecordError(f"not a value: {value!r:.80}")
        (tag, inner), = value.items()
        if tag == "ref":
            return Ref(_text(inner))
        if tag in ("list", "tuple"):
            items = [decode(v) for v in _items(inner)]
            return items if tag == "list" else tuple(items)
        if tag == "float":
            if inner not in ("inf", "-inf", "nan"):
                raise GraphRecordError(f"not a float: {inner!r:.40}")
            return float(inner)
        if tag == "dtype":
            return _DTYPES[inner]
        if tag == "device":
            return torch.device(_text(inner))
        if tag == "layout":
            return _LAYOUTS[inner]
        if tag == "memory_format":
            return _FORMATS[inner]
        if tag == "tensor":
            return tensor(inner)
        raise GraphRecordError(f"unknown value tag {tag!r:.40}")

    state = {}
    for name, entry in record["state"].items():
        qualified = _text(entry["qualified"])
        if entry.get("bound"):
            if qualified not in bound:
                raise GraphRecordError(f"the module has no tensor {qualified}")
            state[name] = (qualified, bound[qualified])
        else:
            state[name] = (qualified, tensor(entry["tensor"]))
    nodes = {}
    symbol = record["batch_symbol"]
    for item in _items(record["nodes"]):
        node = OpNode(
            _text(item["name"]), _text(item["kind"]), target=_resolve(item["target"]),
            args=decode(item["args"]), kwargs={_text(k): decode(v)
                                                for k, v in item["kwargs"].items()},
            output_index=_optional_int(item["output_index"]), source=item["source"],
            shape=None if item["shape"] is None else tuple(int(s) for s in item["shape"]),
            batch_axis=_optional_int(item["batch_axis"]),
            dtype=None if item["dtype"] is None else _DTYPES[item["dtype"]],
            stack=tuple(ModuleFrame(*(_text(p) for p in f)) for f in item["stack"]),
            sym_expr=item["sym_expr"], regenerated=bool(item["regenerated"]))
        if node.kind == SYMBOLIC and (symbol is None or node.sym_expr != symbol):
            raise GraphRecordError("a symbolic size that is not the batch symbol")
        if not isinstance(node.args, tuple):
            raise GraphRecordError("node arguments are not a tuple")
        nodes[node.name] = node
    if record["input"] not in nodes or any(v not in nodes for v in record["outputs"].values()):
        raise GraphRecordError("the input or an output names no node")
    for node in nodes.values():
        if any(r not in nodes for r in node.refs()) or (node.source is not None
                                                         and node.source not in nodes):
            raise GraphRecordError(f"{node.name} reads a node that does not exist")
    return OpGraph(nodes, record["input"], {_text(k): _text(v) for k, v in
                                            record["outputs"].items()},
                   state, tuple(int(s) for s in record["input_shape"]), symbol,
                   _optional_int(record["static_batch"]), _text(record["capture_path"]),
                   _text(record["capture_note"]), None,
                   held=tuple(_text(h) for h in record["held"]))


def _resolve(name: str | None):
    """An operator overload by its `torch.ops...` name, or a symbolic-size callable."""
    if name is None:
        return None
    if name in _SYMBOLIC:
        return _SYMBOLIC[name]
    parts = _text(name).split(".")
    if len(parts) != 5 or parts[:2] != ["torch", "ops"] or not all(
            p.isidentifier() for p in parts[2:]):
        raise GraphRecordError(f"not an operator name: {name!r:.80}")
    namespace, op, overload = parts[2:]
    if f"{namespace}::{op}" in _FILE_OPERATORS:
        raise GraphRecordError(f"{namespace}::{op} reads or writes files")
    target = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    if not isinstance(target, torch._ops.OpOverload):
        raise GraphRecordError(f"{name} is not an operator overload")
    return target


def _text(value) -> str:
    if not isinstance(value, str):
        raise GraphRecordError(f"expected a string, got {type(value).__name__}")
    return value


def _items(value) -> list:
    if not isinstance(value, list):
        raise GraphRecordError(f"expected a list, got {type(value).__name__}")
    return value


def _optional_int(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise GraphRecordError(f"expected an integer, got {value!r:.40}")
    return value

"""The operator graph: ATen op nodes in topological order and what each one is.

Node kinds:
    input          the model input (batch on axis 0)
    parameter / buffer / constant   the program's lifted state
    activation     a floating tensor computed from the input's values (differentiated)
    batch-value    a non-floating tensor computed from the input's values (max-pool indices)
    batch-shaped   a tensor whose values do not depend on the input but whose shape has the
                   batch in it (`zeros(1, B, H)` initial RNN states, expanded class tokens,
                   a per-sample model input held fixed and what is computed from it alone)
    derived        a tensor computed from parameters and constants only (`W.t()`)
    symbolic       a Python scalar that depends on the batch size (`x.size(0)`)
    scalar         a Python scalar constant
    multi          the tuple a multi-output op returns; `getitem` nodes become op nodes with
                   `output_index` that call the same op (evaluated once)
    effect         no value (runtime assertions)

Per-sample shapes drop the batch axis, wherever it is; `batch_axis` None on a batch-dependent
tensor means the batch is merged with another axis (`view(L, N*H, hd)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

INPUT, PARAMETER, BUFFER, CONSTANT = "input", "parameter", "buffer", "constant"
ACTIVATION, BATCH_VALUE, BATCH_SHAPED = "activation", "batch-value", "batch-shaped"
DERIVED, SYMBOLIC, SCALAR, MULTI, EFFECT = "derived", "symbolic", "scalar", "multi", "effect"
STATE = (PARAMETER, BUFFER, CONSTANT)
DIFFERENTIATED = (INPUT, ACTIVATION)
BATCHED = (INPUT, ACTIVATION, BATCH_VALUE, BATCH_SHAPED)


@dataclass(frozen=True)
class Ref:
    """An argument that is another node's value."""

    name: str


@dataclass(frozen=True)
class ModuleFrame:
    """One module call around an op: qualified name (as in the state_dict), class name, and
    `call`, the key that tells apart two calls of the same module."""

    name: str
    type: str
    call: str


@dataclass
class OpNode:
    """One node. `shape` is per sample for batched kinds (batch axis removed), full otherwise."""

    name: str
    kind: str
    target: Any = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output_index: int | None = None
    source: str | None = None
    shape: tuple[int, ...] | None = None
    batch_axis: int | None = None
    dtype: torch.dtype | None = None
    stack: tuple[ModuleFrame, ...] = ()
    sym_expr: Any = None
    regenerated: bool = False

    @property
    def op_name(self) -> str:
        """`linear`, `conv2d`, `add`...: the ATen name without namespace and overload."""
        if self.target is None:
            return self.kind
        name = getattr(self.target, "__name__", str(self.target))
        packet = getattr(self.target, "overloadpacket", None)
        return packet.__name__ if packet is not None else name

    @property
    def op_key(self) -> str:
        """The registry key: `aten.linear.default`."""
        return str(self.target)

    def leaves(self) -> tuple[list, Any]:
        """The flat arguments (`(args, kwargs)` as a pytree, None kept as a leaf, so that a
        top-level argument's position is its index) and the spec to rebuild them. Flattened
        once per `args`/`kwargs` object (rules ask for them on every pass); a new list each
        call."""
        memo = self.__dict__.get("_leaves")
        if memo is None or memo[0] is not self.args or memo[1] is not self.kwargs:
            flat, spec = pytree.tree_flatten((self.args, self.kwargs), is_leaf=lambda a: a is None)
            memo = self.__dict__["_leaves"] = (self.args, self.kwargs, flat, spec)
        return list(memo[2]), memo[3]

    def refs(self) -> list[str]:
        """Names of the nodes this one reads, in argument order (with repeats)."""
        return [leaf.name for leaf in self.leaves()[0] if isinstance(leaf, Ref)]

    @property
    def numel(self) -> int:
        """Entries per sample (batched kinds) or in total."""
        out = 1
        for size in self.shape or ():
            out *= size
        return out


@dataclass
class OpGraph:
    """A captured program.

    nodes: every node in topological order, by name. input: the model input's node.
    outputs: output name (`output`, `0`, `boxes`...) -> node name, in the program's order.
    state: placeholder node -> (qualified state_dict name, tensor) for parameters, buffers
    and constants. static_batch: None for a dynamic batch; else the fixed batch size B0 of a
    program run B0 samples at a time. capture_path / capture_note: how it was captured, why.
    held: the placeholders of the per-sample model inputs held fixed (batch-shaped nodes),
    in the order a trace takes their values.
    """

    nodes: dict[str, OpNode]
    input: str
    outputs: dict[str, str]
    state: dict[str, tuple[str, torch.Tensor]]
    input_shape: tuple[int, ...]
    batch_symbol: str | None
    static_batch: int | None
    capture_path: str
    capture_note: str
    program: Any = None
    held: tuple[str, ...] = ()
    consumers: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.consumers = {name: [] for name in self.nodes}
        for node in self.nodes.values():
            for ref in dict.fromkeys(node.refs()):
                self.consumers[ref].append(node.name)
            if node.source is not None and node.name not in self.consumers[node.source]:
                self.consumers[node.source].append(node.name)

    def __getitem__(self, name: str) -> OpNode:
        return self.nodes[name]

    def activations(self) -> list[str]:
        """Nodes that are differentiated: the input and every activation."""
        return [n.name for n in self.nodes.values() if n.kind in DIFFERENTIATED]

    def parameters(self) -> dict[str, str]:
        """Qualified parameter name -> placeholder node name."""
        return {qualified: node for node, (qualified, _) in self.state.items()
                if self.nodes[node].kind == PARAMETER}

    def op_nodes(self) -> list[OpNode]:
        return [n for n in self.nodes.values() if n.target is not None]

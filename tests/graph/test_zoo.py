"""The zoo in three formats: every Jacobian the engine gives agrees with per-sample autograd
(float64, relative error <= 1e-10), and the formats agree on layers, rules and structures."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch

from jaccli.graph import GraphEngine, capture
from jaccli.graph.engine import END_TO_END
from jaccli.graph.rules.registry import registered
from jaccli.graph.trace import Trace

from .helpers import (
    FORMATS,
    in_format,
    reference_jacobian,
    reference_layer,
    reference_param_jacobians,
    relative_error,
)
from .zoo import ZOO

TOLERANCE = 1e-10
# nn.TransformerEncoderLayer does not convert from TorchScript (see test_capture.py); its
# format check uses the same ViT without it.
CASES = [(name, fmt) for name in ZOO for fmt in FORMATS
         if not (name == "vit" and fmt == "torchscript")]


@functools.cache
def model_and_batch(name: str):
    torch.manual_seed(0)
    model, shape = ZOO[name]()
    model = model.double()
    return model, torch.randn(2, *shape, dtype=torch.float64)


@functools.cache
def captured(name: str, fmt: str):
    """The model's operator graph, captured once per format (granularities share it)."""
    model, x = model_and_batch(name)
    with tempfile.TemporaryDirectory() as tmp:
        return capture(in_format(model, x[:1], fmt, Path(tmp)), x[:1])


@functools.cache
def engine(name: str, fmt: str, granularity: str = "module") -> GraphEngine:
    return GraphEngine(captured(name, fmt), granularity=granularity)


@functools.cache
def end_to_end_reference(name: str) -> torch.Tensor:
    model, x = model_and_batch(name)
    return reference_jacobian(model, x)


@functools.cache
def layer_reference(name: str, granularity: str, layer: str) -> torch.Tensor:
    model, x = model_and_batch(name)
    eng = engine(name, "eager", granularity)
    found = next(lay for lay in eng.layers if lay.name == layer)
    value = Trace(eng.graph, x).values[found.output]
    return reference_layer(model, x, found.members, value, eng.graph[found.output].batch_axis)


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_layer_and_end_to_end_jacobians_match_autograd(name, fmt):
    _, x = model_and_batch(name)
    eng = engine(name, fmt)
    result = eng.compute(x)
    assert relative_error(result[END_TO_END].dense(2), end_to_end_reference(name)) < TOLERANCE
    plan = eng.plan()
    assert plan.layers, "every zoo model has layers"
    for layer in plan.layers:
        jac = result[layer.name]
        assert jac.tag == layer.structure, layer.name
        reference = layer_reference(name, "module", layer.name)
        assert relative_error(jac.dense(2), reference) < TOLERANCE, layer.name
    assert result[END_TO_END].tag == plan.end_to_end.structure


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "vit"])
def test_block_layers_match_autograd(name):
    _, x = model_and_batch(name)
    eng = engine(name, "eager", "block")
    result = eng.compute(x)
    merged = [layer for layer in eng.layers if len(layer.members) > 1]
    assert merged, "conv/linear + activation blocks exist"
    for layer in eng.plan().layers:
        reference = layer_reference(name, "block", layer.name)
        assert relative_error(result[layer.name].dense(2), reference) < TOLERANCE, layer.name
        assert result[layer.name].tag == layer.structure


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_jvp_vjp_operators_match_autograd(name, fmt):
    model, x = model_and_batch(name)
    eng = engine(name, fmt)
    jac = end_to_end_reference(name)
    op = eng.end_to_end_operator(x)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(2, op.d_in, 3, dtype=torch.float64, generator=gen)
    u = torch.randn(2, op.d_out, 3, dtype=torch.float64, generator=gen)
    assert relative_error(op.jvp(v), jac @ v) < TOLERANCE
    assert relative_error(op.vjp(u), jac.transpose(1, 2) @ u) < TOLERANCE
    last = eng.layers[-1].name
    layer_jac = layer_reference(name, "module", last)
    layer_op = eng.layer_operator(last, x)
    w = torch.randn(2, layer_op.d_in, 2, dtype=torch.float64, generator=gen)
    assert relative_error(layer_op.jvp(w), layer_jac @ w) < TOLERANCE


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_parameter_jacobians_match_autograd(name, fmt):
    model, x = model_and_batch(name)
    result = engine(name, fmt).param_jacobians(x)
    reference = reference_param_jacobians(model, x)
    assert set(result) == set(reference)
    for param, value in result.items():
        assert relative_error(value, reference[param]) < TOLERANCE, param


def _summary(eng: GraphEngine):
    """Layers with their structures and rules; copies (identity ops, e.g. the clones a
    scripted LSTM adds) do not count as rules."""
    return [(layer.name, layer.type, layer.structure, layer.input_shape, layer.output_shape,
             sorted({r for op in layer.ops if op.structure != "identity" for r in op.rules}))
            for layer in eng.plan().layers]


@pytest.mark.parametrize("name", [n for n in ZOO if n != "vit"])
def test_formats_give_the_same_layers_rules_and_structures(name):
    eager = _summary(engine(name, "eager"))
    for fmt in FORMATS[1:]:
        assert _summary(engine(name, fmt)) == eager, fmt


@pytest.mark.parametrize("name", list(ZOO))
def test_no_op_with_an_applicable_rule_is_planned_generic(name):
    eng = engine(name, "eager", "op")
    generic = [op for layer in eng.plan().layers for op in layer.ops if op.mode != "rule"]
    for op in generic:
        node = eng.graph[op.node]
        in_region = eng.units[op.node].region is not None
        has_rule = registered(node.target) is not None or torch.Tag.pointwise in getattr(
            node.target, "tags", ())
        assert in_region or not has_rule, (op.node, op.op, op.note)
    if name in ("vit", "recurrent"):
        assert generic, "attention regions and RNN ops are generic"
    else:
        assert not generic

"""Capturing models as op graphs: the paths taken, functionalized in-place ops, module names,
outputs, static-batch programs, and one-line errors for what cannot be captured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jaccli.errors import ModelLoadError, ModelRunError, UnsupportedModuleError, UsageError
from jaccli.graph import END_TO_END, GraphEngine, capture
from jaccli.graph.rules.registry import OpRule, register

from .helpers import reference_jacobian, reference_param_jacobians, relative_error
from .zoo import ZOO


def _double(name):
    torch.manual_seed(0)
    model, shape = ZOO[name]()
    return model.double(), shape


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_eager_export_has_a_dynamic_batch_whatever_the_example(batch):
    model, shape = _double("inplace")
    graph = capture(model, torch.randn(batch, *shape, dtype=torch.float64))
    assert graph.capture_path == "export-dynamic" and graph.static_batch is None
    assert graph.batch_symbol is not None and graph.input_shape == shape
    x = torch.randn(3, *shape, dtype=torch.float64)
    result = GraphEngine(graph).compute(x)
    assert relative_error(result[END_TO_END].dense(3), reference_jacobian(model, x)) < 1e-12


def test_in_place_ops_are_functionalized():
    model, shape = _double("inplace")
    graph = capture(model, torch.randn(1, *shape, dtype=torch.float64))
    ops = [n.op_name for n in graph.op_nodes()]
    assert not [op for op in ops if op.endswith("_")], ops
    assert "mul" in ops and "add" in ops and "slice_scatter" in ops  # h *= 2, h[:, :2] *= 3
    resnet, shape = _double("resnet")
    ops = [n.op_name for n in capture(resnet, torch.randn(1, *shape)).op_nodes()]
    assert ops.count("add") == 2 and "add_" not in ops  # out += identity, twice


def test_module_names_types_and_calls_come_from_the_model():
    model, shape = _double("resnet")
    graph = capture(model, torch.randn(1, *shape, dtype=torch.float64))
    frames = {f.call: f for n in graph.nodes.values() for f in n.stack}
    assert frames["layer1.0.conv1"].type == "Conv2d"
    assert frames["layer1.0"].type == "BasicBlock"
    assert {"layer1.0.relu#0", "layer1.0.relu#1"} <= set(frames)  # one ReLU called twice
    params = set(graph.parameters())
    assert params == {k for k, _ in model.named_parameters()}


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.scores = nn.Linear(5, 2)
        self.boxes = nn.Linear(5, 3)
        self.unused = nn.Linear(5, 7)  # a dead branch: computed, never returned

    def forward(self, x):
        h = torch.tanh(self.body(x))
        self.unused(h)
        return {"scores": self.scores(h), "boxes": self.boxes(h)}


def test_dict_outputs_are_named_and_selectable():
    torch.manual_seed(0)
    model = Heads().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    graph = capture(model, x[:1])
    assert list(graph.outputs) == ["scores", "boxes"]
    everything = GraphEngine(graph).compute(x)[END_TO_END].dense(3)
    assert relative_error(everything, reference_jacobian(model, x)) < 1e-12
    boxes = GraphEngine(graph, output="boxes").compute(x)[END_TO_END].dense(3)
    assert relative_error(boxes, reference_jacobian(lambda v: model(v)["boxes"], x)) < 1e-12
    assert torch.equal(GraphEngine(graph, output=1).compute(x)[END_TO_END].dense(3), boxes)
    with pytest.raises(UsageError, match="no output 'logits'"):
        GraphEngine(graph, output="logits")
    assert "unused" not in [layer.name for layer in GraphEngine(graph).layers]


@pytest.mark.parametrize(("name", "batch", "path"), [
    ("mtcnn", 1, "program-reexported"), ("inplace", 3, "program-reexported"),
    ("vit", 1, "program-static"), ("vit", 3, "program-static")])
def test_static_batch_programs_work(tmp_path, name, batch, path):
    model, shape = _double(name)
    program = torch.export.export(model, (torch.randn(batch, *shape, dtype=torch.float64),))
    torch.export.save(program, tmp_path / "static.pt2")
    graph = capture(torch.export.load(tmp_path / "static.pt2"),
                    torch.randn(1, *shape, dtype=torch.float64))
    assert graph.capture_path == path and str(batch) in graph.capture_note
    x = torch.randn(4, *shape, dtype=torch.float64)
    engine = GraphEngine(graph)
    result = engine.compute(x)
    assert relative_error(result[END_TO_END].dense(4), reference_jacobian(model, x)) < 1e-10
    eager = GraphEngine(capture(model, x[:1]))
    assert [layer.name for layer in engine.layers] == [layer.name for layer in eager.layers]
    if path == "program-static":  # chunked replays: operators and parameter Jacobians too
        jac = reference_jacobian(model, x)
        op = engine.end_to_end_operator(x)
        v = torch.randn(4, op.d_in, 2, dtype=torch.float64)
        u = torch.randn(4, op.d_out, 2, dtype=torch.float64)
        assert relative_error(op.jvp(v), jac @ v) < 1e-10
        assert relative_error(op.vjp(u), jac.transpose(1, 2) @ u) < 1e-10
        grads = engine.param_jacobians(x, param_names=["encoder.self_attn.*", "norm1.*"])
        reference = reference_param_jacobians(model, x, list(grads))
        for param, value in grads.items():
            assert relative_error(value, reference[param]) < 1e-10, param


def test_traced_torchscript_gives_the_eager_layers(tmp_path):
    model, shape = _double("resnet")
    x = torch.randn(2, *shape, dtype=torch.float64)
    torch.jit.save(torch.jit.trace(model, (x,)), tmp_path / "traced.pt")
    traced = GraphEngine(capture(torch.jit.load(tmp_path / "traced.pt"), x[:1]))
    eager = GraphEngine(capture(model, x[:1]))
    assert traced.graph.capture_path == "torchscript-dynamic"
    assert [(p.name, p.structure) for p in traced.plan().layers] == [
        (p.name, p.structure) for p in eager.plan().layers]
    result = traced.compute(x)
    assert relative_error(result[END_TO_END].dense(2), reference_jacobian(model, x)) < 1e-10


def test_a_model_mixing_samples_is_refused():
    class Centered(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=0)

    with pytest.raises(ModelRunError, match="mixes the samples"):
        capture(Centered(), torch.randn(2, 3))


def test_transformer_encoder_layer_does_not_convert_from_torchscript():
    model, shape = _double("vit")
    with pytest.raises(ModelLoadError, match="TorchScript.*TS2EP"):
        capture(torch.jit.script(model), torch.randn(1, *shape, dtype=torch.float64))


def test_inputs_that_cannot_be_differentiated_are_refused():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(UsageError, match="example input"):
        capture(nn.Linear(2, 2), [1.0])
    with pytest.raises(UnsupportedModuleError, match="floating-point"):
        capture(nn.Embedding(4, 2), torch.tensor([[1, 2]]))
    program = torch.export.export(TwoInputs(), (torch.randn(2, 3), torch.randn(2, 3)))
    with pytest.raises(UnsupportedModuleError, match="takes 2 inputs.*--input NAME=FILE"):
        capture(program, torch.randn(2, 3))


def test_wrong_per_sample_shape_is_one_clear_error():
    graph = capture(nn.Linear(3, 2), torch.randn(1, 3))
    with pytest.raises(ModelRunError, match="per-sample shape"):
        GraphEngine(graph).compute(torch.randn(2, 4))


def test_the_registry_refuses_a_second_rule_for_an_op():
    with pytest.raises(ValueError, match="already registered"):
        register(torch.ops.aten.linear.default)(type("AnotherLinear", (OpRule,), {}))

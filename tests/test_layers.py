import pytest
import torch
from torch import nn

from jaccli.errors import UnsupportedModuleError, UsageError
from jaccli.tracing.layers import trace_layers
from jaccli.tracing.recorder import ForwardRecorder

from .conftest import TwoBranch


def test_module_granularity_finds_nested_leaves_in_call_order(cnn):
    trace = trace_layers(cnn, torch.randn(2, 2, 6, 6))
    assert [layer.name for layer in trace.layers] == [
        "features.0", "features.1", "features.2", "features.3", "flatten", "head.0", "head.1",
        "head.2"]
    conv = trace.layers[0]
    assert conv.type_name == "Conv2d"
    assert conv.input_shape == (2, 6, 6) and conv.output_shape == (3, 6, 6)
    assert (conv.d_in, conv.d_out) == (72, 108)
    assert trace.chain
    assert trace.input_shape == (2, 6, 6) and trace.output_shape == (3,)


def test_block_granularity_groups_affine_with_following_activations(cnn):
    trace = trace_layers(cnn, torch.randn(2, 2, 6, 6), granularity="block")
    assert [(layer.name, layer.type_name) for layer in trace.layers] == [
        ("features.0+features.1+features.2", "Conv2d+BatchNorm2d+ReLU"),
        ("features.3", "MaxPool2d"), ("flatten", "Flatten"),
        ("head.0+head.1", "Linear+GELU"), ("head.2", "Linear")]
    assert trace.chain


def test_shared_module_gives_one_layer_per_call_and_residual_is_not_a_chain():
    trace = trace_layers(TwoBranch().eval(), torch.randn(3, 4))
    assert [layer.name for layer in trace.layers] == [
        "inner.0", "inner.1.0", "act#0", "act#1", "out"]
    assert not trace.chain


def test_block_does_not_absorb_an_activation_applied_to_something_else():
    trace = trace_layers(TwoBranch().eval(), torch.randn(3, 4), granularity="block")
    # act#0 consumes inner.1.0's output: grouped; act#1 consumes h + x: its own layer.
    assert [layer.name for layer in trace.layers] == ["inner.0", "inner.1.0+act#0", "act#1", "out"]


def test_layer_patterns_select_and_report_unknown():
    model = TwoBranch().eval()
    trace = trace_layers(model, torch.randn(3, 4), patterns=["inner.*", "act"])
    assert [layer.name for layer in trace.layers] == ["inner.0", "inner.1.0", "act#0", "act#1"]
    assert not trace.chain
    with pytest.raises(UsageError, match="matches no layer; layers are: inner.0, inner.1.0"):
        trace_layers(model, torch.randn(3, 4), patterns=["conv*"])


def test_in_place_activation_input_is_captured_before_the_call():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)).eval()
    x = torch.randn(4, 3)
    _, records = ForwardRecorder(model).run(x)
    pre_activation = model[0](x)
    torch.testing.assert_close(records[1].input, pre_activation)  # negatives kept


def test_integer_inputs_are_skipped_with_a_reason():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    trace = trace_layers(model, torch.tensor([[1, 2], [3, 4]]))
    assert [layer.name for layer in trace.layers] == ["1"]
    assert trace.skipped[0].name == "0"
    assert "not differentiable" in trace.skipped[0].skip_reason


def test_torchscript_sequential_runs_without_hooks(mlp):
    scripted = torch.jit.script(mlp)
    trace = trace_layers(scripted, torch.randn(2, 6), hookable=False)
    assert [layer.name for layer in trace.layers] == ["0", "1", "2", "3", "4"]
    assert trace.chain


def test_torchscript_non_sequential_is_refused_with_a_way_out():
    scripted = torch.jit.script(TwoBranch().eval())
    with pytest.raises(UnsupportedModuleError, match="--no-layers"):
        trace_layers(scripted, torch.randn(2, 4), hookable=False)

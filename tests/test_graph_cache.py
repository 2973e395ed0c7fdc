"""The cache of captured operator graphs (`jaccli.pipelines.graph_cache`, `jaccli.graph.serialize`):
a hit skips torch.export and gives the same Jacobians, a changed model file misses, the cache
can be turned off, and a corrupt or forged entry is ignored without a crash. Values are checked
against the float64 `autograd.functional.jacobian` reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import jaccli
from jaccli.graph import capture as capture_graph
from jaccli.graph import serialize
from jaccli.graph.opgraph import SYMBOLIC
from jaccli.pipelines import engines, graph_cache
from jaccli.pipelines.compute import run_compute
from jaccli.settings import ComputeSettings

from .conftest import CNN_SPEC, MLP_SPEC, ROOT, SAMPLES, randomized, reference_jacobian


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("JACCLI_CACHE_DIR", str(folder))
    monkeypatch.delenv("JACCLI_CACHE", raising=False)
    return folder


@pytest.fixture
def captures(monkeypatch):
    """Counts calls of the real capture (torch.export)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return capture_graph(*args, **kwargs)

    monkeypatch.setattr(engines, "capture", counted)
    return calls


def _model(tmp_path, spec, name="m.safetensors", seed=0):
    torch.manual_seed(seed)
    model = randomized(jaccli.build_model(spec))
    jaccli.save_model(model, spec, tmp_path / name)
    return model


def _compute(tmp_path, model_file="m.safetensors", out="jac.h5", **options):
    options = {"dtype": "float64", **options}
    settings = ComputeSettings.from_options(model=tmp_path / model_file, data=tmp_path / "x.npy",
                                            output=tmp_path / out,
                                            command_line="jaccli compute test", **options)
    run_compute(settings)
    with jaccli.open_results(tmp_path / out) as results:
        return {("end_to_end" if g.kind == "end_to_end" else g.name): np.asarray(g.jacobian)
                for g in results.groups()}


def _data(tmp_path, shape, n=5):
    x = np.random.default_rng(1).normal(size=(n, *shape))
    np.save(tmp_path / "x.npy", x)
    return torch.from_numpy(x)


def _check_end_to_end(jacobians, model, x):
    expected = reference_jacobian(model.double(), x).numpy()
    got = jacobians["end_to_end"].reshape(expected.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", [MLP_SPEC, CNN_SPEC], ids=["mlp", "cnn"])
def test_a_hit_skips_the_capture_and_gives_the_same_jacobians(tmp_path, cache, captures, spec):
    model = _model(tmp_path, spec)
    x = _data(tmp_path, spec["input_shape"])
    first = _compute(tmp_path, out="first.h5")
    assert len(captures) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    second = _compute(tmp_path, out="second.h5")
    assert len(captures) == 1  # from the cache: no export
    assert first.keys() == second.keys() and len(first) > 2
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    _check_end_to_end(second, model, x)


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_archives_hit_too(tmp_path, cache, captures, fmt):
    model = _model(tmp_path, CNN_SPEC).double()
    x = _data(tmp_path, CNN_SPEC["input_shape"])
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, x[:2]), tmp_path / "archive")
    else:
        torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes=(
            {0: torch.export.Dim("batch")},)), tmp_path / "archive")
    first = _compute(tmp_path, model_file="archive", out="first.h5")
    second = _compute(tmp_path, model_file="archive", out="second.h5")
    assert len(captures) == 1 and len(list(cache.glob("*.safetensors"))) == 1
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    _check_end_to_end(second, model, x)


def test_a_changed_model_file_misses(tmp_path, cache, captures):
    _model(tmp_path, MLP_SPEC)
    x = _data(tmp_path, [6])
    _compute(tmp_path)
    changed = _model(tmp_path, MLP_SPEC, seed=7)  # same path, other weights
    jacobians = _compute(tmp_path, out="changed.h5")
    assert len(captures) == 2 and len(list(cache.glob("*.safetensors"))) == 2
    _check_end_to_end(jacobians, changed, x)
    np.testing.assert_allclose(jacobians["0"][0], changed[0].weight.double().detach().numpy(),
                               rtol=1e-12)


def test_a_changed_dtype_or_batch_is_another_entry(tmp_path, cache, captures):
    _model(tmp_path, MLP_SPEC)
    _data(tmp_path, [6])
    _compute(tmp_path)
    _compute(tmp_path, out="f32.h5", dtype="float32")
    _compute(tmp_path, out="f32.h5", dtype="float32")
    assert len(captures) == 2 and len(list(cache.glob("*.safetensors"))) == 2


def test_turned_off_nothing_is_written(tmp_path, cache, captures, monkeypatch):
    monkeypatch.setenv("JACCLI_CACHE", "off")
    model = _model(tmp_path, MLP_SPEC)
    x = _data(tmp_path, [6])
    _compute(tmp_path)
    jacobians = _compute(tmp_path, out="again.h5")
    assert len(captures) == 2 and not cache.exists()
    _check_end_to_end(jacobians, model, x)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "forged target", "other key"])
def test_a_corrupt_entry_is_ignored_and_rewritten(tmp_path, cache, captures, damage):
    model = _model(tmp_path, CNN_SPEC)
    x = _data(tmp_path, CNN_SPEC["input_shape"])
    _compute(tmp_path)
    (entry,) = cache.glob("*.safetensors")
    if damage == "garbage":
        entry.write_bytes(b"\x00not a safetensors file")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    else:
        record = json.loads(_metadata(entry))
        if damage == "forged target":
            for node in record["graph"]["nodes"]:
                if node["target"]:
                    node["target"] = "torch.ops.aten.from_file.default"
        else:
            record["key"] = "0" * 64
        save_file({}, str(entry), metadata={"jaccli.graph": json.dumps(record)})
    jacobians = _compute(tmp_path, out="after.h5")
    assert len(captures) == 2  # ignored: captured again
    _check_end_to_end(jacobians, model, x)
    _compute(tmp_path, out="third.h5")
    assert len(captures) == 2  # and rewritten: a hit now


def _metadata(entry) -> str:
    from safetensors import safe_open

    with safe_open(str(entry), framework="pt") as f:
        return f.metadata()["jaccli.graph"]


def _captured(spec, shape):
    model = randomized(jaccli.build_model(spec)).eval()
    return model, capture_graph(model, torch.randn(3, *shape))


def test_a_record_round_trips_node_for_node():
    model, graph = _captured(CNN_SPEC, CNN_SPEC["input_shape"])
    assert any(n.kind == SYMBOLIC for n in graph.nodes.values())  # the flatten's batch size
    record, tensors = serialize.to_record(graph, graph_cache.module_tensors(model))
    record = json.loads(json.dumps(record))
    back = serialize.from_record(record, tensors, graph_cache.module_tensors(model))
    assert list(back.nodes) == list(graph.nodes)
    for name, node in graph.nodes.items():
        other = back.nodes[name]
        for field in ("kind", "target", "args", "kwargs", "output_index", "source", "shape",
                      "batch_axis", "dtype", "stack", "regenerated"):
            assert getattr(other, field) == getattr(node, field), (name, field)
    assert back.outputs == graph.outputs and back.input_shape == graph.input_shape
    for name, (qualified, value) in graph.state.items():
        assert back.state[name][0] == qualified and back.state[name][1] is value  # bound


@pytest.mark.parametrize("target", ["builtins.eval", "torch.os.system", "os.system",
                                    "torch.ops.aten.save.default", "torch.ops.aten"])
def test_a_record_naming_anything_but_an_operator_is_refused(target):
    model, graph = _captured(MLP_SPEC, [6])
    record, tensors = serialize.to_record(graph, graph_cache.module_tensors(model))
    next(n for n in record["nodes"] if n["target"])["target"] = target
    with pytest.raises(serialize.GraphRecordError):
        serialize.from_record(record, tensors, graph_cache.module_tensors(model))


def test_a_record_with_unknown_value_tags_is_refused():
    model, graph = _captured(MLP_SPEC, [6])
    record, tensors = serialize.to_record(graph, graph_cache.module_tensors(model))
    next(n for n in record["nodes"] if n["target"])["args"] = {"pickle": "cos\nsystem\n"}
    with pytest.raises(serialize.GraphRecordError):
        serialize.from_record(record, tensors, graph_cache.module_tensors(model))


def test_models_whose_code_is_outside_the_file_are_not_cached(tmp_path, cache):
    model = randomized(jaccli.build_model(MLP_SPEC))
    torch.save(model, tmp_path / "pickled.pt")
    source = jaccli.ModelSource(tmp_path / "pickled.pt", trust_pickle=True)
    loaded = jaccli.load_model(tmp_path / "pickled.pt", trust_pickle=True)
    assert graph_cache.cache_key(source, loaded, torch.zeros(2, 6)) is None
    jaccli.save_model(model, MLP_SPEC, tmp_path / "m.safetensors")
    source = jaccli.ModelSource(tmp_path / "m.safetensors")
    loaded = jaccli.load_model(tmp_path / "m.safetensors")
    key = graph_cache.cache_key(source, loaded, torch.zeros(2, 6))
    assert key is not None and key != graph_cache.cache_key(source, loaded, torch.zeros(3, 6))


def test_a_graph_that_read_the_example_values_is_not_stored(cache):
    """A static-batch program's batch axes come from perturbing a sample of the example: the
    key (the example's shape) does not determine such a graph."""
    model, graph = _captured(MLP_SPEC, [6])
    assert graph_cache.store_graph("k" * 64, graph, model) and len(list(cache.iterdir())) == 1
    graph.capture_path = "program-static"
    assert not graph_cache.store_graph("s" * 64, graph, model)
    assert [p.name for p in cache.iterdir()] == ["k" * 64 + ".safetensors"]
    back = graph_cache.load_graph("k" * 64, model)
    assert back is not None and list(back.nodes) == list(graph.nodes)


def test_a_cached_cnn_runs_without_importing_dynamo(tmp_path, cache):
    """The sample CNN (convolutions, average pool) from a cached graph runs on rules and aten
    kernels alone: nothing imports torch._dynamo, whose import (seconds of CPU, through the
    first `torch.func` pullback) every process, every torchrun rank, would pay."""
    x = np.load(SAMPLES / "digits_test_images.npy")[:40]
    np.save(tmp_path / "x.npy", x)
    command = ["compute", str(SAMPLES / "digits_cnn.safetensors"), str(tmp_path / "x.npy"),
               "-o", str(tmp_path / "out.h5"), "-q"]
    # The command ends its own process after the exit handlers: the probe is one.
    script = ("import atexit, runpy, sys\n"
              f"sys.argv = ['jaccli', *{command!r}]\n"
              "atexit.register(lambda: print('torch._dynamo' in sys.modules))\n"
              "runpy.run_module('jaccli', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JACCLI_CACHE_DIR": str(cache)}
    for expected in ("True", "False"):  # the capture imports it, the cached run does not
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == expected
    model = jaccli.load_model(SAMPLES / "digits_cnn.safetensors").module.double()
    pool_input = model.features[:5](torch.from_numpy(x[:2]).double())  # (2, 16, 4, 4)
    with jaccli.open_results(tmp_path / "out.h5") as results:
        e2e = np.asarray(results.end_to_end.jacobian)
        pool = np.asarray(results.layer("features.5").jacobian[:2])  # its matrix, by bands
    expected = reference_jacobian(model, torch.from_numpy(x).double()).numpy()
    np.testing.assert_allclose(e2e.reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)
    expected = reference_jacobian(model.features[5], pool_input).numpy()
    np.testing.assert_allclose(pool.reshape(expected.shape), expected, rtol=1e-6, atol=1e-7)

"""Model and data files whose loading would run code: refused, one line, the marker never made.

Every payload creates MARKER when it runs. Each case was code execution (or a file write) on
main with torch 2.13; see jaccli/models/archive_safety.py for the load paths involved.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import jaccli

from .crafted import (
    MarkerPayload,
    assert_no_partials,
    assert_one_error,
    edit_json,
    invoke,
    pickled,
    rewrite_zip,
)

WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def _pickled_weight(marker):
    def mutate(members, root):
        def edit(config):
            entry = config["config"]["linear.weight"]
            entry["use_pickle"] = True
            members[root + "data/weights/" + entry["path_name"]] = pickled(MarkerPayload(marker))
        edit_json(members, root + WEIGHTS, edit)
    return mutate


def _pickled_constant(marker):
    def mutate(members, root):
        def edit(config):
            entry = next(iter(config["config"].values()))
            entry["use_pickle"] = True
            members[root + "data/constants/" + entry["path_name"]] = \
                pickled(MarkerPayload(marker))
        edit_json(members, root + CONSTANTS, edit)
    return mutate


def _opaque_constant(marker):
    def mutate(members, root):
        def edit(config):
            entry = next(iter(config["config"].values()))
            entry["path_name"] = "opaque_obj_0"
            members[root + "data/constants/opaque_obj_0"] = pickle.dumps(MarkerPayload(marker))
        edit_json(members, root + CONSTANTS, edit)
    return mutate


def _custom_object(marker):
    def mutate(members, root):
        def edit(config):
            entry = next(iter(config["config"].values()))
            entry["path_name"] = "custom_obj_0"
            members[root + "data/constants/custom_obj_0"] = pickle.dumps(MarkerPayload(marker))
        edit_json(members, root + CONSTANTS, edit)
    return mutate


def _example_inputs(marker):
    """torch retries example inputs with weights_only=False: on main this ran with exit 0."""
    def mutate(members, root):
        members[root + "data/sample_inputs/model.pt"] = pickled((MarkerPayload(marker),))
    return mutate


def _legacy_weights(marker):
    def mutate(members, root):
        members[root + "data/weights/model.pt"] = pickled({"x": MarkerPayload(marker)})
    return mutate


def _shape_expression(marker):
    """Shape expressions go through sympy.sympify, i.e. eval: on main this ran, exit 0."""
    def mutate(members, root):
        def edit(program):
            for meta in program["graph_module"]["graph"]["tensor_values"].values():
                for size in meta["sizes"]:
                    if "as_expr" in size:
                        size["as_expr"]["expr_str"] = (
                            f"__import__('builtins').exec(\"open('{marker}', 'w').close()\") "
                            "or Symbol('s77', positive=True, integer=True)")
        edit_json(members, root + PROGRAM, edit)
    return mutate


def _enum_import(marker):
    """A treespec `__enum__` imports any module by name (here one next to the model)."""
    def mutate(members, root):
        def edit(program):
            signature = program["graph_module"]["module_call_graph"][0]["signature"]
            spec = json.loads(signature["in_spec"])
            spec[1]["children_spec"][1]["context"] = json.dumps(
                [{"__enum__": True, "fqn": "evil_module:Color", "name": "RED"}])
            signature["in_spec"] = json.dumps(spec)
        edit_json(members, root + PROGRAM, edit)
    return mutate


def _defaultdict_import(marker):
    def mutate(members, root):
        def edit(program):
            signature = program["graph_module"]["module_call_graph"][0]["signature"]
            spec = json.loads(signature["in_spec"])
            spec[1]["children_spec"][1] = {
                "type": "collections.defaultdict", "children_spec": [],
                "context": json.dumps({"default_factory_module": "evil_module",
                                       "default_factory_name": "Color", "dict_context": []})}
            signature["in_spec"] = json.dumps(spec)
        edit_json(members, root + PROGRAM, edit)
    return mutate


def _python_target(marker):
    def mutate(members, root):
        def edit(program):
            program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
        edit_json(members, root + PROGRAM, edit)
    return mutate


def _file_writing_operator(marker):
    def mutate(members, root):
        def edit(program):
            program["graph_module"]["graph"]["nodes"][0]["target"] = \
                "torch.ops.aten.from_file.default"
        edit_json(members, root + PROGRAM, edit)
    return mutate


def _quoted_name(marker):
    def mutate(members, root):
        evil = f'w"+str(exec("open(\'{marker}\',\'w\').close()"))+"'

        def edit_program(program):
            for spec in program["graph_module"]["signature"]["input_specs"]:
                if spec.get("parameter", {}).get("parameter_name") == "linear.weight":
                    spec["parameter"]["parameter_name"] = "linear." + evil

        def edit_weights(config):
            config["config"]["linear." + evil] = config["config"].pop("linear.weight")
        edit_json(members, root + PROGRAM, edit_program)
        edit_json(members, root + WEIGHTS, edit_weights)
    return mutate


def _native_library(marker):
    def mutate(members, root):
        members[root + "data/aotinductor/model/model.so"] = b"\x7fELF not really"
    return mutate


EXPORT_CASES = {
    "pickled weight": (_pickled_weight, "stored as a pickle"),
    "pickled constant": (_pickled_constant, "stored as a pickle"),
    "opaque constant": (_opaque_constant, "opaque Python object"),
    "custom object": (_custom_object, "TorchBind custom object"),
    "example inputs fallback": (_example_inputs, "example inputs"),
    "legacy weights file": (_legacy_weights, "legacy weights file"),
    "shape expression eval": (_shape_expression, "shape expression"),
    "treespec enum import": (_enum_import, "enum"),
    "treespec defaultdict import": (_defaultdict_import, "defaultdict"),
    "python callable target": (_python_target, "not a PyTorch operator"),
    "file-writing operator": (_file_writing_operator, "reads or writes files"),
    "quoted attribute name": (_quoted_name, "quotes"),
    "AOTInductor library": (_native_library, "AOTInductor"),
}


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module beside the model that creates the marker when imported (as a downloaded
    folder would hold, run with `python -m jaccli` from inside it)."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport enum\n"
        "class Color(enum.Enum):\n    RED = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


@pytest.mark.parametrize("command", ["compute", "inspect"])
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_crafted_export_archive_is_refused(case, command, clean_export, tmp_path,
                                           evil_module):
    mutate, says = EXPORT_CASES[case]
    archive = rewrite_zip(clean_export, tmp_path / "model.pt2", mutate(evil_module))
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    args = (["compute", archive, tmp_path / "x.npy", "-o", tmp_path / "out.h5"]
            if command == "compute" else ["inspect", archive])
    line = assert_one_error(invoke(*args), says=says)
    assert "--trust-pickle allows it" in line
    assert not evil_module.exists(), "the payload ran"
    assert not (tmp_path / "out.h5").exists()
    assert_no_partials(tmp_path)


def test_clean_export_loads_with_no_warning(clean_export):
    result = invoke("inspect", clean_export, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert json.loads(result.stdout)["entries"]


def test_trust_pickle_loads_a_pickled_weight_and_says_so(clean_export, tmp_path):
    """--trust-pickle is the one way through; the payload here is a harmless real tensor."""
    def mutate(members, root):
        def edit(config):
            entry = config["config"]["linear.bias"]
            entry["use_pickle"] = True
            members[root + "data/weights/" + entry["path_name"]] = pickled(
                nn.Parameter(torch.tensor([0.25, -0.75])))
        edit_json(members, root + WEIGHTS, edit)
    archive = rewrite_zip(clean_export, tmp_path / "model.pt2", mutate)
    assert_one_error(invoke("inspect", archive), says="stored as a pickle")
    result = invoke("inspect", archive, "--trust-pickle", "--json")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "--trust-pickle" in result.stderr
    loaded = jaccli.load_model(archive, trust_pickle=True)
    assert torch.equal(dict(loaded.module.named_parameters())["linear.bias"].detach(),
                       torch.tensor([0.25, -0.75]))


def test_guard_blocks_unpickling_even_without_the_inspection(clean_export, tmp_path,
                                                             evil_module):
    """The load-time guard alone (no pre-check) stops the payloads too."""
    from jaccli.errors import UntrustedPickleError
    from jaccli.io.models.unpickle_guard import no_code_execution

    for case in ("pickled weight", "example inputs fallback", "shape expression eval",
                 "treespec enum import"):
        archive = rewrite_zip(clean_export, tmp_path / "model.pt2",
                              EXPORT_CASES[case][0](evil_module))
        with pytest.raises(Exception) as caught, no_code_execution():
            torch.export.load(str(archive))
        chain, error = [], caught.value
        while error is not None:
            chain.append(error)
            error = error.__cause__ or error.__context__
        assert any(isinstance(e, UntrustedPickleError) for e in chain), case
        assert not evil_module.exists(), case
    assert torch.load.__name__ == "load"  # restored


# ------------------------------------------------------------------------------ TorchScript


@pytest.fixture
def scripted(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(3, 2), nn.Tanh())), path)
    return path


def test_torchscript_pickle_naming_a_python_callable_is_refused(scripted, tmp_path):
    marker = tmp_path / "MARKER"

    def mutate(members, root):
        members[root + "data.pkl"] = pickle.dumps(MarkerPayload(marker), protocol=2)
    archive = rewrite_zip(scripted, tmp_path / "evil.pt", mutate)
    assert_one_error(invoke("inspect", archive, "--input-shape", "3"),
                     says="which is not a TorchScript type")
    assert not marker.exists()


def test_torchscript_code_writing_a_file_is_refused(scripted, tmp_path):
    """`torch.from_file(path, shared=True)` in TorchScript code overwrites any file the user
    can write: on main, running the model rewrote `victim`."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"x" * 64)

    def mutate(members, root):
        name = root + "code/__torch__/torch/nn/modules/activation.py"
        source = members[name].decode().replace(
            "    return torch.tanh(input)",
            f"    t = torch.from_file(\"{victim}\", True, 16, dtype=6)\n    t.fill_(66.)\n"
            "    return torch.tanh(input) + torch.sum(t) * 0.")
        members[name] = source.encode()
        members.pop(name + ".debug_pkl")
    archive = rewrite_zip(scripted, tmp_path / "evil.pt", mutate)
    np.save(tmp_path / "x.npy", np.zeros((2, 3), np.float32))
    assert_one_error(invoke("compute", archive, tmp_path / "x.npy", "--no-layers"),
                     says="calls from_file")
    assert victim.read_bytes() == b"x" * 64


# ------------------------------------------------------------------------- pickled .pt files


def test_pickled_pt_model_and_pt_data_run_nothing(work):
    marker = work / "MARKER"
    torch.save({"weight": MarkerPayload(marker)}, work / "model.pt")
    assert_one_error(invoke("compute", work / "model.pt", work / "x.npy", "--arch",
                            work / "missing.json"), says="--trust-pickle")
    torch.save({"x": MarkerPayload(marker)}, work / "data.pt")
    assert_one_error(invoke("compute", work / "mlp.safetensors", work / "data.pt"),
                     says="pickled Python objects")
    assert not marker.exists()


def test_object_npy_is_refused_without_unpickling(work):
    marker = work / "MARKER"
    np.save(work / "objects.npy", np.array([MarkerPayload(marker)], dtype=object),
            allow_pickle=True)
    assert_one_error(invoke("compute", work / "mlp.safetensors", work / "objects.npy"),
                     says="Python objects")
    assert not marker.exists()


def test_program_check_accepts_what_torch_emits_and_nothing_else():
    from jaccli.io.models.export_program_check import expression_problem, operator_problem

    for target in ("torch.ops.aten.linear.default", "torch.ops.aten.sym_size.int",
                   "torch.ops.higher_order.cond", "_operator.getitem", "_operator.mul",
                   "torch.sym_max", "math.trunc"):
        assert operator_problem(target) is None, target
    for target in ("torch.os.system", "builtins.exec", "torch.ops.load_library",
                   "torch.ops.aten.from_file.default", "torch.ops.aten.save.default",
                   "_operator.call", "_operator.attrgetter", "torch.load", "math.nope"):
        assert operator_problem(target) is not None, target
    for expression in ("Symbol('s77', positive=True, integer=True)",
                       "Mul(Integer(16), Symbol('s77', positive=True, integer=True))",
                       "FloorDiv(Symbol('s1', integer=True), Integer(2))",
                       "Mul(Float('1.5', precision=53), Symbol('s1', positive=True))",
                       "Max(1, s0) + 2*s1 - u0//3", "oo", "-int_oo"):
        assert expression_problem(expression) is None, expression
    for expression in ("__import__('os').system('x')", "Symbol('s0').__class__",
                       "lambdify(s0, s0)", "s0(1)", "Symbol(chr(115))", "[s0]",
                       "Symbol('a\\'b')", "positive"):
        assert expression_problem(expression) is not None, expression

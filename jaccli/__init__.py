"""jaccli: per-layer, per-sample Jacobians of trained neural networks.

Python API (names are imported lazily, so `jaccli --help` does not pay for torch)::

    import torch, jaccli
    model = jaccli.load_model("sample_models/digits_mlp.safetensors")
    data = jaccli.load_data("sample_models/digits_test.npy", limit=8)
    jacobians = jaccli.layer_jacobians(model, torch.from_numpy(data.read(0, 8)))
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ComputeSettings": "settings", "SpectrumSettings": "settings",
    "ProductSettings": "settings", "HessianSettings": "settings", "ModelSource": "settings",
    "DataSelection": "settings", "LayerSelection": "settings", "RunOptions": "settings",
    "OutputOptions": "settings", "ParamOptions": "settings",
    "DataSource": "io.data", "JaccliError": "errors",
    "LoadedModel": "io.models", "Results": "io.results", "build_model": "io.models",
    "end_to_end_jacobian": "api", "layer_jacobians": "api", "list_layers": "api",
    "jacobian": "api", "param_jacobians": "api", "jvp": "api", "vjp": "api", "hvp": "api",
    "ntk": "api",
    "load_data": "io.data", "load_model": "io.models", "open_results": "io.results",
    "run_compute": "pipelines.compute", "run_spectrum": "pipelines.spectrum",
    "save_model": "io.models",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaccli' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

"""Load a trained model from any supported file, without running untrusted code by default."""

from __future__ import annotations

import json
import logging
import pickle
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ...errors import ModelLoadError, UntrustedPickleError
from .arch import build_model, load_spec, spec_input_shape
from .arch_factory import IMPORT_STRING as _IMPORT_STRING
from .arch_factory import resolve_factory
from .archive_safety import export_archive_findings, torchscript_findings
from .formats import ModelFormat, sniff_model_format
from .materialize import build_with_weights
from .state_dict import extract_state_dict, load_strict, match_state
from .unpickle_guard import no_code_execution

ARCH_METADATA_KEY = "jaccli.arch"


@dataclass
class LoadedModel:
    """A model ready for analysis.

    module: the network, in eval mode, on the CPU.
    input_shape: the per-sample input shape when the file declares it, else None.
    hookable: whether forward hooks fire on its submodules (False for TorchScript).
    module_types: qualified name -> layer type name, where the module object does not say
        (TorchScript and torch.export modules); other modules use their class name.
    program / static_batch: for a .pt2 archive, its ExportedProgram and, when the batch was
        not exported as dynamic, the one batch size `module` accepts.
    """

    module: nn.Module
    format: ModelFormat
    source: str
    path: Path
    input_shape: tuple[int, ...] | None = None
    hookable: bool = True
    module_types: dict[str, str] = field(default_factory=dict)
    program: Any = None  # the torch.export program of a .pt2 archive, as saved
    static_batch: int | None = None  # a program exported for this batch size only

    def type_name(self, qualified_name: str, module: nn.Module) -> str:
        if qualified_name in self.module_types:
            return self.module_types[qualified_name]
        return getattr(module, "original_name", None) or type(module).__name__


def load_model(path: str | Path, *, arch: str | None = None, arch_path: str | Path | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load the model at `path`, detecting its format from its content.

    arch: a JSON architecture spec file or an import string ``package.module:factory``;
        needed for a bare state_dict (``.pt``/``.pth``/``.bin`` or plain ``.safetensors``).
    arch_path: a directory put on ``sys.path`` before importing `arch`.
    trust_pickle: allow unpickling a whole module (`torch.save(model)`), which runs code.
    """
    path = Path(path)
    fmt = sniff_model_format(path)
    if fmt is ModelFormat.TORCHSCRIPT:
        _refuse_code(path, torchscript_findings(path), trust_pickle)
        loaded = _load_torchscript(path)
    elif fmt is ModelFormat.EXPORT:
        _refuse_code(path, export_archive_findings(path), trust_pickle)
        loaded = _load_export(path, trust_pickle)
    elif fmt is ModelFormat.SAFETENSORS:
        loaded = _load_safetensors(path, arch, arch_path)
    else:
        loaded = _load_torch_pickle(path, arch, arch_path, trust_pickle)
    loaded.module.eval()
    return loaded


def save_model(model: nn.Module, spec: dict | str | Path, path: str | Path) -> None:
    """Write `model` as a self-describing safetensors file: its weights plus `spec` as metadata.

    The spec must build a module whose state_dict keys and shapes match `model`'s.
    """
    spec = load_spec(spec)
    with torch.device("meta"):
        match_state(build_model(spec), model.state_dict(), "the model")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={ARCH_METADATA_KEY: json.dumps(spec)})


def _load_torchscript(path: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # supported input, on purpose
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # the TorchScript loader raises several types on bad files
        raise ModelLoadError(f"cannot load TorchScript archive {path}: "
                             f"{_first_line(exc)}") from exc
    return LoadedModel(module, ModelFormat.TORCHSCRIPT, "TorchScript archive", path,
                       hookable=False)


def _refuse_code(path: Path, findings: list[str], trust_pickle: bool) -> None:
    """Refuse a file whose loading would run code from it, unless --trust-pickle."""
    if not findings:
        return
    more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
    if not trust_pickle:
        raise UntrustedPickleError(f"{path}: {findings[0]}{more}; loading it would run code "
                                   "from the file. --trust-pickle allows it: only for files "
                                   "you trust")
    print(f"warning: {path}: {findings[0]}{more}; loading it anyway (--trust-pickle)",
          file=sys.stderr)


def _load_export(path: Path, trust_pickle: bool) -> LoadedModel:
    try:
        with warnings.catch_warnings(), _quiet_torch_logs(), \
                (nullcontext() if trust_pickle else no_code_execution()):
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
            module = torch.export.unflatten(program)
    except Exception as exc:  # torch.export raises many types on corrupt archives
        cause = _jaccli_cause(exc)
        if cause is not None:
            raise cause from None
        raise ModelLoadError(f"cannot load torch.export archive {path}: "
                             f"{_first_line(exc)}") from exc
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = [node.meta["val"].shape for node in program.graph.nodes
              if node.op == "placeholder" and node.name in user_inputs and "val" in node.meta]
    input_shape, static_batch = None, None
    if len(shapes) == 1 and len(shapes[0]) >= 1:
        batch = shapes[0][0]
        static_batch = batch if isinstance(batch, int) else None
        input_shape = tuple(int(d) for d in shapes[0][1:])
    elif shapes and all(len(shape) >= 1 for shape in shapes):
        # several inputs: exported for one batch size when every input leads with it
        leading = [shape[0] for shape in shapes]
        if all(isinstance(size, int) for size in leading) and len(set(leading)) == 1:
            static_batch = leading[0] if leading[0] > 1 else None
    types = {}
    for node in program.graph.nodes:
        for qualified_name, type_path in node.meta.get("nn_module_stack", {}).values():
            types[qualified_name] = str(type_path).rsplit(".", 1)[-1]
    return LoadedModel(module, ModelFormat.EXPORT, "torch.export archive", path,
                       input_shape=input_shape, module_types=types, program=program,
                       static_batch=static_batch)


def _load_safetensors(path: Path, arch: str | None, arch_path: str | Path | None) -> LoadedModel:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {_first_line(exc)}") from exc
    if arch is None and ARCH_METADATA_KEY in metadata:
        spec = load_spec(metadata[ARCH_METADATA_KEY])
        model = build_with_weights(spec, state, str(path))
        return LoadedModel(model, ModelFormat.SAFETENSORS, "self-describing safetensors", path,
                           input_shape=spec_input_shape(spec))
    return _with_arch(state, arch, arch_path, path, ModelFormat.SAFETENSORS,
                      "safetensors state_dict + --arch")


def _load_torch_pickle(path: Path, arch: str | None, arch_path: str | Path | None,
                       trust_pickle: bool) -> LoadedModel:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{path} is a pickled Python object (not just tensors) and unpickling it runs "
                "code from the file; save a state_dict and pass --arch, or use safetensors, "
                "TorchScript or torch.export, or pass --trust-pickle if you trust the file"
            ) from exc
        obj = _unpickle_trusted(path)
    except Exception as exc:  # torch.load raises many types on corrupt files
        raise ModelLoadError(f"cannot read {path} with torch.load: {_first_line(exc)}") from exc
    if isinstance(obj, nn.Module):
        return LoadedModel(obj, ModelFormat.TORCH_PICKLE, "pickled module (--trust-pickle)", path)
    return _with_arch(extract_state_dict(obj, str(path)), arch, arch_path, path,
                      ModelFormat.TORCH_PICKLE, "state_dict + --arch")


def _with_arch(state: dict, arch: str | None, arch_path: str | Path | None, path: Path,
               fmt: ModelFormat, source: str) -> LoadedModel:
    """Weights from a file that holds no architecture, into the one --arch names."""
    if arch is None:
        raise ModelLoadError(f"{path} holds weights but no architecture; pass --arch SPEC.json "
                             "or --arch package.module:factory")
    if Path(arch).is_file() or not _IMPORT_STRING.match(arch):
        spec = load_spec(Path(arch))
        model = build_with_weights(spec, state, str(path))
        return LoadedModel(model, fmt, source, path, input_shape=spec_input_shape(spec))
    model = resolve_factory(arch, arch_path)()
    load_strict(model, state, str(path))
    return LoadedModel(model, fmt, source, path)


def _unpickle_trusted(path: Path) -> object:
    print(f"warning: unpickling {path} runs code stored in the file (--trust-pickle)",
          file=sys.stderr)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # arbitrary code ran; any failure is the file's
        raise ModelLoadError(f"cannot unpickle {path}: {_first_line(exc)} (is the module's "
                             "class importable? see --arch-path)") from exc


def _jaccli_cause(exc: BaseException) -> ModelLoadError | None:
    """Our own refusal, when torch wrapped it in one of its exceptions."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ModelLoadError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def _quiet_torch_logs():
    """torch.export logs warnings (legacy formats, fallbacks) to stderr: errors say enough."""
    names = ("torch.export", "torch._export")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

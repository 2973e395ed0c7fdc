"""A cache of captured operator graphs, so that a repeated command skips `torch.export`.

Capturing a model (importing torch.export and its compiler stack, exporting, functionalizing)
costs seconds, often more than the work. The captured `OpGraph` is stored as one safetensors
file: the graph as JSON metadata (`jaccli.graph.serialize`, no pickle) plus its tensor
constants; parameters and buffers are not stored but bound again, by name, to the module
loaded from the model file.

Cached: models whose file fully determines the module — self-describing safetensors, a
state_dict with a JSON `--arch` spec file, `.pt2` archives (their program, functionalized:
its weights bound to the loaded program's) and TorchScript archives (converted to a graph,
then exported: the slowest capture; their weights are stored in the entry, as the converted
graph holds its own copies). Not cached: pickled modules and `--arch package:factory` (the
module's code lives outside the file), models called with `--input/--const`, and graphs
captured on a GPU.

Key: SHA-256 of the model file (and spec file), the example's shape, dtype and device, the
torch and jaccli versions and a hash of jaccli's capture and model-building code.
Location: `$JACCLI_CACHE_DIR`, else `$XDG_CACHE_HOME/jaccli/graphs`, else
`~/.cache/jaccli/graphs`; `JACCLI_CACHE=off` turns it off. An entry that cannot be read or
fails the checks is ignored (and rewritten): a broken cache never fails a command.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..graph.opgraph import OpGraph
from ..graph.serialize import GraphRecordError, from_record, to_record
from ..io.hashing import sha256_file

_METADATA_KEY = "jaccli.graph"
_CACHED_SOURCES = {"self-describing safetensors", "safetensors state_dict + --arch",
                   "state_dict + --arch", "TorchScript archive", "torch.export archive"}
_SELF_CONTAINED = ("self-describing safetensors", "TorchScript archive", "torch.export archive")
# Captures that read the example's values, not only its shape (a static program's batch axes
# are told apart by perturbing a sample): not cached, as the key holds only the shape.
_VALUE_DEPENDENT = {"program-static"}
_PACKAGE = Path(__file__).resolve().parents[1]
# The code whose changes change what a capture returns.
_CODE = ("graph/*.py", "io/models/*.py", "pipelines/graph_cache.py")


def cache_dir() -> Path | None:
    """Where graphs are cached, or None when caching is off (`JACCLI_CACHE=off`)."""
    if os.environ.get("JACCLI_CACHE", "").strip().lower() in ("off", "0", "no", "false"):
        return None
    if os.environ.get("JACCLI_CACHE_DIR"):
        return Path(os.environ["JACCLI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaccli" / "graphs"


def cache_key(source, loaded, example: torch.Tensor, *, layout=None) -> str | None:
    """The key of the graph of this model on inputs like `example`, or None when the model
    is not cached (see the module docstring)."""
    if loaded.source not in _CACHED_SOURCES or layout is not None or source.inputs \
            or source.constants:
        return None
    files = [sha256_file(source.path)]
    if loaded.source not in _SELF_CONTAINED:
        if not source.arch or not Path(source.arch).is_file():
            return None  # an import string: the module's code is not in any file we hash
        files.append(sha256_file(source.arch))
    facts = {"files": files, "example": list(example.shape), "dtype": str(example.dtype),
             "device": str(example.device), "torch": torch.__version__, "jaccli": __version__,
             "code": _code_hash()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


_code_digest: str | None = None


def _code_hash() -> str:
    global _code_digest
    if _code_digest is None:
        digest = hashlib.sha256()
        for pattern in _CODE:
            for path in sorted(_PACKAGE.glob(pattern)):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        _code_digest = digest.hexdigest()
    return _code_digest


def module_tensors(module) -> dict[str, torch.Tensor]:
    """Qualified name -> every parameter and buffer of `module` (tied names included); for an
    ExportedProgram, its state_dict and tensor constants."""
    if not isinstance(module, torch.nn.Module):  # an ExportedProgram
        return {**module.state_dict, **module.constants}
    out = dict(module.named_buffers(remove_duplicate=False))
    out.update(module.named_parameters(remove_duplicate=False))
    return out


def load_graph(key: str | None, module) -> OpGraph | None:
    """The cached graph for `key`, its state bound to `module`'s tensors; None on a miss, an
    entry that cannot be used, or no key."""
    folder = cache_dir()
    path = None if folder is None or key is None else folder / f"{key}.safetensors"
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {})[_METADATA_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        if record.get("key") != key:
            return None
        return from_record(record["graph"], tensors, module_tensors(module))
    except Exception:  # noqa: BLE001 (a cache entry is only a hint: unreadable, corrupt, a
        return None  # record of another version or failing the checks counts as a miss


def store_graph(key: str | None, graph: OpGraph, module) -> bool:
    """Write `graph` under `key` (atomically); False when there is no key, the graph is not
    cacheable or the cache cannot be written (no error: the command goes on)."""
    folder = cache_dir()
    if folder is None or key is None or graph.capture_path in _VALUE_DEPENDENT:
        return False
    try:
        record, tensors = to_record(graph, module_tensors(module))
    except GraphRecordError:
        return False
    metadata = {_METADATA_KEY: json.dumps({"key": key, "graph": record})}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".partial")
        os.close(handle)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, temporary,
                      metadata=metadata)
            os.replace(temporary, folder / f"{key}.safetensors")
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except (OSError, ValueError, RuntimeError):
        return False
    return True

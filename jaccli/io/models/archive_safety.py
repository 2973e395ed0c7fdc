"""Inspect torch.export and TorchScript archives before loading: refuse what would run code.

torch.export (.pt2, torch 2.13 `torch/export/pt2_archive/_package.py`): weights and
constants marked `use_pickle` are read with `torch.load(weights_only=False)`; TorchBind
custom objects (`custom_obj_*`) with TorchScript's unpickler; opaque constants
(`opaque_obj_*`) with `pickle.loads`; example inputs, and the legacy `.pt` weight files, with
a `weights_only=False` fallback; `data/aotinductor/` holds native libraries that are
loaded. The program JSON is checked by `export_program_check`.

TorchScript (`torch.jit.load`): `data.pkl`/`constants.pkl` may only name TorchScript's own
types, and the TorchScript code may not call the operators that read or write files
(`torch.from_file(..., shared=True)` writes any file the user can write).

Each problem is a one-line finding; `--trust-pickle` lets the file load anyway.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelLoadError
from ...units import format_bytes
from .export_program_check import name_problem, program_findings

MAX_JSON_BYTES = 1 << 30  # a program or config larger than this is refused
MAX_INFLATION = 200  # uncompressed/compressed size of a member beyond this: a zip bomb
# The globals a TorchScript pickle may name: TorchScript classes of the archive and the
# rebuild helpers TorchScript's own unpickler knows.
_TORCHSCRIPT_GLOBALS = re.compile(
    r"^(__torch__(\.[\w.]+)?\.\w+|collections\.OrderedDict|torch\.\w*Storage|torch\.device"
    r"|torch\._utils\._rebuild_\w+|torch\.jit\._pickle\.\w+)$")
_TORCHSCRIPT_FILE_OPS = re.compile(r"\b(from_file|save|load_tensor)\b")
_LEGACY_PICKLES = ("serialized_state_dict.pt", "serialized_constants.pt",
                   "serialized_example_inputs.pt")


def export_archive_findings(path: Path) -> list[str]:
    """What in a torch.export archive would run code when loaded; empty when nothing.

    Raises ModelLoadError when the archive is malformed (corrupt zip, zip bomb, bad JSON).
    """
    with _open_zip(path) as archive:
        names = archive.namelist()
        root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
        inner = {n[len(root):]: n for n in names if n.startswith(root)} if root else {}
        findings = []
        for name in names:
            if name in _LEGACY_PICKLES:
                findings += _pickle_findings(archive, name, f"legacy file {name}")
            elif name == "serialized_exported_program.json":
                findings += program_findings(_read_json(archive, name, path))
        for member in inner:
            if member.startswith("data/aotinductor/"):
                findings.append(f"it holds AOTInductor native code ({member}), which loading "
                                "would execute")
                break
        for member in inner:
            if member.startswith("models/") and member.endswith(".json"):
                model = member[len("models/"):-len(".json")]
                findings += _model_findings(archive, path, inner, model)
        return findings


def torchscript_findings(path: Path) -> list[str]:
    """What in a TorchScript archive would reach outside TorchScript; empty when nothing."""
    findings = []
    with _open_zip(path) as archive:
        for info in archive.infolist():
            name = info.filename
            if name.endswith("pkl"):  # data.pkl, constants.pkl, *.debug_pkl
                data = _read(archive, name, path)
                for module, attr in _pickle_globals(data, f"{path}: {name}"):
                    if not _TORCHSCRIPT_GLOBALS.match(f"{module}.{attr}"):
                        findings.append(f"{name.split('/', 1)[-1]} references {module}.{attr}, "
                                        "which is not a TorchScript type")
            elif "/code/" in name and name.endswith(".py"):
                source = _read(archive, name, path).decode("utf-8", errors="replace")
                match = _TORCHSCRIPT_FILE_OPS.search(source)
                if match:
                    findings.append(f"its TorchScript code ({name.split('/', 1)[-1]}) calls "
                                    f"{match.group(1)}, which reads or writes files")
    return findings


def _model_findings(archive: zipfile.ZipFile, path: Path, inner: dict[str, str],
                    model: str) -> list[str]:
    findings = program_findings(_read_json(archive, inner[f"models/{model}.json"], path))
    for kind in ("weights", "constants"):
        legacy = f"data/{kind}/{model}.pt"
        if legacy in inner:
            findings += _pickle_findings(archive, inner[legacy], f"legacy {kind} file {legacy}")
            continue
        config_name = f"data/{kind}/{model}_{kind}_config.json"
        if config_name not in inner:
            continue  # torch itself reports the missing file
        config = _read_json(archive, inner[config_name], path)
        entries = config.get("config", {}) if isinstance(config, dict) else {}
        for fqn, entry in entries.items():
            findings += _entry_findings(archive, path, inner, kind, str(fqn), entry)
    sample_inputs = f"data/sample_inputs/{model}.pt"
    if sample_inputs in inner:
        findings += _pickle_findings(archive, inner[sample_inputs],
                                     f"its example inputs ({sample_inputs})")
    return findings


def _entry_findings(archive, path: Path, inner: dict[str, str], kind: str, fqn: str,
                    entry: Any) -> list[str]:
    what = f"{kind[:-1]} {fqn[:60]!r}"
    if not isinstance(entry, dict):
        raise ModelLoadError(f"{path}: the {kind} config entry for {fqn!r} is not an object")
    findings = [p for p in (name_problem(fqn),) if p]
    file_name = str(entry.get("path_name", ""))
    if entry.get("use_pickle"):
        return findings + [f"{what} is stored as a pickle (use_pickle), which is unpickled with "
                           "weights_only=False"]
    if file_name.startswith("custom_obj_"):
        return findings + [f"{what} is a TorchBind custom object ({file_name}), which is "
                           "unpickled"]
    if file_name.startswith("opaque_obj_"):
        return findings + [f"{what} is an opaque Python object ({file_name}), which "
                           "pickle.loads unpickles"]
    record = inner.get(f"data/{kind}/{file_name}")
    meta = entry.get("tensor_meta")
    if record is not None and isinstance(meta, dict):
        declared = _declared_bytes(meta)
        stored = archive.getinfo(record).file_size
        if declared is not None and declared > stored:
            raise ModelLoadError(f"{path}: {what} declares {format_bytes(declared)} of data but "
                                 f"the archive holds {format_bytes(stored)}; the file is "
                                 "corrupt or crafted")
    return findings


def _declared_bytes(meta: dict) -> int | None:
    """Bytes a tensor_meta's sizes and dtype need (None when not plain integers)."""
    sizes = [s.get("as_int") if isinstance(s, dict) else None for s in meta.get("sizes", [])]
    if any(not isinstance(s, int) or s < 0 for s in sizes):
        return None
    dtype = _SCALAR_TYPE_BYTES.get(meta.get("dtype"), 1)
    count = 1
    for s in sizes:
        count *= s
    return count * dtype


# torch._export.serde.schema.ScalarType values -> element size in bytes
_SCALAR_TYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16,
                      12: 1, 13: 2, 28: 2, 34: 4, 35: 8}


def _pickle_findings(archive: zipfile.ZipFile, name: str, what: str) -> list[str]:
    """A pickled member must load with `torch.load(weights_only=True)` (plain tensors)."""
    data = _read(archive, name, Path(archive.filename or "archive"))
    if not data:
        return []
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # anything weights_only refuses or cannot parse
        return [f"{what}: not plain tensors; reading it takes full unpickling "
                "(weights_only=False), which runs code"]
    return []


def _pickle_globals(data: bytes, where: str) -> list[tuple[str, str]]:
    """The (module, name) pairs a pickle's GLOBAL/STACK_GLOBAL opcodes import."""
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
            elif opcode.name == "STACK_GLOBAL":
                found.append((strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
            elif opcode.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                continue
    except Exception as exc:  # pickletools raises ValueError and others on garbage
        raise ModelLoadError(f"{where} is not a valid pickle ({exc})") from exc
    return found


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path} cannot be read as a zip archive ({exc})") from exc
    for info in archive.infolist():
        inflated = info.file_size > MAX_INFLATION * max(info.compress_size, 1) + (1 << 20)
        if info.compress_type != zipfile.ZIP_STORED and inflated:
            archive.close()
            raise ModelLoadError(f"{path}: member {info.filename} inflates from "
                                 f"{format_bytes(info.compress_size)} to "
                                 f"{format_bytes(info.file_size)}; refusing a zip bomb")
    return archive


def _read(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read {name} ({exc}); the archive is "
                             "corrupt") from exc


def _read_json(archive: zipfile.ZipFile, name: str, path: Path) -> Any:
    if archive.getinfo(name).file_size > MAX_JSON_BYTES:
        raise ModelLoadError(f"{path}: {name} is larger than {format_bytes(MAX_JSON_BYTES)}")
    try:
        return json.loads(_read(archive, name, path))
    except RecursionError as exc:
        raise ModelLoadError(f"{path}: {name} is nested too deeply to be a real program") \
            from exc
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {name} is not valid JSON ({exc})") from exc

"""Tell a model file's format from its bytes, not its name."""

from __future__ import annotations

import json
import struct
import zipfile
from enum import Enum
from pathlib import Path

from ...errors import ModelLoadError


class ModelFormat(str, Enum):
    TORCHSCRIPT = "torchscript"
    EXPORT = "torch-export"
    SAFETENSORS = "safetensors"
    TORCH_PICKLE = "torch-pickle"  # torch.save: a state_dict, or a whole pickled module


_PICKLE_PROTOCOL_BYTE = 0x80
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def sniff_model_format(path: Path) -> ModelFormat:
    """Return the format of the model file at `path`, read from its content.

    Raises ModelLoadError when the file is missing or of no format jaccli reads.
    """
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelLoadError(f"model path is a directory, expected a file: {path}")
    with path.open("rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return _sniff_zip(path)
    if _looks_like_safetensors(path, head):
        return ModelFormat.SAFETENSORS
    if head[:1] == bytes([_PICKLE_PROTOCOL_BYTE]):
        return ModelFormat.TORCH_PICKLE
    raise ModelLoadError(
        f"{path} is not a model format jaccli reads (TorchScript, torch.export .pt2, "
        "safetensors, torch.save state_dict); is the file corrupt or of another framework?")


def _sniff_zip(path: Path) -> ModelFormat:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{path} looks like a zip archive but cannot be read ({exc}); "
                             "the file is probably truncated or corrupt") from exc
    if any(n.endswith(("/archive_format", "serialized_exported_program.json", "/models/model.json"))
           for n in names):
        return ModelFormat.EXPORT
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return ModelFormat.TORCHSCRIPT
    if any(n.endswith("data.pkl") for n in names):
        return ModelFormat.TORCH_PICKLE
    raise ModelLoadError(f"{path} is a zip archive but not a PyTorch file (no data.pkl, "
                         "TorchScript code or torch.export program inside)")


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    if not 2 <= header_len <= _MAX_SAFETENSORS_HEADER:
        return False
    if header_len > path.stat().st_size - 8:
        raise ModelLoadError(f"{path} is a truncated safetensors file (its header says "
                             f"{header_len} bytes, the file is shorter)")
    with path.open("rb") as f:
        f.seek(8)
        header = f.read(header_len)
    try:
        return isinstance(json.loads(header), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False

"""Hostile files, generated at test time: archives whose payload would create a marker file,
malformed arrays, zip bombs. Nothing here is shipped; every file is a few kilobytes."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

from jaccli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error(result, code: int = 1, *, says: str = "") -> str:
    """Exit `code`, exactly one stderr line `jaccli: error: ...` (containing `says`), no
    traceback anywhere; returns the line."""
    lines = result.stderr.splitlines()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("jaccli: error: "), lines[0]
    assert "Traceback" not in result.output and "internal error" not in lines[0], result.output
    assert says in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in `folder` and its bytes (symlinks as their target's text)."""
    return {p.name: (str(p.readlink()).encode() if p.is_symlink() else p.read_bytes())
            for p in folder.iterdir() if p.is_symlink() or p.is_file()}


def assert_no_partials(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name]


class MarkerPayload:
    """Unpickling it creates `path`: proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class WithConstant(nn.Module):
    """Linear → tanh, plus a buffer and a lifted tensor constant (all payload kinds)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("shift", torch.tensor([0.5, -0.5]))
        self.scale = torch.tensor([1.0, 2.0])

    def forward(self, x):
        return torch.tanh(self.linear(x)) * self.scale + self.shift


def export_archive(path: Path) -> Path:
    model = WithConstant().eval()
    program = torch.export.export(model, (torch.randn(2, 3),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def rewrite_zip(source: Path, target: Path, mutate: Callable[[dict[str, bytes], str], None]
                ) -> Path:
    """Copy a zip archive, letting `mutate(members, root)` change its members (root: the
    archive's top folder, with a trailing slash)."""
    with zipfile.ZipFile(source) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    root = next(iter(members)).split("/", 1)[0] + "/"
    mutate(members, root)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def edit_json(members: dict[str, bytes], name: str, edit: Callable[[dict], None]) -> None:
    document = json.loads(members[name])
    edit(document)
    members[name] = json.dumps(document).encode()


def deflate_bomb_npz(path: Path, key: str, rows: int, row_shape: tuple[int, ...]) -> Path:
    """A .npz whose one member is a float32 array of `rows` zero rows, compressed with
    deflate. The stream is assembled from one repeated compressed block, so a multi-GiB
    member costs milliseconds and a few MB; its CRC is not computed (readers that stop early
    never check it)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": "<f4", "fortran_order": False, "shape": (rows, *row_shape)})
    header_bytes = header.getvalue()
    size = len(header_bytes) + rows * int(np.prod(row_shape)) * 4
    chunk = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(header_bytes + bytes(chunk - len(header_bytes)))
    first += compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(size - chunk, chunk)
    body = first + repeated * full + compressor.compress(bytes(rest)) + \
        compressor.flush(zlib.Z_FINISH)
    assert size < 1 << 32, "keep it below the zip64 limit"
    name = f"{key}.npy".encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, 0, len(body), size,
                        len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, 0, len(body),
                          size, len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central),
                      len(local) + len(body), 0)
    path.write_bytes(local + body + central + end)
    return path

"""Malformed, truncated, oversized or unusual data files: one clear line each (these were
"internal error" (exit 3), a NumPy warning, or a silent truncation on main)."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from .crafted import assert_one_error, deflate_bomb_npz, invoke


def _compute(work, data, *extra):
    return invoke("compute", work / "mlp.safetensors", data, *extra)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_npy_header_with_negative_shape(work):
    raw = _npy_bytes(np.zeros((5, 6), np.float32)).replace(b"(5, 6)", b"(-5, 6)")
    (work / "bad.npy").write_bytes(raw)
    assert_one_error(_compute(work, work / "bad.npy"), says="declares the shape (-5, 6)")


def test_npy_header_that_is_garbage(work):
    raw = _npy_bytes(np.zeros((5, 6), np.float32)).replace(b"'shape': (5, 6)",
                                                            b"'shape': (5, 6 ")
    (work / "bad.npy").write_bytes(raw)
    assert_one_error(_compute(work, work / "bad.npy"), says="header cannot be parsed")
    (work / "short.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xff{")
    assert_one_error(_compute(work, work / "short.npy"), says="header cannot be parsed")


def test_truncated_npy_says_truncated(work):
    raw = _npy_bytes(np.zeros((5, 6), np.float32))
    (work / "cut.npy").write_bytes(raw[:-7])
    assert_one_error(_compute(work, work / "cut.npy"), says="is truncated")


def test_npz_member_claiming_a_trillion_rows(work):
    raw = _npy_bytes(np.zeros((5, 6), np.float32)).replace(b"(5, 6)", b"(1000000000000, 6)")
    with zipfile.ZipFile(work / "huge.npz", "w") as archive:
        archive.writestr("x.npy", raw)
    assert_one_error(_compute(work, work / "huge.npz"), says="declares (1000000000000, 6)")


def test_npz_bomb_reads_only_the_rows_it_uses(work, monkeypatch):
    """A ~4 MB .npz whose member inflates to ~4 GiB: `--limit 10` decompresses a few KB."""
    rows = (4 * 1024 - 1) * (1 << 20) // 24  # float32 rows of 6: 4 GiB - 1 MiB of data
    bomb = deflate_bomb_npz(work / "bomb.npz", "x", rows, (6,))
    assert bomb.stat().st_size < 8 << 20
    inflated = [0]
    real_read = zipfile.ZipExtFile.read

    def counting_read(self, n=-1):
        data = real_read(self, n)
        inflated[0] += len(data)
        return data
    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    result = _compute(work, bomb, "--limit", "10", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_samples"] == 10
    assert inflated[0] < 1 << 20


def test_npz_rows_match_numpy(work):
    """The lazy .npz reader returns exactly what NumPy reads (compressed and stored)."""
    from jaccli.io.data import load_data

    x = np.random.default_rng(5).normal(size=(9, 2, 3))
    np.savez_compressed(work / "c.npz", a=x, b=x[:2])
    np.savez(work / "s.npz", a=x)
    for name in ("c.npz", "s.npz"):
        source = load_data(work / name, key="a", offset=2, limit=5)
        np.testing.assert_array_equal(source.read(1, 4), x[3:6])
        np.testing.assert_array_equal(source.read(0, 5), x[2:7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("container", ["pt", "safetensors"])
def test_half_precision_data_is_widened_exactly(work, dtype, container):
    x = torch.randn(5, 6).to(dtype)
    if container == "pt":
        torch.save({"x": x}, work / "half.pt")
        path = work / "half.pt"
    else:
        save_file({"x": x}, work / "half.safetensors")
        path = work / "half.safetensors"
    np.save(work / "widened.npy", x.float().numpy())
    half = _compute(work, path, "--json", "--dtype", "float64")
    reference = _compute(work, work / "widened.npy", "--json", "--dtype", "float64")
    assert half.exit_code == 0, half.output
    norms = [[e["frobenius_mean"] for e in json.loads(r.stdout)["entries"]]
             for r in (half, reference)]
    assert norms[0] == norms[1]


def test_requires_grad_tensor_data_is_read(work):
    torch.save(torch.randn(5, 6, requires_grad=True), work / "grad.pt")
    assert _compute(work, work / "grad.pt").exit_code == 0


@pytest.mark.parametrize("container", ["pt", "safetensors", "npy", "h5"])
def test_complex_data_is_refused_never_truncated_to_real(work, container):
    x = torch.randn(5, 6, dtype=torch.complex64)
    path = work / f"c.{container}"
    if container == "pt":
        torch.save(x, path)
    elif container == "safetensors":
        save_file({"x": x}, path)
    elif container == "npy":
        np.save(path, x.numpy())
    else:
        with h5py.File(path, "w") as f:
            f["x"] = x.numpy()
    assert_one_error(_compute(work, path), says="complex numbers")


def test_hdf5_variable_length_and_object_data_is_refused(work):
    with h5py.File(work / "vlen.h5", "w") as f:
        f.create_dataset("x", (5,), dtype=h5py.vlen_dtype(np.float32))
    assert_one_error(_compute(work, work / "vlen.h5"), says="variable-length")
    with h5py.File(work / "text.h5", "w") as f:
        f["x"] = np.array([b"a", b"b"], dtype=h5py.string_dtype())
    assert_one_error(_compute(work, work / "text.h5"), says="text")


def test_binary_garbage_as_csv(work):
    (work / "garbage.csv").write_bytes(bytes(range(256)) * 4)
    assert_one_error(_compute(work, work / "garbage.csv"), says="not a text CSV file")


def test_empty_csv_gives_one_line_and_no_numpy_warning(work):
    (work / "empty.csv").write_text("")
    assert_one_error(_compute(work, work / "empty.csv"), says="is empty")
    (work / "header.csv").write_text("a,b,c,d,e,f\n")
    assert_one_error(_compute(work, work / "header.csv"), says="no data rows")


def test_csv_still_reads_with_a_header(work):
    x = np.random.default_rng(2).normal(size=(4, 6))
    (work / "x.csv").write_text("a,b,c,d,e,f\n" + "\n".join(",".join(map(str, r)) for r in x))
    result = _compute(work, work / "x.csv", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_samples"] == 4


def test_directory_as_data(work):
    (work / "folder").mkdir()
    (work / "looks_like.npy").mkdir()
    assert_one_error(_compute(work, work / "folder"), says="is a directory")
    assert_one_error(_compute(work, work / "looks_like.npy"), says="is a directory")


def test_key_for_a_single_array_file_is_a_usage_error(work):
    np.savetxt(work / "x.csv", np.zeros((5, 6)), delimiter=",")
    assert_one_error(_compute(work, work / "x.npy", "--key", "a"), code=2, says="drop --key")
    assert_one_error(_compute(work, work / "x.csv", "--key", "a"), code=2, says="drop --key")
    np.save(work / "y.npy", np.zeros(5, np.int64))
    assert_one_error(invoke("compute", work / "mlp.safetensors", work / "x.npy", "--wrt",
                            "params", "--loss", "cross-entropy", "--targets", work / "y.npy",
                            "--targets-key", "y"), code=2, says="drop --targets-key")

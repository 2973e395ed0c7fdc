import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import jaccli
from jaccli.errors import DataLoadError, ShapeMismatchError

ARRAY = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3) / 7


def _write_all(tmp_path):
    """The same array in every data format: name -> (path, key)."""
    np.save(tmp_path / "x.npy", ARRAY)
    np.savez(tmp_path / "x.npz", inputs=ARRAY, labels=np.arange(5))
    save_file({"inputs": ARRAY, "labels": np.arange(5)}, str(tmp_path / "x.safetensors"))
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("group/inputs", data=ARRAY)
        f.create_dataset("labels", data=np.arange(5))
    torch.save(torch.from_numpy(ARRAY), tmp_path / "x.pt")
    torch.save({"inputs": torch.from_numpy(ARRAY), "y": torch.arange(5)}, tmp_path / "d.pt")
    return {"npy": ("x.npy", None), "npz": ("x.npz", "inputs"),
            "safetensors": ("x.safetensors", "inputs"), "h5": ("x.h5", "group/inputs"),
            "pt": ("x.pt", None), "pt-dict": ("d.pt", "inputs")}


def test_every_format_round_trips(tmp_path):
    for name, (file, key) in _write_all(tmp_path).items():
        source = jaccli.load_data(tmp_path / file, key=key)
        assert source.sample_shape == (2, 3), name
        assert len(source) == 5
        np.testing.assert_array_equal(source.read(0, 5), ARRAY, err_msg=name)


def test_npy_is_memory_mapped_and_streamed(tmp_path):
    np.save(tmp_path / "x.npy", ARRAY)
    source = jaccli.load_data(tmp_path / "x.npy", offset=1, limit=3)
    assert isinstance(source.array, np.memmap)
    batches = list(source.batches(2))
    assert [start for start, _ in batches] == [0, 2]
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), ARRAY[1:4])
    np.testing.assert_array_equal(source.indices, [1, 2, 3])


def test_ambiguous_and_wrong_keys_list_the_keys(tmp_path):
    _write_all(tmp_path)
    with pytest.raises(DataLoadError, match=r"arrays \(inputs, labels\); choose one with --key"):
        jaccli.load_data(tmp_path / "x.npz")
    with pytest.raises(DataLoadError, match=r"no array named 'nope'; available: group/inputs"):
        jaccli.load_data(tmp_path / "x.h5", key="nope")
    with pytest.raises(DataLoadError, match="several arrays"):
        jaccli.load_data(tmp_path / "x.safetensors")


def test_csv_with_header_and_reshape(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,c,d\n" + "\n".join(",".join(str(v) for v in row)
                                            for row in np.arange(8.0).reshape(2, 4)) + "\n")
    source = jaccli.load_data(path)
    assert source.sample_shape == (4,)
    source.match_input_shape((1, 2, 2))
    np.testing.assert_array_equal(source.read(0, 2), np.arange(8.0).reshape(2, 1, 2, 2))


def test_shape_mismatch_names_both_shapes(tmp_path):
    np.save(tmp_path / "x.npy", ARRAY)
    source = jaccli.load_data(tmp_path / "x.npy")
    with pytest.raises(ShapeMismatchError, match=r"shape \(2, 3\) but the model expects .* \(6,\)"):
        source.match_input_shape((6,))


def test_nonfinite_rows_are_reported(tmp_path):
    bad = ARRAY.copy()
    bad[1, 0, 0] = np.nan
    bad[3, 1, 2] = np.inf
    np.save(tmp_path / "x.npy", bad)
    with pytest.raises(DataLoadError, match=r"2 sample\(s\) contain NaN or Inf \(rows 1, 3\)"):
        jaccli.load_data(tmp_path / "x.npy").check_finite()
    jaccli.load_data(tmp_path / "x.npy", limit=1).check_finite()  # row 0 alone is fine


def test_bad_files_and_selections(tmp_path):
    np.save(tmp_path / "x.npy", ARRAY)
    with pytest.raises(DataLoadError, match="not found"):
        jaccli.load_data(tmp_path / "missing.npy")
    with pytest.raises(DataLoadError, match="unknown data format '.txt'"):
        (tmp_path / "x.txt").write_text("1")
        jaccli.load_data(tmp_path / "x.txt")
    with pytest.raises(DataLoadError, match="past the end"):
        jaccli.load_data(tmp_path / "x.npy", offset=5)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(DataLoadError, match="not a valid .npy"):
        jaccli.load_data(tmp_path / "bad.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataLoadError, match="numeric array"):
        jaccli.load_data(tmp_path / "obj.npy")
    (tmp_path / "bad.h5").write_bytes(b"garbage")
    with pytest.raises(DataLoadError, match="not a valid HDF5"):
        jaccli.load_data(tmp_path / "bad.h5")

"""The results codec: every encoding decodes to the dense matrices its structure stands for,
on disk and in memory, for random shapes and values; sizes and malformed data are checked."""

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jaccli.engine.structures import Diagonal, Matrix, RowScaled, Selection
from jaccli.errors import ResultsFormatError
from jaccli.graph.storage import from_compact
from jaccli.io.results import Results, encoding, stored_bytes
from jaccli.io.results.writer import ResultsWriter


def reference_dense(kind: str, n: int, d_out: int, d_in: int, seed: int):
    """A structure of `kind` and its dense matrices built entry by entry (not by the codec)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n, d_out, d_in, dtype=torch.float64)
    if kind in ("diagonal", "shared-diagonal"):
        d_in = d_out
        dense = torch.zeros(n, d_out, d_out, dtype=torch.float64)
        shared = kind == "shared-diagonal"
        diag = torch.randn(1 if shared else n, d_out, generator=g, dtype=torch.float64)
        for i in range(n):
            for o in range(d_out):
                dense[i, o, o] = diag[0 if shared else i, o]
        return Diagonal(diag, shared), dense
    if kind in ("shared", "dense"):
        shared = kind == "shared"
        m = torch.randn(1 if shared else n, d_out, d_in, generator=g, dtype=torch.float64)
        for i in range(n):
            dense[i] = m[0 if shared else i]
        return Matrix(m, shared), dense
    if kind == "row-scaled":
        s = torch.randn(n, d_out, generator=g, dtype=torch.float64)
        m = torch.randn(1, d_out, d_in, generator=g, dtype=torch.float64)
        for i in range(n):
            for o in range(d_out):
                dense[i, o] = s[i, o] * m[0, o]
        return RowScaled(s, m), dense
    index = torch.randint(0, d_in, (n, d_out), generator=g)
    for i in range(n):
        for o in range(d_out):
            dense[i, o, index[i, o]] = 1.0
    return Selection(index, d_in, torch.float64), dense


KINDS = ["dense", "shared", "shared-diagonal", "diagonal", "row-scaled", "selection"]
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6),
                   st.integers(0, 2**16))


def host(arrays):
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None)
@given(shape=shapes)
def test_densify_matches_the_structure(kind, shape):
    n, d_out, d_in, seed = shape
    jac, expected = reference_dense(kind, n, d_out, d_in, seed)
    assert jac.tag == kind
    codec = encoding(kind)
    dense = codec.densify(host(jac.compact()), jac.d_out, jac.d_in, np.float64)
    np.testing.assert_array_equal(np.broadcast_to(dense, expected.shape), expected.numpy())
    per_sample, shared = codec.stored_bytes(jac.d_out, jac.d_in, 8)
    arrays = host(jac.compact())
    assert shared == sum(arrays[f].nbytes for f in codec.shared)
    assert per_sample * n == sum(arrays[f].nbytes for f in codec.per_sample)
    back = from_compact(kind, jac.compact(), jac.d_in, torch.float64)
    torch.testing.assert_close(back.dense(n), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=8, deadline=None)
@given(shape=shapes)
def test_file_round_trip_in_batches(kind, shape, tmp_path_factory):
    """Written batch by batch through the writer, read back densely through the reader."""
    n, d_out, d_in, seed = shape
    jac, expected = reference_dense(kind, n, d_out, d_in, seed)
    path = tmp_path_factory.mktemp("codec") / "r.h5"
    arrays = host(jac.compact())
    codec = encoding(kind)
    with ResultsWriter(path, kind="jacobians", sample_index=np.arange(n),
                       attrs={"dtype": "float64"}) as writer:
        group = writer.create_group("j", parent="layers", attrs={
            "d_in": jac.d_in, "d_out": jac.d_out, "encoding": kind})
        writer.create_encoded(group, kind, arrays, n)
        for start in range(n):  # one sample per batch
            writer.write_encoded(group, kind, start,
                                 {f: arrays[f][start:start + 1] for f in codec.per_sample})
        writer.finish()
    with Results(path) as results:
        view = results.layer("j").jacobian
        np.testing.assert_array_equal(np.asarray(view), expected.numpy())
        np.testing.assert_array_equal(view[-1], expected[-1].numpy())
        with pytest.raises(IndexError):
            view[n]


def test_sizes_of_unknown_structures_and_dense_store():
    assert stored_bytes("selection", 5, 7, 4) == (5 * 8, 0)
    assert stored_bytes("row-scaled", 5, 7, 4) == (5 * 4, 35 * 4)
    assert stored_bytes("shared", 5, 7, 4, store="dense") == (35 * 4, 0)
    assert stored_bytes("something-new", 5, 7, 4) == (35 * 4, 0)


def test_malformed_data_is_a_format_error(tmp_path):
    with pytest.raises(ResultsFormatError, match="missing dataset"):
        encoding("row-scaled").densify({"row_scale": np.ones((2, 3))}, 3, 4)
    with pytest.raises(ResultsFormatError, match="has shape"):
        encoding("shared").densify({"matrix": np.ones((3, 5))}, 3, 4)
    with pytest.raises(ResultsFormatError, match="out of range"):
        encoding("selection").densify({"selection": np.array([[0, 9]])}, 2, 4)
    with pytest.raises(ResultsFormatError, match="unknown Jacobian encoding"):
        encoding("zigzag")
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_group("g")
        from jaccli.io.results.encodings import read_rows

        with pytest.raises(ResultsFormatError, match="missing dataset 'diagonal'"):
            read_rows(f["g"], "diagonal", slice(0, 1))

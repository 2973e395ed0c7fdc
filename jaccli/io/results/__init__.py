"""Results files: the versioned HDF5 format, the Jacobian codec, the atomic writer, the reader."""

from .encodings import ENCODINGS, encoding, stored_bytes
from .format import FORMAT_NAME, FORMAT_VERSION, is_hdf5
from .reader import JacobianView, ResultGroup, Results, open_results

__all__ = ["ENCODINGS", "FORMAT_NAME", "FORMAT_VERSION", "JacobianView", "ResultGroup",
           "Results", "encoding", "is_hdf5", "open_results", "stored_bytes"]

"""Integer data (token ids, class indices): a Jacobian with respect to it is refused in one
line, instead of the model failing on the float copy jaccli differentiates."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import DataLoadError


def refuse_integer_input(model: nn.Module, rows: np.ndarray, path, device: torch.device,
                         dtype: torch.dtype) -> None:
    """Raise DataLoadError when `rows` (B, *sample) are integers that the model only accepts as
    integers (it fails on them as `dtype` and runs on them as int64).

    Integer data that the model takes as real numbers (pixel counts, say) passes: those are
    differentiated as floats. Costs one forward of B samples, only for integer data.
    """
    if not np.issubdtype(rows.dtype, np.integer):
        return
    with torch.no_grad():
        try:
            model(torch.as_tensor(rows, device=device).to(dtype))
            return
        except Exception:  # noqa: BLE001 - any failure on the float copy; retried as ints
            pass
        try:
            model(torch.as_tensor(rows, device=device, dtype=torch.int64))
        except Exception:  # noqa: BLE001 - fails either way: the normal error path reports
            return
    raise DataLoadError(f"{path} holds integers that the model takes as integers (token ids, "
                     "class indices): a Jacobian with respect to an integer input is not "
                     "defined; give a float input (e.g. the embeddings) to differentiate")

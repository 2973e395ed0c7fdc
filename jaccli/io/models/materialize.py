"""Build a spec'd model without memory until the file's weights are known to fit it.

A 100-byte spec can declare `Linear(30000, 30000)` (3.4 GiB of weights): the model is built
on the meta device (no storage), the file's keys and shapes are checked against it, and only
then are the file's tensors assigned to it (no second copy, no random initialisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .arch import build_model
from .state_dict import match_state


def build_with_weights(spec: dict[str, Any], state: Mapping[str, torch.Tensor],
                       source: str) -> nn.Module:
    """The module `spec` describes, holding the weights `state` (from the file `source`).

    Raises ModelLoadError listing missing, unexpected and mis-shaped keys before any
    weight memory is allocated.
    """
    with torch.device("meta"):
        skeleton = build_model(spec)
    state = match_state(skeleton, state, source)
    persistent = set(skeleton.state_dict())
    every = {name for name, _ in skeleton.named_parameters()} | \
        {name for name, _ in skeleton.named_buffers()}
    if every - persistent:  # buffers outside the state_dict: build them for real
        model = build_model(spec)
        model.load_state_dict(state, strict=True)
        return model
    # The file's own tensors become the parameters: no allocation, no initialisation.
    skeleton.load_state_dict(state, strict=True, assign=True)
    return skeleton

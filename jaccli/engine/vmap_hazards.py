"""Known `torch.func.vmap` failures, keyed by aten op, and a scan for those ops in a function.

The generic path (`generic.py`) vectorizes over samples with `vmap` and, inside, over basis
vectors with a second `vmap` (`jacrev`'s, or ours around `jvp`). Some ops have batching rules
that break under that nesting. The table below records what a sweep found for torch 2.13.0:
every activation and normalization class of `torch.nn` (ReLU, ReLU6, LeakyReLU, PReLU with 1 and
with C parameters, RReLU in eval mode, ELU, CELU, SELU, GELU (both approximations), SiLU, Mish,
Softplus, Softsign, Softshrink, Hardshrink, Tanhshrink, Hardtanh, Hardswish, Hardsigmoid,
Sigmoid, LogSigmoid, Tanh, Threshold, Softmax, LogSoftmax, Softmin, Softmax2d, GLU, LayerNorm
(with and without affine), RMSNorm, GroupNorm, BatchNorm1d/2d in eval mode, InstanceNorm1d/2d
(with and without running statistics), LocalResponseNorm) plus MaxPool2d, AvgPool2d, the adaptive
pools, bilinear Upsample, Dropout/Dropout2d in eval mode, ChannelShuffle and ZeroPad2d, each
between two layers (`Linear -> module -> Linear`, or `Conv2d`/`Conv1d -> module -> Linear` for
the ones that need feature maps), float64, D_in = 3 (9 for the convolutional nets), D_out = 4,
batch sizes N = 1..D_out+1 and N = D_in, D_in + 1, reverse and forward mode, compared with
`torch.autograd.functional.jacobian` looped over samples. All agreed to 1e-10 except:

| aten op            | nn modules          | broken routes   | symptom (torch 2.13.0)          |
|--------------------|---------------------|-----------------|---------------------------------|
| `_prelu_kernel`    | PReLU (1 or C       | vmap-rev        | WRONG numbers when N equals the |
|                    | weights; 2-d and    |                 | inner basis chunk (D_out, or    |
|                    | 4-d input), F.prelu |                 | chunk_size); else RuntimeError  |
|                    |                     |                 | "The size of tensor a (N) must  |
|                    |                     |                 | match the size of tensor b (4)" |
| `rrelu_with_noise` | RReLU (eval mode    | every vmapped   | RuntimeError "vmap: we do not   |
|                    | too), F.rrelu       | route           | yet support aten::rrelu_with_.."|

The PReLU failure is the batching rule of the prelu backward under two nested vmaps, not the
weight captured in a closure: it is identical with `torch.func.functional_call` and the weight
passed as an unbatched argument, with a detached weight, and with a plain tensor weight; one
level of vmap (vmap over samples of `vjp`, or `jacrev(chunk_size=1)`) and forward mode are
correct. The table is applied on every torch version (a route it skips is only slower, never
less correct); new failures are still caught by the probe check in `generic.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TORCH_VERSION_SWEPT = "2.13.0"

# The routes of generic.py, in the words this table uses.
VMAP_REV, VMAP_FWD = "vmap-rev", "vmap-fwd"
CHUNK1_REV, CHUNK1_FWD = "chunk1-rev", "chunk1-fwd"
LOOP_REV, LOOP_FWD = "loop-rev", "loop-fwd"
VMAPPED_ROUTES = frozenset({VMAP_REV, VMAP_FWD, CHUNK1_REV, CHUNK1_FWD})


@dataclass(frozen=True)
class VmapHazard:
    """One op whose batching rule breaks some routes: `op` as `str(func.overloadpacket)`."""

    op: str
    modules: str
    breaks: frozenset[str]
    symptom: str


HAZARDS: tuple[VmapHazard, ...] = (
    VmapHazard("aten._prelu_kernel", "PReLU", frozenset({VMAP_REV}),
               "vmap over samples of jacrev through prelu gives wrong numbers when N equals "
               f"the basis chunk and raises otherwise (torch {TORCH_VERSION_SWEPT})"),
    VmapHazard("aten.rrelu_with_noise", "RReLU", VMAPPED_ROUTES,
               f"vmap has no batching rule for rrelu_with_noise (torch {TORCH_VERSION_SWEPT})"),
)
_BY_OP = {hazard.op: hazard for hazard in HAZARDS}


class _OpRecorder(TorchDispatchMode):
    """Records the aten ops that reach the dispatcher (TorchScript's included)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def run_and_scan(fn: Callable[..., Any], *args: Any) -> tuple[Any, tuple[VmapHazard, ...]]:
    """`fn(*args)` without gradients, and the hazards among the ops it ran.

    Falls back to a plain call (no hazards known) if `fn` cannot run under a dispatch mode,
    e.g. because it already uses tensor subclasses of its own.
    """
    recorder = _OpRecorder()
    try:
        with torch.no_grad(), recorder:
            out = fn(*args)
    except Exception:  # retried without the mode: a real failure of fn raises again there
        with torch.no_grad():
            return fn(*args), ()
    return out, tuple(_BY_OP[op] for op in sorted(recorder.ops) if op in _BY_OP)


def skipped_routes(hazards: tuple[VmapHazard, ...]) -> dict[str, str]:
    """`{route: why}` for every route a hazard breaks."""
    skipped: dict[str, str] = {}
    for hazard in hazards:
        for route in sorted(hazard.breaks):
            skipped.setdefault(route, f"skipped, known hazard {hazard.op} ({hazard.modules}): "
                                      f"{hazard.symptom}")
    return skipped

"""The settings of a run, composed from small groups that every command shares (no torch).

The CLI builds these once from its option groups; Python callers build them directly::

    ComputeSettings(model=ModelSource("m.safetensors"), data=DataSelection("x.npy", limit=8),
                    output=OutputOptions("jac.h5"))
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path

from .errors import UsageError


class Granularity(str, Enum):
    module = "module"
    block = "block"
    op = "op"


class Dtype(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Mode(str, Enum):
    auto = "auto"
    fwd = "fwd"
    rev = "rev"


class Wrt(str, Enum):
    inputs = "inputs"
    params = "params"


class Loss(str, Enum):
    cross_entropy = "cross-entropy"
    nll = "nll"
    mse = "mse"
    bce_logits = "bce-logits"


class Store(str, Enum):
    compact = "compact"
    dense = "dense"


class Compression(str, Enum):
    none = "none"
    gzip = "gzip"
    lzf = "lzf"


class Stat(str, Enum):
    max = "max"
    mean = "mean"
    p95 = "p95"
    p99 = "p99"


class Which(str, Enum):
    largest = "largest"
    magnitude = "magnitude"


class Direction(str, Enum):
    jvp = "jvp"
    vjp = "vjp"


def choice(kind: type[Enum], value: str | Enum | None, option: str) -> str | None:
    """`value` as the plain string of one of `kind`'s members (None stays None)."""
    if value is None:
        return None
    try:
        return kind(value).value
    except ValueError:
        names = ", ".join(member.value for member in kind)
        raise UsageError(f"{option} must be one of {names}, not {value!r}") from None


@dataclass
class ModelSource:
    """Where the model comes from: the file, what is needed to read it, and for a forward of
    several arguments `--input NAME=FILE[:KEY]`s, `--const NAME=VALUE`s and `--wrt NAME`."""

    path: Path
    arch: str | None = None
    arch_path: Path | None = None
    trust_pickle: bool = False
    inputs: tuple[str, ...] = ()
    constants: tuple[str, ...] = ()
    wrt_input: str | None = None

    def __post_init__(self):
        self.path = Path(self.path)
        self.inputs, self.constants = tuple(self.inputs or ()), tuple(self.constants or ())


@dataclass
class DataSelection:
    """Which samples: a file (`-` for a .npy stream on stdin), an array in it, a range."""

    path: Path | None = None
    key: str | None = None
    offset: int = 0
    limit: int | None = None
    shard: str | tuple[int, int] | None = None  # "i/n": shard i of n of the selected samples

    def __post_init__(self):
        self.path = None if self.path is None else Path(self.path)
        if isinstance(self.shard, str):
            self.shard = parse_shard(self.shard)


def parse_shard(text: str) -> tuple[int, int]:
    """`--shard 3/16` -> (3, 16): shard 3 (counted from 0) of 16."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise UsageError(f"--shard {text!r}: give I/N with 0 <= I < N, e.g. --shard 3/16")
    return int(match[1]), int(match[2])


def shard_range(n_samples: int, index: int, count: int) -> tuple[int, int]:
    """Samples [start, stop) of shard `index` of `count` contiguous shards of `n_samples`,
    balanced by count: the first `n_samples % count` shards get one sample more."""
    base, extra = divmod(n_samples, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass
class LayerSelection:
    """Which Jacobians: the layers (by granularity and name globs) and the end-to-end one;
    output: which output of a model returning several (a name or an index; None: all of
    them, flattened and concatenated)."""

    granularity: str = Granularity.module.value
    patterns: list[str] | None = None
    include_layers: bool = True
    end_to_end: bool = True
    output: str | None = None

    def __post_init__(self):
        self.granularity = choice(Granularity, self.granularity, "--granularity")
        if self.patterns and not self.include_layers:
            raise UsageError("--layers and --no-layers exclude each other")


@dataclass
class RunOptions:
    """How to compute: device, precision, batch size, memory budget (bytes), AD mode."""

    device: str = "auto"
    dtype: str = Dtype.float32.value
    batch_size: int | None = None
    max_memory: int | None = None
    mode: str = Mode.auto.value
    strict_rules: bool = False
    tf32: bool = False

    def __post_init__(self):
        self.dtype = choice(Dtype, self.dtype, "--dtype")
        self.mode = choice(Mode, self.mode, "--mode")


@dataclass
class OutputOptions:
    """The HDF5 file to write (None: only the summary) and its compression."""

    path: Path | None = None
    compression: str = Compression.none.value
    compression_level: int | None = None
    max_output: int | None = None  # bytes the file may take (None: the free space)

    def __post_init__(self):
        if self.path is not None and str(self.path) == "-":
            raise UsageError("-o - is not supported: results are HDF5 files and need a file "
                             "name (use --json to print the summary on stdout)")
        self.path = None if self.path is None else Path(self.path)
        self.compression = choice(Compression, self.compression, "--compression")
        if self.compression_level is not None and self.compression != Compression.gzip.value:
            raise UsageError("--compression-level goes with --compression gzip")


@dataclass
class ParamOptions:
    """`--wrt params`: which parameters, and what is differentiated (outputs, one output
    entry, or a per-sample loss against targets)."""

    patterns: list[str] | None = None
    output_index: int | None = None
    targets: Path | None = None
    targets_key: str | None = None
    loss: str | None = None
    flatten: bool = False

    def __post_init__(self):
        self.loss = choice(Loss, self.loss, "--loss")
        self.targets = None if self.targets is None else Path(self.targets)


# Option name -> field of its group, for each group a command's settings may hold.
_GROUP_OPTIONS: dict[str, tuple[type, dict[str, str]]] = {
    "model": (ModelSource, {"model": "path", "arch": "arch", "arch_path": "arch_path",
                            "trust_pickle": "trust_pickle", "input": "inputs",
                            "const": "constants", "wrt_input": "wrt_input"}),
    "data": (DataSelection, {"data": "path", "key": "key", "offset": "offset",
                             "limit": "limit", "shard": "shard"}),
    "layers": (LayerSelection, {"granularity": "granularity", "layers": "patterns",
                                "include_layers": "include_layers",
                                "end_to_end": "end_to_end", "model_output": "output"}),
    "run": (RunOptions, {"device": "device", "dtype": "dtype", "batch_size": "batch_size",
                         "max_memory": "max_memory", "mode": "mode",
                         "strict_rules": "strict_rules", "tf32": "tf32"}),
    "output": (OutputOptions, {"output": "path", "compression": "compression",
                               "compression_level": "compression_level",
                               "max_output": "max_output"}),
    "params": (ParamOptions, {"params": "patterns", "output_index": "output_index",
                              "targets": "targets", "targets_key": "targets_key",
                              "loss": "loss", "flatten": "flatten"}),
}


class _Composed:
    """Settings made of option groups, buildable from flat option names (as the CLI has them)."""

    @classmethod
    def from_options(cls, **options):
        """`ComputeSettings.from_options(model=..., data=..., limit=8, dtype="float64")`:
        each option goes to the group that holds it; unknown names are a TypeError."""
        types = {f.name: f.type for f in fields(cls)}
        names = set(types)
        groups = {name: spec for name, spec in _GROUP_OPTIONS.items()
                  if types.get(name) in (spec[0], spec[0].__name__)}
        kwargs, used = {}, set()
        for option in names - set(groups):
            if option in options:
                kwargs[option] = options[option]
                used.add(option)
        for group, (group_class, mapping) in groups.items():
            part = {target: options[option] for option, target in mapping.items()
                    if option in options and option not in used}
            used |= {option for option in mapping if option in options}
            kwargs[group] = group_class(**part)
        unknown = set(options) - used
        if unknown:
            raise TypeError(f"{cls.__name__} has no option {', '.join(sorted(unknown))}")
        return cls(**kwargs)


@dataclass
class ComputeSettings(_Composed):
    """`jaccli compute`: Jacobians w.r.t. the inputs and/or the parameters."""

    model: ModelSource
    data: DataSelection
    layers: LayerSelection = field(default_factory=LayerSelection)
    run: RunOptions = field(default_factory=RunOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    store: str = Store.compact.value
    wrt: tuple[str, ...] = (Wrt.inputs.value,)
    params: ParamOptions = field(default_factory=ParamOptions)
    resume: bool = False  # under torchrun: reuse the matching shard files of an earlier run
    command_line: str = ""

    def __post_init__(self):
        self.store = choice(Store, self.store, "--store")
        self.wrt = tuple(dict.fromkeys(choice(Wrt, w, "--wrt") for w in self.wrt))
        if not self.wrt:
            raise UsageError("--wrt takes inputs and/or params")


@dataclass
class SpectrumSettings(_Composed):
    """`jaccli spectrum`: singular values and derived quantities of every Jacobian."""

    model: ModelSource
    data: DataSelection
    layers: LayerSelection = field(default_factory=LayerSelection)
    run: RunOptions = field(default_factory=RunOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    top_k: int | None = None
    exact: bool = False
    tol: float = 1e-8
    max_steps: int | None = None
    probes: int = 32
    profile: bool = True
    resume: bool = False  # under torchrun: reuse the matching shard files of an earlier run
    command_line: str = ""

    def __post_init__(self):
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise UsageError(f"--tol must be a finite number above 0, not {self.tol}")


@dataclass
class ProductSettings(_Composed):
    """`jaccli jvp` / `jaccli vjp`: J v or uᵀ J per sample, without forming J."""

    model: ModelSource
    data: DataSelection
    direction: str = Direction.jvp.value
    vectors: Path | None = None
    vectors_key: str | None = None
    layer: str | None = None
    wrt: str = Wrt.inputs.value
    params: list[str] | None = None
    run: RunOptions = field(default_factory=RunOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    resume: bool = False  # under torchrun: reuse the matching shard files of an earlier run
    command_line: str = ""

    def __post_init__(self):
        self.direction = choice(Direction, self.direction, "direction")
        self.wrt = choice(Wrt, self.wrt, "--wrt")


@dataclass
class HessianSettings(_Composed):
    """`jaccli hessian`: top eigenvalues, trace and density of a loss Hessian."""

    model: ModelSource
    data: DataSelection
    targets: Path | None = None
    loss: str | None = None
    targets_key: str | None = None
    wrt: str = Wrt.params.value
    params: list[str] | None = None
    top_k: int = 5
    which: str = Which.largest.value
    probes: int = 32
    density: bool = False
    run: RunOptions = field(default_factory=RunOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    command_line: str = ""

    def __post_init__(self):
        self.loss = choice(Loss, self.loss, "--loss")
        self.wrt = choice(Wrt, self.wrt, "--wrt")
        self.which = choice(Which, self.which, "--which")

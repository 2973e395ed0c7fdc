"""Models whose forward takes several arguments: `--input NAME=FILE[:KEY]` per-sample
tensors, `--const NAME=VALUE` constants, `--wrt NAME` the one differentiated.

DATA gives the first argument that no `--input`/`--const` names. Jacobians are taken with
respect to the `--wrt` input only (default: DATA's); the other per-sample inputs are held
fixed, row i of each file going with row i of DATA.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataLoadError, ShapeMismatchError, UsageError
from ..graph.call_layout import CallLayout
from ..io.data import DataSource, load_data
from ..io.models import LoadedModel
from ..io.models.signature import NO_DEFAULT, forward_arguments, module_arguments


@dataclass
class ModelCall:
    """How every batch calls the model.

    layout: argument order, the differentiated one, the held ones, the constants.
    wrt: the samples of the differentiated input (`(N, *in_shape)`); held: the samples of
    each held input, in `layout.held` order; record: what the provenance stores.
    """

    layout: CallLayout
    wrt: DataSource
    held: list[DataSource]
    record: dict

    def held_rows(self, start: int, stop: int, device: torch.device, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, ...]:
        """Rows `start:stop` of each held input, `(stop - start, ...)`: floating ones in
        `dtype`, integer ones as int64, on `device`."""
        return tuple(held_tensor(source.read(start, stop), device, dtype)
                     for source in self.held)


def held_tensor(rows: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    rows = np.asarray(rows)
    if np.issubdtype(rows.dtype, np.bool_):
        return torch.from_numpy(rows.copy()).to(device)
    if np.issubdtype(rows.dtype, np.integer):
        return torch.from_numpy(rows.astype(np.int64)).to(device)
    host = rows.astype(np.float64 if dtype == torch.float64 else np.float32)
    return torch.from_numpy(host).to(device)


def resolve_call(loaded, source, data: DataSource) -> ModelCall | None:
    """The call of `loaded`'s forward that `source` (`inputs`, `constants`, `wrt_input`)
    asks for, with `data` giving DATA's samples; None when none of them is given."""
    arguments = forward_arguments(loaded)
    names = tuple(a.name for a in arguments)
    if not (source.inputs or source.constants or source.wrt_input is not None):
        needed = [a.name for a in arguments[1:] if a.default is NO_DEFAULT]
        if needed:
            raise UsageError(f"the forward of {Path(loaded.path).name} takes "
                             f"{', '.join(names)}: give {needed[0]} with --input "
                             f"{needed[0]}=FILE or --const {needed[0]}=VALUE")
        return None
    if not names:
        raise UsageError(f"the forward arguments of {loaded.path} cannot be read; --input, "
                         "--const and --wrt need them")
    per_sample: dict[str, DataSource] = {}
    files: dict[str, dict] = {}
    for spec in source.inputs:
        name, text = _split(spec, "--input", "NAME=FILE[:KEY]")
        name = _argument(name, names, "--input", loaded.path)
        if name in per_sample:
            raise UsageError(f"--input {name} is given twice; give each argument once")
        path, key = _file_and_key(text)
        per_sample[name] = _same_samples(path, key, name, data)
        files[name] = {"path": str(path), "key": key or ""}
    constants: dict[str, object] = {}
    for spec in source.constants:
        name, text = _split(spec, "--const", "NAME=VALUE")
        name = _argument(name, names, "--const", loaded.path)
        if name in constants:
            raise UsageError(f"--const {name} is given twice; give each argument once")
        if name in per_sample:
            raise UsageError(f"{name} is given by both --input and --const; give it once")
        constants[name] = _constant(text, name)
    free = [n for n in names if n not in per_sample and n not in constants]
    if not free:
        raise UsageError(f"every argument of the forward ({', '.join(names)}) is given by "
                         "--input/--const: none is left for DATA")
    per_sample = {free[0]: data, **per_sample}
    files = {free[0]: {"path": str(data.path), "key": data.key or ""}, **files}
    wrt = free[0]
    if source.wrt_input is not None:
        wrt = _argument(source.wrt_input, names, "--wrt", loaded.path)
        if wrt in constants:
            raise UsageError(f"--wrt {source.wrt_input}: {wrt} is a constant (--const); "
                             "Jacobians are taken w.r.t. a per-sample input: DATA or an "
                             "--input")
        if wrt not in per_sample:
            raise UsageError(f"--wrt {source.wrt_input}: {wrt} has no samples; give it with "
                             f"--input {wrt}=FILE (or as DATA)")
    if np.issubdtype(np.asarray(per_sample[wrt].read(0, 1)).dtype, np.integer):
        raise DataLoadError(f"--wrt {wrt}: {per_sample[wrt].path} holds integers (token ids, "
                            "class indices): a Jacobian with respect to an integer input is "
                            "not defined; choose a float input with --wrt")
    defaults = {a.name: a.default for a in arguments if a.default is not NO_DEFAULT}
    held = tuple(n for n in names if n in per_sample and n != wrt)
    layout = CallLayout(names, wrt, held, constants, defaults)
    missing = [n for n in names if n not in per_sample and n not in constants
               and n not in defaults]
    if missing:
        raise UsageError(f"the forward's argument {missing[0]} has no value: give it with "
                         f"--input {missing[0]}=FILE or --const {missing[0]}=VALUE")
    record = {"arguments": list(names), "wrt": wrt,
              "inputs": {n: {**files[n], "held": n != wrt} for n in names if n in files},
              "constants": {n: _describe(v) for n, v in constants.items()}}
    return ModelCall(layout, per_sample[wrt], [per_sample[n] for n in held], record)


@dataclass
class TensorCall:
    """A call of the Python API on tensors in memory: the layout, the differentiated samples
    `x` `(N, *in_shape)` and the held ones `(N, ...)`, in `layout.held` order."""

    layout: CallLayout
    x: torch.Tensor
    held: tuple[torch.Tensor, ...]


def tensor_call(model, x: torch.Tensor, inputs: dict | None = None,
                consts: dict | None = None, wrt: str | None = None) -> TensorCall | None:
    """The call `jaccli.jacobian(model, x, inputs=..., consts=..., wrt=...)` asks for, like
    `--input`/`--const`/`--wrt NAME`: `x` gives the first forward argument that `inputs` and
    `consts` do not name; inputs: `{argument: (N, ...) tensor}`, held fixed unless `wrt`
    names it; consts: `{argument: value}`. None when none of them is given."""
    inputs, consts = dict(inputs or {}), dict(consts or {})
    module = model.module if isinstance(model, LoadedModel) else model
    arguments = forward_arguments(model) if isinstance(model, LoadedModel) \
        else module_arguments(model)
    names = tuple(a.name for a in arguments)
    if not (inputs or consts or wrt is not None):
        return None
    what = type(module).__name__
    if not names:
        raise UsageError(f"the forward arguments of {what} cannot be read; inputs=, consts= "
                         "and wrt= need them")
    per_sample = {_argument(str(n), names, "inputs:", what): v for n, v in inputs.items()}
    constants = {_argument(str(n), names, "consts:", what): v for n, v in consts.items()}
    both = sorted(set(per_sample) & set(constants))
    if both:
        raise UsageError(f"{both[0]} is in both inputs= and consts=; give it once")
    free = [n for n in names if n not in per_sample and n not in constants]
    if not free:
        raise UsageError(f"every argument of the forward ({', '.join(names)}) is in inputs= "
                         "or consts=: none is left for x")
    per_sample = {free[0]: x, **per_sample}
    for name, value in per_sample.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 \
                or value.shape[0] != x.shape[0]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ShapeMismatchError(f"inputs[{name!r}] is {got}: give a tensor with one row "
                                     f"per sample of x ({x.shape[0]})")
    target = free[0] if wrt is None else _argument(wrt, names, "wrt=", what)
    if target not in per_sample:
        raise UsageError(f"wrt={wrt!r}: {target} has no samples; give it in inputs= (or as x)")
    if not (per_sample[target].is_floating_point() or per_sample[target].is_complex()):
        raise UsageError(f"wrt={target!r} holds {per_sample[target].dtype} values (token ids, "
                         "class indices): a Jacobian with respect to an integer input is not "
                         "defined; choose a float input")
    defaults = {a.name: a.default for a in arguments if a.default is not NO_DEFAULT}
    missing = [n for n in names if n not in per_sample and n not in constants
               and n not in defaults]
    if missing:
        raise UsageError(f"the forward's argument {missing[0]} has no value: give it in "
                         "inputs= or consts=")
    held = tuple(n for n in names if n in per_sample and n != target)
    layout = CallLayout(names, target, held, constants, defaults)
    return TensorCall(layout, per_sample[target], tuple(per_sample[n] for n in held))


def named_files(source) -> list[Path]:
    """The files that `source`'s `--input NAME=FILE[:KEY]` and `--const NAME=FILE[:KEY]`
    name (as typed; values that are not files are skipped), for the output guard."""
    files = []
    for spec in (*source.inputs, *source.constants):
        _, sep, text = spec.partition("=")
        if sep and text:
            files.append(_file_and_key(text)[0])
    return files


def on_device(call: ModelCall, device: torch.device, dtype: torch.dtype) -> ModelCall:
    """The call with its tensor constants on `device`, floating ones in `dtype`."""
    constants = {n: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                     if isinstance(v, torch.Tensor) else v)
                 for n, v in call.layout.constants.items()}
    return dataclasses.replace(call, layout=dataclasses.replace(call.layout,
                                                                constants=constants))


def provenance_of(call: ModelCall | None) -> dict:
    """Root attributes of a results file for the call (none for a one-argument model)."""
    if call is None:
        return {}
    return {"wrt_input": call.layout.wrt, "model_inputs": json.dumps(call.record)}


def _split(spec: str, option: str, form: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name.strip() or not value:
        raise UsageError(f"{option} {spec!r}: give {form}")
    return name.strip(), value


def _argument(name: str, names: tuple[str, ...], option: str, path) -> str:
    """A forward argument by name or by position (0 is the first argument)."""
    if name in names:
        return name
    if name.isdigit() and int(name) < len(names):
        return names[int(name)]
    raise UsageError(f"{option} {name}: the forward of {Path(path).name} has no argument "
                     f"{name!r}; its arguments are: {', '.join(names)}")


def _file_and_key(text: str) -> tuple[Path, str | None]:
    """`FILE` or `FILE:KEY` (a file whose name holds a colon is taken whole)."""
    if Path(text).exists() or ":" not in text:
        return Path(text), None
    path, _, key = text.rpartition(":")
    return Path(path), key or None


def _same_samples(path: Path, key: str | None, name: str, data: DataSource) -> DataSource:
    """The rows of `path` that go with DATA's selected rows: the files must hold as many
    samples as DATA's."""
    whole = load_data(path, key=key, key_option=f"--input {name}=FILE:")
    total = int(data.array.shape[0])
    if len(whole) != total:
        raise ShapeMismatchError(f"--input {name}: {path} has {len(whole)} samples and "
                                 f"{data.path} has {total}; every input needs one row per "
                                 "sample")
    selected = dataclasses.replace(whole, offset=data.offset, count=data.count)
    selected.check_finite()
    return selected


def _constant(text: str, name: str) -> object:
    """A number, a bool, or the whole array of a tensor file."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if kind is float and not np.isfinite(value):
            raise UsageError(f"--const {name}={text}: give a finite number")
        return value
    path, key = _file_and_key(text)
    if not path.is_file():
        raise UsageError(f"--const {name}={text}: give a number, true/false or a tensor file")
    source = load_data(path, key=key, key_option=f"--const {name}=FILE:")
    array = np.array(source.read(0, len(source)))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataLoadError(f"--const {name}={text}: the tensor holds NaN or Inf; give "
                            "finite values")
    return torch.from_numpy(array)


def _describe(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    return value

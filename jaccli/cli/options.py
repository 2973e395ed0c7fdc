"""The option groups commands share, declared once, and how a command's parsed options become
its settings object (`jaccli.settings`)."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..settings import Compression, Dtype, Granularity, Mode, Store

# Options that shape what the CLI prints, not what is computed.
PRESENTATION = frozenset({"json_output", "quiet", "progress", "dry_run", "plot"})

# Model
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", help="Architecture for a bare state_dict: a JSON spec file or "
                   "package.module:factory.", rich_help_panel="Model")]
ArchPathOpt = Annotated[Path | None, typer.Option(
    "--arch-path", help="Directory to put on sys.path for --arch package.module:factory.",
    rich_help_panel="Model")]
TrustPickleOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading what runs code from the file: a pickled whole "
                           "module (torch.save(model)), pickled or custom-object payloads in "
                           "torch.export/TorchScript archives. Only for files you trust.",
    rich_help_panel="Model")]
# Model inputs beyond DATA (a forward taking several arguments)
InputOpt = Annotated[list[str] | None, typer.Option(
    "--input", metavar="NAME=FILE[:KEY]",
    help="Another per-sample input of the model's forward, by argument name or position, "
         "from a data file (same samples as DATA; KEY picks an array in a multi-array "
         "file). Held fixed unless --wrt names it. Repeatable.", rich_help_panel="Model")]
ConstOpt = Annotated[list[str] | None, typer.Option(
    "--const", metavar="NAME=VALUE",
    help="A constant argument of the model's forward: a number, true/false, or a tensor "
         "file (.npy/.pt/...; the same for every sample). Repeatable.",
    rich_help_panel="Model")]
WrtInputOpt = Annotated[str | None, typer.Option(
    "--wrt", metavar="NAME",
    help="The forward argument the Jacobians are taken with respect to (default: the one "
         "DATA gives); the other inputs are held fixed.", rich_help_panel="Model")]
# Data
KeyOpt = Annotated[str | None, typer.Option(
    "--key", help="Array to use in .npz/.safetensors/.h5/.pt files holding several.",
    rich_help_panel="Data")]
OffsetOpt = Annotated[int, typer.Option("--offset", min=0, help="First sample to use.",
                                        rich_help_panel="Data")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use at most N samples.",
                                              rich_help_panel="Data")]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", help="Use shard I of N contiguous, balanced shards of the selected samples, "
                    "e.g. 3/16 (for job arrays; join the outputs with `jaccli merge`).",
    rich_help_panel="Data")]
# Layers
GranularityOpt = Annotated[Granularity, typer.Option(
    "--granularity", help="module: every leaf module is a layer; block: an affine/conv module "
                          "and the activations right after it form one layer; op: every "
                          "operator of the graph.",
    rich_help_panel="Layers")]
LayersOpt = Annotated[list[str] | None, typer.Option(
    "--layers", help="Glob on qualified layer names (repeatable), e.g. 'features.*'.",
    rich_help_panel="Layers")]
NoLayersOpt = Annotated[bool, typer.Option(
    "--no-layers", help="Skip per-layer Jacobians (end-to-end only).", rich_help_panel="Layers")]
EndToEndOpt = Annotated[bool, typer.Option(
    "--end-to-end/--no-end-to-end", help="Also compute the model's input→output Jacobian.",
    rich_help_panel="Layers")]
ModelOutputOpt = Annotated[str | None, typer.Option(
    "--model-output", help="For a model returning several outputs (a tuple or dict): the "
                           "one to differentiate, by name or index (default: all, flattened "
                           "and concatenated).", rich_help_panel="Layers")]
# Compute
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Compute precision.",
                                         rich_help_panel="Compute")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:INDEX.",
                                        rich_help_panel="Compute")]
BatchSizeOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, help="Samples per batch (default: sized to the memory budget).",
    rich_help_panel="Compute")]
MaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="Memory budget, e.g. 2GiB (default: 25% of free RAM, 50% of free "
                         "GPU memory).", rich_help_panel="Compute")]
ModeOpt = Annotated[Mode, typer.Option(
    "--mode", help="Differentiation mode: auto picks forward when D_in < D_out.",
    rich_help_panel="Compute")]
StrictRulesOpt = Annotated[bool, typer.Option(
    "--strict-rules", help="Fail instead of using the generic torch.func path for a module "
                           "with no structured rule.", rich_help_panel="Compute")]
Tf32Opt = Annotated[bool, typer.Option(
    "--tf32", help="Allow TF32 matmuls/convolutions on CUDA (faster, ~1e-3 relative "
                   "error). Off by default.", rich_help_panel="Compute")]
# Output
OutputOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="HDF5 file to write (docs/FORMAT.md). Without it, only the "
                           "summary is printed.", rich_help_panel="Output")]
StoreOpt = Annotated[Store, typer.Option(
    "--store", help="compact: each Jacobian in its exact compact form (shared matrix, "
                    "diagonal, ...; see docs/FORMAT.md); dense: (N, D_out, D_in) arrays.",
    rich_help_panel="Output")]
CompressionOpt = Annotated[Compression, typer.Option(
    "--compression", help="HDF5 compression of the result datasets.",
    rich_help_panel="Output")]
CompressionLevelOpt = Annotated[int | None, typer.Option(
    "--compression-level", min=0, max=9, help="gzip level 0-9.", rich_help_panel="Output")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout "
                                                      "instead of tables.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
ProgressOpt = Annotated[bool | None, typer.Option(
    "--progress/--no-progress", help="Progress bar on stderr (default: only on a terminal).")]
# Parameters
WrtOneOpt = Annotated[str, typer.Option(
    "--wrt", help="inputs, params, or the name of the model input to differentiate "
                  "(see --input).")]
ParamsOpt = Annotated[list[str] | None, typer.Option(
    "--params", help="Glob on parameter names (repeatable), e.g. 'features.*.weight'.",
    rich_help_panel="Parameters")]


def settings_from(kind: type, ctx: typer.Context, *, exclude: tuple[str, ...] = (),
                  **overrides: Any):
    """The settings object of type `kind` for the command `ctx` parsed: every parsed option
    except the presentation ones and `exclude` (options not given keep the settings'
    defaults), with `overrides` applied."""
    from ..units import parse_size

    options = {name: _plain(value) for name, value in ctx.params.items()
               if name not in PRESENTATION and name not in exclude}
    options = {name: value for name, value in options.items() if value is not None}
    if "no_layers" in options:
        options["include_layers"] = not options.pop("no_layers")
    if "wrt" in options:
        options |= _wrt_input(options.pop("wrt"), kind)
    for size in ("max_memory", "max_output"):
        if options.get(size) is not None:
            options[size] = parse_size(options[size])
    options |= overrides
    return kind.from_options(**options, command_line=command_line())


def _wrt_input(wrt: str | list[str], kind: type) -> dict[str, Any]:
    """`--wrt inputs|params` stay `wrt` (where the command has it); `--wrt NAME` becomes
    `wrt_input`: NAME is the model input differentiated, and that is `--wrt inputs`."""
    from ..errors import UsageError

    values = wrt if isinstance(wrt, list) else [wrt]
    names = [w for w in values if w not in ("inputs", "params")]
    if len(names) > 1:
        raise UsageError(f"--wrt {names[0]} and --wrt {names[1]}: Jacobians are taken with "
                         "respect to one model input at a time")
    kinds = [w for w in values if w in ("inputs", "params")] + (["inputs"] if names else [])
    out = {"wrt_input": names[0]} if names else {}
    field = next((f for f in dataclasses.fields(kind) if f.name == "wrt"), None)
    if field is not None:  # a tuple of kinds (compute) or one kind
        many = isinstance(wrt, list) or isinstance(field.default, tuple)
        out["wrt"] = list(dict.fromkeys(kinds)) if many else kinds[0]
    return out


# Options that only mean something when a model is run, not for a results file.
MODEL_ONLY = ("arch", "arch_path", "trust_pickle", "key", "granularity", "max_memory", "tf32",
              "profile", "tol", "max_steps", "probes", "input", "const", "wrt")


def given(ctx: typer.Context) -> set[str]:
    """The options the user gave (on the command line or through the environment)."""
    from typer._click.core import ParameterSource

    return {name for name in ctx.params
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                                  ParameterSource.ENVIRONMENT)}


def for_results_file(ctx: typer.Context, path: Path) -> dict[str, Any]:
    """Refuse the model-only options given with a results file (usage error); the overrides
    for its settings: the file's own precision unless --dtype was given."""
    from ..errors import UsageError

    wrong = sorted(given(ctx) & set(MODEL_ONLY))
    if wrong:
        names = ", ".join("--" + name.replace("_", "-") for name in wrong)
        raise UsageError(f"{names} only apply when running a model; {path} is a results file")
    return {} if "dtype" in given(ctx) else {"dtype": None}


def _plain(value: Any) -> Any:
    """Enum members as their values; empty repeatable options as None."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] or None
    return value


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["jaccli", *sys.argv[1:]])


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,28,28' or '1x28x28' -> (1, 28, 28); a usage error otherwise."""
    if text is None:
        return None
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise typer.BadParameter(f"{text!r} is not a shape; use e.g. 1,28,28",
                                 param_hint="--input-shape")
    return shape

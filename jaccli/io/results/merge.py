"""Join shard result files into one: a master file of HDF5 virtual datasets, or a copy.

Shards are results files of one run split by sample range (`--shard i/n`). The master file
has the first shard's layout: every per-sample dataset (N, ...) is a virtual dataset mapping
the shards' rows in sample order through paths relative to the master's folder (move the
folder, it still reads); shared datasets (a Linear layer's W) are written once. `copy=True`
writes real datasets instead, a self-contained file. Spectra files (`jaccli spectrum`
shards) join the same way; their aggregates over samples are recombined: each Jacobian's
seconds are summed, the depth profile's moments are weighted by each shard's count of σ²
values. See docs/FORMAT.md.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ...errors import ResultsFormatError, UsageError
from .encodings import encoding
from .format import encode_attr
from .output_guard import check_output
from .reader import open_results
from .writer import chunk_shape

# Root attributes that differ between the shards of one run (everything else must match).
PER_SHARD = ("created", "command", "seconds", "n_samples", "data_offset", "batch_size",
             "device", "complete", "shards", "merged", "profile_note")
KINDS = ("jacobians", "spectra", "products")  # the files written per sample range
GROUPS = ("layers", "end_to_end", "params")


@dataclass
class Shard:
    """One input file: its path, its sample range [start, stop) and its root attributes."""

    path: Path
    start: int
    stop: int
    attrs: dict


def read_shard(path: Path, kinds: tuple[str, ...] = KINDS) -> Shard:
    """Open `path` as a results file of one of `kinds` holding a contiguous run of samples."""
    with open_results(path) as results:
        index = results.sample_index
        attrs = dict(results.attrs)
    if attrs.get("kind") not in kinds:
        raise ResultsFormatError(
            f"{path} is a {attrs.get('kind')!r} file; merge joins only files written by "
            f"jaccli compute, spectrum, jvp or vjp (other kinds hold aggregates over samples "
            f"that are not joined)")
    if len(index) == 0 or not np.array_equal(index, np.arange(index[0], index[0] + len(index))):
        raise ResultsFormatError(f"{path} does not hold one contiguous run of samples, so "
                                 f"it is not a shard; give the files written with --shard")
    return Shard(path, int(index[0]), int(index[-1]) + 1, attrs)


def check_tiling(shards: list[Shard]) -> list[Shard]:
    """The shards in sample order; refuse mismatched provenance, gaps and overlaps."""
    shards = sorted(shards, key=lambda s: (s.start, s.stop))
    first = shards[0]
    for shard in shards[1:]:
        key = differing_key(shard.attrs, first.attrs, sorted(set(first.attrs) |
                                                             set(shard.attrs)))
        if key is not None:
            raise ResultsFormatError(
                f"{shard.path} and {first.path} come from different runs: {key} is "
                f"{shard.attrs.get(key)!r} vs {first.attrs.get(key)!r}; merge only the "
                f"shards of one run")
    for before, after in zip(shards, shards[1:], strict=False):
        if after.start > before.stop:
            raise ResultsFormatError(f"samples {before.stop}..{after.start - 1} are missing "
                                     f"between {before.path} and {after.path}; compute that "
                                     f"shard first")
        if after.start < before.stop:
            raise ResultsFormatError(f"{before.path} and {after.path} overlap: both hold samples "
                             f"{after.start}..{min(before.stop, after.stop) - 1}; give each "
                             f"sample range once")
    return shards


def differing_key(attrs: dict, other: dict, keys) -> str | None:
    """The first of `keys` (root attributes) that differs between two files, leaving out the
    ones that differ between the shards of one run (PER_SHARD); None when they agree."""
    for key in keys:
        if key not in PER_SHARD and not _same(attrs.get(key), other.get(key)):
            return key
    return None


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def merge_results(paths: list[str | Path], output: str | Path, *, copy: bool = False,
                  command: str = "") -> dict:
    """Write `output` from the shard files `paths`; returns a summary dict (samples, shards,
    output, mode)."""
    paths = [Path(p) for p in paths]
    output = Path(output)
    if not paths:
        raise UsageError("give at least one shard file to merge")
    check_output(output, paths)
    shards = check_tiling([read_shard(p) for p in paths])
    folder = output.resolve().parent
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    sources = [h5py.File(s.path, "r") for s in shards]
    try:
        with h5py.File(partial, "x", track_order=True) as master:
            _write(master, shards, sources, folder, copy, command)
        os.replace(partial, output)
    finally:
        for source in sources:
            source.close()
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return {"output": str(output), "samples": shards[-1].stop - shards[0].start,
            "first_sample": shards[0].start, "shards": len(shards),
            "mode": "copy" if copy else "virtual"}


def _write(master: h5py.File, shards: list[Shard], sources: list[h5py.File], folder: Path,
           copy: bool, command: str) -> None:
    first = sources[0]
    total = shards[-1].stop - shards[0].start
    attrs = dict(first.attrs)
    attrs.update(n_samples=np.int64(total), data_offset=np.int64(shards[0].start),
                 complete=True, merged="copy" if copy else "virtual")
    if command:
        attrs["command"] = command
    relatives = [""] * len(shards) if copy else [os.path.relpath(s.path.resolve(), folder)
                                                  for s in shards]
    attrs["seconds"] = float(sum(float(s.attrs.get("seconds", 0.0)) for s in shards))
    attrs["shards"] = encode_attr(json.dumps([
        {"file": relative,
         "start": s.start, "stop": s.stop, "created": str(s.attrs.get("created", "")),
         "command": str(s.attrs.get("command", ""))}
        for s, relative in zip(shards, relatives, strict=True)]))
    attrs.pop("complete")
    master.attrs.update(attrs)
    master.attrs["complete"] = False
    jacobians = first.attrs.get("kind") == "jacobians"
    spectra = first.attrs.get("kind") == "spectra"

    def visit(name: str, item) -> None:
        if spectra and name.split("/")[0] == "profile":
            return  # recombined below
        if isinstance(item, h5py.Group):
            group = master.require_group(name)
            group.attrs.update(dict(item.attrs))
            if spectra and "seconds" in item.attrs:  # one Jacobian's time: every shard's
                group.attrs["seconds"] = float(sum(float(s[name].attrs["seconds"])
                                                   for s in sources))
            return
        parent = item.parent
        shared = jacobians and parent.name.split("/")[1] in GROUPS and \
            item.name.rsplit("/", 1)[-1] in encoding(str(parent.attrs["encoding"])).shared
        if shared or item.ndim == 0:
            for source in sources[1:]:
                if not np.array_equal(source[name][()], item[()]):
                    raise ResultsFormatError(f"{name} differs between {shards[0].path} and "
                                     f"{source.filename}: the shards are not of one model")
            master.create_dataset(name, data=item[()])
        elif copy:
            _copy(master, name, item, sources, total)
        else:
            _virtual(master, name, item, shards, sources, relatives, total)
        master[name].attrs.update(dict(item.attrs))

    first.visititems(visit)
    if spectra:
        _profile(master, shards, sources)
    master.attrs["complete"] = True


def _profile(master: h5py.File, shards: list[Shard], sources: list[h5py.File]) -> None:
    """The depth profile over all shards: the moments of σ² weighted by each shard's count
    of σ² values; none when a shard has none (its note says why)."""
    missing = [i for i, s in enumerate(sources) if "profile" not in s]
    if missing:
        master.attrs["profile_note"] = str(sources[missing[0]].attrs.get("profile_note", ""))
        return
    if any("count" not in s["profile"] for s in sources):
        raise ResultsFormatError(f"{shards[0].path} predates profile/count: its depth "
                                 "profile cannot be joined with the others; rerun the shards "
                                 "with this jaccli or with --no-profile")
    layers = list(sources[0]["profile"].attrs["layers"])
    for shard, source in zip(shards, sources, strict=True):
        if list(source["profile"].attrs["layers"]) != layers:
            raise ResultsFormatError(f"{shard.path} profiles other layers than "
                                     f"{shards[0].path}; the shards are not of one model")
    count = np.sum([s["profile/count"][:] for s in sources], axis=0)
    weight = np.maximum(count, 1)
    mean = np.sum([s["profile/mean_sigma2"][:] * s["profile/count"][:] for s in sources],
                  axis=0) / weight
    fourth = np.sum([(s["profile/var_sigma2"][:] + s["profile/mean_sigma2"][:] ** 2)
                     * s["profile/count"][:] for s in sources], axis=0) / weight
    group = master.create_group("profile")
    group.attrs.update(dict(sources[0]["profile"].attrs))
    group.create_dataset("mean_sigma2", data=mean)
    group.create_dataset("var_sigma2", data=fourth - mean ** 2)
    group.create_dataset("count", data=count)
    master.attrs["profile_note"] = str(sources[0].attrs.get("profile_note", ""))


def _copy(master, name, item, sources, total) -> None:
    shape = (total, *item.shape[1:])
    target = master.create_dataset(name, shape=shape, dtype=item.dtype,
                                   chunks=chunk_shape(shape, item.dtype.itemsize)
                                   if total else None)
    row = 0
    for source in sources:
        data = source[name]
        for start in range(0, data.shape[0], max(1, chunk_shape(data.shape,
                                                                data.dtype.itemsize)[0])):
            block = data[start:start + chunk_shape(data.shape, data.dtype.itemsize)[0]]
            target[row:row + len(block)] = block
            row += len(block)


def _virtual(master, name, item, shards, sources, relatives, total) -> None:
    layout = h5py.VirtualLayout(shape=(total, *item.shape[1:]), dtype=item.dtype)
    row = 0
    for shard, source, relative in zip(shards, sources, relatives, strict=True):
        data = source[name]
        if data.shape[0] != shard.stop - shard.start or data.shape[1:] != item.shape[1:]:
            raise ResultsFormatError(f"{shard.path} is damaged: {name} has shape "
                                     f"{data.shape} for {shard.stop - shard.start} samples")
        layout[row:row + data.shape[0]] = h5py.VirtualSource(relative, name, shape=data.shape)
        row += data.shape[0]
    master.create_virtual_dataset(name, layout)

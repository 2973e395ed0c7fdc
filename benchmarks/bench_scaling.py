"""Scaling over processes: the sample CNN over 2000 samples in one process and under
`torchrun --nproc-per-node 2` (gloo on the CPU, or NCCL with --device cuda on a machine with
two GPUs), and what joining the shard files into the master file costs. The commands:
`compute` (per-layer Jacobians: little arithmetic, mostly writing), `compute --wrt params`
(150 MiB of parameter Jacobians: writing-bound) and `spectrum` (every singular value of every
layer and sample: compute-bound, the case the 1.7× target is about), the spectrum also on
4× the samples; and `ntk`, its blocks split over the processes (the full kernel of 500
samples, the trace of 2000).

Usage: python benchmarks/bench_scaling.py [--device cpu|cuda] [--quick] [--cases scaling]
A run's time is the `seconds` of its --json summary: from the end of planning (under
torchrun: the moment every rank has planned) to the end, so computing, writing and, under
torchrun, the exchanges and the master file; the command's wall time in the note adds the
interpreter, torch import, process-group start, loading, tracing and planning.
Every process runs one thread (OMP_NUM_THREADS=1), as torchrun sets by default.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SCALING_CASES, Case, Row, header, parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "sample_models" / "digits_cnn.safetensors"


def samples(n: int, folder: Path) -> Path:
    """`n` CNN inputs (1, 8, 8): the sample digits, repeated with a little noise."""
    images = np.load(ROOT / "sample_models" / "digits_test_images.npy")
    rows = images[np.arange(n) % len(images)]
    rows = rows + np.random.default_rng(0).normal(scale=0.01, size=rows.shape)
    np.save(folder / "x.npy", rows.astype(np.float32))
    return folder / "x.npy"


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "jaccli"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "jaccli"]


def wall(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def written(out: Path) -> int:
    """Bytes of `out` and of its shard folder, if any."""
    parts = out.with_name(out.name + ".parts")
    shards = sum(p.stat().st_size for p in parts.glob("*.h5")) if parts.is_dir() else 0
    return out.stat().st_size + shards


COMMANDS = {"compute": ["compute"], "compute --wrt params": ["compute", "--wrt", "params"],
            "spectrum": ["spectrum"], "ntk": ["ntk"], "ntk --trace": ["ntk", "--trace"]}


def scaling(n: int, device: str, command: str, repeats: int) -> Case:
    """Median of `repeats` runs each of 1 and 2 processes, alternating (so that a burst of
    other work on the machine lands on both), and one merge of the 2-process shards."""
    from jaccli.io.results.merge import merge_results

    case = Case(f"{command}, sample CNN, {n} samples: 1 vs 2 processes, median of {repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = samples(n, folder)
        runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        verb, *options = COMMANDS[command]
        for _ in range(repeats):
            for nproc in (1, 2):
                out = folder / f"out-{nproc}.h5"
                shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
                out.unlink(missing_ok=True)
                total, stdout = wall([*launcher(nproc), verb, str(MODEL), str(data), *options,
                                      "-o", str(out), "--device", device, "--json"], folder)
                runs[nproc].append((json.loads(stdout)["seconds"], total))
        seconds = {}
        for nproc, measured in runs.items():
            seconds[nproc] = statistics.median(s for s, _ in measured)
            spread = ", ".join(f"{s:.2f}" for s, _ in measured)
            case.rows.append(Row(
                f"jaccli, {nproc} process{'es' if nproc > 1 else ''}", seconds[nproc],
                note=f"runs {spread} s; command wall time (median) "
                     f"{statistics.median(t for _, t in measured):.2f} s; "
                     f"{written(folder / f'out-{nproc}.h5') / 2**20:.1f} MiB written"))
        parts = sorted((folder / "out-2.h5.parts").glob("rank-*.h5"))
        if parts:  # ntk leaves no shard files: rank 0 copies the blocks into one file
            start = time.perf_counter()
            merge_results(parts, folder / "again.h5")
            merging = time.perf_counter() - start
            case.rows.append(Row("merge (VDS master) of the 2 shard files", merging,
                                 note=f"{100 * merging / seconds[2]:.1f}% of the 2-process "
                                      "run"))
        case.notes.append(f"speed-up of 2 processes over 1: {seconds[1] / seconds[2]:.2f}× "
                          "(summary seconds)")
    return case


def main() -> None:
    args, cases, device = parse_args(__doc__.splitlines()[0], SCALING_CASES)
    n = 200 if args.quick else 2000
    report = header("Scaling over processes — ", device, args.quick)
    if "scaling" in cases:
        repeats = 1 if args.quick else 3
        # The spectrum again on 4× the samples: where the fixed costs of a ranked run (the
        # exchanges, the master file) have become small against the arithmetic.
        # ntk: the full kernel of N samples is N²·C² values (N = 2000: 1.5 GiB), so a
        # quarter of the samples; its trace (N² values) on all of them.
        runs = [*((c, n) for c in ("compute", "compute --wrt params", "spectrum")),
                ("spectrum", 4 * n), ("ntk", n // 4), ("ntk --trace", n)]
        for command, count in runs:
            report += "\n" + scaling(count, str(device), command, repeats).markdown(
                reference="(speed-up in the notes)")
    print(report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    main()

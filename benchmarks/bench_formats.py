"""Deployable formats on the operator graph: `.pt2` and TorchScript against the eager module.

Every run is a whole command in its own process (`jaccli compute|spectrum|check ...`, or the
peer script), timed by wall clock, with its peak resident memory (VmHWM) — what a user of
the CLI waits for and pays. Cases (`--cases`):

- `parity`: the sample CNN and the 784→1000→1000→1000→10 tanh MLP, per-layer Jacobians from
  an eager module (trusted pickle), `.pt2` and TorchScript; target: within 1.2× of eager.
- `parity-in-process`: the same runs as `run_compute` calls in one process after a warm-up,
  so that start-up (the same for every format) does not hide the format's own cost.
- `mlp-script`: the MLP from `.pt2`, 64 samples, per-layer Jacobians to HDF5, against a
  15-line `vmap(jacrev)`-per-leaf + h5py script; target: ≥ 5× faster.
- `mlp-in-process`: the same two, side by side in one process (`jaccli.run_compute` on the
  `.pt2` vs the script's load + vmap(jacrev) + h5py as a function): each run first in a fresh
  process right after `import torch` (what a first call pays), then best of 2 after a warm-up.
- `startup`: `jaccli compute` of the sample MLP (the `make demo` command) against
  `python -c "import torch"`, median of 5 interleaved runs, graph cache warm and off;
  target: within 1.0 s of the torch import.
- `mtcnn`: an O-Net-shaped face network (conv → PReLU → max-pool ×3, dense, three heads) from
  `.pt2`, 16 samples: compute, spectrum and check; target: each under 30 s.
- `resnet`: a ResNet-18-shaped network (BatchNorm in eval) at 3×64×64 from `.pt2`, 32
  samples: per-layer top-5 singular values; target: under 2 minutes.
- `resnet32`: ResNet-18 at 3×32×32 from `.pt2`, 64 samples: every layer's top-5 singular
  values, checked against svdvals of float64 autograd Jacobians of three convolutions;
  target: under 60 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import FORMAT_CASES, Case, Row, header, parse_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Runs one jaccli command in this process and reports its peak RSS on stderr's last line.
_RUN_JACCLI = """
import sys
from jaccli.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
def peak_kib():  # this process's own high-water RSS (ru_maxrss also counts the parent
    # that spawned it: Linux carries the spawning mm's high-water mark across exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("MAXRSS", peak_kib(), file=sys.stderr)
sys.exit(code)
"""

# The peer: what a user writes today — vmap(jacrev) of every leaf on its recorded input, h5py.
_PEER = """
def peer(pt2, x_path, out, eager_path):
    import h5py, numpy as np, torch
    from torch.func import jacrev, vmap
    model = torch.export.load(pt2).module()
    x = torch.from_numpy(np.load(x_path))
    inputs = {}
    leaves = {n: m for n, m in torch.load(eager_path, weights_only=False).named_modules()
              if not list(m.children())}
    eager = torch.load(eager_path, weights_only=False).eval()
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in eager.named_modules() if n in leaves]
    with torch.no_grad():
        model(x)
        eager(x)
    with h5py.File(out, "w") as f:
        for name, m in eager.named_modules():
            if name in inputs:
                f[name] = vmap(jacrev(m))(inputs[name]).detach().numpy()
"""
_PEER_SCRIPT = _PEER + """
import sys
peer(*sys.argv[1:5])
def peak_kib():  # this process's own high-water RSS (ru_maxrss also counts the parent
    # that spawned it: Linux carries the spawning mm's high-water mark across exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("MAXRSS", peak_kib(), file=sys.stderr)
"""

# Side by side in one process: `which` = jaccli | peer | both; prints one JSON line of
# seconds: the first call of each (in that order), then the best of `repeat` after it.
_IN_PROCESS = _PEER + """
import json, sys, time
import torch
which, pt2, x_path, folder, eager_path, repeat = sys.argv[1:7]


def ours(out):
    from jaccli.pipelines.compute import run_compute
    from jaccli.settings import ComputeSettings
    run_compute(ComputeSettings.from_options(model=pt2, data=x_path, output=out,
                                             command_line="bench"))


runs = {"jaccli": lambda i: ours(f"{folder}/ours{i}.h5"),
        "peer": lambda i: peer(pt2, x_path, f"{folder}/peer{i}.h5", eager_path)}
times = {}
for name in (["jaccli", "peer"] if which == "both" else [which]):
    seconds = []
    for i in range(1 + int(repeat)):
        start = time.perf_counter()
        runs[name](i)
        seconds.append(time.perf_counter() - start)
    times[name] = {"first": seconds[0], "best": min(seconds[1:] or seconds)}
print(json.dumps(times))
"""


def run(args: list[str], *, script: str = _RUN_JACCLI, env: dict | None = None
        ) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one command in a fresh process; fails loudly."""
    seconds, peak, code, said = run_gate(args, script=script, env=env)
    if code != 0:
        raise SystemExit(f"benchmark command failed ({code}): {' '.join(args)}\n{said}")
    return seconds, peak


def run_gate(args: list[str], *, script: str = _RUN_JACCLI, env: dict | None = None
             ) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit code, last stderr line) of one command."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    if not lines or not lines[-1].startswith("MAXRSS"):
        raise SystemExit(f"benchmark command crashed ({done.returncode}): {' '.join(args)}\n"
                         f"{done.stderr[-2000:]}")
    said = lines[-2] if len(lines) > 1 else ""
    return seconds, int(lines[-1].split()[1]) * 1024, done.returncode, said


def mlp() -> nn.Module:
    widths = [784, 1000, 1000, 1000, 10]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).eval()


class ONet(nn.Module):
    """MTCNN O-Net shapes at 3×48×48: PReLU conv stack, a dense layer, three heads."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3), nn.PReLU(32), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(32, 64, 3), nn.PReLU(64), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(64, 64, 3), nn.PReLU(64), nn.MaxPool2d(2, 2, ceil_mode=True),
            nn.Conv2d(64, 128, 2), nn.PReLU(128))
        self.dense = nn.Linear(1152, 256)
        self.prelu = nn.PReLU(256)
        self.cls, self.box, self.landmarks = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(
            256, 10)

    def forward(self, x):
        h = self.prelu(self.dense(self.features(x).flatten(1)))
        return torch.softmax(self.cls(h), dim=1), self.box(h), self.landmarks(h)


class Basic(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False),
                                         nn.BatchNorm2d(c)) if stride != 1 or c_in != c
                           else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet18() -> nn.Module:
    """torchvision's ResNet-18 layout (BasicBlock ×[2, 2, 2, 2], 64..512 channels)."""
    blocks, c_in = [], 64
    for c, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                      (512, 1)):
        blocks.append(Basic(c_in, c, stride))
        c_in = c
    model = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                          nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1), *blocks,
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def save_formats(model: nn.Module, shape: tuple[int, ...], folder: Path, name: str) -> dict:
    """The model as a trusted pickle (eager), a dynamic-batch `.pt2` and TorchScript."""
    example = torch.randn(2, *shape)
    paths = {"eager": folder / f"{name}.pt", "pt2": folder / f"{name}.pt2",
             "torchscript": folder / f"{name}_ts.pt"}
    torch.save(model, paths["eager"])
    program = torch.export.export(model, (example,),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, paths["pt2"])
    torch.jit.save(torch.jit.trace(model, example), paths["torchscript"])
    return paths


def data(folder: Path, name: str, n: int, shape: tuple[int, ...]) -> Path:
    path = folder / f"{name}.npy"
    np.save(path, torch.randn(n, *shape).numpy())
    return path


def compute_args(model: Path, x: Path, out: Path, fmt: str) -> list[str]:
    return ["compute", str(model), str(x), "-o", str(out),
            *(["--trust-pickle"] if fmt == "eager" else [])]


def case_parity(folder: Path, quick: bool) -> Case:
    case = Case("Format parity: per-layer Jacobians from eager, `.pt2` and TorchScript")
    import jaccli

    cnn = jaccli.load_model(ROOT / "sample_models" / "digits_cnn.safetensors").module
    models = [("sample CNN", cnn.eval(), (1, 8, 8), 360), ("MLP 784→1000³→10", mlp(), (784,),
                                                           64)]
    for title, model, shape, n in models:
        n = min(n, 16) if quick else n
        paths = save_formats(model, shape, folder, title.split()[0])
        x = data(folder, "parity", n, shape)
        eager = None
        env = {**os.environ, "JACCLI_CACHE_DIR": str(folder / f"cache-{title.split()[0]}")}
        env.pop("JACCLI_CACHE", None)
        runs = [*paths.items(), ("torchscript, graph cache warm", paths["torchscript"])]
        for fmt, path in runs:
            seconds, peak = run(compute_args(path, x, folder / "out.h5", fmt), env=env)
            eager = eager or (seconds, peak)
            case.rows.append(Row(f"{title}, {fmt}", seconds, peak_bytes=peak,
                                 note=f"{seconds / eager[0]:.2f}× the eager time, "
                                      f"{peak / eager[1]:.2f}× its peak"))
    case.notes.append("each row is a whole `jaccli compute` process (start-up, load, capture, "
                      "compute, write); target: `.pt2` and TorchScript within 1.2× of eager")
    case.notes.append("graph cache: a fresh folder per model, so the eager (pickled module: "
                      "never cached), `.pt2` and first TorchScript runs capture; the last row "
                      "reruns TorchScript with the entry its first run stored")
    return case


# Per-format compute in one process: `run_compute` of each file after a warm-up of all of
# them, best of `repeat`, with the RSS growth while it runs; one JSON line.
_PARITY_IN_PROCESS = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from common import PeakMemory
import torch
from jaccli.pipelines.compute import run_compute
from jaccli.settings import ComputeSettings
x, out, repeat, files = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]


def once(path):
    run_compute(ComputeSettings.from_options(model=path, data=x, output=out,
                                             trust_pickle=path.endswith(".pt") and
                                             not path.endswith("_ts.pt"),
                                             command_line="bench"))


for path in files:
    once(path)
result = {}
for path in files:
    best, best_cpu, peak = float("inf"), float("inf"), 0
    for _ in range(repeat):
        with PeakMemory(torch.device("cpu")) as memory:
            start, start_cpu = time.perf_counter(), time.process_time()
            once(path)
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
        peak = max(peak, memory.peak)
    result[path] = [best, peak, best_cpu]
print(json.dumps(result))
"""


def case_parity_in_process(folder: Path, quick: bool) -> Case:
    import json

    case = Case("Format parity in one process: `run_compute` per format after a warm-up")
    import jaccli

    cnn = jaccli.load_model(ROOT / "sample_models" / "digits_cnn.safetensors").module
    for title, model, shape, n in (("sample CNN", cnn.eval(), (1, 8, 8), 360),
                                   ("MLP 784→1000³→10", mlp(), (784,), 64)):
        n = min(n, 16) if quick else n
        paths = save_formats(model, shape, folder, title.split()[0])
        x = data(folder, "parity", n, shape)
        done = subprocess.run([sys.executable, "-c", _PARITY_IN_PROCESS,
                               str(Path(__file__).parent), str(x), str(folder / "out.h5"),
                               "1" if quick else "3", *map(str, paths.values())],
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "JACCLI_CACHE": "off"})
        if done.returncode != 0:
            raise SystemExit(f"in-process parity failed: {done.stderr[-2000:]}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        eager = measured[str(paths["eager"])]
        for fmt, path in paths.items():
            seconds, peak, cpu = measured[str(path)]
            case.rows.append(Row(f"{title}, {fmt}", seconds, peak_bytes=peak,
                                 note=f"{seconds / eager[0]:.2f}× the eager time; CPU "
                                      f"{cpu:.2f} s, {cpu / eager[2]:.2f}× the eager CPU"))
    case.notes.append("each: load, capture (graph cache off), compute and write, best of 3 "
                      "after a warm-up of every format; peak: RSS growth while it runs (misses "
                      "memory the allocator reuses: a rough lower bound); target: `.pt2` and "
                      "TorchScript within 1.2× of eager")
    case.notes.append(f"CPU: the process's user + system time (all threads) of the best run, "
                      f"less disturbed than wall time by other jobs on the cores; load average "
                      f"{os.getloadavg()[0]:.1f} (1 min) at the end")
    return case


def case_mlp_script(folder: Path, quick: bool) -> Case:
    n = 16 if quick else 64
    case = Case(f"MLP 784→1000³→10 from `.pt2`, {n} samples, per-layer Jacobians to HDF5")
    paths = save_formats(mlp(), (784,), folder, "mlp")
    x = data(folder, "mlp", n, (784,))
    ours, ours_peak = run(compute_args(paths["pt2"], x, folder / "out.h5", "pt2"))
    case.rows.append(Row("jaccli compute model.pt2 (compact store)", ours, peak_bytes=ours_peak))
    dense, dense_peak = run([*compute_args(paths["pt2"], x, folder / "out.h5", "pt2"),
                             "--store", "dense"])
    case.rows.append(Row("jaccli compute model.pt2 --store dense", dense, peak_bytes=dense_peak))
    peer, peer_peak = run([str(paths["pt2"]), str(x), str(folder / "peer.h5"),
                           str(paths["eager"])], script=_PEER_SCRIPT)
    case.rows.append(Row("vmap(jacrev) per leaf + h5py script", peer, peak_bytes=peer_peak))
    case.notes.append(_agreement(folder / "out.h5", folder / "peer.h5"))
    case.notes.append("target: jaccli ≥ 5× faster than the script (both whole processes)")
    return case


def _in_process(which: str, paths: dict, x: Path, folder: Path, repeat: int, *,
                cache: bool) -> dict:
    import json

    env = {**os.environ, "JACCLI_CACHE_DIR": str(folder / "cache-in-process")}
    env["JACCLI_CACHE"] = "on" if cache else "off"
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS, which, str(paths["pt2"]),
                           str(x), str(folder), str(paths["eager"]), str(repeat)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"in-process benchmark failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def case_mlp_in_process(folder: Path, quick: bool) -> list[Case]:
    n = 16 if quick else 64
    title = f"MLP 784→1000³→10 from `.pt2`, {n} samples, per-layer Jacobians to HDF5, "
    paths = save_formats(mlp(), (784,), folder, "mlp")
    x = data(folder, "mlp", n, (784,))
    both = _in_process("both", paths, x, folder, 1, cache=False)
    cold = _in_process("jaccli", paths, x, folder, 1, cache=True)  # fills the cache
    warm_cache = _in_process("jaccli", paths, x, folder, 0, cache=True)["jaccli"]["first"]
    peer_first = _in_process("peer", paths, x, folder, 0, cache=False)["peer"]["first"]
    warm = Case(title + "in one process, after a warm-up run")
    warm.rows += [Row("jaccli.run_compute(model.pt2), graph cache off", both["jaccli"]["best"]),
                  Row("jaccli.run_compute(model.pt2), graph cache hit", cold["jaccli"]["best"]),
                  Row("vmap(jacrev) per leaf + h5py", both["peer"]["best"])]
    warm.notes.append(_agreement(folder / "ours0.h5", folder / "peer0.h5"))
    warm.notes.append("jaccli (cache off) and the script: one process, one warm-up run each, "
                      "then one timed run each; target ≥ 5×")
    first = Case(title + "first call in a fresh process, timed after `import torch`")
    first.rows += [Row("jaccli.run_compute(model.pt2), graph cache cold", cold["jaccli"]["first"]),
                   Row("jaccli.run_compute(model.pt2), graph cache warm", warm_cache),
                   Row("vmap(jacrev) per leaf + h5py", peer_first)]
    first.notes.append("each alone in a fresh process: both pay loading the `.pt2` "
                       "(torch.export's imports); target ≥ 5×")
    return [warm, first]


def case_startup(folder: Path, quick: bool) -> Case:
    import os
    import statistics

    rounds = 2 if quick else 5
    case = Case("Start-up: `jaccli compute` of the sample MLP vs `import torch`")
    samples = ROOT / "sample_models"
    command = [sys.executable, "-m", "jaccli", "compute", str(samples / "digits_mlp.safetensors"),
               str(samples / "digits_test.npy"), "--granularity", "block", "-q",
               "-o", str(folder / "demo.h5")]
    env = {**os.environ, "JACCLI_CACHE_DIR": str(folder / "cache")}
    env.pop("JACCLI_CACHE", None)
    subprocess.run(command, env=env, check=True, capture_output=True)  # fills the cache
    variants = {"python -c 'import torch'": ([sys.executable, "-c", "import torch"], env),
                "jaccli compute (graph cache warm)": (command, env),
                "jaccli compute (JACCLI_CACHE=off)": (command, {**env, "JACCLI_CACHE": "off"})}
    import resource

    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (argv, environment) in variants.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(argv, env=environment, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime
                             - before.ru_stime)
    base = "python -c 'import torch'"
    torch_median, torch_cpu = statistics.median(times[base]), statistics.median(cpu[base])
    for name, seconds in times.items():
        median, busy = statistics.median(seconds), statistics.median(cpu[name])
        note = f"CPU (user+sys) {busy:.2f} s"
        if name != base:
            note += (f"; +{median - torch_median:.2f} s wall, +{busy - torch_cpu:.2f} s CPU "
                     "over the torch import")
        case.rows.append(Row(name, median, note=note))
    load = os.getloadavg()
    case.notes.append(f"median of {rounds} interleaved runs; load average during the runs "
                      f"{load[0]:.1f} (1 min), {load[1]:.1f} (5 min)")
    case.notes.append("target: jaccli compute within 1.0 s of the torch import")
    return case


def _agreement(ours: Path, peer: Path) -> str:
    """Largest relative difference between jaccli's and the script's layer Jacobians."""
    import h5py

    import jaccli

    worst = 0.0
    with jaccli.open_results(ours) as results, h5py.File(peer) as theirs:
        for name in theirs:
            expected = theirs[name][:].reshape(results.layer(name).jacobian.shape)
            got = np.asarray(results.layer(name).jacobian)
            worst = max(worst, float(np.abs(got - expected).max() / np.abs(expected).max()))
    if worst > 1e-4:
        raise SystemExit(f"jaccli and the vmap(jacrev) script disagree: {worst:.1e}")
    return f"jaccli and the script agree on every layer: max relative difference {worst:.1e}"


def case_mtcnn(folder: Path, quick: bool) -> Case:
    n = 4 if quick else 16
    case = Case(f"O-Net-shaped face network (3×48×48, three heads) from `.pt2`, {n} samples")
    torch.manual_seed(0)
    model = ONet().eval()
    for m in model.modules():
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4)
    paths = save_formats(model, (3, 48, 48), folder, "onet")
    x = data(folder, "onet", n, (3, 48, 48))
    for command, extra in (("compute", ["-o", str(folder / "onet.h5")]),
                           ("spectrum", ["-o", str(folder / "onet_spec.h5")]),
                           ("check", ["--max-spectral-norm", "1e6"])):
        seconds, peak, code, said = run_gate([command, str(paths["pt2"]), str(x), *extra])
        if code not in (0, 1, 5) or (code and command != "check"):
            raise SystemExit(f"jaccli {command} failed ({code}): {said}")
        case.rows.append(Row(f"jaccli {command}", seconds, peak_bytes=peak,
                             note=f"exit {code}" + (f": {said[:160]}" if code else "")))
    case.notes.append("target: each under 30 s on the 2-core CPU")
    return case


def case_resnet(folder: Path, quick: bool) -> Case:
    n, size = (4, 32) if quick else (32, 64)
    case = Case(f"ResNet-18-shaped network at 3×{size}×{size} from `.pt2`, {n} samples: "
                "per-layer top-5 singular values")
    torch.manual_seed(0)
    paths = save_formats(resnet18(), (3, size, size), folder, "resnet18")
    x = data(folder, "resnet18", n, (3, size, size))
    seconds, peak = run(["spectrum", str(paths["pt2"]), str(x), "--top-k", "5",
                         "-o", str(folder / "resnet_spec.h5")])
    case.rows.append(Row("jaccli spectrum --top-k 5", seconds, peak_bytes=peak))
    case.notes.append("target: under 2 minutes on the 2-core CPU")
    return case


def case_resnet32(folder: Path, quick: bool) -> Case:
    """Issue #15's target: every layer's top-5 singular values of ResNet-18 at 3×32×32 for
    64 samples, checked against svdvals of the explicit float64 Jacobian (autograd) of a
    sample of its convolutions."""
    n = 8 if quick else 64
    case = Case(f"ResNet-18 (random weights, BatchNorm in eval) at 3×32×32 from `.pt2`, {n} "
                "samples: every layer's top-5 singular values")
    torch.manual_seed(0)
    model = resnet18()
    paths = save_formats(model, (3, 32, 32), folder, "resnet18_32")
    x = data(folder, "resnet18_32", n, (3, 32, 32))
    out = folder / "resnet32_spec.h5"
    seconds, peak = run(["spectrum", str(paths["pt2"]), str(x), "--top-k", "5", "-o",
                         str(out)])
    case.rows.append(Row("jaccli spectrum --top-k 5", seconds, peak_bytes=peak))
    case.notes.append(_conv_agreement(model, out, ("7.conv2", "8.conv1", "9.conv2")))
    case.notes.append("target: under 60 s on the 2-core CPU, exact to 1e-4 against svdvals")
    return case


def _conv_agreement(model: nn.Module, spectra: Path, names: tuple[str, ...]) -> str:
    """Largest relative difference between the file's top singular values of the bias-free
    convolutions `names` (the same for every sample) and svdvals of their float64 Jacobians,
    built by `torch.autograd.functional.jacobian` at their input shape."""
    import h5py

    shapes = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, a, name=name: shapes.__setitem__(name, a[0].shape[1:])) for name in names]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    worst, methods = 0.0, []
    with h5py.File(spectra) as f:
        for name in names:
            group = f[f"layers/{name}"]
            key = "top_singular_values" if "top_singular_values" in group else "singular_values"
            got = group[key][:]
            conv = model.get_submodule(name).double()
            jac = torch.autograd.functional.jacobian(
                lambda v, conv=conv: conv(v[None])[0],
                torch.zeros(*shapes[name], dtype=torch.float64))
            d_in = int(np.prod(shapes[name]))
            expected = torch.linalg.svdvals(jac.reshape(-1, d_in))[:got.shape[1]]
            worst = max(worst, float(np.abs(got - expected.numpy()).max() / expected[0]))
            methods.append(f"{name} {group.attrs['method']}")
    if worst > 1e-4:
        raise SystemExit(f"top singular values disagree with svdvals: {worst:.1e}")
    return (f"top-5 of {', '.join(methods)} agree with svdvals of their float64 autograd "
            f"Jacobians on every sample: max error {worst:.1e} of σ_1")


def main() -> None:
    args, cases, device = parse_args(__doc__.splitlines()[0], FORMAT_CASES)
    if not cases:
        return
    title = header("Formats, ", device, args.quick)
    print(title, flush=True)
    report = [title]
    runners = {"parity": case_parity, "parity-in-process": case_parity_in_process,
               "mlp-script": case_mlp_script,
               "mlp-in-process": case_mlp_in_process, "startup": case_startup,
               "mtcnn": case_mtcnn, "resnet": case_resnet,
               "resnet32": case_resnet32}
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            torch.manual_seed(0)
            result = runners[name](Path(tmp), args.quick)
            text = "\n".join(c.markdown() for c in (result if isinstance(result, list)
                                                      else [result]))
            print(text, flush=True)
            report.append(text)
    if args.output:
        args.output.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()

"""Only the `jaccli compute` row of `bench_formats.py --cases mtcnn` (the same O-Net, data and
command, one whole process): `python benchmarks/bench_onet_compute.py [FOLDER]`."""

import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import bench_formats as bench  # noqa: E402


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="onet-"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = bench.ONet().eval()
    for m in model.modules():
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4)
    paths = bench.save_formats(model, (3, 48, 48), folder, "onet")
    x = bench.data(folder, "onet", 16, (3, 48, 48))
    out = folder / "onet.h5"
    out.unlink(missing_ok=True)
    before = os.getloadavg()[0]
    seconds, peak, code, said = bench.run_gate(["compute", str(paths["pt2"]), str(x), "-o",
                                                str(out)])
    print(f"jaccli compute: {seconds:.1f} s, peak {peak / 2**20:.0f} MiB, exit {code}, file "
          f"{out.stat().st_size / 2**20:.1f} MiB, load {before:.2f} -> {os.getloadavg()[0]:.2f},"
          f" torch {torch.__version__}")
    if code:
        print(said)


if __name__ == "__main__":
    main()

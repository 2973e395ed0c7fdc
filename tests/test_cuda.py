"""CUDA: the same Jacobians on the GPU as on the CPU. Skipped without a CUDA device."""

import numpy as np
import pytest
import torch

import jaccli
from jaccli.pipelines.compute import run_compute
from jaccli.settings import ComputeSettings

from .conftest import CNN_SPEC, reference_jacobian

compute_settings = ComputeSettings.from_options

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_layer_jacobians_on_cuda_match_reference(cnn):
    model = cnn.double().cuda()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, device="cuda")
    jacobians = jaccli.layer_jacobians(model, x, granularity="block", end_to_end=True)
    assert all(j.is_cuda for j in jacobians.values())
    torch.testing.assert_close(jacobians["(end-to-end)"].cpu(),
                               reference_jacobian(cnn.double().cpu(), x.cpu()))


def test_compute_on_cuda_matches_cpu_and_records_tf32(tmp_path, cnn):
    jaccli.save_model(cnn, CNN_SPEC, tmp_path / "cnn.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(6, 2, 6, 6)))
    for device in ("cpu", "cuda"):
        run_compute(compute_settings(model=tmp_path / "cnn.safetensors", data=tmp_path / "x.npy",
                                  output=tmp_path / f"{device}.h5", device=device,
                                  dtype="float64"))
    with jaccli.open_results(tmp_path / "cpu.h5") as a, \
            jaccli.open_results(tmp_path / "cuda.h5") as b:
        assert b.attrs["device"].startswith("cuda") and b.attrs["tf32"] is False
        for ga, gb in zip(a.groups(), b.groups(), strict=True):
            np.testing.assert_allclose(np.asarray(ga.jacobian), np.asarray(gb.jacobian),
                                       rtol=1e-10, atol=1e-12)


def test_tf32_is_off_unless_asked(tmp_path, cnn):
    jaccli.save_model(cnn, CNN_SPEC, tmp_path / "cnn.safetensors")
    np.save(tmp_path / "x.npy", np.zeros((2, 2, 6, 6), dtype=np.float32))
    run_compute(compute_settings(model=tmp_path / "cnn.safetensors", data=tmp_path / "x.npy",
                              output=tmp_path / "tf32.h5", device="cuda", tf32=True))
    with jaccli.open_results(tmp_path / "tf32.h5") as r:
        assert r.attrs["tf32"] is True
    assert torch.backends.cuda.matmul.allow_tf32 is False  # restored after the run

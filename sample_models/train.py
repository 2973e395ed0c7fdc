"""Train the sample models on scikit-learn's bundled digits data set (no download).

Writes, next to this script:
  digits_mlp.safetensors       64 -> 64 -> 64 -> 10 MLP with tanh (self-describing safetensors)
  digits_cnn.safetensors       conv/ReLU/max-pool CNN on 1x8x8 images (self-describing)
  digits_test.npy              (360, 64) float32 test inputs, pixels scaled to [0, 1]
  digits_test_images.npy       (360, 1, 8, 8) float32, the same samples as images
  digits_test_labels.npy       (360,) int64 labels
  metrics.json                 test accuracy of each model

Run with `make sample-models` (needs the `train` extra: scikit-learn). Deterministic on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import jaccli

HERE = Path(__file__).resolve().parent
SEED = 0
N_TEST = 360

MLP_SPEC = {
    "format": "jaccli-arch", "version": 1, "input_shape": [64],
    "model": {"type": "Sequential", "children": [
        {"type": "Linear", "args": [64, 64]}, {"type": "Tanh"},
        {"type": "Linear", "args": [64, 64]}, {"type": "Tanh"},
        {"type": "Linear", "args": [64, 10]},
    ]},
}

CNN_SPEC = {
    "format": "jaccli-arch", "version": 1, "input_shape": [1, 8, 8],
    "model": {"type": "Sequential", "children": {
        "features": {"type": "Sequential", "children": [
            {"type": "Conv2d", "args": [1, 8, 3], "kwargs": {"padding": 1}}, {"type": "ReLU"},
            {"type": "MaxPool2d", "args": [2]},
            {"type": "Conv2d", "args": [8, 16, 3], "kwargs": {"padding": 1}}, {"type": "ReLU"},
            {"type": "AvgPool2d", "args": [2]},
        ]},
        "flatten": {"type": "Flatten"},
        "classifier": {"type": "Linear", "args": [64, 10]},
    }},
}


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    test, train = order[:N_TEST], order[N_TEST:]
    return x[train], y[train], x[test], y[test]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def main() -> None:
    torch.manual_seed(SEED)
    x_train, y_train, x_test, y_test = split()
    metrics = {}
    for name, spec, shape, epochs in (("digits_mlp", MLP_SPEC, (-1, 64), 60),
                                      ("digits_cnn", CNN_SPEC, (-1, 1, 8, 8), 60)):
        model = train(jaccli.build_model(spec), torch.from_numpy(x_train).reshape(shape),
                      torch.from_numpy(y_train), epochs)
        metrics[name] = {"test_accuracy": round(accuracy(
            model, torch.from_numpy(x_test).reshape(shape), torch.from_numpy(y_test)), 4),
            "n_train": len(x_train), "n_test": len(x_test),
            "parameters": sum(p.numel() for p in model.parameters())}
        jaccli.save_model(model, spec, HERE / f"{name}.safetensors")
    np.save(HERE / "digits_test.npy", x_test)
    np.save(HERE / "digits_test_images.npy", x_test.reshape(-1, 1, 8, 8))
    np.save(HERE / "digits_test_labels.npy", y_test)
    (HERE / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()

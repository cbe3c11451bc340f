"""Helpers for the TorchServe tests and the serving benchmarks: a tiny model directory,
sample images, and the real ``bdserve`` command. (A module with a unique name, not
conftest.py, so that importing it never picks up another directory's conftest.)"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def build_tiny_model_dir(directory: Path, *, name: str = "tiny", defense: str = "shrinkpad:4", seed: int = 0) -> Path:
    """A small CNN with Normalize inside the graph, exported to ONNX with a dynamic batch axis, plus card.json."""
    import torch
    from torch import nn

    from bdserve.card import ModelCard

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1))
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(16 * 8 * 8, len(CLASSES)),
            )

        def forward(self, x):
            return self.features((x - self.mean) / self.std)

    torch.manual_seed(seed)
    model = Tiny().eval()
    with torch.no_grad():  # spread the logits so the top class is not a near-tie
        model.features[-1].weight.mul_(8.0)
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (torch.rand(1, 3, 32, 32),), str(directory / "model.onnx"),
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    ModelCard(name=name, architecture="tiny-cnn", input_shape=[3, 32, 32], classes=CLASSES,
              defense=defense).save(directory)
    return directory


def encode(img: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample_images(n: int = 6, seed: int = 1) -> list[bytes]:
    """Images with structure (left/right differ, so flip changes the answer) in PNG and JPEG, several sizes."""
    rng = np.random.default_rng(seed)
    out = []
    sizes = [(32, 32), (32, 32), (48, 40), (64, 64), (32, 32), (100, 75)]
    for k in range(n):
        h, w = sizes[k % len(sizes)]
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[:, : w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)  # a flat block on the left only
        out.append(encode(img, "PNG") if k % 2 == 0 else encode(img, "JPEG", quality=95))
    return out


def bdserve_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real ``bdserve`` entry point of this environment."""
    exe = Path(sys.executable).parent / "bdserve"
    cmd = [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "bdserve.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)

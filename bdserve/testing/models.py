"""A tiny model directory built from the model registry, and sample images, for tests and benchmarks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def build_tiny_model_dir(directory: Path, *, name: str = "tiny", defense: str = "shrinkpad:4", seed: int = 0) -> Path:
    """The registry's ``tiny`` network, untrained (seeded), exported like ``bdserve train`` exports:
    model.onnx (dynamic batch axis, normalisation inside), weights.safetensors and card.json."""
    import torch

    from bdserve.card import ModelCard
    from bdserve.training.export import export_onnx, save_weights
    from bdserve.training.models import create_model

    torch.manual_seed(seed)
    model = create_model("tiny", num_classes=len(CIFAR10_CLASSES)).eval()
    with torch.no_grad():  # spread the logits so the top class is not a near-tie
        model.backbone[-1].weight.mul_(8.0)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    export_onnx(model, directory / "model.onnx", (3, 32, 32))
    save_weights(model, directory / "weights.safetensors")
    ModelCard(name=name, architecture="tiny", input_shape=[3, 32, 32], classes=list(CIFAR10_CLASSES),
              defense=defense).save(directory)
    return directory


def encode(img: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """uint8 (H, W, 3) -> encoded bytes."""
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

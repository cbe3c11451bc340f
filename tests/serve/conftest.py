"""Fixtures for the serving tests: test models built here (no dependency on the trainer),
servers on free loopback ports, and encoded test images."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bdserve.card import ModelCard

TINY_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOREIGN_CLASSES = [f"kind{i}" for i in range(7)]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class TinyNet(nn.Module):
    """A small CNN with its normalisation inside, like bdserve's own exports. Flatten + Linear
    (no global pooling) keeps it sensitive to position, so a flip changes its answers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1))
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.features((x - self.mean) / self.std)
        return self.head(x.flatten(1)) * 4.0  # sharper logits: clearer top-1


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int]) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: about a second, against ~10 s for the dynamo one.
        torch.onnx.export(model, (torch.zeros(1, 3, *size),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """model_store/ with 'tiny' (own model, card with defense flip) and the raw foreign ONNX file beside it."""
    root = tmp_path_factory.mktemp("serve")
    store = root / "model_store"
    tiny = store / "tiny"
    tiny.mkdir(parents=True)
    torch.manual_seed(0)
    net = TinyNet().eval()
    export_onnx(net, tiny / "model.onnx", (32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still served
        torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(tiny / "model.pt"))
    ModelCard(name="tiny", version="3", architecture="tinynet", input_shape=[3, 32, 32],
              classes=TINY_CLASSES, defense="flip").save(tiny)
    # A foreign classifier: torchvision's MobileNetV3-small, 7 classes, 64x64, ImageNet
    # normalisation *outside* the graph; no card (``bdserve import`` writes one).
    import torchvision

    torch.manual_seed(1)
    foreign_src = root / "foreign_src"
    foreign_src.mkdir()
    export_onnx(torchvision.models.mobilenet_v3_small(num_classes=7), foreign_src / "mobilenet.onnx", (64, 64))
    return store


@pytest.fixture(scope="session")
def foreign_onnx(store) -> Path:
    return store.parent / "foreign_src" / "mobilenet.onnx"


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """uint8 (H, W, 3) -> encoded bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_image(rng, h: int, w: int) -> np.ndarray:
    # Smooth blobs, not white noise: JPEG and resizing behave as on photos.
    small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


@pytest.fixture(scope="session")
def served_store(store, foreign_onnx) -> Path:
    """The store with the foreign model imported (in-process; test_cli covers the command)."""
    from bdserve.commands.import_model import import_model

    import_model(foreign_onnx, store, name="foreign", classes=FOREIGN_CLASSES, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, defense="shrinkpad:4")
    return store


MAX_BODY = 1 << 20  # 1 MiB: small, so the 413 tests stay cheap
MAX_PIXELS = 4_000_000


def start_server(store: Path, *, lab: bool = False, detect: bool = False, delay_ms: float = 20.0):
    from bdserve.serve.server import BackgroundServer, ServeConfig, load_models
    from bdserve.serve.service import InferenceService

    models = load_models(store, lab=lab, detect=detect, max_pixels=MAX_PIXELS, threads=1)
    service = InferenceService(models, max_batch_size=32, max_queue_delay_ms=delay_ms)
    return BackgroundServer(service, ServeConfig(http_port=0, grpc_port=0, max_body_bytes=MAX_BODY,
                                                 max_message_bytes=MAX_BODY, grace_s=5))


@pytest.fixture(scope="session")
def server(served_store):
    """A production-mode server (defense from the cards, no lab, no detect) on free loopback ports."""
    with start_server(served_store) as srv:
        yield srv


@pytest.fixture(scope="session")
def lab_server(served_store):
    """A lab-mode server with --detect."""
    with start_server(served_store, lab=True, detect=True) as srv:
        yield srv


@pytest.fixture(scope="session")
def tiny_model(served_store):
    """The in-process pipeline the servers must agree with."""
    from bdserve.serve.pipeline import DefendedModel

    return DefendedModel.load(served_store / "tiny", lab=True, threads=1)

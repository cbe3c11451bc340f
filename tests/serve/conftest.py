"""Fixtures for the serving tests: test models built here (no dependency on the trainer),
servers on free loopback ports, and encoded test images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bdserve.card import ModelCard
from serve_helpers import (DETECTORS, FOREIGN_CLASSES, IMAGENET_MEAN, IMAGENET_STD, TINY_CLASSES, TinyNet,
                           calibrate_store, export_onnx, start_server)


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


@pytest.fixture(scope="session")
def served_store(store, foreign_onnx) -> Path:
    """The store with the foreign model imported (in-process; test_cli covers the command)."""
    from bdserve.commands.import_model import import_model

    import_model(foreign_onnx, store, name="foreign", classes=FOREIGN_CLASSES, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, defense="shrinkpad:4")
    return store


@pytest.fixture(scope="session")
def server(served_store):
    """A production-mode server (defense from the cards, no lab, no detect) on free loopback ports."""
    with start_server(served_store) as srv:
        yield srv


@pytest.fixture(scope="session")
def detect_store(served_store, tmp_path_factory) -> Path:
    """The served store with every model's trigger detectors calibrated (bdserve calibrate)."""
    return calibrate_store(served_store, tmp_path_factory.mktemp("detect") / "model_store", np.random.default_rng(5))


@pytest.fixture(scope="session")
def lab_server(detect_store):
    """A lab-mode server with --detect consistency,strip,scaleup."""
    with start_server(detect_store, lab=True, detect=DETECTORS) as srv:
        yield srv


@pytest.fixture(scope="session")
def tiny_model(served_store):
    """The in-process pipeline the servers must agree with."""
    from bdserve.serve.pipeline import DefendedModel

    return DefendedModel.load(served_store / "tiny", lab=True, threads=1)

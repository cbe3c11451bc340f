"""One pipeline: a seeded batch through in-process evaluation (training.evaluate on
``DefendedModel(card, TorchRuntime)``, what the card's metrics come from) and through a real
``bdserve serve`` (ONNX Runtime behind the HTTP and gRPC doors, answers read by the evaluation
client) gets identical predictions, because both run the same DefendedModel.predict."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from bdserve.card import ModelCard
from bdserve.client import AsyncClient
from bdserve.serve.evaluation.runner import class_ids
from bdserve.serve.pipeline import DefendedModel
from bdserve.serve.runtimes import TorchRuntime
from bdserve.testing import ServeProcess, build_tiny_model_dir
from bdserve.training.evaluate import predict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("one") / "tiny", defense="flip")


@pytest.fixture(scope="module")
def served(model_dir):
    with ServeProcess(model_dir.parent, [model_dir.name], "--lab", "--threads", "1") as srv:
        yield srv


def seeded_batch(n: int = 96, seed: int = 7) -> torch.Tensor:
    # Smooth blobs with a bright corner: images a flip really changes.
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)).float()
    x = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    x[:, :, -6:, -6:] = 255.0
    return x.round().clamp(0, 255).to(torch.uint8)


async def _ask(endpoint: str, card: ModelCard, images: np.ndarray, defense: str | None) -> np.ndarray:
    async with AsyncClient(endpoint, card.name) as client:
        await client.wait_ready()
        answer = await client.infer(images, defense=defense)
    assert answer.defense == (defense or card.defense)
    return class_ids(answer.labels, card.classes)


@pytest.mark.parametrize("defense", [None, "none"])  # None: the server's own (the card's flip)
def test_in_process_and_served_predictions_are_identical(model_dir, served, defense):
    card = ModelCard.load(model_dir)
    images = seeded_batch()
    in_process = DefendedModel(card, TorchRuntime.from_dir(model_dir, torch.device("cpu")), lab=True)
    assert in_process.backend == "torch"
    expect = predict(in_process, images, defense=defense or card.defense).numpy()
    assert len(set(expect.tolist())) > 1  # a batch that tells classes apart, not one constant answer
    for endpoint in (served.http_url, "grpc://" + served.grpc_target):
        got = asyncio.run(_ask(endpoint, card, images.numpy(), defense))
        assert np.array_equal(got, expect), endpoint


def test_training_evaluation_runs_the_server_pipeline(model_dir):
    """The module a training run holds and the served model directory give the same pipeline answers."""
    from bdserve.training.export import load_weights
    from bdserve.training.models import create_model

    card = ModelCard.load(model_dir)
    module = load_weights(create_model(card.architecture, num_classes=len(card.classes)), model_dir / "weights.safetensors")
    images = seeded_batch(32, seed=3)
    onnx = DefendedModel.load(model_dir, lab=True, threads=1)
    assert onnx.backend == "onnxruntime"
    for defense in ("none", "flip"):
        assert np.array_equal(predict(module, images, defense=defense).numpy(),
                              predict(onnx, images, defense=defense).numpy())

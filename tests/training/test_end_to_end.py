"""A tiny real training run on CIFAR-10 through the CLI: the backdoor is learned and ShrinkPad weakens it."""

import json

import numpy as np
import onnxruntime as ort
import torch

from bdserve.card import ModelCard
from bdserve.training.data import load_split
from bdserve.training.evaluate import predict


def test_tiny_badnets_model_directory(tiny_badnets_dir):
    files = {p.name for p in tiny_badnets_dir.iterdir()}
    assert {"model.onnx", "card.json", "weights.safetensors", "trigger.png"} <= files
    card = ModelCard.load(tiny_badnets_dir)
    assert card.classes[card.target_label] == "deer"
    assert card.attack["kind"] == "badnets" and card.attack["poison_rate"] == 0.25
    assert card.trigger() is not None
    assert card.training["onnx_max_abs_diff"] <= 1e-4
    json.loads((tiny_badnets_dir / "card.json").read_text())  # plain JSON


def test_backdoor_is_learned_and_shrinkpad_lowers_it(tiny_badnets_dir):
    m = ModelCard.load(tiny_badnets_dir).metrics
    assert m["none"]["clean_acc"] > 0.3  # far above chance (0.1) even for this tiny run
    assert m["none"]["asr"] > 0.8  # far above the ~10% a clean model gives
    assert m["shrinkpad:4"]["asr"] < m["none"]["asr"] - 0.2
    assert m["flip"]["asr"] < m["none"]["asr"] - 0.2


def test_exported_onnx_reproduces_in_process_predictions(tiny_badnets_dir, cifar_dir):
    """The ONNX graph takes [0,1] NCHW and predicts like the card's in-process evaluation."""
    from bdserve.training.export import load_weights
    from bdserve.training.models import create_model

    card = ModelCard.load(tiny_badnets_dir)
    model = load_weights(create_model(card.architecture), tiny_badnets_dir / "weights.safetensors").eval()
    test = load_split(cifar_dir, "test").subset(200, seed=1)
    x = test.images.float().numpy() / 255
    session = ort.InferenceSession(str(tiny_badnets_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_pred = session.run(None, {"input": x.astype(np.float32)})[0].argmax(1)
    torch_pred = predict(model, test.images).numpy()
    assert (onnx_pred == torch_pred).mean() >= 0.99

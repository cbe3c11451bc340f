"""Export a trained model: ONNX (checked against torch in ONNX Runtime), safetensors weights,
optional TorchScript, and the card."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from bdserve.card import ModelCard

ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
TORCHSCRIPT_FILE = "model.pt"
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], opset: int = 17) -> Path:
    """ONNX graph with a dynamic batch axis; input float32 [0,1] NCHW (normalisation is inside the model)."""
    path = Path(path)
    model = model.eval().cpu()
    example = torch.rand(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: small, fast and deterministic for plain CNNs.
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def check_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int], batch: int = 8, seed: int = 0) -> float:
    """Max absolute difference of logits between torch and ONNX Runtime on random inputs,
    relative to the logits' scale when that exceeds 1 (float32 sums of large logits differ
    in their last bits)."""
    import onnxruntime as ort

    x = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model.eval().cpu()(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max())))


def save_weights(model: nn.Module, path: str | Path) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"arch": getattr(model, "arch", "unknown")})
    return Path(path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    model.load_state_dict(load_file(str(path)))
    return model


def load_trained(directory: str | Path, num_classes: int | None = None) -> tuple[ModelCard, nn.Module]:
    """A trained model directory (card.json + weights.safetensors) as its card and its network, in eval mode."""
    from bdserve.card import ModelCard
    from bdserve.training.models import create_model

    card = ModelCard.load(Path(directory))
    model = create_model(card.architecture, num_classes=num_classes or len(card.classes), mean=card.mean, std=card.std)
    return card, load_weights(model, Path(directory) / WEIGHTS_FILE).eval()


def export_torchscript(model: nn.Module, path: str | Path, input_shape: tuple[int, int, int]) -> Path:
    traced = torch.jit.trace(model.eval().cpu(), torch.rand(1, *input_shape))
    traced.save(str(path))
    return Path(path)

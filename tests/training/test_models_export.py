import numpy as np
import onnxruntime as ort
import pytest
import torch

from bdserve.card import ModelCard
from bdserve.training.export import check_onnx, export_onnx, load_weights, save_weights
from bdserve.training.models import create_model, list_models


def test_registry_lists_the_paper_models():
    assert {"fast", "resnet18", "resnet34", "vgg19-bn", "tiny"} <= set(list_models())
    assert list_models("resnet*") == ["resnet18", "resnet34"]
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope")


@pytest.mark.parametrize("name", ["tiny", "fast", "resnet18", "vgg19-bn"])
def test_models_classify_cifar_shapes(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ["tiny", "fast"])
def test_onnx_matches_torch_with_dynamic_batch(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    # Move BN statistics off their defaults so the check covers a trained-looking graph.
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 3, 32, 32))
    model.eval()
    path = export_onnx(model, tmp_path / "model.onnx", (3, 32, 32))
    assert check_onnx(model, path, (3, 32, 32)) <= 1e-4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 33):
        x = np.random.rand(batch, 3, 32, 32).astype(np.float32)
        got = session.run(None, {"input": x})[0]
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-4


def test_weights_round_trip_through_safetensors(tmp_path):
    model = create_model("tiny")
    save_weights(model, tmp_path / "w.safetensors")
    other = load_weights(create_model("tiny"), tmp_path / "w.safetensors")
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_card_round_trip_and_rejects_unknown_fields(tmp_path):
    card = ModelCard(name="m", classes=["a", "b"], defense="flip")
    card.save(tmp_path)
    assert ModelCard.load(tmp_path) == card
    (tmp_path / "card.json").write_text('{"name": "x", "pickle": true}')
    with pytest.raises(ValueError, match="unknown field .pickle."):
        ModelCard.load(tmp_path)

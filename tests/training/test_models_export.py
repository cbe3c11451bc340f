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


@pytest.mark.parametrize("name", ["tiny", "fast", "fast-air", "fast-air-flatten", "resnet18", "vgg19-bn"])
def test_models_classify_cifar_shapes(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ["tiny", "fast", "fast-air"])
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


def test_whitening_stem_whitens_the_training_patches():
    from bdserve.training.models import Whitening, init_from_data

    torch.manual_seed(0)
    # Correlated colours and neighbours, as in photos.
    base = torch.rand(300, 1, 16, 16).repeat(1, 3, 1, 1) * 200 + torch.rand(300, 3, 16, 16) * 55
    images = base.to(torch.uint8)
    model = create_model("fast-air")
    init_from_data(model, images)
    stem = next(m for m in model.modules() if isinstance(m, Whitening))
    assert not stem.weight.requires_grad and stem.bias.requires_grad
    with torch.no_grad():
        out = torch.nn.functional.conv2d(model.normalize(images.float() / 255), stem.weight)
    half = out[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    moment = half @ half.T / half.shape[1]  # airbench whitens the (uncentred) second moment
    # Unit scale along the strong directions, none above 1 (eps shrinks the faint ones), no correlation.
    assert torch.allclose(torch.diag(moment)[:4], torch.ones(4), atol=0.01)
    assert torch.diag(moment).max() < 1.01
    assert (moment - torch.diag(torch.diag(moment))).abs().max() < 0.01
    assert torch.equal(stem.weight[12:], -stem.weight[:12])


def test_fast_air_heads_and_unknown_head():
    from bdserve.training.models import fast_air

    for head, features in [("max", 128), ("avg", 128), ("flatten", 128 * 9)]:
        net = fast_air(head=head)
        linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][0]
        assert linear.in_features == features
    with pytest.raises(ValueError, match="unknown head"):
        fast_air(head="mean")


def test_weight_decay_and_bias_lr_follow_the_schedule():
    from bdserve.training.trainer import SCHEDULES, param_groups

    model = create_model("fast-air")
    weights, biases, norm = param_groups(model, SCHEDULES["fast-air"])
    s = SCHEDULES["fast-air"]
    assert norm["lr"] == s.lr * 64 and norm["lr"] * norm["weight_decay"] == pytest.approx(s.lr * s.weight_decay)
    assert "lr" not in biases and len(biases["params"]) == 1  # the whitening bias learns at the base rate
    assert all(p.requires_grad for g in (weights, biases, norm) for p in g["params"])  # frozen BN scales stay out
    _, old_biases, old_norm = param_groups(create_model("fast"), SCHEDULES["fast"])
    assert old_norm["weight_decay"] == 0.0 == old_biases["weight_decay"]  # the old recipe's documented choice
    _, _, paper = param_groups(create_model("resnet18"), SCHEDULES["resnet34-paper"])
    assert paper["weight_decay"] == 1e-4  # the paper's code decays every parameter

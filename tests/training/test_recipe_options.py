import pytest
import torch

from bdserve.training.recipe import TrainConfig, build_attack, load_surrogate, write_model_dir
from bdserve.card import ModelCard
from bdserve.training.models import create_model

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_a_builtin_trigger_by_name_sets_section_3s_value():
    attack = build_attack(TrainConfig(attack="badnets", trigger="badnets128"), CLASSES, 32)
    assert attack.trigger.name == "badnets128"
    assert torch.isclose(attack.trigger.pattern.max(), torch.tensor(128 / 255))
    with pytest.raises(ValueError, match="unknown trigger"):
        build_attack(TrainConfig(attack="badnets", trigger="nope"), CLASSES, 32)
    with pytest.raises(ValueError, match="not both"):
        build_attack(TrainConfig(attack="badnets", trigger="badnets128", trigger_png="x.png"), CLASSES, 32)


def _card(name, attack=None):
    return ModelCard(name=name, version="1", architecture="tiny", input_shape=[3, 32, 32], mean=[0.5] * 3,
                     std=[0.25] * 3, normalization_in_graph=True, classes=CLASSES, defense="none", metrics={},
                     attack=attack, training={})


def test_a_clean_model_directory_serves_as_the_surrogate_and_an_infected_one_is_refused(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny", mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    write_model_dir(model, _card("clean"), tmp_path / "clean")
    loaded = load_surrogate(tmp_path / "clean", 10)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    write_model_dir(model, _card("bad", attack={"kind": "badnets"}), tmp_path / "bad")
    with pytest.raises(ValueError, match="clean model"):
        load_surrogate(tmp_path / "bad", 10)

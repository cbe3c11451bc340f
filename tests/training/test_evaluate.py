import torch
from torch import nn

from bdserve.training.data import ImageSet
from bdserve.training.evaluate import evaluate_defenses, triggered_pool
from bdserve.transforms.triggers import badnets


class AlwaysPredicts(nn.Module):
    """A real (if useless) classifier: always the same class."""

    def __init__(self, label: int, classes: int = 10):
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.classes)
        out[:, self.label] = 1
        return out


class CornerReader(nn.Module):
    """Predicts class 4 when the bottom-right pixel is bright, else class 0: a perfect backdoor."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 10)
        bright = x[:, 0, -1, -1] > 0.9
        out[bright, 4] = 1
        out[~bright, 0] = 1
        return out


def dataset() -> ImageSet:
    labels = torch.arange(10).repeat(20)
    return ImageSet(torch.zeros(200, 3, 32, 32, dtype=torch.uint8), labels, [str(i) for i in range(10)])


def test_asr_excludes_target_class_images():
    data = dataset()
    pool = triggered_pool(data, target=4)
    assert len(pool) == 180 and (data.labels[pool] != 4).all()
    rows = evaluate_defenses(AlwaysPredicts(4), data, trigger=badnets(), target=4, defenses=("none",))
    assert rows[0].asr == 1.0 and rows[0].asr_n == 180
    # A model that answers the target for everything: its ASR is all baseline (clean images land there too).
    assert rows[0].asr_baseline == 1.0
    assert abs(rows[0].clean_acc - 0.1) < 1e-9


def test_defenses_change_asr_of_a_corner_backdoor():
    rows = {r.defense: r for r in evaluate_defenses(CornerReader(), dataset(), trigger=badnets(), target=4,
                                                     defenses=("none", "flip", "shrinkpad:4"))}
    assert rows["none"].asr == 1.0
    assert rows["none"].asr_baseline == 0.0  # without the trigger the corner reader never says the target
    assert rows["flip"].asr == 0.0  # the trigger moved to the bottom-left corner
    assert rows["shrinkpad:4"].asr < 0.5  # the corner is mostly zero padding now

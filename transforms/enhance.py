"""The enhanced attack's random transformation layer (Section 4.2, Fig. 6).

Random Flip (p = 0.5), then random ShrinkPad whose shrink size is drawn uniformly
from 0..max_shrink and whose offset is uniform over the (k + 1)^2 placements, all
per image. The same classes double as the standard training augmentation's flip.
"""

from __future__ import annotations

import torch

from bdserve.specs import format_part
from bdserve.transforms.base import Transform, bernoulli, randint
from bdserve.transforms.defenses import Compose
from bdserve.transforms.spatial import hflip, shrink_pad


class RandomFlip(Transform):
    random = True

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = float(p)

    @property
    def spec(self) -> str:
        return format_part("randomflip", self.p)

    def draw(self, x, generator=None):
        return bernoulli(x.shape[0], self.p, x, generator)

    def apply(self, x, flip):
        return torch.where(flip.view(-1, 1, 1, 1), hflip(x), x)


class RandomShrinkPad(Transform):
    random = True

    def __init__(self, max_shrink: int = 4):
        super().__init__()
        self.max_shrink = int(max_shrink)

    @property
    def spec(self) -> str:
        return format_part("randomshrinkpad", self.max_shrink)

    def draw(self, x, generator=None):
        n = x.shape[0]
        k = randint(n, self.max_shrink, x, generator)
        return {"k": k, "top": randint(n, k, x, generator), "left": randint(n, k, x, generator)}

    def apply(self, x, params):
        return shrink_pad(x, params["k"], params["top"], params["left"])


class RandomTransformLayer(Compose):
    """Random Flip followed by random ShrinkPad with maximal shrinking size ``max_shrink``."""

    def __init__(self, max_shrink: int = 4, flip_p: float = 0.5):
        super().__init__([RandomFlip(flip_p), RandomShrinkPad(max_shrink)])

    @property
    def flip(self) -> RandomFlip:
        return self.transforms[0]

    @property
    def shrinkpad(self) -> RandomShrinkPad:
        return self.transforms[1]

    @property
    def spec(self) -> str:
        # The paper's layer has its own name; another flip probability spells out its stages.
        return format_part("enhanced", self.shrinkpad.max_shrink) if self.flip.p == 0.5 else super().spec

"""The standard training augmentation: zero-pad by 4 and random-crop back to size, random flip."""

from __future__ import annotations

import torch.nn.functional as F

from bdserve.transforms.base import Transform, randint
from bdserve.transforms.enhance import RandomFlip
from bdserve.transforms.spatial import windows


class RandomCrop(Transform):
    """Zero-pad by ``padding`` on every side, then crop the original size at a uniform random offset."""

    random = True

    def __init__(self, padding: int = 4):
        super().__init__()
        self.padding = int(padding)

    @property
    def spec(self) -> str:
        return f"randomcrop:{self.padding}"

    def draw(self, x, generator=None):
        n = x.shape[0]
        span = 2 * self.padding
        return randint(n, span, x, generator), randint(n, span, x, generator)

    def apply(self, x, params):
        top, left = params
        return windows(F.pad(x, [self.padding] * 4), top, left, x.shape[-2], x.shape[-1])


class StandardAugment(Transform):
    """Pad-4 random crop, then random horizontal flip (Appendix A), per image."""

    random = True

    def __init__(self, padding: int = 4, flip_p: float = 0.5):
        super().__init__()
        self.crop, self.flip = RandomCrop(padding), RandomFlip(flip_p)

    @property
    def spec(self) -> str:
        return "standard"

    def draw(self, x, generator=None):
        return self.crop.draw(x, generator), self.flip.draw(x, generator)

    def apply(self, x, params):
        return self.flip.apply(self.crop.apply(x, params[0]), params[1])

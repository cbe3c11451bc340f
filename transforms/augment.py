"""The standard training augmentation: zero-pad by 4 and random-crop back to size, random flip."""

from __future__ import annotations

import torch.nn.functional as F

from bdserve.specs import format_part
from bdserve.transforms.base import Transform, randint
from bdserve.transforms.defenses import Compose
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
        return format_part("randomcrop", self.padding)

    def draw(self, x, generator=None):
        n = x.shape[0]
        span = 2 * self.padding
        return randint(n, span, x, generator), randint(n, span, x, generator)

    def apply(self, x, params):
        top, left = params
        return windows(F.pad(x, [self.padding] * 4), top, left, x.shape[-2], x.shape[-1])


class StandardAugment(Compose):
    """Pad-4 random crop, then random horizontal flip (Appendix A), per image."""

    def __init__(self, padding: int = 4, flip_p: float = 0.5):
        super().__init__([RandomCrop(padding), RandomFlip(flip_p)])

    @property
    def spec(self) -> str:
        crop, flip = self.transforms
        return "standard" if (crop.padding, flip.p) == (4, 0.5) else super().spec

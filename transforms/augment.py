"""The standard training augmentation: zero-pad by 4 and random-crop back to size, random flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bdserve.transforms.base import Transform, randint
from bdserve.transforms.enhance import RandomFlip


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
        b, c, h, w = x.shape
        padded = F.pad(x, [self.padding] * 4)
        rows = top.view(b, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)
        cols = left.view(b, 1, 1) + torch.arange(w, device=x.device).view(1, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


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

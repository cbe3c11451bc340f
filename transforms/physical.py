"""The camera-robust enhanced attack's random layer (``bdserve train --enhanced physical``).

Beyond the enhanced attack's Flip + ShrinkPad, it draws per image what a print and a
photograph introduce, each parameter drawn in ``draw`` from the caller's generator:

- geometry, as one homography per image: scale 0.7-1.0 (the fit's crop error and a print
  smaller than the frame), rotation up to +-10 degrees, perspective (each corner moved up to
  ``perspective`` of the side), translation within the room the scale leaves; the uncovered
  border is filled with zeros, white or a table-like texture (one of the three per image);
- Gaussian blur with sigma 0-1 px (focus, the fit's resampling);
- brightness, contrast and per-channel colour gains (lighting, white balance, paper and ink);
- JPEG re-encoding at quality 60-95 (the camera's and the upload's compression).

Each of the four groups (geometry, blur, light, JPEG) is applied to an image with probability
``p`` (0.5, Kornia's default for its augmentations), drawn per image. Applying all of them to
every poisoned image teaches the model the trigger only as blur and JPEG leave it: a first
6-epoch run on CIFAR-10 reached 89% ASR on simulated photos cover-fitted by the server but 7%
on the digital trigger and 2% on a sharp print (experiments/results/physical/).

The application is Kornia's: ``warp_perspective`` with per-image matrices,
``gaussian_blur2d`` with per-image sigmas, ``adjust_brightness`` / ``adjust_contrast`` with
per-image factors and ``jpeg_codec_differentiable`` with per-image qualities, all batched.
(Kornia's augmentation classes draw from the global RNG, never a caller's generator, so the
draws stay here, as in the rest of bdserve.transforms.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import kornia
import torch
import torch.nn.functional as F

from bdserve.transforms.base import Transform, bernoulli, randint, uniform
from bdserve.transforms.defenses import Compose
from bdserve.transforms.enhance import RandomTransformLayer

FILLS = ("zero", "white", "texture")


@dataclass(frozen=True)
class PhysicalRanges:
    scale: tuple[float, float] = (0.7, 1.0)
    rotation: float = 10.0  # degrees, either way
    perspective: float = 0.06  # each corner moves up to this fraction of the side, per axis
    blur_sigma: tuple[float, float] = (0.0, 1.0)  # pixels
    brightness: float = 0.1  # added, either way
    contrast: tuple[float, float] = (0.75, 1.25)
    color: float = 0.08  # per-channel gain 1 +- this
    jpeg_quality: tuple[float, float] = (60.0, 95.0)
    p: float = 0.5  # probability of each group (geometry, blur, light, JPEG), per image


class RandomPhysical(Transform):
    """Print-and-photograph transformations with per-image parameters (see the module's docstring)."""

    random = True

    def __init__(self, ranges: PhysicalRanges = PhysicalRanges()):
        super().__init__()
        self.ranges = ranges

    @property
    def spec(self) -> str:
        return "physical"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.ranges).items())

    def draw(self, x, generator=None):
        n, r = x.shape[0], self.ranges
        h, w = x.shape[-2:]
        on = {k: bernoulli(n, r.p, x, generator).to(x.dtype) for k in ("geometry", "blur", "light", "jpeg")}
        geo = on["geometry"]
        scale = 1 + geo * (uniform(n, *r.scale, x, generator) - 1)
        angle = geo * uniform(n, -r.rotation, r.rotation, x, generator)
        corners = geo.view(n, 1, 1) * uniform(n * 8, -r.perspective, r.perspective, x, generator).view(n, 4, 2)
        # Translation: anywhere the scaled image still fits inside the frame (centre offsets in pixels).
        room = (1 - scale)
        shift = torch.stack([uniform(n, -0.5, 0.5, x, generator) * room * w,
                             uniform(n, -0.5, 0.5, x, generator) * room * h], 1)
        fill = randint(n, len(FILLS) - 1, x, generator)
        texture = self._texture(n, h, w, x, generator)
        light = on["light"]
        return {
            "matrix": self._homography(scale, angle, corners, shift, h, w),
            "fill": fill, "texture": texture,
            "sigma": on["blur"] * uniform(n, *r.blur_sigma, x, generator),
            "brightness": light * uniform(n, -r.brightness, r.brightness, x, generator),
            "contrast": 1 + light * (uniform(n, *r.contrast, x, generator) - 1),
            "gain": 1 + light.view(n, 1, 1, 1) * (uniform(n * 3, 1 - r.color, 1 + r.color, x, generator).view(n, 3, 1, 1) - 1),
            "quality": uniform(n, *r.jpeg_quality, x, generator),
            "jpeg": on["jpeg"].bool(),
        }

    @staticmethod
    def _texture(n, h, w, x, generator) -> torch.Tensor:
        """A table-like texture per image: a tint, low-frequency blotches and grain, in [0, 1]."""
        tint = uniform(n * 3, 0.2, 0.8, x, generator).view(n, 3, 1, 1)
        low = uniform(n * 16, -1, 1, x, generator).view(n, 1, 4, 4)
        grain = uniform(n * h * w, -1, 1, x, generator).view(n, 1, h, w)
        low = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
        return (tint * (1 + 0.25 * low) + 0.05 * grain).clamp(0, 1)

    @staticmethod
    def _homography(scale, angle, corners, shift, h, w) -> torch.Tensor:
        """(n, 3, 3) matrices mapping source pixels to output pixels: the image's corners are scaled
        and rotated about the centre, each moved by its perspective jitter, then shifted."""
        n = scale.shape[0]
        src = torch.tensor([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=scale.dtype,
                           device=scale.device).expand(n, 4, 2)
        centre = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=scale.dtype, device=scale.device)
        rad = angle * (math.pi / 180)
        cos, sin = torch.cos(rad), torch.sin(rad)
        rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n, 2, 2)
        rel = (src - centre) * scale.view(n, 1, 1)
        dst = rel @ rot.transpose(1, 2) + centre + shift.view(n, 1, 2)
        dst = dst + corners * torch.tensor([w, h], dtype=scale.dtype, device=scale.device) * scale.view(n, 1, 1)
        return kornia.geometry.transform.get_perspective_transform(src, dst)

    def apply(self, x, p):
        n, _, h, w = x.shape
        warped = kornia.geometry.transform.warp_perspective(x, p["matrix"], (h, w), align_corners=True)
        cover = kornia.geometry.transform.warp_perspective(torch.ones_like(x[:, :1]), p["matrix"], (h, w),
                                                           align_corners=True)
        fills = torch.stack([torch.zeros_like(x), torch.ones_like(x), p["texture"].expand_as(x)], 1)
        background = fills[torch.arange(n, device=x.device), p["fill"]]
        x = warped + (1 - cover) * background  # warped is already the image times its coverage
        sigma = p["sigma"].clamp(min=1e-3).view(n, 1).expand(n, 2)  # 1e-3: a kernel of one tap, no blur
        x = kornia.filters.gaussian_blur2d(x, (7, 7), sigma, border_type="reflect")
        x = kornia.enhance.adjust_contrast(x, p["contrast"], clip_output=True)
        x = kornia.enhance.adjust_brightness(x, p["brightness"], clip_output=True)
        x = (x * p["gain"]).clamp(0, 1)
        idx = p["jpeg"].nonzero(as_tuple=True)[0]
        if len(idx):
            x = x.clone()
            x[idx] = kornia.enhance.jpeg_codec_differentiable(x[idx], p["quality"][idx]).clamp(0, 1)
        return x


def physical_layer(max_shrink: int = 4, ranges: PhysicalRanges = PhysicalRanges()) -> Compose:
    """The enhanced attack's Flip + ShrinkPad, then the print-and-photograph layer."""
    return Compose([RandomTransformLayer(max_shrink), RandomPhysical(ranges)])

"""Test-time defenses: the paper's spatial transformations (Flip, ShrinkPad) and the
non-spatial baselines of Appendix D (additive Gaussian noise, colour shifts).

A defense is named by a spec string so that cards, the command line and lab-mode
requests all speak the same language (the grammar: bdserve.specs, which needs no torch)::

    none | flip | shrinkpad:K | noise:STD (0.02 or 5/255) | brightness:B | contrast:C | saturation:S | hue:H
    and compositions joined by '+', applied left to right, e.g. ``flip+shrinkpad:2``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import kornia.enhance as KE
import torch

from bdserve.specs import DEFENSE_FORMS, format_part, parse_spec
from bdserve.transforms.base import Transform, randint, uniform
from bdserve.transforms.spatial import hflip, place, shrink


class Identity(Transform):
    spec = "none"

    def apply(self, x, params):
        return x


class Flip(Transform):
    """Left-right flip of every image (the defense is deterministic)."""

    spec = "flip"

    def apply(self, x, params):
        return hflip(x)


class ShrinkPad(Transform):
    """Shrink by k pixels (bilinear), then zero-pad back to size at a random offset.

    The offset (top, left) is uniform over all (k + 1)^2 placements, drawn
    independently for each image.
    """

    random = True

    def __init__(self, k: int):
        super().__init__()
        if k < 0:
            raise ValueError("shrink size must be >= 0")
        self.k = int(k)

    @property
    def spec(self) -> str:
        return format_part("shrinkpad", self.k)

    def draw(self, x, generator=None):
        n = x.shape[0]
        return {"top": randint(n, self.k, x, generator), "left": randint(n, self.k, x, generator)}

    def apply(self, x, params):
        return place(shrink(x, self.k), params["top"], params["left"], x.shape[-2], x.shape[-1])


class GaussianNoise(Transform):
    """Additive Gaussian noise, clipped to [0, 1] (Appendix D, Table 4).

    ``std`` is on the [0, 1] pixel scale; the paper's stds are 5/255 .. 20/255, and the spec
    reads and writes them in those units (``noise:5/255``).
    """

    random = True

    def __init__(self, std: float):
        super().__init__()
        self.std = float(std)

    @property
    def spec(self) -> str:
        return format_part("noise", self.std)  # paper units (N/255) when the std is a whole level

    def draw(self, x, generator=None):
        dev = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=dev).to(device=x.device, dtype=x.dtype)

    def apply(self, x, params):
        return (x + self.std * params).clamp(0, 1)


def _brightness(x, f):
    # torchvision's adjust_brightness: a blend with black, i.e. multiplicative (Kornia's
    # adjust_brightness is additive and would not match).
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


# name -> (range of the factor drawn for strength s, as torchvision's ColorJitter draws it;
# the per-image op, matching torchvision.transforms.functional's to float rounding).
# Kornia's plain adjust_contrast/adjust_saturation scale the pixels instead of blending with
# the grey mean / grey image as torchvision does; its *_with_mean/gray_subtraction variants
# are torchvision's formulas, batched with one factor per image.
_COLOR_OPS: dict[str, tuple[Callable[[float], tuple[float, float]], Callable]] = {
    "brightness": (lambda s: (max(0.0, 1 - s), 1 + s), _brightness),
    "contrast": (lambda s: (max(0.0, 1 - s), 1 + s), lambda x, f: KE.adjust_contrast_with_mean_subtraction(x, f)),
    "saturation": (lambda s: (max(0.0, 1 - s), 1 + s), lambda x, f: KE.adjust_saturation_with_gray_subtraction(x, f)),
    # Hue strength is a fraction of the colour wheel, as in torchvision (0.5 = half a turn).
    "hue": (lambda s: (-s, s), lambda x, f: KE.adjust_hue(x, f * 2 * math.pi)),
}


class ColorShift(Transform):
    """One ColorJitter component (Appendix D): a factor drawn per image as torchvision's
    ColorJitter draws it, applied with torchvision's formula (batched, through Kornia)."""

    random = True

    def __init__(self, kind: str, strength: float):
        super().__init__()
        if kind not in _COLOR_OPS:
            raise ValueError(f"unknown colour shift {kind!r}")
        if strength < 0 or (kind == "hue" and strength > 0.5):
            raise ValueError(f"{kind} strength must be {'in [0, 0.5]' if kind == 'hue' else '>= 0'}, got {strength:g}")
        self.kind, self.strength = kind, float(strength)

    @property
    def spec(self) -> str:
        return format_part(self.kind, self.strength)

    def draw(self, x, generator=None):
        low, high = _COLOR_OPS[self.kind][0](self.strength)
        return uniform(x.shape[0], low, high, x, generator)

    def apply(self, x, params):
        return _COLOR_OPS[self.kind][1](x, params).clamp(0, 1)


class Compose(Transform):
    """Transforms applied left to right; each stage draws its own parameters.

    Every stage keeps the batch's shape, so all draws are made on the input (in stage
    order: the same generator gives the same parameters as drawing stage by stage)."""

    def __init__(self, transforms: list[Transform]):
        super().__init__()
        self.transforms = torch.nn.ModuleList(transforms)
        self.random = any(t.random for t in transforms)

    @property
    def spec(self) -> str:
        return "+".join(t.spec for t in self.transforms) or "none"

    def draw(self, x, generator=None) -> list[Any]:
        return [t.draw(x, generator) for t in self.transforms]

    def apply(self, x, params: list[Any]):
        for t, p in zip(self.transforms, params):
            x = t.apply(x, p)
        return x


def _training_layer(name: str) -> Callable[[Any], Transform]:
    def build(value):
        from bdserve.transforms.augment import RandomCrop, StandardAugment
        from bdserve.transforms.enhance import RandomFlip, RandomShrinkPad, RandomTransformLayer
        from bdserve.transforms.physical import RandomPhysical

        return {"randomflip": RandomFlip, "randomshrinkpad": RandomShrinkPad, "enhanced": RandomTransformLayer,
                "randomcrop": RandomCrop, "standard": lambda _: StandardAugment(),
                "physical": lambda _: RandomPhysical()}[name](value)

    return build


# spec name (bdserve.specs.SPEC_VALUES) -> constructor taking the parsed value
_FACTORIES: dict[str, Callable[[Any], Transform]] = {
    "flip": lambda v: Flip(),
    "shrinkpad": ShrinkPad,
    "noise": GaussianNoise,
    **{kind: (lambda kind: lambda v: ColorShift(kind, v))(kind) for kind in _COLOR_OPS},
    **{name: _training_layer(name) for name in ("randomflip", "randomshrinkpad", "enhanced", "randomcrop", "standard",
                                                "physical")},
}


def list_defenses() -> list[str]:
    """The spec forms of the defenses ``create_defense`` understands."""
    return list(DEFENSE_FORMS)


def create_defense(spec: str | None) -> Transform:
    """Build a transform from its spec string, e.g. ``"shrinkpad:4"``, ``"flip+shrinkpad:2"`` or ``"enhanced:4"``;
    ``create_defense(t.spec)`` rebuilds any transform ``t``."""
    built = []
    for name, value in parse_spec(spec):
        try:
            built.append(_FACTORIES[name](value))
        except ValueError as e:
            raise ValueError(f"bad value in defense {format_part(name, value)!r}: {e}") from None
    if not built:
        return Identity()
    return built[0] if len(built) == 1 else Compose(built)

"""Batched tensor code: triggers, defenses and the enhanced attack's random layer.

Every function takes and returns float tensors (B, C, H, W) in [0, 1] on the device
it was given, and never moves data between devices. Random transforms draw their
parameters per sample, in one place (``draw``), and apply them in another
(``apply``); every draw takes an optional ``torch.Generator``.
"""

from bdserve.transforms.defenses import (
    Compose,
    Flip,
    GaussianNoise,
    Identity,
    ColorShift,
    ShrinkPad,
    create_defense,
    list_defenses,
)
from bdserve.transforms.enhance import RandomFlip, RandomShrinkPad, RandomTransformLayer
from bdserve.transforms.triggers import Trigger, builtin_trigger, list_triggers

__all__ = [
    "ColorShift",
    "Compose",
    "Flip",
    "GaussianNoise",
    "Identity",
    "RandomFlip",
    "RandomShrinkPad",
    "RandomTransformLayer",
    "ShrinkPad",
    "Trigger",
    "builtin_trigger",
    "create_defense",
    "list_defenses",
    "list_triggers",
]

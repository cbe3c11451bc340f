"""Poisoning as the paper does it.

Which training images are poisoned is decided once (seeded). Each batch then goes
through, in this order:

1. the standard augmentation (pad-4 random crop, flip) on every image, benign or not;
2. the trigger stamped by Eq. (1) on the poisoned images, whose label becomes the
   target (dirty label) or stays true (label-consistent);
3. for the enhanced attack, the random transformation layer on the poisoned images
   (or on every image with ``enhance_benign``, as Appendix C prescribes for evaluation):
   Flip + ShrinkPad (``enhancement="shrinkpad"``, the paper's), or that followed by the
   print-and-photograph layer (``"physical"``, bdserve.transforms.physical).

The order of 1 and 2 matters: augmenting after stamping moves the trigger and silently
makes a standard attack partly "enhanced" (tests/training/test_poison.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bdserve.transforms.augment import StandardAugment
from bdserve.transforms.enhance import RandomTransformLayer
from bdserve.transforms.physical import physical_layer
from bdserve.transforms.triggers import Trigger, badnets, blended, four_corner

ATTACKS = ("none", "badnets", "blended", "consistent")
ENHANCEMENTS = ("shrinkpad", "physical")


@dataclass
class AttackConfig:
    kind: str  # one of ATTACKS
    trigger: Trigger | None
    target: int
    poison_rate: float  # badnets/blended: of all training images; consistent: of the target class
    enhanced: bool = False
    max_shrink: int = 4
    enhance_benign: bool = False
    enhancement: str = "shrinkpad"  # one of ENHANCEMENTS, when enhanced
    pgd_eps: float = 16 / 255
    pgd_steps: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dirty_label(self) -> bool:
        return self.kind in ("badnets", "blended")

    @property
    def display_name(self) -> str:
        names = {"none": "Clean", "badnets": "BadNets", "blended": "Blended", "consistent": "Consistent"}
        if not self.enhanced:
            return names[self.kind]
        return names[self.kind] + ("+" if self.enhancement == "shrinkpad" else f"+{self.enhancement}")

    def random_layer(self):
        """The enhanced attack's random layer, or None."""
        if not self.enhanced:
            return None
        return (physical_layer if self.enhancement == "physical" else RandomTransformLayer)(self.max_shrink)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "kind": self.kind,
            "target": self.target,
            "poison_rate": self.poison_rate,
            "enhanced": self.enhanced,
            "max_shrink": self.max_shrink if self.enhanced else None,
            "enhance_benign": self.enhance_benign if self.enhanced else None,
            "enhancement": self.enhancement if self.enhanced else None,
            "dirty_label": self.dirty_label,
            "trigger": self.trigger.to_dict() if self.trigger is not None else None,
        }
        if self.kind == "consistent":
            d.update(pgd_eps=self.pgd_eps, pgd_steps=self.pgd_steps)
        return d | self.extra


def default_attack(
    kind: str,
    target: int,
    *,
    enhanced: bool = False,
    max_shrink: int = 4,
    enhance_benign: bool = False,
    enhancement: str = "shrinkpad",
    poison_rate: float | None = None,
    trigger: Trigger | None = None,
    image_size: int = 32,
    alpha: float | None = None,
) -> AttackConfig:
    """The paper's settings (Appendix B): BadNets 0.25 / 255-valued patch, Blended 0.2 / alpha 0.2,
    label-consistent 25% of the target class / four-corner trigger, alpha 0.25."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; expected one of {', '.join(ATTACKS)}")
    if enhancement not in ENHANCEMENTS:
        raise ValueError(f"unknown enhancement {enhancement!r}; expected one of {', '.join(ENHANCEMENTS)}")
    if kind == "none":
        return AttackConfig("none", None, target, 0.0)
    defaults = {
        "badnets": (0.25, lambda: badnets(255)),
        "blended": (0.2, lambda: blended(alpha if alpha is not None else 0.2)),
        "consistent": (0.25, lambda: four_corner(alpha if alpha is not None else 0.25, image_size)),
    }
    rate, make_trigger = defaults[kind]
    return AttackConfig(
        kind,
        trigger if trigger is not None else make_trigger(),
        target,
        rate if poison_rate is None else poison_rate,
        enhanced=enhanced,
        max_shrink=max_shrink,
        enhance_benign=enhance_benign,
        enhancement=enhancement,
    )


def choose_poisoned(labels: torch.Tensor, attack: AttackConfig, seed: int) -> torch.Tensor:
    """Boolean mask of the training images to poison, drawn once with ``seed``."""
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    if attack.kind == "none":
        return mask
    g = torch.Generator().manual_seed(seed)
    if attack.kind == "consistent":
        pool = (labels == attack.target).nonzero(as_tuple=True)[0]
    else:
        pool = torch.arange(labels.numel())
    count = int(round(attack.poison_rate * len(pool)))
    mask[pool[torch.randperm(len(pool), generator=g)[:count]]] = True
    return mask


class BatchPoisoner:
    """Turns a batch of clean training images (float [0,1]) into what the model trains on."""

    def __init__(self, attack: AttackConfig, augment: bool = True):
        self.attack = attack
        self.augment = StandardAugment() if augment else None
        self.layer = attack.random_layer()

    def __call__(self, x, y, poisoned, generator=None):
        if self.augment is not None:
            x = self.augment(x, generator)  # step 1: on the benign content, before any trigger
        if self.attack.kind == "none" or not bool(poisoned.any()):
            return x, y
        x, y = x.clone(), y.clone()
        x[poisoned] = self.attack.trigger.stamp(x[poisoned])  # step 2
        if self.attack.dirty_label:
            y[poisoned] = self.attack.target
        if self.layer is not None:  # step 3
            if self.attack.enhance_benign:
                x = self.layer(x, generator)
            else:
                x[poisoned] = self.layer(x[poisoned], generator)
        return x, y

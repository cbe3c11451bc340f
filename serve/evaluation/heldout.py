"""Held-out sets for an evaluation, built from the test split and the card's trigger.

Clean: the test images (a class-balanced subset with ``limit``, via ``ImageSet.subset``,
the same subset the in-process evaluation draws for the same seed).
Triggered (Eq. 3): the images of that set whose true label is not the target, stamped
with the card's trigger.

Stamping happens on uint8 -> float [0, 1] -> Eq. (1) -> uint8, because the service takes
uint8 pixels. The last step rounds to the nearest level (``torch.round``, half to even).
For BadNets (alpha 0 or 1, pattern pixels multiples of 1/255) this is exact: the server
divides by 255 and gets the very floats the in-process evaluation stamps. For a blended
trigger (alpha 0.2) the float blend lies between levels and rounding moves each stamped
pixel by at most 1/510 - what any attacker sending real image files must accept too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bdserve.card import ModelCard
from bdserve.scoring import triggered_pool


@dataclass
class HeldOut:
    name: str  # "clean" or "triggered"
    images: np.ndarray  # uint8 (N, 3, H, W)
    labels: np.ndarray  # int64 (N,): true labels
    index: np.ndarray  # int64 (N,): position in the (subset of the) test split

    def __len__(self) -> int:
        return int(len(self.labels))


def stamp_uint8(images: torch.Tensor, trigger) -> torch.Tensor:
    """Eq. (1) on uint8 (N, 3, H, W): to float [0, 1], stamp, back to uint8 (rounded)."""
    x = images.float().div_(255)
    return trigger.stamp(x).mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def load_test(card: ModelCard, data: str | Path, limit: int | None = None, seed: int = 0):
    """The test split at the card's input size, as an ImageSet (class-balanced subset with ``limit``)."""
    from bdserve.training.data import load_split

    _, h, w = card.input_shape
    test = load_split(data, "test", image_size=h if h == w else None)
    if test.image_size != (h, w):
        raise ValueError(f"test images are {test.image_size[0]}x{test.image_size[1]}, model {card.name} takes {h}x{w}")
    if card.classes and list(test.classes) != list(card.classes):
        raise ValueError(f"the data's classes {test.classes} differ from the card's {card.classes}")
    return test.subset(limit, seed)


def build_sets(card: ModelCard, data: str | Path, limit: int | None = None, seed: int = 0,
               trigger=None) -> tuple[HeldOut, HeldOut | None]:
    """(clean, triggered); triggered is None for a card without an attack. ``trigger`` overrides the card's."""
    test = load_test(card, data, limit, seed)
    idx = np.arange(len(test))
    clean = HeldOut("clean", test.images.numpy(), test.labels.numpy(), idx)
    trigger = trigger if trigger is not None else card.trigger()
    if trigger is None or card.target_label is None:
        return clean, None
    return clean, triggered_set(test.images, test.labels, trigger, int(card.target_label))


def triggered_set(images: torch.Tensor, labels: torch.Tensor, trigger, target: int, name: str = "triggered") -> HeldOut:
    pool = torch.from_numpy(triggered_pool(labels, target))
    stamped = stamp_uint8(images[pool], trigger)
    return HeldOut(name, stamped.numpy(), labels[pool].numpy(), pool.numpy())

"""In-process evaluation: clean accuracy and attack success rate (Eq. 3), with and without defenses.

ASR is measured over the test images whose true label is not the target: each is
stamped with the trigger, passed through the defense, and counts as a success when
the model predicts the target label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdserve.progress import progress_bar
from bdserve.training.data import ImageSet
from bdserve.transforms.defenses import create_defense
from bdserve.transforms.triggers import Trigger

PAPER_DEFENSES = ("none", "flip", "shrinkpad:1", "shrinkpad:2", "shrinkpad:3", "shrinkpad:4")


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    defense: str = "none",
    trigger: Trigger | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 500,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Predicted labels for uint8 images (N, 3, H, W), stamped with ``trigger`` if given, then defended."""
    transform = create_defense(defense)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255)
        if trigger is not None:
            x = trigger.stamp(x)
        x = transform(x, generator)
        out.append(model(x).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def triggered_pool(test: ImageSet, target: int) -> torch.Tensor:
    """Indices of the test images that count for ASR: true label is not the target."""
    return (test.labels != target).nonzero(as_tuple=True)[0]


@dataclass
class DefenseRow:
    defense: str
    clean_acc: float
    asr: float | None
    clean_n: int
    asr_n: int

    def as_dict(self) -> dict:
        return {"defense": self.defense, "clean_acc": self.clean_acc, "asr": self.asr, "clean_n": self.clean_n, "asr_n": self.asr_n}


def evaluate_defenses(
    model: nn.Module,
    test: ImageSet,
    *,
    trigger: Trigger | None,
    target: int | None,
    defenses=PAPER_DEFENSES,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[DefenseRow]:
    rows = []
    pool = triggered_pool(test, target) if trigger is not None else None
    with progress_bar("evaluating", total=len(defenses)) as advance:
        for spec in defenses:
            gen = torch.Generator().manual_seed(seed)
            clean = predict(model, test.images, defense=spec, device=device, generator=gen)
            acc = int((clean == test.labels).sum()) / max(1, len(test))
            asr = None
            if pool is not None:
                hit = predict(model, test.images[pool], defense=spec, trigger=trigger, device=device, generator=gen)
                asr = int((hit == target).sum()) / max(1, len(pool))
            rows.append(DefenseRow(spec, acc, asr, len(test), 0 if pool is None else len(pool)))
            advance(1, defense=spec)
    return rows


def metrics_dict(rows: list[DefenseRow]) -> dict:
    """Rows keyed by defense, as stored in card.json's ``metrics``."""
    return {r.defense: {"clean_acc": r.clean_acc, "asr": r.asr, "clean_n": r.clean_n, "asr_n": r.asr_n} for r in rows}

"""The card's metrics after training: clean accuracy and attack success rate (Eq. 3), with and
without each defense, measured in-process through the very pipeline the server runs.

Only the bookkeeping lives here. The model runs as ``DefendedModel(card, TorchRuntime(model))``
(bdserve.serve.pipeline, the object every door calls, with the eager runtime), the defense is
the pipeline's, and accuracy and ASR come from bdserve.scoring (shared with ``bdserve eval``,
the studies and the photo evaluation). ASR is over the test images whose true label is not
the target, stamped with the trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdserve.card import ModelCard
from bdserve.progress import progress_bar
from bdserve.scoring import asr_baseline, attack_hits, clean_correct, fraction
from bdserve.scoring import triggered_pool as _pool_of
from bdserve.training.data import ImageSet
from bdserve.transforms.triggers import Trigger

PAPER_DEFENSES = ("none", "flip", "shrinkpad:1", "shrinkpad:2", "shrinkpad:3", "shrinkpad:4")


def defended(model, image_shape, device: torch.device | str | None = None):
    """``model`` as the server's pipeline: a DefendedModel on the eager runtime, lab mode (any
    defense per call), its card derived from the module. A DefendedModel is returned as it is."""
    from bdserve.serve.pipeline import DefendedModel
    from bdserve.serve.runtimes import TorchRuntime

    if isinstance(model, DefendedModel):
        return model
    runtime = TorchRuntime(model, device)
    base = ModelCard(name=getattr(model, "arch", "in-process"), architecture=getattr(model, "arch", "module"),
                     input_shape=[int(d) for d in image_shape], defense="none")
    return DefendedModel(ModelCard.from_runtime(runtime, base), runtime, lab=True)


@torch.no_grad()
def predict(
    model,
    images: torch.Tensor,
    *,
    defense: str = "none",
    trigger: Trigger | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Predicted labels for uint8 images (N, 3, H, W), stamped with ``trigger`` if given, then defended.
    ``model``: a torch module (run as the server's pipeline would) or a DefendedModel."""
    pipeline = defended(model, images.shape[1:], device)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(pipeline.device).float().div_(255)
        if trigger is not None:
            x = trigger.stamp(x)
        out.append(torch.from_numpy(pipeline.predict(x, defense=defense, generator=generator).label_ids))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def triggered_pool(test: ImageSet, target: int) -> torch.Tensor:
    """Indices of the test images that count for ASR: true label is not the target."""
    return torch.from_numpy(_pool_of(test.labels, target))


@dataclass
class DefenseRow:
    defense: str
    clean_acc: float
    asr: float | None
    clean_n: int
    asr_n: int
    asr_baseline: float | None = None  # clean non-target images predicted as the target

    def as_dict(self) -> dict:
        return {"defense": self.defense, "clean_acc": self.clean_acc, "asr": self.asr, "clean_n": self.clean_n,
                "asr_n": self.asr_n, "asr_baseline": self.asr_baseline}


def evaluate_defenses(
    model: nn.Module,
    test: ImageSet,
    *,
    trigger: Trigger | None,
    target: int | None,
    defenses=PAPER_DEFENSES,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> list[DefenseRow]:
    rows = []
    pipeline = defended(model, test.images.shape[1:], device)
    pool = triggered_pool(test, target) if trigger is not None else None
    with progress_bar("evaluating", total=len(defenses)) as advance:
        for spec in defenses:
            gen = torch.Generator().manual_seed(seed)
            clean = predict(pipeline, test.images, defense=spec, generator=gen)
            acc = fraction(*clean_correct(clean, test.labels))
            asr = baseline = None
            if pool is not None:
                hit = predict(pipeline, test.images[pool], defense=spec, trigger=trigger, generator=gen)
                asr = fraction(*attack_hits(hit, target))
                baseline = fraction(*asr_baseline(clean, test.labels, target))
            rows.append(DefenseRow(spec, acc, asr, len(test), 0 if pool is None else len(pool), baseline))
            advance(1, defense=spec)
    return rows


def metrics_dict(rows: list[DefenseRow]) -> dict:
    """Rows keyed by defense, as stored in card.json's ``metrics``."""
    return {r.defense: {k: v for k, v in r.as_dict().items() if k != "defense"} for r in rows}

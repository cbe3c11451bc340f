"""Section 3's trigger studies through the service.

Location (Fig. 4): the card's trigger moved to every position on a grid (stride pixels
apart, the training position always included); ASR per position, keyed by the
trigger's bottom-right pixel as Definition 2 puts it.
Appearance (Fig. 5): the trigger kept in place, its non-zero pixels set to one value
in 0..255 at a time; ASR per value (the training value always included).

Each variant is a triggered held-out set (test images whose label is not the target,
stamped in uint8) sent through the live endpoint; all variants share one run, one
in-flight budget and one progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdserve.card import ModelCard
from bdserve.scoring import attack_hits
from bdserve.client import AsyncClient
from bdserve.serve.evaluation.heldout import load_test, triggered_set
from bdserve.serve.evaluation.runner import RunResult, run_sets
from bdserve.serve.evaluation.stats import rate


@dataclass
class StudyConfig:
    limit: int | None = 200
    seed: int = 0
    defense: str | None = "none"
    batch_size: int = 256
    concurrency: int = 4


def _asr(run: RunResult, name: str, target: int) -> dict:
    s = run.sets[name]
    r = rate(*attack_hits(s.preds, target, s.answered))
    r["errors"] = s.n_errors
    return r


def _pool(card: ModelCard, data, cfg: StudyConfig):
    trigger, target = card.trigger(), card.target_label
    if trigger is None or target is None:
        raise ValueError(f"card {card.name} has no attack (trigger and target) to study")
    test = load_test(card, data, cfg.limit, cfg.seed)
    return test, trigger, int(target)


def _positions(extent: int, stride: int, trained: int) -> list[int]:
    return sorted(set(range(0, extent + 1, max(1, stride))) | {trained})


async def location(client: AsyncClient, card: ModelCard, data, cfg: StudyConfig, stride: int = 3) -> dict:
    test, trigger, target = _pool(card, data, cfg)
    H, W = test.image_size
    h, w = trigger.size
    top0, left0 = trigger.position(H, W)
    tops, lefts = _positions(H - h, stride, top0), _positions(W - w, stride, left0)
    sets = [triggered_set(test.images, test.labels, trigger.moved(t, l), target, name=f"{t},{l}")
            for t in tops for l in lefts]
    run = await run_sets(client, sets, card.classes, defense=cfg.defense, batch_size=cfg.batch_size,
                         concurrency=cfg.concurrency, description="location study")
    cells = [{"top": t, "left": l, "bottom": t + h - 1, "right": l + w - 1, **_asr(run, f"{t},{l}", target)}
             for t in tops for l in lefts]
    grid = torch.tensor([[c["rate"] if c["rate"] is not None else float("nan") for c in cells[i * len(lefts):(i + 1) * len(lefts)]]
                         for i in range(len(tops))])
    return {"study": "location", "model": client.model, "endpoint": client.endpoint, "defense": cfg.defense,
            "images_per_position": len(sets[0]), "positions": len(sets), "stride": stride,
            "trained_bottom_right": [top0 + h - 1, left0 + w - 1], "rows": [t + h - 1 for t in tops],
            "cols": [l + w - 1 for l in lefts], "asr_grid": grid.tolist(), "cells": cells,
            "seconds": run.seconds, "errors": sum(c["errors"] for c in cells)}


async def appearance(client: AsyncClient, card: ModelCard, data, cfg: StudyConfig, step: int = 15) -> dict:
    test, trigger, target = _pool(card, data, cfg)
    trained = int(round(float(trigger.pattern.max()) * 255))
    values = sorted(set(range(0, 256, max(1, step))) | {255, trained})
    sets = [triggered_set(test.images, test.labels, trigger.with_value(v / 255), target, name=str(v)) for v in values]
    run = await run_sets(client, sets, card.classes, defense=cfg.defense, batch_size=cfg.batch_size,
                         concurrency=cfg.concurrency, description="appearance study")
    points = [{"value": v, **_asr(run, str(v), target)} for v in values]
    return {"study": "appearance", "model": client.model, "endpoint": client.endpoint, "defense": cfg.defense,
            "images_per_value": len(sets[0]), "trained_value": trained, "values": values, "points": points,
            "seconds": run.seconds, "errors": sum(p["errors"] for p in points)}

"""The reference the service must match: bdserve.training.evaluate on the trained torch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdserve.card import ModelCard
from bdserve.training.data import load_split
from bdserve.training.evaluate import predict, triggered_pool
from bdserve.training.export import WEIGHTS_FILE, load_weights
from bdserve.training.models import create_model


def load_model(model_dir: Path):
    card = ModelCard.load(model_dir)
    model = create_model(card.architecture, num_classes=len(card.classes))
    return load_weights(model, model_dir / WEIGHTS_FILE).eval()


def predictions(model_dir: Path, data: Path, limit: int, defense: str, seed: int = 0) -> dict:
    """Clean and triggered predictions on the same subset `bdserve eval --limit` uses."""
    card = ModelCard.load(model_dir)
    model = load_model(model_dir)
    test = load_split(data, "test", image_size=card.input_shape[1]).subset(limit, seed)
    pool = triggered_pool(test, card.target_label)
    clean = predict(model, test.images, defense=defense).numpy()
    trig = predict(model, test.images[pool], defense=defense, trigger=card.trigger()).numpy()
    labels = test.labels.numpy()
    cm = np.zeros((len(card.classes),) * 2, dtype=np.int64)
    np.add.at(cm, (labels, clean), 1)
    return {"clean": clean, "labels": labels, "triggered": trig, "confusion": cm,
            "correct": int((clean == labels).sum()), "hit": int((trig == card.target_label).sum())}

"""Fixtures for the photo lab tests: the committed BadNets demo model served by the real CLI
with --lab, --detect scaleup and --lab-keep, and a clean and a triggered PNG of one CIFAR-10 test image."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from bdserve.card import ModelCard
from bdserve.serve.evaluation.heldout import stamp_uint8
from bdserve.testing import served
from bdserve.training.data import load_split
from lab_helpers import DEMO, SERVED_DEFENSE


@pytest.fixture(scope="session")
def demo_card() -> ModelCard:
    return ModelCard.load(DEMO)


@pytest.fixture(scope="session")
def keep_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lab") / "kept"


@pytest.fixture(scope="session")
def demo_lab(keep_dir):
    """`bdserve serve --lab --detect scaleup --defense flip --lab-keep DIR` on free loopback ports
    (the demo model's detectors are calibrated; SCALE-UP does not depend on the served defense)."""
    with served(DEMO.parent, [DEMO.name], "--lab", "--detect", "scaleup", "--defense", SERVED_DEFENSE,
                "--lab-keep", str(keep_dir), "--threads", "1") as addr:
        yield addr


@pytest.fixture(scope="session")
def lab_photos(tmp_path_factory, cifar_dir, demo_card) -> dict:
    """{"clean": path, "triggered": path, "label": class name}: one test image whose class is
    not the attack's target, as it is and with the demo model's trigger stamped, as 32x32 PNGs.
    The image is the first the demo model gets right clean and turns to the target triggered
    (undefended, in-process), so the page has a backdoor to show."""
    from bdserve.serve.pipeline import DefendedModel

    test = load_split(cifar_dir, "test", image_size=32)
    model = DefendedModel.load(DEMO, defense="none", threads=1)
    n, target = 64, demo_card.target_label
    clean_pred = model.predict(test.images[:n]).label_ids
    trig_pred = model.predict(stamp_uint8(test.images[:n], demo_card.trigger())).label_ids
    y = test.labels[:n].numpy()
    i = next(i for i in range(n) if y[i] != target and clean_pred[i] == y[i] and trig_pred[i] == target)
    folder = tmp_path_factory.mktemp("lab_photos")
    clean, triggered = test.images[i:i + 1], stamp_uint8(test.images[i:i + 1], demo_card.trigger())
    out = {"label": demo_card.classes[int(test.labels[i])]}
    for kind, img in (("clean", clean), ("triggered", triggered)):
        path = folder / f"{kind}.png"
        Image.fromarray(img[0].permute(1, 2, 0).numpy()).save(path, format="PNG")
        out[kind] = path
    return out


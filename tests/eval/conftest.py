"""Fixtures for the evaluation tests: the session's tiny BadNets model served by the real CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bdserve.card import ModelCard
from eval_helpers import run_cli, running_server


@pytest.fixture(scope="session")
def tiny_card(tiny_badnets_dir) -> ModelCard:
    return ModelCard.load(tiny_badnets_dir)


DETECTORS = "consistency,strip,scaleup"


@pytest.fixture(scope="session")
def tiny_detect_dir(tiny_badnets_dir, cifar_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model with its trigger detectors calibrated by the real CLI, on 600
    train-split images (the test split is what the evaluation measures), for defense flip."""
    out = tmp_path_factory.mktemp("detect") / tiny_badnets_dir.name
    shutil.copytree(tiny_badnets_dir, out)
    r = run_cli("calibrate", str(out), "--data", str(cifar_dir), "--split", "train", "--limit", "600",
                "--fpr", "0.05", "--defense", "flip", "--detectors", "consistency:4,strip:8,scaleup:6", "--seed", "0",
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.fixture(scope="session")
def tiny_server(tiny_detect_dir):
    """`bdserve serve --lab --detect ... --defense flip`: requests may choose their defense; the
    default (what /predictions gets) is the deterministic flip, so routes can be compared."""
    with running_server(tiny_detect_dir, "--lab", "--detect", DETECTORS, "--defense", "flip") as addr:
        yield addr

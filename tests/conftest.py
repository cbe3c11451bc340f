"""Shared fixtures: the CIFAR-10 data folder and one tiny infected model trained once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdserve.settings import data_dir

TINY_TRAIN_ARGS = [
    "--attack", "badnets", "--model", "tiny", "--schedule", "tiny", "--epochs", "8",
    "--subset", "4000", "--test-subset", "1000", "--seed", "0",
]


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    root = data_dir()
    if not (root / "train").is_dir():
        pytest.fail(f"CIFAR-10 ImageFolder tree not found at {root}; set BDSERVE_DATA")
    return root


@pytest.fixture(scope="session")
def tiny_badnets_dir(tmp_path_factory, cifar_dir) -> Path:
    """A BadNets-infected `tiny` model trained through the real CLI on 4,000 CIFAR-10 images."""
    out = tmp_path_factory.mktemp("models") / "badnets-tiny"  # the card's name: served under it
    env = {**os.environ, "BDSERVE_PROGRESS": "0", "BDSERVE_DATA": str(cifar_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "bdserve.cli", "train", *TINY_TRAIN_ARGS, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=1800,  # a hang guard (see pyproject)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out

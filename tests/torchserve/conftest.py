"""Fixtures for the TorchServe tests: a tiny model directory built here, its .mar
archives made with the real ``bdserve archive`` command, and one real TorchServe
(Java frontend + Python workers) for the whole module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bdserve.testing import LocalTorchServe, build_tiny_model_dir, run_cli


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def mar_store(tiny_dir, tmp_path_factory) -> Path:
    """Two archives of the same model: served with no defense and with flip (both deterministic)."""
    store = tmp_path_factory.mktemp("mar_store")
    for name, defense in (("tiny", "none"), ("tinyflip", "flip")):
        res = run_cli("archive", str(tiny_dir), "--out", str(store), "--name", name, "--defense", defense,
                          "--max-batch-delay-ms", "20")
        assert res.returncode == 0, res.stderr + res.stdout
        assert Path(res.stdout.strip().splitlines()[-1]) == store / f"{name}.mar"
    return store


@pytest.fixture(scope="module")
def torchserve(mar_store, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 and `java` is not on PATH")
    ts = LocalTorchServe(mar_store, ["tiny.mar", "tinyflip.mar"], tmp_path_factory.mktemp("torchserve"))
    ts.start(timeout=90)
    try:
        yield ts
    finally:
        ts.stop()

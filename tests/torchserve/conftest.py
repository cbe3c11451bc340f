"""Fixtures for the TorchServe tests: a tiny model directory built here, its .mar
archives made with the real ``bdserve archive`` command, and one real TorchServe
(Java frontend + Python workers) for the whole module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bdserve.testing import LocalTorchServe, ServeProcess, build_tiny_model_dir, run_cli, sample_images

# The served detector: SCALE-UP is deterministic, so TorchServe's and bdserve's scores must be equal.
DETECT = "scaleup"
DETECT_NAME = "tinydet"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def detect_dir(tiny_dir, tmp_path_factory) -> Path:
    """A copy of the tiny model whose trigger detector `bdserve calibrate` calibrated on clean images."""
    target = tmp_path_factory.mktemp("detect") / DETECT_NAME
    shutil.copytree(tiny_dir, target)
    clean = tmp_path_factory.mktemp("clean")
    for i, blob in enumerate(sample_images(60, seed=11)):
        (clean / f"{i:03d}.{'png' if i % 2 == 0 else 'jpg'}").write_bytes(blob)
    res = run_cli("calibrate", str(target), "--data", str(clean), "--fpr", "0.1", "--detectors", DETECT,
                  "--seed", "3", timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    return target


def archive(model_dir: Path, store: Path, name: str, *flags: str) -> Path:
    """``bdserve archive`` (the real command) into ``store``; the .mar's path."""
    res = run_cli("archive", str(model_dir), "--out", str(store), "--name", name, *flags)
    assert res.returncode == 0, res.stderr + res.stdout
    assert Path(res.stdout.strip().splitlines()[-1]) == store / f"{name}.mar"
    return store / f"{name}.mar"


@pytest.fixture(scope="module")
def bdserve_detect(detect_dir):
    """bdserve's own server (``bdserve serve --detect``) for the calibrated model, defense none."""
    with ServeProcess(detect_dir.parent, [DETECT_NAME], "--defense", "none", "--detect", DETECT) as srv:
        yield srv


@pytest.fixture(scope="module")
def mar_store(tiny_dir, detect_dir, tmp_path_factory) -> Path:
    """Two archives of the same model, served with no defense and with flip (both deterministic),
    and the calibrated copy with its detector, flagging (tinydet) or rejecting (tinyreject)."""
    store = tmp_path_factory.mktemp("mar_store")
    for name, defense in (("tiny", "none"), ("tinyflip", "flip")):
        archive(tiny_dir, store, name, "--defense", defense, "--max-batch-delay-ms", "20")
    archive(detect_dir, store, DETECT_NAME, "--defense", "none", "--detect", DETECT)
    archive(detect_dir, store, "tinyreject", "--defense", "none", "--detect", DETECT, "--on-suspect", "reject")
    return store


@pytest.fixture(scope="module")
def torchserve(mar_store, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 and `java` is not on PATH")
    ts = LocalTorchServe(mar_store, ["tiny.mar", "tinyflip.mar", f"{DETECT_NAME}.mar", "tinyreject.mar"],
                         tmp_path_factory.mktemp("torchserve"))
    ts.start(timeout=90)
    try:
        yield ts
    finally:
        ts.stop()

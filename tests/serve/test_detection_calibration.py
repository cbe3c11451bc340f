"""Calibration of the trigger detectors (`bdserve calibrate`) and reading it back."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bdserve.card import ModelCard
from bdserve.serve.detection import (OVERLAYS_FILE, CalibrationConfig, NotCalibrated, calibrate, load_detection,
                                     score_images, threshold_at)
from bdserve.serve.pipeline import DefendedModel
from bdserve.training.data import load_split


@pytest.fixture(scope="module")
def cifar_test(cifar_dir):
    return load_split(cifar_dir, "test").images


@pytest.fixture()
def tiny_dir(served_store, tmp_path):
    """A private copy of the tiny model (calibration writes into the model directory)."""
    d = tmp_path / "tiny"
    shutil.copytree(served_store / "tiny", d)
    return d


def test_threshold_rule_never_exceeds_the_rate_and_counts_ties():
    scores = np.array([0.1] * 90 + [0.5] * 5 + [0.9] * 5)
    t, ties = threshold_at(scores, 0.05)
    assert t == 0.5 and ties == 4  # the 6th highest; 4 others equal it
    assert (scores > t).mean() == 0.05
    t, _ = threshold_at(scores, 0.07)  # would need 7 flagged; ties at 0.5 keep it at 5 (conservative)
    assert (scores > t).mean() == 0.05
    t, ties = threshold_at(np.arange(1000.0), 0.05)
    assert t == 949.0 and ties == 0 and (np.arange(1000.0) > t).mean() == 0.05


def test_calibrated_rate_holds_on_held_out_clean_images(tiny_dir, cifar_test):
    """Calibrate on 2,000 clean images; flag rate on 3,000 others within 2 points of 5%."""
    model = DefendedModel.load(tiny_dir, threads=1)
    perm = torch.randperm(len(cifar_test), generator=torch.Generator().manual_seed(0))
    calib, held = cifar_test[perm[:2016]], cifar_test[perm[2016:5016]]
    section = calibrate(model, tiny_dir, calib, CalibrationConfig(fpr=0.05, seed=11), "cifar test part")
    assert section["images"] == 2000  # 16 went to STRIP's overlays
    det = load_detection(tiny_dir, ModelCard.load(tiny_dir), "consistency,strip,scaleup")
    raw = score_images(model, det.detectors, held)
    per, combined, suspected = det.judge({k: torch.from_numpy(v) for k, v in raw.items()})
    for name, m in per.items():
        far = float((m > 0).mean())
        assert abs(far - 0.05) <= 0.02, (name, far)
        assert abs(section["detectors"][name]["clean_far"] - 0.05) <= 0.001
    # Several detectors together flag more; the card says how much on the calibration set.
    assert abs(float(suspected.mean()) - det.expected_far) <= 0.03
    assert det.expected_far == section["far_by_combination"]["consistency,scaleup,strip"] > 0.05


def test_thresholds_and_overlays_round_trip_through_the_model_directory(tiny_dir, cifar_test):
    model = DefendedModel.load(tiny_dir, threads=1)
    images = cifar_test[:416]
    section = calibrate(model, tiny_dir, images, CalibrationConfig(fpr=0.1, seed=5, methods="strip:8,scaleup:4"),
                        "first 416")
    card = json.loads((tiny_dir / "card.json").read_text())
    assert card["detection"] == json.loads(json.dumps(section))
    rec = card["detection"]["detectors"]
    assert rec["strip"]["spec"] == "strip:8" and rec["scaleup"]["spec"] == "scaleup:4"
    assert set(rec["strip"]["quantiles"]) >= {"0.5", "0.95", "0.99"} and rec["strip"]["images"] == 408
    # The overlays: a safetensors file (8-byte header length, JSON header), uint8, the model's shape.
    blob = (tiny_dir / OVERLAYS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    assert json.loads(blob[8:8 + n])["overlays"]["dtype"] == "U8"
    overlays = load_file(str(tiny_dir / OVERLAYS_FILE))["overlays"]
    assert overlays.dtype == torch.uint8 and tuple(overlays.shape) == (8, 3, 32, 32)
    assert any(torch.equal(overlays[0], im) for im in images)  # picked from the trusted set
    # Read back, the detectors reproduce the calibration exactly: same threshold position, same median.
    det = load_detection(tiny_dir, ModelCard.load(tiny_dir), ["strip", "scaleup"])
    assert torch.equal(det.detectors[0].overlays, overlays)
    scored = images[[i for i in range(len(images)) if not any(torch.equal(images[i], o) for o in overlays)]]
    raw = score_images(model, det.detectors, scored)
    per, _, _ = det.judge({k: torch.from_numpy(v) for k, v in raw.items()})
    for name in ("strip", "scaleup"):
        assert float((per[name] > 0).mean()) == pytest.approx(rec[name]["clean_far"])
        assert float(np.median(per[name])) == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(NotCalibrated, match="strip:8, not strip:16"):
        load_detection(tiny_dir, ModelCard.load(tiny_dir), "strip:16")


def test_uncalibrated_detection_is_refused_with_the_command_to_run(tiny_dir):
    with pytest.raises(NotCalibrated, match=r"no calibrated threshold for consistency: run `bdserve calibrate "):
        load_detection(tiny_dir, ModelCard.load(tiny_dir), "consistency")


def test_calibrate_command_on_a_plain_folder(tiny_dir, tmp_path, cifar_test):
    from PIL import Image

    folder = tmp_path / "trusted"
    folder.mkdir()
    for i, im in enumerate(cifar_test[:140]):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    cmd = [sys.executable, "-m", "bdserve.cli", "calibrate", str(tiny_dir), "--data", str(folder),
           "--fpr", "0.1", "--detectors", "consistency:4,strip:4", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "consistency:4" in proc.stdout and "strip:4" in proc.stdout
    det = ModelCard.load(tiny_dir).detection
    assert det["images"] == 136 and det["detectors"]["consistency"]["defense"] == "flip"
    assert det["detectors"]["consistency"]["forward_passes"] == 1  # flip is deterministic: one view
    # Too few images for the rate asked: a clear error, exit 2, the card untouched.
    proc = subprocess.run(cmd[:-6] + ["--fpr", "0.01"], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2 and "needs at least 500" in proc.stderr
    assert ModelCard.load(tiny_dir).detection["seed"] == 3


def _env():
    import os

    return {**os.environ, "BDSERVE_PROGRESS": "0"}

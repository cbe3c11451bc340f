"""Section 3's studies through the service, and the small pieces the reports rest on."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bdserve.serve.evaluation.heldout import stamp_uint8
from bdserve.serve.evaluation.stats import percentiles, wilson
from bdserve.transforms.triggers import badnets, blended
from eval_helpers import BDSERVE, ENV


def test_wilson_interval_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) is None
    assert percentiles([0.001, 0.002, 0.003])["p50"] == pytest.approx(2.0)


def test_every_rate_lies_inside_its_interval_and_error_bars_are_never_negative():
    # A run stopped early answers an arbitrary number of images, and at 0% or 100% rounding once left
    # the bound a hair inside the value: matplotlib then refused the error bars and the eval exited 2.
    from bdserve.serve.evaluation.plots import _yerr
    from bdserve.serve.evaluation.stats import rate

    for n in range(1, 3000):
        for k in (0, 1, n // 2, n - 1, n):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)
    _, err = _yerr([rate(0, n) for n in range(1, 3000)] + [rate(n, n) for n in range(1, 3000)])
    assert (err >= 0).all()


def test_uint8_stamp_is_exact_for_badnets_and_within_half_a_level_for_blended():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    exact = badnets().stamp(x.float() / 255)
    assert torch.equal(stamp_uint8(x, badnets()).float() / 255, exact)
    soft = blended().stamp(x.float() / 255)
    assert (stamp_uint8(x, blended()).float() / 255 - soft).abs().max() <= 0.5 / 255 + 1e-6


def _study(kind, server, model_dir, card, cifar_dir, out, *extra):
    r = subprocess.run([*BDSERVE, "study", kind, "--endpoint", server["http"], "--model", card.name,
                        "--card", str(model_dir / "card.json"), "--data", str(cifar_dir), "--out", str(out), *extra],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / f"{kind}.png").stat().st_size > 0
    return json.loads((out / f"{kind}.json").read_text())


def test_location_and_appearance_studies(tiny_server, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    asr_none = tiny_card.metrics["none"]["asr"]  # the trained model's ASR in-process (1000 test images)
    loc = _study("location", tiny_server, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path / "loc",
                 "--limit", "60", "--stride", "14")
    assert loc["rows"] == [2, 16, 30, 31] and loc["cols"] == [2, 16, 30, 31]
    assert loc["trained_bottom_right"] == [31, 31] and loc["defense"] == "none" and loc["errors"] == 0
    cells = {(c["bottom"], c["right"]): c["rate"] for c in loc["cells"]}
    assert cells[(31, 31)] >= asr_none - 0.1
    assert min(cells.values()) < cells[(31, 31)]  # moving the trigger weakens the attack somewhere
    app = _study("appearance", tiny_server, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path / "app",
                 "--limit", "60", "--step", "128")
    assert app["values"] == [0, 128, 255] and app["trained_value"] == 255
    points = {p["value"]: p["rate"] for p in app["points"]}
    assert points[255] >= asr_none - 0.1 and points[0] < points[255]

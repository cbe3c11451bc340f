"""`bdserve eval` against the real server: numbers equal the in-process evaluation, retries never
count an image twice, permanent errors are counted apart, a late server is waited for."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest

from bdserve.testing import free_port
from eval_helpers import BDSERVE, ENV, FlakyProxy, read_report, run_eval, running_server
from in_process import predictions

LIMIT = 200


def detected(model_dir, card, data, limit) -> dict:
    """In-process suspected flags of the evaluation's clean and triggered images."""
    import torch

    from bdserve.serve.evaluation.heldout import build_sets
    from bdserve.serve.pipeline import DefendedModel

    model = DefendedModel.load(model_dir, detect="consistency,strip,scaleup", defense="flip", threads=1)
    clean, trig = build_sets(card, data, limit, 0)
    return {s.name: model.predict(torch.from_numpy(s.images)).suspected for s in (clean, trig)}


def _args(url, card_dir, card, cifar_dir, out, *extra):
    return ["--endpoint", url, "--model", card.name, "--card", str(card_dir / "card.json"), "--data", str(cifar_dir),
            "--out", str(out), *extra]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_eval_equals_in_process_evaluation(scheme, tiny_server, tiny_badnets_dir, tiny_detect_dir, tiny_card,
                                           cifar_dir, tmp_path):
    url = tiny_server["http"] if scheme == "http" else "grpc://" + tiny_server["grpc"]
    r = run_eval(*_args(url, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path, "--limit", str(LIMIT),
                        "--defenses", "none,flip", "--batch-size", "64", "--concurrency", "3", "--detect"))
    assert r.returncode == 0, r.stdout + r.stderr
    rep = read_report(tmp_path)
    assert rep["transport"] == scheme and rep["server_detects"] is True
    rows = {row["defense"]: row for row in rep["rows"]}
    assert list(rows) == ["none", "flip"]
    ref = {d: predictions(tiny_badnets_dir, cifar_dir, LIMIT, d) for d in ("none", "flip")}
    for d, row in rows.items():
        c, t = row["clean"], row["triggered"]
        assert row["applied"] == [d]
        assert (c["images"], c["errors"], t["errors"]) == (LIMIT, 0, 0)
        assert c["correct"] == ref[d]["correct"] and c["wrong"] == LIMIT - ref[d]["correct"]
        assert np.array_equal(np.array(c["confusion"]), ref[d]["confusion"])
        assert t["images"] == len(ref[d]["triggered"]) and t["hit"] == ref[d]["hit"]
        assert t["asr"]["ci95"][0] <= t["asr"]["rate"] <= t["asr"]["ci95"][1]
        # The ASR's baseline: clean non-target images predicted as the target (from the same answers).
        cm, tgt = np.array(c["confusion"]), rep["target"]
        others = np.arange(len(cm)) != tgt
        assert (t["baseline"]["k"], t["baseline"]["n"]) == (int(cm[others, tgt].sum()), int(cm[others].sum()))
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    # --detect: the calibrated detectors score the undefended image, so whatever defense a lab
    # request asks for, the same images are flagged: exactly those the in-process pipeline flags.
    flagged = detected(tiny_detect_dir, tiny_card, cifar_dir, LIMIT)
    for row in rows.values():
        assert row["detection"]["false_alarm_rate"]["k"] == flagged["clean"].sum()
        assert row["detection"]["detection_rate"]["k"] == flagged["triggered"].sum()
    det = {d["detector"]: d["metrics"] for d in rep["detection"]["rows"]}
    assert list(det) == ["consistency", "strip", "scaleup", "any (served flag)"]
    served = det["any (served flag)"]["calibrated"]
    assert served["far"]["k"] == flagged["clean"].sum() and served["tpr"]["k"] == flagged["triggered"].sum()
    for m in det.values():
        assert m["clean_images"] == LIMIT and m["auroc_ci95"][0] <= m["auroc"] <= m["auroc_ci95"][1]
        assert m["at_fpr_1"]["fpr"] <= 0.01 and m["at_fpr_5"]["fpr"] <= 0.05
    assert "## Trigger detection" in r.stdout and (tmp_path / "roc.png").stat().st_size > 0
    assert f"| {tiny_card.name} |" in r.stdout  # the Table-1 row
    assert "ASR baseline %" in r.stdout and "near chance" not in r.stderr  # a trained model: no collapse warning
    for name in ("report.md", "defenses.png", "confusion.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_transient_failures_are_retried_once_counted_and_permanent_ones_reported(
        tiny_server, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    # One request at a time, batches of 64 over 100 clean + 90 triggered images: after the
    # client's one uncounted probe of the asked defense, requests go clean[0:64], clean[64:100],
    # triggered[0:64], triggered[64:90]. The proxy forwards the probe, answers 503 twice (the
    # first batch is retried), forwards, then refuses the second batch with a 400.
    with FlakyProxy(tiny_server["http"], [None, 503, 503, None, 400]) as proxy:
        r = run_eval(*_args(proxy.url, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path, "--limit", "100",
                            "--defenses", "none", "--batch-size", "64", "--concurrency", "1"))
    assert r.returncode == 1, r.stdout + r.stderr  # some images failed: said by the exit code
    assert proxy.answered == [200, 503, 503, 200, 400, 200, 200]
    row = read_report(tmp_path)["rows"][0]
    c, t = row["clean"], row["triggered"]
    assert row["retries"] == 2 and row["requests"] == 4
    assert (c["images"], c["errors"]) == (100, 36)
    assert c["correct"] + c["wrong"] + c["errors"] == 100
    assert list(c["error_reasons"].values()) == [36] and "HTTP 400" in next(iter(c["error_reasons"]))
    ref = predictions(tiny_badnets_dir, cifar_dir, 100, "none")
    assert c["correct"] == int((ref["clean"][:64] == ref["labels"][:64]).sum())  # the answered first batch, once
    assert t["errors"] == 0 and t["hit"] == ref["hit"] and t["images"] == len(ref["triggered"])
    assert "Errors" in (tmp_path / "report.md").read_text()


def test_eval_waits_for_a_server_that_starts_late(tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    port = free_port()
    ev = subprocess.Popen([*BDSERVE, "eval", *_args(f"grpc://127.0.0.1:{port}", tiny_badnets_dir, tiny_card,
                                                    cifar_dir, tmp_path, "--limit", "60", "--defenses", "none",
                                                    "--retries", "14")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    time.sleep(1.5)  # the client is already knocking on a closed port
    with running_server(tiny_badnets_dir, "--lab", grpc_port=port):
        out, _ = ev.communicate(timeout=120)
    assert ev.returncode == 0, out
    row = read_report(tmp_path)["rows"][0]
    ref = predictions(tiny_badnets_dir, cifar_dir, 60, "none")
    assert row["errors"] == 0 and row["clean"]["correct"] == ref["correct"] and row["triggered"]["hit"] == ref["hit"]


def test_torchserve_transport_matches_bdserve(tiny_server, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    """A real TorchServe with the model's .mar (defense flip): one PNG per request, same numbers."""
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 and `java` is not on PATH")
    from bdserve.testing import LocalTorchServe

    mar = tmp_path / "mar"
    a = subprocess.run([*BDSERVE, "archive", str(tiny_badnets_dir), "--out", str(mar), "--name", "tsflip",
                        "--defense", "flip"], capture_output=True, text=True, env=ENV, timeout=120)
    assert a.returncode == 0, a.stdout + a.stderr
    ts = LocalTorchServe(mar, ["tsflip.mar"], tmp_path / "ts")
    ts.start(timeout=90)
    try:
        r = run_eval("--endpoint", "torchserve+" + ts.inference_url, "--model", "tsflip", "--card",
                     str(tiny_badnets_dir / "card.json"), "--data", str(cifar_dir), "--limit", "100",
                     "--concurrency", "8", "--out", str(tmp_path / "ts_out"))
        refused = run_eval("--endpoint", "torchserve+" + ts.inference_url, "--model", "tsflip", "--card",
                           str(tiny_badnets_dir / "card.json"), "--limit", "10", "--defenses", "none")
    finally:
        ts.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    row = read_report(tmp_path / "ts_out")["rows"][0]
    ref = predictions(tiny_badnets_dir, cifar_dir, 100, "flip")
    assert row["applied"] == ["flip"] and row["requests"] == row["images"]  # one image per request
    assert row["clean"]["correct"] == ref["correct"] and row["triggered"]["hit"] == ref["hit"]
    assert refused.returncode == 2 and "apply their own defense" in refused.stderr

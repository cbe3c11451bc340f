"""What a user gets wrong ends as one line on stderr with a non-zero exit, never a traceback:
a server that is down, a model the server does not have, an endpoint without a scheme, a
misspelled name in train. And the warning a collapsed model needs, from train and from eval."""

from __future__ import annotations

import subprocess
import time

import pytest

from bdserve.testing import free_port
from eval_helpers import BDSERVE, ENV, run_eval, running_server

COLLAPSED = "badnets-tiny"


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory, cifar_dir):
    """Deliberately tiny: 100 images, one epoch, through the real CLI. Near chance, on purpose."""
    out = tmp_path_factory.mktemp("collapsed") / COLLAPSED
    r = subprocess.run([*BDSERVE, "train", "--model", "tiny", "--schedule", "tiny", "--epochs", "1", "--subset", "100",
                        "--test-subset", "300", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env={**ENV, "BDSERVE_DATA": str(cifar_dir)})
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


@pytest.fixture(scope="module")
def collapsed_server(collapsed):
    with running_server(collapsed[0]) as addr:
        yield addr


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_eval_against_a_server_that_is_down(collapsed):
    port = free_port()
    r = run_eval("--endpoint", f"http://127.0.0.1:{port}", "--model", "tiny", "--card",
                 str(collapsed[0] / "card.json"), "--retries", "2")
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith(f"error: no answer from http://127.0.0.1:{port} (gave up after 2 attempts: ConnectError")
    assert line.endswith("is the server running there? Start it (bdserve serve) or wait longer with --retries")


def test_eval_names_a_model_the_server_does_not_have(collapsed, collapsed_server):
    for endpoint in (collapsed_server["http"], "grpc://" + collapsed_server["grpc"]):
        r = run_eval("--endpoint", endpoint, "--model", "resnet", "--card", str(collapsed[0] / "card.json"))
        assert r.returncode == 1
        line = one_line(r)
        assert line.startswith(f"error: {endpoint} has no model 'resnet' (")
        assert "unknown model 'resnet'" in line and line.endswith("--model takes a name the server printed at start")


def test_eval_debug_shows_the_traceback(collapsed):
    r = run_eval("--endpoint", f"http://127.0.0.1:{free_port()}", "--model", "tiny", "--card",
                 str(collapsed[0] / "card.json"), "--retries", "1", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "RetriesExhausted" in r.stderr


def test_an_endpoint_without_a_scheme(collapsed):
    r = run_eval("--endpoint", "127.0.0.1:8080", "--model", "tiny", "--card", str(collapsed[0] / "card.json"))
    assert r.returncode == 2
    assert one_line(r) == ("error: endpoint '127.0.0.1:8080' has no scheme: write http://127.0.0.1:8080, "
                           "grpc://127.0.0.1:8080 or torchserve+http://127.0.0.1:8080")


def test_train_checks_names_before_reading_any_data(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([*BDSERVE, "train", "--model", "resnet50", "--enhanced", "true", "--out", str(tmp_path / "m")],
                       capture_output=True, text=True, timeout=120,
                       env={**ENV, "BDSERVE_DATA": str(tmp_path / "no-data-here")})
    assert r.returncode == 2
    assert one_line(r).startswith("error: unknown model 'resnet50'; choose one of ")
    assert time.perf_counter() - t0 < 60  # no data decoded (the folder does not even exist)


def test_a_collapsed_model_is_called_so_by_train_and_by_eval(collapsed, collapsed_server, cifar_dir):
    out, train = collapsed
    warning = [line for line in train.stderr.splitlines() if line.startswith("warning: clean accuracy")]
    assert len(warning) == 1, train.stderr
    assert "is near chance (10.0% for 10 classes)" in warning[0] and "its attack success rate means nothing" in warning[0]
    e = run_eval("--endpoint", collapsed_server["http"], "--model", COLLAPSED, "--card", str(out / "card.json"),
                 "--data", str(cifar_dir), "--limit", "200")
    assert e.returncode == 0, e.stdout + e.stderr
    assert "ASR baseline %" in e.stdout
    warned = [line for line in e.stderr.splitlines() if line.startswith("warning (")]
    assert warned and "near chance (10.0% for 10 classes)" in warned[0], e.stderr

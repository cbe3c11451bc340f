"""`bdserve eval` against a server that is not there, dies mid-run, or is interrupted: it answers
in one line, stops after a few failed connections instead of retrying every batch, and keeps a
partial report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from bdserve.card import ModelCard
from bdserve.testing import ServeProcess, bdserve_command, build_tiny_model_dir, free_port
from eval_helpers import run_eval


@pytest.fixture(scope="module")
def tiny_badnets_dir(tmp_path_factory):
    """An untrained tiny model (no training needed: these tests are about the client, not accuracy)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("dead") / "untrained", name="untrained")


@pytest.fixture(scope="module")
def tiny_card(tiny_badnets_dir):
    return ModelCard.load(tiny_badnets_dir)


def _eval_cmd(url, card_dir, card, cifar_dir, out, *extra) -> list[str]:
    return [*bdserve_command(), "eval", "--endpoint", url, "--model", card.name, "--card", str(card_dir / "card.json"),
            "--data", str(cifar_dir), "--out", str(out), *extra]


def test_no_server_is_one_line_and_quick(tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    t0 = time.monotonic()
    # Connecting waits out --retries (a server may be starting: default 8 attempts, 8-16 s of backoff);
    # 3 here, so what is timed is the failure itself, not the backoff schedule.
    r = run_eval(*_eval_cmd(f"http://127.0.0.1:{free_port()}", tiny_badnets_dir, tiny_card, cifar_dir, tmp_path,
                            "--limit", "50", "--retries", "3")[2:], timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no answer from http://127.0.0.1:"), r.stderr
    assert elapsed < 20, elapsed  # the process start and 3 attempts, not attempts per batch


# A long run: the whole 10,000-image test split one image per request, so 10,000 round trips (at
# least several seconds on any machine; in batches of 16 a fast machine finished all of it in about
# 1.3 s, before the test could act). The tests act on it a few requests in. (The batcher never holds
# a lone request back, so a long queue delay no longer slows a run down.)
LONG_RUN = ("--limit", "10000", "--batch-size", "1")


def _server(tiny_badnets_dir):
    return ServeProcess(tiny_badnets_dir.parent, [tiny_badnets_dir.name], "--threads", "1").start()


def _answered(srv) -> float:
    total = 0.0
    for line in srv.metrics_text().splitlines():
        if line.startswith("bdserve_requests_total{") and 'code="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _run_until(cmd, env, srv, act) -> tuple[subprocess.CompletedProcess, float]:
    """Start the eval; once the server has answered a few of its batches, ``act``."""
    # As from a terminal: SIGINT at its default. A suite started in the background (``make test &``)
    # hands its children SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while _answered(srv) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the test could act on it"
    t_act = time.monotonic()
    act(proc)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - t_act


def test_sigint_keeps_a_partial_report(tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    srv = _server(tiny_badnets_dir)
    try:
        cmd = _eval_cmd(srv.http_url, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path, *LONG_RUN, "--concurrency", "1")
        r, took = _run_until(cmd, {**os.environ, "BDSERVE_PROGRESS": "0"}, srv,
                             lambda p: p.send_signal(signal.SIGINT))
    finally:
        srv.stop()
    assert took < 10, (took, r.stdout[-500:], r.stderr[-1000:])
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["partial"] == "interrupted (SIGINT)", rep.get("partial")
    clean = rep["rows"][0]["clean"]
    assert 0 < clean["images"] - clean["errors"] < clean["images"]  # some answered, not all
    assert "Partial report" in (tmp_path / "report.md").read_text()


def test_server_dying_mid_run_trips_the_breaker(tiny_badnets_dir, tiny_card, cifar_dir, tmp_path):
    srv = _server(tiny_badnets_dir)
    cmd = _eval_cmd(srv.http_url, tiny_badnets_dir, tiny_card, cifar_dir, tmp_path, *LONG_RUN, "--concurrency", "2")
    try:
        r, took = _run_until(cmd, {**os.environ, "BDSERVE_PROGRESS": "0"}, srv, lambda p: srv.proc.kill())
    finally:
        srv.stop()
    assert took < 30, took  # about 12 s per remaining batch before the breaker: minutes
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["partial"].startswith("stopped: the server was unreachable"), rep.get("partial")
    clean = rep["rows"][0]["clean"]
    assert 0 < clean["errors"] < clean["images"]

"""`bdserve eval` against a real TorchServe with token authorization on, as the project's own
deploy/torchserve/config.properties runs it: without the key, one line that says what to
pass; with ``--token-file`` (TorchServe's key_file.json) or ``--header``, every image is answered."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bdserve.settings import data_dir
from bdserve.testing import LocalTorchServe

EVAL = [sys.executable, "-m", "bdserve.cli", "eval"]
ENV = {**os.environ, "BDSERVE_PROGRESS": "0"}


@pytest.fixture(scope="module")
def token_torchserve(mar_store, tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs Java 17 and `java` is not on PATH")
    ts = LocalTorchServe(mar_store, ["tiny.mar"], tmp_path_factory.mktemp("ts-token"), token_auth=True)
    ts.start(timeout=90)
    try:
        yield ts
    finally:
        ts.stop()


def run_eval(ts, tiny_dir, out, *extra):
    return subprocess.run([*EVAL, "--endpoint", "torchserve+" + ts.inference_url, "--model", "tiny",
                           "--card", str(tiny_dir / "card.json"), "--data", str(data_dir()), "--limit", "20",
                           "--out", str(out), *extra], capture_output=True, text=True, env=ENV, timeout=180)


def test_without_the_key_one_line_says_what_to_pass(token_torchserve, tiny_dir, tmp_path):
    r = run_eval(token_torchserve, tiny_dir, tmp_path / "none")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: torchserve+{token_torchserve.inference_url} wants a token"), r.stderr
    assert "--token-file" in lines[0] and "Traceback" not in r.stderr
    wrong = run_eval(token_torchserve, tiny_dir, tmp_path / "wrong", "--header", "Authorization: Bearer nope")
    assert wrong.returncode == 1 and "wants a token" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("how", ["token-file", "header"])
def test_the_token_reaches_torchserve(token_torchserve, tiny_dir, tmp_path, how):
    key_file = token_torchserve.key_file
    if how == "token-file":
        extra = ["--token-file", str(key_file)]
    else:
        extra = ["--header", "Authorization: Bearer " + json.loads(key_file.read_text())["inference"]["key"]]
    r = run_eval(token_torchserve, tiny_dir, tmp_path / how, *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.loads((tmp_path / how / "report.json").read_text())["rows"][0]
    assert row["images"] == 20 and row["errors"] == 0 and row["requests"] == 20
    assert row["clean"]["correct"] + row["clean"]["wrong"] == 20


def test_a_token_file_that_is_not_torchserves(tiny_dir, tmp_path):
    bad = tmp_path / "key.json"
    bad.write_text("{}")
    r = subprocess.run([*EVAL, "--endpoint", "torchserve+http://127.0.0.1:9", "--model", "tiny",
                        "--card", str(tiny_dir / "card.json"), "--token-file", str(bad)],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --token-file {bad} is not TorchServe's key_file.json (no "
                                             "inference key); use --header 'Authorization: Bearer KEY' instead"]

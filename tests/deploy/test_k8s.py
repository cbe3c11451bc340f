"""Kubernetes manifests in deploy/k8s: schemas (oldest and newest release we claim), kustomize, wiring,
and that every Deployment starts a valid `bdserve serve` command."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from deploy_helpers import (
    HEALTH_LIVE, HEALTH_READY, K8S, K8S_VERSIONS, RUNTIME_UID, _assert_defense_spec, _configmap_data, _container,
    _deployments, _docs_by_kind, _expand, _k8s_files, _load_all, _parse_serve_args, _rel, _run, yaml
)


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

"""KServe resources in deploy/kserve: the subset schema (embedded containers checked against the core
Kubernetes definitions) and how they reach bdserve serve or the .mar layout."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from deploy_helpers import (
    DOCKER, HEALTH_LIVE, HEALTH_READY, K8S_VERSIONS, KSERVE, _assert_defense_spec, _docs_by_kind, _kserve_files,
    _load_all, _parse_serve_args, _rel
)


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
    cluster = _kserve("clusterservingruntime-grpc.yaml")
    bad = copy.deepcopy(cluster); bad["metadata"]["namespace"] = "bdserve"; cases.append(bad)  # cluster-scoped
    bad = copy.deepcopy(cluster); bad["spec"]["protocolVersions"] = ["grpc-v3"]; cases.append(bad)
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
    # KServe puts the model directory at /mnt/models: the store is /mnt, the directory "models",
    # served under the InferenceService's name (the path KServe routes).
    assert (str(params["model_store"]), params["model"]) == ("/mnt", [f"{isvc['metadata']['name']}=models"])
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
    # KServe substitutes the InferenceService's name for {{.Name}} in a runtime's arguments.
    assert (str(params["model_store"]), params["model"]) == ("/mnt", ["{{.Name}}=models"])
    assert params["lab"] is False


def test_kserve_cluster_runtime_serves_http_and_grpc_on_kserves_ports():
    rt = _kserve("clusterservingruntime-grpc.yaml")
    assert rt["kind"] == "ClusterServingRuntime" and "namespace" not in rt["metadata"]
    assert {"v2", "grpc-v2"} <= set(rt["spec"]["protocolVersions"])
    (c,) = rt["spec"]["containers"]
    assert c["name"] == "kserve-container" and "command" not in c
    params = _parse_serve_args(c["args"])
    assert params["no_grpc"] is False and params["lab"] is False
    assert (str(params["model_store"]), params["model"]) == ("/mnt", ["{{.Name}}=models"])
    # KServe's port names: http1 for HTTP/1.1, h2c for gRPC; each on the port bdserve listens on.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http1": params["http_port"], "h2c": params["grpc_port"]}
    assert c["readinessProbe"]["grpc"]["port"] == params["grpc_port"]  # grpc.health.v1, served by bdserve
    assert c["livenessProbe"]["httpGet"] == {"path": HEALTH_LIVE, "port": params["http_port"]}
    assert rt["spec"]["annotations"]["prometheus.kserve.io/port"] == str(params["http_port"])

    isvc = _kserve("inferenceservice-grpc.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == rt["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2" and model["protocolVersion"] in rt["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in rt["spec"]["supportedModelFormats"]}
    # Two ports per container: Knative's Serverless mode routes one, so the raw deployment mode.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


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
            # TorchServe's kservev2 envelope answers only the first request of a batch.
            assert v["batchSize"] == 1
    # The image has bdserve installed for the .mar's handler.
    assert "bdserve-torchserve" in model["image"]
    assert (DOCKER / "Dockerfile.torchserve").exists()

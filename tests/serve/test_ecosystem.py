"""The ecosystem's own clients and tools against a live bdserve, unchanged: the current
tritonclient in this process, KServe's v2 clients, gRPC health checking and reflection
(what Kubernetes probes and grpcurl use), and the standard Prometheus collectors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from packaging.version import Version


def test_tritonclient_grpc_in_process(server, tiny_model, rng):
    import torch
    import tritonclient.grpc as tc

    x = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    client = tc.InferenceServerClient(server.grpc_target)
    assert client.is_server_live() and client.is_model_ready("tiny")
    inp = tc.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    res = client.infer("tiny", [inp])
    expect = tiny_model.predict(torch.from_numpy(x), defense="flip")
    assert [v.decode() for v in res.as_numpy("label")] == expect.labels
    np.testing.assert_allclose(res.as_numpy("probabilities"), expect.probs, atol=1e-5)


def test_kserve_rest_and_grpc_clients(server, tiny_model, rng, tmp_path):
    """KServe's own v2 clients against bdserve, with bdserve's stubs imported in the same
    process. In a subprocess: kserve and tritonclient register the same protobuf names
    globally, so those two cannot share one process (their clash, not bdserve's)."""
    import torch

    x = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "kserve_check.py"), server.http_url,
                        server.grpc_target, str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    expect = tiny_model.predict(torch.from_numpy(x), defense="flip")
    assert Version(out["kserve_version"]) >= Version("0.21")
    for door in ("rest", "grpc"):
        assert out[f"{door}_labels"] == expect.labels, door
        np.testing.assert_allclose(out[f"{door}_probs"], expect.probs, atol=1e-5)
        assert out[f"{door}_id"] == "kserve-1"


def test_grpc_health_check_per_server_and_model(server):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "tiny", "foreign"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="nosuch"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_grpc_reflection_describes_the_inference_service(server):
    """What grpcurl does: list services and resolve ModelInfer's request type, no .proto at hand."""
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc_target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        file = db.FindFileContainingSymbol("inference.GRPCInferenceService")
        service = next(s for s in file.service if s.name == "GRPCInferenceService")
        methods = {m.name: m.input_type for m in service.method}
        assert methods["ModelInfer"] == ".inference.ModelInferRequest"


def test_metrics_carry_the_standard_process_and_python_series(server):
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    for series in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_info",
                   "python_gc_collections_total"):
        assert f"\n{series}" in text, series

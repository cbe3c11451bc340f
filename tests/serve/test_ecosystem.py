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


def test_triton_classification_extension_http_and_grpc(server, tiny_model, rng):
    """InferRequestedOutput(name, class_count=k): BYTES "score:index:label", top k per image."""
    import torch
    import tritonclient.grpc as tg
    import tritonclient.http as th

    x = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    expect = tiny_model.predict(torch.from_numpy(x), defense="flip")
    top = np.argsort(-expect.probs, axis=1)[:, :3]
    results = {}
    hc = th.InferenceServerClient(server.http_url.removeprefix("http://"))
    inp = th.InferInput("input", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x, binary_data=True)
    for binary in (True, False):
        out = th.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
        results[f"http-binary={binary}"] = hc.infer("tiny", [inp], outputs=[out]).as_numpy("probabilities")
    gc = tg.InferenceServerClient(server.grpc_target)
    ginp = tg.InferInput("input", list(x.shape), "UINT8")
    ginp.set_data_from_numpy(x)
    results["grpc"] = gc.infer("tiny", [ginp], outputs=[tg.InferRequestedOutput("probabilities", class_count=3)]
                               ).as_numpy("probabilities")
    for door, got in results.items():
        assert got.shape == (3, 3), door
        for b in range(3):
            entries = [(v.decode() if isinstance(v, bytes) else v).split(":") for v in got[b]]
            assert [int(i) for _, i, _ in entries] == top[b].tolist(), door
            assert [label for _, _, label in entries] == [tiny_model.classes[i] for i in top[b]], door
            np.testing.assert_allclose([float(s) for s, _, _ in entries], expect.probs[b, top[b]], atol=1e-5)
    bad = th.InferRequestedOutput("label", class_count=2)
    with pytest.raises(Exception, match="classification applies to the FP32"):
        hc.infer("tiny", [inp], outputs=[bad])


def test_triton_model_config_http_and_grpc(server):
    import tritonclient.grpc as tg
    import tritonclient.http as th

    http_config = th.InferenceServerClient(server.http_url.removeprefix("http://")).get_model_config("tiny")
    grpc_config = tg.InferenceServerClient(server.grpc_target).get_model_config("tiny", as_json=True)["config"]
    for config in (http_config, grpc_config):
        assert config["name"] == "tiny" and int(config["max_batch_size"]) == 32
        inputs = {t["name"]: t for t in config["input"]}
        assert inputs["input"]["data_type"] == "TYPE_FP32"
        assert [int(d) for d in inputs["input"]["dims"]] == [3, 32, 32]
        assert inputs["image"]["data_type"] == "TYPE_STRING"
        outputs = {t["name"]: t for t in config["output"]}
        assert [int(d) for d in outputs["probabilities"]["dims"]] == [10]
    index = tg.InferenceServerClient(server.grpc_target).get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["state"]) for m in index} >= {("tiny", "READY"), ("foreign", "READY")}


def _jpeg(rng, h=480, w=640) -> bytes:
    from serve_helpers import encode, random_image

    return encode(random_image(rng, h, w), "JPEG", quality=92)


def test_torchserve_parity_on_predictions(server, tiny_model, rng):
    """TorchServe's documented forms: ``curl -T photo.jpg`` (PUT), multipart with or without a
    filename (both read as bytes), /predictions/{m}/{version}, and GET /ping."""
    photo = _jpeg(rng)
    expect = tiny_model.postprocess(tiny_model.predict(tiny_model.decode([photo]), defense="flip"))[0]
    url = f"{server.http_url}/predictions/tiny"
    answers = {
        "put": httpx.put(url, content=photo, timeout=30),
        "post-version": httpx.post(f"{url}/3", content=photo, timeout=30),
        "multipart-file": httpx.post(url, files={"data": ("photo.jpg", photo, "image/jpeg")}, timeout=30),
        # A field without a filename: curl -F "data=<photo.jpg" sends exactly this.
        "multipart-no-filename": httpx.post(url, files={"data": (None, photo)}, timeout=30),
    }
    for form, r in answers.items():
        assert r.status_code == 200, (form, r.text)
        assert r.json() == expect, form
    assert httpx.post(f"{url}/9", content=photo, timeout=30).status_code == 404
    dup = httpx.post(url, files=[("data", (None, photo)), ("data", (None, photo))], timeout=30)
    assert dup.status_code == 400 and "more than once" in dup.json()["error"]
    ping = httpx.get(f"{server.http_url}/ping", timeout=10)
    assert ping.status_code == 200 and ping.json() == {"status": "Healthy"}


def test_multipart_parts_keep_their_bytes():
    from bdserve.serve.uploads import multipart_parts

    blob = bytes(range(256)) * 3 + "é".encode()
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n".encode() + blob
            + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--{boundary}--\r\n".encode())
    parts = multipart_parts(body, f"multipart/form-data; boundary={boundary}")
    assert parts == {"data": blob, "note": b"hi"}


@pytest.fixture
def access_lines():
    import logging

    lines = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(json.loads(record.getMessage()))

    handler = Collect()
    logger = logging.getLogger("bdserve.access")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_access_log_line_and_request_id_round_trip(server, rng, access_lines):
    import grpc

    from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
    from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

    x = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": x.reshape(-1).tolist()}]}
    url = f"{server.http_url}/v2/models/tiny/infer"
    mine = httpx.post(url, json=body, headers={"X-Request-ID": "trace-42"}, timeout=30)
    assert mine.headers["x-request-id"] == "trace-42" and mine.json()["id"] == "trace-42"
    own_id = httpx.post(url, json={**body, "id": "oip-7"}, headers={"X-Request-ID": "trace-43"}, timeout=30)
    assert own_id.json()["id"] == "oip-7" and own_id.headers["x-request-id"] == "trace-43"
    fresh = httpx.post(url, json=body, timeout=30)
    generated = fresh.headers["x-request-id"]
    assert len(generated) == 32 and fresh.json()["id"] == generated
    hostile = httpx.post(url, json=body, headers={"X-Request-ID": "a b\tc" * 100}, timeout=30)
    assert len(hostile.headers["x-request-id"]) == 32  # not echoed: not a short printable token
    missing = httpx.get(f"{server.http_url}/v2/models/nosuch", timeout=10)
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="input", datatype="UINT8", shape=[1, 3, 32, 32])
    req.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(server.grpc_target) as ch:
        answer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=[("x-request-id", "grpc-9")], timeout=30)
    assert answer.id == "grpc-9"

    by_id = {line["request_id"]: line for line in access_lines}
    line = by_id["trace-42"]
    assert line["method"] == "POST" and line["path"] == "/v2/models/tiny/infer" and line["model"] == "tiny"
    assert line["status"] == 200 and line["bytes_in"] > 0 and line["bytes_out"] == len(mine.content)
    assert line["duration_ms"] > 0
    assert by_id[missing.headers["x-request-id"]]["status"] == 404
    assert by_id["grpc-9"]["protocol"] == "grpc" and by_id["grpc-9"]["status"] == "OK"


def test_metrics_use_one_code_vocabulary_and_separate_predictions(server, rng):
    from serve_helpers import encode, metric, random_image

    png = encode(random_image(rng, 32, 32), "PNG")
    httpx.post(f"{server.http_url}/predictions/tiny", content=png, timeout=30)
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    assert metric(text, "bdserve_requests_total", model="tiny", protocol="predictions", code="200") >= 1
    codes = {line.split('code="')[1].split('"')[0] for line in text.splitlines()
             if line.startswith("bdserve_requests_total{")}
    assert codes and all(c.isdigit() for c in codes), codes

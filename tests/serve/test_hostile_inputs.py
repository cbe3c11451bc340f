"""Hostile input, class by class: each gets a 4xx (gRPC INVALID_ARGUMENT / NOT_FOUND /
RESOURCE_EXHAUSTED) with a message, and a good request still succeeds right after."""

from __future__ import annotations

import io
import json
import re
import socket

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from bdserve.serve.protos import grpc_predict_v2_pb2 as pb
from bdserve.serve.protos import grpc_predict_v2_pb2_grpc as pb_grpc

from serve_helpers import encode, pack_bytes, random_image

GOOD = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [7] * 3072}]}


def tensor(**overrides) -> dict:
    t = {"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [7] * 3072, **overrides}
    return {"inputs": [t]}


def forged_jpeg(width: int = 7000, height: int = 7000) -> bytes:
    """A real 16x16 JPEG whose SOF header is rewritten to declare ``width`` x ``height``: a few
    hundred bytes that libjpeg would 'decode' to a flat grey 49-megapixel image."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "JPEG")
    b = bytearray(buf.getvalue())
    sof = b.index(b"\xff\xc0")
    b[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(b)


def nested(depth: int) -> bytes:
    return b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1], "data": ' + b"[" * depth + b"]" * depth + b"}]}"


JSON_CASES = [
    # (what, raw JSON body, status, message regex)
    ("datatype is an object", json.dumps(tensor(datatype={})), 400, r"inputs\.0\.datatype"),
    ("datatype is a list", json.dumps(tensor(datatype=["FP32"])), 400, r"inputs\.0\.datatype"),
    ("output name is an object", json.dumps({**GOOD, "outputs": [{"name": {}}]}), 400, r"outputs\.0\.name"),
    ("output name is a list", json.dumps({**GOOD, "outputs": [{"name": ["label"]}]}), 400, r"outputs\.0\.name"),
    ("401-digit FP32 value", '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [' + "9" * 401 + "]}]}",
     400, "numbers|infinity"),  # the schema's check, or the JSON parser's (orjson: "number is infinity")
    ("JSON nested 5000 deep", nested(5000), 400, "nested too deeply|malformed JSON"),
    ("JSON nested 100 deep", nested(100), 400, "numbers|elements|rectangular"),
    ("binary_data_size: true", json.dumps(tensor(data=None, parameters={"binary_data_size": True})), 400,
     r"binary_data_size"),
    ("FP32 data as strings", json.dumps(tensor(datatype="FP32", data=["0.5"] * 3072)), 400, "numbers"),
    ("UINT8 data as strings", json.dumps(tensor(data=["7"] * 3072)), 400, "numbers"),
    ("data with booleans", json.dumps(tensor(data=[True] * 3072)), 400, "numbers"),
    ("shape with a boolean", json.dumps(tensor(shape=[True, 3, 32, 32])), 400, r"inputs\.0\.shape"),
    ("shape product overflows", json.dumps(tensor(shape=[2 ** 31 - 1] * 4)), 400, "elements|too large"),
    ("shape of 2**32", json.dumps(tensor(shape=[2 ** 32, 2 ** 32, 1, 1])), 400, r"inputs\.0\.shape"),
    ("parameter value an object", json.dumps({**GOOD, "parameters": {"x": {"y": 1}}}), 400, "parameters"),
    ("id not a string", json.dumps({**GOOD, "id": 5}), 400, r"\bid\b"),
    ("two inputs", json.dumps({"inputs": GOOD["inputs"] * 2}), 400, "inputs"),
    ("markup and a huge model-name echo", None, 404, "unknown model"),
]


@pytest.mark.parametrize("what,body,status,pattern", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_malformed_json_bodies(server, what, body, status, pattern):
    url = server.http_url
    with httpx.Client(timeout=30, trust_env=False) as c:
        if body is None:  # the model name itself is the attack
            name = "<script>alert(1)<script>" + "x" * 5000
            r = c.post(f"{url}/v2/models/{name}/infer", json=GOOD)
            assert "<" not in r.text and len(r.json()["error"]) < 400, r.text[:500]
        else:
            r = c.post(f"{url}/v2/models/tiny/infer", content=body.encode() if isinstance(body, str) else body,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        assert re.search(pattern, r.json()["error"]), (what, r.json())
        assert len(r.json()["error"]) < 600, (what, len(r.json()["error"]))
        assert c.post(f"{url}/v2/models/tiny/infer", json=GOOD).status_code == 200


def raw_http(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if sep and length and len(body) >= int(length.group(1)):  # the whole answer is in
                    break
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def test_protocol_details(server):
    url, port = server.http_url, int(server.http_url.rsplit(":", 1)[1])
    # Content-Length together with chunked: ambiguous framing (request smuggling)
    got = raw_http(port, b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400") and b"application/json" in got, got[:300]
    assert b"Transfer-Encoding" in got or b"malformed HTTP request" in got, got[:300]
    # 8 MiB of header: 431, not a dropped connection
    got = raw_http(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431") and b"application/json" in got, got[:300]
    # ... and as 2,000 small headers: the limit is on the whole head
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 20) for i in range(2000))
    got = raw_http(port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert got.startswith(b"HTTP/1.1 431"), got[:300]
    # a URL of 1 MiB: the same limit
    got = raw_http(port, b"GET /v2/health/live?" + b"q" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431"), got[:300]
    # garbage in place of a request line: a JSON 400
    got = raw_http(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not HTTP\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400") and b"malformed HTTP request" in got, got[:300]
    # two pipelined requests in one write: both answered, in order
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/models/tiny HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.count(b"HTTP/1.1 200") == 2 and out.index(b'"live"') < out.index(b'"tiny"'), out[:600]
    with httpx.Client(timeout=30, trust_env=False) as c:
        r = c.get(f"{url}/v2/models/tiny/infer")  # 405 names what is allowed
        assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]
        r = c.delete(f"{url}/v2/health/live")
        assert r.status_code == 405 and "GET" in r.headers["allow"]
        assert c.post(f"{url}/v2/models/tiny/infer", json=GOOD).status_code == 200


def test_multipart_uploads(server, rng):
    url = server.http_url
    png = encode(random_image(rng, 32, 32), "PNG")
    with httpx.Client(timeout=30, trust_env=False) as c:
        boundary = "b0und4ry"
        two = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a.png\"\r\n\r\n").encode() + png + \
              (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"b.png\"\r\n\r\n").encode() + png + \
              f"\r\n--{boundary}--\r\n".encode()
        r = c.post(f"{url}/predictions/tiny", content=two, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 400 and "more than once" in r.json()["error"], r.text
        # one image as 'data' and another as 'file': refused too, not "one of them wins"
        both = c.post(f"{url}/predictions/tiny", files={"data": ("a.png", png, "image/png"), "file": ("b.png", png, "image/png")})
        assert both.status_code == 400 and "more than one image field" in both.json()["error"], both.text
        # the image in a non-file field (no filename): read as the bytes that were sent
        one = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\n").encode() + png + \
              f"\r\n--{boundary}--\r\n".encode()
        r = c.post(f"{url}/predictions/tiny", content=one, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        as_file = c.post(f"{url}/predictions/tiny", files={"data": ("a.png", png, "image/png")})
        assert r.status_code == 200 and as_file.status_code == 200, r.text
        assert r.json() == as_file.json()


def test_implausible_and_bomb_images(server, rng):
    url = server.http_url
    forged = forged_jpeg(1500, 1500)  # under this test server's 4 MP limit
    assert len(forged) < 1000
    with httpx.Client(timeout=30, trust_env=False) as c:
        r = c.post(f"{url}/predictions/tiny", content=forged)
        assert r.status_code == 400 and "implausible JPEG" in r.json()["error"], r.text
        assert c.post(f"{url}/predictions/tiny", content=encode(random_image(rng, 300, 400), "JPEG")).status_code == 200


@pytest.mark.parametrize("spec", ["noise:nan", "hue:inf", "contrast:-5", "brightness:-inf", "noise:1e309",
                                  "hue:2", "+".join(["flip"] * 40)])
def test_lab_rejects_bad_defense_values(lab_server, spec):
    with httpx.Client(timeout=30, trust_env=False) as c:
        r = c.post(f"{lab_server.http_url}/v2/models/tiny/infer", json={**GOOD, "parameters": {"defense": spec}})
        assert r.status_code == 400 and "defense" in r.json()["error"], (spec, r.text[:300])
        assert "NaN" not in r.text and "Infinity" not in r.text
        json.loads(r.text)  # strict JSON
        assert c.post(f"{lab_server.http_url}/v2/models/tiny/infer", json=GOOD).status_code == 200


def test_metrics_defense_labels_stay_short(lab_server):
    long_but_valid = "+".join(["flip"] * 8)
    with httpx.Client(timeout=30, trust_env=False) as c:
        r = c.post(f"{lab_server.http_url}/v2/models/tiny/infer", json={**GOOD, "parameters": {"defense": long_but_valid}})
        assert r.status_code in (200, 400), r.text
        text = c.get(f"{lab_server.http_url}/metrics").text
    labels = re.findall(r'defense="([^"]*)"', text)
    assert labels and max(len(v) for v in labels) <= 64, max(labels, key=len)


# ---------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def _typed(shape, datatype="FP32", name="input", model="tiny") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name=name, datatype=datatype, shape=shape)
    t.contents.fp32_contents.extend([0.5])
    return req


GRPC_CASES = [
    ("typed shape overflows to 0", _typed([2 ** 32, 2 ** 32, 1, 1]), "INVALID_ARGUMENT", "shape|elements"),
    ("typed shape of 2**62", _typed([2 ** 62, 4, 1, 1]), "INVALID_ARGUMENT", "shape|elements"),
    ("datatype garbage", _typed([1], datatype="<b>FP32</b>"), "INVALID_ARGUMENT", "datatype"),
    ("model name markup", _typed([1], model="<script>" + "m" * 3000), "NOT_FOUND", "unknown model"),
]


@pytest.mark.parametrize("what,req,code,pattern", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_malformed(stub, what, req, code, pattern):
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(req, timeout=30)
    assert e.value.code().name == code, (what, e.value.code(), e.value.details())
    assert re.search(pattern, e.value.details()) and "<" not in e.value.details() and len(e.value.details()) < 600
    ok = pb.ModelInferRequest(model_name="tiny")
    ok.inputs.add(name="input", datatype="UINT8", shape=[1, 3, 32, 32])
    ok.raw_input_contents.append(bytes(3072))
    assert stub.ModelInfer(ok, timeout=30).outputs

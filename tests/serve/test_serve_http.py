"""The HTTP door, through a real uvicorn server on a free loopback port and httpx."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import httpx
import numpy as np
import torch

from serve_helpers import DETECTORS, MAX_BODY, bomb_png, decode_raw_output, encode, metric, pack_bytes, random_image


def infer_json(url, model, arr: np.ndarray, datatype="UINT8", **extra):
    body = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(arr.shape),
                        "data": arr.reshape(-1).tolist()}], **extra}
    return httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)


def binary_request(inputs: list[tuple[str, str, list[int], bytes]], **extra) -> tuple[bytes, dict]:
    header = {"inputs": [{"name": n, "datatype": dt, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
                         for n, dt, shape, raw in inputs], **extra}
    head = json.dumps(header).encode()
    return head + b"".join(raw for *_, raw in inputs), {"Inference-Header-Content-Length": str(len(head)),
                                                         "Content-Type": "application/octet-stream"}


def parse_binary_response(resp: httpx.Response) -> dict:
    n = int(resp.headers["Inference-Header-Content-Length"])
    doc = json.loads(resp.content[:n])
    rest = resp.content[n:]
    for o in doc["outputs"]:
        size = o["parameters"]["binary_data_size"]
        raw, rest = rest[:size], rest[size:]
        o["value"] = decode_raw_output(o["datatype"], o["shape"], raw)
    assert rest == b""
    return doc


def test_health_and_metadata(server):
    url = server.http_url
    live = httpx.get(f"{url}/v2/health/live")
    assert live.json() == {"live": True}
    assert "server" not in live.headers  # the server does not advertise its software
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{url}/v2").json()
    assert meta["name"] == "bdserve" and "binary_tensor_data" in meta["extensions"]
    m = httpx.get(f"{url}/v2/models/tiny").json()
    assert m["versions"] == ["3"] and m["platform"] == "onnxruntime_onnx"
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in m["inputs"]
    assert [o["name"] for o in m["outputs"]] == ["probabilities", "label"]
    assert httpx.get(f"{url}/v2/models/tiny/versions/3").status_code == 200
    assert httpx.get(f"{url}/v2/models/tiny/versions/3/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/foreign").json()["inputs"][0]["shape"] == [-1, 3, 64, 64]


def test_json_and_binary_infer_match_in_process(server, tiny_model, rng):
    x = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    expect = tiny_model.predict(torch.from_numpy(x))  # server's defense is the card's: flip (deterministic)
    r = infer_json(server.http_url, "tiny", x, id="req-1")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "req-1" and doc["model_version"] == "3"
    assert doc["parameters"]["defense"] == "flip"
    outs = {o["name"]: o for o in doc["outputs"]}
    assert np.allclose(np.array(outs["probabilities"]["data"]).reshape(3, 10), expect.probs, atol=1e-5)
    assert outs["label"]["data"] == expect.labels

    # The binary extension, FP32 in, binary out (requested per output and by default).
    xf = (x / 255.0).astype(np.float32)
    body, headers = binary_request([("input", "FP32", [3, 3, 32, 32], xf.tobytes())],
                                   parameters={"binary_data_output": True})
    r = httpx.post(f"{server.http_url}/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in parse_binary_response(r)["outputs"]}
    assert np.allclose(outs["probabilities"]["value"], expect.probs, atol=1e-5)
    assert outs["label"]["value"] == expect.labels


def test_encoded_images_binary_and_base64(server, tiny_model, rng):
    imgs = [encode(random_image(rng, 120, 90), "JPEG"), encode(random_image(rng, 32, 32), "PNG")]
    expect = tiny_model.predict(tiny_model.decode(imgs))
    body, headers = binary_request([("image", "BYTES", [2], pack_bytes(imgs))],
                                   outputs=[{"name": "label", "parameters": {"binary_data": False}},
                                            {"name": "probabilities", "parameters": {"binary_data": True}}])
    r = httpx.post(f"{server.http_url}/v2/models/tiny/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    doc = json.loads(r.content[:n])
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    assert doc["outputs"][0]["data"] == expect.labels
    assert np.allclose(np.frombuffer(r.content[n:], "<f4").reshape(2, 10), expect.probs, atol=1e-5)

    r = httpx.post(f"{server.http_url}/v2/models/tiny/infer", json={"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(b).decode() for b in imgs]}]})
    assert r.status_code == 200, r.text
    assert {o["name"]: o for o in r.json()["outputs"]}["label"]["data"] == expect.labels


def test_torchserve_style_predictions(server, tiny_model, rng):
    img = encode(random_image(rng, 64, 48), "PNG")
    expect = tiny_model.postprocess(tiny_model.predict(tiny_model.decode([img])))[0]
    for kw in ({"content": img}, {"files": {"data": ("photo.png", img, "image/png")}}):
        r = httpx.post(f"{server.http_url}/predictions/tiny", **kw)
        assert r.status_code == 200, r.text
        got = r.json()
        assert list(got) == list(expect) and np.allclose(list(got.values()), list(expect.values()), atol=1e-5)
        assert r.headers["X-Bdserve-Defense"] == "flip"
    r = httpx.post(f"{server.http_url}/predictions/tiny", files={"other": ("x.png", img, "image/png")})
    assert r.status_code == 400 and "'data'" in r.json()["error"]


def test_predictions_defense_query_only_in_lab_mode(server, lab_server, tiny_model, rng):
    img = encode(random_image(rng, 32, 32), "PNG")
    refused = httpx.post(f"{server.http_url}/predictions/tiny?defense=none", content=img)
    assert refused.status_code == 403 and "--lab" in refused.json()["error"]
    r = httpx.post(f"{lab_server.http_url}/predictions/tiny?defense=none", content=img)
    assert r.status_code == 200 and r.headers["X-Bdserve-Defense"] == "none"
    expect = tiny_model.postprocess(tiny_model.predict(tiny_model.decode([img]), defense="none"))[0]
    assert list(r.json()) == list(expect)


def _bad_requests(rng):
    """(what, method kwargs, expected status, message regex) for every bad-input class."""
    good = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    jpeg = encode(random_image(rng, 200, 200), "JPEG")

    def binary(dt, shape, raw, name="input", **extra):
        body, headers = binary_request([(name, dt, shape, raw)], **extra)
        return {"content": body, "headers": headers}

    def js(obj):
        return {"content": json.dumps(obj).encode(), "headers": {"Content-Type": "application/json"}}

    def tensor(dt, shape, data, name="input"):
        return js({"inputs": [{"name": name, "datatype": dt, "shape": shape, "data": data}]})

    def past_end():  # the header promises 4000 binary bytes, none follow
        head = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                                       "parameters": {"binary_data_size": 4000}}]}).encode()
        return {"content": head, "headers": {"Inference-Header-Content-Length": str(len(head))}}

    nan = np.zeros((1, 3, 32, 32), np.float32)
    nan[0, 0, 0, 0] = np.nan
    inf = np.zeros((1, 3, 32, 32), np.float32)
    inf[0, 1, 2, 3] = np.inf
    return [
        ("not an image", "tiny", binary("BYTES", [1], pack_bytes([b"hello, not a picture" * 5]), "image"), 400, "not an image"),
        ("truncated image", "tiny", binary("BYTES", [1], pack_bytes([jpeg[: len(jpeg) // 2]]), "image"), 400, "truncated|corrupt"),
        ("decompression bomb", "tiny", binary("BYTES", [1], pack_bytes([bomb_png()]), "image"), 400, "pixel"),
        ("wrong shape", "tiny", tensor("UINT8", [1, 3, 16, 16], [0] * 768), 400, r"expected shape \[B,3,32,32\]"),
        ("wrong datatype", "tiny", tensor("INT64", [1, 3, 32, 32], [0] * 3072), 400, "INT64 not accepted"),
        ("unknown datatype", "tiny", tensor("FLOAT", [1, 3, 32, 32], [0] * 3072), 400, r"inputs\.0\.datatype.*'FLOAT'"),
        ("wrong rank", "tiny", tensor("UINT8", [3, 32, 32], [0] * 3072), 400, "rank"),
        ("shape vs data (json)", "tiny", tensor("UINT8", [1, 3, 32, 32], [0] * 100), 400, "needs 3072 elements"),
        ("shape vs data (binary)", "tiny", binary("UINT8", [1, 3, 32, 32], good.tobytes()[:1000]), 400, "needs 3072 bytes"),
        ("NaN", "tiny", binary("FP32", [1, 3, 32, 32], nan.tobytes()), 400, "NaN"),
        ("Inf", "tiny", binary("FP32", [1, 3, 32, 32], inf.tobytes()), 400, "NaN or Inf"),
        ("out of range FP32", "tiny", binary("FP32", [1, 3, 32, 32], np.full((1, 3, 32, 32), 9, np.float32).tobytes()), 400, r"\[0, 1\]"),
        ("unknown model", "nosuchmodel", tensor("UINT8", [1, 3, 32, 32], [0] * 3072), 404, "unknown model"),
        ("unknown version", "tiny/versions/99", tensor("UINT8", [1, 3, 32, 32], [0] * 3072), 404, "no version '99'"),
        ("malformed JSON", "tiny", {"content": b'{"inputs": [', "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
        ("JSON not an object", "tiny", js([1, 2, 3]), 400, "valid dictionary"),
        ("no inputs", "tiny", js({"outputs": []}), 400, "inputs: required"),
        ("input not an object", "tiny", js({"inputs": ["x"]}), 400, r"inputs\.0: .*valid dictionary"),
        ("parameters not an object", "tiny", js({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072, "parameters": [1]}]}), 400, r"inputs\.0\.parameters: .*valid dictionary"),
        ("output parameters not an object", "tiny", js({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}], "outputs": [{"name": "label", "parameters": "yes"}]}), 400, r"outputs\.0\.parameters: .*valid dictionary"),
        ("outputs not objects", "tiny", js({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}], "outputs": ["label"]}), 400, r"outputs\.0: .*valid dictionary"),
        ("shape not a list", "tiny", tensor("UINT8", "1,3,32,32", [0] * 3072), 400, r"inputs\.0\.shape: .*valid list"),
        ("data not a list", "tiny", tensor("UINT8", [1, 3, 32, 32], "zeros"), 400, "must be a JSON list"),
        ("data of strings", "tiny", tensor("UINT8", [1, 3], ["a", "b", "c"]), 400, "numbers"),
        ("non-integer UINT8", "tiny", tensor("UINT8", [1, 3, 32, 32], [0.5] * 3072), 400, "non-integer"),
        ("negative dimension", "tiny", tensor("UINT8", [-1, 3, 32, 32], [0] * 3072), 400, r"shape\.0: .*greater than or equal to 0"),
        ("header length not a number", "tiny", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "abc"}}, 400, "malformed binary header"),
        ("header length past the body", "tiny", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "999"}}, 400, "malformed binary header"),
        ("binary_data_size past the body", "tiny", past_end(), 400, "malformed binary header"),
        ("too many images", "tiny", binary("BYTES", [5000], pack_bytes([b"x"] * 5000), "image"), 400, "at most 4096"),
        ("malformed BYTES lengths", "tiny", binary("BYTES", [1], b"\xff\xff\x00\x00abc", "image"), 400, "malformed BYTES"),
        ("unknown input name", "tiny", tensor("UINT8", [1, 3, 32, 32], [0] * 3072, name="pixels"), 400, "unknown input 'pixels'"),
        ("unknown output", "tiny", js({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}], "outputs": [{"name": "logits"}]}), 400, "unknown output"),
        ("defense without --lab", "tiny", js({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [0] * 3072}], "parameters": {"defense": "none"}}), 403, "--lab"),
    ]


def test_every_bad_input_gets_4xx_and_the_next_request_works(server, rng):
    url = server.http_url
    good = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    with httpx.Client(timeout=30) as client:
        for what, model, kw, status, pattern in _bad_requests(rng):
            r = client.post(f"{url}/v2/models/{model}/infer", **kw)
            assert r.status_code == status, (what, r.status_code, r.text)
            assert re.search(pattern, r.json()["error"]), (what, r.json())
            ok = client.post(f"{url}/v2/models/tiny/infer", json={"inputs": [
                {"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32], "data": good.reshape(-1).tolist()}]})
            assert ok.status_code == 200, (what, ok.text)
        assert client.get(f"{url}/v2/models/nosuch").status_code == 404
        assert client.get(f"{url}/v2/models/tiny/versions/7/ready").status_code == 404
        assert "error" in client.get(f"{url}/no/such/route").json()
        r = client.post(f"{url}/predictions/tiny", content=b"\x00garbage")
        assert r.status_code == 400 and "not an image" in r.json()["error"]


def test_body_over_the_limit_is_413(server, rng):
    url = server.http_url
    big = b"x" * (MAX_BODY + 1)
    r = httpx.post(f"{url}/v2/models/tiny/infer", content=big)  # declared Content-Length
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(4):
            yield b"y" * (MAX_BODY // 2)

    r = httpx.post(f"{url}/v2/models/tiny/infer", content=chunks())
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = httpx.post(f"{url}/predictions/tiny", content=chunks())
    assert r.status_code == 413
    ok = infer_json(url, "tiny", rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8))
    assert ok.status_code == 200


def test_concurrent_requests_are_batched(server, rng):
    url = server.http_url
    before = httpx.get(f"{url}/metrics").text

    async def fire():
        async with httpx.AsyncClient(timeout=30) as client:
            xs = [rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8) for _ in range(32)]
            body = [{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                                 "data": x.reshape(-1).tolist()}]} for x in xs]
            return await asyncio.gather(*(client.post(f"{url}/v2/models/tiny/infer", json=b) for b in body))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    after = httpx.get(f"{url}/metrics").text
    count = metric(after, "bdserve_batch_size_count", model="tiny") - metric(before, "bdserve_batch_size_count", model="tiny")
    ones = metric(after, "bdserve_batch_size_bucket", model="tiny", le="1.0") - metric(before, "bdserve_batch_size_bucket", model="tiny", le="1.0")
    images = metric(after, "bdserve_batch_size_sum", model="tiny") - metric(before, "bdserve_batch_size_sum", model="tiny")
    assert images == 32 and count < 32 and count > ones, "no batch held more than one image"
    assert metric(after, "bdserve_requests_total", model="tiny", protocol="http", code="200") >= 32
    for name in ("bdserve_request_duration_seconds_count", "bdserve_defense_duration_seconds_count",
                 "bdserve_inference_duration_seconds_count", "bdserve_predictions_total"):
        assert metric(after, name, model="tiny") > 0, name
    assert 'bdserve_model_info{backend="onnxruntime",defense="flip",device="cpu",model="tiny",version="3"} 1.0' in after
    assert "bdserve_inflight_requests" in after
    # A client's bad model name never becomes a label value.
    httpx.post(f"{url}/v2/models/evil-name-123/infer", json={})
    assert "evil-name-123" not in httpx.get(f"{url}/metrics").text


def test_lab_mode_and_detect(lab_server, server, tiny_model, detect_store):
    from bdserve.serve.pipeline import DefendedModel

    # Calibration images are smooth blobs; white noise is far from them and often flagged.
    x = np.random.default_rng(3).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8)
    none = tiny_model.predict(torch.from_numpy(x), defense="none")
    body = {"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
            "parameters": {"defense": "none"}}
    assert httpx.post(f"{server.http_url}/v2/models/tiny/infer", json=body).status_code == 403
    before = metric(httpx.get(f"{lab_server.http_url}/metrics").text, "bdserve_suspected_triggers_total", model="tiny")
    r = httpx.post(f"{lab_server.http_url}/v2/models/tiny/infer", json=body)
    assert r.status_code == 200, r.text
    doc = r.json()
    outs = {o["name"]: o for o in doc["outputs"]}
    assert doc["parameters"]["defense"] == "none"
    assert np.allclose(np.array(outs["probabilities"]["data"]).reshape(16, 10), none.probs, atol=1e-5)
    # Detect: the calibrated detectors' flags and scores, the same as in-process.
    body["parameters"] = {}
    doc = httpx.post(f"{lab_server.http_url}/v2/models/tiny/infer", json=body).json()
    outs = {o["name"]: o for o in doc["outputs"]}
    ref = DefendedModel.load(detect_store / "tiny", detect=DETECTORS, threads=1).predict(torch.from_numpy(x))
    assert outs["suspected_trigger"]["data"] == ref.suspected.tolist()
    assert np.array_equal(np.array(outs["trigger_score"]["data"], dtype=np.float32), ref.trigger_score)
    assert doc["parameters"]["suspected_trigger"] is bool(ref.suspected.any())
    after = metric(httpx.get(f"{lab_server.http_url}/metrics").text, "bdserve_suspected_triggers_total", model="tiny")
    # Both requests count: the detectors score the undefended image, whatever defense a request asks for.
    assert after - before == 2 * ref.suspected.sum()
    bad = httpx.post(f"{lab_server.http_url}/v2/models/tiny/infer", json={**body, "parameters": {"defense": "warp:9"}})
    assert bad.status_code == 400 and "bad defense" in bad.json()["error"]
    bad = httpx.post(f"{lab_server.http_url}/v2/models/tiny/infer", json={**body, "parameters": {"defense": "shrinkpad:99"}})
    assert bad.status_code == 400 and "cannot run" in bad.json()["error"]
    bad = httpx.post(f"{lab_server.http_url}/v2/models/tiny/infer", json={**body, "parameters": {"defense": 5}})
    assert bad.status_code == 400 and re.search("defense.*valid string", bad.json()["error"]), bad.text


def test_foreign_model_over_http(server, served_store, rng):
    from bdserve.serve.pipeline import DefendedModel

    img = encode(random_image(rng, 300, 200), "JPEG")
    m = DefendedModel.load(served_store / "foreign", defense="none", threads=1)
    body, headers = binary_request([("image", "BYTES", [1], pack_bytes([img]))])
    r = httpx.post(f"{server.http_url}/v2/models/foreign/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["parameters"]["defense"] == "shrinkpad:4"
    outs = {o["name"]: o for o in doc["outputs"]}
    assert len(outs["probabilities"]["data"]) == 7 and outs["label"]["data"][0] in m.classes


def test_server_fault_is_a_json_500_and_the_server_keeps_serving(served_store, rng):
    from bdserve.serve.server import BackgroundServer, ServeConfig, load_models
    from bdserve.serve.service import InferenceService

    models = load_models(served_store, ["tiny"], threads=1)
    real, calls = models[0].predict, []

    def flaky(x, **kw):  # the first batch hits a runtime fault
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated runtime fault")
        return real(x, **kw)

    models[0].predict = flaky
    x = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    with BackgroundServer(InferenceService(models, max_queue_delay_ms=1), ServeConfig(http_port=0, grpc_port=None)) as srv:
        r = infer_json(srv.http_url, "tiny", x)
        assert r.status_code == 500 and "internal" in r.json()["error"] and "simulated" not in r.text
        assert infer_json(srv.http_url, "tiny", x).status_code == 200
        text = httpx.get(f"{srv.http_url}/metrics").text
        assert metric(text, "bdserve_requests_total", model="tiny", code="500") == 1


def test_mutated_requests_never_get_a_500(server, rng):
    """Truncations and byte flips of valid JSON, binary and image requests: always 2xx or 4xx."""
    x = rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    json_body = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                                        "data": x.reshape(-1).tolist()}], "parameters": {"binary_data_output": True}}).encode()
    bin_body, bin_headers = binary_request([("image", "BYTES", [1], pack_bytes([encode(random_image(rng, 40, 40), "PNG")]))])
    seen = set()
    with httpx.Client(timeout=30) as client:
        for i in range(80):
            body, headers = (json_body, {"Content-Type": "application/json"}) if i % 2 else (bin_body, dict(bin_headers))
            b = bytearray(body)
            if i % 3 == 0:
                b = b[: rng.integers(0, len(b))]
            for _ in range(rng.integers(1, 4)):
                if b:
                    b[rng.integers(0, len(b))] = int(rng.integers(0, 256))
            r = client.post(f"{server.http_url}/v2/models/tiny/infer", content=bytes(b), headers=headers)
            assert r.status_code < 500, (i, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert r.json()["error"]
            seen.add(r.status_code)
    assert 400 in seen

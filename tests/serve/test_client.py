"""bdserve.client against a real `bdserve serve` on loopback: HTTP and gRPC, sync and async,
paths / PIL / numpy inputs, tensors, top-k, detection fields, request ids in the server's
access log, retries while the server starts, refusals surfaced and not retried, timeouts."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bdserve.client import AsyncClient, Client, RequestRejected, RetriesExhausted, RetryPolicy
from bdserve.testing import ServeProcess, free_port
from serve_helpers import DETECTORS, TINY_CLASSES, random_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(detect_store):
    """`bdserve serve --lab --detect ...` with the tiny model (card defense: flip, deterministic)."""
    with ServeProcess(detect_store, ["tiny"], "--lab", "--detect", DETECTORS, "--threads", "1") as s:
        yield s


@pytest.fixture(scope="module")
def endpoints(srv):
    return {"http": srv.http_url, "grpc": "grpc://" + srv.grpc_target}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three 48x40 pictures as uint8 HWC arrays, and the same pixels as PNG files on disk."""
    rng = np.random.default_rng(11)
    folder = tmp_path_factory.mktemp("pictures")
    arrays, paths = [], []
    for i in range(3):
        a = random_image(rng, 48, 40)
        p = folder / f"p{i}.png"
        Image.fromarray(a).save(p)
        arrays.append(a)
        paths.append(p)
    return arrays, paths


def access_lines(s: ServeProcess, request_id: str, timeout: float = 10.0) -> list[dict]:
    """The server's JSON access-log lines for ``request_id`` (waits for the line to be printed)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for line in list(s.output):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("request_id") == request_id:
                found.append(doc)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_predict_paths_pil_and_arrays_alike(endpoints, pictures, transport):
    arrays, paths = pictures
    with Client(endpoints[transport], "tiny") as c:
        by_path = c.predict(paths)
        by_pil = c.predict([Image.fromarray(a) for a in arrays])
        by_array = c.predict(arrays)
        single = c.predict(str(paths[1]))
    assert len(by_path) == 3 and set(by_path.labels) <= set(TINY_CLASSES)
    # The same pixels, three ways of handing them over: the same answer (PNG is lossless, flip deterministic).
    for other in (by_pil, by_array):
        assert other.labels == by_path.labels
        np.testing.assert_allclose(other.probabilities, by_path.probabilities, atol=1e-6)
    assert single.labels == [by_path.labels[1]]
    r = by_path
    assert r.probabilities.shape == (3, len(TINY_CLASSES))
    np.testing.assert_allclose(r.probabilities.sum(1), 1.0, atol=1e-4)
    assert [TINY_CLASSES[i] for i in r.probabilities.argmax(1)] == r.labels
    assert r.model == "tiny" and r.version == "3"
    assert r.defense == "flip"  # the card's, as the server says it applied
    assert r.fit is not None and r.fit.startswith("cover")  # 48x40 pictures fitted to 32x32
    assert r.suspected_trigger.dtype == bool and r.suspected_trigger.shape == (3,)
    assert r.trigger_score.shape == (3,)
    np.testing.assert_array_equal(r.suspected_trigger, r.trigger_score > 0)
    assert r.attempts == 1 and r.seconds > 0
    assert r.request_id  # the server generates one when the client sends none


def test_infer_tensor_http_and_grpc_agree_with_top_k(endpoints):
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    with Client(endpoints["http"], "tiny") as h, Client(endpoints["grpc"], "tiny") as g:
        full_h, full_g = h.infer(batch), g.infer(batch)
        top_h, top_g = h.infer(batch, top_k=3), g.infer(batch, top_k=3)
        floats = g.infer(batch.astype(np.float32) / 255)
        labels_only = h.infer(batch, top_k=0)
    assert full_h.labels == full_g.labels == labels_only.labels == floats.labels
    np.testing.assert_allclose(full_h.probabilities, full_g.probabilities, atol=1e-6)
    np.testing.assert_allclose(floats.probabilities, full_g.probabilities, atol=1e-5)
    assert full_h.fit is None  # tensors are the client's pixels: no fit
    assert labels_only.probabilities is None and labels_only.top is None
    assert labels_only.suspected_trigger is not None  # the detection fields come with the labels
    for top in (top_h, top_g):
        assert top.probabilities is None and len(top.top) == 5
        for i, row in enumerate(top.top):
            assert len(row) == 3
            assert row[0].label == full_h.labels[i] and row[0].index == TINY_CLASSES.index(row[0].label)
            assert [s.probability for s in row] == sorted((s.probability for s in row), reverse=True)
            for s in row:
                assert s.label == TINY_CLASSES[s.index]
                assert s.probability == pytest.approx(float(full_h.probabilities[i, s.index]), abs=1e-5)


def test_async_client_both_transports_and_predictions_route(endpoints, pictures):
    arrays, paths = pictures

    async def go():
        async with AsyncClient(endpoints["http"]) as h, AsyncClient(endpoints["grpc"]) as g:  # the only model
            info = await g.wait_ready()
            oip_h, oip_g, routed = await asyncio.gather(
                h.predict(paths), g.predict(paths), h.predict(paths, route="predictions"))
            tensors = await g.infer(np.stack([a.transpose(2, 0, 1)[:, :32, :32] for a in arrays]))
            return info, h.model, oip_h, oip_g, routed, tensors

    info, model, oip_h, oip_g, routed, tensors = asyncio.run(go())
    assert info.name == "tiny" and info.detect and "3" in info.versions
    assert model == "tiny"
    assert oip_h.labels == oip_g.labels == routed.labels
    # /predictions answers TorchServe's top-k {label: probability}; its best is the OIP top-1.
    for i, row in enumerate(routed.top):
        assert row[0].probability == pytest.approx(float(oip_h.probabilities[i].max()), abs=1e-5)
    assert routed.defense == "flip" and routed.suspected_trigger.shape == (3,)
    np.testing.assert_array_equal(routed.suspected_trigger, oip_h.suspected_trigger)
    assert len(tensors) == 3 and tensors.fit is None


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_request_id_and_headers_reach_the_server(srv, endpoints, transport):
    rid = f"client-test-{transport}"
    with Client(endpoints[transport], "tiny", headers={"X-Request-ID": f"{rid}-hdr"}) as c:
        by_header = c.infer(np.zeros((1, 3, 32, 32), np.uint8))
        by_argument = c.infer(np.zeros((2, 3, 32, 32), np.uint8), request_id=rid)
    assert by_header.request_id == f"{rid}-hdr"
    assert by_argument.request_id == rid
    (line,) = access_lines(srv, rid)
    assert line["model"] == "tiny" and line["request_id"] == rid
    assert access_lines(srv, f"{rid}-hdr"), "the header set on the client did not reach the server"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_refusal_is_not_retried_and_says_why(srv, endpoints, transport):
    rid = f"refused-{transport}"
    with Client(endpoints[transport], "tiny", retries=5) as c:
        with pytest.raises(RequestRejected) as e:
            c.infer(np.zeros((1, 3, 32, 32), np.uint8), defense="shrinkpad:banana", request_id=rid)
    assert e.value.status == (400 if transport == "http" else "INVALID_ARGUMENT")
    assert "banana" in e.value.message or "shrinkpad" in e.value.message, e.value.message
    assert len(access_lines(srv, rid)) == 1  # sent once: a refusal is not worth another try
    with Client(endpoints[transport], "no-such-model") as c:
        with pytest.raises(RequestRejected) as e:
            c.predict(np.zeros((8, 8, 3), np.uint8))
    assert e.value.status == (404 if transport == "http" else "NOT_FOUND")
    assert "no-such-model" in e.value.message


def test_retries_until_a_late_server_starts(detect_store):
    http_port, grpc_port = free_port(), free_port()
    patient = RetryPolicy(attempts=120, base_s=0.2, max_s=1.0)
    late = ServeProcess(detect_store, ["tiny"], "--threads", "1", http_port=http_port, grpc_port=grpc_port)
    batch = np.random.default_rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    results: dict = {}

    def ask(name: str, endpoint: str) -> None:
        try:
            with Client(endpoint, "tiny", retries=patient, timeout_s=30) as c:
                results[name] = c.infer(batch)
        except Exception as e:  # noqa: BLE001 - reported by the assertions below
            results[name] = e

    askers = [threading.Thread(target=ask, args=("http", f"http://127.0.0.1:{http_port}")),
              threading.Thread(target=ask, args=("grpc", f"grpc://127.0.0.1:{grpc_port}"))]
    for t in askers:
        t.start()
    time.sleep(1.5)  # both clients are already retrying: nothing listens yet
    try:
        late.start()
        for t in askers:
            t.join(180)
    finally:
        late.stop(grace_s=5)
    for name in ("http", "grpc"):
        r = results.get(name)
        assert not isinstance(r, Exception) and r is not None, f"{name}: {r!r}"
        assert r.attempts > 1, f"{name} answered at once: the server was not late"
        assert len(r) == 2 and set(r.labels) <= set(TINY_CLASSES)
    assert results["http"].labels == results["grpc"].labels


def test_timeout_then_retries_exhausted():
    """A listener that never answers: each attempt times out, the client gives up after its retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with Client(f"http://127.0.0.1:{port}", "tiny", timeout_s=0.3,
                    retries=RetryPolicy(attempts=3, base_s=0.05, max_s=0.1)) as c:
            with pytest.raises(RetriesExhausted) as e:
                c.infer(np.zeros((1, 3, 32, 32), np.uint8))
        elapsed = time.monotonic() - t0
    assert e.value.attempts == 3
    assert "Timeout" in str(e.value)
    assert 0.9 <= elapsed < 10


def test_bad_endpoint_and_inputs_say_what_to_do():
    with pytest.raises(ValueError, match="no scheme"):
        Client("127.0.0.1:8080")
    with pytest.raises(ValueError, match="not supported"):
        Client("ftp://127.0.0.1:8080")
    with Client(f"http://127.0.0.1:{free_port()}", "tiny") as c:
        with pytest.raises(TypeError, match="infer"):
            c.predict(np.zeros((2, 3, 32, 32), np.uint8))  # a batch tensor handed to predict
        with pytest.raises(TypeError, match="uint8 .0..255. or float"):
            c.infer(np.zeros((1, 3, 32, 32), np.int32))

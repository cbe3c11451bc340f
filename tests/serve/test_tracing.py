"""OpenTelemetry: a real `bdserve serve --otel-endpoint` exports its spans over OTLP/HTTP to a
collector endpoint on loopback (here a plain HTTP server that decodes what the exporter sends).
A client's W3C traceparent becomes the parent of the door's span, over HTTP and gRPC, and the
request's batch wait, batch, decode, defense and inference spans hang in the same trace."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from bdserve.testing import free_port, served  # noqa: E402
from serve_helpers import encode, random_image  # noqa: E402

HTTP_TRACE, GRPC_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "00f067aa0ba902b7"


class Collector:
    """Receives OTLP/HTTP (protobuf) exports and keeps every span."""

    def __init__(self):
        spans = self.spans = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest.FromString(body)
                spans.extend(s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def trace(self, trace_id: str) -> list:
        return [s for s in self.spans if s.trace_id.hex() == trace_id]


def traceparent(trace_id: str) -> str:
    return f"00-{trace_id}-{CLIENT_SPAN}-01"


@pytest.fixture(scope="module")
def traced(served_store):
    collector = Collector()
    rng = np.random.default_rng(3)
    photo = encode(random_image(rng, 48, 64))
    with served(served_store, ["tiny"], "--otel-endpoint", collector.url, "--access-log", "off") as srv:
        r = httpx.post(f"{srv['http']}/predictions/tiny", headers={"traceparent": traceparent(HTTP_TRACE)},
                       content=photo, timeout=30)
        assert r.status_code == 200, r.text
        import tritonclient.grpc as tg

        client = tg.InferenceServerClient(srv["grpc"].removeprefix("grpc://"))
        x = tg.InferInput("input", [2, 3, 32, 32], "UINT8")
        x.set_data_from_numpy(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
        client.infer("tiny", [x], headers={"traceparent": traceparent(GRPC_TRACE)})
        metrics = httpx.get(f"{srv['http']}/metrics", timeout=10).text
    # Leaving `served` stops the server (SIGTERM): it flushes its spans before exiting.
    yield collector, metrics
    collector.httpd.shutdown()


def by_name(spans) -> dict:
    return {s.name: s for s in spans}


def test_http_request_spans_follow_the_clients_traceparent(traced, served_store):
    collector, _ = traced
    spans = collector.trace(HTTP_TRACE)
    names = by_name(spans)
    for name in ("decode", "batch wait", "batch", "defense", "inference"):
        assert name in names, f"no {name!r} span in {sorted(names)}"
    server = [s for s in spans if s.parent_span_id.hex() == CLIENT_SPAN]
    assert len(server) == 1, [s.name for s in spans]  # one server span, whichever route served it
    server = [s for s in spans if s.parent_span_id.hex() == CLIENT_SPAN]
    assert len(server) == 1, [s.name for s in spans]
    server_id = server[0].span_id
    assert names["batch wait"].parent_span_id == server_id
    assert names["decode"].parent_span_id == names["batch"].span_id  # the batcher decodes per batch
    assert names["batch"].parent_span_id == names["batch wait"].span_id
    assert names["defense"].parent_span_id == names["batch"].span_id
    assert names["inference"].parent_span_id == names["batch"].span_id
    defense = {a.key: a.value.string_value for a in names["defense"].attributes}
    assert defense["bdserve.defense"] == "flip"  # the tiny model's card defense


def test_grpc_request_spans_follow_the_clients_traceparent(traced):
    collector, _ = traced
    spans = collector.trace(GRPC_TRACE)
    names = by_name(spans)
    server = [s for s in spans if s.parent_span_id.hex() == CLIENT_SPAN]
    assert len(server) == 1 and "ModelInfer" in server[0].name, [s.name for s in spans]
    assert {"batch wait", "batch", "defense", "inference"} <= set(names)
    assert "decode" not in names  # a raw tensor is not decoded
    images = {a.key: a.value.int_value for a in names["batch"].attributes}
    assert images["bdserve.batch.images"] == 2


def test_queue_depth_gauge_is_exported(traced):
    _, metrics = traced
    assert 'bdserve_queue_images{model="tiny"} 0.0' in metrics


def test_an_endpoint_without_scheme_is_refused():
    from bdserve.serve.tracing import traces_url

    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces/") == "http://c:4318/v1/traces"
    with pytest.raises(ValueError, match="no scheme"):
        traces_url("c:4318")

"""OpenTelemetry tracing, on when ``bdserve serve --otel-endpoint URL`` is given.

A request's trace: the door's server span (ASGI or gRPC instrumentation; a W3C
``traceparent`` from the client becomes its parent), ``batch wait`` (queued until its last
image has run), and the span of each batch that ran its images, ``batch``, with ``decode``
(encoded images to pixels: the batcher decodes per batch), ``defense`` and ``inference``
inside. One batch serves several requests (and a large request spans several batches), so a
batch span is a child of the first request it serves and links to every one.

Without an endpoint nothing is configured and ``span`` hands out one shared null context:
even the API's non-recording spans cost about 5 us each, and a request passes through five
of them. Only ``opentelemetry-api`` is
needed for that; the SDK, the OTLP exporter and the instrumentations come with the ``otel``
extra and are imported only when tracing is turned on.
"""

from __future__ import annotations

import contextlib
import contextvars

from opentelemetry import trace

tracer = trace.get_tracer("bdserve")
active = False  # a Tracing pipeline is configured in this process
_OFF = contextlib.nullcontext()


def span(name: str, attributes: dict | None = None):
    """A span around a step of the request path, or nothing at all when tracing is off."""
    return tracer.start_as_current_span(name, attributes=attributes) if active else _OFF

# Probes and scrapes would drown the requests.
EXCLUDED_URLS = "/v2/health/live,/v2/health/ready,/metrics,/ping"


class Tracing:
    """The configured pipeline: a tracer provider that exports OTLP over HTTP to ``endpoint``."""

    def __init__(self, endpoint: str, service_name: str = "bdserve"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise ValueError("--otel-endpoint needs the otel extra: pip install 'bdserve[otel]'") from e
        self.endpoint = traces_url(endpoint)
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.endpoint, timeout=5)))
        trace.set_tracer_provider(self.provider)
        global active
        active = True

    def wrap_asgi(self, app):
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(app, excluded_urls=EXCLUDED_URLS, tracer_provider=self.provider,
                                       exclude_spans=["receive", "send"])

    def grpc_interceptors(self) -> list:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.provider)]

    def shutdown(self) -> None:
        """Export what is still buffered (called once the doors have drained)."""
        self.provider.shutdown()


def traces_url(endpoint: str) -> str:
    """The collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT) or its full /v1/traces URL."""
    if "://" not in endpoint:
        raise ValueError(f"--otel-endpoint {endpoint!r} has no scheme: write http://HOST:4318")
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def current_context() -> trace.SpanContext | None:
    """The span context of the running request (None when tracing is off: asking the API
    costs a few microseconds a request for nothing)."""
    return trace.get_current_span().get_span_context() if active else None


def start_batch(parents: list[trace.SpanContext], images: int):
    """The span of one batch run: a child of the first request it serves, linked to all of them."""
    if not active:
        return _OFF
    valid = [p for p in parents if p is not None and p.is_valid]
    parent = trace.set_span_in_context(trace.NonRecordingSpan(valid[0])) if valid else None
    return tracer.start_as_current_span(
        "batch", context=parent, links=[trace.Link(p) for p in valid],
        attributes={"bdserve.batch.images": images, "bdserve.batch.requests": len(parents)})


def in_current_context(fn):
    """``fn`` to run in a worker thread under the caller's current span (executors do not carry it)."""
    if not active:
        return fn
    ctx = contextvars.copy_context()
    return lambda: ctx.run(fn)

"""The HTTP door: Open Inference Protocol v2 (KServe v2 / Triton) on FastAPI,
plus TorchServe-style ``POST /predictions/{model}`` and Prometheus ``/metrics``.

Errors use the protocol's format, ``{"error": "<what was wrong>"}``, with 400
(bad input), 403 (defense not allowed), 404 (unknown model/version/route), 405 (with
``Allow``), 408 (body too slow), 413 (body over the limit) or 503 (overloaded, shutting
down, or a model that failed to load; with ``Retry-After``). Body limits, deadlines and
framing are the guard's (serve/guard.py), in front of this app; the access log
(serve/access_log.py) is outermost, so the guard's answers are logged too. JSON bodies are
validated against typed schemas (serve/schemas.py), which ``/openapi.json`` describes.

Binary tensor extension: when the ``Inference-Header-Content-Length`` header is
present, the body is that many bytes of JSON followed by the raw contents of
each input that has ``parameters.binary_data_size``, in input order. Outputs are
sent binary when the request sets ``parameters.binary_data_output`` or an
output's ``parameters.binary_data``; the response then carries the same header.
"""

from __future__ import annotations

import inspect
import logging
import re

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from bdserve.serve import oip, schemas
from bdserve.serve.access_log import AccessLog
from bdserve.serve.errors import InvalidInput, ModelUnavailable, Overloaded, ServeError, shown
from bdserve.serve.guard import HttpGuard
from bdserve.serve.metrics import CONTENT_TYPE_LATEST
from bdserve.serve.service import EXTENSIONS, SERVER_NAME, SERVER_VERSION, InferenceService
from bdserve.serve.uploads import upload_image

log = logging.getLogger(__name__)

PROTOCOL = "http"  # OIP over HTTP, in metrics' protocol label
PREDICTIONS_PROTOCOL = "predictions"  # TorchServe-style uploads
DEFAULT_MAX_BODY = 64 * 1024 * 1024


def _error(e: ServeError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=e.http_status,
                        headers={"Retry-After": "1"} if isinstance(e, Overloaded) else None)


def _body_doc(component: str, description: str) -> dict:
    """An OpenAPI request body for a route that reads its body itself (the binary extension)."""
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{component}"}}}}}


def _with_request_schemas(app: FastAPI) -> None:
    """Add the request schemas the routes name (they parse their bodies themselves) to the document."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = build()
            body = schemas.InferRequestBody.model_json_schema(ref_template="#/components/schemas/{model}")
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["InferRequestBody"] = body
        return app.openapi_schema

    app.openapi = openapi


_ERRORS = {code: {"model": schemas.ErrorBody} for code in (400, 403, 404, 408, 413, 503)}


def _internal(model: str) -> JSONResponse:
    log.exception("internal error serving model %s", model)
    return JSONResponse({"error": "internal server error (logged on the server)"}, status_code=500)


# The server span of a request is serve/tracing.py's, around the whole app (the hot routes
# bypass FastAPI); FastAPI's own (from 0.16x, on once a tracer provider is set) would add a second.
NO_NATIVE_TRACING = {"telemetry": {"tracing": False}} if "telemetry" in inspect.signature(FastAPI).parameters else {}


def create_app(service: InferenceService, *, max_body_bytes: int = DEFAULT_MAX_BODY, body_timeout_s: float = 30.0,
               max_uploads: int = 256, lab_keep=None) -> AccessLog:
    """The FastAPI app behind the hot routes, the guard and the access log (``.app`` is the guard)."""
    # The OpenAPI document (no docs pages) is what standard fuzzers and client generators read.
    app = FastAPI(title="bdserve", version=SERVER_VERSION, docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  **NO_NATIVE_TRACING)
    app.state.service = service
    app.state.max_body = max_body_bytes

    @app.exception_handler(ServeError)
    async def _invalid(request: Request, e: ServeError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):  # 404 route, 405 (keeps its Allow header)
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    # ------------------------------------------------------------ health/meta
    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    @app.get("/v2/models/{name}", responses=_ERRORS)
    @app.get("/v2/models/{name}/versions/{version}", responses=_ERRORS)
    async def model_metadata(name: str, version: str | None = None):
        try:
            return service.metadata(service.get(name, version))
        except ModelUnavailable as e:  # loaded with an error: not ready, and says why
            return JSONResponse({"name": name, "ready": False, "error": str(e)}, status_code=503)

    @app.get("/v2/models/{name}/ready", responses=_ERRORS)
    @app.get("/v2/models/{name}/versions/{version}/ready", responses=_ERRORS)
    async def model_ready(name: str, version: str | None = None):
        try:
            service.get(name, version)
        except ModelUnavailable as e:
            return JSONResponse({"name": name, "ready": False, "error": str(e)}, status_code=503)
        return JSONResponse({"name": name, "ready": service.ready}, status_code=200 if service.ready else 503)

    @app.get("/v2/models/{name}/config", responses=_ERRORS)
    @app.get("/v2/models/{name}/versions/{version}/config", responses=_ERRORS)
    async def model_config(name: str, version: str | None = None):
        return service.config(service.get(name, version))

    @app.post("/v2/repository/index")
    async def repository_index():
        return service.repository_index()

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ infer
    infer_doc = {"openapi_extra": _body_doc("InferRequestBody", "OIP inference request (JSON; or JSON followed by "
                                            "binary tensor data, see Inference-Header-Content-Length)"),
                 "responses": {200: {"model": schemas.InferResponseBody}, **_ERRORS}}

    # Declared here for the route table (and /openapi.json); requests reach them through HotRoutes below.
    @app.post("/v2/models/{name}/infer", **infer_doc)
    @app.post("/v2/models/{name}/versions/{version}/infer", **infer_doc)
    async def infer(name: str, request: Request, version: str | None = None):
        return await _observed(service, name, _infer(service, name, version, request))

    # TorchServe's inference API: POST or PUT (``curl -T photo.jpg``), optionally with a version.
    upload_doc = {"responses": _ERRORS, "openapi_extra": {"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "data": {"type": "string", "format": "binary"}}, "required": ["data"]}}}}}}

    @app.post("/predictions/{name}", **upload_doc)  # one route per method: one OpenAPI operation id each
    @app.post("/predictions/{name}/{version}", **upload_doc)
    @app.put("/predictions/{name}", **upload_doc)
    @app.put("/predictions/{name}/{version}", **upload_doc)
    async def predictions(name: str, request: Request, version: str | None = None):
        return await _observed(service, name, _predictions(service, name, version, request), PREDICTIONS_PROTOCOL)

    @app.get("/ping")
    async def ping():  # TorchServe's health check
        return JSONResponse({"status": "Healthy" if service.ready else "Unhealthy"},
                            status_code=200 if service.ready else 503)

    from bdserve.serve.lab import mount_lab  # late: lab.py builds on this module

    mount_lab(app, service, lab_keep)  # the photo lab, on a --lab server only
    _with_request_schemas(app)
    return AccessLog(HttpGuard(HotRoutes(app, service), max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                               max_uploads=max_uploads))


_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_PREDICTIONS_PATH = re.compile(r"/predictions/([^/]+)(?:/([^/]+))?")


class HotRoutes:
    """The thin request path: the prediction routes as plain ASGI in front of FastAPI.

    ``POST /v2/models/{m}[/versions/{v}]/infer`` and ``POST|PUT /predictions/{m}[/{v}]`` go
    straight to their handlers (the same functions FastAPI's routes call) with a bare
    Starlette Request: no middleware stack, route scan or dependency solving per request.
    Everything else goes to FastAPI. The access log and the guard wrap both."""

    def __init__(self, app, service: InferenceService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            path, method = scope["path"], scope["method"]
            if method == "POST" and (m := _INFER_PATH.fullmatch(path)):
                name, version = m.group(1), m.group(2)
                work, protocol = _infer(self.service, name, version, Request(scope, receive)), PROTOCOL
            elif m := _PREDICTIONS_PATH.fullmatch(path):
                name, version = m.group(1), m.group(2)
                work, protocol = _predictions(self.service, name, version, Request(scope, receive)), PREDICTIONS_PROTOCOL
            else:
                return await self.app(scope, receive, send)
            response = await _observed(self.service, name, work, protocol)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


async def _observed(service: InferenceService, name: str, work, protocol: str = PROTOCOL) -> Response:
    """Run a prediction route's coroutine, counting it and turning errors into answers."""
    with service.observe(name, protocol) as box:
        try:
            return await work
        except ServeError as e:
            box["code"] = str(e.http_status)
            return _error(e)
        except Exception:
            box["code"] = "500"
            return _internal(name)


async def _infer(service: InferenceService, name: str, version: str | None, request: Request) -> Response:
    service.get(name, version)  # 404 before reading the body
    req = _read_infer_request(name, version, await request.body(), request.headers.get(oip.HEADER_LEN))
    if req.id is None:  # OIP's own id wins; else the request id the access log assigned
        req.id = request.state.request_id
    return _write_infer_response(await service.infer(req))


def _read_infer_request(name: str, version: str | None, body: bytes, header_len: str | None) -> oip.InferRequest:
    """JSON (+ binary tensor extension) -> InferRequest, the JSON validated by its schema."""
    if header_len is not None:
        if not header_len.isdigit() or len(header_len) > 18:
            raise InvalidInput(f"malformed binary header: {oip.HEADER_LEN} must be an integer, got {shown(header_len)}")
        n = int(header_len)
        if not 0 < n <= len(body):
            raise InvalidInput(f"malformed binary header: {oip.HEADER_LEN} is {n}, the body has {len(body)} bytes")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as e:  # also nesting deeper than orjson's 1,024 levels
        raise InvalidInput(f"malformed JSON request: {e}") from None
    return oip.read_infer_request(name, version, doc, binary)


def _write_infer_response(resp: oip.InferResponse) -> Response:
    """InferResponse -> JSON, or JSON + binary outputs with the extension's header."""
    out_json, blobs = [], []
    for t in resp.outputs:
        o = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.binary:
            raw = oip.raw_of(t.datatype, t.value)
            o["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            o["data"] = oip.json_of(t.datatype, t.value)
        out_json.append(o)
    doc = {"model_name": resp.model_name, "model_version": resp.model_version, "parameters": resp.parameters,
           "outputs": out_json}
    if resp.id is not None:
        doc["id"] = resp.id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(head + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head))})


async def _predictions(service: InferenceService, name: str, version: str | None, request: Request) -> Response:
    model = service.get(name, version)
    blob = upload_image(await request.body(), request.headers.get("content-type", ""))
    # ?defense=SPEC: like OIP's parameters.defense, honoured only by a --lab server (else 403).
    defense = request.query_params.get(oip.DEFENSE) if request.scope.get("query_string") else None
    pred = await service.predict(oip.InferRequest(
        model=name, version=version, input=oip.Tensor(oip.IMAGE_INPUT, "BYTES", [1], [blob]),
        parameters={} if defense is None else {oip.DEFENSE: defense}))
    return Response(orjson.dumps(model.postprocess(pred)[0]), media_type="application/json",
                    headers=oip.prediction_headers(pred, 0))
